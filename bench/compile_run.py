"""A training run with and without `compile` (TrainConfig.compile), step by step side by side (§4.3).

compile_step.py times steps on one fixed micro-batch. A run also meets a new packed width
at every step and draws its ranks at random, and both can cost compiling that a fixed
batch never shows. This script sets up two trainers of the same run (default model, NF4,
r_max 16, batch 4, the library's defaults otherwise), one eager and one compiled, and
trains them in lockstep: at each step both draw the same ranks from their own samplers and
train on the same micro-batch, in alternating order, as `core.train.Trainer.train` would
(the thread governor adjusts before each step; checkpoints are left out, alike for both).
Side by side, because this machine's speed drifts by 30 % over minutes: two runs one after
the other compare the drift as much as the code.

Recorded: each step's time for both; the steady speedup (median over the second half of
the paired per-step ratios, with a bootstrap interval); what compiling adds (the
compiled side's time beyond its steady step time, less the same for the eager side); and
the run length from which compiling pays for itself. The compile cache is empty by
default (what a first run on a machine pays); --warm-cache uses inductor's shared one.

    .venv/bin/python bench/compile_run.py [--quick] [--steps N] [--warm-cache]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from core import threads  # noqa: E402
from core.train import TrainConfig, Trainer  # noqa: E402


def make_trainer(args, compiled: bool) -> Trainer:
    out = common.TMP / f"compile_run_{'compiled' if compiled else 'eager'}"
    shutil.rmtree(out, ignore_errors=True)
    model = str(common.quick_llama_folder("compile_tiny_model")) if args.quick else "default"
    trainer = Trainer(TrainConfig(data=str(common.TRAIN_FILE), out=str(out), model=model, quant="nf4", r_max=16,
                                  batch_size=4, steps=args.steps, seed=42, compile=compiled))
    trainer.setup()
    return trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny random Llama, 6 steps")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warm-cache", action="store_true", help="keep inductor's shared on-disk cache (a later run)")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    if args.quick:
        args.steps = 6
    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="compile_run_cache_")
    info = common.machine_info()
    print(info)
    sides = {"eager": make_trainer(args, False), "compiled": make_trainer(args, True)}
    times: dict[str, list[float]] = {name: [] for name in sides}
    losses: dict[str, list[float]] = {name: [] for name in sides}
    ranks_drawn = []
    try:
        for step in range(args.steps):
            drawn = {name: tr.sampler.sample_step(tr.qcfg.ranks_per_step) for name, tr in sides.items()}
            if drawn["eager"] != drawn["compiled"]:
                raise RuntimeError(f"the two samplers drew different ranks at step {step + 1}: {drawn}")
            ranks_drawn.append(drawn["eager"])
            order = list(sides) if step % 2 == 0 else list(reversed(sides))
            for name in order:
                threads.adjust()
                with common.Timer() as t:
                    loss, _ = sides[name].train_step(drawn[name])
                sides[name].step += 1
                times[name].append(t.s)
                losses[name].append(loss)
            if (step + 1) % 10 == 0 or step < 8:
                common.log(f"step {step + 1}: ranks {drawn['eager']}, eager {times['eager'][-1]:.2f} s, "
                           f"compiled {times['compiled'][-1]:.2f} s")
    finally:
        for tr in sides.values():
            tr.cleanup()
            shutil.rmtree(tr.run_dir, ignore_errors=True)
        if not args.warm_cache:
            shutil.rmtree(os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)
    half = args.steps // 2
    ratios = [e / c for e, c in zip(times["eager"][half:], times["compiled"][half:])]
    steady = {name: common.med(values[half:]) for name, values in times.items()}
    overhead = sum(times["compiled"]) - steady["compiled"] * args.steps - (sum(times["eager"]) - steady["eager"] * args.steps)
    saved = steady["eager"] - steady["compiled"]
    summary = {"steady_step_s": steady, "speedup_steady": common.med(ratios), "speedup_ci": common.median_ci(ratios),
               "total_s": {name: sum(values) for name, values in times.items()}, "compile_overhead_s": overhead,
               "break_even_steps": overhead / saved if saved > 0 else None,
               "recompiled_steps_after_first_10": [i + 1 for i in range(10, args.steps)
                                                   if times["compiled"][i] > 3 * steady["compiled"]],
               "loss_max_rel_diff": max(abs(a - b) / max(abs(a), 1e-9) for a, b in zip(losses["eager"], losses["compiled"]))}
    print(f"steady step: eager {steady['eager']:.2f} s, compiled {steady['compiled']:.2f} s, paired speedup "
          f"x{summary['speedup_steady']:.2f} {[round(x, 2) for x in summary['speedup_ci']]}; compiling adds {overhead:.0f} s; "
          f"pays for itself from {summary['break_even_steps'] or float('inf'):.0f} steps; "
          f"losses differ by at most {summary['loss_max_rel_diff']:.1%} (dropout draws differ when compiled)")
    common.write_result(common.result_name("compile_run", args.quick, args.tag), {
        "config": vars(args), "ranks": ranks_drawn, "step_s": times, "losses": losses, "summary": summary}, info)


if __name__ == "__main__":
    main()
