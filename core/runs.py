"""Using a finished (or cancelled) run: load it once, then answer at any rank."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from core import runstate
from core.errors import RunError, UserError
from core.models import ModelSpec, ResolvedModel, load_base_model
from core.prompting import prompt_messages, render_prompt
from core.qdylora import QDyLoRAConfig, inject_qdylora, set_rank
from core.qdylora.inject import ADAPTER_FILE, load_adapter_state_dict
from core.qdylora.truncation import inference_adapter_state, inference_config
from core.train import ADAPTER_DIR, load_run_config
from core.validation import check_generation


@dataclass
class LoadedRun:
    run_dir: Path
    model: torch.nn.Module
    tokenizer: object
    resolved: ResolvedModel
    config: dict  # the run's config.json
    qcfg: QDyLoRAConfig  # as the adapter is used (an svd run's rows are singular directions, scale constant)

    @property
    def r_max(self) -> int:
        return self.qcfg.r_max

    @property
    def device(self) -> str:
        return self.resolved.device


def check_rank(rank, r_max: int) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= r_max:
        raise UserError(f"rank must be an integer from 0 (base model) to r_max={r_max}, got {rank!r}")
    return rank


def run_info(run_dir: Path) -> dict:
    """The run's config and status without loading any weights."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run folder {run_dir} does not exist")
    config = load_run_config(run_dir)
    return {"config": config, "status": runstate.read_status(run_dir), "has_adapter": (run_dir / ADAPTER_DIR / ADAPTER_FILE).is_file()}


def load_run(run_dir: Path, quant: str | None = None, device: str = "auto") -> LoadedRun:
    """Base model (as the run trained on it, unless `quant` overrides) with the run's adapter."""
    run_dir = Path(run_dir)
    info = run_info(run_dir)
    if not info["has_adapter"]:
        status = (info["status"] or {}).get("status", "unknown")
        raise RunError(f"run {run_dir} has no saved adapter yet (status: {status})")
    config = info["config"]
    trained = QDyLoRAConfig.from_dict(config["qdylora"])
    qcfg = inference_config(trained)
    spec = ModelSpec(name_or_path=config["train"]["model"], quant=quant or config["model"]["quant"], device=device)
    model, tokenizer, resolved = load_base_model(spec)
    inject_qdylora(model, qcfg)
    try:
        load_adapter_state_dict(model, inference_adapter_state(load_file(str(run_dir / ADAPTER_DIR / ADAPTER_FILE)), trained))
    except (SafetensorError, ValueError, OSError) as exc:
        raise RunError(f"the adapter of run {run_dir} cannot be used ({exc}); resume the run to save it again") from None
    model.eval()
    set_rank(model, qcfg.r_max)
    return LoadedRun(run_dir, model, tokenizer, resolved, config, qcfg)


def encode_prompts(tokenizer, prompts: list, device: str) -> dict[str, torch.Tensor]:
    """Left-padded chat-formatted prompts (left so every row's answer starts at the same column)."""
    texts = [render_prompt(tokenizer, p if isinstance(p, list) else prompt_messages(p)) for p in prompts]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return {k: v.to(device) for k, v in batch.items()}


def prompt_lengths(tokenizer, prompts: list) -> list[int]:
    """Tokens of each chat-formatted prompt (to batch prompts of similar length together)."""
    texts = [render_prompt(tokenizer, p if isinstance(p, list) else prompt_messages(p)) for p in prompts]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


@torch.no_grad()
def generate(model, tokenizer, prompts: list, max_new_tokens: int = 128, do_sample: bool = False,
             temperature: float = 0.7, top_p: float = 0.9, seed: int = 0, batch_size: int = 8,
             min_new_tokens: int | None = None) -> list[str]:
    """Completions (text after the prompt) for prompts given as strings or message lists."""
    check_generation(max_new_tokens, temperature, top_p)
    device = next(model.parameters()).device
    outputs = []
    for start in range(0, len(prompts), batch_size):
        batch = encode_prompts(tokenizer, prompts[start:start + batch_size], device)
        outputs += generate_encoded(model, tokenizer, batch, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                    temperature=temperature, top_p=top_p, seed=seed, min_new_tokens=min_new_tokens)
    return outputs


@torch.no_grad()
def generate_encoded(model, tokenizer, batch: dict[str, torch.Tensor], max_new_tokens: int = 128, do_sample: bool = False,
                     temperature: float = 0.7, top_p: float = 0.9, seed: int = 0, min_new_tokens: int | None = None,
                     cache=None) -> list[str]:
    """Completions for one batch already made by `encode_prompts` (a sweep encodes its prompts once for every rank).

    `cache`: a key/value cache that already holds all but the last prompt token (core.evaluation.shared_prompt).
    """
    model.eval()
    kwargs = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id, "do_sample": do_sample}
    if cache is not None:
        kwargs["cache"] = cache
    if min_new_tokens:
        kwargs["min_new_tokens"] = min_new_tokens
    if do_sample:
        torch.manual_seed(seed)
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    out = model.generate(**batch, **kwargs)
    new_tokens = out[:, batch["input_ids"].shape[1]:]
    return [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def generate_at_rank(loaded: LoadedRun, prompts: list, rank: int, **kwargs) -> list[str]:
    set_rank(loaded.model, check_rank(rank, loaded.r_max))
    return generate(loaded.model, loaded.tokenizer, prompts, **kwargs)
