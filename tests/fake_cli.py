"""A stand-in for `python -m core` used by tests/test_jobs.py.

`python -m tests.fake_cli KIND [--steps N] [--step-s S] [--fail-at K] [--user-error]
[--ignore-term] [--resume] --out DIR`

Sleeps in steps, writes DIR/status.json, DIR/progress.jsonl and DIR/train.log like the
real CLI, and on SIGTERM/SIGINT stops at the next step boundary, writes status
"cancelled" and exits 130. `--resume` continues from the step in status.json.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

_stop = False


def _on_signal(signum, frame):
    global _stop
    _stop = True


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("kind")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--step-s", type=float, default=0.05)
    p.add_argument("--fail-at", type=int, default=None)
    p.add_argument("--user-error", action="store_true")
    p.add_argument("--ignore-term", action="store_true")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.user_error:
        print("error: the data file has no 'prompt' column", file=sys.stderr)
        return 2
    if a.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)

    def status(s, step, error=None):
        tmp = out / "status.json.tmp"
        tmp.write_text(json.dumps({"status": s, "pid": os.getpid(), "step": step,
                                   "total_steps": a.steps, "updated_at": time.time(),
                                   "error": error}))
        os.replace(tmp, out / "status.json")

    def event(**kw):
        with open(out / "progress.jsonl", "a") as f:
            f.write(json.dumps(kw) + "\n")

    start = 0
    if not a.resume:  # like the real CLI: the job's config is its first file
        (out / "config.json").write_text(json.dumps({"fake": a.kind, "steps": a.steps}))
    if a.resume:
        start = int(json.loads((out / "status.json").read_text()).get("step", 0))
        print(f"resumed from step {start}", flush=True)
    status("running", start)
    event(event="start", kind=a.kind)
    for step in range(start + 1, a.steps + 1):
        time.sleep(a.step_s)
        if a.fail_at == step:
            status("failed", step - 1, error="boom at step %d" % step)
            raise RuntimeError(f"boom at step {step}")
        print(f"step {step}/{a.steps} loss={1.0 / step:.3f}", flush=True)
        event(event="step", step=step, total_steps=a.steps)
        status("running", step)
        if _stop:
            status("cancelled", step)
            event(event="end", status="cancelled")
            print(f"cancelled at step {step}", flush=True)
            return 130
    status("completed", a.steps)
    event(event="end", status="completed")
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
