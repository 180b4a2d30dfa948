"""What one optimizer step of each rank-elastic recipe costs, against a plain PEFT LoRA step at r = r_max.

Same base (default model, NF4 or float32), same fixed batch (the run's first micro-batch), one
core.train.Trainer per recipe (the recipes of bench/rank_search_variants.py, with the ranks each
step would sample) and the PEFT baseline (bench/common.PeftLoRATrainer), each on its own copy of
the base in one process. After warm-up, rounds of every variant in rotating order; the ratio
recipe / PEFT is taken within a round and its median reported with a bootstrap interval.
This is the measurement behind "training cost of the default stays <= 1.1x one QLoRA run"
(issue 9): the grid's own timings ran beside other work and are not used for it.

    .venv/bin/python bench/recipe_cost.py [--quick] [--rounds 12] [--recipes shipped,sqrt_k4,...] [--quant nf4]
"""
from __future__ import annotations

import argparse
import gc
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from core.train import TrainConfig, Trainer  # noqa: E402
from rank_search_variants import RECIPES  # noqa: E402

TARGET = 1.10
# The grid's one-run recipes, plus the svd method (one ordinary LoRA at r_max trained by our Trainer).
COST_RECIPES = RECIPES | {"svd": {"method": "svd", "scale": "alpha/b"}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 warm-up, 2 rounds, two recipes")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--recipes", default="svd,const,shipped,sqrt_k4,sqrt_sandwich,sqrt_sandwich_kd")
    p.add_argument("--quant", default="nf4")
    p.add_argument("--r-max", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--tag", default="", help="write results/recipe_cost_<tag>.json (a later comparison beside the first)")
    args = p.parse_args(argv)
    recipes = [r for r in args.recipes.split(",") if r]
    if args.quick:
        args.rounds, args.warmup, recipes = 2, 1, recipes[:2]
    unknown = [r for r in recipes if r not in COST_RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipes {unknown}; known: {', '.join(COST_RECIPES)}")
    info = common.machine_info()
    print(info)
    shared = dict(data=str(common.TRAIN_FILE), model="default", quant=args.quant, r_max=args.r_max,
                  batch_size=args.batch_size, max_length=args.max_length, steps=10_000, seed=42)
    trainers = {}
    for name in recipes:
        out = common.TMP / f"recipe_cost_{name}"
        shutil.rmtree(out, ignore_errors=True)
        trainer = Trainer(TrainConfig(out=str(out), **shared, **COST_RECIPES[name]))
        trainer.setup()
        trainers[name] = trainer
    first = next(iter(trainers.values()))
    batch = first._micro_batch(0)
    peft = common.PeftLoRATrainer(first.cfg, rank=args.r_max, examples=first.examples)

    def recipe_step(trainer):
        def step():
            trainer.train_step(trainer.sampler.sample_step(trainer.qcfg.ranks_per_step))
        return step

    variants = {name: recipe_step(t) for name, t in trainers.items()} | {"peft": lambda: peft.train_step(batch)}
    for _ in range(args.warmup):
        for fn in variants.values():
            fn()
    names = list(variants)
    times = {k: [] for k in names}
    ratios = {k: [] for k in recipes}
    for i in range(args.rounds):
        order = names[i % len(names):] + names[: i % len(names)]
        row = {}
        for name in order:
            with common.Timer() as t:
                variants[name]()
            row[name] = t.s
            times[name].append(t.s)
        for name in recipes:
            ratios[name].append(row[name] / row["peft"])
        common.log(f"round {i + 1}/{args.rounds}: " + "  ".join(f"{k} {v:.2f}s" for k, v in row.items()))
    results = {name: {"step_s": common.describe(times[name]), "ratio_to_peft": common.describe(ratios[name])
                      | {"median_ci95": common.median_ci(ratios[name])}, "recipe": COST_RECIPES[name]} for name in recipes}
    results["peft"] = {"step_s": common.describe(times["peft"])}
    for name in recipes:
        r = results[name]["ratio_to_peft"]
        print(f"{name}: median step {results[name]['step_s']['median']:.2f}s, ratio to PEFT r={args.r_max} "
              f"{r['median']:.3f} [{r['median_ci95'][0]:.3f}, {r['median_ci95'][1]:.3f}]")
    common.write_result(common.result_name("recipe_cost", args.quick, args.tag), {
        "config": vars(args) | {"recipes": recipes}, "results": results, "raw_s": times,
        "target": {"ratio_le": TARGET}}, info)
    for t in trainers.values():
        t.cleanup()
        shutil.rmtree(t.run_dir, ignore_errors=True)
    del trainers, peft
    gc.collect()


if __name__ == "__main__":
    main()
