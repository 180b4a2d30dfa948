"""Small helpers shared by tests (not fixtures)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def randomize_adapter_b(run_dir: Path, seed: int = 0, std: float = 0.05) -> None:
    """Give B real values so that every rank changes the output (B starts at zero)."""
    from safetensors.torch import load_file, save_file

    path = Path(run_dir) / "adapter" / "adapter.safetensors"
    state = load_file(str(path))
    gen = torch.Generator().manual_seed(seed)
    for key, tensor in state.items():
        if key.endswith("lora_B"):
            state[key] = torch.randn(tensor.shape, generator=gen) * std
    save_file(state, str(path))


def run_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-m", "core", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=full_env)
