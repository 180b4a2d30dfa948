"""Configuration of the QDyLoRA method (what is adapted, how ranks are drawn)."""
from __future__ import annotations

from dataclasses import dataclass, field

from core.config_io import ConfigDict
from core.validation import number_problem

RANK_SAMPLING_CHOICES = ("uniform", "pow2", "low", "high", "list")
UPDATE_CHOICES = ("full", "frozen")


@dataclass
class QDyLoRAConfig(ConfigDict):
    r_max: int = field(default=64, metadata={"help": "Largest rank trained; one run serves every rank 1..r_max."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; the adapter is scaled by alpha/b at active rank b."})
    dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapter input during training (0 disables)."})
    target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Leaf names of linear layers to adapt (e.g. q_proj, v_proj); None = every linear layer of the blocks, never the output head."},
    )
    rank_sampling: str = field(
        default="uniform",
        metadata={"help": "How b is drawn each optimizer step: uniform over 1..r_max, pow2 (uniform over powers of two <= r_max), low (p ~ 1/b), high (p ~ b), list (uniform over rank_list)."},
    )
    rank_list: list[int] | None = field(default=None, metadata={"help": "Ranks to draw from when rank_sampling is 'list'."})
    update: str = field(
        default="full",
        metadata={"help": "full: rows 1..b of A and columns of B all learn (QDyLoRA); frozen: only row/column b learns (DyLoRA's nested-dropout default)."},
    )

    def __post_init__(self):
        problems = []
        if not isinstance(self.r_max, int) or self.r_max < 1:
            problems.append(f"r_max must be a positive integer, got {self.r_max!r}")
        problems += filter(None, [number_problem("alpha", self.alpha, lo=0, lo_open=True)])
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.rank_sampling not in RANK_SAMPLING_CHOICES:
            problems.append(f"rank_sampling must be one of {', '.join(RANK_SAMPLING_CHOICES)}, got {self.rank_sampling!r}")
        if self.update not in UPDATE_CHOICES:
            problems.append(f"update must be one of {', '.join(UPDATE_CHOICES)}, got {self.update!r}")
        if self.rank_sampling == "list":
            if not self.rank_list:
                problems.append("rank_sampling 'list' needs a non-empty rank_list")
            elif isinstance(self.r_max, int) and any(not isinstance(b, int) or not 1 <= b <= self.r_max for b in self.rank_list):
                problems.append(f"rank_list entries must be integers in 1..r_max={self.r_max}, got {self.rank_list}")
        if self.target_modules is not None and not self.target_modules:
            problems.append("target_modules must be None (all linear layers) or a non-empty list")
        if problems:
            raise ValueError("; ".join(problems))


def lora_scale(alpha: float, rank: int) -> float:
    """The one place the adapter scale is computed: alpha / b (DyLoRA, PEFT without rsLoRA)."""
    if rank <= 0:
        return 0.0
    return float(alpha) / float(rank)
