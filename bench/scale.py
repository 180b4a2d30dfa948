"""Scale-out on this machine: data-parallel training and sharded sweeps (issue 13).

(a) Training, same config both ways (default model, NF4, global batch 4, 128 tokens, 20 steps):
    `qdylora train --processes 2` (2 processes × 1 thread, gloo, through Accelerate) against
    `qdylora train` (1 process × 2 threads). Per run: wall clock of the whole command (start-up
    and model loads included) and the steady-state seconds per step (median gap between step
    events, the first two steps left out).
(b) Sweep over 4 ranks (1, 2, 4, 8 of a short run trained here; 16 prompts, 32-token answers,
    default metrics, latency on): `qdylora sweep --workers 2` (2 workers × 1 thread) against
    `--workers 1` (1 process × 2 threads). Per sweep: wall clock and the time from the sweep
    folder's creation to its end event (model loads included; the CLI's own start-up not).

Every measurement is the real CLI in a subprocess, as a user would run it. Rounds alternate
the two variants (A, B, B, A, …); each speed-up is the median of the per-round ratios with a
bootstrap interval. On 2 cores both variants use both cores, so the gain can only come from
less threading overhead and overlapping work; see bench/README.md for what to expect with GPUs.

    .venv/bin/python bench/scale.py [--quick] [--rounds 3]

--quick: a tiny random model, 3 steps, 2 prompts, latency off, one round: checks that the
script runs (writes bench/results/scale_quick.json), says nothing about speed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from core.distributed import cpu_cores  # noqa: E402

STEP_SKIP = 2  # the first steps warm up allocators and caches


def cli(args: list[str], threads: int) -> tuple[float, subprocess.CompletedProcess]:
    """`python -m core ARGS` with `threads` OpenMP threads per process; (wall seconds, result)."""
    env = dict(os.environ, PYTHONPATH=str(common.ROOT), OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "core", *args], cwd=common.ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} … failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return wall, res


def events(folder: Path) -> list[dict]:
    path = folder / "progress.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def seconds_per_step(run: Path) -> float:
    times = [e["time"] for e in events(run) if e["event"] == "step"]
    gaps = [b - a for a, b in zip(times, times[1:])][STEP_SKIP - 1:]
    return common.med(gaps) if gaps else float("nan")


def sweep_span(sweep: Path) -> float:
    """From the sweep folder's creation (before any model load, in both variants) to its end event."""
    created = json.loads((sweep / "config.json").read_text())["created_at"]
    return events(sweep)[-1]["time"] - created


def tiny_model() -> Path:
    return common.make_random_llama_folder(common.TMP / "scale_tiny_model", hidden=64, layers=2, intermediate=128,
                                           heads=4, kv_heads=2)


def train_flags(quick: bool) -> list[str]:
    if quick:
        return ["--data", str(common.TRAIN_FILE), "--model", str(tiny_model()), "--quant", "none", "--r-max", "8",
                "--steps", "3", "--batch-size", "4", "--max-length", "64", "--checkpoint-every", "100", "--no-progress"]
    return ["--data", str(common.TRAIN_FILE), "--model", "default", "--quant", "nf4", "--r-max", "16", "--steps", "20",
            "--batch-size", "4", "--max-length", "128", "--checkpoint-every", "100", "--no-progress"]


def sweep_flags(run: Path, quick: bool) -> list[str]:
    flags = ["--run", str(run), "--prompts", str(common.EVAL_FILE), "--ranks", "1,2,4,8", "--no-progress"]
    if quick:
        return flags + ["--max-prompts", "2", "--max-new-tokens", "4", "--latency", "off"]
    return flags + ["--max-prompts", "16", "--max-new-tokens", "32"]


def sweep_run(quick: bool) -> Path:
    """A short run whose ranks the sweeps measure (reused when it exists)."""
    out = common.TMP / ("scale_sweep_run_quick" if quick else "scale_sweep_run")
    if (out / "adapter" / "adapter.safetensors").is_file() and json.loads((out / "status.json").read_text())["status"] == "completed":
        return out
    shutil.rmtree(out, ignore_errors=True)
    flags = train_flags(quick)
    flags[flags.index("--steps") + 1] = "2" if quick else "10"
    common.log(f"training {out} for the sweeps")
    cli(["train", *flags, "--out", str(out)], threads=cpu_cores())
    return out


def csv_rows(path: Path) -> list[dict]:
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def ratios(rounds: list[dict], key: str, faster: str, slower: str) -> dict:
    values = [r[slower][key] / r[faster][key] for r in rounds if r[faster][key] > 0]
    return {"median": common.med(values), "ci95": common.median_ci(values), "rounds": values}


def alternate(rounds: int, variants: dict, measure) -> list[dict]:
    """`measure(name, round)` for every variant, the order flipped every round (A B, B A, …)."""
    out, order = [], list(variants)
    for i in range(rounds):
        out.append({name: measure(name, i) for name in (order if i % 2 == 0 else order[::-1])})
    return out


def bench_training(quick: bool, rounds: int) -> dict:
    variants = {"processes_2": (["--processes", "2"], 1), "threads_2": ([], cpu_cores())}

    def measure(name: str, i: int) -> dict:
        extra, threads = variants[name]
        run = common.TMP / f"scale_train_{name}"
        shutil.rmtree(run, ignore_errors=True)
        common.log(f"training round {i + 1}/{rounds}: {name}")
        wall, _ = cli(["train", *train_flags(quick), *extra, "--out", str(run)], threads=threads)
        steps = [e for e in events(run) if e["event"] == "step"]
        row = {"wall_s": wall, "s_per_step": seconds_per_step(run), "steps": len(steps),
               "tokens_per_s": common.med([e["tokens_per_s"] for e in steps[STEP_SKIP:]] or [float("nan")]),
               "processes": events(run)[0].get("processes", 1)}
        shutil.rmtree(run, ignore_errors=True)
        return row

    out = alternate(rounds, variants, measure)
    return {"rounds": out, "config": train_flags(quick),
            "speedup_per_step": ratios(out, "s_per_step", "processes_2", "threads_2"),
            "speedup_wall": ratios(out, "wall_s", "processes_2", "threads_2")}


def bench_sweep(quick: bool, rounds: int) -> dict:
    run = sweep_run(quick)
    variants = {"workers_2": ["--workers", "2"], "workers_1": []}

    def measure(name: str, i: int) -> dict:
        folder = common.TMP / f"scale_sweep_{name}"
        shutil.rmtree(folder, ignore_errors=True)
        common.log(f"sweep round {i + 1}/{rounds}: {name}")
        wall, _ = cli(["sweep", *sweep_flags(run, quick), *variants[name], "--out", str(folder)], threads=cpu_cores())
        row = {"wall_s": wall, "span_s": sweep_span(folder),
               "eval_s": [float(r["eval_s"]) for r in csv_rows(folder / "summary.csv")]}
        shutil.rmtree(folder, ignore_errors=True)
        return row

    out = alternate(rounds, variants, measure)
    return {"rounds": out, "run": str(run), "config": sweep_flags(run, quick),
            "speedup_span": ratios(out, "span_s", "workers_2", "workers_1"),
            "speedup_wall": ratios(out, "wall_s", "workers_2", "workers_1")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if cpu_cores() < 2:
        raise SystemExit("bench/scale.py compares 2 processes with 2 threads: it needs at least 2 CPU cores")
    rounds = 1 if args.quick else args.rounds
    info = common.machine_info()
    training = bench_training(args.quick, rounds)
    sweep = bench_sweep(args.quick, rounds)
    common.write_result(common.result_name("scale", args.quick), {"training": training, "sweep": sweep}, info)
    for name, part, keys in (("training", training, ("speedup_per_step", "speedup_wall")),
                             ("sweep", sweep, ("speedup_span", "speedup_wall"))):
        print(name + ": " + ", ".join(f"{k} {part[k]['median']:.2f}×" for k in keys))


if __name__ == "__main__":
    main()
