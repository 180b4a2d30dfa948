"""The dynamic-rank LoRA layer: h = W0 x + s(b) B[:, :b] A[:b] dropout(x) (per-row rules: Σ_{i≤b} s_i B_i A_i x).

The input dropout is `core.qdylora.dropout.masked_input`: its rescale is applied to A x.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from core.qdylora.config import PER_ROW_RULES, lora_scale, row_scales
from core.qdylora.dropout import masked_input


def is_linear4bit(module: nn.Module) -> bool:
    # bitsandbytes is optional at import time: check by class name first so that
    # this module imports on machines without it.
    if type(module).__name__ not in ("Linear4bit", "LinearNF4", "LinearFP4"):
        return False
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - bnb missing means no 4-bit layers exist
        return False
    return isinstance(module, bnb.nn.Linear4bit)


def is_adaptable_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_linear4bit(module)


def add_low_rank(result: torch.Tensor, z: torch.Tensor, b: torch.Tensor, scale: float, fused: bool = True) -> torch.Tensor:
    """result + scale · z Bᵀ, as one matrix product that adds into `result` when the dtypes allow.

    The same sum as `result + F.linear(z, B) * scale` up to float rounding, without the two
    extra passes (scaling, adding) over the layer's whole output, forward and backward.
    fused=False computes it in PEFT's order, so that an exported adapter reproduces our
    outputs bit for bit (a scale that is not a power of two rounds differently when fused).
    """
    if fused and result.dtype == z.dtype and result.dim() >= 2:
        out = torch.addmm(result.reshape(-1, result.shape[-1]), z.reshape(-1, z.shape[-1]), b.t(), alpha=scale)
        return out.view(result.shape)
    return result + (F.linear(z, b) * scale).to(result.dtype)


class DynamicRankLoRALinear(nn.Module):
    """Wraps a frozen linear (float or bitsandbytes 4-bit) with a rank-truncatable adapter.

    The active rank is a plain int attribute: switching rank changes a number, never weights.
    For training several ranks in one forward, `rank_coeff` can hold a per-example
    (batch, 1, b_max) tensor of mask × scale (see `inject.set_example_ranks`).
    """

    def __init__(self, base: nn.Module, r_max: int, alpha: float, dropout: float = 0.0, update: str = "full",
                 scale_rule: str = "alpha/b"):
        super().__init__()
        if not is_adaptable_linear(base):
            raise TypeError(f"can only adapt nn.Linear or bnb Linear4bit, got {type(base).__name__}")
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.r_max = r_max
        self.alpha = alpha
        self.update = update
        self.scale_rule = scale_rule
        self.active_rank = r_max
        self.rank_coeff: torch.Tensor | None = None
        self._row_scale_cache: tuple | None = None
        self.dropout_p = dropout
        device = base.weight.device
        # Adapters stay float32 even over a bf16/NF4 base: they are small and are what learns.
        self.lora_A = nn.Parameter(torch.empty(r_max, self.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r_max, device=device, dtype=torch.float32))
        self.reset_adapter()

    def reset_adapter(self) -> None:
        # As LoRA: A Kaiming-uniform, B zero, so the wrapped model starts equal to the base.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def scale(self, rank: int | None = None) -> float:
        return lora_scale(self.alpha, self.active_rank if rank is None else rank, self.scale_rule, self.r_max)

    def row_scale(self, rank: int | None = None) -> torch.Tensor | None:
        """Per-row scales of the first b rows under a per-row rule (None under a one-scale rule)."""
        if self.scale_rule not in PER_ROW_RULES:
            return None
        b = self.active_rank if rank is None else rank
        # Row i's scale does not depend on b, so rank b's scales are the first b of r_max's: one cached
        # tensor for every rank (and a compiled layer sees one tensor, not a new one per rank).
        key = (self.scale_rule, self.alpha, self.r_max, self.lora_A.device, self.lora_A.dtype)
        if self._row_scale_cache is None or self._row_scale_cache[0] != key:
            values = torch.tensor(row_scales(self.alpha, self.r_max, self.scale_rule, self.r_max), dtype=self.lora_A.dtype,
                                  device=self.lora_A.device)
            self._row_scale_cache = (key, values)
        return self._row_scale_cache[1][:b]

    def active_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A[:b] and B[:, :b] for the active rank, with rows that must not learn detached."""
        b = self.active_rank
        a, bm = self.lora_A[:b], self.lora_B[:, :b]
        if self.update == "frozen" and self.training and b > 1:
            a = torch.cat([a[: b - 1].detach(), a[b - 1 :]], dim=0)
            bm = torch.cat([bm[:, : b - 1].detach(), bm[:, b - 1 :]], dim=1)
        return a, bm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.rank_coeff is not None:
            b_max = self.rank_coeff.shape[-1]
            return add_low_rank(result, self._per_example_z(x), self.lora_B[:, :b_max], 1.0)
        b = self.active_rank
        if b == 0:
            return result
        a, bm = self.active_factors()
        h, rescale = masked_input(x.to(a.dtype), self.dropout_p, self.training)
        z = F.linear(h, a)
        rows = self.row_scale(b)
        # The dropout's rescale rides on the scale of z (b numbers per token), not on x.
        z, scale = (z, self.scale(b) * rescale) if rows is None else (z * (rows * rescale), 1.0)
        # Training takes the fused sum (speed); inference PEFT's order (exported adapters match exactly).
        return add_low_rank(result, z, bm, scale, fused=self.training)

    def _per_example_z(self, x: torch.Tensor) -> torch.Tensor:
        """A[:b_max] dropout(x), each example's rows masked and scaled by its own rank."""
        coeff = self.rank_coeff
        if x.dim() < 2 or x.shape[0] != coeff.shape[0]:
            raise ValueError(f"per-example ranks were set for a batch of {coeff.shape[0]}, got input of shape {tuple(x.shape)}")
        b_max = coeff.shape[-1]
        h, rescale = masked_input(x.to(self.lora_A.dtype), self.dropout_p, self.training)
        z = F.linear(h, self.lora_A[:b_max])
        return z * (coeff * rescale).view(coeff.shape[0], *([1] * (z.dim() - 2)), b_max)

    def delta_weight(self, rank: int | None = None) -> torch.Tensor:
        """s(b) B[:, :b] A[:b]: what merging adds to W0, in float32."""
        b = self.active_rank if rank is None else rank
        if b == 0:
            return torch.zeros(self.out_features, self.in_features, device=self.lora_A.device)
        rows = self.row_scale(b)
        if rows is not None:
            return (self.lora_B[:, :b] * rows) @ self.lora_A[:b]
        return (self.lora_B[:, :b] @ self.lora_A[:b]) * self.scale(b)

    def base_weight_float(self) -> torch.Tensor:
        """W0 in float32, dequantized from NF4 when the base is 4-bit."""
        weight = self.base.weight
        if is_linear4bit(self.base):
            import bitsandbytes.functional as bnbf

            return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
        return weight.data.float()

    def extra_repr(self) -> str:
        return (f"r_max={self.r_max}, alpha={self.alpha}, scale={self.scale_rule}, active_rank={self.active_rank}, "
                f"update={self.update}, dropout={self.dropout_p}")
