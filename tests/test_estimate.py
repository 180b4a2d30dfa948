"""core.estimate: the calibration points it was built from, and how it scales."""
from __future__ import annotations

import json

import pytest

from core.estimate import DEFAULT_SHAPE, ModelShape, estimate_training, format_duration, model_shape

SMOL = ModelShape.from_config(DEFAULT_SHAPE)


def test_default_model_shape_matches_smollm2():
    assert SMOL.params == pytest.approx(134.5e6, rel=0.01)       # LlamaForCausalLM, tied embeddings
    assert SMOL.adapter_params(16) == 4_884_480                   # what training reports at r_max=16


@pytest.mark.parametrize("quant, low, high", [("nf4", 4.8, 6.0), ("none", 3.8, 5.0)])
def test_seconds_per_step_match_the_measured_cpu_numbers(quant, low, high):
    est = estimate_training(SMOL, quant=quant, r_max=16, batch_size=4, max_length=128, steps=10)
    assert low <= est.seconds_per_step <= high


@pytest.mark.parametrize("quant, mb", [("nf4", 168), ("none", 538)])
def test_weight_footprint_matches_the_measured_sizes(quant, mb):
    est = estimate_training(SMOL, quant=quant, r_max=16, batch_size=4, max_length=128, steps=10)
    assert est.memory_parts["base weights"] * 2**20 / 1e6 == pytest.approx(mb, rel=0.05)


def test_resident_memory_of_a_default_nf4_run_is_about_two_gigabytes():
    # measured: ~2.1-2.2 GB RSS for batch 4 on the sample data (~110 tokens per example)
    est = estimate_training(SMOL, quant="nf4", r_max=16, batch_size=4, max_length=256, steps=40,
                            tokens_per_example=110)
    assert 1500 < est.memory_mb < 2800


def test_scaling_and_totals():
    base = estimate_training(SMOL, steps=100, batch_size=4, max_length=128, r_max=8)
    assert estimate_training(SMOL, steps=200, batch_size=4, max_length=128, r_max=8).total_seconds == pytest.approx(
        base.load_seconds + 2 * (base.total_seconds - base.load_seconds))
    assert estimate_training(SMOL, steps=100, batch_size=8, max_length=128, r_max=8).seconds_per_step > 1.8 * base.seconds_per_step
    assert estimate_training(SMOL, steps=100, batch_size=4, max_length=128, r_max=64).memory_mb > base.memory_mb
    assert base.total_low < base.total_seconds < base.total_high
    short = estimate_training(SMOL, steps=100, batch_size=4, max_length=512, r_max=8, tokens_per_example=50)
    assert short.tokens_per_step == round(4 * 1.3 * 50)           # padded batch of short examples
    gpu = estimate_training(SMOL, steps=100, batch_size=4, max_length=128, r_max=8, device="cuda")
    assert gpu.seconds_per_step < base.seconds_per_step / 10
    assert "estimate" in base.summary().lower()


def test_the_mean_sampled_rank_follows_the_sampling():
    """pow2 at r_max 16 draws 1, 2, 4, 8, 16 (mean 6.2) where uniform draws 1..16 (mean 8.5): less adapter work."""
    per_step = {s: estimate_training(SMOL, r_max=16, steps=10, rank_sampling=s).seconds_per_step for s in ("pow2", "uniform", "high")}
    assert per_step["pow2"] < per_step["uniform"] < per_step["high"]


@pytest.mark.parametrize("kwargs", [dict(steps=0), dict(batch_size=-1), dict(r_max=1.5), dict(quant="int8"),
                                    dict(device="tpu")])
def test_bad_values_are_refused(kwargs):
    with pytest.raises(ValueError):
        estimate_training(SMOL, **kwargs)


def test_model_shape_from_a_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1000, "tie_word_embeddings": False}))
    shape = model_shape(str(tmp_path))
    assert shape.layers == 2 and shape.embedding_params == 2 * 1000 * 64
    assert model_shape("default", tmp_path / "missing").hidden == 576
    with pytest.raises(ValueError):
        model_shape(str(tmp_path / "nope"))


def test_format_duration():
    assert format_duration(30) == "30 s" and format_duration(300) == "5 min" and format_duration(7200) == "2.0 h"
