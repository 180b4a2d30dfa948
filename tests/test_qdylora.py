"""The method itself: layer math, rank switching, which rows learn, rank sampling."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch import nn

from core.qdylora import QDyLoRAConfig, RankSampler, get_rank, inject_qdylora, lora_scale, set_rank
from core.qdylora.inject import UntrainedRowGuard, adapter_param_count, adapter_state_dict, find_target_modules
from core.qdylora.layer import DynamicRankLoRALinear
from core.qdylora.sampling import candidate_ranks


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5))
        self.lm_head = nn.Linear(5, 3, bias=False)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, x):
        return self.lm_head(self.block(x))


def randomized_layer(r_max=8, alpha=16.0, update="full", seed=0):
    torch.manual_seed(seed)
    layer = DynamicRankLoRALinear(nn.Linear(10, 7), r_max=r_max, alpha=alpha, update=update)
    nn.init.normal_(layer.lora_B)
    return layer


def test_scale_is_alpha_over_rank():
    assert lora_scale(16, 4) == 4.0
    assert lora_scale(16, 64) == 0.25
    assert lora_scale(16, 0) == 0.0


def test_new_adapter_equals_base():
    base = nn.Linear(10, 7)
    x = torch.randn(3, 10)
    expected = base(x)
    layer = DynamicRankLoRALinear(base, r_max=4, alpha=16)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("rank", [0, 1, 3, 8])
def test_forward_matches_formula(rank):
    layer = randomized_layer()
    layer.active_rank = rank
    x = torch.randn(4, 10)
    w0 = layer.base.weight
    expected = x @ w0.T + layer.base.bias
    if rank:
        expected = expected + (16.0 / rank) * (x @ layer.lora_A[:rank].T @ layer.lora_B[:, :rank].T)
    torch.testing.assert_close(layer(x), expected)
    expected_delta = (16.0 / rank) * layer.lora_B[:, :rank] @ layer.lora_A[:rank] if rank else torch.zeros_like(w0)
    torch.testing.assert_close(layer.delta_weight(), expected_delta)


def test_set_rank_changes_a_number_not_weights():
    model = TwoLayer()
    inject_qdylora(model, QDyLoRAConfig(r_max=4))
    before = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    set_rank(model, 2)
    assert get_rank(model) == 2
    after = adapter_state_dict(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="0..4"):
        set_rank(model, 5)
    with pytest.raises(ValueError):
        set_rank(model, -1)


def test_injection_skips_output_head_and_freezes_base():
    model = TwoLayer()
    names = inject_qdylora(model, QDyLoRAConfig(r_max=4))
    assert names == ["block.0", "block.2"]
    assert isinstance(model.lm_head, nn.Linear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"block.0.lora_A", "block.0.lora_B", "block.2.lora_A", "block.2.lora_B"}
    assert adapter_param_count(model, 3) == 3 * (8 + 6) + 3 * (6 + 5)


def test_target_module_filter():
    model = TwoLayer()
    assert find_target_modules(model, ["2"]) == ["block.2"]
    with pytest.raises(ValueError, match="no modules named"):
        find_target_modules(model, ["q_proj"])


def _grad_rows(layer):
    a_rows = (layer.lora_A.grad.abs().sum(dim=1) > 0).nonzero().flatten().tolist()
    b_cols = (layer.lora_B.grad.abs().sum(dim=0) > 0).nonzero().flatten().tolist()
    return a_rows, b_cols


@pytest.mark.parametrize("update,expected", [("full", [0, 1, 2]), ("frozen", [2])])
def test_which_rows_learn(update, expected):
    layer = randomized_layer(update=update)
    layer.train()
    layer.active_rank = 3
    layer(torch.randn(5, 10)).pow(2).sum().backward()
    assert _grad_rows(layer) == (expected, expected)


@pytest.mark.parametrize("update", ["full", "frozen"])
def test_untrained_rows_do_not_move_under_adamw(update):
    model = TwoLayer()
    inject_qdylora(model, QDyLoRAConfig(r_max=6, update=update))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.1)
    for rank in (6, 2, 3):  # the first step fills momentum for every row
        set_rank(model, rank)
        model.train()
        before = {k: v.clone() for k, v in adapter_state_dict(model).items()}
        opt.zero_grad()
        model(torch.randn(4, 8)).pow(2).sum().backward()
        guard = UntrainedRowGuard(model, rank, update)
        opt.step()
        guard.restore()
        after = adapter_state_dict(model)
        trained = [rank - 1] if update == "frozen" else list(range(rank))
        for key in before:
            dim = 0 if key.endswith("lora_A") else 1
            for row in range(6):
                same = torch.equal(before[key].select(dim, row), after[key].select(dim, row))
                if row not in trained:
                    assert same, f"{key} row {row} moved at rank {rank}"


def test_linear4bit_base_on_cpu():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    float_linear = nn.Linear(64, 32, bias=False)
    q = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    q.load_state_dict(float_linear.state_dict())
    q = q.to("cpu")
    layer = DynamicRankLoRALinear(q, r_max=4, alpha=8)
    nn.init.normal_(layer.lora_B)
    layer.active_rank = 2
    x = torch.randn(3, 64)
    w0 = layer.base_weight_float()
    assert (w0 - float_linear.weight).abs().max() < 0.1  # NF4 rounding, not garbage
    expected = x @ w0.T + 4.0 * (x @ layer.lora_A[:2].T @ layer.lora_B[:, :2].T)
    torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-4)


def test_uniform_sampler_covers_all_ranks_evenly():
    sampler = RankSampler(QDyLoRAConfig(r_max=8), seed=1)
    counts = Counter(sampler.sample() for _ in range(8000))
    assert set(counts) == set(range(1, 9))
    assert all(abs(c / 8000 - 1 / 8) < 0.02 for c in counts.values())


def test_pow2_includes_r_max_and_skews():
    assert candidate_ranks(QDyLoRAConfig(r_max=64, rank_sampling="pow2"))[0] == [1, 2, 4, 8, 16, 32, 64]
    assert candidate_ranks(QDyLoRAConfig(r_max=12, rank_sampling="pow2"))[0] == [1, 2, 4, 8, 12]
    low = RankSampler(QDyLoRAConfig(r_max=16, rank_sampling="low"), 0).probabilities()
    high = RankSampler(QDyLoRAConfig(r_max=16, rank_sampling="high"), 0).probabilities()
    assert low[1] > low[16] and high[16] > high[1]
    assert math.isclose(sum(low.values()), 1.0)
    assert candidate_ranks(QDyLoRAConfig(r_max=8, rank_sampling="list", rank_list=[4, 2, 2]))[0] == [2, 4]


def test_sampler_state_round_trip():
    a = RankSampler(QDyLoRAConfig(r_max=32), seed=7)
    [a.sample() for _ in range(5)]
    state = a.state_dict()
    expected = [a.sample() for _ in range(10)]
    b = RankSampler(QDyLoRAConfig(r_max=32), seed=99)
    b.load_state_dict(state)
    assert [b.sample() for _ in range(10)] == expected


@pytest.mark.parametrize("kwargs,message", [
    ({"r_max": 0}, "r_max"), ({"alpha": 0}, "alpha"), ({"dropout": 1.0}, "dropout"),
    ({"rank_sampling": "zipf"}, "rank_sampling"), ({"update": "half"}, "update"),
    ({"rank_sampling": "list"}, "rank_list"), ({"rank_sampling": "list", "rank_list": [9], "r_max": 8}, "rank_list"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QDyLoRAConfig(**kwargs)
