"""Data-parallel training through Accelerate on CPU (gloo): N processes train what one process trains."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from core import runstate
from core.distributed import DistContext, cpu_cores
from core.train import TrainConfig, Trainer, train
from tests.helpers import ROOT, run_cli

two_cores = pytest.mark.skipif(cpu_cores() < 2, reason="two training processes need two CPU cores")


def flags(model_dir, data, **overrides) -> list[str]:
    """CLI flags of a tiny float32 run without dropout: the setting in which processes must not matter."""
    values = dict(data=str(data), model=str(model_dir), quant="none", device="cpu", r_max=8, steps=4, batch_size=4, method="qdylora",
                  checkpoint_every=2, max_length=64, lr=1e-3, warmup_ratio=0.0, dropout=0.0)
    values.update(overrides)
    return TrainConfig(out="unused", **values).cli_args()


def config_from_flags(args: list[str], out) -> TrainConfig:
    from core.cli import build_parser, train_config_from_args

    return train_config_from_args(build_parser().parse_args(["train", *args, "--out", str(out)]), out=str(out))


def max_adapter_diff(run_a, run_b) -> float:
    a = load_file(str(run_a / "adapter" / "adapter.safetensors"))
    b = load_file(str(run_b / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def step_events(run_dir) -> list[dict]:
    return [e for e in runstate.read_events(run_dir) if e["event"] == "step"]


@two_cores
def test_two_processes_with_several_ranks_per_step_train_the_adapter_of_one(tiny_model_dir, small_train_file, tmp_path):
    """2 processes × 2 examples = 1 process × 4 examples, with 4 ranks per step over 2 micro-batches,
    the sandwich pass at r_max and distillation: each example keeps the rank its global index gives it."""
    args = flags(tiny_model_dir, small_train_file, ranks_per_step=4, grad_accum=2, extra_ranks="max", distill=0.5,
                 steps=3)
    one = train(config_from_flags(args, tmp_path / "one"))
    assert one.status == "completed"
    res = run_cli("train", *args, "--processes", "2", "--out", str(tmp_path / "two"), "--no-progress")
    assert res.returncode == 0, res.stderr
    assert max_adapter_diff(tmp_path / "one", tmp_path / "two") <= 1e-4

    two_steps, one_steps = step_events(tmp_path / "two"), step_events(tmp_path / "one")
    assert [e["ranks"] for e in two_steps] == [e["ranks"] for e in one_steps]
    assert all(len(e["ranks"]) == 4 for e in two_steps)
    assert [e["loss"] for e in two_steps] == pytest.approx([e["loss"] for e in one_steps], rel=1e-5)
    start = runstate.read_events(tmp_path / "two")[0]
    assert start["processes"] == 2 and start["backend"] == "gloo"
    # The run's recipe does not depend on how many processes trained it.
    config = lambda run: json.loads((run / "config.json").read_text())["train"]  # noqa: E731
    assert {k: v for k, v in config(tmp_path / "two").items() if k != "out"} == \
           {k: v for k, v in config(tmp_path / "one").items() if k != "out"}
    # ... and both computed it the fast way: each process packed its slice of every micro-batch (issue 12).
    execution = lambda run: json.loads((run / "config.json").read_text())["execution"]  # noqa: E731
    assert execution(tmp_path / "two")["batching"] == execution(tmp_path / "one")["batching"] == "packed"
    assert execution(tmp_path / "two")["processes"] == 2 and execution(tmp_path / "one")["processes"] == 1
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert json.loads((tmp_path / "two" / "rank_histogram.json").read_text()) == \
           json.loads((tmp_path / "one" / "rank_histogram.json").read_text())
    # One writer: one start, one line per step, one end.
    assert [e["event"] for e in runstate.read_events(tmp_path / "two")] == ["start"] + ["step"] * 3 + ["end"]


def _wait_for_step(run_dir, proc, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if step_events(run_dir):
            return
        if proc.poll() is not None:
            pytest.fail(f"training ended before its first step: {proc.stderr.read()}")
        time.sleep(0.2)
    pytest.fail("no training step within the timeout")


@two_cores
def test_cancelling_the_launcher_stops_every_process_and_resume_continues(tiny_model_dir, small_train_file, tmp_path):
    """SIGTERM to `qdylora train --processes 2` (what the dashboard's cancel sends): all processes stop at the same
    step, the main one saves a checkpoint, exit 130; `--resume` on 2 processes then ends where one uninterrupted
    process ends."""
    args = flags(tiny_model_dir, small_train_file, steps=30, checkpoint_every=100)
    run = tmp_path / "two"
    proc = subprocess.Popen([sys.executable, "-m", "core", "train", *args, "--processes", "2", "--out", str(run),
                             "--no-progress"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_step(run, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err
    status = runstate.read_status(run)
    assert status["status"] == "cancelled" and 1 <= status["step"] < 30, err
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == status["step"]
    last = runstate.read_events(run)[-1]
    assert last["event"] == "end" and last["status"] == "cancelled"

    res = run_cli("train", "--out", str(run), "--resume", "--processes", "2", "--no-progress")
    assert res.returncode == 0, res.stderr
    assert runstate.read_status(run)["status"] == "completed"
    one = train(config_from_flags(args, tmp_path / "one"))
    assert one.steps_done == 30
    assert max_adapter_diff(tmp_path / "one", run) <= 1e-4
    assert [e["ranks"] for e in step_events(run)] == [e["ranks"] for e in step_events(tmp_path / "one")]


@pytest.mark.parametrize("extra,message", [
    (["--processes", str(cpu_cores() + 1)], "more than this machine has"),
    (["--processes", "0"], "positive integer"),
])
def test_more_processes_than_cores_is_refused_before_anything_starts(extra, message, tiny_model_dir, small_train_file,
                                                                     tmp_path, cli_in_process):
    code, err = cli_in_process("train", *flags(tiny_model_dir, small_train_file), *extra, "--out", str(tmp_path / "run"))
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@two_cores
def test_a_batch_that_does_not_divide_by_the_processes_is_refused(tiny_model_dir, small_train_file, tmp_path,
                                                                   cli_in_process):
    code, err = cli_in_process("train", *flags(tiny_model_dir, small_train_file, batch_size=3), "--processes", "2",
                               "--out", str(tmp_path / "run"))
    assert code == 2
    assert "batch size 3 does not divide by --processes 2" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_each_process_takes_its_slice_and_the_ranks_its_global_examples_get(tiny_model_dir, small_train_file, tmp_path):
    """With ranks_per_step 3 over a 6-example step, process 1 of 2 trains examples 3..5 at the ranks of examples 3..5."""
    cfg = config_from_flags(flags(tiny_model_dir, small_train_file, batch_size=6, ranks_per_step=3), tmp_path / "run")
    trainer = Trainer(cfg)
    ranks = trainer.step_ranks([2, 5, 8])
    assert ranks == [[2, 2, 5, 5, 8, 8]]
    assert [DistContext(rank=p, world=2).shard(ranks[0]) for p in (0, 1)] == [[2, 2, 5], [5, 8, 8]]
    assert DistContext().shard([1, 2, 3]) == [1, 2, 3]


def test_loss_shares_of_the_processes_add_up_to_one(tiny_model_dir, small_train_file, tmp_path):
    cfg = config_from_flags(flags(tiny_model_dir, small_train_file, batch_size=4), tmp_path / "run")
    trainer = Trainer(cfg)
    trainer.setup()
    shares = []
    for process in (0, 1):
        trainer.dist = DistContext(rank=process, world=2)
        shares.append(trainer._loss_share(0))
    assert sum(shares) == pytest.approx(1.0) and all(0 < s < 1 for s in shares)
    trainer.dist = DistContext()
    assert trainer._loss_share(0) == 1.0
    trainer.cleanup()


def _draw_and_check(rank: int, world: int, store_path: str, results: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    context = DistContext(rank=rank, world=world)
    context.check_same_ranks([3, 5], "cpu")
    try:
        context.check_same_ranks([3, 5 + rank], "cpu")
    except RuntimeError as exc:
        with open(f"{results}-{rank}", "w") as fh:
            fh.write(str(exc))
    dist.destroy_process_group()


@two_cores
def test_processes_that_draw_different_ranks_are_stopped(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_draw_and_check, args=(2, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2)
    for rank in (0, 1):
        assert "drew different ranks" in (tmp_path / f"out-{rank}").read_text()


def test_paged_adamw_is_refused_without_a_gpu(tiny_model_dir, small_train_file, tmp_path, cli_in_process):
    code, err = cli_in_process("train", *flags(tiny_model_dir, small_train_file, optimizer="paged_adamw"),
                               "--out", str(tmp_path / "run"))
    assert code == 2 and "paged_adamw needs a CUDA GPU" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("variable,engine", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_an_fsdp_or_deepspeed_launch_is_refused_rather_than_run_as_something_else(variable, engine, monkeypatch):
    from core import distributed
    from core.errors import UserError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(variable, "true")
    with pytest.raises(UserError, match=f"asks for {engine}"):
        distributed.context("cpu")


def test_devices_found_honour_cuda_visible_devices(monkeypatch):
    from core import distributed

    monkeypatch.setattr(distributed, "_nvidia_smi_gpus", lambda: ("NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM4-80GB", "NVIDIA L4"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert distributed.find_devices().describe() == "3 GPUs (2 × NVIDIA A100-SXM4-80GB, NVIDIA L4)"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    assert distributed.find_devices() == distributed.Devices("cuda", 2, ("NVIDIA A100-SXM4-80GB",) * 2)
    assert distributed.find_devices().describe() == "2 × NVIDIA A100-SXM4-80GB"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    assert distributed.find_devices().describe() == "1 GPU (NVIDIA L4)"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU visible: the CPU cores
    assert distributed.find_devices() == distributed.Devices("cpu", cpu_cores())


def test_a_process_that_vanished_is_named_before_the_lost_connections_it_caused():
    from core.distributed import failure_notes

    assert failure_notes({}, 2) == []
    assert failure_notes({0: "RuntimeError: Connection reset by peer"}, 3) == [
        "process 1, 2 stopped without an error message (killed, or out of memory?)",
        "process 0: RuntimeError: Connection reset by peer"]
    assert failure_notes({1: "out of memory", 0: "lost"}, 2) == ["process 0: lost", "process 1: out of memory"]
