"""Status and progress files of long jobs (training runs, sweeps).

A job writes `status.json` (what it is doing now) and appends to `progress.jsonl`
(what it has done). Readers never trust a "running" status alone: a process killed
with -9 cannot update its file, so `read_status` checks that the recorded process
still exists and reports "died" when it does not.
"""
from __future__ import annotations

import json
import logging
import os
import time
import traceback
from pathlib import Path

import psutil

from core import proc
from core.fileio import append_line, read_json_object, write_json_atomic  # noqa: F401  (write_json_atomic: re-exported)

STATUS_FILE = "status.json"
PROGRESS_FILE = "progress.jsonl"
FINISHED = ("completed", "cancelled", "failed")


def write_status(folder: Path, status: str, **fields) -> dict:
    pid = os.getpid()
    data = {"status": status, "pid": pid, "pid_started_at": proc.started_at(pid), "updated_at": time.time()}
    data.update(fields)
    write_json_atomic(Path(folder) / STATUS_FILE, data)
    return data


def read_status(folder: Path) -> dict | None:
    """The job's status, with "running" turned into "died" when its process is gone."""
    data = read_json_object(Path(folder) / STATUS_FILE)
    if data is None:
        return None
    if data.get("status") == "running" and not _recorded_process_alive(data):
        data["status"] = "died"
        data.setdefault("error", "the process stopped without saying why (killed or crashed); resume continues from the last checkpoint")
    return data


def _recorded_process_alive(status: dict) -> bool:
    pid, started = status.get("pid"), status.get("pid_started_at")
    if isinstance(pid, bool) or not isinstance(pid, int):
        return False
    return proc.is_alive(pid, started if isinstance(started, (int, float)) else None)


def attach_log(folder: Path, filename: str) -> logging.Handler:
    """Send the project's log records to a file in the job folder (tracebacks included)."""
    handler = logging.FileHandler(Path(folder) / filename, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger("rank_studio")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return handler


def detach_log(handler: logging.Handler | None) -> None:
    if handler is not None:
        logging.getLogger("rank_studio").removeHandler(handler)
        handler.close()


def describe_failure(exc: BaseException) -> str:
    """A label for people; the traceback goes to the log."""
    from core.errors import UserError

    if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower():
        return "out of memory: lower batch size or max length, use nf4, or enable gradient checkpointing"
    if isinstance(exc, UserError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def record_failure(folder: Path, exc: BaseException, **fields) -> None:
    """Mark a started job failed (status + end event), with its traceback in the log."""
    if not (Path(folder) / STATUS_FILE).exists():
        return  # nothing was started: the error itself is the whole story
    message = describe_failure(exc)
    logging.getLogger("rank_studio").error("failed: %s\n%s", message, traceback.format_exc())
    write_status(folder, "failed", error=message, **fields)
    append_event(folder, {"event": "end", "status": "failed", "error": message, "time": time.time()})


def append_event(folder: Path, event: dict) -> None:
    append_line(Path(folder) / PROGRESS_FILE, json.dumps(event, default=float))


def read_events(folder: Path) -> list[dict]:
    """All progress events; a half-written line (job killed mid-write) is ignored."""
    path = Path(folder) / PROGRESS_FILE
    if not path.is_file():
        return []
    events = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            event = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def memory_mb(device: str) -> float:
    """Peak accelerator memory on CUDA, resident set size of this process on CPU."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return psutil.Process().memory_info().rss / 2**20


# Files core.jobs writes into a job's folder before the CLI starts; they do not make
# the folder "used".
JOB_STORE_FILES = frozenset({"job.log", "worker.log"})


def folder_is_empty_or_missing(folder: Path) -> bool:
    folder = Path(folder)
    return not folder.exists() or (folder.is_dir() and all(p.name in JOB_STORE_FILES for p in folder.iterdir()))
