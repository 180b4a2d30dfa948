"""The paper's comparison at small scale: one QDyLoRA run vs one QLoRA run per rank.

- QDyLoRA: core.train.Trainer (NF4 default model, r_max 16, uniform rank sampling),
  evaluated afterwards at ranks 1,2,4,8,16 by set_rank on the same in-memory model.
- QLoRA: for each rank r in 1,2,4,8,16 a separate PEFT LoRA run (peft.get_peft_model,
  LoraConfig(r, lora_alpha=16, dropout 0.05, all block linears)) on a freshly loaded NF4
  base, with the same recipe (bench/common.PeftLoRATrainer: same encoded data, batch
  order, seed, AdamW, lr and schedule, grad clipping).

Same data (sample_data/train.jsonl), steps, lr, seed, batch and max length for all.
Each approach is timed end to end: model load + training (+ evaluation at its ranks).
The six trainings run interleaved (QLoRA r=1, r=4, QDyLoRA, r=16, r=2, r=8) so load
changes on the shared machine hit both approaches.

Per rank, on held-out sample_data/eval.jsonl:
- reference NLL per token by teacher forcing (core.evaluation.sweep.measure_nll) on all
  prompts, with a 95 % bootstrap interval (core.evaluation.stats.bootstrap_ratio_ci);
- ROUGE-L of greedy answers (core.runs.generate, max_new_tokens 48) on the first 24
  prompts (kept short for time), with a bootstrap interval (bootstrap_mean_ci);
- the relative NLL gap (QDyLoRA - QLoRA) / QLoRA with a paired bootstrap interval
  (same prompt resamples for both).

    .venv/bin/python bench/rank_search.py [--quick] [--steps 40] [--batch-size 4] [--max-length 192]
"""
from __future__ import annotations

import argparse
import gc
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import numpy as np  # noqa: E402

from core.evaluation.metrics import rouge_l_scores  # noqa: E402
from core.evaluation.stats import bootstrap_mean_ci, bootstrap_ratio_ci  # noqa: E402
from core.evaluation.sweep import measure_nll  # noqa: E402
from core.qdylora import set_rank  # noqa: E402
from core.runs import generate  # noqa: E402
from core.train import TrainConfig, Trainer  # noqa: E402

TARGET_GAP = 0.02
TARGET_COST = 4.0


def reference_nll(model, tokenizer, nll_items, n_boot: int) -> dict:
    """Per-token reference NLL with its bootstrap interval, and the per-prompt sums for paired gaps."""
    pairs = measure_nll(model, tokenizer, nll_items, batch_size=8)
    sums, counts = [s for s, _ in pairs], [c for _, c in pairs]
    nll = bootstrap_ratio_ci(sums, counts, n_resamples=n_boot, seed=0)
    return {"ref_nll": nll.mean, "ref_nll_lo": nll.lo, "ref_nll_hi": nll.hi, "nll_sums": sums, "nll_counts": counts}


def evaluate(model, tokenizer, nll_items, gen_items, max_new_tokens: int, n_boot: int) -> dict:
    model.eval()
    t0 = time.perf_counter()
    nll = reference_nll(model, tokenizer, nll_items, n_boot)
    answers = generate(model, tokenizer, [it.prompt for it in gen_items], max_new_tokens=max_new_tokens, batch_size=8)
    rouge_scores = rouge_l_scores(answers, [it.reference for it in gen_items])
    rouge = bootstrap_mean_ci(rouge_scores, n_resamples=n_boot, seed=0)
    return nll | {"rouge_l": rouge.mean, "rouge_l_lo": rouge.lo, "rouge_l_hi": rouge.hi,
            "answers": answers, "rouge_scores": rouge_scores, "eval_s": time.perf_counter() - t0}


def paired_gap(q: dict, b: dict, n_boot: int, seed: int = 0) -> dict:
    """(NLL_q - NLL_b) / NLL_b with the same prompt resamples for both (percentile 95 %)."""
    qs, qc = np.array(q["nll_sums"]), np.array(q["nll_counts"], dtype=float)
    bs, bc = np.array(b["nll_sums"]), np.array(b["nll_counts"], dtype=float)
    point = (qs.sum() / qc.sum()) / (bs.sum() / bc.sum()) - 1
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(qs), size=(n_boot, len(qs)))
    gaps = (qs[idx].sum(1) / qc[idx].sum(1)) / (bs[idx].sum(1) / bc[idx].sum(1)) - 1
    lo, hi = np.percentile(gaps, [2.5, 97.5])
    return {"gap": float(point), "lo": float(lo), "hi": float(hi)}


def strip(ev: dict) -> dict:
    return {k: v for k, v in ev.items() if k not in ("nll_sums", "nll_counts")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 steps, max length 64, 4 prompts")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--ranks", default="1,2,4,8,16")
    p.add_argument("--nll-prompts", type=int, default=0, help="0 = all evaluation prompts")
    p.add_argument("--gen-prompts", type=int, default=24)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--n-boot", type=int, default=2000)
    args = p.parse_args()
    if args.quick:
        args.steps, args.max_length, args.nll_prompts, args.gen_prompts, args.max_new_tokens = 2, 64, 4, 4, 8
    info = common.machine_info()
    print(info)
    from core.data import load_eval_set

    ranks = [int(x) for x in args.ranks.split(",")]
    r_max = max(ranks)
    items = load_eval_set(common.EVAL_FILE).items
    nll_items = items[: args.nll_prompts] if args.nll_prompts else items
    gen_items = items[: args.gen_prompts]

    def cfg_for(name: str, r: int) -> TrainConfig:
        out = common.TMP / f"rank_search_{name}"
        shutil.rmtree(out, ignore_errors=True)
        return TrainConfig(data=str(common.TRAIN_FILE), out=str(out), quant="nf4", r_max=r, steps=args.steps,
                           batch_size=args.batch_size, max_length=args.max_length, lr=args.lr, seed=args.seed,
                           checkpoint_every=max(10, args.steps))

    order = ["qlora_1", "qlora_4", "qdylora", "qlora_16", "qlora_2", "qlora_8"]
    order = [o for o in order if o == "qdylora" or int(o.split("_")[1]) in ranks]
    order += [f"qlora_{r}" for r in ranks if f"qlora_{r}" not in order]
    qdy, qlora, base_eval = {}, {}, None
    t_all = time.perf_counter()
    for job in order:
        if job == "qdylora":
            cfg = cfg_for("qdylora", r_max)
            step_times = []
            common.log(f"QDyLoRA run: r_max {r_max}, {args.steps} steps")
            t0 = time.perf_counter()
            def on_event(e):
                if e.get("event") == "step":
                    step_times.append(e)
                    if e["step"] % 10 == 0:
                        common.log(f"QDyLoRA: step {e['step']}/{args.steps}, loss {e['loss']:.3f}, rank {e['rank']}")

            trainer = Trainer(cfg, on_event=on_event)
            try:
                trainer.setup()
                t_loaded = time.perf_counter()
                result = trainer.train()
            finally:
                trainer.cleanup()
            train_s = time.perf_counter() - t0
            evals = {}
            t1 = time.perf_counter()
            for b in ranks:
                set_rank(trainer.model, b)
                evals[b] = evaluate(trainer.model, trainer.tokenizer, nll_items, gen_items, args.max_new_tokens, args.n_boot)
                common.log(f"QDyLoRA rank {b}: NLL {evals[b]['ref_nll']:.4f} [{evals[b]['ref_nll_lo']:.4f}, {evals[b]['ref_nll_hi']:.4f}], "
                           f"ROUGE-L {evals[b]['rouge_l']:.3f}")
            eval_s = time.perf_counter() - t1
            set_rank(trainer.model, 0)
            base_eval = evaluate(trainer.model, trainer.tokenizer, nll_items, gen_items, args.max_new_tokens, args.n_boot)
            common.log(f"base (rank 0): NLL {base_eval['ref_nll']:.4f}, ROUGE-L {base_eval['rouge_l']:.3f}")
            qdy = {"train_s": train_s, "load_s": t_loaded - t0, "eval_s": eval_s, "final_loss": result.final_loss,
                   "losses": trainer.losses, "ranks_sampled": [e["rank"] for e in step_times],
                   "median_step_s": common.med([b["time"] - a["time"] for a, b in zip(step_times, step_times[1:])]),
                   "evals": evals, "loadavg": common.loadavg()}
            common.log(f"QDyLoRA: train {train_s:.0f}s (load {t_loaded - t0:.0f}s), eval {eval_s:.0f}s, final loss {result.final_loss:.3f}")
            del trainer
        else:
            r = int(job.split("_")[1])
            cfg = cfg_for(job, r)
            step_s = []
            common.log(f"QLoRA run: r {r}, {args.steps} steps")
            t0 = time.perf_counter()
            peft = common.PeftLoRATrainer(cfg, rank=r)
            t_loaded = time.perf_counter()
            def on_step(s, loss, dt):
                step_s.append(dt)
                if s % 10 == 0:
                    common.log(f"QLoRA r={r}: step {s}/{args.steps}, loss {loss:.3f}, {dt:.1f}s/step")

            losses = peft.train(on_step=on_step)
            train_s = time.perf_counter() - t0
            ev = evaluate(peft.model, peft.tokenizer, nll_items, gen_items, args.max_new_tokens, args.n_boot)
            qlora[r] = {"train_s": train_s, "load_s": t_loaded - t0, "eval_s": ev["eval_s"], "final_loss": losses[-1],
                        "losses": losses, "median_step_s": common.med(step_s), "eval": ev, "loadavg": common.loadavg()}
            common.log(f"QLoRA r={r}: train {train_s:.0f}s, eval {ev['eval_s']:.0f}s, final loss {losses[-1]:.3f}, "
                       f"NLL {ev['ref_nll']:.4f} [{ev['ref_nll_lo']:.4f}, {ev['ref_nll_hi']:.4f}], ROUGE-L {ev['rouge_l']:.3f}")
            del peft
        gc.collect()
        shutil.rmtree(common.TMP / f"rank_search_{job}", ignore_errors=True)
    total_s = time.perf_counter() - t_all

    per_rank = []
    for b in ranks:
        q, l = qdy["evals"][b], qlora[b]["eval"]
        gap = paired_gap(q, l, args.n_boot)
        per_rank.append({"rank": b, "qdylora": strip(q), "qlora": strip(l), "nll_gap": gap,
                         "gap_within_target": gap["gap"] <= TARGET_GAP})
        print(f"rank {b:>2}: NLL QDyLoRA {q['ref_nll']:.4f} [{q['ref_nll_lo']:.4f}, {q['ref_nll_hi']:.4f}] vs QLoRA "
              f"{l['ref_nll']:.4f} [{l['ref_nll_lo']:.4f}, {l['ref_nll_hi']:.4f}]: gap {gap['gap']:+.2%} [{gap['lo']:+.2%}, {gap['hi']:+.2%}]; "
              f"ROUGE-L {q['rouge_l']:.3f} vs {l['rouge_l']:.3f}")
    qlora_train = sum(v["train_s"] for v in qlora.values())
    qlora_total = qlora_train + sum(v["eval_s"] for v in qlora.values())
    qdy_total = qdy["train_s"] + qdy["eval_s"]
    step_ratio = common.med([v["median_step_s"] for v in qlora.values()]) / qdy["median_step_s"]
    cost = {"qdylora_train_s": qdy["train_s"], "qdylora_eval_s": qdy["eval_s"], "qdylora_total_s": qdy_total,
            "qlora_train_s": qlora_train, "qlora_total_s": qlora_total,
            "train_cost_ratio": qlora_train / qdy["train_s"], "total_cost_ratio": qlora_total / qdy_total,
            "median_step_ratio_qlora_over_qdylora": step_ratio, "script_wall_s": total_s}
    print(f"cost: QDyLoRA {qdy['train_s']:.0f}s train + {qdy['eval_s']:.0f}s eval = {qdy_total:.0f}s; QLoRA x{len(ranks)} "
          f"{qlora_train:.0f}s train, {qlora_total:.0f}s with eval; ratio train {cost['train_cost_ratio']:.2f}x, "
          f"total {cost['total_cost_ratio']:.2f}x (target >= {TARGET_COST}x); load {common.loadavg()}")
    worst = max(r["nll_gap"]["gap"] for r in per_rank)
    targets = {
        f"nll_gap_le_{TARGET_GAP}_every_rank": {"value": worst, "met": worst <= TARGET_GAP},
        f"qlora_over_qdylora_train_cost_ge_{TARGET_COST}": {"value": cost["train_cost_ratio"], "met": cost["train_cost_ratio"] >= TARGET_COST},
        f"qlora_over_qdylora_total_cost_ge_{TARGET_COST}": {"value": cost["total_cost_ratio"], "met": cost["total_cost_ratio"] >= TARGET_COST},
    }
    qdy_out = {k: v for k, v in qdy.items() if k != "evals"}
    qlora_out = {r: {k: v for k, v in v.items() if k != "eval"} for r, v in qlora.items()}
    common.write_result(common.result_name("rank_search", args.quick), {
        "config": vars(args) | {"nll_prompts_used": len(nll_items), "gen_prompts_used": len(gen_items), "order": order},
        "base": strip(base_eval), "per_rank": per_rank, "qdylora_run": qdy_out, "qlora_runs": qlora_out,
        "cost": cost, "targets": targets,
        "qlora_nll_per_prompt": {str(r): {"nll_sums": v["eval"]["nll_sums"], "nll_counts": v["eval"]["nll_counts"]} for r, v in qlora.items()},
        "qdylora_nll_per_prompt": {str(b): {"nll_sums": e["nll_sums"], "nll_counts": e["nll_counts"]} for b, e in qdy["evals"].items()}},
        info)
    try:
        import plot

        plot.main(["rank_search_quick" if args.quick else "rank_search"])
    except Exception as exc:  # a chart must never lose the numbers
        print(f"plot failed: {exc}")


if __name__ == "__main__":
    main()
