"""The training configuration: every choice that decides a run, validated on creation.

Torch-free on purpose, so the dashboard can check a form without importing torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from core.config_io import ConfigDict
from core.errors import RunError, UserError
from core.fileio import DamagedFile, read_json
from core.model_spec import DEVICE_CHOICES, QUANT_CHOICES, ModelSpec
from core.qdylora.config import (
    EXTRA_RANKS_CHOICES, LEGACY_ROW_STEPS, LEGACY_SCALE, METHOD_CHOICES, RANK_SAMPLING_CHOICES, ROW_STEPS_CHOICES, SCALE_CHOICES,
    UPDATE_CHOICES, QDyLoRAConfig,
)
from core.validation import number_problem

LR_SCHEDULES = ("constant", "linear", "cosine")
# An unset lr_schedule is resolved by the run's length (bench/README.md §6.11): a short run is still far from
# fitting its data, and decaying the lr only takes learning away; a long one settles into a much lower loss when
# the lr decays to 0 (every side, the one run most).
LINEAR_DECAY_FROM_STEPS = 100
OPTIMIZERS = ("adamw", "paged_adamw")
BATCHING = ("packed", "padded")
LEGACY_BATCHING = "padded"  # runs saved before packing existed were trained on padded rows
LEGACY_METHOD = "qdylora"   # runs saved before the method option existed sampled ranks
LEGACY_LR_SCHEDULE = "constant"  # the default before it depended on the run's length
# Why the defaults are what they are, in one line for the Train page (numbers: bench/README.md §6).
RECIPE_EVIDENCE = ("Default: QDyLoRA with each adapter row i at scale α/i, ranks 1, 2, 4, … drawn (pow2), lr 3e-3, α 16 — the "
                   "best one-run recipe on the sample data at 40 steps (5 seeds): NLL within +0.0…+3.5 % of a dedicated QLoRA run "
                   "on new wordings and +3…+8 % on verbatim recall at ranks 1–16 (uniform draws: up to +10 %; one constant scale: "
                   "up to +27 %), answers as good at every rank; SVD truncation and α/i² have lower NLL but weaker answers. "
                   "From 100 steps on the lr decays linearly to 0: at 200 steps that halves recall NLL, though recall "
                   "stays about 50 % behind a dedicated run there (2 seeds; no recipe measured closes that at 1–2.8× a run's cost) "
                   "(bench/README.md §6).")
CONFIG_FILE = "config.json"
# The fields of core.models.ResolvedModel (the config's "model" part), named here to stay torch-free.
RESOLVED_MODEL_FIELDS = ("name", "path", "quant", "device", "compute_dtype")


def default_lr_schedule(steps: int) -> str:
    """The schedule of a run whose lr_schedule is unset: linear decay for runs of LINEAR_DECAY_FROM_STEPS steps or more."""
    return "linear" if steps >= LINEAR_DECAY_FROM_STEPS else "constant"


@dataclass
class TrainConfig(ConfigDict):
    """Everything that decides a training run; saved resolved into the run folder."""

    data: str = field(metadata={"help": "Training data: JSONL (prompt/response or messages) or CSV."})
    out: str = field(metadata={"help": "Run folder to create (must be missing or empty)."})
    prompt_col: str = field(default="prompt", metadata={"help": "CSV/JSONL field holding the prompt."})
    response_col: str = field(default="response", metadata={"help": "CSV/JSONL field holding the answer."})
    model: str = field(default="default", metadata={"help": "'default' (bundled SmolLM2-135M-Instruct), a local HF folder or a hub id."})
    quant: str = field(default="nf4", metadata={"choices": QUANT_CHOICES, "help": "nf4 (4-bit base, QLoRA) or none (base in compute dtype)."})
    device: str = field(default="auto", metadata={"choices": DEVICE_CHOICES, "help": "auto, cpu or cuda."})
    r_max: int = field(default=64, metadata={"help": "Largest rank; every rank 1..r_max is usable after training."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; the scale at rank b follows the scale rule (alpha/b, alpha/sqrt(b), constant, or per row alpha/i, alpha/sqrt(i), alpha/i^2)."})
    dropout: float = field(default=0.05, metadata={"help": "Adapter input dropout."})
    target_modules: list[str] | None = field(default=None, metadata={"help": "Leaf names to adapt; None = all block linears."})
    rank_sampling: str | None = field(default=None, metadata={"choices": RANK_SAMPLING_CHOICES, "help": "uniform | pow2 | low | high | list; unset = the method's measured best (pow2 for qdylora: the ranks a sweep measures)."})
    rank_list: list[int] | None = field(default=None, metadata={"help": "Ranks for rank_sampling=list."})
    update: str = field(default="full", metadata={"choices": UPDATE_CHOICES, "help": "full (rows 1..b learn) or frozen (only row b learns)."})
    row_steps: str | None = field(default=None, metadata={"choices": ROW_STEPS_CHOICES, "help": "Rows a step did not train: hold (stay put), momentum (AdamW's momentum moves them) or balanced (momentum, and row i's step scaled by 1/sqrt(P(row i trained))); unset = the method's default."})
    scale: str | None = field(default=None, metadata={"choices": SCALE_CHOICES, "help": "Scale at rank b: alpha/b, alpha/sqrt(b), constant, or per row alpha/i, alpha/sqrt(i), alpha/i^2 (see QDyLoRAConfig); unset = the method's measured best."})
    ranks_per_step: int = field(default=1, metadata={"help": "Ranks per optimizer step (k groups of the step's examples, stratified)."})
    extra_ranks: str = field(default="none", metadata={"choices": EXTRA_RANKS_CHOICES, "help": "Sandwich rule: none, max (also train r_max every step) or min_max."})
    distill: float = field(default=0.0, metadata={"help": "Weight of distilling the sampled rank toward r_max's predictions (needs extra_ranks)."})
    method: str = field(default="qdylora", metadata={"choices": METHOD_CHOICES, "help": "qdylora (one run samples a rank per step; with per-row scales α/i the measured best overall) or svd (one LoRA at r_max, each rank its truncated SVD: lower NLL, weaker answers at low ranks)."})
    init_from: str | None = field(default=None, metadata={"help": "Run folder whose adapter at rank init_rank warm-starts this run (qdylora refine)."})
    init_rank: int | None = field(default=None, metadata={"help": "Rank taken from init_from (this run's r_max)."})
    steps: int = field(default=200, metadata={"help": "Optimizer steps in total (a resumed run continues to this)."})
    batch_size: int = field(default=4, metadata={"help": "Examples per micro-batch."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimizer step (with ranks_per_step > 1 the groups span them)."})
    lr: float = field(default=3e-3, metadata={"help": "Peak learning rate (AdamW); 3e-3 with alpha 16 was best at 40 steps (bench/README.md §6)."})
    lr_schedule: str | None = field(default=None, metadata={"choices": LR_SCHEDULES, "help": "constant (QLoRA's), linear or cosine decay to 0 after warmup; unset = linear from "
                                                                                     f"{LINEAR_DECAY_FROM_STEPS} steps on, constant below (bench/README.md §6.11)."})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Share of steps with linear warmup."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on adapters."})
    optimizer: str = field(default="adamw", metadata={"help": "adamw (torch) or paged_adamw (bitsandbytes' paged AdamW, 32-bit state; CUDA only: absorbs memory spikes as in QLoRA)."})
    max_grad_norm: float = field(default=0.3, metadata={"help": "Gradient clipping (QLoRA uses 0.3); 0 disables."})
    max_length: int = field(default=256, metadata={"help": "Tokens per example; longer ones are cut (counted in data_report.json)."})
    seed: int = field(default=42, metadata={"help": "Seed for init, data order, dropout and rank draws."})
    checkpoint_every: int = field(default=10, metadata={"help": "Save a resumable checkpoint every N steps (and on cancel)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for activation memory (non-reentrant)."})
    batching: str = field(default="packed", metadata={"choices": BATCHING, "help": "packed (short examples of a micro-batch share a row, attention kept "
                                                              "within each: same loss, less padding) or padded (one example per row)."})
    compile: bool = field(default=False, metadata={"help": "Compile the decoder layers with torch.compile: steps ~1.27x faster on CPU, after ~2.5 min of "
                                                           "compiling the first time (~40 s once this machine has compiled them), so worth it from "
                                                           "~210 steps (~65 then); needs a C++ compiler. Dropout masks are drawn another way when compiled, so the run is "
                                                           "not the uncompiled run's twin, only its equal in distribution (bench/README.md §4.3)."})

    def __post_init__(self):
        problems = []
        for name in ("steps", "batch_size", "grad_accum", "max_length", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            problems.append(f"lr must be in (0, 1), got {self.lr!r}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.lr_schedule is None and isinstance(self.steps, int) and not isinstance(self.steps, bool):
            self.lr_schedule = default_lr_schedule(self.steps)
        if self.lr_schedule is not None and self.lr_schedule not in LR_SCHEDULES:   # None: steps is invalid, reported above
            problems.append(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        problems += filter(None, (number_problem("max_grad_norm", self.max_grad_norm, lo=0, note="0 disables clipping"),
                                  number_problem("weight_decay", self.weight_decay, lo=0)))
        if self.batching not in BATCHING:
            problems.append(f"batching must be one of {', '.join(BATCHING)}, got {self.batching!r}")
        if isinstance(self.max_length, int) and self.max_length < 8:
            problems.append(f"max_length must be at least 8, got {self.max_length}")
        try:
            qcfg = self.qdylora_config()
        except ValueError as exc:
            problems.append(str(exc))
        else:
            if all(isinstance(v, int) for v in (self.batch_size, self.grad_accum)) and qcfg.ranks_per_step > self.batch_size * self.grad_accum:
                problems.append(f"ranks_per_step ({qcfg.ranks_per_step}) cannot exceed the examples per step "
                                f"(batch_size × grad_accum = {self.batch_size * self.grad_accum})")
            # The method resolves the scale (when unset) and sampling fields (svd trains at r_max only): keep them resolved.
            self.scale, self.rank_sampling, self.rank_list, self.row_steps = qcfg.scale, qcfg.rank_sampling, qcfg.rank_list, qcfg.row_steps
            self.ranks_per_step, self.extra_ranks, self.distill = qcfg.ranks_per_step, qcfg.extra_ranks, qcfg.distill
        if (self.init_from is None) != (self.init_rank is None):
            problems.append("init_from and init_rank go together")
        try:
            self.model_spec()
        except UserError as exc:
            problems.append(str(exc))
        if problems:
            raise UserError("invalid training config: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        # A run saved before the method, the scale rule or packing existed was a QDyLoRA run trained with
        # alpha/b on padded rows, whatever today's defaults.
        legacy = {"method": LEGACY_METHOD, "scale": LEGACY_SCALE, "batching": LEGACY_BATCHING, "row_steps": LEGACY_ROW_STEPS,
                  "lr_schedule": LEGACY_LR_SCHEDULE}
        return super().from_dict(legacy | data if isinstance(data, dict) else data)

    def qdylora_config(self) -> QDyLoRAConfig:
        return QDyLoRAConfig(
            r_max=self.r_max, alpha=self.alpha, dropout=self.dropout, target_modules=self.target_modules,
            rank_sampling=self.rank_sampling, rank_list=self.rank_list, update=self.update, scale=self.scale, row_steps=self.row_steps,
            ranks_per_step=self.ranks_per_step, extra_ranks=self.extra_ranks, distill=self.distill, method=self.method,
        )

    def model_spec(self) -> ModelSpec:
        return ModelSpec(name_or_path=self.model, quant=self.quant, device=self.device)

    def cli_args(self) -> list[str]:
        """`qdylora train` flags that reproduce this config exactly (without --out)."""
        args = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "out" or value is None or value is False:
                continue
            flag = "--" + f.name.replace("_", "-")
            if value is True:
                args.append(flag)
            elif isinstance(value, list):
                args += [flag, ",".join(map(str, value))]
            else:
                args += [flag, repr(value) if isinstance(value, float) else str(value)]
        return args


def load_run_config(run_dir: Path) -> dict:
    """The run's config.json, checked through: RunError unless every part that using or
    resuming the run reads (train, qdylora, model) is there with the right types."""
    path = Path(run_dir) / CONFIG_FILE
    try:
        data = read_json(path, "run config")
    except FileNotFoundError:
        raise RunError(f"{run_dir} is not a training run folder (no {CONFIG_FILE})") from None
    except DamagedFile as exc:
        raise RunError(f"{exc}; the run cannot be used") from None
    if not isinstance(data, dict) or "train" not in data or "qdylora" not in data:
        hint = " (it belongs to a sweep)" if isinstance(data, dict) and "config" in data else ""
        raise RunError(f"{path} is not a training run config{hint}")
    try:
        TrainConfig.from_dict(data["train"])
        QDyLoRAConfig.from_dict(data["qdylora"])
        model = data.get("model")
        if not isinstance(model, dict) or any(not isinstance(model.get(name), str) for name in RESOLVED_MODEL_FIELDS):
            raise ValueError(f"'model' must name {', '.join(RESOLVED_MODEL_FIELDS)} as texts")
    except (UserError, ValueError) as exc:
        raise RunError(f"{path} is damaged: {str(exc).removeprefix('invalid training config: ')}") from None
    return data
