"""QDyLoRA: one LoRA adapter trained at randomly sampled ranks over a (4-bit) frozen base.

The config is imported eagerly; everything that needs torch is imported on first use, so
`core.qdylora.config` (and the torch-free `core.train_config`) stay cheap for the dashboard.
"""
from __future__ import annotations

import importlib

from core.qdylora.config import QDyLoRAConfig, lora_scale

_LAZY = {
    "DynamicRankLoRALinear": "core.qdylora.layer",
    "RankSampler": "core.qdylora.sampling",
    **{name: "core.qdylora.inject" for name in (
        "adapter_param_count", "adapter_parameters", "adapter_state_dict", "get_rank", "inject_qdylora",
        "load_adapter", "qdylora_layers", "save_adapter", "set_rank",
    )},
}

__all__ = ["QDyLoRAConfig", "lora_scale", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
