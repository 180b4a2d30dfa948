"""The demo run's acceptance numbers, through the CLI exactly as a user types it.

1. `python -m core train --data sample_data/train.jsonl --r-max 16 --steps 40
   --batch-size 4 --max-length 256 --out <tmp>` timed end to end (process start to
   exit, model load included); target < 6 minutes on the 2-core machine. The load
   average is sampled every 5 s while it runs (other engineers share the CPU).
2. `python -m core sweep --run <run> --prompts sample_data/eval.jsonl --ranks
   0,1,2,4,8,16 --metrics ref_nll --latency off` (reference NLL only by default;
   --generate adds ROUGE-L and fact recall on 48-token greedy answers), then checks that
   the best rank's 95 % bootstrap interval of the reference NLL lies entirely below the
   base model's (rank 0) interval.

The run folder stays in bench/results/tmp/demo_run (git-ignored) so that
`bench/sweep_cost.py --run bench/results/tmp/demo_run` can reuse it.

    .venv/bin/python bench/demo_run.py [--quick] [--generate] [--reuse]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGET_TRAIN_S = 360


class LoadSampler(threading.Thread):
    def __init__(self, every: float = 5.0):
        super().__init__(daemon=True)
        self.every, self.samples, self._halt = every, [], threading.Event()

    def run(self):
        while not self._halt.is_set():
            self.samples.append(common.loadavg()[0] if common.loadavg() else None)
            self._halt.wait(self.every)

    def stop(self):
        self._halt.set()
        self.join()


def timed_cli(args: list[str], log_path: Path) -> dict:
    cmd = [sys.executable, "-m", "core"] + args
    common.log("$ " + " ".join(cmd[1:]))
    sampler = LoadSampler()
    sampler.start()
    t0 = time.perf_counter()
    with open(log_path, "w") as fh:
        proc = subprocess.run(cmd, cwd=common.ROOT, stdout=fh, stderr=subprocess.STDOUT, env=os.environ.copy())
    wall = time.perf_counter() - t0
    sampler.stop()
    loads = [x for x in sampler.samples if x is not None]
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:1])} exited {proc.returncode}; see {log_path}:\n" + log_path.read_text()[-3000:])
    return {"cmd": "python -m core " + " ".join(args), "wall_s": wall, "exit_code": proc.returncode,
            "load1_samples": loads, "load1_mean": sum(loads) / len(loads) if loads else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 steps, max length 64, 4 prompts, ranks 0,1,16")
    p.add_argument("--generate", action="store_true", help="also ROUGE-L and fact recall on 48-token greedy answers")
    p.add_argument("--reuse", action="store_true", help="keep an existing completed demo run instead of training again")
    args = p.parse_args()
    info = common.machine_info()
    print(info)
    steps, max_length, ranks = ("2", "64", "0,1,16") if args.quick else ("40", "256", "0,1,2,4,8,16")
    run = common.TMP / ("demo_run_quick" if args.quick else "demo_run")
    sweep = common.TMP / ("demo_sweep_quick" if args.quick else "demo_sweep")
    common.TMP.mkdir(parents=True, exist_ok=True)
    train_args = ["train", "--data", "sample_data/train.jsonl", "--r-max", "16", "--steps", steps, "--batch-size", "4",
                  "--max-length", max_length, "--out", str(run), "--no-progress"]
    reuse = args.reuse and (run / "status.json").is_file() and json.loads((run / "status.json").read_text())["status"] == "completed"
    if reuse:
        previous = json.loads((common.RESULTS / common.result_name("demo_run", args.quick)).with_suffix(".json").read_text())
        train = previous["train"]
        common.log(f"reusing {run} (trained in {train['wall_s']:.0f}s)")
    else:
        shutil.rmtree(run, ignore_errors=True)
        train = timed_cli(train_args, common.TMP / f"{run.name}.log")
        events = [json.loads(line) for line in (run / "progress.jsonl").read_text().splitlines() if line.strip()]
        steps_ev = [e for e in events if e.get("event") == "step"]
        start = next(e for e in events if e.get("event") == "start")
        train.update({
            "steps": len(steps_ev), "first_loss": steps_ev[0]["loss"], "final_loss": steps_ev[-1]["loss"],
            "loss_curve": [e["loss"] for e in steps_ev], "ranks": [e["rank"] for e in steps_ev],
            "training_loop_s": steps_ev[-1]["elapsed_s"], "examples": start.get("examples"),
            "median_step_s": common.med([b["time"] - a["time"] for a, b in zip(steps_ev, steps_ev[1:])]),
            "mem_mb_last": steps_ev[-1].get("mem_mb"),
        })
        train["outside_loop_s"] = train["wall_s"] - train["training_loop_s"]
    print(f"train: {train['wall_s']:.1f}s end to end ({train['wall_s'] / 60:.2f} min; target < {TARGET_TRAIN_S / 60:.0f} min), "
          f"loop {train['training_loop_s']:.1f}s, median step {train['median_step_s']:.2f}s, loss {train['first_loss']:.3f} -> "
          f"{train['final_loss']:.3f}, mean 1-min load {train['load1_mean']}")
    shutil.rmtree(sweep, ignore_errors=True)
    metrics = "ref_nll,rouge_l,fact_recall" if args.generate else "ref_nll"
    sweep_args = ["sweep", "--run", str(run), "--prompts", "sample_data/eval.jsonl", "--ranks", ranks, "--metrics", metrics,
                  "--latency", "off", "--max-new-tokens", "48", "--out", str(sweep), "--no-progress"]
    if args.quick:
        sweep_args += ["--max-prompts", "4"]
    sweep_res = timed_cli(sweep_args, common.TMP / f"{sweep.name}.log")
    with open(sweep / "summary.csv", newline="") as fh:
        rows = [{k: (float(v) if v not in ("", None) else None) for k, v in r.items()} for r in csv.DictReader(fh)]
    recommendation = json.loads((sweep / "sweep.json").read_text()).get("recommendation")
    by_rank = {int(r["rank"]): r for r in rows}
    base = by_rank[0]
    best_rank = min((b for b in by_rank if b > 0), key=lambda b: by_rank[b]["ref_nll"])
    best = by_rank[best_rank]
    separated = best["ref_nll_hi"] < base["ref_nll_lo"]
    for b, r in sorted(by_rank.items()):
        extra = f", ROUGE-L {r['rouge_l']:.3f} [{r['rouge_l_lo']:.3f}, {r['rouge_l_hi']:.3f}]" if r.get("rouge_l") is not None else ""
        print(f"rank {b:>2}: ref NLL {r['ref_nll']:.3f} [{r['ref_nll_lo']:.3f}, {r['ref_nll_hi']:.3f}]{extra}")
    print(f"sweep: {sweep_res['wall_s']:.1f}s; best rank {best_rank}: NLL interval [{best['ref_nll_lo']:.3f}, {best['ref_nll_hi']:.3f}] "
          f"vs base [{base['ref_nll_lo']:.3f}, {base['ref_nll_hi']:.3f}]: {'separated' if separated else 'OVERLAP'}; "
          f"recommendation {recommendation and recommendation.get('rank')}")
    targets = {
        "train_40_steps_under_6_min": {"value": train["wall_s"], "met": train["wall_s"] < TARGET_TRAIN_S},
        "best_rank_nll_interval_below_base": {"value": {"best_rank": best_rank, "best": [best["ref_nll_lo"], best["ref_nll_hi"]],
                                                        "base": [base["ref_nll_lo"], base["ref_nll_hi"]]}, "met": separated},
    }
    if args.quick:
        targets = {k + "_quick_not_meaningful": v for k, v in targets.items()}
    common.write_result(common.result_name("demo_run", args.quick), {
        "config": vars(args), "run_dir": str(run), "sweep_dir": str(sweep), "train": train, "sweep": sweep_res,
        "summary": rows, "best_rank": best_rank, "recommendation": recommendation, "targets": targets}, info)


if __name__ == "__main__":
    main()
