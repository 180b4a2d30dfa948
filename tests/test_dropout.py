"""The adapter's input dropout (core.qdylora.dropout): the distribution nn.Dropout has, drawn faster."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from core.qdylora.dropout import LEVELS, drop_levels, keep_mask, masked_input, realised_rate
from core.qdylora.layer import DynamicRankLoRALinear


def test_the_realised_rate_is_the_requested_one_to_a_65536th():
    for p in (0.0, 1e-6, 0.05, 0.1, 0.5, 0.9, 0.99999):
        assert abs(realised_rate(p) - p) <= 0.5 / LEVELS
    assert drop_levels(0.05) == 3277 and drop_levels(0.0) == 0
    assert drop_levels(0.9999999) == LEVELS - 1      # p < 1 always keeps a chance to keep


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_each_of_the_four_lanes_drops_at_the_rate(p):
    # Each 64-bit word feeds four consecutive elements; a biased lane (e.g. a sign bit that
    # is never set) would show as one residue class mod 4 dropping at another rate.
    torch.manual_seed(0)
    n = 400_000
    dropped = ~keep_mask((n,), p)
    q = realised_rate(p)
    sd = math.sqrt(q * (1 - q) / (n / 4))
    for lane in range(4):
        assert abs(dropped[lane::4].float().mean().item() - q) < 5 * sd


def test_masks_are_fresh_each_call_and_follow_the_seed():
    torch.manual_seed(1)
    a, b = keep_mask((64, 33), 0.3), keep_mask((64, 33), 0.3)
    assert not torch.equal(a, b)
    torch.manual_seed(1)
    assert torch.equal(keep_mask((64, 33), 0.3), a)
    assert keep_mask((3, 5, 7), 0.3).shape == (3, 5, 7)   # odd sizes: the last word is cut


def test_neighbouring_elements_are_independent():
    # Four lanes of one word must not move together: the chance that two neighbours in
    # one word both drop is p², as for independent draws.
    torch.manual_seed(2)
    p, n = 0.5, 400_000
    dropped = (~keep_mask((n // 4, 4), p)).float()
    both = (dropped[:, 0] * dropped[:, 1]).mean().item()
    q = realised_rate(p)
    assert abs(both - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / (n / 4))


def test_masked_input_forward_and_backward_use_one_mask_and_the_rescale_restores_the_mean():
    x = torch.randn(200, 50, requires_grad=True)
    torch.manual_seed(3)
    h, rescale = masked_input(x, 0.2, training=True)
    torch.manual_seed(3)
    keep = keep_mask(x.shape, 0.2)
    assert torch.equal(h, x * keep)
    assert rescale == pytest.approx(1 / (1 - realised_rate(0.2)))
    g = torch.randn_like(h)
    h.backward(g)
    assert torch.equal(x.grad, g * keep)
    dropped, rescale = masked_input(torch.ones(1000, 1000), 0.2, training=True)
    assert (dropped * rescale).mean().item() == pytest.approx(1.0, abs=0.005)


def test_no_dropout_outside_training_or_at_zero():
    x = torch.randn(4, 6)
    for p, training in ((0.3, False), (0.0, True)):
        h, rescale = masked_input(x, p, training)
        assert h is x and rescale == 1.0


def test_the_layer_adds_the_rescaled_product_of_the_masked_input():
    torch.manual_seed(4)
    layer = DynamicRankLoRALinear(nn.Linear(10, 7), r_max=4, alpha=8.0, dropout=0.25)
    nn.init.normal_(layer.lora_B)
    layer.train()
    x = torch.randn(3, 5, 10)
    torch.manual_seed(5)
    out = layer(x)
    torch.manual_seed(5)
    keep = keep_mask(x.shape, 0.25)
    expected = layer.base(x) + layer.scale() / (1 - realised_rate(0.25)) * (x * keep) @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    layer.eval()
    torch.testing.assert_close(layer(x), layer.base(x) + layer.scale() * x @ layer.lora_A.T @ layer.lora_B.T, rtol=1e-5, atol=1e-5)


def test_the_layer_trains_through_the_mask():
    torch.manual_seed(6)
    layer = DynamicRankLoRALinear(nn.Linear(10, 7), r_max=4, alpha=8.0, dropout=0.5)
    nn.init.normal_(layer.lora_B)
    layer.train()
    x = torch.randn(64, 10, requires_grad=True)
    layer(x).sum().backward()
    # Columns of A see only the kept inputs: its gradient differs from the no-dropout one.
    grad_dropped = layer.lora_A.grad.clone()
    layer.zero_grad()
    layer.eval()
    layer(x).sum().backward()
    assert not torch.allclose(grad_dropped, layer.lora_A.grad)


def test_a_cpu_training_pass_draws_words_not_one_number_per_element():
    # The point of the module is speed: a regression to nn.Dropout would show as bernoulli_.
    torch.manual_seed(7)
    layer = DynamicRankLoRALinear(nn.Linear(64, 32), r_max=4, alpha=8.0, dropout=0.05)
    layer.train()
    x = torch.randn(8, 64, requires_grad=True)
    with torch.profiler.profile() as prof:
        layer(x).sum().backward()
    ops = {e.key for e in prof.key_averages()}
    assert "aten::random_" in ops
    assert "aten::bernoulli_" not in ops and "aten::native_dropout" not in ops
