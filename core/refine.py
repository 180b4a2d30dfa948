"""Polishing a chosen rank: continue training rank b of a finished run on its own, as a new run.

The new run is an ordinary training run (sweep and export accept it) whose r_max is b, whose
adapter starts as the parent's rank-b adapter (the same ΔW, rescaled when the scale rule
depends on r_max), and which trains at that one rank every step.
"""
from __future__ import annotations

from pathlib import Path

from core import runstate
from core.errors import RunError, UserError
from core.qdylora.config import QDyLoRAConfig, inference_config
from core.train_config import LEGACY_LR_SCHEDULE, TrainConfig, load_run_config

# Not lr_schedule: an unset one follows the refine run's own length (a 200-step parent decays its lr, a
# 20-step polish of it should not; core.train_config.default_lr_schedule).
INHERITED = (
    "data", "prompt_col", "response_col", "model", "quant", "device", "alpha", "dropout", "update", "batch_size",
    "grad_accum", "lr", "warmup_ratio", "weight_decay", "max_grad_norm", "max_length", "seed",
    "checkpoint_every", "gradient_checkpointing",
)


def _parent(run_dir: str | Path) -> tuple[dict, QDyLoRAConfig]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run folder {run_dir} does not exist")
    config = load_run_config(run_dir)
    try:
        qcfg = QDyLoRAConfig.from_dict(config["qdylora"])
    except (TypeError, ValueError) as exc:
        raise RunError(f"{run_dir}/config.json has an unusable qdylora section: {exc}") from exc
    return config, inference_config(qcfg)


ADAPTER_PATH = ("adapter", "adapter.safetensors")  # core.train.ADAPTER_DIR / core.qdylora.inject.ADAPTER_FILE


def check_warm_start(cfg: TrainConfig) -> None:
    """The parent must be a finished run that has rank init_rank; raised before anything is written."""
    config, qcfg = _parent(cfg.init_from)
    status = (runstate.read_status(Path(cfg.init_from)) or {}).get("status", "unknown")
    if status != "completed":
        raise RunError(f"run {cfg.init_from} has not finished (status: {status}); refine a completed run")
    if not Path(cfg.init_from, *ADAPTER_PATH).is_file():
        raise RunError(f"run {cfg.init_from} has no saved adapter")
    if isinstance(cfg.init_rank, bool) or not isinstance(cfg.init_rank, int) or not 1 <= cfg.init_rank <= qcfg.r_max:
        raise UserError(f"rank must be an integer in 1..{qcfg.r_max} (the run's r_max), got {cfg.init_rank!r}")
    if cfg.r_max != cfg.init_rank:
        raise UserError(f"a run warm-started from rank {cfg.init_rank} must have r_max {cfg.init_rank}, got {cfg.r_max}")


def warm_start_state(parent_dir: str | Path, rank: int, new_cfg: QDyLoRAConfig) -> dict:
    """The parent's rank-b adapter as this run's r_max = b adapter, computing the same ΔW under this run's scale."""
    from safetensors.torch import load_file

    from core.qdylora.truncation import inference_adapter_state

    config, parent_inference = _parent(parent_dir)
    trained = QDyLoRAConfig.from_dict(config["qdylora"])
    state = inference_adapter_state(load_file(str(Path(parent_dir, *ADAPTER_PATH))), trained)
    ratio = parent_inference.scale_at(rank) / new_cfg.scale_at(rank)
    out = {}
    for key, tensor in state.items():
        if key.endswith(".lora_A"):
            out[key] = tensor[:rank].clone()
        else:
            out[key] = (tensor[:, :rank] * ratio).clone()
    return out


REFINE_LR = 1e-3   # the default polishing lr after a constant-lr parent, unless the parent trained lower
REFINE_LR_AFTER_DECAY = 3e-4   # ... and after a parent whose lr decayed to 0


def default_refine_lr(parent_train: dict) -> float:
    """The lr a polish run takes unless asked: the parent's, at most REFINE_LR, or at most
    REFINE_LR_AFTER_DECAY when the parent's lr decayed (a run of LINEAR_DECAY_FROM_STEPS steps or more)."""
    # Polishing at the parent's full lr first undoes the cut; at most REFINE_LR reached a dedicated
    # run on recall within 10 steps from a 40-step constant-lr parent (bench/README.md §6.3). A decayed
    # parent ends at lr 0, and 1e-3 from fresh optimizer moments first made its ranks worse: at 200 steps
    # 3e-4 was better at every measured polish length (§6.12).
    decayed = (parent_train.get("lr_schedule") or LEGACY_LR_SCHEDULE) != "constant"
    cap = REFINE_LR_AFTER_DECAY if decayed else REFINE_LR
    return min(float(parent_train.get("lr", cap)), cap)


def refine_config(run: str | Path, rank: int, steps: int, out: str | Path, **overrides) -> TrainConfig:
    """A TrainConfig that continues `run`'s rank b alone, inheriting the parent's recipe unless overridden."""
    config, qcfg = _parent(run)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= qcfg.r_max:
        raise UserError(f"rank must be an integer in 1..{qcfg.r_max} (the run's r_max), got {rank!r}")
    parent = config["train"]
    values = {name: parent[name] for name in INHERITED if name in parent}
    values["lr"] = default_refine_lr(parent)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(
        **values, out=str(out), steps=steps, r_max=rank, rank_sampling="list", rank_list=[rank],
        target_modules=sorted({m.rsplit(".", 1)[-1] for m in config.get("adapted_modules", [])}) or parent.get("target_modules"),
        scale=qcfg.scale, method="qdylora", ranks_per_step=1, extra_ranks="none", distill=0.0,
        init_from=str(run), init_rank=rank,
    )
