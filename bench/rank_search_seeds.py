"""How much of a one-run recipe's gap to dedicated QLoRA runs is training noise: the same
comparison repeated over training seeds (issue 9).

`rank_search_variants.py` picks every side's learning rate on the search subsets with one
seed (42). A gap of a few per cent measured with one training run per side can be the seed's
luck (data order, initialisation, dropout, sampled ranks), which a bootstrap over prompts
does not see. Here each side is trained again at its chosen lr with several seeds
(`rank_search_variants.py queue/train --seed S`, measured on the whole sets) and the gaps
are computed on the held-out rest of each set:

- per seed: the recipe's NLL against the peer's, both trained with that seed (same data order);
- pooled: the seed-mean NLL of the recipe over the seed-mean NLL of the best dedicated side
  at that rank (plain or rsLoRA, whichever has the lower seed mean), with a 95 % interval from
  a two-level bootstrap (seeds with replacement, then held-out prompts with replacement,
  the same prompts for both sides) and one over prompts only (seeds fixed) to tell the two
  sources of noise apart.

    .venv/bin/python bench/rank_search_seeds.py [--seeds 42,1,2] [--steps 40] [--recipes rowinv,rowinv_pow2] [--schedules constant,linear] [--tag T]

A recipe trained at another lr than RECIPE_LR in the same seed folders (an lr check) is named
`recipe@lr`, e.g. `--recipes rowinv_pow2,rowinv_pow2@0.005`.

Writes results/rank_search_seeds.json and prints the Markdown tables.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import rank_search_variants as grid  # noqa: E402

N_RESAMPLES = 4000
RECIPE_LR = 3e-3     # the one lr of every one-run recipe in the seed study (a seed folder may hold others: an lr check)


def studied(res: dict) -> bool:
    """A finished job of the seed study, at any lr: side_label tells the lrs of one side apart."""
    return not res.get("diverged") and "evals" in res


def side_label(job: dict, dedicated_lrs: int = 1) -> str:
    """A job's side; `side@lr` for a recipe at another lr than RECIPE_LR (an lr check, e.g. rowinv_pow2@0.005)
    and for a dedicated run whose side and rank were trained at `dedicated_lrs` > 1 learning rates."""
    side = job["side"]
    plain = dedicated_lrs == 1 if side in grid.DEDICATED else math.isclose(job["lr"], RECIPE_LR)
    return side if plain else f"{side}@{job['lr']:g}"


def with_schedule(label: str, schedule: str) -> str:
    """A side trained with a non-constant lr schedule is labelled `side~schedule` (e.g. qlora~linear)."""
    return label if schedule == "constant" else f"{label}~{schedule}"


def base_side(label: str) -> str:
    return label.split("~")[0].split("@")[0]


def side_lrs(jobs: list[dict]) -> dict:
    """{(side, rank): {lrs}} of the studied jobs."""
    lrs: dict = {}
    for res in jobs:
        if studied(res):
            lrs.setdefault((res["job"]["side"], res["job"]["rank"]), set()).add(res["job"]["lr"])
    return lrs


def job_labels(jobs: list[dict], schedule: str = "constant", lrs: dict | None = None) -> dict[str, str]:
    """{job id: side label} of the studied jobs of one seed folder, trained with lr `schedule`.

    lrs: {(side, rank): {lrs}} to label by (default: this folder's own). A study over several seeds passes the
    union over its seeds, so that a dedicated run keeps one label (side@lr) in a seed that trained fewer lrs."""
    lrs = side_lrs(jobs) if lrs is None else lrs
    return {res["job"]["id"]: with_schedule(side_label(res["job"], len(lrs[(res["job"]["side"], res["job"]["rank"])])), schedule)
            for res in jobs if studied(res)}


def load_study(seeds: list[int], steps: int, quick: bool, schedules: tuple[str, ...]) -> dict:
    """{(seed, schedule): that seed folder's jobs} of a study."""
    return {(s, sched): grid.load_jobs(steps, quick, s, sched) for s in seeds for sched in schedules}


def study_lrs(jobs: dict) -> dict:
    """{schedule: {(side, rank): {lrs}}} over every seed of a study ({(seed, schedule): jobs}): what job_labels labels
    by, so that a side keeps one label in all the study's seeds, the analysis and the answers alike."""
    return {sched: side_lrs([res for (_, sc), folder in jobs.items() if sc == sched for res in folder])
            for sched in {sc for _, sc in jobs}}


def held_out_cells(jobs: list[dict], first: int, schedule: str = "constant", lrs: dict | None = None) -> dict:
    """{(side, rank): {set: (sums, counts)}} over the held-out prompts (index >= first) of each job (lrs: job_labels')."""
    cells: dict = {}
    labels = job_labels(jobs, schedule, lrs)
    for res in jobs:
        if res["job"]["id"] not in labels:
            continue
        side = labels[res["job"]["id"]]
        for set_name, by_rank in res["evals"].items():
            for r, v in by_rank.items():
                cell = cells.setdefault((side, int(r)), {})
                cell[set_name] = (np.asarray(v["sums"][first:], float), np.asarray(v["counts"][first:], float))
                if side == with_schedule("qlora", schedule) and int(r) == 1:     # alpha/sqrt(1) = alpha/1: rsLoRA's rank 1 is the same run
                    cells.setdefault((with_schedule("rslora", schedule), 1), {})[set_name] = cell[set_name]
    return cells


def seed_nll(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per-token NLL of each seed (rows) from per-prompt sums and counts; works on resampled index arrays too."""
    return sums.sum(axis=-1) / counts.sum(axis=-1)


def pooled_gap(ours: tuple, theirs: tuple, rng: np.random.Generator, n: int = N_RESAMPLES) -> dict:
    """Seed-mean NLL ratio − 1 with two-level and prompt-only 95 % intervals.

    ours / theirs: (sums, counts), each an array of shape (seeds, prompts), seed k of both
    trained with the same seed (so the pairing keeps their shared data order).
    """
    (su, cu), (st, ct) = ours, theirs
    point = seed_nll(su, cu).mean() / seed_nll(st, ct).mean() - 1
    k, p = su.shape
    both, prompts_only = np.empty(n), np.empty(n)
    for i in range(n):
        idx = rng.integers(0, p, p)
        prompts_only[i] = seed_nll(su[:, idx], cu[:, idx]).mean() / seed_nll(st[:, idx], ct[:, idx]).mean() - 1
        seeds = rng.integers(0, k, k)
        s_idx = np.ix_(seeds, idx)
        both[i] = seed_nll(su[s_idx], cu[s_idx]).mean() / seed_nll(st[s_idx], ct[s_idx]).mean() - 1
    per_seed = seed_nll(su, cu) / seed_nll(st, ct) - 1
    return {"gap": float(point), "lo": float(np.quantile(both, 0.025)), "hi": float(np.quantile(both, 0.975)),
            "prompts_only_lo": float(np.quantile(prompts_only, 0.025)), "prompts_only_hi": float(np.quantile(prompts_only, 0.975)),
            "per_seed": [float(x) for x in per_seed]}


def best_dedicated(cells: dict, rank: int, set_name: str) -> str | None:
    """The dedicated side with the lowest (seed-mean) held-out NLL at `rank` among `cells` {(side, rank): {set: (sums,
    counts)}}, sums/counts per prompt or per seed and prompt. A dedicated side trained at several lrs (side@lr) or
    schedules (side~schedule) offers each: a choice that can only favour the peer."""
    cands = [(seed_nll(*by_set[set_name]).mean(), side) for (side, r), by_set in cells.items()
             if r == rank and base_side(side) in grid.DEDICATED]
    return min(cands)[1] if cands else None


def analyse(seeds: list[int], steps: int, recipes: list[str], quick: bool = False, rng_seed: int = 0,
            schedules: tuple[str, ...] = ("constant",)) -> dict:
    """Pooled gaps of `recipes` to the best dedicated side at each rank; with several lr `schedules`, the sides of
    every schedule compete (labels side~schedule) and the peer is the best over all of them."""
    rng = np.random.default_rng(rng_seed)
    jobs = load_study(seeds, steps, quick, schedules)
    lrs = study_lrs(jobs)
    per_seed = {s: {k: v for sched in schedules
                    for k, v in held_out_cells(jobs[(s, sched)], grid.held_out_start(quick), sched, lrs[sched]).items()}
                for s in seeds}
    common_keys = set.intersection(*(set(c) for c in per_seed.values()))
    stack = {key: {set_name: tuple(np.stack([per_seed[s][key][set_name][j] for s in seeds]) for j in (0, 1))
                   for set_name in grid.SETS}
             for key in common_keys}
    nll = {f"{side}|{r}": {set_name: [float(x) for x in seed_nll(*v)] for set_name, v in by_set.items()}
           for (side, r), by_set in sorted(stack.items())}
    out = {"seeds": seeds, "steps": steps, "nll_per_seed": nll, "sets": {}}
    for set_name in grid.SETS:
        peers, gaps, between = {}, {}, {}
        for r in grid.RANKS:
            peer = best_dedicated(stack, r, set_name)
            if peer:
                peers[r] = peer
        for recipe in recipes:
            gaps[recipe] = {r: pooled_gap(stack[(recipe, r)][set_name], stack[(peers[r], r)][set_name], rng)
                            for r in grid.RANKS if r in peers and (recipe, r) in stack}
        # Ranks between the powers of two have no dedicated run here: recipe against the first recipe.
        ref = recipes[0]
        for recipe in recipes[1:]:
            between[recipe] = {r: pooled_gap(stack[(recipe, r)][set_name], stack[(ref, r)][set_name], rng)
                               for r in sorted(grid.RANKS + grid.BETWEEN_RANKS) if (recipe, r) in stack and (ref, r) in stack}
        out["sets"][set_name] = {"peer": peers, "gaps": gaps, f"against_{ref}": between,
                                 "prompts": int(next(iter(stack.values()))[set_name][0].shape[1])}
    return out


def answers_phase(seed: int, steps: int, recipes: list[str], schedule: str = "constant", lrs: dict | None = None) -> dict:
    """Greedy answers of every side at every rank of RANKS to the first GEN_PROMPTS held-out prompts of each set
    (one seed: answers are slow on this CPU), cached in that seed's (and schedule's) folder; {"side|rank": {set: [ROUGE-L]}}."""
    from safetensors.torch import load_file

    from core.evaluation.metrics import rouge_l_scores
    from core.qdylora import set_rank
    from core.runs import generate

    folder = grid.root(steps, False, seed, schedule)
    cache_path = folder / "answers.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    all_jobs = grid.load_jobs(steps, False, seed, schedule)
    labels = job_labels(all_jobs, schedule, lrs)
    jobs = {j["job"]["id"]: j for j in all_jobs if j["job"]["id"] in labels}
    items = {name: its[:grid.GEN_PROMPTS] for name, its in grid.held_out_items(False).items()}
    bench = grid.AdapterBench(steps, False)
    for job_id, res in sorted(jobs.items()):
        side = labels[job_id]
        if side not in recipes and base_side(side) not in grid.DEDICATED:
            continue
        ranks = grid.RANKS if side in recipes else [res["job"]["rank"]]
        todo = [r for r in ranks if f"{side}|{r}" not in cache]
        if not todo:
            continue
        bench.load(load_file(str(folder / "adapters" / f"{job_id}.safetensors")), res["scale_rule"])
        bench.model.eval()
        for r in todo:
            set_rank(bench.model, r)
            entry = {}
            for name, its in items.items():
                answers = generate(bench.model, bench.tokenizer, [it.prompt for it in its],
                                   max_new_tokens=grid.MAX_NEW_TOKENS, batch_size=8)
                entry[name] = rouge_l_scores(answers, [it.reference for it in its])
            cache[f"{side}|{r}"] = entry
            if side == with_schedule("qlora", schedule) and r == 1:
                cache[f"{with_schedule('rslora', schedule)}|1"] = entry     # the same run (rank_search_variants.job_id)
            cache_path.write_text(json.dumps(cache))
            common.log(f"answers seed {seed} {side} rank {r}: " + ", ".join(f"{k} ROUGE-L {np.mean(v):.3f}" for k, v in entry.items()))
    return cache


def rouge_gaps(caches: dict, peers: dict, recipes: list[str], rng: np.random.Generator, n: int = 2000) -> dict:
    """{set: {recipe: {rank: ROUGE-L difference to that rank's peer, 95 % CI}}}.

    caches: {seed: answers cache}. With one seed the interval resamples prompts (paired); with
    several, seeds then prompts, like the NLL's (the same prompts and seeds for both sides).
    """
    seeds = list(caches)
    out: dict = {}
    for set_name, by_rank in peers.items():
        for recipe in recipes:
            for r, peer in by_rank.items():
                pairs = [(c.get(f"{recipe}|{r}"), c.get(f"{peer}|{r}")) for c in caches.values()]
                if not all(ours and theirs for ours, theirs in pairs):
                    continue
                ours = np.array([o[set_name] for o, _ in pairs], float)      # (seeds, prompts)
                theirs = np.array([t[set_name] for _, t in pairs], float)
                diff = ours - theirs
                k, m = diff.shape
                draws = np.empty(n)
                for i in range(n):
                    draws[i] = diff[np.ix_(rng.integers(0, k, k), rng.integers(0, m, m))].mean()
                out.setdefault(set_name, {}).setdefault(recipe, {})[r] = {
                    "mean": float(diff.mean()), "lo": float(np.quantile(draws, 0.025)), "hi": float(np.quantile(draws, 0.975)),
                    "ours": float(ours.mean()), "peer": float(theirs.mean()), "per_seed": [float(x) for x in diff.mean(axis=1)],
                    "seeds": seeds}
    return out


def _pct(g: dict) -> str:
    return f"{100 * g['gap']:+.1f} % [{100 * g['lo']:+.1f}, {100 * g['hi']:+.1f}]"


def report(res: dict) -> str:
    lines = []
    for set_name, s in res["sets"].items():
        lines.append(f"\n**{set_name}** ({s['prompts']} held-out prompts, seeds {', '.join(map(str, res['seeds']))}): "
                     "seed-mean NLL gap to the best dedicated run [95 % CI over seeds and prompts] (per seed)\n")
        recipes = list(s["gaps"])
        lines.append("| rank | best dedicated | its NLL per seed | " + " | ".join(recipes) + " |")
        lines.append("|---|---|---|" + "---|" * len(recipes))
        for r, peer in s["peer"].items():
            peer_nll = "/".join(f"{x:.3f}" for x in res["nll_per_seed"][f"{peer}|{r}"][set_name])
            cells = [f"{_pct(s['gaps'][rec][r])} ({'/'.join(f'{100 * x:+.1f}' for x in s['gaps'][rec][r]['per_seed'])})"
                     for rec in recipes]
            lines.append(f"| {r} | {peer} | {peer_nll} | " + " | ".join(cells) + " |")
        for key, by_recipe in s.items():
            if not key.startswith("against_"):
                continue
            for rec, by_rank in by_recipe.items():
                lines.append(f"\n{rec} against {key[len('against_'):]} at every measured rank: " +
                             ", ".join(f"{r}: {_pct(g)}" for r, g in by_rank.items()))
    if "rouge_l" in res:
        rl = res["rouge_l"]
        lines.append(f"\nROUGE-L of {rl['prompts_per_set']} greedy answers per set (seeds {', '.join(map(str, rl['seeds']))}), "
                     "difference to the same peer [95 % CI]:\n")
        for set_name, by_recipe in rl["gaps"].items():
            for recipe, by_rank in by_recipe.items():
                lines.append(f"- {set_name}, {recipe}: " + ", ".join(
                    f"{r}: {g['ours']:.3f} ({g['mean']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}])" for r, g in by_rank.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="42,1,2")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--recipes", default="rowinv,rowinv_pow2", help="one-run recipes to compare (the first is the reference for in-between ranks)")
    p.add_argument("--quick", action="store_true", help="read the --quick seed studies (2 steps)")
    p.add_argument("--answers-seeds", "--answers-seed", default=None,
                   help="also generate answers with these seeds' runs, e.g. 42 or 42,1,2 (ROUGE-L against the pooled peer at each rank)")
    p.add_argument("--answers-only", action="store_true", help="generate the answers (cached) and stop")
    p.add_argument("--schedules", default="constant",
                   help="lr schedules whose seed studies to combine (rank_search_variants.py --schedule), e.g. constant,linear: "
                        "a side trained with another than constant is named side~schedule, and each rank's peer is the best over all")
    p.add_argument("--tag", default="", help="write results/rank_search_seeds_<tag>.json (another round beside the main result)")
    args = p.parse_args(argv)
    recipes = [r for r in args.recipes.split(",") if r]
    answer_seeds = [int(x) for x in args.answers_seeds.split(",")] if args.answers_seeds else []
    schedules = tuple(x for x in args.schedules.split(",") if x)
    seeds = [int(s) for s in args.seeds.split(",")]
    # Answers are labelled as the analysis labels its sides: by the lrs of every seed of the study (full runs, as answers_phase reads).
    lrs = study_lrs(load_study(sorted(set(seeds) | set(answer_seeds)), args.steps, False, schedules)) if answer_seeds else {}
    if args.answers_only:
        for seed in answer_seeds:
            for sched in schedules:
                answers_phase(seed, args.steps, recipes, sched, lrs[sched])
        return
    res = analyse(seeds, 2 if args.quick else args.steps, recipes, args.quick, schedules=schedules)
    res["lr_schedules"] = list(schedules)
    if answer_seeds:
        caches = {seed: {k: v for sched in schedules for k, v in answers_phase(seed, args.steps, recipes, sched, lrs[sched]).items()}
                  for seed in answer_seeds}
        res["rouge_l"] = {"seeds": answer_seeds, "prompts_per_set": grid.GEN_PROMPTS,
                          "gaps": rouge_gaps(caches, {s: v["peer"] for s, v in res["sets"].items()}, recipes, np.random.default_rng(0))}
    name = common.result_name("rank_search_seeds" + ("" if args.quick or args.steps == 40 else f"_{args.steps}"), args.quick, args.tag)
    common.write_result(name, res, common.machine_info())
    print(report(res))


if __name__ == "__main__":
    main()
