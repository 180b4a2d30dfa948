"""A one-run recipe whose step costs more than a QLoRA step, compared at equal training cost (issue 9).

The sandwich rule (`extra_ranks max`) costs ~1.9x a step (bench/README.md §6.3), so within the
cost target it gets about half the steps. This compares its held-out NLL, trained for `--steps`,
with the default recipe and the best dedicated run of each rank trained for `--against-steps`
(both from `rank_search_variants.py` seed studies with one seed and lr schedule), paired over the
same held-out prompts:

    .venv/bin/python bench/rank_search_equal_cost.py --recipe rowinv_pow2_sandwich --steps 100 --against-steps 200

Writes results/rank_search_equal_cost_<recipe>_<steps>.json and prints one line per set and rank.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import rank_search_seeds as seeds  # noqa: E402
import rank_search_variants as grid  # noqa: E402


def cells(steps: int, seed: int, schedule: str) -> dict:
    return seeds.held_out_cells(grid.load_jobs(steps, False, seed, schedule), grid.held_out_start(False), schedule)


def nll(cell: tuple) -> float:
    return float(seeds.seed_nll(*cell))


def paired(ours: tuple, theirs: tuple, rng: np.random.Generator) -> dict:
    return seeds.pooled_gap(tuple(x[None] for x in ours), tuple(x[None] for x in theirs), rng, 2000)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="rowinv_pow2_sandwich", help="the costlier one-run recipe (a rank_search_variants recipe)")
    p.add_argument("--default", default="rowinv_pow2", help="the default recipe it is weighed against")
    p.add_argument("--steps", type=int, default=100, help="the costlier recipe's steps")
    p.add_argument("--against-steps", type=int, default=200, help="steps of the default and dedicated runs of equal cost")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--schedule", default="linear", choices=grid.LR_SCHEDULES)
    args = p.parse_args(argv)
    ours_label = seeds.with_schedule(args.recipe, args.schedule)
    default_label = seeds.with_schedule(args.default, args.schedule)
    short, long = cells(args.steps, args.seed, args.schedule), cells(args.against_steps, args.seed, args.schedule)
    rng = np.random.default_rng(0)
    out: dict = {}
    for set_name in grid.SETS:
        for r in grid.RANKS:
            if (ours_label, r) not in short or (default_label, r) not in long:
                continue
            ours = short[(ours_label, r)][set_name]
            row = {"ours": nll(ours), "default": nll(long[(default_label, r)][set_name]),
                   "vs_default": paired(ours, long[(default_label, r)][set_name], rng)}
            peer = seeds.best_dedicated(long, r, set_name)
            if peer:
                row |= {"peer": peer, "peer_nll": nll(long[(peer, r)][set_name]), "vs_peer": paired(ours, long[(peer, r)][set_name], rng)}
            out.setdefault(set_name, {})[r] = row
            print(f"{set_name} rank {r}: {row['ours']:.3f} against the default's {row['default']:.3f} "
                  f"({100 * row['vs_default']['gap']:+.1f} % [{100 * row['vs_default']['lo']:+.1f}, {100 * row['vs_default']['hi']:+.1f}])"
                  + (f", against {peer} {row['peer_nll']:.3f} ({100 * row['vs_peer']['gap']:+.1f} % "
                     f"[{100 * row['vs_peer']['lo']:+.1f}, {100 * row['vs_peer']['hi']:+.1f}])" if peer else ""))
    common.write_result(f"rank_search_equal_cost_{args.recipe}_{args.steps}", {
        "recipe": ours_label, "default": default_label, "steps": args.steps, "against_steps": args.against_steps,
        "seed": args.seed, "schedule": args.schedule, "gaps": out}, common.machine_info())


if __name__ == "__main__":
    main()
