"""What a busy machine costs a job: a training step and a small sweep, idle and beside 1 and 2
CPU-bound processes, under each thread policy, interleaved.

A policy is how a job's OpenMP threads are set (core/threads.py). The runtime reads its
environment once, when torch starts, so every policy runs in a child process of its own:

    auto     the library's policy: passive waits, one thread per core, fewer while other
             processes hold cores (RANK_STUDIO_THREADS unset)
    fixed    passive waits, one thread per core, never adjusted (RANK_STUDIO_THREADS=<cores>)
    one      passive waits, a single thread (RANK_STUDIO_THREADS=1)
    default  the libraries' own defaults: spinning waits, one thread per core
             (RANK_STUDIO_THREADS=off, no OMP_* variables)

A child loads its jobs once, then runs rounds. A round visits the three conditions (idle,
beside 1 busy process, beside 2) in an order that rotates from round to round. For each:
start the busy processes (`python -c "while True: pass"`, not niced), wait `--settle`
seconds and let the policy look at the machine once (core.threads.adjust(), as the
training loop does before every step), then time

    train   `--steps` optimizer steps (core.train.Trainer.train_step, adjust() before each):
            default model, NF4, r_max 16, batch 4, max length 256, the sample data;
    sweep   core.evaluation.sweep.Sweep.run() of a run trained once by this script
            (10 steps): ranks 0 and 4, 8 prompts, 16-token answers, reference NLL and
            ROUGE-L, latency 1 prompt x 1 repeat (set up, i.e. loaded, before the clock starts);

then stop the busy processes. Reported per policy and job: median seconds per condition,
and the slowdown (beside k / idle) as the median of the per-round ratios with a bootstrap
95 % interval. Target (issue 12): with the library's policy, beside one busy process a job
is at most 2x slower than idle, training step and sweep.

    .venv/bin/python bench/under_load.py [--quick] [--policies auto,default] [--rounds N]
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
import common  # noqa: E402  (sets this process's thread policy; children get their own)

POLICIES = ("auto", "fixed", "one", "default")
CONDITIONS = (0, 1, 2)           # busy processes beside the job
TARGET_RATIO = 2.0
HOG = "while True: pass"


def policy_env(policy: str, cores: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_") and k != "RANK_STUDIO_THREADS"}
    env["RANK_STUDIO_THREADS"] = {"auto": "auto", "fixed": str(cores), "one": "1", "default": "off"}[policy]
    return env


class Hogs:
    """k CPU-bound processes for the length of a `with` block."""

    def __init__(self, k: int):
        self.k, self.procs = k, []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(self.k)]
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait()


# ------------------------------------------------------------------ child: one policy


def child(spec: dict) -> dict:
    from core import threads
    from core.evaluation.sweep import Sweep, SweepConfig
    from core.train import TrainConfig, Trainer

    out = Path(spec["tmp"])
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    trainer = Trainer(TrainConfig(data=str(common.TRAIN_FILE), out=str(out / "train"), model=spec["model"], quant="nf4",
                                  r_max=16, batch_size=spec["batch_size"], max_length=spec["max_length"], steps=10_000, seed=42))
    trainer.setup()
    trainer.train_step(16)  # warm-up: allocator, kernels

    def train_job() -> float:
        t0 = time.perf_counter()
        for _ in range(spec["steps"]):
            threads.adjust()
            trainer.train_step(trainer.sampler.sample_step(1))
            trainer.step += 1
        return time.perf_counter() - t0

    sweep_count = [0]

    def sweep_job() -> float:
        sweep_count[0] += 1
        cfg = SweepConfig(run=spec["run"], prompts=str(common.EVAL_FILE), out=str(out / f"sweep_{sweep_count[0]}"),
                          ranks=[0, 4], max_prompts=spec["prompts"], max_new_tokens=spec["new_tokens"],
                          metrics=["ref_nll", "rouge_l"], latency=True, latency_prompts=1, latency_repeats=1,
                          latency_new_tokens=max(2, spec["new_tokens"] // 2), n_bootstrap=200)
        sweep = Sweep(cfg, resume=False)
        sweep.validate()
        sweep.setup()
        try:
            t0 = time.perf_counter()
            result = sweep.run()
            seconds = time.perf_counter() - t0
        finally:
            sweep.cleanup()
        assert result.status == "completed", result.message
        del sweep
        shutil.rmtree(cfg.out, ignore_errors=True)
        return seconds

    jobs = {"train": train_job, "sweep": sweep_job}
    rounds = []
    for r in range(spec["rounds"]):
        order = list(CONDITIONS[r % 3:] + CONDITIONS[:r % 3])
        row = {"order": order}
        for hogs in order:
            with Hogs(hogs):
                for job, run in jobs.items():
                    time.sleep(spec["settle"])
                    threads.adjust()
                    row[f"{job}_{hogs}"] = run()
                    row[f"{job}_{hogs}_threads"] = threads.adjust() or _torch_threads()
            common.log(f"[{spec['policy']}] round {r + 1} beside {hogs}: " + ", ".join(
                f"{job} {row[f'{job}_{hogs}']:.1f}s ({row[f'{job}_{hogs}_threads']} threads)" for job in jobs))
        row["loadavg"] = common.loadavg()
        rounds.append(row)
    trainer.cleanup()
    shutil.rmtree(out, ignore_errors=True)
    return {"policy": spec["policy"], "thread_policy": threads.describe(), "rounds": rounds}


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def run_child(spec: dict, env: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    common.log(f"policy {spec['policy']}: {cmd[-1][:120]}")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    sys.stderr.write(proc.stderr[-4000:] if proc.returncode else "")
    for line in proc.stdout.splitlines():
        if not line.startswith("RESULT "):
            print(line, flush=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"policy {spec['policy']} failed ({proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


# ------------------------------------------------------------------ parent


def summarize(result: dict) -> dict:
    out = {}
    rounds = result["rounds"]
    for job in ("train", "sweep"):
        seconds = {k: common.describe([r[f"{job}_{k}"] for r in rounds]) for k in CONDITIONS}
        threads_used = {k: sorted({r[f"{job}_{k}_threads"] for r in rounds}) for k in CONDITIONS}
        ratios = {}
        for k in CONDITIONS[1:]:
            per_round = [r[f"{job}_{k}"] / r[f"{job}_0"] for r in rounds]
            ratios[k] = common.describe(per_round) | {"ci95": common.median_ci(per_round)}
        out[job] = {"seconds": seconds, "slowdown": ratios, "threads": threads_used}
    return out


def ensure_sweep_run(model: str, quick: bool) -> Path:
    from core.train import TrainConfig, train

    out = common.TMP / ("under_load_run_quick" if quick else "under_load_run")
    if (out / "adapter" / "adapter.safetensors").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    common.log(f"training {out}")
    train(TrainConfig(data=str(common.TRAIN_FILE), out=str(out), model=model, r_max=16, steps=2 if quick else 10,
                      batch_size=4, max_length=64 if quick else 256, seed=42))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny random Llama, 1 step, 2 prompts, 1 round, auto and default")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="training steps timed per measurement")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--settle", type=float, default=3.0, help="seconds the busy processes run before the clock starts")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return
    info = common.machine_info()
    print(info)
    model, batch_size, max_length = "default", 4, 256
    policies = [x for x in args.policies.split(",") if x]
    if args.quick:
        model = str(common.make_random_llama_folder(common.TMP / "llama_tiny_random", hidden=256, layers=2, intermediate=688,
                                                    heads=4, kv_heads=4))
        batch_size, max_length, args.rounds, args.steps, args.prompts, args.new_tokens, args.settle = 2, 64, 1, 1, 2, 4, 2.5
        if args.policies == ",".join(POLICIES):
            policies = ["auto", "default"]
    unknown = [x for x in policies if x not in POLICIES]
    if unknown:
        p.error(f"unknown policies {unknown}; choose from {', '.join(POLICIES)}")
    run = ensure_sweep_run(model, args.quick)
    cores = common.threads.usable_cores()
    results = {}
    for policy in policies:
        spec = {"policy": policy, "model": model, "batch_size": batch_size, "max_length": max_length, "steps": args.steps,
                "prompts": args.prompts, "new_tokens": args.new_tokens, "rounds": args.rounds, "settle": args.settle,
                "run": str(run), "tmp": str(common.TMP / f"under_load_{policy}")}
        raw = run_child(spec, policy_env(policy, cores))
        results[policy] = raw | {"summary": summarize(raw)}
        for job, s in results[policy]["summary"].items():
            print(f"{policy:>8} {job:>5}: idle {s['seconds'][0]['median']:.1f}s, beside 1 {s['seconds'][1]['median']:.1f}s "
                  f"(x{s['slowdown'][1]['median']:.2f}), beside 2 {s['seconds'][2]['median']:.1f}s (x{s['slowdown'][2]['median']:.2f}); "
                  f"threads {s['threads']}")
    targets = {}
    if "auto" in results:
        for job in ("train", "sweep"):
            ratio = results["auto"]["summary"][job]["slowdown"][1]["median"]
            targets[f"{job}_beside_one_busy_process_le_{TARGET_RATIO}x"] = {"value": ratio, "met": ratio <= TARGET_RATIO}
    common.write_result(common.result_name("under_load", args.quick), {
        "config": vars(args) | {"model": model, "batch_size": batch_size, "max_length": max_length, "cores": cores,
                                "policies": policies, "sweep_run": str(run)},
        "results": results, "targets": targets}, info)


if __name__ == "__main__":
    main()
