"""The rank sweep: quality, latency and memory per rank of one run, and a recommendation.

The run's model is loaded once; switching rank sets a number. Each finished rank is
written to `ranks/rank_<b>.json` at once, and the tables (summary.csv, per_prompt.csv,
sweep.json) are rewritten after every rank, so the dashboard compares the ranks measured
so far while a sweep runs, a cancelled or killed sweep keeps what it measured, and
`--resume` continues with the ranks that are missing.

Where the time goes (issue 12): prompts and references are encoded once for all ranks,
the references' embeddings too; quality (reference NLL, greedy answers) is computed on
the rank merged into a float copy of the base when that copy fits in memory (the same
function as the adapter on the 4-bit base, about twice as fast on a CPU), and the
adapter on the 4-bit base is kept for the latency numbers that describe serving it
unmerged. Each rank measures its latency first, so the time left always includes it.
"""
from __future__ import annotations

import csv
import json
import math
import re
import statistics
import time
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from core import runstate, threads
from core.config_io import ConfigDict
from core.errors import UserError
from core.eta import MovingRate, combined_eta
from core.fileio import DamagedFile, read_json, read_json_object
from core.preflight import check_output_folder, make_output_folder
from core.models import model_footprint_bytes
from core.prompting import collate, encode_example
from core.qdylora import qdylora_layers, set_rank
from core.qdylora.inject import adapter_param_count
from core.qdylora.layer import is_linear4bit

QUALITY_METRICS = ("ref_nll", "rouge_l", "fact_recall", "similarity")
SUMMARY_COLUMNS = [
    "rank", "ref_nll", "ref_nll_lo", "ref_nll_hi", "ppl", "rouge_l", "rouge_l_lo", "rouge_l_hi",
    "fact_recall", "fact_recall_lo", "fact_recall_hi", "similarity", "similarity_lo", "similarity_hi",
    "ttft_ms", "ms_per_token", "tokens_per_s", "ttft_ms_merged", "ms_per_token_merged", "tokens_per_s_merged",
    "adapter_params", "adapter_mb", "base_mb", "peak_mem_mb", "eval_s",
    # spread of the latency medians: fastest and slowest timed generation
    "ttft_ms_lo", "ttft_ms_hi", "ms_per_token_lo", "ms_per_token_hi",
    "ttft_ms_merged_lo", "ttft_ms_merged_hi", "ms_per_token_merged_lo", "ms_per_token_merged_hi",
    "merged_mb", "latency_runs",
    "quality_path",  # merged (rank merged into a float copy of the base) or unmerged (adapter on the loaded base)
]
PER_PROMPT_COLUMNS = ["rank", "id", "prompt", "reference", "answer", "ref_nll", "ref_tokens", "rouge_l", "fact_recall",
                      "similarity", "must_include", "set"]
BY_SET_FILE = "summary_by_set.csv"   # written when the prompts form several named sets
RANKS_DIR = "ranks"
QUALITY_PATHS = ("auto", "merged", "unmerged")
# auto merges when a float copy of the base takes at most this share of the memory available
MERGED_COPY_SHARE = 0.6
PROMPT_RATE_WINDOW = 4    # the time left follows the last 4 batches of prompts ...
LATENCY_RATE_WINDOW = 2   # ... and the last 2 latency measurements (core.eta)
MERGED_LATENCY_NOTE = ("merged latency measured once per sweep process (at its first rank), not at every rank: "
                       "a merged model is the same computation at every rank")
log = logging.getLogger("rank_studio.sweep")


def default_ranks(r_max: int) -> list[int]:
    """0 (the base model) and the ranks the default sampling trains: powers of two up to r_max, plus r_max."""
    from core.qdylora.sampling import powers_of_two_ranks

    return [0] + powers_of_two_ranks(r_max)


def parse_ranks(text: str | list | None, r_max: int) -> list[int]:
    """Ranks from '0,1,2,4' (or a list); every problem is reported at once."""
    if text is None or text == "" or text == []:
        return default_ranks(r_max)
    items = text if isinstance(text, list) else [x.strip() for x in str(text).split(",") if x.strip()]
    ranks, problems = [], []
    for item in items:
        if isinstance(item, bool) or not (isinstance(item, int) or (isinstance(item, str) and re.fullmatch(r"-?\d+", item))):
            problems.append(f"{item!r} is not an integer")
            continue
        value = int(item)
        if not 0 <= value <= r_max:
            problems.append(f"{value} is outside 0..{r_max}")
        else:
            ranks.append(value)
    if problems:
        raise UserError(f"bad --ranks (this run has r_max={r_max}): " + "; ".join(problems))
    if not ranks:
        raise UserError("--ranks lists no rank")
    return sorted(set(ranks))


@dataclass
class SweepConfig(ConfigDict):
    """Everything that decides a sweep; saved resolved in the sweep folder."""

    run: str = field(metadata={"help": "Training run folder to evaluate."})
    prompts: str | list[str] = field(metadata={"help": "Evaluation set (JSONL or CSV) with prompt, reference, optional id, must_include and set; or a list of such files, each a named set."})
    out: str = field(metadata={"help": "Sweep folder to create (missing or empty; existing with resume)."})
    ranks: list[int] | None = field(default=None, metadata={"help": "Ranks to measure; 0 = base model. None = 0 and powers of two up to r_max."})
    prompt_col: str = field(default="prompt", metadata={"help": "Column/key of the prompt."})
    reference_col: str = field(default="reference", metadata={"help": "Column/key of the reference answer."})
    id_col: str = field(default="id", metadata={"help": "Column/key of the prompt id (row number when absent)."})
    must_include_col: str = field(default="must_include", metadata={"help": "Column/key of facts an answer must contain."})
    metrics: list[str] = field(default_factory=lambda: list(QUALITY_METRICS), metadata={"help": "Quality metrics to compute."})
    max_new_tokens: int = field(default=64, metadata={"help": "Greedy answer length limit for ROUGE-L, fact recall and similarity."})
    max_prompts: int | None = field(default=None, metadata={"help": "Use only the first N prompts (quick looks)."})
    batch_size: int = field(default=32, metadata={"help": "Most prompts per forward/generate batch (prompts of similar length "
                                                             "are batched together; larger batches share each step's weight reads)."})
    latency: bool = field(default=True, metadata={"help": "Measure latency per rank, unmerged and merged."})
    latency_repeats: int = field(default=3, metadata={"help": "Timed repeats per latency prompt (median taken after one warm-up)."})
    latency_prompts: int = field(default=2, metadata={"help": "How many prompts latency is measured on (batch size 1)."})
    latency_new_tokens: int = field(default=16, metadata={"help": "Tokens generated per latency measurement."})
    quality_path: str = field(default="auto", metadata={"help": "Model the quality metrics are computed on: merged (rank merged into a "
                                                                 "float copy of the base: same answers, faster), unmerged (adapter on the "
                                                                 "loaded base), or auto (merged when the copy fits in memory)."})
    recommend_metric: str | None = field(default=None, metadata={"help": "Metric the recommendation uses, one of `metrics` (changeable later without re-running); None = the default deciding metric among `metrics` (ref_nll when measured)."})
    threshold: float = field(default=0.95, metadata={"help": "Share of the best rank's score a rank must reach."})
    n_bootstrap: int = field(default=2000, metadata={"help": "Bootstrap resamples for the 95% intervals."})
    seed: int = field(default=0, metadata={"help": "Seed for the bootstrap."})

    def __post_init__(self):
        problems = []
        unknown = [m for m in self.metrics if m not in QUALITY_METRICS]
        if unknown or not self.metrics:
            problems.append(f"metrics must be a non-empty subset of {', '.join(QUALITY_METRICS)}; unknown: {unknown}")
        for name in ("max_new_tokens", "batch_size", "latency_repeats", "latency_prompts", "latency_new_tokens", "n_bootstrap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if self.latency_new_tokens < 2:
            problems.append("latency_new_tokens must be at least 2")
        if self.max_prompts is not None and (not isinstance(self.max_prompts, int) or self.max_prompts < 1):
            problems.append(f"max_prompts must be a positive integer, got {self.max_prompts!r}")
        if self.quality_path not in QUALITY_PATHS:
            problems.append(f"quality_path must be one of {', '.join(QUALITY_PATHS)}, got {self.quality_path!r}")
        if self.recommend_metric is None:
            from core.evaluation.recommend import DEFAULT_METRIC, default_metric

            self.recommend_metric = (default_metric(self.metrics)[0] if self.metrics and not unknown else None) or DEFAULT_METRIC
        if self.recommend_metric not in QUALITY_METRICS:
            problems.append(f"recommend metric must be one of {', '.join(QUALITY_METRICS)}")
        elif self.recommend_metric not in self.metrics and self.metrics and not unknown:
            # Recommending by a metric that is not measured would silently use another one.
            problems.append(f"the recommend metric {self.recommend_metric} is not among the metrics measured "
                            f"({', '.join(self.metrics)}); add it to the metrics or recommend by one of them")
        if not 0 < self.threshold <= 1:
            problems.append(f"threshold must be in (0, 1], got {self.threshold!r}")
        if problems:
            raise UserError("invalid sweep config: " + "; ".join(problems))

    @classmethod
    def from_cli(cls, args) -> "SweepConfig":
        return cls(
            run=args.run or "", prompts=_one_or_list(args.prompts or [""]), out=args.out, ranks=args.ranks, prompt_col=args.prompt_col,
            reference_col=args.reference_col, id_col=args.id_col, must_include_col=args.must_include_col,
            metrics=[m.strip() for m in args.metrics.split(",") if m.strip()], max_new_tokens=args.max_new_tokens,
            max_prompts=args.max_prompts, batch_size=args.batch_size, latency=args.latency == "on",
            latency_repeats=args.latency_repeats, recommend_metric=args.recommend_metric,
            threshold=args.threshold, seed=args.seed, quality_path=getattr(args, "quality_path", None) or "auto",
        )


def _one_or_list(paths: list[str]) -> str | list[str]:
    return paths[0] if len(paths) == 1 else paths


@dataclass
class SweepResult:
    out: Path
    status: str
    ranks_done: list[int]
    recommendation: dict | None
    message: str


# ------------------------------------------------------------------ measurements


def reference_batch(tokenizer, items, max_length: int = 2048) -> dict[str, torch.Tensor]:
    """Prompts followed by their references, labelled on the references, as one padded batch."""
    return collate([encode_example(tokenizer, it.prompt, it.reference, max_length) for it in items], tokenizer.pad_token_id)


def nll_of_batch(model, batch: dict[str, torch.Tensor]) -> list[tuple[float, int]]:
    from core.lm_loss import labelled_nll

    sums, counts = labelled_nll(model, batch)
    return [(float(s), int(c)) for s, c in zip(sums, counts)]


def measure_nll(model, tokenizer, items, batch_size: int, max_length: int = 2048) -> list[tuple[float, int]]:
    """(summed NLL, token count) of each reference given its prompt, by teacher forcing."""
    out = []
    for start in range(0, len(items), batch_size):
        out += nll_of_batch(model, reference_batch(tokenizer, items[start:start + batch_size], max_length))
    return out


@dataclass
class PreparedChunk:
    """One batch of evaluation prompts, encoded once for every rank."""

    items: list
    references: dict[str, torch.Tensor] | None   # for the reference NLL (reference_batch)
    prompts: dict[str, torch.Tensor] | None      # left-padded prompts for generation (core.runs.encode_prompts)

    @property
    def reference_ids(self) -> list[list[int]] | None:
        """The scored reference tokens of each prompt (what reference_batch labels)."""
        if self.references is None:
            return None
        labels = self.references["labels"]
        return [row[row != -100].tolist() for row in labels]


class TokenClock:
    """A `generate` streamer that notes when each new token arrives.

    transformers calls `put` once with the prompt, then once per generated token.
    """

    def __init__(self, device_type: str):
        self.device_type = device_type
        self.start = 0.0
        self.times: list[float] = []
        self._seen_prompt = False

    def put(self, value) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        if self.device_type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _timed_generate(model, inputs, new_tokens: int, pad_token_id: int) -> TokenClock:
    device_type = inputs["input_ids"].device.type
    clock = TokenClock(device_type)
    if device_type == "cuda":
        torch.cuda.synchronize()
    clock.start = time.perf_counter()
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       temperature=None, top_p=None, top_k=None, pad_token_id=pad_token_id, streamer=clock)
    return clock


def measure_latency(model, tokenizer, prompts: list[str], new_tokens: int, repeats: int, suffix: str = "") -> dict:
    """Median time to first token and per later token at batch size 1, after a warm-up,
    with the fastest and slowest timed generation as `_lo` / `_hi` (keys get `suffix`,
    e.g. "_merged", before those) and the number of timed generations.

    Times come from one generation each: TTFT is when the first new token exists
    (prefill + one step); the per-token time is the mean gap between later tokens.
    """
    from core.runs import encode_prompts

    ttfts, per_token = [], []
    device = next(model.parameters()).device
    for prompt in prompts:
        inputs = encode_prompts(tokenizer, [prompt], device)
        pad = tokenizer.pad_token_id
        _timed_generate(model, inputs, 2, pad)  # warm-up: allocator, kernels, caches
        for _ in range(repeats):
            clock = _timed_generate(model, inputs, new_tokens, pad)
            ttfts.append((clock.times[0] - clock.start) * 1000)
            per_token.append((clock.times[-1] - clock.times[0]) * 1000 / (len(clock.times) - 1))
    ms_per_token = statistics.median(per_token)
    out = {"tokens_per_s" + suffix: 1000.0 / ms_per_token if ms_per_token > 0 else math.nan, "latency_runs": len(per_token)}
    for name, times in (("ttft_ms", ttfts), ("ms_per_token", per_token)):
        out.update({name + suffix: statistics.median(times), f"{name}{suffix}_lo": min(times), f"{name}{suffix}_hi": max(times)})
    return out


class MergedModel:
    """A plain 16/32-bit copy of the base into which one rank at a time is merged.

    W0 is what the run's layers compute with (dequantized NF4 for NF4 runs), so the
    merged model at rank b computes the same function as the adapter at rank b. W0 is
    dequantized again at each switch rather than kept: a kept float W0 would be a second
    full copy of the base in memory.
    """

    def __init__(self, loaded):
        from transformers import AutoModelForCausalLM

        from core.models import dtype_from_name

        dtype = dtype_from_name(loaded.resolved.compute_dtype)
        self.model = AutoModelForCausalLM.from_pretrained(loaded.resolved.path, dtype=dtype, device_map=loaded.device)
        self.model.eval()
        self.layers = qdylora_layers(loaded.model)
        self.rank = None

    @torch.no_grad()
    def set_rank(self, rank: int) -> None:
        if rank == self.rank:
            return
        for name, layer in self.layers.items():
            weight = self.model.get_submodule(name).weight
            weight.copy_((layer.base_weight_float() + layer.delta_weight(rank)).to(weight.dtype))
        self.rank = rank


def float_copy_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes of a copy of `model` (without adapters) with every weight in `dtype`, 4-bit layers unpacked."""
    count, seen = 0, set()
    for module in model.modules():
        if is_linear4bit(module):
            count += module.in_features * module.out_features + (module.bias.numel() if module.bias is not None else 0)
            continue
        for name, param in module.named_parameters(recurse=False):
            if not name.startswith("lora_") and id(param) not in seen:   # tied embeddings count once
                seen.add(id(param))
                count += param.numel()
    return count * torch.empty((), dtype=dtype).element_size()


def available_memory_bytes(device: str) -> int:
    if device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[0])
    import psutil

    return int(psutil.virtual_memory().available)


def planned_float_copy_bytes(run_config: dict) -> tuple[int | None, str]:
    """(float_copy_bytes, device) of a run's base as a sweep would load it, from its config alone (no
    weights read); None bytes when the architecture cannot be built without its weights."""
    from core.model_spec import ModelSpec
    from core.models import dtype_from_name, resolve_model
    from core.preflight import model_skeleton

    resolved = resolve_model(ModelSpec(name_or_path=run_config["train"]["model"], quant=run_config["model"]["quant"]))
    skeleton = model_skeleton(resolved.path)
    need = float_copy_bytes(skeleton, dtype_from_name(resolved.compute_dtype)) if skeleton is not None else None
    return need, resolved.device


def choose_quality_path(wanted: str, need: int | None, have: int, copies: int = 1) -> tuple[str, str]:
    """('merged' | 'unmerged', why) for the quality metrics of a sweep: with `wanted` auto, merged when
    `copies` float copies of `need` bytes (one per worker sharing the memory) fit in `have`."""
    if wanted != "auto":
        return wanted, f"quality computed {wanted}, as asked"
    if need is None:
        return "unmerged", ("quality computed with the adapter on the loaded base: the size of a float copy of this "
                            "base could not be known before the workers load it")
    if copies * need <= MERGED_COPY_SHARE * have:
        return "merged", (f"quality computed on each rank merged into a float copy of the base ({need / 2**20:.0f} MB; "
                          "same answers as the adapter, faster)")
    copy = f"a float copy ({need / 2**20:.0f} MB)" if copies == 1 else f"{copies} float copies ({need / 2**20:.0f} MB each)"
    return "unmerged", (f"quality computed with the adapter on the loaded base: {copy} "
                        f"would not fit in the {have / 2**20:.0f} MB available")


class PeakMemory:
    """Peak memory while a rank is evaluated: CUDA allocator peak, or sampled process RSS on CPU."""

    def __init__(self, device: str):
        self.device = device
        self.peak = 0.0

    def start(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        self.peak = runstate.memory_mb(self.device)

    def sample(self) -> None:
        self.peak = max(self.peak, runstate.memory_mb(self.device))


# ------------------------------------------------------------------ summary


def summarize_rank(rank: int, rows: list[dict], metrics: list[str], cfg: SweepConfig) -> dict:
    from core.evaluation.metrics import perplexity
    from core.evaluation.stats import bootstrap_mean_ci, bootstrap_ratio_ci

    summary: dict = {"rank": rank}
    if "ref_nll" in metrics:
        interval = bootstrap_ratio_ci([r["ref_nll"] * r["ref_tokens"] for r in rows], [r["ref_tokens"] for r in rows],
                                      n_resamples=cfg.n_bootstrap, seed=cfg.seed)
        summary.update(ref_nll=interval.mean, ref_nll_lo=interval.lo, ref_nll_hi=interval.hi, ppl=perplexity(interval.mean))
    for name in ("rouge_l", "fact_recall", "similarity"):
        if name in metrics:
            interval = bootstrap_mean_ci([r.get(name) for r in rows], n_resamples=cfg.n_bootstrap, seed=cfg.seed)
            summary.update({name: interval.mean, f"{name}_lo": interval.lo, f"{name}_hi": interval.hi})
    return summary


def summaries_by_set(results: dict[int, dict], cfg: SweepConfig) -> list[dict]:
    """Quality per (named set, rank) when the prompts form more than one set; [] otherwise."""
    sets = list(dict.fromkeys(row.get("set", "") for b in sorted(results) for row in results[b]["rows"]))
    if len(sets) < 2:
        return []
    metrics = [m for m in cfg.metrics if any(m in row for b in results for row in results[b]["rows"])]
    return [{"set": name} | summarize_rank(b, [r for r in results[b]["rows"] if r.get("set", "") == name], metrics, cfg)
            for name in sets for b in sorted(results)]


def write_table(path: Path, columns: list[str], rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v) for k, v in row.items()})
    tmp.replace(path)


def read_rank_results(out: Path) -> dict[int, dict]:
    results = {}
    folder = out / RANKS_DIR
    if folder.is_dir():
        for path in folder.glob("rank_*.json"):
            data = read_json_object(path)
            try:
                results[int(data["summary"]["rank"])] = data
            except (TypeError, KeyError, ValueError):
                continue  # a damaged file: that rank is measured again
    return results


def write_outputs(out: Path, cfg: SweepConfig, results: dict[int, dict], notes: list[str], skipped: list, run_meta: dict) -> dict | None:
    from core.evaluation.recommend import recommend_rank

    ranks = sorted(results)
    summary = [results[b]["summary"] for b in ranks]
    per_prompt = [row for b in ranks for row in results[b]["rows"]]
    # summary.csv last: readers take its change as the sign that the other tables are new too.
    write_table(out / "per_prompt.csv", PER_PROMPT_COLUMNS, per_prompt)
    by_set = summaries_by_set(results, cfg)
    if by_set:
        write_table(out / BY_SET_FILE, ["set", *SUMMARY_COLUMNS[:SUMMARY_COLUMNS.index("ttft_ms")]], by_set)
    write_table(out / "summary.csv", SUMMARY_COLUMNS, summary)
    recommendation = None
    metric = cfg.recommend_metric if cfg.recommend_metric in cfg.metrics else cfg.metrics[0]
    if any(b > 0 for b in ranks):
        try:
            recommendation = recommend_rank(per_prompt, metric, cfg.threshold, n_resamples=cfg.n_bootstrap,
                                            seed=cfg.seed).to_dict()
            recommendation.pop("table", None)
        except ValueError as exc:
            notes = notes + [f"no recommendation: {exc}"]
    runstate.write_json_atomic(out / "sweep.json", {
        "config": cfg.to_dict(), "run": str(Path(cfg.run).resolve()), "run_meta": run_meta,
        "ranks_done": ranks, "recommendation": recommendation, "skipped_rows": skipped, "notes": notes,
    })
    return recommendation


def recommend_from_sweep(sweep_dir: Path, metric: str, threshold: float):
    """Recommendation from a sweep's per_prompt.csv with any metric and threshold, no re-run."""
    from core.evaluation.recommend import recommend_rank
    from core.evaluation.summary import read_per_prompt

    per_prompt = read_per_prompt(sweep_dir)
    if metric not in per_prompt.columns or per_prompt[metric].isna().all():
        raise UserError(f"sweep {sweep_dir} did not measure {metric}")
    saved = (read_json_object(Path(sweep_dir) / "config.json") or {}).get("config")
    saved = saved if isinstance(saved, dict) else {}

    def setting(name: str, default: int) -> int:
        value = saved.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default

    try:
        # the sweep's own resamples and seed, so the same question gets the sweep's answer
        return recommend_rank(per_prompt, metric, threshold, n_resamples=max(1, setting("n_bootstrap", 2000)),
                              seed=setting("seed", 0))
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def load_sweep_config(out: Path) -> SweepConfig:
    """The config a sweep folder was started with (for --resume), checked through."""
    saved = Path(out) / "config.json"
    try:
        data = read_json(saved, "sweep config")
    except FileNotFoundError:
        raise UserError(f"{out} is not a sweep folder to resume (no config.json)") from None
    except DamagedFile as exc:
        raise UserError(f"{exc}; the sweep cannot be resumed, start a new one") from None
    if isinstance(data, dict) and "train" in data:
        raise UserError(f"{out} is a training run folder, not a sweep; continue a run with "
                        f"`qdylora train --resume --out {out}`")
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise UserError(f"{saved} is not a sweep config")
    try:
        return SweepConfig.from_dict(data["config"] | {"out": str(out)})
    except UserError as exc:
        raise UserError(f"{saved} is damaged: {str(exc).removeprefix('invalid sweep config: ')}") from None


# ------------------------------------------------------------------ the sweep


class Sweep:
    def __init__(self, cfg: SweepConfig, resume: bool, on_event=None, should_stop=None):
        self.cfg, self.resume = cfg, resume
        self.out = Path(cfg.out)
        self.on_event = on_event or (lambda e: None)
        self.should_stop = should_stop or (lambda: False)
        self._log_handler = None
        self.workers_note: str | None = None  # fewer sweep workers than asked for, and why
        self.notes: list[str] = []
        self.model_meta: dict | None = None
        self.quality_path: str | None = None          # merged | unmerged, once decided
        self.threads_meta: list[dict] | None = None  # the workers' thread policies (else this process's)

    def _emit(self, event: dict) -> None:
        event.setdefault("time", time.time())
        runstate.append_event(self.out, event)
        self.on_event(event)

    def validate(self) -> None:
        """Every check that needs no model, before anything is written."""
        self._check_folder()
        self._read_inputs()

    def _check_folder(self) -> None:
        check_output_folder(self.cfg.out)  # the text as given: Path("") would read as "."
        if self.resume:
            self.cfg = load_sweep_config(self.out)
            status = runstate.read_status(self.out)
            if status and status.get("status") == "running":
                raise UserError(f"sweep {self.out} is still running (pid {status.get('pid')})")
        elif not runstate.folder_is_empty_or_missing(self.out):
            raise UserError(f"output folder {self.out} already holds files; choose a new folder or use --resume")

    def _read_inputs(self) -> None:
        from core.data import load_eval_sets
        from core.runs import run_info

        info = run_info(Path(self.cfg.run))
        if not info["has_adapter"]:
            raise UserError(f"run {self.cfg.run} has no saved adapter yet; wait for it to finish or resume it")
        self.r_max = info["config"]["qdylora"]["r_max"]
        self.ranks = parse_ranks(self.cfg.ranks, self.r_max)
        self.cfg.ranks = self.ranks
        eval_set = load_eval_sets(self.cfg.prompts, prompt_col=self.cfg.prompt_col, reference_col=self.cfg.reference_col,
                                  id_col=self.cfg.id_col, must_include_col=self.cfg.must_include_col)
        self.items = eval_set.items[: self.cfg.max_prompts] if self.cfg.max_prompts else eval_set.items
        if not self.items:
            raise UserError(f"{self.cfg.prompts}: no evaluation prompts")
        self.skipped = list(eval_set.skipped) + [{"warning": w} for w in eval_set.warnings]
        self.run_status = info["status"]
        self.run_config = info["config"]

    def setup(self) -> None:
        self._open_folder()
        self._load_models()

    def _open_folder(self) -> None:
        from core.evaluation.metrics import SemanticSimilarity

        make_output_folder(self.out)
        # The config comes first, so a sweep killed at any later moment can be resumed.
        runstate.write_json_atomic(self.out / "config.json", {"config": self.cfg.to_dict(), "created_at": time.time()})
        self._log_handler = runstate.attach_log(self.out, "sweep.log")
        runstate.write_status(self.out, "running", phase="loading model", ranks=self.ranks)
        self.notes = []
        if self.run_status and self.run_status.get("status") != "completed":
            self.notes.append(f"the run's status is {self.run_status.get('status')!r} at step {self.run_status.get('step')}: its latest adapter was evaluated")
        self.metrics = list(self.cfg.metrics)
        if "similarity" in self.metrics:
            ok, reason = SemanticSimilarity.availability()
            if not ok:
                self.metrics.remove("similarity")
                self.notes.append(reason)
        self.results = read_rank_results(self.out) if self.resume else {}

    def _load_models(self, quality_path: str | None = None) -> None:
        """The run's model (and the similarity model), the model quality is computed on and the prompts
        encoded once: what measuring a rank needs. A sweep worker is given the quality path its sweep chose."""
        from core.evaluation.metrics import SemanticSimilarity
        from core.runs import load_run

        if "similarity" in self.metrics:
            self.similarity = SemanticSimilarity()
        self.loaded = load_run(Path(self.cfg.run))
        self.model_meta = self.loaded.resolved.to_dict()
        self.base_mb = self._base_bytes() / 2**20
        if quality_path is None:
            from core.models import dtype_from_name

            dtype = dtype_from_name(self.loaded.resolved.compute_dtype)
            quality_path = self._choose_quality_path(float_copy_bytes(self.loaded.model, dtype), self.loaded.device)
        self.quality_path = quality_path
        self.merged = MergedModel(self.loaded) if self.cfg.latency or self.quality_path == "merged" else None
        self.chunks = self._prepare_chunks()
        self._reference_embeddings = None
        self.merged_timing: dict | None = None

    def _choose_quality_path(self, copy_bytes: int | None, device: str, copies: int = 1) -> str:
        """Resolve cfg.quality_path (auto: merged when `copies` float copies fit), noting why."""
        quality_path, why = choose_quality_path(self.cfg.quality_path, copy_bytes, available_memory_bytes(device), copies)
        self.notes.append(why)
        log.info(why)
        return quality_path

    def _prepare_chunks(self) -> list[PreparedChunk]:
        """Every batch of prompts encoded once: the same token ids serve every rank.

        Prompts of similar length go together (less padding), in batches of equal size
        (40 prompts at most 32 a batch: two of 20); rows come back in the file's order.
        """
        from core.runs import encode_prompts, prompt_lengths

        needs_answer = any(m in self.metrics for m in ("rouge_l", "fact_recall", "similarity"))
        tok = self.loaded.tokenizer
        lengths = prompt_lengths(tok, [it.prompt for it in self.items])
        order = sorted(range(len(self.items)), key=lambda i: (lengths[i], i))
        n_chunks = math.ceil(len(order) / self.cfg.batch_size)
        chunks = []
        for c in range(n_chunks):
            items = [self.items[i] for i in order[c * len(order) // n_chunks:(c + 1) * len(order) // n_chunks]]
            chunks.append(PreparedChunk(
                items, reference_batch(tok, items) if "ref_nll" in self.metrics else None,
                encode_prompts(tok, [it.prompt for it in items], self.loaded.device) if needs_answer else None))
        return chunks

    def reference_embeddings(self):
        """The references' sentence embeddings, computed once for all ranks."""
        if self._reference_embeddings is None:
            self._reference_embeddings = self.similarity.embed([it.reference for it in self.items])
        return self._reference_embeddings

    def _base_bytes(self) -> int:
        adapter = sum(p.numel() * p.element_size() for layer in qdylora_layers(self.loaded.model).values() for p in (layer.lora_A, layer.lora_B))
        return model_footprint_bytes(self.loaded.model) - adapter

    def _eta(self) -> float | None:
        """Seconds left: recent seconds per prompt × prompts left, plus recent latency timing × timings still to do
        (one per rank left, and the merged model's once: counted at the unmerged rate until it is done)."""
        timings_left = self.latency_left + (1 if self.cfg.latency and self.merged_timing is None else 0)
        return combined_eta([(self.prompt_rate, self.total_units - self.done_units), (self.latency_rate, timings_left)])

    def evaluate_rank(self, rank: int) -> dict | None:
        cfg, loaded = self.cfg, self.loaded
        set_rank(loaded.model, rank)
        if self.merged is not None:
            self.merged.set_rank(rank)
        memory = PeakMemory(loaded.device)
        memory.start()
        t0 = time.time()
        timing = {}
        if cfg.latency:
            threads.adjust()
            self._emit({"event": "phase", "rank": rank, "phase": "latency", "done_units": self.done_units,
                        "total_units": self.total_units, "eta_s": self._eta()})
            timing = self._measure_latency(memory)
            if timing is None:
                return None
            timing["latency_s"] = time.time() - t0   # in ranks/rank_<b>.json, not a summary.csv column
            self.latency_left = max(0, self.latency_left - 1)
        model = self.merged.model if self.quality_path == "merged" else loaded.model
        rows = []
        for chunk in self.chunks:
            if self.should_stop():
                return None
            threads.adjust()
            t_chunk = time.time()
            rows += self._evaluate_chunk(rank, chunk, model)
            self.prompt_rate.add(len(chunk.items), time.time() - t_chunk)
            memory.sample()
            self.done_units += len(chunk.items)
            self._emit({"event": "prompt", "rank": rank, "done": len(rows), "total": len(self.items), "units": len(chunk.items),
                        "done_units": self.done_units, "total_units": self.total_units, "eta_s": self._eta()})
        position = {id(it): i for i, it in enumerate(self.items)}
        rows.sort(key=lambda row: position[row.pop("_item")])   # the file's order, whatever the batching
        if "similarity" in self.metrics:
            for row, score in zip(rows, self.similarity.scores_against([r["answer"] for r in rows], self.reference_embeddings())):
                row["similarity"] = score
        summary = summarize_rank(rank, rows, self.metrics, cfg) | timing
        params = adapter_param_count(loaded.model, rank)
        summary.update(adapter_params=params, adapter_mb=params * 4 / 2**20, base_mb=self.base_mb,
                       peak_mem_mb=memory.peak, eval_s=time.time() - t0, quality_path=self.quality_path)
        return {"summary": summary, "rows": rows}

    def _measure_latency(self, memory: "PeakMemory") -> dict | None:
        """Batch-1 latency with the adapter on the loaded base, then merged; None if asked to stop in between."""
        cfg, loaded = self.cfg, self.loaded
        prompts = [it.prompt for it in self.items[: cfg.latency_prompts]]
        t0 = time.time()
        timing = measure_latency(loaded.model, loaded.tokenizer, prompts, cfg.latency_new_tokens, cfg.latency_repeats)
        self.latency_rate.add(1, time.time() - t0)
        memory.sample()
        if self.should_stop():
            return None
        if self.merged_timing is None:
            # A merged model computes with the same shapes and dtype at every rank (only the values of W0 + ΔW
            # differ), so its speed is measured once per sweep and holds for every rank.
            self.merged_timing = measure_latency(self.merged.model, loaded.tokenizer, prompts, cfg.latency_new_tokens,
                                                 cfg.latency_repeats, suffix="_merged")
            self.merged_timing["merged_mb"] = model_footprint_bytes(self.merged.model) / 2**20
            memory.sample()
        return timing | {k: v for k, v in self.merged_timing.items() if k != "latency_runs"}

    def _evaluate_chunk(self, rank: int, chunk: PreparedChunk, model) -> list[dict]:
        from core.evaluation.metrics import fact_recall, rouge_l_scores
        from core.evaluation.shared_prompt import nll_and_answers
        from core.runs import generate_encoded

        rows = [{"rank": rank, "id": it.id, "prompt": it.prompt, "reference": it.reference,
                 "must_include": json.dumps(list(it.must_include), ensure_ascii=False) if it.must_include else "",
                 "set": it.set, "_item": id(it)}
                for it in chunk.items]
        nll = answers = None
        if chunk.prompts is not None:   # one pass over the prompts for both (core.evaluation.shared_prompt)
            nll, answers = nll_and_answers(model, self.loaded.tokenizer, chunk.prompts, chunk.reference_ids,
                                           self.cfg.max_new_tokens)
        if chunk.references is not None:
            for row, (nll_sum, count) in zip(rows, nll if nll is not None else nll_of_batch(model, chunk.references)):
                row["ref_nll"] = nll_sum / count if count else math.nan
                row["ref_tokens"] = count
        if chunk.prompts is not None:
            if answers is None:
                answers = generate_encoded(model, self.loaded.tokenizer, chunk.prompts, max_new_tokens=self.cfg.max_new_tokens)
            for row, answer in zip(rows, answers):
                row["answer"] = answer
            if "rouge_l" in self.metrics:
                for row, score in zip(rows, rouge_l_scores(answers, [it.reference for it in chunk.items])):
                    row["rouge_l"] = score
            if "fact_recall" in self.metrics:
                for row, it in zip(rows, chunk.items):
                    row["fact_recall"] = fact_recall(row["answer"], it.must_include)
        return rows

    def todo(self) -> list[int]:
        return [b for b in self.ranks if b not in self.results]

    def _reset_counters(self, todo: list[int]) -> None:
        """Progress and time-left counters for measuring `todo`."""
        self.total_units = len(self.ranks) * len(self.items)
        self.done_units = (len(self.ranks) - len(todo)) * len(self.items)
        self.units_at_start = self.done_units
        self.prompt_rate, self.latency_rate = MovingRate(PROMPT_RATE_WINDOW), MovingRate(LATENCY_RATE_WINDOW)
        self.latency_left = len(todo) if self.cfg.latency else 0

    def _begin(self, todo: list[int], **extra) -> tuple[int, int]:
        """The start event; returns (units done before this start, units in all)."""
        self._reset_counters(todo)
        if self.workers_note:
            extra["workers_note"] = self.workers_note
            log.info(self.workers_note)
        self._emit({"event": "start", "ranks": self.ranks, "todo": todo, "prompts": len(self.items),
                    "total_units": self.total_units, "done_units": self.done_units, "notes": self.notes, **extra})
        return self.done_units, self.total_units

    def _rank_finished(self, rank: int, result: dict) -> None:
        (self.out / RANKS_DIR).mkdir(exist_ok=True)
        runstate.write_json_atomic(self.out / RANKS_DIR / f"rank_{rank}.json", result)
        self.results[rank] = result
        # The tables after every rank: Compare & choose shows the ranks measured so far.
        self._write_outputs()
        self._emit({"event": "rank_done", "rank": rank, "summary": result["summary"]})
        log.info("rank %d done in %.1f s", rank, result["summary"]["eval_s"])

    def _write_outputs(self) -> dict | None:
        notes = self.notes + ([MERGED_LATENCY_NOTE] if self.cfg.latency and self.results else [])
        return write_outputs(self.out, self.cfg, self.results, notes, self.skipped, self._run_meta())

    def _run_meta(self) -> dict:
        """What the numbers were measured with (model, quality path, threads; workers when several shared the machine)."""
        run_meta = {"model": self.model_meta, "r_max": self.r_max, "run_status": self.run_status,
                    "quality_path": self.quality_path, "threads": self.threads_meta or threads.describe()}
        workers = max((int(r.get("workers", 1)) for r in self.results.values()), default=1)
        if workers > 1:  # speed was measured with workers sharing the machine: a condition of the numbers
            run_meta["workers"] = workers
        return run_meta

    def run(self) -> SweepResult:
        todo = self.todo()
        self._begin(todo)
        status = "completed"
        for rank in todo:
            runstate.write_status(self.out, "running", phase=f"rank {rank}", ranks=self.ranks, ranks_done=sorted(self.results))
            self._emit({"event": "rank_start", "rank": rank})
            result = self.evaluate_rank(rank)
            if result is None:
                status = "cancelled"
                break
            self._rank_finished(rank, result)
        return self.finish(status)

    def finish(self, status: str) -> SweepResult:
        """Tables, decision and status from every finished rank (this start's and earlier ones')."""
        recommendation = self._write_outputs()
        runstate.write_status(self.out, status, ranks=self.ranks, ranks_done=sorted(self.results))
        self._emit({"event": "end", "status": status, "ranks_done": sorted(self.results)})
        if status == "completed" and recommendation and recommendation.get("rank") is not None:
            message = f"sweep completed: recommended rank {recommendation['rank']} ({recommendation['reason']})"
        elif status == "completed":
            message = "sweep completed: " + (recommendation or {}).get("reason", "no recommendation")
        else:
            message = f"sweep cancelled after ranks {sorted(self.results)}; --resume continues"
        return SweepResult(self.out, status, sorted(self.results), recommendation, message)

    def fail(self, exc: BaseException) -> None:
        runstate.record_failure(self.out, exc)

    def cleanup(self) -> None:
        runstate.detach_log(self._log_handler)


def run_sweep(cfg: SweepConfig, resume: bool = False, on_event: Callable | None = None, should_stop: Callable | None = None,
              workers: int = 1) -> SweepResult:
    """Measure the ranks; with `workers` > 1, worker processes measure different ranks at once
    (see core.evaluation.sharded) and the files written are the same."""
    from core.evaluation import sharded

    sweep = Sweep(cfg, resume, on_event, should_stop)
    sweep.validate()  # raises before anything is written
    workers, sweep.workers_note = sharded.check_workers(workers, sweep)  # bad input raises here too
    try:
        if workers > 1:
            return sharded.run_sharded(sweep, workers)
        sweep.setup()
        return sweep.run()
    except BaseException as exc:
        sweep.fail(exc)
        raise
    finally:
        sweep.cleanup()
