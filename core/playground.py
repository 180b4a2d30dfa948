"""The playground: type a question, see several ranks (and the base model) answer it.

The dashboard never loads a model (it does not import torch), so one small worker
process per run does: `python -m core playground --run RUN --dir DIR` loads the run once,
then answers each question written to DIR/request.json at every asked rank, streaming
the text into DIR/answers.json as it is generated; the page polls that file. The worker
keeps the model loaded between questions and exits after `idle_exit_s` without one (or
when stopped). A newer question replaces the one being answered.

Files in DIR (WORKSPACE/playground/<run folder name>/):
- status.json — the worker (core.runstate format): running with phase "starting" |
  "loading model" | "ready", then completed (idle or stopped) or failed (error)
- request.json — {"id", "prompt", "ranks", "max_new_tokens", "time"}
- answers.json — {"id", "prompt", "status": running|done|superseded|failed, "order": [ranks],
  "ranks": {"<rank>": {"text", "done", "tokens", "seconds"}}, "error"}
- playground.log, worker.log — the worker's log and its output

This module is the dashboard's side (torch-free); core.playground_worker is the worker's.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil

from core import runstate
from core.errors import UserError

PLAYGROUND_DIR = "playground"
REQUEST_FILE = "request.json"
ANSWERS_FILE = "answers.json"
MAX_PROMPT_CHARS = 2000
MAX_NEW_TOKENS = 512
IDLE_EXIT_S = 900.0
PROJECT_ROOT = Path(__file__).resolve().parent.parent
CLI_MODULE = "core"             # tests swap in a stand-in worker

# Popen objects of the workers this process started, so that finished ones get reaped.
_STARTED: dict[int, subprocess.Popen] = {}


def folder_for(workspace: Path, run_dir: Path) -> Path:
    return Path(workspace) / PLAYGROUND_DIR / Path(run_dir).name


def worker_state(folder: Path) -> dict | None:
    """The worker's status.json ("running" becomes "died" when its process is gone)."""
    for pid, popen in list(_STARTED.items()):
        if popen.poll() is not None:
            _STARTED.pop(pid, None)
    return runstate.read_status(folder)


def is_running(state: dict | None) -> bool:
    return bool(state) and state.get("status") == "running"


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def start(folder: Path, run_dir: Path, python: str = sys.executable, idle_exit_s: float = IDLE_EXIT_S) -> dict:
    """Start the run's worker unless one is running; returns its state. An earlier
    question left in the folder is dropped, so a new worker answers only new ones."""
    folder = Path(folder)
    state = worker_state(folder)
    if is_running(state):
        return state
    folder.mkdir(parents=True, exist_ok=True)
    for name in (REQUEST_FILE, ANSWERS_FILE):
        (folder / name).unlink(missing_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    cmd = [python, "-m", CLI_MODULE, "playground", "--run", str(Path(run_dir).resolve()), "--dir", str(folder.resolve()),
           "--idle-exit", str(idle_exit_s)]
    with open(folder / "worker.log", "ab") as log:
        popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT,
                                 env=env, start_new_session=True)
    _STARTED[popen.pid] = popen
    try:
        started_at = psutil.Process(popen.pid).create_time()
    except psutil.Error:
        started_at = None
    # Written for the worker until it writes its own, so that the page sees it at once.
    return runstate.write_status(folder, "running", phase="starting", pid=popen.pid, pid_started_at=started_at,
                                 run=str(Path(run_dir).resolve()))


def check_question(prompt: str, ranks: list[int], max_new_tokens: int, r_max: int) -> list[str]:
    """What is wrong with a question, for people ([] when it can be asked)."""
    problems = []
    if not str(prompt or "").strip():
        problems.append("Type a question first.")
    elif len(prompt) > MAX_PROMPT_CHARS:
        problems.append(f"The question is {len(prompt)} characters long; the limit is {MAX_PROMPT_CHARS}.")
    if not ranks:
        problems.append("Choose at least one rank (0 is the base model).")
    bad = [r for r in ranks if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= r_max]
    if bad:
        problems.append(f"Ranks must be whole numbers from 0 to {r_max}; not {', '.join(map(str, bad))}.")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        problems.append(f"The answer length must be 1 to {MAX_NEW_TOKENS} tokens.")
    return problems


def ask(folder: Path, run_dir: Path, prompt: str, ranks: list[int], max_new_tokens: int, r_max: int) -> str:
    """Queue a question for the run's worker (starting it when needed); returns its id.
    UserError (nothing written) when the question cannot be asked."""
    problems = check_question(prompt, ranks, max_new_tokens, r_max)
    if problems:
        raise UserError(" ".join(problems))
    start(folder, run_dir)
    request = {"id": uuid.uuid4().hex[:12], "prompt": prompt.strip(), "ranks": list(dict.fromkeys(int(r) for r in ranks)),
               "max_new_tokens": int(max_new_tokens), "time": time.time()}
    runstate.write_json_atomic(Path(folder) / REQUEST_FILE, request)
    return request["id"]


def read_request(folder: Path) -> dict | None:
    return _read(Path(folder) / REQUEST_FILE)


def read_answers(folder: Path) -> dict | None:
    return _read(Path(folder) / ANSWERS_FILE)


def stop(folder: Path) -> bool:
    """Ask the worker to exit (it finishes the token it is on); False when none runs."""
    state = worker_state(folder)
    if not is_running(state):
        return False
    try:
        os.kill(int(state["pid"]), signal.SIGTERM)
    except (ProcessLookupError, PermissionError, KeyError, TypeError, ValueError):
        return False
    return True
