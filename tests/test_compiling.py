"""TrainConfig.compile: compiled decoder layers train as the eager ones do, and a machine that cannot compile is told so."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from core import compiling
from core.errors import UserError
from core.qdylora import qdylora_layers
from core.train import Trainer, train
from tests.test_train import tiny_cfg


def _trainer(model_dir, data, out, **overrides) -> Trainer:
    # dropout 0: compiled code draws its random numbers its own way, so with dropout the two would differ by design.
    trainer = Trainer(tiny_cfg(model_dir, data, out, r_max=4, rank_sampling="list", rank_list=[2], dropout=0.0, **overrides))
    trainer.setup()
    return trainer


@pytest.mark.skipif(compiling.compiler_problem("cpu") is not None, reason="no C++ compiler on this machine")
def test_compiled_layers_train_exactly_like_eager_ones(tiny_model_dir, small_train_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))   # a first run's compile, not a cached one
    eager = _trainer(tiny_model_dir, small_train_file, tmp_path / "eager")
    compiled = _trainer(tiny_model_dir, small_train_file, tmp_path / "compiled", compile=True)
    try:
        assert compiled.execution()["compiled_layers"] == len(compiled.model.get_decoder().layers) > 0
        assert eager.execution()["compiled_layers"] == 0
        for trainer in (eager, compiled):   # the per-row scales (α/i, the default) are part of what is compiled
            assert next(iter(qdylora_layers(trainer.model).values())).row_scale(2) is not None
        for step in range(2):               # two micro-batches of different widths
            losses = []
            for trainer in (eager, compiled):
                losses.append(trainer.train_step(2)[0])
                trainer.step += 1
            assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-6)
        ours, theirs = qdylora_layers(eager.model), qdylora_layers(compiled.model)
        for name, layer in ours.items():
            torch.testing.assert_close(theirs[name].lora_A, layer.lora_A, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(theirs[name].lora_B, layer.lora_B, rtol=1e-4, atol=1e-6)
            assert not torch.equal(layer.lora_B[:, :2], torch.zeros_like(layer.lora_B[:, :2]))   # it did learn
        from torch._dynamo.utils import counters

        assert counters["stats"]["unique_graphs"] >= 1     # the compiled side did run compiled code
        # The state dict keeps its names, so checkpoints and the saved adapter are those of an eager run.
        assert set(compiled.model.state_dict()) == set(eager.model.state_dict())
    finally:
        eager.cleanup()
        compiled.cleanup()


def test_compile_without_a_compiler_is_refused_before_anything_is_written(tiny_model_dir, small_train_file, tmp_path, monkeypatch):
    monkeypatch.setattr(compiling.shutil, "which", lambda name: None)
    out = tmp_path / "run"
    with pytest.raises(UserError, match="C\\+\\+ compiler"):
        train(tiny_cfg(tiny_model_dir, small_train_file, out, compile=True))
    assert not out.exists()


def test_a_model_without_decoder_layers_cannot_be_compiled():
    with pytest.raises(UserError, match="layers"):
        compiling.compile_decoder_layers(nn.Linear(4, 4))


def test_compile_is_off_unless_asked_and_kept_in_the_saved_config():
    from core.train_config import TrainConfig

    cfg = TrainConfig(data="d.jsonl", out="o")
    assert cfg.compile is False
    assert TrainConfig.from_dict(cfg.to_dict() | {"compile": True}).compile is True
