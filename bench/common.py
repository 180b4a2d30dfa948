"""Shared helpers for the benchmark scripts in bench/.

Everything model-related goes through the library (core.*); this module only adds
what a benchmark needs around it: machine info, result files, timing, a plain PEFT
LoRA baseline that follows core/train.py's recipe step for step, and a random
Llama-shaped model folder for the memory benchmark.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core import threads  # noqa: E402

# Every benchmark is a job: passive OpenMP waits, one thread per core, adjusted to a busy machine
# (core/threads.py; RANK_STUDIO_THREADS=off measures the libraries' own defaults). Before torch starts.
THREAD_POLICY = threads.configure_job()

import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

RESULTS = ROOT / "bench" / "results"
TMP = RESULTS / "tmp"  # git-ignored scratch space (runs, sweeps, model folders)
SAMPLE = ROOT / "sample_data"
TRAIN_FILE = SAMPLE / "train.jsonl"
EVAL_FILE = SAMPLE / "eval.jsonl"


# ----------------------------------------------------------------------------- machine


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "core"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return f"{commit} (core/ has uncommitted changes)" if commit and dirty else commit
    except (OSError, subprocess.SubprocessError):
        return None


def device() -> str:
    from core.models import pick_device

    return pick_device("auto")


def machine_info() -> dict:
    import psutil
    import transformers

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "ram_available_gb": round(psutil.virtual_memory().available / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device(),
        "loadavg": loadavg(),
        "platform": platform.platform(),
        "omp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "MKL_", "KMP_", "MALLOC_", "RANK_STUDIO_THREADS"))},
        "thread_policy": threads.describe(),
    }
    for pkg in ("peft", "bitsandbytes"):
        try:
            info[pkg] = __import__(pkg).__version__
        except ImportError:
            info[pkg] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_result(name: str, data: dict, started_info: dict | None = None) -> Path:
    """bench/results/<name>.json with the numbers, machine info at start, and load average at the end."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": started_info or machine_info(), "loadavg_end": loadavg()} | data
    path = RESULTS / f"{name}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default))
    tmp.replace(path)
    print(f"wrote {path.relative_to(ROOT)}")
    return path


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def result_name(name: str, quick: bool, tag: str = "") -> str:
    """<name>[_<tag>][_quick]: a --tag run lies beside the main result, a --quick run never overwrites a real one."""
    name = f"{name}_{tag}" if tag else name
    return f"{name}_quick" if quick else name


# ----------------------------------------------------------------------------- timing


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Timer:
    def __enter__(self):
        sync()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync()
        self.s = time.perf_counter() - self.t0


def med(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def describe(values) -> dict:
    """median, min, max, n of a list of numbers (rounded for the JSON)."""
    values = [float(v) for v in values]
    if not values:
        return {"n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "mean": statistics.fmean(values)}


def median_ci(values, n_boot: int = 5000, seed: int = 0, confidence: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of the median (how sure the median of a few noisy rounds is)."""
    import numpy as np

    v = np.asarray([float(x) for x in values])
    if v.size < 2:
        return [float("nan"), float("nan")]
    idx = np.random.default_rng(seed).integers(0, v.size, size=(n_boot, v.size))
    meds = np.median(v[idx], axis=1)
    a = (1 - confidence) / 2
    return [float(np.quantile(meds, a)), float(np.quantile(meds, 1 - a))]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {loadavg()}] {message}", flush=True)


# ----------------------------------------------------------------------------- PEFT baseline


BLOCK_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def block_linear_names(model) -> list[str]:
    """Leaf names of every linear the library adapts by default (all block linears, no head)."""
    from core.qdylora.inject import find_target_modules

    return sorted({name.rsplit(".", 1)[-1] for name in find_target_modules(model, None)})


class PeftLoRATrainer:
    """Plain QLoRA baseline: peft.get_peft_model(LoraConfig(r, alpha, dropout, all block linears)),
    with scale alpha/r, or alpha/sqrt(r) when use_rslora (rsLoRA).

    Follows core.train.Trainer's recipe exactly: same encoded data (core.train.encode_dataset),
    same batch order (core.train.BatchOrder, same seed), AdamW on the trainable params,
    loss on response tokens, clip_grad_norm_, the same LambdaLR schedule (core.train.lr_lambda).
    What it does not do (because plain LoRA trains every row): set_rank and UntrainedRowGuard.
    """

    def __init__(self, cfg, rank: int, model=None, tokenizer=None, resolved=None, examples=None, use_rslora: bool = False):
        from peft import LoraConfig, get_peft_model

        from core.data import load_training_data
        from core.models import load_base_model
        from core.train import BatchOrder, encode_dataset, lr_lambda

        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        if model is None:
            model, tokenizer, resolved = load_base_model(cfg.model_spec())
        self.tokenizer, self.resolved = tokenizer, resolved
        targets = cfg.target_modules or block_linear_names(model)
        lcfg = LoraConfig(r=rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                          bias="none", task_type="CAUSAL_LM", use_rslora=use_rslora)
        self.model = get_peft_model(model, lcfg)
        self.model.config.use_cache = False
        if cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if examples is None:
            data = load_training_data(cfg.data, prompt_col=cfg.prompt_col, response_col=cfg.response_col)
            examples, _ = encode_dataset(tokenizer, data.examples, cfg.max_length)
        self.examples = examples
        self.order = BatchOrder(len(self.examples), cfg.batch_size, cfg.seed)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = int(round(cfg.warmup_ratio * cfg.steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg.lr_schedule, cfg.steps, warmup))
        self.step = 0
        self.losses: list[float] = []

    def micro_batch(self, k: int) -> dict:
        from core.prompting import collate

        batch = collate([self.examples[i] for i in self.order.indices(k)], self.tokenizer.pad_token_id)
        return {key: value.to(self.resolved.device) for key, value in batch.items()}

    def train_step(self, batch: dict | None = None) -> float:
        """One optimizer step, as core.train.Trainer.train_step minus set_rank and the row guard."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(self.cfg.grad_accum):
            b = batch if batch is not None else self.micro_batch(self.step * self.cfg.grad_accum + micro)
            loss = self.model(**b).loss / self.cfg.grad_accum
            loss.backward()
            total += loss.item()
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        return total

    def train(self, on_step=None) -> list[float]:
        while self.step < self.cfg.steps:
            t0 = time.perf_counter()
            loss = self.train_step()
            self.step += 1
            self.losses.append(loss)
            if on_step:
                on_step(self.step, loss, time.perf_counter() - t0)
        self.model.eval()
        return self.losses


# ----------------------------------------------------------------------------- random Llama folder


def make_random_llama_folder(folder: Path, hidden: int, layers: int, intermediate: int, heads: int,
                             kv_heads: int, seed: int = 0, dtype=torch.bfloat16) -> Path:
    """A random-weight Llama saved as safetensors, with the default model's tokenizer.

    The vocabulary is the default tokenizer's (49152) so the sample data encodes as is.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from core.models import default_model_folder, load_tokenizer

    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    tokenizer = load_tokenizer(str(default_model_folder()))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    del model
    tmp.rename(folder)
    return folder


def quick_llama_folder(name: str) -> Path:
    """The tiny random Llama that --quick smoke runs train instead of the default model."""
    return make_random_llama_folder(TMP / name, hidden=64, layers=2, intermediate=128, heads=4, kv_heads=4)


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())
