"""Training runs on a tiny random model: run folder, determinism, cancel and resume."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from core import runstate
from core.errors import DataError, UserError
from core.train import BatchOrder, TrainConfig, lr_lambda, train


def tiny_cfg(model_dir, data, out, **overrides) -> TrainConfig:
    # method qdylora: these tests are about rank sampling, which the default (svd) does not do.
    values = dict(data=str(data), out=str(out), model=str(model_dir), quant="none", r_max=8, steps=4, method="qdylora",
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


def test_an_unset_lr_schedule_follows_the_run_length_and_is_saved_resolved():
    from core.train_config import LINEAR_DECAY_FROM_STEPS, TrainConfig

    short, long_ = LINEAR_DECAY_FROM_STEPS - 1, LINEAR_DECAY_FROM_STEPS
    assert TrainConfig(data="d", out="o", steps=short).lr_schedule == "constant"      # bench/README.md §6.11
    assert TrainConfig(data="d", out="o", steps=long_).lr_schedule == "linear"
    assert TrainConfig(data="d", out="o", steps=long_, lr_schedule="constant").lr_schedule == "constant"
    cfg = TrainConfig(data="d", out="o", steps=long_)
    assert TrainConfig.from_dict(cfg.to_dict()).lr_schedule == "linear"
    args = cfg.cli_args()
    assert "--lr-schedule" in args and args[args.index("--lr-schedule") + 1] == "linear"
    # a run saved before the rule existed trained at a constant lr, whatever its length
    old = {k: v for k, v in cfg.to_dict().items() if k != "lr_schedule"}
    assert TrainConfig.from_dict(old).lr_schedule == "constant"
    with pytest.raises(UserError, match="lr_schedule"):
        TrainConfig(data="d", out="o", lr_schedule="step")
    with pytest.raises(UserError, match="steps must be a positive integer") as bad_steps:
        TrainConfig(data="d", out="o", steps="many")
    assert "lr_schedule" not in str(bad_steps.value)      # one mistake, one message


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
                   dropout=0.0, steps=3, max_grad_norm=0.3, weight_decay=0.01, scale="alpha/b")
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


# --- several ranks per step, the sandwich rule, SVD truncation, refine (issue 9) ---

def test_several_ranks_per_step_train_each_group_at_its_rank(tiny_model_dir, small_train_file, tmp_path):
    events = []
    result = train(tiny_cfg(tiny_model_dir, small_train_file, tmp_path / "run", batch_size=4, ranks_per_step=4,
                            scale="alpha/sqrt(b)", rank_sampling="uniform"), on_event=events.append)
    assert result.status == "completed"
    steps = [e for e in events if e["event"] == "step"]
    assert all(len(e["ranks"]) == 4 and e["rank"] == max(e["ranks"]) for e in steps)
    assert all([(b - 1) // 2 for b in e["ranks"]] == [0, 1, 2, 3] for e in steps)  # one per quarter of 1..8
    histogram = json.loads((tmp_path / "run" / "rank_histogram.json").read_text())
    assert sum(histogram.values()) == 4 * 4
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["qdylora"]["ranks_per_step"] == 4 and config["qdylora"]["scale"] == "alpha/sqrt(b)"


def test_ranks_per_step_cannot_exceed_the_examples_of_a_step(tmp_path):
    with pytest.raises(UserError, match="ranks_per_step"):
        tiny_cfg("m", "d", tmp_path, batch_size=2, grad_accum=1, ranks_per_step=3)


def test_step_ranks_split_the_step_examples_into_groups(tiny_model_dir, small_train_file, tmp_path):
    from core.train import Trainer

    trainer = Trainer(tiny_cfg(tiny_model_dir, small_train_file, tmp_path / "run", batch_size=3, grad_accum=2, ranks_per_step=3))
    assert trainer.step_ranks([1, 5, 8]) == [[1, 1, 5], [5, 8, 8]]
    assert trainer.step_ranks([6]) == [[6, 6, 6], [6, 6, 6]]


@pytest.mark.parametrize("extra,distill", [("max", 0.0), ("min_max", 0.5)])
def test_sandwich_rule_trains_every_row_each_step(tiny_model_dir, small_train_file, tmp_path, extra, distill):
    import torch

    from core.qdylora import qdylora_layers
    from core.train import Trainer

    cfg = tiny_cfg(tiny_model_dir, small_train_file, tmp_path / "run", rank_sampling="list", rank_list=[2],
                   extra_ranks=extra, distill=distill, dropout=0.0)
    trainer = Trainer(cfg)
    trainer.setup()
    layer = next(iter(qdylora_layers(trainer.model).values()))
    before = layer.lora_B.detach().clone()  # B starts at zero, so the first step moves B (A's gradient is zero)
    loss, _ = trainer.train_step([2])
    moved = (layer.lora_B.detach() - before).abs().sum(dim=0) > 0
    assert bool(moved.all()), "the r_max pass must train rows beyond the sampled rank"
    assert loss > 0 and torch.isfinite(torch.tensor(loss))
    trainer.cleanup()


@pytest.mark.parametrize("row_steps", ["hold", "momentum", "balanced"])
def test_the_row_steps_rule_decides_whether_rows_above_the_step_rank_move(tiny_model_dir, small_train_file, tmp_path, row_steps):
    import json

    from core.qdylora import qdylora_layers
    from core.train import Trainer

    cfg = tiny_cfg(tiny_model_dir, small_train_file, tmp_path / "run", dropout=0.0, row_steps=row_steps)
    trainer = Trainer(cfg)
    trainer.setup()
    layer = next(iter(qdylora_layers(trainer.model).values()))
    trainer.train_step([8])                   # every row gets momentum
    before = layer.lora_B.detach().clone()
    trainer.train_step([2])
    moved_above = bool((layer.lora_B.detach()[:, 2:] != before[:, 2:]).any())
    assert moved_above == (row_steps != "hold")
    assert bool((layer.lora_B.detach()[:, :2] != before[:, :2]).any())
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["row_steps"] == row_steps and saved["qdylora"]["row_steps"] == row_steps
    trainer.cleanup()


def test_distillation_loss_is_zero_for_identical_predictions_and_positive_otherwise():
    import torch

    from core.train import distillation_loss

    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, -100, -100]])
    assert distillation_loss(logits, logits, labels).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(logits, torch.randn(2, 5, 11), labels).item() > 0


def _completed_run(tiny_model_dir, small_train_file, out, **overrides):
    from tests.helpers import randomize_adapter_b

    train(tiny_cfg(tiny_model_dir, small_train_file, out, steps=1, **overrides))
    randomize_adapter_b(out)
    return out


def test_svd_run_serves_each_rank_as_the_best_approximation_of_its_update(tiny_model_dir, small_train_file, tmp_path):
    import torch

    from core.qdylora import qdylora_layers
    from core.runs import load_run

    run = _completed_run(tiny_model_dir, small_train_file, tmp_path / "run", method="svd", scale="alpha/sqrt(b)")
    config = json.loads((run / "config.json").read_text())
    assert config["qdylora"]["rank_list"] == [8] and config["qdylora"]["method"] == "svd"
    assert json.loads((run / "rank_histogram.json").read_text()) == {"8": 1}
    raw = load_file(str(run / "adapter" / "adapter.safetensors"))
    loaded = load_run(run)
    assert loaded.qcfg.scale == "constant"
    for name, layer in list(qdylora_layers(loaded.model).items())[:3]:
        full = (16.0 / 8 ** 0.5) * raw[f"{name}.lora_B"].double() @ raw[f"{name}.lora_A"].double()
        u, s, vh = torch.linalg.svd(full, full_matrices=False)
        for b in (1, 3, 8):
            best = (u[:, :b] * s[:b]) @ vh[:b]
            torch.testing.assert_close(layer.delta_weight(b).double(), best, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("parent_kwargs", [{"scale": "constant"}, {"scale": "alpha/b"}, {"method": "svd"}, {"scale": "alpha/i"}],
                         ids=["constant", "alpha_b", "svd", "alpha_i"])
def test_refine_starts_from_exactly_the_parent_rank(tiny_model_dir, small_train_file, tmp_path, parent_kwargs):
    import torch

    from core.qdylora import inject_qdylora, set_rank
    from core.qdylora.inject import load_adapter_state_dict
    from core.refine import refine_config, warm_start_state
    from core.runs import encode_prompts, load_run

    parent = _completed_run(tiny_model_dir, small_train_file, tmp_path / "parent", **parent_kwargs)
    cfg = refine_config(parent, 3, steps=2, out=tmp_path / "refined", lr=5e-4)
    assert (cfg.r_max, cfg.rank_list, cfg.init_rank, cfg.lr, cfg.steps) == (3, [3], 3, 5e-4, 2)
    # unless asked, polishing takes the parent's lr capped at REFINE_LR (the full lr first undoes the cut)
    config = json.loads((parent / "config.json").read_text())
    for parent_lr, expected in ((3e-3, 1e-3), (1e-4, 1e-4)):
        config["train"]["lr"] = parent_lr
        (parent / "config.json").write_text(json.dumps(config))
        assert refine_config(parent, 3, steps=2, out=tmp_path / "unused").lr == expected
    # a long parent's linear decay is not inherited: the polish run's schedule follows its own length
    config["train"]["lr_schedule"] = "linear"
    (parent / "config.json").write_text(json.dumps(config))
    assert refine_config(parent, 3, steps=20, out=tmp_path / "unused").lr_schedule == "constant"
    assert refine_config(parent, 3, steps=150, out=tmp_path / "unused").lr_schedule == "linear"
    assert refine_config(parent, 3, steps=20, out=tmp_path / "unused", lr_schedule="cosine").lr_schedule == "cosine"
    # ... and a parent that ended at lr 0 is polished more gently
    for parent_lr, expected in ((3e-3, 3e-4), (1e-4, 1e-4)):
        config["train"]["lr"] = parent_lr
        (parent / "config.json").write_text(json.dumps(config))
        assert refine_config(parent, 3, steps=2, out=tmp_path / "unused").lr == expected
    ours = load_run(parent)
    set_rank(ours.model, 3)
    from core.models import load_base_model

    fresh, tokenizer, _ = load_base_model(cfg.model_spec())
    inject_qdylora(fresh, cfg.qdylora_config())
    load_adapter_state_dict(fresh, warm_start_state(parent, 3, cfg.qdylora_config()))
    fresh.eval()
    batch = encode_prompts(tokenizer, ["What is item 3?"], "cpu")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, ours.model(**batch).logits, atol=1e-5, rtol=1e-5)
    result = train(cfg)
    assert result.status == "completed"
    refined = json.loads((tmp_path / "refined" / "config.json").read_text())
    assert refined["train"]["init_from"] == str(parent) and refined["qdylora"]["r_max"] == 3


def test_refine_refuses_bad_requests_before_writing_anything(tiny_model_dir, small_train_file, tmp_path):
    from core.refine import refine_config

    parent = _completed_run(tiny_model_dir, small_train_file, tmp_path / "parent")
    for rank in (0, 9):
        with pytest.raises(UserError, match="1..8"):
            refine_config(parent, rank, steps=2, out=tmp_path / "new")
    cut = tmp_path / "cut"
    train(tiny_cfg(tiny_model_dir, small_train_file, cut, steps=4), should_stop=lambda: True)
    with pytest.raises(UserError, match="has not finished"):
        train(refine_config(cut, 2, steps=2, out=tmp_path / "new"))
    assert not (tmp_path / "new").exists()


def test_refine_reads_the_adapter_where_training_writes_it():
    from core.qdylora.inject import ADAPTER_FILE
    from core.refine import ADAPTER_PATH
    from core.train import ADAPTER_DIR

    assert ADAPTER_PATH == (ADAPTER_DIR, ADAPTER_FILE)


def test_a_refine_run_killed_before_its_first_checkpoint_resumes_warm(tiny_model_dir, small_train_file, tmp_path):
    """A resumed run without a checkpoint starts again at step 0; a refine run must then start
    from its parent's rank again, and end exactly where an uninterrupted one ends."""
    import shutil

    from core.refine import refine_config

    parent = _completed_run(tiny_model_dir, small_train_file, tmp_path / "parent")
    whole = tmp_path / "whole"
    train(refine_config(parent, 3, steps=2, out=whole, lr=5e-4))
    killed = tmp_path / "killed"
    shutil.copytree(whole, killed)          # a run that died before it saved anything but its config
    for leftover in ("checkpoint", "adapter", "rank_histogram.json", "progress.jsonl", "data_report.json"):
        path = killed / leftover
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    runstate.write_status(killed, "failed", step=0, total_steps=2)
    saved = json.loads((killed / "config.json").read_text())["train"]
    result = train(TrainConfig.from_dict(saved | {"out": str(killed)}), resume=True)
    assert result.status == "completed" and result.steps_done == 2
    expected, got = (load_file(str(run / "adapter" / "adapter.safetensors")) for run in (whole, killed))
    assert expected.keys() == got.keys()
    for key in expected:
        assert expected[key].equal(got[key]), key


def test_the_torch_free_run_config_check_names_the_resolved_model_fields():
    from dataclasses import fields

    from core.models import ResolvedModel
    from core.train_config import RESOLVED_MODEL_FIELDS

    assert tuple(f.name for f in fields(ResolvedModel)) == RESOLVED_MODEL_FIELDS
