"""Exported ranks load in plain PEFT and compute exactly what our model computes at that rank."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from core.errors import UserError
from core.export import ExportConfig, export_rank
from core.models import keep_nf4_compute_dtype, quantization_config
from core.qdylora import set_rank
from core.runs import generate, load_run
from core.train import TrainConfig, train
from tests.helpers import randomize_adapter_b

PROMPTS = ["What does the QB-100 cost?", "How long is the warranty on a kettle?"]


# Every scale rule (and the SVD method, used with the constant rule) over both bases.
RULES = [("none", "alpha/b"), ("nf4", "alpha/b"), ("none", "alpha/sqrt(b)"), ("nf4", "alpha/sqrt(b)"),
         ("none", "constant"), ("nf4", "constant"), ("none", "svd"), ("nf4", "svd"), ("none", "alpha/i"), ("nf4", "alpha/i"), ("none", "alpha/i^2")]
# Exported as rows at the constant scale with each row's factor folded into B (truncation.fold_row_scales).
USED_AS_CONSTANT = ("svd", "alpha/i", "alpha/sqrt(i)", "alpha/i^2")


def _random_run(tmp_path_factory, tiny_model_dir, small_train_file, quant, rule):
    method = {"method": "svd"} if rule == "svd" else {"scale": rule}
    out = tmp_path_factory.mktemp(f"run-{quant}-{rule.replace('/', '_')}") / "run"
    train(TrainConfig(data=str(small_train_file), out=str(out), model=str(tiny_model_dir), quant=quant,
                      r_max=8, steps=1, batch_size=2, max_length=64, **method))
    randomize_adapter_b(out)
    return out, quant


@pytest.fixture(scope="module", params=RULES, ids=lambda p: f"{p[0]}-{p[1]}")
def rule_run(request, tiny_model_dir, small_train_file, tmp_path_factory):
    return _random_run(tmp_path_factory, tiny_model_dir, small_train_file, *request.param)


@pytest.fixture(scope="module", params=["none", "nf4"])
def random_run(request, tiny_model_dir, small_train_file, tmp_path_factory):
    return _random_run(tmp_path_factory, tiny_model_dir, small_train_file, request.param, "alpha/b")


def peft_model(base_path, quant, export_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.float32, "device_map": "cpu"}
    if quant == "nf4":
        kwargs["quantization_config"] = quantization_config("nf4", torch.float32)
    base = keep_nf4_compute_dtype(AutoModelForCausalLM.from_pretrained(base_path, **kwargs))
    return PeftModel.from_pretrained(base, str(export_dir)).eval()


def logits(model, tokenizer, prompts):
    from core.runs import encode_prompts

    batch = encode_prompts(tokenizer, prompts, "cpu")
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_peft_reload_gives_the_same_logits_and_text(rule_run, rank, tmp_path):
    run_dir, quant = rule_run
    out = tmp_path / "export"
    card = export_rank(ExportConfig(run=str(run_dir), rank=rank, out=str(out)))
    config = json.loads((out / "adapter_config.json").read_text())
    trained = json.loads((run_dir / "config.json").read_text())["qdylora"]
    expected_alpha = {"alpha/b": 16.0, "alpha/sqrt(b)": 16.0, "constant": 16.0 / 8 ** 0.5 * rank}[card["scale_rule"]]
    assert config["r"] == rank and config["lora_alpha"] == pytest.approx(expected_alpha)
    assert config["use_rslora"] is (card["scale_rule"] == "alpha/sqrt(b)")
    assert card["scale_rule"] == ("constant" if trained["method"] == "svd" or trained["scale"] in USED_AS_CONSTANT else trained["scale"])
    assert card["trained_scale_rule"] == trained["scale"]
    assert config["peft_type"] == "LORA"
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in weights)
    assert card["adapter_params"] == sum(t.numel() for t in weights.values())
    assert card["file_sizes"]["adapter_model.safetensors"] > card["adapter_params"] * 4  # not an empty file
    # The card: one loading snippet naming this folder, and what changes off the NF4 base.
    md = (out / "rank_card.md").read_text()
    assert f"ADAPTER = {out.name!r}" in card["snippet"] and md.count("PeftModel.from_pretrained(base, ADAPTER)") == 1
    assert ("measured on the 4-bit NF4 base" in md) == (quant == "nf4")
    assert (f"trained with the per-row rule {trained['scale']}" in md) == (trained["scale"] in ("alpha/i", "alpha/sqrt(i)", "alpha/i^2"))

    ours = load_run(run_dir)
    set_rank(ours.model, rank)
    theirs = peft_model(config["base_model_name_or_path"], quant, out)
    ours_logits = logits(ours.model, ours.tokenizer, PROMPTS)
    theirs_logits = logits(theirs, ours.tokenizer, PROMPTS)
    set_rank(ours.model, 0)
    base_logits = logits(ours.model, ours.tokenizer, PROMPTS)
    assert (ours_logits - base_logits).abs().max() > 1e-3, "the adapter must matter for this test to mean anything"
    assert (ours_logits - theirs_logits).abs().max() <= 1e-4
    set_rank(ours.model, rank)
    assert generate(ours.model, ours.tokenizer, PROMPTS, max_new_tokens=12) == generate(theirs, ours.tokenizer, PROMPTS, max_new_tokens=12)


def test_merged_weights_compute_the_same_function(rule_run, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir, quant = rule_run
    out = tmp_path / "export"
    card = export_rank(ExportConfig(run=str(run_dir), rank=4, out=str(out), merge=True, merge_dtype="float32"))
    assert card["merged"] and "merged/model.safetensors" in card["file_sizes"]
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    ours = load_run(run_dir)
    set_rank(ours.model, 4)
    diff = (logits(ours.model, ours.tokenizer, PROMPTS) - logits(merged, ours.tokenizer, PROMPTS)).abs().max()
    assert diff <= 1e-4
    assert (out / "rank_card.md").read_text().startswith("# Rank card")


def test_export_refuses_bad_requests_and_writes_nothing(random_run, tmp_path):
    run_dir, _ = random_run
    with pytest.raises(UserError, match="base model itself"):
        export_rank(ExportConfig(run=str(run_dir), rank=0, out=str(tmp_path / "a")))
    with pytest.raises(UserError, match="0 .*r_max=8"):
        export_rank(ExportConfig(run=str(run_dir), rank=9, out=str(tmp_path / "b")))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep")
    with pytest.raises(UserError, match="already holds files"):
        export_rank(ExportConfig(run=str(run_dir), rank=2, out=str(busy)))
    with pytest.raises(UserError, match="not a training run"):
        export_rank(ExportConfig(run=str(tmp_path), rank=2, out=str(tmp_path / "c")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
    assert [p.name for p in busy.iterdir()] == ["x"]
