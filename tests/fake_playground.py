"""A stand-in for `python -m core playground` (no model): the same files, canned answers.

`python -m tests.fake_playground playground --run RUN --dir DIR [--idle-exit S]` answers
each question at each rank with "answer of rank B to: QUESTION", streamed word by word.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from core import playground as pg
from core import runstate
from tests import fake_cli


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("command")
    p.add_argument("--run", required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--idle-exit", type=float, default=60)
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, fake_cli._on_signal)
    folder = Path(a.dir)
    runstate.write_status(folder, "running", phase="ready", run=a.run)
    last, idle_since = None, time.time()
    while not fake_cli._stop and time.time() - idle_since < a.idle_exit:
        request = pg.read_request(folder)
        if request and request["id"] != last:
            last = request["id"]
            state = {"id": last, "prompt": request["prompt"], "status": "running", "order": request["ranks"],
                     "error": None, "ranks": {str(b): {"text": "", "done": False, "tokens": 0, "seconds": None}
                                              for b in request["ranks"]}}
            for b in request["ranks"]:
                words = f"answer of rank {b} to: {request['prompt']}".split()
                for word in words:
                    state["ranks"][str(b)]["text"] += word + " "
                    runstate.write_json_atomic(folder / pg.ANSWERS_FILE, state)
                    time.sleep(0.01)
                state["ranks"][str(b)].update(text=state["ranks"][str(b)]["text"].strip(), done=True,
                                              tokens=len(words), seconds=0.1)
            state["status"] = "done"
            runstate.write_json_atomic(folder / pg.ANSWERS_FILE, state)
            idle_since = time.time()
        time.sleep(0.05)
    runstate.write_status(folder, "completed", phase="stopped", run=a.run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
