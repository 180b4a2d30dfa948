"""QDyLoRA: one LoRA adapter trained at randomly sampled ranks over a (4-bit) frozen base."""
from core.qdylora.config import QDyLoRAConfig, lora_scale
from core.qdylora.inject import (
    adapter_param_count,
    adapter_parameters,
    adapter_state_dict,
    get_rank,
    inject_qdylora,
    load_adapter,
    qdylora_layers,
    save_adapter,
    set_rank,
)
from core.qdylora.layer import DynamicRankLoRALinear
from core.qdylora.sampling import RankSampler

__all__ = [
    "QDyLoRAConfig", "lora_scale", "DynamicRankLoRALinear", "RankSampler", "inject_qdylora",
    "set_rank", "get_rank", "qdylora_layers", "adapter_parameters", "adapter_param_count",
    "adapter_state_dict", "save_adapter", "load_adapter",
]
