"""What a rank sweep costs: rank switches, a K-rank sweep vs K single-rank evaluations,
merged vs unmerged latency.

On a short trained run (trained here with core.train: default model, r_max 16, 10 steps;
or an existing run folder given with --run):

(a) set_rank(model, b) time: median over many switches across ranks (target < 10 ms).
(b) A K-rank sweep (core.evaluation.sweep.Sweep: validate, setup = load the run once,
    run = every rank; latency off, 8 prompts, 32-token answers, ranks 0,1,4,16, default metrics)
    against the sum of K single-rank evaluations on a model that is already loaded (the
    same library helpers the sweep uses: set_rank, measure_nll, generate, rouge_l_scores,
    fact_recall, SemanticSimilarity, summarize_rank). Rounds alternate the two
    (target: sweep <= 1.1 x the sum). Both the end-to-end sweep (incl. its one model
    load) and its rank loop alone are reported.
(c) Latency at batch size 1 (core.evaluation.sweep.measure_latency: per-token time and (1 prompt,
    8 new tokens, 3 timed repeats after a warm-up, 3 rounds)
    time to first token) per rank: unmerged (the run's NF4 model at rank b), merged
    (core.evaluation.sweep.MergedModel at rank b, a float base copy) and the plain base
    (MergedModel at rank 0 = W0 with nothing added), measured next to each other in
    rounds (target: merged within 5 % of base).
(d) The whole search (issue 12): the 40-step run that this script trains (its wall time from
    start to saved adapter, or --run and its recorded time) and one 5-rank sweep of it as
    the dashboard runs it (ranks 1,2,4,8,16; 40 prompts x 64-token answers; reference NLL,
    ROUGE-L, fact recall, similarity; latency on with the defaults), timed end to end,
    load included. Five dedicated QLoRA runs cost five such trainings (bench/README.md §1:
    a QDyLoRA step costs a PEFT LoRA step) and five single-rank evaluations, each with its
    own load. Targets: the sweep under 5 minutes; the search (training + evaluating each
    rank once) at least 4x cheaper than the five QLoRA runs evaluated once each; both
    with and without the latency phases (which a QLoRA comparison may leave out).

    .venv/bin/python bench/sweep_cost.py [--quick] [--run RUN_DIR] [--skip-search]
    .venv/bin/python bench/sweep_cost.py --train-steps 200 --search-only --tag steps200   # (d) at the CLI's default budget
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from core.evaluation.sweep import MergedModel, Sweep, SweepConfig, measure_latency, measure_nll, summarize_rank  # noqa: E402
from core.qdylora import set_rank  # noqa: E402
from core.runs import generate, load_run  # noqa: E402

TARGET_SWITCH_MS = 10.0
TARGET_SWEEP_RATIO = 1.1
TARGET_MERGED = 0.05
TARGET_SWEEP_S = 300.0
TARGET_SEARCH = 4.0
TRAIN_INFO = "bench_train.json"   # wall time of the training this script did, next to the run


def ensure_run(run: str | None, quick: bool, steps: int = 40) -> Path:
    from core.train import TrainConfig, train

    if run:
        return Path(run)
    out = common.TMP / ("sweep_cost_run_quick" if quick else f"sweep_cost_run_{steps}")
    if (out / "adapter" / "adapter.safetensors").is_file() and (out / TRAIN_INFO).is_file():
        common.log(f"reusing {out}")
        return out
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(data=str(common.TRAIN_FILE), out=str(out), r_max=16, steps=2 if quick else steps,
                      batch_size=4, max_length=128 if quick else 256, seed=42)
    common.log(f"training {out} ({cfg.steps} steps)")
    t0 = time.perf_counter()
    train(cfg)
    (out / TRAIN_INFO).write_text(json.dumps({"train_s": time.perf_counter() - t0, "steps": cfg.steps,
                                              "loadavg_end": common.loadavg()}))
    return out


def part_search(run: Path, ranks: list[int], n_prompts: int, new_tokens: int, quick: bool = False) -> dict:
    """(d) One sweep as the dashboard runs it, end to end, against the run's training time."""
    info_path = run / TRAIN_INFO
    train_s = json.loads(info_path.read_text())["train_s"] if info_path.is_file() else None
    out = common.TMP / "sweep_cost_search"
    shutil.rmtree(out, ignore_errors=True)
    smoke = dict(latency_prompts=1, latency_repeats=1, latency_new_tokens=4) if quick else {}  # else the dashboard's defaults
    cfg = SweepConfig(run=str(run), prompts=str(common.EVAL_FILE), out=str(out), ranks=ranks, max_prompts=n_prompts,
                      max_new_tokens=new_tokens, **smoke)
    sweep = Sweep(cfg, resume=False)
    t0 = time.perf_counter()
    sweep.validate()
    sweep.setup()
    t1 = time.perf_counter()
    result = sweep.run()
    t2 = time.perf_counter()
    sweep.cleanup()
    assert result.status == "completed", result.message
    summaries = [sweep.results[b]["summary"] for b in ranks]
    latency_s = [s.get("latency_s", 0.0) for s in summaries]
    load_s, total_s = t1 - t0, t2 - t0
    per_rank = [s["eval_s"] for s in summaries]
    quality = [e - lat for e, lat in zip(per_rank, latency_s)]
    out_rows = {"ranks": ranks, "prompts": n_prompts, "new_tokens": new_tokens, "sweep_total_s": total_s, "load_s": load_s,
                "per_rank_eval_s": per_rank, "per_rank_latency_s": latency_s, "quality_path": sweep.quality_path,
                "train_s": train_s, "threads": common.threads.describe()}
    if train_s:
        k = len(ranks)
        for name, evals in (("with_latency", per_rank), ("quality_only", quality)):
            ours = train_s + load_s + sum(evals)
            theirs = k * train_s + k * load_s + sum(evals)      # each dedicated run is loaded and evaluated at its rank
            out_rows[f"search_ratio_{name}"] = theirs / ours
    del sweep
    gc.collect()
    shutil.rmtree(out, ignore_errors=True)
    return out_rows


def single_rank_eval(loaded, items, rank: int, cfg: SweepConfig, metrics: list[str], similarity) -> dict:
    """One rank evaluated with the library helpers on an already-loaded model (what the sweep does per rank)."""
    from core.evaluation.metrics import fact_recall, rouge_l_scores

    set_rank(loaded.model, rank)
    loaded.model.eval()
    rows = []
    for start in range(0, len(items), cfg.batch_size):
        chunk = items[start:start + cfg.batch_size]
        part = [{"rank": rank, "id": it.id, "reference": it.reference} for it in chunk]
        if "ref_nll" in metrics:
            for row, (s, c) in zip(part, measure_nll(loaded.model, loaded.tokenizer, chunk, cfg.batch_size)):
                row["ref_nll"], row["ref_tokens"] = (s / c if c else math.nan), c
        answers = generate(loaded.model, loaded.tokenizer, [it.prompt for it in chunk],
                           max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
        for row, ans, it, score in zip(part, answers, chunk, rouge_l_scores(answers, [it.reference for it in chunk])):
            row["answer"], row["rouge_l"], row["fact_recall"] = ans, score, fact_recall(ans, it.must_include)
        rows += part
    if similarity is not None:
        for row, score in zip(rows, similarity.scores([r["answer"] for r in rows], [r["reference"] for r in rows])):
            row["similarity"] = score
    return summarize_rank(rank, rows, metrics, cfg)


def part_switch(loaded, n: int) -> dict:
    ranks = [0, 1, 2, 4, 8, 16, 3, 12]
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        set_rank(loaded.model, ranks[i % len(ranks)])
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return {"switches": n, "ms": common.describe(times), "p95_ms": times[int(0.95 * (len(times) - 1))],
            "layers": sum(1 for _ in loaded.model.modules() if type(_).__name__ == "DynamicRankLoRALinear")}


def part_sweep(loaded, run: Path, ranks: list[int], n_prompts: int, rounds: int, max_new_tokens: int) -> dict:
    from core.data import load_eval_set
    from core.evaluation.metrics import SemanticSimilarity

    base_cfg = dict(run=str(run), prompts=str(common.EVAL_FILE), ranks=ranks, max_prompts=n_prompts, latency=False,
                    max_new_tokens=max_new_tokens)
    cfg = SweepConfig(out=str(common.TMP / "unused"), **base_cfg)
    metrics = list(cfg.metrics)
    ok, _ = SemanticSimilarity.availability()
    similarity = SemanticSimilarity() if ok else None
    if not ok:
        metrics.remove("similarity")
    items = load_eval_set(common.EVAL_FILE).items[:n_prompts]
    common.log("warm-up (metric modules, embedding model, kernels)")
    single_rank_eval(loaded, items[:2], 1, cfg, metrics, similarity)
    singles, sweeps = [], []
    for r in range(rounds):
        order = ["single", "sweep"] if r % 2 == 0 else ["sweep", "single"]
        for kind in order:
            if kind == "single":
                per_rank = {}
                for b in ranks:
                    with common.Timer() as t:
                        single_rank_eval(loaded, items, b, cfg, metrics, similarity)
                    per_rank[b] = t.s
                singles.append({"per_rank_s": per_rank, "sum_s": sum(per_rank.values()), "loadavg": common.loadavg()})
                common.log(f"round {r + 1}: single-rank evaluations sum {singles[-1]['sum_s']:.1f}s {per_rank}")
            else:
                out = common.TMP / f"sweep_cost_sweep_{r}"
                shutil.rmtree(out, ignore_errors=True)
                sweep = Sweep(SweepConfig(out=str(out), **base_cfg), resume=False)
                t0 = time.perf_counter()
                sweep.validate()
                t1 = time.perf_counter()
                sweep.setup()
                t2 = time.perf_counter()
                result = sweep.run()
                t3 = time.perf_counter()
                sweep.cleanup()
                assert result.status == "completed", result
                per_rank = {b: sweep.results[b]["summary"]["eval_s"] for b in ranks}
                sweeps.append({"validate_s": t1 - t0, "setup_s": t2 - t1, "run_s": t3 - t2, "total_s": t3 - t0,
                               "per_rank_eval_s": per_rank, "loadavg": common.loadavg()})
                common.log(f"round {r + 1}: sweep total {t3 - t0:.1f}s (setup {t2 - t1:.1f}s, rank loop {t3 - t2:.1f}s)")
                del sweep
                gc.collect()
                shutil.rmtree(out, ignore_errors=True)
    ratio_total = [s["total_s"] / b["sum_s"] for s, b in zip(sweeps, singles)]
    ratio_loop = [s["run_s"] / b["sum_s"] for s, b in zip(sweeps, singles)]
    return {"ranks": ranks, "prompts": n_prompts, "metrics": metrics, "max_new_tokens": cfg.max_new_tokens,
            "rounds": rounds, "single": singles, "sweep": sweeps,
            "sum_single_s": common.describe([b["sum_s"] for b in singles]),
            "sweep_total_s": common.describe([s["total_s"] for s in sweeps]),
            "sweep_loop_s": common.describe([s["run_s"] for s in sweeps]),
            "sweep_setup_s": common.describe([s["setup_s"] for s in sweeps]),
            "ratio_total": common.describe(ratio_total), "ratio_loop": common.describe(ratio_loop)}


def part_latency(loaded, ranks: list[int], rounds: int, n_prompts: int, new_tokens: int, repeats: int) -> dict:
    from core.data import load_eval_set

    prompts = [it.prompt for it in load_eval_set(common.EVAL_FILE).items[:n_prompts]]
    merged = MergedModel(loaded)
    tok = loaded.tokenizer
    rows = {b: {"unmerged": [], "merged": [], "base": [], "ratio_merged_base": [], "ratio_unmerged_merged": []} for b in ranks}
    for r in range(rounds):
        for b in ranks:
            set_rank(loaded.model, b)
            un = measure_latency(loaded.model, tok, prompts, new_tokens, repeats)
            merged.set_rank(b)
            me = measure_latency(merged.model, tok, prompts, new_tokens, repeats)
            merged.set_rank(0)
            ba = measure_latency(merged.model, tok, prompts, new_tokens, repeats)
            rows[b]["unmerged"].append(un)
            rows[b]["merged"].append(me)
            rows[b]["base"].append(ba)
            rows[b]["ratio_merged_base"].append(me["ms_per_token"] / ba["ms_per_token"])
            rows[b]["ratio_unmerged_merged"].append(un["ms_per_token"] / me["ms_per_token"])
            common.log(f"latency round {r + 1} rank {b}: unmerged {un['ms_per_token']:.1f} ms/token, merged "
                       f"{me['ms_per_token']:.1f}, base {ba['ms_per_token']:.1f}")
    summary = {}
    for b, row in rows.items():
        summary[b] = {
            "unmerged_ms_per_token": common.med(x["ms_per_token"] for x in row["unmerged"]),
            "merged_ms_per_token": common.med(x["ms_per_token"] for x in row["merged"]),
            "base_ms_per_token": common.med(x["ms_per_token"] for x in row["base"]),
            "unmerged_ttft_ms": common.med(x["ttft_ms"] for x in row["unmerged"]),
            "merged_ttft_ms": common.med(x["ttft_ms"] for x in row["merged"]),
            "base_ttft_ms": common.med(x["ttft_ms"] for x in row["base"]),
            "ratio_merged_base": common.describe(row["ratio_merged_base"]),
            "ratio_unmerged_merged": common.describe(row["ratio_unmerged_merged"]),
        }
    del merged
    gc.collect()
    return {"ranks": ranks, "rounds": rounds, "prompts": n_prompts, "new_tokens": new_tokens, "repeats": repeats,
            "note": "rank 0 unmerged = the run's NF4 base with adapters off; base = plain float copy of W0 (MergedModel at rank 0)",
            "per_rank": summary, "raw": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 2-step run, 2 prompts, 1 round each")
    p.add_argument("--run", help="existing run folder (r_max >= 16) instead of training one")
    p.add_argument("--ranks", default="0,1,4,16")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--latency-rounds", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy answer length in the sweep part (SweepConfig.max_new_tokens)")
    p.add_argument("--latency-prompts", type=int, default=1)
    p.add_argument("--latency-tokens", type=int, default=8)
    p.add_argument("--skip-search", action="store_true", help="leave out part (d)")
    p.add_argument("--search-only", action="store_true", help="only part (d) (the search), e.g. at another --train-steps")
    p.add_argument("--train-steps", type=int, default=40, help="steps of the run this script trains (40: the demo budget; "
                                                                 "200: the CLI's default)")
    p.add_argument("--tag", default="", help="write results/sweep_cost_<tag>.json beside the main result")
    p.add_argument("--search-ranks", default="1,2,4,8,16")
    p.add_argument("--search-prompts", type=int, default=40)
    p.add_argument("--search-tokens", type=int, default=64)
    args = p.parse_args()
    info = common.machine_info()
    print(info)
    ranks = [int(x) for x in args.ranks.split(",")]
    n_prompts, rounds, lat_rounds, switches = args.prompts, args.rounds, args.latency_rounds, 2000
    search_ranks = [int(x) for x in args.search_ranks.split(",")]
    if args.quick:
        n_prompts, rounds, lat_rounds, switches = 2, 1, 1, 200
        args.max_new_tokens, args.latency_tokens = 8, 4
        search_ranks, args.search_prompts, args.search_tokens = [1, 4], 2, 8
    run = ensure_run(args.run, args.quick, args.train_steps)
    switch = sweep = latency = load_run_s = None
    targets = {}
    if not args.search_only:
        with common.Timer() as t_load:
            loaded = load_run(run)
        common.log(f"loaded {run} in {t_load.s:.1f}s")
        load_run_s = t_load.s
        switch = part_switch(loaded, switches)
        print(f"(a) set_rank: median {switch['ms']['median']:.3f} ms, p95 {switch['p95_ms']:.3f} ms over {switches} switches "
              f"({switch['layers']} layers) (target < {TARGET_SWITCH_MS} ms)")
        sweep = part_sweep(loaded, run, ranks, n_prompts, rounds, args.max_new_tokens)
        print(f"(b) sweep of ranks {ranks} on {n_prompts} prompts: end to end {sweep['sweep_total_s']['median']:.1f}s "
              f"(rank loop {sweep['sweep_loop_s']['median']:.1f}s) vs sum of single-rank evaluations {sweep['sum_single_s']['median']:.1f}s: "
              f"ratio end to end {sweep['ratio_total']['median']:.3f}, rank loop {sweep['ratio_loop']['median']:.3f} (target <= {TARGET_SWEEP_RATIO})")
        latency = part_latency(loaded, ranks, lat_rounds, args.latency_prompts, args.latency_tokens, 3)
        for b, row in latency["per_rank"].items():
            print(f"(c) rank {b:>2}: ms/token unmerged {row['unmerged_ms_per_token']:.1f}, merged {row['merged_ms_per_token']:.1f}, "
                  f"base {row['base_ms_per_token']:.1f}; merged/base {row['ratio_merged_base']['median']:.3f}, "
                  f"unmerged/merged {row['ratio_unmerged_merged']['median']:.3f}")
        del loaded
        gc.collect()
        worst_merged = max(abs(row["ratio_merged_base"]["median"] - 1) for b, row in latency["per_rank"].items() if b > 0)
        targets = {
            f"set_rank_median_ms_lt_{TARGET_SWITCH_MS}": {"value": switch["ms"]["median"], "met": switch["ms"]["median"] < TARGET_SWITCH_MS},
            f"sweep_end_to_end_ratio_le_{TARGET_SWEEP_RATIO}": {"value": sweep["ratio_total"]["median"], "met": sweep["ratio_total"]["median"] <= TARGET_SWEEP_RATIO},
            f"sweep_rank_loop_ratio_le_{TARGET_SWEEP_RATIO}": {"value": sweep["ratio_loop"]["median"], "met": sweep["ratio_loop"]["median"] <= TARGET_SWEEP_RATIO},
            "merged_within_5pct_of_base_all_ranks": {"value": worst_merged, "met": worst_merged <= TARGET_MERGED},
        }
    search = None
    if not args.skip_search:
        search = part_search(run, search_ranks, args.search_prompts, args.search_tokens, args.quick)
        print(f"(d) {len(search_ranks)}-rank sweep of {args.search_prompts} prompts x {args.search_tokens} tokens: "
              f"{search['sweep_total_s']:.0f}s end to end (target < {TARGET_SWEEP_S:.0f}s; quality on the {search['quality_path']} "
              f"copy); training {search['train_s'] or float('nan'):.0f}s; search ratio "
              f"{search.get('search_ratio_with_latency', float('nan')):.2f} with latency, "
              f"{search.get('search_ratio_quality_only', float('nan')):.2f} quality only (target >= {TARGET_SEARCH})")
        targets[f"five_rank_sweep_under_{TARGET_SWEEP_S:.0f}s"] = {"value": search["sweep_total_s"],
                                                                   "met": search["sweep_total_s"] < TARGET_SWEEP_S}
        for name in ("with_latency", "quality_only"):
            value = search.get(f"search_ratio_{name}")
            if value is not None:
                targets[f"search_ratio_{name}_ge_{TARGET_SEARCH}"] = {"value": value, "met": value >= TARGET_SEARCH}
    common.write_result(common.result_name("sweep_cost", args.quick, args.tag), {
        "config": vars(args) | {"run": str(run)}, "load_run_s": load_run_s, "switch": switch, "sweep": sweep,
        "latency": latency, "search": search, "targets": targets}, info)

if __name__ == "__main__":
    main()
