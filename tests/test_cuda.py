"""The CUDA path: skipped without a GPU (CI has none), run on a GPU machine with `pytest tests/test_cuda.py`.

Written for docs/SCALING.md's checklist; as of this commit it has never run (no GPU was
available). On CUDA the compute dtype is bf16, so equality across processes is looser than
the float32 CPU check of tests/test_distributed.py.
"""
from __future__ import annotations

import pytest
import torch

from core import runstate
from core.train import TrainConfig, train
from tests.helpers import run_cli
from tests.test_distributed import config_from_flags, flags, max_adapter_diff, step_events

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("quant,optimizer", [("nf4", "adamw"), ("nf4", "paged_adamw"), ("none", "adamw")])
def test_training_on_one_gpu(quant, optimizer, tiny_model_dir, small_train_file, tmp_path):
    cfg = TrainConfig(data=str(small_train_file), out=str(tmp_path / "run"), model=str(tiny_model_dir), quant=quant,
                      device="cuda", optimizer=optimizer, r_max=8, steps=4, batch_size=4, max_length=64,
                      checkpoint_every=2)
    result = train(cfg)
    assert result.status == "completed"
    start = runstate.read_events(tmp_path / "run")[0]
    assert start["device"] == "cuda" and all(e["mem_mb"] > 0 for e in step_events(tmp_path / "run"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_train_what_one_gpu_trains(tiny_model_dir, small_train_file, tmp_path):
    args = [*flags(tiny_model_dir, small_train_file, ranks_per_step=2), "--device", "cuda"]
    one = train(config_from_flags(args, tmp_path / "one"))
    assert one.status == "completed"
    res = run_cli("train", *args, "--processes", "2", "--out", str(tmp_path / "two"), "--no-progress")
    assert res.returncode == 0, res.stderr
    assert runstate.read_events(tmp_path / "two")[0]["backend"] == "nccl"
    assert [e["ranks"] for e in step_events(tmp_path / "two")] == [e["ranks"] for e in step_events(tmp_path / "one")]
    assert [e["loss"] for e in step_events(tmp_path / "two")] == pytest.approx(
        [e["loss"] for e in step_events(tmp_path / "one")], rel=2e-2)
    assert max_adapter_diff(tmp_path / "one", tmp_path / "two") <= 1e-3


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_sweep_with_one_worker_per_gpu(tiny_model_dir, small_train_file, tmp_path):
    from tests.test_sharded_sweep import sweep_flags

    run = tmp_path / "run"
    train(TrainConfig(data=str(small_train_file), out=str(run), model=str(tiny_model_dir), quant="nf4", device="cuda",
                      r_max=4, steps=1, batch_size=2, max_length=64))
    res = run_cli("sweep", *sweep_flags(run), "--workers", "2", "--out", str(tmp_path / "sweep"))
    assert res.returncode == 0, res.stderr
    events = runstate.read_events(tmp_path / "sweep")
    assert events[0]["workers"] == 2 and events[-1]["status"] == "completed"
