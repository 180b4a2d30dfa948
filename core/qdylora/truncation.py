"""How rank b is cut from a trained adapter: the first b rows (QDyLoRA) or a truncated SVD.

For method 'svd' the run trained one dedicated LoRA at r_max. Its update per layer,
ΔW = s(r_max) B A, is rewritten as factors ordered by singular value under the constant
scale rule, so that rank b (the first b rows at scale s) is the best rank-b approximation
of ΔW (Eckart–Young). After that, every consumer (set_rank, merge, export, refine) treats
the run like any other: the first b rows at the scale the rule gives.
"""
from __future__ import annotations

import torch

from core.qdylora.config import (INFERENCE_SCALE_OF_ROWS, INFERENCE_SCALE_OF_SVD, PER_ROW_RULES, QDyLoRAConfig,  # noqa: F401
                                 inference_config, lora_scale, row_scales)


def svd_ordered_factors(a: torch.Tensor, b: torch.Tensor, scale_from: float, scale_to: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A' (r×in), B' (out×r) with scale_to · B'[:, :k] A'[:k] = best rank-k approximation of scale_from · B A, for every k.

    Works on the r-dimensional cores (two thin QRs and an r×r SVD), never on the out×in matrix.
    """
    a64, b64 = a.detach().double(), b.detach().double()
    q_b, r_b = torch.linalg.qr(b64)        # B = Q_B R_B
    q_a, r_a = torch.linalg.qr(a64.T)      # Aᵀ = Q_A R_A
    u, sigma, vh = torch.linalg.svd(scale_from * (r_b @ r_a.T), full_matrices=False)
    root = torch.sqrt(sigma / scale_to)
    new_b = torch.zeros_like(b64)
    new_a = torch.zeros_like(a64)
    k = sigma.shape[0]                     # < r only when a layer is narrower than r_max
    new_b[:, :k] = (q_b @ u) * root        # columns ordered by singular value
    new_a[:k] = root[:, None] * (vh @ q_a.T)
    return new_a.to(a.dtype), new_b.to(b.dtype)


def inference_adapter_state(state: dict[str, torch.Tensor], cfg: QDyLoRAConfig) -> dict[str, torch.Tensor]:
    """The trained adapter (keys '<module>.lora_A' / '.lora_B' at r_max) as used at every rank b."""
    if cfg.scale in PER_ROW_RULES:
        return fold_row_scales(state, cfg)
    if cfg.method != "svd":
        return state
    scale_from = lora_scale(cfg.alpha, cfg.r_max, cfg.scale, cfg.r_max)
    scale_to = lora_scale(cfg.alpha, cfg.r_max, INFERENCE_SCALE_OF_SVD, cfg.r_max)
    out = {}
    for key in state:
        if not key.endswith(".lora_A"):
            continue
        module = key[: -len(".lora_A")]
        out[f"{module}.lora_A"], out[f"{module}.lora_B"] = svd_ordered_factors(
            state[key], state[f"{module}.lora_B"], scale_from, scale_to)
    return out


def fold_row_scales(state: dict[str, torch.Tensor], cfg: QDyLoRAConfig) -> dict[str, torch.Tensor]:
    """Per-row scales s_i moved into B: s · B'[:, i] = s_i · B[:, i] with s the constant scale, so every
    prefix b computes the same update as trained (the rows' factors do not depend on b)."""
    to = lora_scale(cfg.alpha, cfg.r_max, INFERENCE_SCALE_OF_ROWS, cfg.r_max)
    factors = torch.tensor(row_scales(cfg.alpha, cfg.r_max, cfg.scale, cfg.r_max), dtype=torch.float64) / to
    out = {}
    for key, tensor in state.items():
        if key.endswith(".lora_B"):
            tensor = (tensor.double() * factors[: tensor.shape[1]]).to(tensor.dtype)
        out[key] = tensor
    return out
