"""Training runs on a tiny random model: run folder, determinism, cancel and resume."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from core import runstate
from core.errors import DataError, UserError
from core.train import BatchOrder, TrainConfig, lr_lambda, train


def tiny_cfg(model_dir, data, out, **overrides) -> TrainConfig:
    values = dict(data=str(data), out=str(out), model=str(model_dir), quant="none", r_max=8, steps=4,
                  batch_size=2, checkpoint_every=2, max_length=64, lr=1e-3, warmup_ratio=0.0)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, small_train_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    events = []
    result = train(tiny_cfg(tiny_model_dir, small_train_file, out), on_event=events.append)
    return out, result, events


def test_run_folder_holds_what_it_promises(finished_run):
    out, result, events = finished_run
    assert result.status == "completed" and result.steps_done == 4
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["r_max"] == 8 and config["qdylora"]["alpha"] == 16.0
    assert config["model"]["quant"] == "none" and config["model"]["compute_dtype"] == "float32"
    assert runstate.read_status(out)["status"] == "completed"
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert all({"loss", "rank", "lr", "tokens_per_s", "eta_s", "mem_mb", "total_steps"} <= set(e) for e in steps)
    assert runstate.read_events(out)[-1] == {**events[-1]}
    histogram = json.loads((out / "rank_histogram.json").read_text())
    assert sum(histogram.values()) == 4
    assert sorted(int(b) for b in histogram) == sorted({e["rank"] for e in steps})
    adapter = load_file(str(out / "adapter" / "adapter.safetensors"))
    assert adapter and all(t.shape[0] == 8 or t.shape[1] == 8 for t in adapter.values())
    # B moved away from zero: the adapter learned something.
    assert any(t.abs().sum() > 0 for k, t in adapter.items() if k.endswith("lora_B"))
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.bin")) and not list(out.rglob("*.pkl"))
    report = json.loads((out / "data_report.json").read_text())
    assert report["examples_used"] == 12 and report["truncated"] == 0


def test_cancel_then_resume_equals_uninterrupted(tiny_model_dir, small_train_file, tmp_path):
    straight = train(tiny_cfg(tiny_model_dir, small_train_file, tmp_path / "straight", steps=6))
    calls = {"n": 0}

    def stop_after_three_steps():
        calls["n"] += 1
        return calls["n"] > 3

    cut = tmp_path / "cut"
    first = train(tiny_cfg(tiny_model_dir, small_train_file, cut, steps=6), should_stop=stop_after_three_steps)
    assert first.status == "cancelled" and first.steps_done == 3
    assert runstate.read_status(cut)["status"] == "cancelled"
    resumed = train(TrainConfig(data="", out=str(cut)), resume=True)
    assert resumed.status == "completed" and resumed.steps_done == 6
    a = load_file(str(straight.run_dir / "adapter" / "adapter.safetensors"))
    b = load_file(str(cut / "adapter" / "adapter.safetensors"))
    for key in a:
        assert (a[key] - b[key]).abs().max() < 1e-6, key
    assert json.loads((cut / "rank_histogram.json").read_text()) == json.loads((straight.run_dir / "rank_histogram.json").read_text())


def test_bad_data_leaves_no_run_folder(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": \n')
    with pytest.raises(DataError, match="line 2"):
        train(tiny_cfg(tiny_model_dir, bad, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_non_empty_output_folder_is_refused(tiny_model_dir, small_train_file, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="already holds files"):
        train(tiny_cfg(tiny_model_dir, small_train_file, out))
    assert (out / "keep.txt").read_text() == "precious" and len(list(out.iterdir())) == 1


def test_unknown_model_path_is_refused_before_anything_is_written(small_train_file, tmp_path):
    with pytest.raises(UserError, match="neither"):
        train(tiny_cfg(tmp_path / "no-such-model", small_train_file, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides,message", [
    ({"steps": 0}, "steps"), ({"lr": 2.0}, "lr"), ({"r_max": 0}, "r_max"), ({"quant": "int3"}, "quantization"),
    ({"rank_sampling": "zipf"}, "rank_sampling"), ({"batch_size": 0, "max_length": 4}, "batch_size.*max_length"),
])
def test_config_validation_names_every_problem(overrides, message, tmp_path):
    with pytest.raises(UserError, match=message):
        tiny_cfg("m", "d", tmp_path, **overrides)


def test_batch_order_is_deterministic_and_covers_each_epoch():
    order = BatchOrder(n_examples=5, batch_size=2, seed=3)
    stream = [i for k in range(5) for i in order.indices(k)]  # two epochs
    assert sorted(stream[:5]) == list(range(5)) and sorted(stream[5:10]) == list(range(5))
    assert stream == [i for k in range(5) for i in BatchOrder(5, 2, 3).indices(k)]


def test_lr_schedules():
    constant = lr_lambda("constant", 100, 10)
    assert constant(0) == pytest.approx(0.1) and constant(9) == 1.0 and constant(50) == 1.0
    linear = lr_lambda("linear", 100, 0)
    assert linear(0) == 1.0 and linear(50) == pytest.approx(0.5)
    cosine = lr_lambda("cosine", 100, 0)
    assert cosine(100) == pytest.approx(0.0, abs=1e-9)


def test_a_crash_mid_run_is_recorded_as_failed_with_the_traceback_in_the_log(tiny_model_dir, small_train_file, tmp_path, monkeypatch):
    from core.train import Trainer

    def explode(self, rank):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(Trainer, "train_step", explode)
    with pytest.raises(RuntimeError):
        train(tiny_cfg(tiny_model_dir, small_train_file, tmp_path / "run"))
    status = runstate.read_status(tmp_path / "run")
    assert status["status"] == "failed" and status["error"] == "RuntimeError: simulated kernel failure"
    assert "Traceback" in (tmp_path / "run" / "train.log").read_text()
    assert runstate.read_events(tmp_path / "run")[-1]["status"] == "failed"


def test_training_at_one_fixed_rank_equals_a_peft_lora_run_of_that_rank(tiny_model_dir, small_train_file, tmp_path):
    """The control behind bench/rank_search: b fixed at 2 of r_max 4 must train exactly like PEFT LoRA r=2
    (same first rows, scale alpha/2, same batches and AdamW), and rows 3-4 must not move."""
    import torch
    from peft import LoraConfig, get_peft_model

    from core.models import load_base_model
    from core.qdylora import qdylora_layers
    from core.train import Trainer

    cfg = tiny_cfg(tiny_model_dir, small_train_file, tmp_path / "run", r_max=4, rank_sampling="list", rank_list=[2],
                   dropout=0.0, steps=3, max_grad_norm=0.3, weight_decay=0.01)
    trainer = Trainer(cfg)
    trainer.setup()
    ours = qdylora_layers(trainer.model)
    for layer in ours.values():  # B starts at zero; give it values so the first step is not trivially equal
        torch.nn.init.normal_(layer.lora_B, std=0.02)
    initial = {name: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone()) for name, layer in ours.items()}

    base, _, _ = load_base_model(cfg.model_spec())
    twin = get_peft_model(base, LoraConfig(r=2, lora_alpha=cfg.alpha, lora_dropout=0.0, bias="none",
                                           target_modules=sorted({n.rsplit(".", 1)[-1] for n in ours})))
    peft_layers = {name: twin.get_submodule("base_model.model." + name) for name in ours}
    with torch.no_grad():
        for name, (a, b) in initial.items():
            peft_layers[name].lora_A["default"].weight.copy_(a[:2])
            peft_layers[name].lora_B["default"].weight.copy_(b[:, :2])
    params = [p for p in twin.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    for step in range(cfg.steps):
        batch = trainer._micro_batch(step)
        our_loss, _ = trainer.train_step(2)
        trainer.step += 1
        twin.train()
        optimizer.zero_grad(set_to_none=True)
        loss = twin(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        assert our_loss == pytest.approx(loss.item(), rel=1e-5, abs=1e-6)
    for name, layer in ours.items():
        torch.testing.assert_close(layer.lora_A[:2], peft_layers[name].lora_A["default"].weight, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.lora_B[:, :2], peft_layers[name].lora_B["default"].weight, rtol=1e-4, atol=1e-6)
        assert torch.equal(layer.lora_A[2:], initial[name][0][2:]) and torch.equal(layer.lora_B[:, 2:], initial[name][1][:, 2:])
        assert not torch.equal(layer.lora_A[:2], initial[name][0][:2])
    trainer.cleanup()
