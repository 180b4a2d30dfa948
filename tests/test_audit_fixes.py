"""One test per cause of the outside audit (issue 10) that the bad-input corpus and the
fault-injection suite do not already pin down on their own: damage to existing runs,
checkpoint swap leftovers, divergence, damaged workspace files, the launch forms, the job
store's lock / delete / restart, atomic files, process liveness and the listening address.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from core import proc, runstate
from core.errors import RunError, UserError
from core.train import TrainConfig, Trainer, train
from tests.helpers import ROOT, snapshot


def tiny_cfg(model_dir, data, out, **overrides) -> TrainConfig:
    values = dict(data=str(data), out=str(out), model=str(model_dir), quant="none", r_max=4, steps=4,
                  batch_size=2, checkpoint_every=1, max_length=48, lr=1e-3, warmup_ratio=0.0)
    return TrainConfig(**(values | overrides))


# ---------------------------------------------------------------- A: a refused run never touches a folder


def test_refused_runs_leave_finished_and_running_runs_untouched(finished_tiny_run, tiny_model_dir, small_train_file,
                                                               tmp_path):
    running = tmp_path / "running"
    shutil.copytree(finished_tiny_run, running)
    me = os.getpid()
    runstate.write_json_atomic(running / "status.json", {"status": "running", "pid": me, "step": 1,
                                                         "pid_started_at": proc.started_at(me)})
    before = snapshot(finished_tiny_run, running)
    with pytest.raises(UserError, match="already holds files"):
        train(tiny_cfg(tiny_model_dir, small_train_file, finished_tiny_run))
    with pytest.raises(RunError, match="still running"):
        train(TrainConfig(data="", out=str(running)), resume=True)
    with pytest.raises(RunError, match="already completed"):
        train(TrainConfig(data="", out=str(finished_tiny_run)), resume=True)
    assert snapshot(finished_tiny_run, running) == before


# ---------------------------------------------------------------- B: leftovers of a killed checkpoint swap


def stop_after(steps: int):
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > steps
    return stop


@pytest.mark.parametrize("leftover", ["checkpoint and checkpoint.old", "checkpoint.old and checkpoint.tmp"])
def test_resume_after_a_kill_inside_the_checkpoint_swap(leftover, tiny_model_dir, small_train_file, tmp_path):
    """What a kill inside save 2 leaves: checkpoint.old/ holds step 1, the new one step 2."""
    run = tmp_path / "run"
    assert train(tiny_cfg(tiny_model_dir, small_train_file, run), should_stop=stop_after(1)).status == "cancelled"
    shutil.copytree(run / "checkpoint", tmp_path / "step1")
    assert train(TrainConfig(data="", out=str(run)), resume=True, should_stop=stop_after(1)).status == "cancelled"
    if leftover == "checkpoint and checkpoint.old":      # killed after the second rename
        shutil.copytree(tmp_path / "step1", run / "checkpoint.old")
    else:                                                 # killed between the two renames
        (run / "checkpoint").rename(run / "checkpoint.tmp")
        shutil.copytree(tmp_path / "step1", run / "checkpoint.old")
    result = train(TrainConfig(data="", out=str(run)), resume=True)
    assert result.status == "completed" and result.steps_done == 4
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]
    starts = [e for e in runstate.read_events(run) if e.get("event") == "start"]
    assert starts[-1]["step"] == 2                       # the saved steps were kept


# ---------------------------------------------------------------- F: non-finite loss or weights


@pytest.mark.parametrize("what", ["loss", "weights"])
def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(what, tiny_model_dir, small_train_file, tmp_path,
                                                                     monkeypatch):
    import torch

    real_step = Trainer.train_step

    def diverging_step(self, rank):
        loss, tokens = real_step(self, rank)
        if self.step + 1 == 3:                            # optimizer step 3 blows up
            with torch.no_grad():
                for p in self.params:
                    p.fill_(math.nan)
            if what == "loss":
                loss = math.nan
        return loss, tokens

    monkeypatch.setattr(Trainer, "train_step", diverging_step)
    run = tmp_path / "run"
    with pytest.raises(UserError, match="diverged") as info:   # TrainingDiverged
        train(tiny_cfg(tiny_model_dir, small_train_file, run))
    assert "checkpoint (step 2) is kept" in str(info.value) and "\n" not in str(info.value)
    status = runstate.read_status(run)
    assert status["status"] == "failed" and "diverged" in status["error"]
    assert runstate.read_events(run)[-1]["status"] == "failed"
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 2
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(str(run / "checkpoint" / "adapter.safetensors")).values())


# ---------------------------------------------------------------- L: an unwritable output folder


@contextlib.contextmanager
def unprivileged():
    """Permissions do not bind root: as root, act as `nobody` for a moment (effective ids)."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.mark.parametrize("command", ["train", "export", "sweep"])
def test_read_only_output_folder_is_refused_with_exit_2(command, finished_tiny_run, small_train_file, cli_in_process):
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="rank-studio-ro-"))   # /tmp itself: every user may enter it
    os.chmod(base, 0o755)
    readonly = base / "readonly"
    readonly.mkdir(mode=0o555)
    argv = {"train": ["train", "--data", str(small_train_file)],
            "export": ["export", "--run", str(finished_tiny_run), "--rank", "1"],
            "sweep": ["sweep", "--run", str(finished_tiny_run), "--prompts", str(ROOT / "sample_data" / "eval.jsonl")]}
    import core.evaluation.sweep  # noqa: F401  (import what the commands need while every file is readable)
    import core.export  # noqa: F401

    with unprivileged():
        code, err = cli_in_process(*argv[command], "--out", str(readonly / "out"))
    try:
        assert code == 2 and err.strip().count("\n") == 0, err
        assert "permission denied" in err.lower() and str(readonly) in err
        assert list(readonly.iterdir()) == []
    finally:
        shutil.rmtree(base)


# ---------------------------------------------------------------- O: a damaged dataset.json


@pytest.mark.parametrize("content", ["[1, 2]", '{"name": "x", "n_train": 1, "n_eval": 1, "created_at": "yesterday"}',
                                     "{", "[" * 100_000])
def test_a_damaged_dataset_is_skipped_with_a_warning(content, tmp_path):
    from core import workspace_data as wd

    good = wd.ensure_sample_dataset(tmp_path)
    bad = wd.datasets_dir(tmp_path) / "broken"
    shutil.copytree(good.folder, bad)
    (bad / "dataset.json").write_text(content)
    found, damaged = wd.scan_datasets(tmp_path)
    assert [d.id for d in found] == [good.id]
    assert len(damaged) == 1 and "broken" in damaged[0] and "skipped" in damaged[0]
    assert wd.get_dataset(tmp_path, "broken") is None


def test_pages_with_a_damaged_dataset_show_a_warning_not_a_traceback(app_workspace):
    from core import workspace_data as wd

    finished_run_job(app_workspace)                      # the Sweep page lists datasets once a run exists
    good = wd.get_dataset(app_workspace.workspace, wd.SAMPLE_DATASET)
    bad = wd.datasets_dir(app_workspace.workspace) / "broken"
    shutil.copytree(good.folder, bad)
    (bad / "dataset.json").write_text('{"name": "x", "n_train": 1, "n_eval": 1, "created_at": "yesterday"}')
    for name in ("data", "train", "sweep"):
        at = page(name)
        assert any("broken" in w.value and "skipped" in w.value for w in at.warning), name


# ---------------------------------------------------------------- P: the launch forms


@pytest.fixture
def app_workspace(tmp_path, monkeypatch):
    from app import ui
    from core import workspace_data as wd
    from core.jobs import JobStore

    ws = tmp_path / "ws"
    monkeypatch.setenv("RANK_STUDIO_WORKSPACE", str(ws))
    store = JobStore(ws, python=sys.executable, cli_module="tests.fake_cli", poll_interval=0.05)
    submitted = []
    real_submit = store.submit
    store.submit = lambda kind, name, args, parent_id=None: submitted.append((kind, args)) or real_submit(
        kind, name, ["--steps", "1", "--step-s", "0.01"], parent_id=parent_id)
    store.submitted, store.real_submit = submitted, real_submit
    monkeypatch.setattr(ui, "store", lambda: store)
    wd.ensure_sample_dataset(ws)
    return store


def page(name: str, **params):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=60)
    for k, v in params.items():
        at.query_params[k] = str(v)
    at.run()
    at.switch_page(f"../pages/{name}.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def number(at, label: str):
    return next(w for w in at.number_input if w.label == label)


def button(at, label: str):
    return next(b for b in at.button if b.label == label)


def test_train_form_blocks_a_launch_with_values_out_of_range(app_workspace):
    at = page("train")
    number(at, "r_max (largest rank)").set_value(999).run()
    number(at, "Steps").set_value(0).run()
    number(at, "Learning rate").set_value(5.0).run()
    errors = " ".join(e.value for e in at.error)
    assert "r max must be between 1 and 256 (got 999)" in errors
    assert "steps must be between 1 and 100000 (got 0)" in errors and "lr must be between" in errors
    assert button(at, "Start training").disabled and app_workspace.submitted == []
    number(at, "r_max (largest rank)").set_value(8).run()
    number(at, "Steps").set_value(3).run()
    number(at, "Learning rate").set_value(0.001).run()
    assert not at.error and not button(at, "Start training").disabled
    button(at, "Start training").click().run()
    args = app_workspace.submitted[-1][1]
    assert args[args.index("--r-max") + 1] == "8" and args[args.index("--steps") + 1] == "3"


def finished_run_job(store) -> object:
    from core import workspace_data as wd
    from tests.test_app_pages import _wait, make_run

    data = wd.get_dataset(store.workspace, wd.SAMPLE_DATASET)
    run = _wait(store, store.real_submit("train", "demo", ["--steps", "1", "--step-s", "0.01"]).id)
    make_run(run.out_dir, data.train_path)
    return run


def test_sweep_and_export_forms_block_a_launch_with_values_out_of_range(app_workspace):
    run = finished_run_job(app_workspace)
    at = page("sweep", run=run.id)
    number(at, "Answer length (tokens)").set_value(5000).run()
    assert any("Answer length must be between 1 and 1024" in e.value for e in at.error)
    assert button(at, "Start sweep").disabled
    number(at, "Answer length (tokens)").set_value(16).run()
    number(at, "Prompts to use").set_value(0).run()
    assert any("Prompts to use" in e.value for e in at.error) and button(at, "Start sweep").disabled

    at = page("export", run=run.id)
    number(at, "Rank to export").set_value(9).run()
    assert any("from 1 to 4 (got 9)" in e.value for e in at.error)
    assert button(at, "Export").disabled and app_workspace.submitted == []


# ---------------------------------------------------------------- the job store


def test_a_stuck_lock_holder_makes_calls_fail_in_time_not_hang(tmp_path):
    from core.jobs import JobStore

    store = JobStore(tmp_path / "ws", lock_timeout=0.5)
    fd = os.open(store.lock_path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)                       # a stuck holder
    try:
        started = time.monotonic()
        with pytest.raises(UserError, match="busy"):     # StoreBusy
            store.list()
        assert time.monotonic() - started < 5
    finally:
        os.close(fd)
    assert store.list() == []


def test_delete_removes_the_folder_without_holding_the_lock(tmp_path, monkeypatch):
    import core.jobs
    from core.jobs import JobStore

    store = JobStore(tmp_path / "ws", python=sys.executable, cli_module="tests.fake_cli", poll_interval=0.05)
    job = store.submit("export", "big", ["--steps", "1", "--step-s", "0.01"])
    deadline = time.time() + 20
    while store.get(job.id).active and time.time() < deadline:
        time.sleep(0.05)
    (job.out_dir / "weights.bin").write_bytes(b"x" * 1000)
    held_during_removal = []
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        fd = os.open(store.lock_path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held_during_removal.append(False)
        except BlockingIOError:
            held_during_removal.append(True)
        finally:
            os.close(fd)
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(core.jobs.shutil, "rmtree", rmtree)
    store.delete(job.id)
    assert held_during_removal and not any(held_during_removal)
    assert not job.out_dir.exists() and store.list() == []
    assert not any((store.workspace / ".trash").iterdir())


def test_a_job_that_died_while_queued_is_restarted_not_resumed(tmp_path):
    from core.jobs import JobStore

    store = JobStore(tmp_path / "ws", python=sys.executable, cli_module="tests.fake_cli", poll_interval=0.05)
    blocker = store.submit("train", "blocker", ["--steps", "40", "--step-s", "0.05"])
    queued = store.submit("train", "queued", ["--steps", "2", "--step-s", "0.01"])
    os.kill(queued.worker_pid, 9)
    deadline = time.time() + 20
    while store.get(queued.id).status != "died" and time.time() < deadline:
        time.sleep(0.05)
    queued = store.get(queued.id)
    assert queued.status == "died" and queued.restartable and not queued.resumable
    queued = store.resume(queued.id)
    assert "--resume" not in queued.argv
    store.cancel(blocker.id)
    deadline = time.time() + 30
    while store.get(queued.id).status != "completed" and time.time() < deadline:
        time.sleep(0.05)
    assert store.get(queued.id).status == "completed"


def test_the_dashboard_offers_restart_and_reports_a_failed_resume(app_workspace):
    store = app_workspace
    died = store.real_submit("train", "never-started", ["--steps", "1"])
    os.kill(died.worker_pid, 9)
    deadline = time.time() + 20
    while store.get(died.id).status != "died" and time.time() < deadline:
        time.sleep(0.05)
    at = page("home")
    restart = at.button(key=f"home-resume-{died.id}")
    assert restart.label == "Restart"
    shutil.rmtree(died.out_dir)                          # resuming can now only fail
    restart.click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("gone" in e.value for e in at.error)


# ---------------------------------------------------------------- files and processes


def test_write_json_atomic_flushes_to_disk_and_leaves_no_temp_file_on_error(tmp_path, monkeypatch):
    from core import fileio

    target = tmp_path / "status.json"
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(fileio.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    runstate.write_json_atomic(target, {"status": "running"})
    assert synced and json.loads(target.read_text()) == {"status": "running"}

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio.os, "replace", broken_replace)
    with pytest.raises(OSError):
        runstate.write_json_atomic(target, {"status": "completed"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]
    assert json.loads(target.read_text()) == {"status": "running"}


def test_an_event_after_a_torn_line_is_kept(tmp_path):
    runstate.append_event(tmp_path, {"event": "step", "step": 1})
    with open(tmp_path / runstate.PROGRESS_FILE, "a") as fh:
        fh.write('{"event": "step", "st')                 # killed mid-write
    runstate.append_event(tmp_path, {"event": "start", "step": 1, "resumed": True})
    assert runstate.read_events(tmp_path) == [{"event": "step", "step": 1},
                                              {"event": "start", "step": 1, "resumed": True}]


def test_run_folders_and_the_job_store_agree_on_which_process_is_alive(tmp_path):
    from core.jobs import _pid_alive

    me = os.getpid()
    started = proc.started_at(me)
    for start, alive in ((started, True), (started - 100.0, False)):   # the same pid, another process
        runstate.write_json_atomic(tmp_path / "status.json", {"status": "running", "pid": me, "pid_started_at": start})
        assert (runstate.read_status(tmp_path)["status"] == "running") is alive
        assert _pid_alive(me, start) is alive
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not proc.is_alive(child.pid) and not _pid_alive(child.pid)


# ---------------------------------------------------------------- the dashboard's address


def test_the_dashboard_listens_on_localhost_when_started_from_another_folder(tmp_path):
    psutil = pytest.importorskip("psutil")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, RANK_STUDIO_WORKSPACE=str(tmp_path / "ws"), HOME=str(tmp_path))
    env.pop("STREAMLIT_SERVER_ADDRESS", None)
    proc_ = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "main.py"),
                              "--server.port", str(port)], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 60
        while True:
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).read() == b"ok":
                    break
            assert proc_.poll() is None and time.time() < deadline, "streamlit did not start"
            time.sleep(0.3)
        listening = {c.laddr.ip for c in psutil.Process(proc_.pid).net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
        assert listening and listening <= {"127.0.0.1", "::1"}, listening
    finally:
        os.killpg(proc_.pid, 15)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc_.wait(10)
