"""Training memory that a 4-bit base does not save by itself.

bitsandbytes quantizes the block linears only: the token embeddings and the output head
stay in the compute dtype (float32 on CPU). With a 49k vocabulary they are most of a
small model's 4-bit footprint (1 B Llama: 768 of 1173 MiB, bench/README.md §2). Most
checkpoints store them in bfloat16, so the float32 copy holds nothing the 16-bit one
does not: `store_frozen_embeddings_16bit` keeps them in 16 bits (only when that is
exact, value for value) and widens them where they are used, so every result is
unchanged. `release_freed_memory` hands the heap that loading and quantizing left
behind back to the operating system, and `map_large_blocks` keeps the large temporaries
of training (a 4-bit layer's weight dequantized for one product) out of the heap, where
glibc's adaptive threshold otherwise lets them fragment it.
"""
from __future__ import annotations

import ctypes
import ctypes.util

import torch
from torch import nn


class Upcast16Embedding(nn.Embedding):
    """An embedding stored in 16 bits whose rows come out in `compute_dtype` (a lookup, then an exact widening)."""

    compute_dtype = torch.float32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).to(self.compute_dtype)


class Upcast16Linear(nn.Linear):
    """A frozen linear stored in 16 bits that computes in the dtype of its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.weight.to(x.dtype), bias)


def _exact_16bit(weight: torch.Tensor) -> torch.dtype | None:
    """bfloat16 or float16 if every value of a float32 weight survives the round trip, else None."""
    for dtype in (torch.bfloat16, torch.float16):
        narrow = weight.to(dtype)
        if torch.equal(narrow.to(weight.dtype), weight):
            return dtype
    return None


def store_frozen_embeddings_16bit(model: nn.Module) -> dict[str, str]:
    """Keep the frozen float32 input embeddings and output head in 16 bits where that loses nothing.

    Tied embeddings stay tied (one 16-bit tensor, narrowed only if both its users can widen
    it). Returns {"embeddings": dtype, "head": dtype} for what was narrowed.
    """
    roles = {"embeddings": (model.get_input_embeddings(), nn.Embedding, Upcast16Embedding),
             "head": (model.get_output_embeddings(), nn.Linear, Upcast16Linear)}
    users: dict[int, list[tuple[str, nn.Module, type]]] = {}
    blocked: set[int] = set()
    for role, (module, plain, wanted) in roles.items():
        weight = getattr(module, "weight", None)
        if weight is None:
            continue
        users.setdefault(id(weight), []).append((role, module, wanted))
        if type(module) is not plain or weight.requires_grad or weight.dtype != torch.float32:
            blocked.add(id(weight))
    done: dict[str, str] = {}
    for key, group in users.items():
        if key in blocked:
            continue
        weight = group[0][1].weight
        dtype = _exact_16bit(weight.data)
        if dtype is None:
            continue
        weight.data = weight.data.to(dtype)
        for role, module, wanted in group:
            module.__class__ = wanted
            done[role] = str(dtype).replace("torch.", "")
    return done


def _call_libc(function: str, *args: int) -> bool:
    """glibc's `function(*args)` as a success flag; False where there is no such call (no glibc)."""
    try:
        return bool(getattr(ctypes.CDLL(ctypes.util.find_library("c")), function)(*args))
    except (OSError, AttributeError, TypeError):
        return False


def release_freed_memory() -> bool:
    """Return free heap pages to the OS (glibc malloc_trim); False where there is no such call."""
    return _call_libc("malloc_trim", 0)


# glibc's mallopt parameter for the size from which a block gets its own mapping.
M_MMAP_THRESHOLD = -3
# Blocks this large are mapped and unmapped on their own: a 4-bit base dequantizes each weight
# (MiBs) for every product, and glibc's adaptive threshold (rising to 32 MiB after the first such
# block is freed) would otherwise put them in the heap, where their holes outlive them
# (1 B Llama NF4: training peak 3052 → 2540 MiB, bench/README.md §2).
LARGE_BLOCK_BYTES = 1 << 20


def map_large_blocks(threshold: int = LARGE_BLOCK_BYTES) -> bool:
    """Fix glibc's mmap threshold (large blocks get their own mapping, returned when freed); False without glibc."""
    return _call_libc("mallopt", M_MMAP_THRESHOLD, int(threshold))
