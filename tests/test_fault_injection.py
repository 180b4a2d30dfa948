"""Fault injection: kill -9 at each phase of a job, then resume or retry it through the CLI
and through the job store. Each time the job must complete, with no finished step or rank
lost and every status right on the way.

The kills come from tests/fault_cli.py (the real CLI, SIGKILLed at a named point); the
model is the tiny random one, so each process takes seconds. Several phases are chained
in one run to keep the number of process start-ups (torch imports) small.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core import runstate
from core.jobs import JobStore
from tests.fault_cli import FAULT_ENV
from tests.helpers import ROOT, kill_store_processes

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def fault_run(*args: str, fault: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run([sys.executable, "-m", "tests.fault_cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def train_args(data, model, out, steps=4) -> list[str]:
    return ["train", "--data", str(data), "--model", str(model), "--quant", "none", "--r-max", "4",
            "--steps", str(steps), "--batch-size", "2", "--max-length", "48", "--checkpoint-every", "1",
            "--seed", "3", "--out", str(out), "--no-progress"]


def checkpoint_dirs(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint"))


def checkpoint_step(folder: Path) -> int:
    return json.loads((folder / "state.json").read_text())["step"]


def assert_complete_run(run: Path, steps: int) -> None:
    status = runstate.read_status(run)
    assert status["status"] == "completed" and status["step"] == steps, status
    assert checkpoint_dirs(run) == ["checkpoint"] and checkpoint_step(run / "checkpoint") == steps
    assert sum(json.loads((run / "rank_histogram.json").read_text()).values()) == steps
    assert (run / "adapter" / "adapter.safetensors").is_file()
    done = {e["step"] for e in runstate.read_events(run) if e.get("event") == "step"}
    assert done == set(range(1, steps + 1))


def test_kill_at_model_load_inside_the_checkpoint_swap_and_mid_step_then_resume_via_cli(
        tiny_model_dir, small_train_file, tmp_path):
    run = tmp_path / "run"

    # 1. Killed while the model loads: nothing trained yet, but the run is resumable.
    res = fault_run(*train_args(small_train_file, tiny_model_dir, run), fault="model-load")
    assert res.returncode == -signal.SIGKILL, res.stderr
    status = runstate.read_status(run)
    assert status["status"] == "died" and status["phase"] == "loading model"
    assert (run / "config.json").is_file() and checkpoint_dirs(run) == []

    # 2. Resumed (it starts from step 0) and killed in checkpoint save 2 between its renames:
    #    checkpoint.old/ (step 1) and a finished checkpoint.tmp/ (step 2) are left, no checkpoint/.
    res = fault_run("train", "--resume", "--out", str(run), "--no-progress", fault="swap-renamed-old:2")
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert runstate.read_status(run)["status"] == "died"
    assert checkpoint_dirs(run) == ["checkpoint.old", "checkpoint.tmp"]
    assert checkpoint_step(run / "checkpoint.tmp") == 2

    # 3. Resumed from step 2 (the finished save is not lost) and killed inside optimizer step 4.
    res = fault_run("train", "--resume", "--out", str(run), "--no-progress", fault="mid-step:2")
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert runstate.read_status(run)["status"] == "died"
    assert checkpoint_dirs(run) == ["checkpoint"] and checkpoint_step(run / "checkpoint") == 3

    # 4. Resumed to the end.
    res = fault_run("train", "--resume", "--out", str(run), "--no-progress")
    assert res.returncode == 0, res.stderr
    assert_complete_run(run, 4)
    starts = [(e["step"], e["resumed"]) for e in runstate.read_events(run) if e.get("event") == "start"]
    assert starts == [(0, True), (2, True), (3, True)]  # attempt 1 died before its start event


# ---------------------------------------------------------------- through the job store


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv(FAULT_ENV, raising=False)
    s = JobStore(tmp_path / "ws", python=sys.executable, cli_module="tests.fault_cli", poll_interval=0.1)
    yield s
    kill_store_processes(s.db_path)


def wait(store, job_id, statuses, timeout=180.0):
    statuses = {statuses} if isinstance(statuses, str) else set(statuses)
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = store.get(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} is {store.get(job_id).status}, wanted {statuses}:\n{store.log_tail(job_id)}")


def test_job_store_resumes_a_killed_run_and_restarts_a_job_killed_while_queued(
        store, tiny_model_dir, small_train_file, monkeypatch):
    """The killed job is resumed and the one killed while queued restarted; the first, killed
    inside a checkpoint swap, ends exactly where the second, never interrupted, does."""
    from safetensors.torch import load_file

    args = train_args(small_train_file, tiny_model_dir, "x")[1:-3] + ["--no-progress"]
    monkeypatch.setenv(FAULT_ENV, "swap-before-cleanup:2")
    first = store.submit("train", "first", args)
    monkeypatch.delenv(FAULT_ENV)
    second = store.submit("train", "second", args)
    time.sleep(0.5)
    assert store.get(second.id).status == "queued"
    os.kill(second.worker_pid, signal.SIGKILL)                 # e.g. a reboot while it waits
    second = wait(store, second.id, "died")
    assert second.restartable and not second.resumable        # it never started: nothing to resume

    first = wait(store, first.id, "died")
    assert "SIGKILL" in first.error and first.resumable
    assert checkpoint_dirs(first.out_dir) == ["checkpoint", "checkpoint.old"]   # the leftover of audit item B
    assert checkpoint_step(first.out_dir / "checkpoint") == 2
    first = store.resume(first.id)
    assert first.argv[-1] == "--resume"
    second = store.resume(second.id)
    assert "--resume" not in second.argv
    first, second = wait(store, first.id, "completed"), wait(store, second.id, "completed")
    assert_complete_run(first.out_dir, 4)
    assert_complete_run(second.out_dir, 4)
    a = load_file(str(first.out_dir / "adapter" / "adapter.safetensors"))
    b = load_file(str(second.out_dir / "adapter" / "adapter.safetensors"))
    assert all((a[k] - b[k]).abs().max() < 1e-6 for k in a)


def test_job_store_restarts_an_export_killed_while_writing_and_while_moving_in(
        store, finished_tiny_run, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "export-write")
    job = store.submit("export", "exp", ["--run", str(finished_tiny_run), "--rank", "2"])
    job = wait(store, job.id, "died")
    assert job.restartable
    assert [p.name for p in store.exports_dir.iterdir() if ".tmp-" in p.name]   # its temporary folder is left

    monkeypatch.setenv(FAULT_ENV, "export-move")
    job = wait(store, store.resume(job.id).id, "died")
    assert (job.out_dir / "export_config.json").is_file() and not (job.out_dir / "rank_card.json").exists()

    monkeypatch.delenv(FAULT_ENV)
    job = wait(store, store.resume(job.id).id, "completed")
    assert sorted(p.name for p in job.out_dir.iterdir() if p.name not in ("job.log", "worker.log")) == [
        "adapter_config.json", "adapter_model.safetensors", "export_config.json", "rank_card.json", "rank_card.md"]
    assert json.loads((job.out_dir / "rank_card.json").read_text())["rank"] == 2
    assert not [p for p in store.exports_dir.iterdir() if ".tmp-" in p.name]   # leftovers cleared


def test_kill_during_a_sweep_rank_then_resume_keeps_the_finished_ranks(finished_tiny_run, tmp_path):
    sweep = tmp_path / "sweep"
    args = ["sweep", "--run", str(finished_tiny_run), "--prompts", str(ROOT / "sample_data" / "eval.jsonl"),
            "--ranks", "0,1,2,4", "--max-prompts", "2", "--max-new-tokens", "4", "--metrics", "ref_nll",
            "--latency", "off", "--out", str(sweep), "--no-progress"]
    res = fault_run(*args, fault="sweep-rank:2")
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert runstate.read_status(sweep)["status"] == "died"
    assert sorted(p.name for p in (sweep / "ranks").iterdir()) == ["rank_0.json", "rank_1.json"]
    kept = (sweep / "ranks" / "rank_1.json").read_bytes()

    res = fault_run("sweep", "--resume", "--out", str(sweep), "--no-progress")
    assert res.returncode == 0, res.stderr
    assert runstate.read_status(sweep)["status"] == "completed"
    events = runstate.read_events(sweep)
    last_start = max(i for i, e in enumerate(events) if e.get("event") == "start")
    assert [e["rank"] for e in events[last_start:] if e.get("event") == "rank_start"] == [2, 4]
    assert (sweep / "ranks" / "rank_1.json").read_bytes() == kept
    ranks = [line.split(",")[0] for line in (sweep / "summary.csv").read_text().splitlines()[1:]]
    assert ranks == ["0", "1", "2", "4"]
