"""Time and memory of a training run, estimated before launch (a rough guide, not a promise).

Calibrated on a 2-core AVX2 CPU (docs: shared/docs/offline.md) with SmolLM2-135M
(134.5 M parameters), LoRA r=16 on all block linears, batch 4 × 128 tokens:
3.8–5.0 s per step with a float32 base, 4.8–6.0 s with NF4; weights take 538 MB in
float32 and ~168 MB in NF4; a default-model NF4 run with batch 4 on the sample data
peaks at ~2.2 GB resident memory. Everything else scales from the model's shape:

- time per step ∝ tokens per step × 4 × parameters (forward 2N, backward through the
  frozen base 2N: no weight gradients) + attention, divided by a calibrated throughput;
  NF4 pays ~25 % for dequantizing weights on every matmul;
- memory = process baseline + weights + adapter (weights, gradients, 2 AdamW moments)
  + activations kept for backward + logits.

Real numbers vary with the machine, other load and the length of the examples.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Measured: 4 × 128 tokens × 4 × 134.5e6 FLOP in ~4.4 s (float32 base) → ~62 GFLOP/s.
CPU_FLOPS = 62e9
GPU_FLOPS = 25e12           # a modest share of a recent GPU's bf16 peak
NF4_SLOWDOWN = 1.23         # 5.4 s / 4.4 s measured
STEP_OVERHEAD_S = {"cpu": 0.05, "cuda": 0.02}
PROCESS_BASELINE_MB = 450   # python + torch + transformers, before any weights (measured RSS)
NF4_BITS = 4.127            # 4 bits + double-quantized block scales
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ADAPTER_BYTES_PER_PARAM = 16  # float32 weight + gradient + AdamW exp_avg + exp_avg_sq
ACCURACY_NOTE = "Estimate only: real runs can be 2× slower (other load, longer examples) or faster."

# SmolLM2-135M-Instruct, the bundled default: used when its folder is not at hand.
DEFAULT_SHAPE = {
    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
    "tie_word_embeddings": True,
}


@dataclass
class ModelShape:
    """What the estimate needs to know about a decoder-only transformer."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = True

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelShape":
        """From a transformers `config.json` dict (Llama-style names; a few aliases)."""
        hidden = int(cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model"))
        heads = int(cfg.get("num_attention_heads") or cfg.get("n_head") or 1)
        return cls(
            hidden=hidden,
            intermediate=int(cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * hidden),
            layers=int(cfg.get("num_hidden_layers") or cfg.get("n_layer")),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            vocab=int(cfg.get("vocab_size")),
            tied=bool(cfg.get("tie_word_embeddings", True)),
        )

    @property
    def head_dim(self) -> int:
        return self.hidden // max(1, self.heads)

    def block_linears(self) -> list[tuple[int, int]]:
        """(in, out) of the linear layers of one block: q, k, v, o, gate, up, down."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.block_linears())

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def params(self) -> int:
        norms = (2 * self.layers + 1) * self.hidden
        return self.linear_params + self.embedding_params + norms

    def adapter_params(self, rank: int) -> int:
        return rank * self.layers * sum(a + b for a, b in self.block_linears())


@dataclass
class Estimate:
    """The numbers shown before launch. All times in seconds, memory in MB."""

    seconds_per_step: float
    load_seconds: float
    total_seconds: float
    total_low: float
    total_high: float
    memory_mb: float
    memory_parts: dict[str, float]
    model_params: int
    adapter_params: int
    tokens_per_step: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One sentence for people."""
        return (f"About {format_duration(self.total_seconds)} "
                f"(between {format_duration(self.total_low)} and {format_duration(self.total_high)}; "
                f"{self.seconds_per_step:.2g} s per step) and about {self.memory_mb / 1024:.1f} GB of memory. "
                + ACCURACY_NOTE)


def format_duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def model_shape(model: str, cache_folder: Path | None = None) -> ModelShape:
    """The shape of 'default' or of a local model folder, read from config.json only
    (no weights are loaded, the default model is never converted here)."""
    if model == "default":
        folder = cache_folder
        if folder is not None and (Path(folder) / "config.json").is_file():
            return ModelShape.from_config(json.loads((Path(folder) / "config.json").read_text()))
        return ModelShape.from_config(DEFAULT_SHAPE)
    cfg = Path(model).expanduser() / "config.json"
    if not cfg.is_file():
        raise ValueError(f"{model} has no config.json")
    return ModelShape.from_config(json.loads(cfg.read_text()))


def estimate_training(
    shape: ModelShape,
    *,
    quant: str = "nf4",
    r_max: int = 64,
    batch_size: int = 4,
    max_length: int = 256,
    steps: int = 200,
    grad_accum: int = 1,
    device: str = "cpu",
    tokens_per_example: float | None = None,
    rank_sampling: str = "uniform",
) -> Estimate:
    """Estimate time and memory of a run (see the module docstring for the model).

    tokens_per_example: typical length of an example (prompt + answer + chat template),
        when known from the data; examples are cut at max_length. Without it every
        example is taken to be max_length long (an upper bound).
    rank_sampling: the mean sampled rank sets the adapter's share of the compute.
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    if quant not in ("nf4", "none"):
        raise ValueError(f"quant must be nf4 or none, got {quant!r}")
    for name, value in (("r_max", r_max), ("batch_size", batch_size), ("max_length", max_length),
                        ("steps", steps), ("grad_accum", grad_accum)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    notes: list[str] = []
    length = float(max_length)
    if tokens_per_example:
        # A batch is padded to its longest example: ~1.3 × the typical length.
        length = min(float(max_length), 1.3 * float(tokens_per_example))
    tokens = int(round(batch_size * grad_accum * length))
    n = shape.params
    if rank_sampling == "pow2":
        from core.qdylora.config import QDyLoRAConfig   # torch-free, as is sampling
        from core.qdylora.sampling import candidate_ranks

        powers = candidate_ranks(QDyLoRAConfig(r_max=r_max, rank_sampling="pow2"))[0]
        mean_rank = sum(powers) / len(powers)
    else:
        mean_rank = {"low": r_max / 3, "high": 2 * r_max / 3}.get(rank_sampling, (r_max + 1) / 2)
    adapter_flops = 6 * shape.adapter_params(1) * mean_rank          # trained: fwd + both grads
    attention_flops = 3 * 4 * shape.layers * length * shape.hidden    # QKᵀ and AV, fwd + bwd
    flops_per_token = 4 * n + adapter_flops + attention_flops
    flops = CPU_FLOPS if device == "cpu" else GPU_FLOPS
    per_step = tokens * flops_per_token / flops
    if quant == "nf4":
        per_step *= NF4_SLOWDOWN
    per_step += STEP_OVERHEAD_S[device]
    load = 3.0 + n * 6e-8
    total = load + steps * per_step
    if device == "cpu" and quant == "none" and n > 1e9:
        notes.append("A float32 base of this size needs a lot of memory: consider nf4.")

    dtype_bytes = 4 if device == "cpu" else 2
    if quant == "nf4":
        weights = shape.linear_params * NF4_BITS / 8 + shape.embedding_params * dtype_bytes
    else:
        weights = (shape.linear_params + shape.embedding_params) * dtype_bytes
    adapter_p = shape.adapter_params(r_max)
    adapter = adapter_p * ADAPTER_BYTES_PER_PARAM
    micro_tokens = batch_size * length
    activations = micro_tokens * shape.layers * (14 * shape.hidden + 5 * shape.intermediate) * dtype_bytes
    logits = 3 * micro_tokens * shape.vocab * 4                       # logits, float copy, gradient
    parts = {
        "process": float(PROCESS_BASELINE_MB if device == "cpu" else 0),
        "base weights": weights / 2**20,
        "adapter + optimizer": adapter / 2**20,
        "activations": activations / 2**20,
        "logits": logits / 2**20,
    }
    memory = sum(parts.values())
    if device == "cuda":
        notes.append("GPU memory only; the process also uses some ordinary memory.")
    return Estimate(
        seconds_per_step=per_step, load_seconds=load, total_seconds=total,
        total_low=load + steps * per_step * 0.7, total_high=load + steps * per_step * 2.0,
        memory_mb=memory, memory_parts=parts, model_params=n, adapter_params=adapter_p,
        tokens_per_step=tokens, notes=notes,
    )
