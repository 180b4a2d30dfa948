"""Sharded sweeps: workers measure different ranks at once and write what one process writes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from core import runstate
from core.distributed import cpu_cores
from core.evaluation.sweep import SUMMARY_COLUMNS, SweepConfig, run_sweep
from tests.helpers import ROOT, run_cli
from tests.test_sweep import EVAL, read_csv, run_dir  # noqa: F401 (run_dir: the tiny trained run, a fixture)

# Columns that time or weigh the measuring process itself: they differ between any two sweeps.
TIMING = {c for c in SUMMARY_COLUMNS if c.startswith(("ttft_ms", "ms_per_token", "tokens_per_s"))} | {"eval_s", "peak_mem_mb"}
two_cores = pytest.mark.skipif(cpu_cores() < 2, reason="two sweep workers need two CPU cores")


def sweep_flags(run_dir, ranks="0,1,2,4") -> list[str]:
    return ["--run", str(run_dir), "--prompts", str(EVAL), "--ranks", ranks, "--max-prompts", "4",
            "--max-new-tokens", "6", "--latency-repeats", "1", "--no-progress"]


def assert_same(a, b, path="") -> None:
    """Equal, numbers within float rounding: a worker computes with 1 thread where one process uses 2, and an
    embedding model's sums come out in another order (cosine similarities of ~0.03 differed by 1e-8)."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{path}: {len(a)} items != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7, nan_ok=True), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def same_value(x):
    """Numbers as floats (compared by assert_same), "nan" as text, the rest as is."""
    if isinstance(x, dict):
        return {k: same_value(v) for k, v in x.items()}
    if isinstance(x, list):
        return [same_value(v) for v in x]
    if isinstance(x, str):
        try:
            return same_value(float(x)) if x.strip() else x
        except ValueError:
            return x
    if isinstance(x, float):
        return "nan" if x != x else x
    return x


def table(path, drop=frozenset()):
    return same_value([{k: v for k, v in row.items() if k not in drop} for row in read_csv(path)])


def sweep_json(folder):
    data = json.loads((folder / "sweep.json").read_text())
    data["config"].pop("out")
    data["run_meta"].pop("workers", None)
    data["run_meta"].pop("threads")   # how the measuring process(es) computed (issue 12): a condition, like workers
    return same_value(data)


@two_cores
def test_two_workers_write_the_files_of_one_process(run_dir, tmp_path, cli_in_process):
    code, err = cli_in_process("sweep", *sweep_flags(run_dir), "--out", str(tmp_path / "one"))
    assert code == 0, err
    res = run_cli("sweep", *sweep_flags(run_dir), "--workers", "2", "--out", str(tmp_path / "two"))
    assert res.returncode == 0, res.stderr
    one, two = tmp_path / "one", tmp_path / "two"
    assert_same(table(two / "summary.csv", TIMING), table(one / "summary.csv", TIMING))
    assert_same(table(two / "per_prompt.csv"), table(one / "per_prompt.csv"))
    assert_same(sweep_json(two), sweep_json(one))
    # The speed columns were measured by two processes sharing the cores: the sweep says so.
    assert json.loads((two / "sweep.json").read_text())["run_meta"]["workers"] == 2
    assert "workers" not in json.loads((one / "sweep.json").read_text())["run_meta"]
    assert len(json.loads((two / "sweep.json").read_text())["run_meta"]["threads"]) == 2   # each worker's policy
    events = runstate.read_events(two)
    assert events[0]["event"] == "start" and events[0]["workers"] == 2 and events[-1]["status"] == "completed"
    assert sorted(e["rank"] for e in events if e["event"] == "rank_done") == [0, 1, 2, 4]
    assert {e["worker"] for e in events if e["event"] == "rank_start"} == {0, 1}
    prompts = [e for e in events if e["event"] == "prompt"]
    assert prompts[-1]["done_units"] == prompts[-1]["total_units"] == 16


@two_cores
def test_cancel_keeps_finished_ranks_and_resume_measures_the_rest(run_dir, tmp_path):
    out = tmp_path / "sweep"
    # 12 prompts of 16 tokens per rank (the last flags win): each rank lasts several batches, so the SIGTERM sent at the
    # first finished rank lands while the others are still running (with 4 short prompts all five could finish first).
    proc = subprocess.Popen([sys.executable, "-m", "core", "sweep", *sweep_flags(run_dir, "0,1,2,3,4"), "--workers", "2",
                             "--batch-size", "2", "--metrics", "ref_nll,rouge_l", "--latency", "off", "--out", str(out),
                             "--max-prompts", "12", "--max-new-tokens", "16"],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not any(e["event"] == "rank_done" for e in runstate.read_events(out)):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else "timeout"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err
    status = runstate.read_status(out)
    assert status["status"] == "cancelled" and 1 <= len(status["ranks_done"]) < 5
    kept = {int(p.stem.split("_")[1]) for p in (out / "ranks").glob("rank_*.json")}
    assert kept == set(status["ranks_done"])
    assert {int(r["rank"]) for r in read_csv(out / "summary.csv")} == kept

    # Resume in this process (what a sharded start does with the ranks left is the test above).
    resumed = run_sweep(SweepConfig(run="", prompts="", out=str(out)), resume=True)
    assert resumed.status == "completed"
    assert [int(r["rank"]) for r in read_csv(out / "summary.csv")] == [0, 1, 2, 3, 4]
    resumed = [e for e in runstate.read_events(out) if e["event"] == "start"][-1]
    assert sorted(resumed["todo"]) == sorted({0, 1, 2, 3, 4} - kept)


def test_more_workers_than_ranks_uses_one_per_rank_and_says_so(run_dir, tmp_path, cli_in_process):
    workers = min(cpu_cores(), 3)
    code, err = cli_in_process("sweep", *sweep_flags(run_dir, "1"), "--workers", str(workers), "--latency", "off",
                               "--out", str(tmp_path / "sweep"))
    assert code == 0, err
    assert f"{workers} workers asked for 1 rank to measure: using 1 (one per rank)" in err or workers == 1
    assert [int(r["rank"]) for r in read_csv(tmp_path / "sweep" / "summary.csv")] == [1]


@pytest.mark.parametrize("workers,message", [(cpu_cores() + 1, "more than this machine has"), (0, "positive integer")])
def test_more_workers_than_cores_is_refused_before_anything_starts(workers, message, run_dir, tmp_path, cli_in_process):
    code, err = cli_in_process("sweep", *sweep_flags(run_dir), "--workers", str(workers), "--out", str(tmp_path / "sweep"))
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "sweep").exists()


def test_a_crashed_worker_fails_the_sweep_and_names_it(run_dir, tmp_path, monkeypatch):
    """A worker that dies with a rank in hand: the sweep is recorded failed, naming the worker; resume can follow."""
    import core.evaluation.sharded as sharded

    real = sharded.WorkerPool._assign
    handed = []

    def assign_then_kill_the_second(pool, worker, todo):
        real(pool, worker, todo)
        if worker.rank is not None:
            handed.append(worker.rank)
        if len(handed) == 2 and worker.rank == handed[1]:
            worker.proc.kill()

    monkeypatch.setattr(sharded.WorkerPool, "_assign", assign_then_kill_the_second)
    monkeypatch.setattr(sharded.distributed, "check_parallel", lambda *a: None)  # runs on one core too
    cfg = SweepConfig(run=str(run_dir), prompts=str(EVAL), out=str(tmp_path / "sweep"), ranks=[1, 2], max_prompts=2,
                      max_new_tokens=4, latency=False, metrics=["ref_nll"], n_bootstrap=50)
    with pytest.raises(sharded.WorkerFailed, match="sweep worker 1 failed"):
        run_sweep(cfg, workers=2)
    status = runstate.read_status(tmp_path / "sweep")
    assert status["status"] == "failed" and "sweep worker 1" in status["error"]


def test_the_report_says_when_speed_was_measured_by_several_workers():
    import pandas as pd

    from core.evaluation.report import _conditions

    summary = pd.DataFrame({"ms_per_token": [12.0], "latency_runs": [3]})
    meta = {"run_meta": {"model": {"device": "cpu", "quant": "nf4", "compute_dtype": "float32"}, "workers": 2}}
    assert any("2 sweep workers at once, sharing the CPU cores" in item for item in _conditions(meta, {}, summary, 8))
    meta["run_meta"].pop("workers")
    assert not any("workers" in item for item in _conditions(meta, {}, summary, 8))
