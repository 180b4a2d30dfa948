"""What fixing glibc's mmap threshold costs a training step (core.lowmem.map_large_blocks).

One process, the default model (NF4, r_max 16, batch 4 x 256, the library's trainer as it
is), rounds that alternate two heap policies in rotating order: `adaptive` (threshold fixed
at 32 MiB, where glibc's adaptive threshold settles once large blocks have been freed) and
`mapped` (1 MiB, what training uses: every dequantized weight gets its own mapping). Each
round times `--steps` optimizer steps per policy; the result is the per-round ratio
mapped / adaptive (median, bootstrap 95 % interval). Memory is measured by memory.py
(`--child-env MALLOC_MMAP_THRESHOLD_=...`), since a peak cannot be split within one process.

    .venv/bin/python bench/heap_policy.py [--quick] [--rounds N] [--steps K]
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from core.lowmem import map_large_blocks  # noqa: E402
from core.train import TrainConfig, Trainer  # noqa: E402

POLICIES = {"adaptive": 32 << 20, "mapped": 1 << 20}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny random Llama, 2 rounds of 1 step")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 2, 1
    info = common.machine_info()
    print(info)
    out = common.TMP / ("heap_policy_quick" if args.quick else "heap_policy")
    shutil.rmtree(out, ignore_errors=True)
    model = str(common.quick_llama_folder("heap_policy_tiny_model")) if args.quick else "default"
    cfg = TrainConfig(data=str(common.TRAIN_FILE), out=str(out), model=model, quant="nf4", r_max=16, batch_size=4,
                      max_length=64 if args.quick else 256, steps=10_000, seed=42)
    trainer = Trainer(cfg)
    trainer.setup()
    try:
        def step():
            trainer.train_step(trainer.sampler.sample_step(trainer.qcfg.ranks_per_step))

        step()  # warm-up
        names = list(POLICIES)
        times = {k: [] for k in names}
        ratios = []
        for i in range(args.rounds):
            row = {}
            for name in names[i % 2:] + names[:i % 2]:
                map_large_blocks(POLICIES[name])
                with common.Timer() as t:
                    for _ in range(args.steps):
                        step()
                row[name] = t.s / args.steps
                times[name].append(row[name])
            ratios.append(row["mapped"] / row["adaptive"])
            common.log(f"round {i + 1}/{args.rounds}: " + "  ".join(f"{k} {v:.2f}s/step" for k, v in row.items()))
    finally:
        trainer.cleanup()
        shutil.rmtree(out, ignore_errors=True)
    result = {"step_s": {k: common.describe(v) for k, v in times.items()},
              "ratio_mapped_to_adaptive": common.describe(ratios) | {"median_ci95": common.median_ci(ratios)}}
    r = result["ratio_mapped_to_adaptive"]
    print(f"mapped / adaptive step time: median {r['median']:.3f} [{r['median_ci95'][0]:.3f}, {r['median_ci95'][1]:.3f}]")
    common.write_result(common.result_name("heap_policy", args.quick),
                        {"config": vars(args) | {"policies": POLICIES}, "results": result, "raw_ratios": ratios}, info)


if __name__ == "__main__":
    main()
