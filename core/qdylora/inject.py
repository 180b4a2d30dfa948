"""Putting QDyLoRA layers into a model, choosing the active rank, saving adapters."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from core.qdylora.config import QDyLoRAConfig
from core.qdylora.layer import DynamicRankLoRALinear, is_adaptable_linear
from core.qdylora.sampling import balanced_row_multipliers

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "qdylora_config.json"


def _output_head_ids(model: nn.Module) -> set[int]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {id(head)} if head is not None else set()


def find_target_modules(model: nn.Module, target_modules: list[str] | None) -> list[str]:
    """Qualified names of the linear layers to adapt (never the output head)."""
    heads = _output_head_ids(model)
    names = []
    for name, module in model.named_modules():
        if id(module) in heads or not is_adaptable_linear(module) or isinstance(module, DynamicRankLoRALinear):
            continue
        if target_modules is not None and name.rsplit(".", 1)[-1] not in target_modules:
            continue
        names.append(name)
    if not names:
        wanted = "any linear layer" if target_modules is None else f"modules named {target_modules}"
        raise ValueError(f"no {wanted} found to adapt in {type(model).__name__}")
    return names


def inject_qdylora(model: nn.Module, cfg: QDyLoRAConfig) -> list[str]:
    """Wrap target linears in place; freeze everything but the adapters. Returns adapted names."""
    names = find_target_modules(model, cfg.target_modules)
    model.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, DynamicRankLoRALinear(getattr(parent, child), cfg.r_max, cfg.alpha, cfg.dropout, cfg.update,
                                                     scale_rule=cfg.scale))
    return names


def qdylora_layers(model: nn.Module) -> dict[str, DynamicRankLoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, DynamicRankLoRALinear)}


def adapted_leaf_names(model: nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name in qdylora_layers(model)})


def r_max_of(model: nn.Module) -> int:
    layers = qdylora_layers(model)
    if not layers:
        raise ValueError("model has no QDyLoRA layers")
    return next(iter(layers.values())).r_max


def set_rank(model: nn.Module, rank: int) -> None:
    """Make every adapter use its first `rank` rows (0 = base model only). Changes no weights."""
    layers = qdylora_layers(model)
    if not layers:
        raise ValueError("model has no QDyLoRA layers")
    r_max = next(iter(layers.values())).r_max
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= r_max:
        raise ValueError(f"rank must be an integer in 0..{r_max}, got {rank!r}")
    for layer in layers.values():
        layer.active_rank = rank
        layer.rank_coeff = None


def set_example_ranks(model: nn.Module, ranks: list[int]) -> None:
    """Give each example of the next batch its own active rank (one forward trains several ranks).

    Example i uses rows 1..ranks[i] at scale s(ranks[i]): a (batch, max rank) mask × scale,
    shared by every layer (they share alpha and the scale rule).
    """
    layers = qdylora_layers(model)
    if not layers:
        raise ValueError("model has no QDyLoRA layers")
    first = next(iter(layers.values()))
    if not ranks or any(isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= first.r_max for b in ranks):
        raise ValueError(f"example ranks must be integers in 1..{first.r_max}, got {ranks!r}")
    b_max = max(ranks)
    coeff = torch.zeros(len(ranks), b_max, dtype=first.lora_A.dtype, device=first.lora_A.device)
    for i, b in enumerate(ranks):
        rows = first.row_scale(b)
        coeff[i, :b] = first.scale(b) if rows is None else rows
    for layer in layers.values():
        layer.active_rank = b_max
        layer.rank_coeff = coeff


def get_rank(model: nn.Module) -> int:
    ranks = {layer.active_rank for layer in qdylora_layers(model).values()}
    if len(ranks) != 1:
        raise ValueError(f"adapters disagree on the active rank: {sorted(ranks)}")
    return ranks.pop()


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    params = []
    for layer in qdylora_layers(model).values():
        params += [layer.lora_A, layer.lora_B]
    return params


def adapter_param_count(model: nn.Module, rank: int) -> int:
    """Exact number of adapter parameters in use at rank b."""
    return sum(rank * (layer.in_features + layer.out_features) for layer in qdylora_layers(model).values())


def adapter_state_dict(model: nn.Module, rank: int | None = None) -> dict[str, torch.Tensor]:
    """Adapter tensors by '<module>.lora_A' / '<module>.lora_B', optionally truncated to rank b."""
    state = {}
    for name, layer in qdylora_layers(model).items():
        a, b = layer.lora_A.detach(), layer.lora_B.detach()
        if rank is not None:
            a, b = a[:rank], b[:, :rank]
        state[f"{name}.lora_A"] = a.contiguous().cpu()
        state[f"{name}.lora_B"] = b.contiguous().cpu()
    return state


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    layers = qdylora_layers(model)
    expected = {f"{n}.{p}" for n in layers for p in ("lora_A", "lora_B")}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(f"adapter does not fit this model: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_A.copy_(state[f"{name}.lora_A"].to(layer.lora_A.device))
            layer.lora_B.copy_(state[f"{name}.lora_B"].to(layer.lora_B.device))


def save_adapter(model: nn.Module, cfg: QDyLoRAConfig, folder: Path) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (ADAPTER_FILE + ".tmp")
    save_file(adapter_state_dict(model), str(tmp))
    tmp.replace(folder / ADAPTER_FILE)
    data = cfg.to_dict() | {"adapted_modules": sorted(qdylora_layers(model))}
    (folder / CONFIG_FILE).write_text(json.dumps(data, indent=2))


def load_adapter(model: nn.Module, folder: Path) -> None:
    from safetensors.torch import load_file

    load_adapter_state_dict(model, load_file(str(Path(folder) / ADAPTER_FILE)))


class UntrainedRowGuard:
    """Keeps rows that did not take part in this step exactly where they were.

    AdamW moves parameters with zero gradient through momentum and weight decay; with a
    sampled rank that would drift rows above b (and, in 'frozen' mode, rows below b).
    Snapshot them before `optimizer.step()` and put them back after.
    """

    def __init__(self, model: nn.Module, rank: int, update: str):
        self._saved = []
        for layer in qdylora_layers(model).values():
            trained = slice(rank - 1, rank) if update == "frozen" else slice(0, rank)
            if trained.start == 0 and trained.stop >= layer.r_max:
                continue
            self._saved.append((layer, trained, layer.lora_A.detach().clone(), layer.lora_B.detach().clone()))

    def restore(self) -> None:
        with torch.no_grad():
            for layer, trained, a, b in self._saved:
                keep_a = layer.lora_A[trained].clone()
                keep_b = layer.lora_B[:, trained].clone()
                layer.lora_A.copy_(a)
                layer.lora_B.copy_(b)
                layer.lora_A[trained] = keep_a
                layer.lora_B[:, trained] = keep_b


class BalancedRowSteps:
    """Scales each row's AdamW step by its multiplier (row_steps 'balanced'): a per-row learning rate.

    AdamW has no per-element learning rate, so the step is taken as usual and then rescaled:
    row i ends at before + m_i · (after − before). Exact for AdamW, weight decay included.
    """

    def __init__(self, model: nn.Module, multipliers: list[float]):
        self._saved = [(layer, layer.lora_A.detach().clone(), layer.lora_B.detach().clone())
                       for layer in qdylora_layers(model).values()]
        self._multipliers = torch.tensor(multipliers, dtype=torch.float32)

    def restore(self) -> None:
        with torch.no_grad():
            for layer, a, b in self._saved:
                m = self._multipliers.to(device=a.device, dtype=a.dtype)
                layer.lora_A.copy_(a + m[:, None] * (layer.lora_A - a))
                layer.lora_B.copy_(b + m[None, :] * (layer.lora_B - b))


class _NoRowRule:
    def restore(self) -> None:
        pass


def row_step_rule(model: nn.Module, cfg: QDyLoRAConfig, rank: int):
    """What to wrap around this step's `optimizer.step()` (then call `.restore()`), by cfg.row_steps.

    rank is the step's largest trained rank. hold: put the rows above it back; momentum: let AdamW
    move every row; balanced: also scale row i's step by 1/sqrt(P(row i trained)).
    """
    if cfg.row_steps == "hold":
        return UntrainedRowGuard(model, rank, cfg.update)
    if cfg.row_steps == "balanced":
        return BalancedRowSteps(model, balanced_row_multipliers(cfg))
    return _NoRowRule()
