"""Where a training step's time goes: torch.profiler over a few steps of the library's trainer.

Default model, NF4 (or --quant none), r_max 16, batch 4 x 256 (roofline.py's setup), one
warm-up step, then `--steps` profiled steps at b = r_max. Writes the operators with the
most self CPU time (share of the profiled total) to results/profile_step[_<quant>].json, so
the next speed work starts from measured shares instead of guesses.

    .venv/bin/python bench/profile_step.py [--quick] [--quant nf4|none] [--steps K] [--top N]
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import torch  # noqa: E402

from core.train import TrainConfig, Trainer  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny random Llama, 1 step")
    p.add_argument("--quant", default="nf4", choices=["nf4", "none"])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    if args.quick:
        args.steps = 1
    info = common.machine_info()
    print(info)
    out = common.TMP / f"profile_step_{args.quant}"
    shutil.rmtree(out, ignore_errors=True)
    model = str(common.quick_llama_folder("profile_tiny_model")) if args.quick else "default"
    trainer = Trainer(TrainConfig(data=str(common.TRAIN_FILE), out=str(out), model=model, quant=args.quant, r_max=16,
                                  batch_size=4, max_length=64 if args.quick else 256, steps=10_000, seed=42))
    trainer.setup()
    try:
        trainer.train_step([trainer.qcfg.r_max])   # warm-up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, common.Timer() as t:
            for _ in range(args.steps):
                trainer.train_step([trainer.qcfg.r_max])
    finally:
        trainer.cleanup()
        shutil.rmtree(out, ignore_errors=True)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(({"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / args.steps, "calls_per_step": e.count / args.steps,
                    "share": e.self_cpu_time_total / total} for e in events), key=lambda r: -r["share"])
    for r in rows[: args.top]:
        print(f"{r['share'] * 100:5.1f} %  {r['self_ms_per_step']:8.1f} ms/step  {r['calls_per_step']:7.0f} calls  {r['op']}")
    print(f"wall {t.s / args.steps:.2f} s/step (profiled, so slower than unprofiled), self CPU total {total / 1e6 / args.steps:.2f} s/step")
    common.write_result(common.result_name(f"profile_step_{args.quant}", args.quick), {
        "config": vars(args), "wall_s_per_step": t.s / args.steps, "self_cpu_s_per_step": total / 1e6 / args.steps,
        "top": rows[: args.top]}, info)


if __name__ == "__main__":
    main()
