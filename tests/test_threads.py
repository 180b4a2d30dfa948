"""Thread and wait policy of jobs, and time-left estimates that follow the machine (issue 12, part 1)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from core import threads
from core.eta import MovingRate, combined_eta
from core.threads import Sample, ThreadGovernor, job_env, others_busy_cores, threads_for
from tests.helpers import ROOT


@pytest.mark.parametrize("cores,others,current,expected", [
    (2, 0.0, 2, 2), (2, 0.4, 2, 2), (2, 0.6, 2, 1), (2, 1.0, 2, 1), (2, 2.0, 2, 1),   # give a thread back at >= 0.5
    (2, 1.0, 1, 1), (2, 0.4, 1, 1), (2, 0.25, 1, 2), (2, 0.0, 1, 2),                 # take it again at <= 0.3
    (8, 3.2, 8, 5), (8, 0.0, 5, 8), (1, 3.0, 1, 1),
])
def test_threads_follow_the_cores_other_processes_leave(cores, others, current, expected):
    assert threads_for(cores, others, current) == expected


def test_other_processes_busy_cores_exclude_our_own_time_and_niced_work():
    before = Sample(wall=0.0, busy=100.0, niced=50.0, own=10.0)
    after = Sample(wall=10.0, busy=125.0, niced=60.0, own=25.0)     # 25 busy core-seconds, 15 of them ours
    assert others_busy_cores(before, after, own_is_niced=False) == pytest.approx(1.0)
    assert others_busy_cores(before, after, own_is_niced=True) == pytest.approx(2.0)   # niced work competes with a niced job
    assert others_busy_cores(before, before, own_is_niced=False) == 0.0


class FakeMachine:
    """/proc/stat and our own CPU time as a script of (others' cores, our cores) per second."""

    def __init__(self):
        self.t = 0.0
        self.busy = self.own = 0.0
        self.applied: list[int] = []
        self.torch_threads = 2

    def run(self, seconds: float, others: float, ours: float) -> None:
        self.t += seconds
        self.busy += (others + ours) * seconds
        self.own += ours * seconds

    def governor(self, cores=2, cap=None) -> ThreadGovernor:
        def apply(n):
            self.applied.append(n)
            self.torch_threads = n
        return ThreadGovernor(cores, apply=apply, clock=lambda: self.t, read=lambda: (self.busy, 0.0, self.t * cores),
                              own=lambda: self.own, actual=lambda: self.torch_threads, cap=cap)


def test_a_finished_child_process_counts_as_our_own_cpu_time():
    # torch.compile's C++ compiler runs as a child: its work must not read as another process's load.
    before = threads.own_cpu_seconds()
    subprocess.run([sys.executable, "-c", "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass"],
                   check=True)
    assert threads.own_cpu_seconds() - before >= 0.35


def test_governor_gives_a_core_back_while_another_process_holds_it_and_takes_it_again_after():
    m = FakeMachine()
    gov = m.governor()
    m.run(5, others=0.05, ours=1.95)
    assert gov.adjust() == 2 and m.applied == []
    m.run(5, others=0.8, ours=1.2)            # a CPU-bound process arrives
    assert gov.adjust() == 1 and m.applied == [1]
    m.run(1, others=0.0, ours=1.0)            # too short a window to decide anything
    assert gov.adjust() == 1
    m.run(5, others=1.0, ours=1.0)
    assert gov.adjust() == 1
    m.run(5, others=0.1, ours=1.0)            # it is gone
    assert gov.adjust() == 2 and m.applied == [1, 2]
    assert [c["threads"] for c in gov.changes] == [1, 2]


def test_a_process_given_a_share_keeps_it_beside_its_sibling_and_gives_back_only_for_other_work():
    """`train --processes 2` / `sweep --workers 2` on 4 cores: each process gets OMP_NUM_THREADS=2 (its cap); the
    sibling's 2 busy cores leave it its 2, and a third process taking a core costs it one thread."""
    m = FakeMachine()
    gov = m.governor(cores=4, cap=2)
    m.run(5, others=2.0, ours=2.0)            # the sibling process, busy on its 2 cores
    assert gov.adjust() == 2 and m.applied == []
    m.run(5, others=3.0, ours=1.0)            # something else arrives and holds a core
    assert gov.adjust() == 1 and m.applied == [1]
    m.run(5, others=2.0, ours=1.0)            # it is gone: back to the share, never above it
    assert gov.adjust() == 2 and m.applied == [1, 2]
    m.run(5, others=0.0, ours=2.0)
    assert gov.adjust() == 2


def test_governor_leaves_a_thread_count_the_program_chose():
    m = FakeMachine()
    gov = m.governor()
    m.torch_threads = 1                       # e.g. a benchmark's --threads 1
    m.run(5, others=0.0, ours=1.0)
    assert gov.adjust() == 1 and gov.stopped
    m.run(5, others=0.0, ours=1.0)
    assert gov.adjust() == 1 and m.applied == []


def test_job_environment_asks_for_passive_waits_and_one_thread_per_core(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(threads.ENV_VAR, raising=False)
    env = job_env({})
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["OMP_NUM_THREADS"] == str(threads.usable_cores())
    assert job_env({"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "7"}) == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "7"}
    monkeypatch.setenv(threads.ENV_VAR, "1")
    assert job_env({})["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv(threads.ENV_VAR, "off")
    assert job_env({}) == {}


def test_dashboard_jobs_start_with_the_policy(tmp_path, monkeypatch):
    from core.jobs import JobStore

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv(threads.ENV_VAR, raising=False)
    env = JobStore(tmp_path / "ws")._env()
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and int(env["OMP_NUM_THREADS"]) >= 1


def test_a_cli_process_is_a_job_before_torch_starts():
    code = ("import os, sys; sys.argv = ['qdylora', '--help'];"
            "from core import threads; import core.cli as cli;"
            "threads.configure_job(); import torch;"
            "print(os.environ['OMP_WAIT_POLICY'], torch.get_num_threads(), threads.describe()['mode'])")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("OMP_") and k != threads.ENV_VAR}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    policy, n, mode = out.stdout.split()
    assert policy == "PASSIVE" and int(n) == threads.usable_cores() and mode == "auto"


def test_usable_cores_is_at_least_one_and_at_most_the_cpus():
    import os

    assert 1 <= threads.usable_cores() <= (os.cpu_count() or 1)


def test_moving_rate_forgets_old_speed():
    rate = MovingRate(window=3)
    assert rate.eta(10) is None
    for _ in range(5):
        rate.add(1, 2.0)
    assert rate.eta(10) == pytest.approx(20.0)
    for _ in range(3):                         # the machine got busy: 6 s per step
        rate.add(1, 6.0)
    assert rate.eta(10) == pytest.approx(60.0)
    rate.add(8, 8.0)                           # a batch of 8 units
    assert rate.seconds_per_unit() == pytest.approx(20.0 / 10)


def test_combined_eta_needs_a_rate_for_every_phase_with_work_left():
    prompts, latency = MovingRate(4), MovingRate(2)
    prompts.add(8, 16.0)
    assert combined_eta([(prompts, 10), (latency, 2)]) is None
    assert combined_eta([(prompts, 10), (latency, 0)]) == pytest.approx(20.0)
    latency.add(1, 30.0)
    assert combined_eta([(prompts, 10), (latency, 2)]) == pytest.approx(80.0)


def test_training_eta_follows_the_recent_steps(tiny_model_dir, small_train_file, tmp_path, monkeypatch):
    """Steps that become slower make the estimate follow them at once (not an average since the start)."""
    import types

    import core.train as core_train
    from core.train import ETA_WINDOW_STEPS, Trainer, TrainConfig, train

    clock = [1000.0]
    monkeypatch.setattr(core_train, "time", types.SimpleNamespace(time=lambda: clock[0]))
    original = Trainer.train_step

    def train_step(self, rank):
        clock[0] += 1.0 if self.step < 15 else 5.0      # 1 s per step, then the machine gets busy: 5 s
        return original(self, rank)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    events = []
    train(TrainConfig(data=str(small_train_file), out=str(tmp_path / "run"), model=str(tiny_model_dir), quant="none",
                      r_max=2, steps=30, batch_size=1, max_length=64, checkpoint_every=100), on_event=events.append)
    eta = {e["step"]: e["eta_s"] for e in events if e["event"] == "step"}
    assert eta[10] == pytest.approx(20 * 1.0)
    assert eta[15 + ETA_WINDOW_STEPS] == pytest.approx(5 * 5.0)   # the window holds only busy steps
    assert eta[30] == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["execution"]["threads"]["usable_cores"] >= 1
