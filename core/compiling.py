"""Compiling a model's decoder layers with torch.compile (TrainConfig.compile, opt-in).

Most of a training step on a small model is not its matrix products but many small passes
over memory (norms, SiLU·up, rotary, dropout masks, residual adds); torch.compile fuses
them. Measured on the 2-core CPU with the default model (bench/README.md §4.3,
`bench/compile_run.py`, 60 steps of a run, eager and compiled side by side): steps 1.27×
faster, but the first run on a machine spends ~150 s compiling, so it pays off only from
~210 steps (~40 s and ~65 steps once inductor's on-disk cache holds the graphs). That is
why it is opt-in, not the default: the 40-step demo would get slower. On CUDA it compiles
through Triton; not measured here.

Only the decoder layers are compiled: the head and loss are core/lm_loss.py's chunked
loss, and evaluation, export and the dashboard's answers stay eager.

Torch-free at import, so the dashboard can check for a compiler without loading torch.
"""
from __future__ import annotations

import os
import shutil

from core.errors import UserError

# Ranks 1 and r_max get graphs of their own (a size of 1 and a whole slice are special cases
# to the compiler), each twice (the first layer's input needs no gradient, the others' do),
# and again for each thread count the governor (core/threads.py) sets: dynamo's default
# limit (8) would silently send ranks back to eager.
RECOMPILE_LIMIT = 64


def cxx_compiler_problem() -> str | None:
    """Why no C++ compiler is found (None: one is). Inductor needs one on CPU, and Triton's launchers on CUDA."""
    cxx = os.environ.get("CXX") or "g++"
    if shutil.which(cxx) or shutil.which("c++") or shutil.which("clang++"):
        return None
    return (f"compile needs a C++ compiler, and none was found ({cxx}, c++, clang++); "
            "install one (Debian: apt-get install g++) or train without compile")


def compiler_problem(device: str) -> str | None:
    """Why torch.compile cannot build kernels for `device` on this machine (None: it can)."""
    problem = cxx_compiler_problem()
    if problem or device != "cuda":
        return problem
    try:
        import triton  # noqa: F401
    except ImportError:
        return "compile on CUDA needs Triton (pip install triton), or train without compile"
    return None


def decoder_layers(model):
    """The repeated blocks of a transformers causal LM (model.get_decoder().layers)."""
    from torch import nn

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise UserError(f"compile needs a model whose decoder keeps its blocks in .layers; {type(model).__name__} does not")
    return layers


def compile_decoder_layers(model) -> int:
    """Compile every decoder layer in place (its weights and state dict stay as they are); returns how many."""
    import torch._dynamo
    import torch._inductor.config

    torch._dynamo.config.allow_unspec_int_on_nn_module = True   # the active rank, where only arithmetic reads it
    # Compile in this process: worker processes would look like other load to the thread governor
    # (core/threads.py), which would give their cores away for the run's first steps.
    torch._inductor.config.compile_threads = 1
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
    return len(layers)
