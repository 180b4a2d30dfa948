"""The training configuration: every choice that decides a run, validated on creation.

Torch-free on purpose, so the dashboard can check a form without importing torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from core.config_io import ConfigDict
from core.errors import UserError
from core.model_spec import ModelSpec
from core.qdylora.config import QDyLoRAConfig
from core.validation import number_problem

LR_SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class TrainConfig(ConfigDict):
    """Everything that decides a training run; saved resolved into the run folder."""

    data: str = field(metadata={"help": "Training data: JSONL (prompt/response or messages) or CSV."})
    out: str = field(metadata={"help": "Run folder to create (must be missing or empty)."})
    prompt_col: str = field(default="prompt", metadata={"help": "CSV/JSONL field holding the prompt."})
    response_col: str = field(default="response", metadata={"help": "CSV/JSONL field holding the answer."})
    model: str = field(default="default", metadata={"help": "'default' (bundled SmolLM2-135M-Instruct), a local HF folder or a hub id."})
    quant: str = field(default="nf4", metadata={"help": "nf4 (4-bit base, QLoRA) or none (base in compute dtype)."})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda."})
    r_max: int = field(default=64, metadata={"help": "Largest rank; every rank 1..r_max is usable after training."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; scale alpha/b at rank b."})
    dropout: float = field(default=0.05, metadata={"help": "Adapter input dropout."})
    target_modules: list[str] | None = field(default=None, metadata={"help": "Leaf names to adapt; None = all block linears."})
    rank_sampling: str = field(default="uniform", metadata={"help": "uniform | pow2 | low | high | list."})
    rank_list: list[int] | None = field(default=None, metadata={"help": "Ranks for rank_sampling=list."})
    update: str = field(default="full", metadata={"help": "full (rows 1..b learn) or frozen (only row b learns)."})
    steps: int = field(default=200, metadata={"help": "Optimizer steps in total (a resumed run continues to this)."})
    batch_size: int = field(default=4, metadata={"help": "Examples per micro-batch."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimizer step (same rank for all of them)."})
    lr: float = field(default=2e-4, metadata={"help": "Peak learning rate (AdamW)."})
    lr_schedule: str = field(default="constant", metadata={"help": "constant (QLoRA default), linear or cosine decay after warmup."})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Share of steps with linear warmup."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on adapters."})
    max_grad_norm: float = field(default=0.3, metadata={"help": "Gradient clipping (QLoRA uses 0.3); 0 disables."})
    max_length: int = field(default=256, metadata={"help": "Tokens per example; longer ones are cut (counted in data_report.json)."})
    seed: int = field(default=42, metadata={"help": "Seed for init, data order, dropout and rank draws."})
    checkpoint_every: int = field(default=10, metadata={"help": "Save a resumable checkpoint every N steps (and on cancel)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for activation memory (non-reentrant)."})

    def __post_init__(self):
        problems = []
        for name in ("steps", "batch_size", "grad_accum", "max_length", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            problems.append(f"lr must be in (0, 1), got {self.lr!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            problems.append(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        problems += filter(None, (number_problem("max_grad_norm", self.max_grad_norm, lo=0, note="0 disables clipping"),
                                  number_problem("weight_decay", self.weight_decay, lo=0)))
        if isinstance(self.max_length, int) and self.max_length < 8:
            problems.append(f"max_length must be at least 8, got {self.max_length}")
        try:
            self.qdylora_config()
        except ValueError as exc:
            problems.append(str(exc))
        try:
            self.model_spec()
        except UserError as exc:
            problems.append(str(exc))
        if problems:
            raise UserError("invalid training config: " + "; ".join(problems))

    def qdylora_config(self) -> QDyLoRAConfig:
        return QDyLoRAConfig(
            r_max=self.r_max, alpha=self.alpha, dropout=self.dropout, target_modules=self.target_modules,
            rank_sampling=self.rank_sampling, rank_list=self.rank_list, update=self.update,
        )

    def model_spec(self) -> ModelSpec:
        return ModelSpec(name_or_path=self.model, quant=self.quant, device=self.device)
