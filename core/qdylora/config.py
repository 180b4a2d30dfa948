"""Configuration of the QDyLoRA method (what is adapted, how ranks are drawn and scaled)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from core.config_io import ConfigDict
from core.validation import number_problem

RANK_SAMPLING_CHOICES = ("uniform", "pow2", "low", "high", "list")
UPDATE_CHOICES = ("full", "frozen")
SCALE_CHOICES = ("alpha/b", "alpha/sqrt(b)", "constant", "alpha/sqrt(i)", "alpha/i", "alpha/i^2")
# Rules that scale each row i of the adapter by its own factor, the same at every active rank b:
# rank b's update is sum_{i<=b} s_i B_i A_i (low rows learn faster under Adam, as a dedicated low-rank run would).
PER_ROW_RULES = {"alpha/sqrt(i)": lambda i: 1.0 / math.sqrt(i), "alpha/i": lambda i: 1.0 / i, "alpha/i^2": lambda i: 1.0 / i ** 2}
EXTRA_RANKS_CHOICES = ("none", "max", "min_max")
# What AdamW does to the rows a step did not train (rows above the step's largest rank):
# hold: they stay exactly where they were (their momentum is spent without moving them);
# momentum: they keep moving by AdamW's momentum, as any parameter with a zero gradient does;
# balanced: momentum, and row i's step is scaled by 1/sqrt(P(row i is trained in a step)), so under Adam
#   each row moves on average at the pace of a row of a dedicated run (bench/README.md §6.7).
ROW_STEPS_CHOICES = ("hold", "momentum", "balanced")
# Runs written before the option existed held their untrained rows.
LEGACY_ROW_STEPS = "hold"
METHOD_CHOICES = ("qdylora", "svd")
# Runs written before the scale rule existed were trained with DyLoRA's alpha/b.
LEGACY_SCALE = "alpha/b"
# An svd run's adapter is rewritten as singular directions used at one constant scale (truncation.py).
INFERENCE_SCALE_OF_SVD = "constant"
# Per-row runs are used (exported, merged, refined) as rows at the constant scale with each row's factor folded into B.
INFERENCE_SCALE_OF_ROWS = "constant"
# The scale rule each method trains with when none is asked for: its best in bench/README.md §6.
METHOD_SCALE = {"qdylora": "alpha/i", "svd": "alpha/b"}
# The rank sampling each method trains with when none is asked for (bench/README.md §6.6: pow2 draws the ranks a
# sweep measures, 1, 2, 4, ..., r_max; svd trains at r_max only and records that itself).
METHOD_RANK_SAMPLING = {"qdylora": "pow2", "svd": "uniform"}
# The row-step rule each method trains with when none is asked for (svd trains every row on every step: nothing to hold).
METHOD_ROW_STEPS = {"qdylora": "hold", "svd": "hold"}


def _svd_problems(cfg) -> list[str]:
    """Rank-sampling options asked for with method svd, which trains one adapter at r_max: refused, never dropped."""
    as_trained = [cfg.r_max]   # how an svd run records its training (rank_sampling list, rank_list [r_max])
    asked = [name for name, given in (
        ("rank_sampling", cfg.rank_sampling not in ("uniform", "list") or (cfg.rank_sampling == "list" and cfg.rank_list != as_trained)),
        ("rank_list", cfg.rank_list is not None and cfg.rank_list != as_trained),
        ("ranks_per_step", cfg.ranks_per_step != 1), ("extra_ranks", cfg.extra_ranks != "none"),
        ("distill", cfg.distill != 0), ("update", cfg.update != "full"), ("scale", cfg.scale in PER_ROW_RULES),
        ("row_steps", cfg.row_steps not in (None, "hold"))) if given]
    if not asked:
        return []
    return [f"{', '.join(asked)} {'applies' if len(asked) == 1 else 'apply'} to method qdylora only (method svd trains "
            "one ordinary adapter at r_max and cuts every rank from it); choose method qdylora or leave "
            f"{'it' if len(asked) == 1 else 'them'} at the default"]


@dataclass
class QDyLoRAConfig(ConfigDict):
    r_max: int = field(default=64, metadata={"help": "Largest rank trained; one run serves every rank 1..r_max."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; the adapter's scale at rank b is computed from it by the scale rule."})
    dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapter input during training (0 disables)."})
    target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Leaf names of linear layers to adapt (e.g. q_proj, v_proj); None = every linear layer of the blocks, never the output head."},
    )
    rank_sampling: str | None = field(
        default="uniform",
        metadata={"help": "How b is drawn: uniform over 1..r_max, pow2 (uniform over powers of two <= r_max), low (p ~ 1/b), high (p ~ b), list (uniform over rank_list); None = the method's measured best (METHOD_RANK_SAMPLING)."},
    )
    rank_list: list[int] | None = field(default=None, metadata={"help": "Ranks to draw from when rank_sampling is 'list'."})
    update: str = field(
        default="full",
        metadata={"help": "full: rows 1..b of A and columns of B all learn (QDyLoRA); frozen: only row/column b learns (DyLoRA's nested-dropout default)."},
    )
    scale: str | None = field(
        default=None,
        metadata={"help": "Scale at active rank b: alpha/b (DyLoRA, plain LoRA), alpha/sqrt(b) (rsLoRA), constant (alpha/sqrt(r_max) at every b, so lower ranks are prefixes of the same sum); alpha/i, alpha/sqrt(i): row i scaled by alpha/i (alpha/sqrt(i)) at every b, so low rows learn faster; None = the method's measured best (METHOD_SCALE)."},
    )
    ranks_per_step: int = field(
        default=1,
        metadata={"help": "Ranks trained per optimizer step: 1 = one b for the whole step (DyLoRA); k > 1 = the step's examples are split into k groups, each at its own b, drawn stratified over the sampling distribution (same cost as one rank)."},
    )
    extra_ranks: str = field(
        default="none",
        metadata={"help": "Sandwich rule: besides the sampled rank(s), every step also trains at r_max ('max') or at 1 and r_max ('min_max'), each an extra forward/backward pass."},
    )
    distill: float = field(
        default=0.0,
        metadata={"help": "With extra_ranks, weight in [0, 1] of a KL term pulling the sampled rank's predictions toward r_max's (detached) ones; 0 = plain loss only."},
    )
    row_steps: str | None = field(
        default=None,
        metadata={"help": "What AdamW does to rows a step did not train: hold (they stay put), momentum (they keep moving by their momentum), balanced (momentum, and row i's step scaled by 1/sqrt(P(row i trained)) so every row learns at a dedicated run's pace); None = the method's default (METHOD_ROW_STEPS)."},
    )
    method: str = field(
        default="qdylora",
        metadata={"help": "qdylora: one run trains every rank, rank b uses the first b rows. svd: one dedicated LoRA run at r_max; rank b is the best rank-b approximation (SVD) of each layer's update."},
    )

    def __post_init__(self):
        # Fields left unset take the method's measured default. With an unknown method they stay unset and are not
        # reported: the method's own error says what is wrong.
        unset = set()
        for name, defaults in (("scale", METHOD_SCALE), ("row_steps", METHOD_ROW_STEPS), ("rank_sampling", METHOD_RANK_SAMPLING)):
            if getattr(self, name) is None:
                if self.method in defaults:
                    setattr(self, name, defaults[self.method])
                else:
                    unset.add(name)
        # Names are checked as given, also those the svd method replaces below: a typo is never silently dropped.
        problems = [f"{name} must be one of {', '.join(choices)}, got {value!r}" for name, value, choices in (
            ("rank_sampling", self.rank_sampling, RANK_SAMPLING_CHOICES), ("extra_ranks", self.extra_ranks, EXTRA_RANKS_CHOICES))
            if value not in choices and name not in unset]
        if self.method == "svd":
            problems += _svd_problems(self)
            # SVD truncation trains one dedicated adapter at r_max; record that, not the unused sampling options.
            self.rank_sampling, self.rank_list, self.ranks_per_step, self.extra_ranks, self.distill = (
                "list", [self.r_max] if isinstance(self.r_max, int) else None, 1, "none", 0.0)
        if isinstance(self.r_max, bool) or not isinstance(self.r_max, int) or self.r_max < 1:
            problems.append(f"r_max must be a positive integer, got {self.r_max!r}")
        problems += filter(None, [number_problem("alpha", self.alpha, lo=0, lo_open=True),
                                  number_problem("dropout", self.dropout, lo=0, hi=1, hi_open=True)])
        for name, value, choices in (("update", self.update, UPDATE_CHOICES), ("scale", self.scale, SCALE_CHOICES),
                                     ("method", self.method, METHOD_CHOICES), ("row_steps", self.row_steps, ROW_STEPS_CHOICES)):
            if value not in choices and name not in unset:
                problems.append(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        if self.rank_sampling == "list":
            if not self.rank_list:
                problems.append("rank_sampling 'list' needs a non-empty rank_list")
            elif isinstance(self.r_max, int) and any(isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= self.r_max for b in self.rank_list):
                problems.append(f"rank_list entries must be integers in 1..r_max={self.r_max}, got {self.rank_list}")
        if self.target_modules is not None and not self.target_modules:
            problems.append("target_modules must be None (all linear layers) or a non-empty list")
        if isinstance(self.ranks_per_step, bool) or not isinstance(self.ranks_per_step, int) or self.ranks_per_step < 1:
            problems.append(f"ranks_per_step must be a positive integer, got {self.ranks_per_step!r}")
        distill_problem = number_problem("distill", self.distill, lo=0, hi=1)
        if distill_problem:
            problems.append(distill_problem)
        elif self.distill > 0 and self.extra_ranks == "none":
            problems.append("distill needs extra_ranks 'max' or 'min_max' (the r_max pass is the teacher)")
        if self.update == "frozen" and (self.ranks_per_step != 1 or self.extra_ranks != "none"):
            problems.append("update 'frozen' trains one rank per step: use ranks_per_step 1 and extra_ranks 'none'")
        if self.update == "frozen" and self.row_steps not in (None, "hold"):
            problems.append("update 'frozen' holds every row but the b-th: use row_steps 'hold'")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_dict(cls, data: dict) -> "QDyLoRAConfig":
        return super().from_dict({"scale": LEGACY_SCALE, "row_steps": LEGACY_ROW_STEPS} | data if isinstance(data, dict) else data)

    def scale_at(self, rank: int) -> float:
        return lora_scale(self.alpha, rank, self.scale, self.r_max)


def inference_config(cfg: QDyLoRAConfig) -> QDyLoRAConfig:
    """The config that describes the adapter as it is used after training (scale rule included).

    SVD runs and per-row rules are used in one form: rows at the constant scale, each row's own
    factor folded into B (truncation.inference_adapter_state), so PEFT, merge and refine need one scale.
    """
    if cfg.method == "svd":
        return replace(cfg, scale=INFERENCE_SCALE_OF_SVD)
    if cfg.scale in PER_ROW_RULES:
        return replace(cfg, scale=INFERENCE_SCALE_OF_ROWS)
    return cfg


def lora_scale(alpha: float, rank: int, rule: str = "alpha/b", r_max: int | None = None) -> float:
    """The one place the adapter scale at active rank b is computed (training, inference, merge, export).

    alpha/b: DyLoRA and PEFT's default; alpha/sqrt(b): rsLoRA (PEFT use_rslora); constant:
    alpha/sqrt(r_max) at every b (rsLoRA's scale at the full rank), so rank b's update is the
    sum of the first b rank-one terms, as in a truncated SVD. The per-row rules (alpha/i,
    alpha/sqrt(i)) have no single scale: see row_scales.
    """
    if rank <= 0:
        return 0.0
    if rule == "alpha/b":
        return float(alpha) / float(rank)
    if rule == "alpha/sqrt(b)":
        return float(alpha) / math.sqrt(rank)
    if rule in PER_ROW_RULES:
        raise ValueError(f"scale rule {rule!r} gives each row its own scale: use row_scales")
    if rule == "constant":
        if r_max is None:
            raise ValueError("the constant scale rule needs r_max")
        return float(alpha) / math.sqrt(r_max)
    raise ValueError(f"unknown scale rule {rule!r}; expected one of {', '.join(SCALE_CHOICES)}")


def row_scales(alpha: float, rank: int, rule: str, r_max: int | None = None) -> list[float]:
    """The scale of each of the first `rank` rows at active rank b = rank (one value per row).

    For the per-row rules row i keeps alpha·f(i) at every b; for the others every row gets lora_scale(b).
    """
    if rule in PER_ROW_RULES:
        return [float(alpha) * PER_ROW_RULES[rule](i) for i in range(1, rank + 1)]
    return [lora_scale(alpha, rank, rule, r_max)] * max(rank, 0)


def peft_scale_fields(alpha: float, rank: int, rule: str, r_max: int) -> dict:
    """lora_alpha and use_rslora for a PEFT adapter of rank b whose scale equals ours at b."""
    if rule == "alpha/b":
        return {"lora_alpha": float(alpha), "use_rslora": False}
    if rule == "alpha/sqrt(b)":
        return {"lora_alpha": float(alpha), "use_rslora": True}
    # PEFT scales by lora_alpha / r: writing lora_alpha = s * b gives exactly s.
    return {"lora_alpha": lora_scale(alpha, rank, rule, r_max) * rank, "use_rslora": False}
