"""core.jobs with a fake CLI (tests/fake_cli.py): real detached workers, no model."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
import time

import pytest

from core.errors import UserError
from core.jobs import JobStore, _pid_alive, default_workspace, sanitize_name
from tests.helpers import kill_store_processes

FAST = ["--steps", "3", "--step-s", "0.02"]


def slow(steps=200):
    return ["--steps", str(steps), "--step-s", "0.05"]


@pytest.fixture
def stores(tmp_path):
    made = []

    def make(ws=None, **kw):
        kw.setdefault("cli_module", "tests.fake_cli")
        kw.setdefault("poll_interval", 0.05)
        s = JobStore(ws or tmp_path / "ws", python=sys.executable, **kw)
        made.append(s)
        return s

    yield make
    # never leave processes behind
    for db_path in {s.db_path for s in made}:
        kill_store_processes(db_path)


@pytest.fixture
def store(stores):
    return stores()


def wait(store, job_id, statuses, timeout=15.0, pred=None):
    statuses = {statuses} if isinstance(statuses, str) else set(statuses)
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = store.get(job_id)
        if job.status in statuses and (pred is None or pred(job)):
            return job
        time.sleep(0.03)
    raise AssertionError(f"job {job_id} is {store.get(job_id).status}, wanted {statuses}")


def step_of(job):
    try:
        return json.loads((job.out_dir / "status.json").read_text()).get("step", 0)
    except (OSError, ValueError):
        return 0


def test_submit_runs_to_completion(store):
    job = store.submit("train", "My run", FAST)
    assert job.status == "queued" and job.worker_pid
    assert job.out_dir == store.workspace / "runs" / f"My-run-{job.id}"
    assert job.argv[:4] == [sys.executable, "-m", "tests.fake_cli", "train"]
    assert job.argv[-2:] == ["--out", str(job.out_dir)]
    done = wait(store, job.id, "completed")
    assert done.exit_code == 0 and done.error is None
    assert done.started_at >= done.created_at and done.finished_at >= done.started_at
    assert "done" in store.log_tail(job.id)
    assert json.loads((done.out_dir / "status.json").read_text())["status"] == "completed"
    assert [j.id for j in store.list("train")] == [job.id] and store.list("sweep") == []


def test_second_job_waits_for_first(store):
    a = store.submit("train", "a", slow(12))
    b = store.submit("sweep", "b", FAST)
    wait(store, a.id, "running")
    time.sleep(0.2)
    assert store.get(b.id).status == "queued"
    assert store.queue_position(b.id) == 1 and store.queue_position(a.id) is None
    a, b = wait(store, a.id, "completed"), wait(store, b.id, "completed")
    assert b.started_at >= a.finished_at


def test_cancel_running_and_queued(store):
    a = store.submit("train", "a", slow())
    b = store.submit("train", "b", FAST)
    wait(store, a.id, "running", pred=lambda j: step_of(j) >= 1)
    b = store.cancel(b.id)
    assert b.status == "cancelled"                      # queued: at once
    assert store.cancel(b.id).status == "cancelled"     # idempotent
    a = store.cancel(a.id)
    assert a.cancel_requested and store.cancel(a.id).status in ("running", "cancelled")
    a = wait(store, a.id, "cancelled")
    assert a.exit_code == 130 and "cancelled at step" in store.log_tail(a.id)
    assert store.get(b.id).started_at is None
    time.sleep(0.3)                                     # b's worker just exits
    assert not _pid_alive(b.worker_pid) and store.get(b.id).status == "cancelled"


def test_kill_child_marks_died_with_log_tail(store):
    job = store.submit("train", "k", slow())
    job = wait(store, job.id, "running", pred=lambda j: step_of(j) >= 2)
    os.kill(job.pid, signal.SIGKILL)
    job = wait(store, job.id, "died")
    assert "SIGKILL" in job.error and "step 2/" in job.error


def test_kill_worker_marks_died_and_queue_moves_on(store):
    a = store.submit("train", "a", slow())
    b = store.submit("train", "b", FAST)
    c = store.submit("train", "c", FAST)
    a = wait(store, a.id, "running", pred=lambda j: step_of(j) >= 1)
    os.kill(c.worker_pid, signal.SIGKILL)               # a queued job's worker
    c = wait(store, c.id, "died")
    assert "before the job started" in c.error and c.started_at is None
    os.kill(a.worker_pid, signal.SIGKILL)
    a = wait(store, a.id, "died")
    assert "worker" in a.error and "step 1/" in a.error
    assert not _pid_alive(a.pid)        # the CLI was stopped (parent-death signal)
    wait(store, b.id, "completed")
    assert store.get(a.id).resumable


def test_new_store_sees_running_job_and_its_end(stores, tmp_path):
    first = stores()
    job = first.submit("train", "r", slow(15))
    wait(first, job.id, "running")
    del first                                           # "server restart"
    second = stores(tmp_path / "ws")
    assert second.get(job.id).status == "running"
    assert [j.id for j in second.list()] == [job.id]
    assert wait(second, job.id, "completed").exit_code == 0


def test_resume_cancelled_job(store):
    job = store.submit("train", "res", slow(8))
    wait(store, job.id, "running", pred=lambda j: step_of(j) >= 2)
    store.cancel(job.id)
    job = wait(store, job.id, "cancelled")
    with pytest.raises(UserError):
        store.resume(10_000)                            # no such job
    job = store.resume(job.id)
    assert job.status == "queued" and job.argv[-1] == "--resume"
    job = wait(store, job.id, "completed")
    assert job.argv.count("--resume") == 1
    log = store.log_tail(job.id, 200)
    assert "resumed from step" in log and "step 8/8" in log
    with pytest.raises(UserError):
        store.resume(job.id)                            # completed


def test_failures_are_reported(store):
    crash = store.submit("train", "crash", ["--steps", "3", "--step-s", "0.01", "--fail-at", "2"])
    bad = store.submit("sweep", "bad", ["--user-error"])
    crash, bad = wait(store, crash.id, "failed"), wait(store, bad.id, "failed")
    assert crash.exit_code == 1 and "boom at step 2" in crash.error and "RuntimeError" in crash.error
    assert bad.exit_code == 2 and "no 'prompt' column" in bad.error
    exp = store.submit("export", "e", FAST)
    wait(store, exp.id, "completed")
    with pytest.raises(UserError):
        store.resume(exp.id)
    with pytest.raises(UserError):
        store.submit("evaluate", "x", [])
    with pytest.raises(UserError):
        store.submit("train", "x", ["--out", "/tmp/elsewhere"])


def test_delete(store, tmp_path):
    job = store.submit("train", "del", slow(10))
    wait(store, job.id, "running")
    with pytest.raises(UserError):
        store.delete(job.id)
    assert job.out_dir.is_dir()
    wait(store, job.id, "completed")
    store.delete(job.id)
    assert not job.out_dir.exists()
    with pytest.raises(UserError):
        store.get(job.id)
    # a tampered row pointing outside the workspace: the row goes, the folder stays
    outside = tmp_path / "precious"
    outside.mkdir()
    other = store.submit("export", "x", FAST)
    wait(store, other.id, "completed")
    db = sqlite3.connect(store.db_path)
    db.execute("UPDATE jobs SET out_dir=? WHERE id=?", (str(outside), other.id))
    db.commit()
    db.close()
    store.delete(other.id)
    assert outside.is_dir() and store.list() == []


@pytest.mark.parametrize("raw, safe", [
    ("My run", "My-run"),
    ("../../etc/passwd", "etc-passwd"),
    ("..", "job"),
    ("", "job"),
    ("///", "job"),
    (".hidden", "hidden"),
    ("-rf", "rf"),
    ("Modèle été ✓", "Mod-le-t"),
    ("日本語", "job"),
    ("a" * 100, "a" * 60),
    ("ok_name-1.2", "ok_name-1.2"),
    ("a\x00b\nc", "a-b-c"),
])
def test_sanitize_name(raw, safe):
    out = sanitize_name(raw)
    assert out == safe
    assert "/" not in out and out not in (".", "..") and len(out) <= 60


def test_paths_stay_inside_workspace(store, monkeypatch, tmp_path):
    for name in ("../../etc/passwd", "/abs/path", "..", "x/../../y"):
        job = store.submit("export", name, ["--steps", "0"])
        assert job.out_dir.resolve().parent == store.workspace / "exports"
    for d in ("runs", "sweeps", "exports", "uploads"):
        assert (store.workspace / d).is_dir()
    assert (store.workspace / "jobs.sqlite").is_file()
    monkeypatch.setenv("RANK_STUDIO_WORKSPACE", str(tmp_path / "env-ws"))
    assert default_workspace() == tmp_path / "env-ws"
    monkeypatch.delenv("RANK_STUDIO_WORKSPACE")
    monkeypatch.chdir(tmp_path)
    assert default_workspace() == tmp_path / "workspace"
    for job in store.list():
        wait(store, job.id, "completed")
