"""The adapter's input dropout: independent Bernoulli masks, drawn 16 bits per element on CPU.

`nn.Dropout` on CPU spends most of its time drawing one random number per element and then
makes two more passes (scale forward, scale and mask backward) over the layer's whole input.
With the default model that was 12.9 % of a training step (bench/README.md §4.1). Here the
mask comes from 64-bit random words cut into four 16-bit lanes (a quarter of the draws), and
the rescale 1/(1 − p) is returned to the caller, which applies it to A·x — b numbers per
token instead of the input's hundreds. Same distribution as `nn.Dropout`: every element is
kept independently, with probability 1 − p realised to 1/65536, and the rescale uses that
realised probability, so the expectation is x exactly. On other devices `F.dropout` (one
fused kernel there) is used as it is.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LEVELS = 1 << 16          # a 16-bit lane takes one of 65536 values
_LANES_PER_WORD = 4       # 16-bit lanes in one 64-bit random word


def drop_levels(p: float) -> int:
    """How many of the 65536 lane values drop an element: p realised to 1/65536 (0 ≤ p < 1)."""
    return min(LEVELS - 1, max(0, round(p * LEVELS)))


def realised_rate(p: float) -> float:
    """The dropout probability the 16-bit masks actually use for a requested p."""
    return drop_levels(p) / LEVELS


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean mask of `shape`, each element True (kept) independently with probability 1 − realised_rate(p)."""
    n = math.prod(shape)
    words = -(-n // _LANES_PER_WORD)
    # The full int64 range, so that all four lanes, sign bits included, are uniform.
    bits = torch.randint(-(1 << 63), (1 << 63) - 1, (words,), dtype=torch.int64, device=device)
    lanes = bits.view(torch.int16)[:n].view(shape)
    return lanes >= drop_levels(p) - LEVELS // 2   # int16 lanes run from −32768: the lowest drop_levels values drop


class _MaskInput(torch.autograd.Function):
    """x ⊙ m with a fresh keep mask m; the gradient is g ⊙ m (the rescale is the caller's)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(keep)
        return torch.where(keep, x, 0.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0.0), None


def masked_input(x: torch.Tensor, p: float, training: bool) -> tuple[torch.Tensor, float]:
    """(dropout(x) without its rescale, the rescale): A·dropout(x) = rescale · (A·masked x).

    Identity (rescale 1) outside training or with p = 0. On CPU the 16-bit masks above; on
    other devices `F.dropout`, which rescales itself (rescale 1).
    """
    if not training or drop_levels(p) == 0:
        return x, 1.0
    if x.device.type != "cpu":
        return F.dropout(x, p, True), 1.0
    return _MaskInput.apply(x, p), LEVELS / (LEVELS - drop_levels(p))
