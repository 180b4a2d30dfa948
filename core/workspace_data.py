"""The dashboard's library: datasets in the workspace, launch arguments, and readers of
run / sweep / export folders.

Pages call these functions and draw what they return; nothing here imports streamlit,
torch or transformers (the dashboard stays light; heavy work runs in CLI jobs).

Datasets live in `WORKSPACE/uploads/datasets/<name>/`:
- `train.jsonl` — the training examples, normalised (`prompt`/`response` or `messages`)
- `eval.jsonl` — the evaluation set (`id`, `prompt`, `reference`, `must_include`)
- `original/` — the files as uploaded (names sanitised)
- `dataset.json` — where it came from, counts, column mapping, skipped rows, warnings

A dataset folder is built in a temporary folder next to it and renamed into place only
after every file was validated and written: a failed upload leaves nothing behind.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import tempfile
import time
import zipfile
from dataclasses import MISSING, dataclass, field, fields
from itertools import zip_longest
from pathlib import Path

import pandas as pd

from core import data as D
from core import runstate
from core.config_io import value_fits
from core.errors import DataError, UserError
from core.evaluation.summary import PER_PROMPT_FILE, SUMMARY_FILE, read_per_prompt, read_summary
from core.fileio import DamagedFile, read_json, read_json_object
from core.jobs import sanitize_name

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DIR = PROJECT_ROOT / "sample_data"
SAMPLE_DATASET = "sample-quillhaven"
SAMPLE_TRAIN_FILES = ("train.jsonl", "train_chat.jsonl", "train.csv")
SAMPLE_EVAL_FILES = ("eval.jsonl", "eval.csv", "eval_reworded.jsonl", "eval_reworded.csv")
SAMPLE_EVAL_SETS = ("eval.jsonl", "eval_reworded.jsonl")     # what the sample dataset evaluates on
DATASETS_DIR = "datasets"
MAX_UPLOAD_ENV = "RANK_STUDIO_MAX_UPLOAD_MB"
EXTRA_MODELS_ENV = "RANK_STUDIO_EXTRA_MODELS"
CHARS_PER_TOKEN = 4.0         # rough for English text and SmolLM2's tokenizer
TEMPLATE_TOKENS = 30          # chat template around one prompt/answer pair
_STAMP = re.compile(r"[^0-9]")


# ------------------------------------------------------------------ settings


def max_upload_bytes() -> int:
    """The upload limit: `$RANK_STUDIO_MAX_UPLOAD_MB` megabytes, else core.data's default."""
    raw = os.environ.get(MAX_UPLOAD_ENV)
    if raw:
        try:
            mb = float(raw)
            if mb > 0:
                return int(mb * 2**20)
        except ValueError:
            pass
    return D.MAX_UPLOAD_BYTES


def extra_models() -> list[str]:
    """Local model folders offered on the Train page besides 'default'
    (`$RANK_STUDIO_EXTRA_MODELS`, separated by the OS path separator)."""
    raw = os.environ.get(EXTRA_MODELS_ENV, "")
    return [p for p in raw.split(os.pathsep) if p.strip()]


def check_model_folder(path: str) -> str | None:
    """None when `path` is a usable local model folder, else the reason (for people)."""
    if not path or not path.strip():
        return "Give the path of a local model folder."
    p = Path(path.strip()).expanduser()
    if not p.exists():
        return f"The model folder {p} does not exist."
    if not p.is_dir():
        return f"{p} is a file; give the folder that holds config.json."
    if not (p / "config.json").is_file():
        return f"The folder {p} has no config.json: it is not a Hugging Face model folder."
    return None


# ------------------------------------------------------------------ uploads


@dataclass
class UploadInspection:
    """A first look at an uploaded file, before any column is chosen."""

    name: str
    size: int
    format: str
    columns: list[str]
    preview: list[dict]
    chat: bool                  # JSON rows carry `messages`: no column mapping needed


def _check_size(name: str, size: int, max_bytes: int) -> None:
    if size == 0:
        raise DataError(name, "file is empty")
    if size > max_bytes:
        raise DataError(name, f"file is {size / 2**20:.1f} MB; the upload limit is {max_bytes / 2**20:.0f} MB")


def _clean_filename(name: str) -> str:
    """A user's file name as a safe single path component that keeps its extension."""
    base = Path(str(name).replace("\\", "/")).name
    stem, ext = os.path.splitext(base)
    ext = ext.lower() if ext.lower() in D.TRAIN_EXTENSIONS else ""
    return sanitize_name(stem) + ext


def inspect_upload(raw: bytes, name: str, max_bytes: int | None = None, n_preview: int = 20) -> UploadInspection:
    """Columns and first rows of uploaded bytes. Raises DataError (size, type, encoding,
    a malformed line within the preview) with the row or line. Writes nothing to the
    workspace (a temporary copy outside it is removed at once)."""
    limit = max_bytes or max_upload_bytes()
    display = Path(str(name)).name
    _check_size(display, len(raw), limit)
    fmt = D._file_format(display)
    D._decode(display, raw)  # UTF-8 check, naming the line
    with tempfile.TemporaryDirectory(prefix="rank-studio-") as tmp:
        path = Path(tmp) / _clean_filename(display)
        path.write_bytes(raw)
        try:
            columns = D.detect_columns(path)
            preview = D.preview_rows(path, n_preview)
        except DataError as exc:
            raise _renamed(exc, str(path), display) from None
    return UploadInspection(display, len(raw), fmt, columns, preview, chat="messages" in columns and fmt not in ("csv", "tsv"))


def _renamed(exc: DataError, old: str, new: str) -> DataError:
    """The same error, naming the user's file instead of a temporary path."""
    err = DataError(new, exc.problem, line=exc.line)
    err.row = exc.row
    err.args = (str(exc).replace(old, new),)
    return err


def guess_column(columns: list[str], wanted: str) -> str | None:
    """The likely column for `wanted` ("prompt", "response", "reference", "id", "must_include")."""
    synonyms = {
        "prompt": ["prompt", "question", "input", "instruction", "query", "user"],
        "response": ["response", "answer", "output", "completion", "reply", "assistant", "reference"],
        "reference": ["reference", "answer", "response", "output", "expected"],
        "id": ["id", "uid", "key"],
        "must_include": ["must_include", "facts", "keywords"],
    }[wanted]
    lower = {c.lower(): c for c in columns}
    for s in synonyms:
        if s in lower:
            return lower[s]
    return None


# ------------------------------------------------------------------ datasets


@dataclass
class DatasetInfo:
    """A prepared dataset (the contents of dataset.json plus its folder)."""

    id: str
    name: str
    folder: Path
    n_train: int
    n_eval: int
    created_at: float
    source: dict = field(default_factory=dict)
    columns: dict = field(default_factory=dict)
    split: dict | None = None
    skipped: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    avg_chars: float = 0.0
    sample: bool = False

    @property
    def train_path(self) -> Path:
        return self.folder / "train.jsonl"

    @property
    def eval_path(self) -> Path:
        return self.folder / "eval.jsonl"

    @property
    def tokens_per_example(self) -> float:
        """Rough token count of a typical example (for the time estimate)."""
        return self.avg_chars / CHARS_PER_TOKEN + TEMPLATE_TOKENS

    def describe(self) -> str:
        kind = "sample data" if self.sample else "uploaded"
        return f"{self.name} — {self.n_train} training examples, {self.n_eval} evaluation prompts ({kind})"


def datasets_dir(workspace: Path) -> Path:
    folder = Path(workspace) / "uploads" / DATASETS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _load_info(folder: Path) -> tuple[DatasetInfo | None, str | None]:
    """(the dataset, None), or (None, why the folder is not a usable dataset)."""
    try:
        meta = read_json(folder / "dataset.json", "its description")
    except FileNotFoundError:
        return None, "it has no dataset.json"
    except DamagedFile as exc:
        return None, str(exc)
    if not isinstance(meta, dict):
        return None, f"its dataset.json holds {type(meta).__name__}, not an object"
    described = {f.name: f for f in fields(DatasetInfo) if f.name not in ("id", "folder")}
    problems = [f"'{name}' is missing" for name, f in described.items()
                if name not in meta and f.default is MISSING and f.default_factory is MISSING]
    problems += [f"'{name}' should be {f.type}, not {meta[name]!r:.40}" for name, f in described.items()
                 if name in meta and value_fits(f.type, meta[name]) is False]
    if problems:
        return None, "its dataset.json is damaged: " + "; ".join(problems)
    if not (folder / "train.jsonl").is_file() or not (folder / "eval.jsonl").is_file():
        return None, "its train.jsonl or eval.jsonl is missing"
    return DatasetInfo(id=folder.name, folder=folder, **{k: v for k, v in meta.items() if k in described}), None


def _read_info(folder: Path) -> DatasetInfo | None:
    return _load_info(folder)[0]


def scan_datasets(workspace: Path) -> tuple[list[DatasetInfo], list[str]]:
    """(complete datasets, newest first with the sample data last among equals;
    one message per dataset folder that cannot be used, which is skipped)."""
    out, damaged = [], []
    for folder in sorted(datasets_dir(workspace).iterdir()):
        if folder.is_dir() and not folder.name.startswith("."):   # dot folders are being written
            info, problem = _load_info(folder)
            if info is not None:
                out.append(info)
            else:
                damaged.append(f"Dataset folder {folder.name} is skipped: {problem}.")
    return sorted(out, key=lambda d: (d.created_at, not d.sample), reverse=True), damaged


def list_datasets(workspace: Path) -> list[DatasetInfo]:
    """Complete datasets, newest first (the sample data last among equals)."""
    return scan_datasets(workspace)[0]


def get_dataset(workspace: Path, dataset_id: str | None) -> DatasetInfo | None:
    """The dataset with this id (a folder name from `list_datasets`, never a path)."""
    if not dataset_id:
        return None
    for info in list_datasets(workspace):
        if info.id == dataset_id:
            return info
    return None


def _example_row(ex: D.Example) -> dict:
    return {"messages": ex.messages} if ex.messages else {"prompt": ex.prompt, "response": ex.response}


def _eval_row(item: D.EvalItem) -> dict:
    row = {"id": item.id, "prompt": item.prompt, "reference": item.reference, "must_include": item.must_include}
    return row | ({D.EVAL_SET_KEY: item.set} if item.set else {})


def sample_eval_jsonl() -> bytes:
    """The sample's two evaluation sets ("FAQ recall": references copied from training answers;
    "new wordings": the same facts in words never trained on) interleaved in one file, so a
    sweep reports both and any first-N prompts hold both."""
    sets = [D.load_eval_set(SAMPLE_DIR / name).items for name in SAMPLE_EVAL_SETS]
    mixed = [it for group in zip_longest(*sets) for it in group if it is not None]
    return _jsonl(_eval_row(it) for it in mixed).encode("utf-8")


def _jsonl(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def create_dataset(
    workspace: Path,
    name: str,
    train_raw: bytes,
    train_filename: str,
    *,
    prompt_col: str = "prompt",
    response_col: str = "response",
    eval_fraction: float | None = 0.1,
    eval_raw: bytes | None = None,
    eval_filename: str | None = None,
    eval_columns: dict | None = None,
    seed: int = 0,
    max_bytes: int | None = None,
    sample: bool = False,
) -> DatasetInfo:
    """Validate an upload (and an evaluation set, or hold out `eval_fraction` of the
    training examples) and store it as a dataset. DataError/UserError on bad input,
    naming the file, row and problem; nothing is stored then."""
    limit = max_bytes or max_upload_bytes()
    train_display = Path(str(train_filename)).name
    _check_size(train_display, len(train_raw), limit)
    data = D.validate_upload(train_raw, train_display, kind="train", max_bytes=limit,
                             prompt_col=prompt_col, response_col=response_col)
    examples = list(data.examples)
    warnings: list[str] = []
    split = None
    if eval_raw is not None:
        eval_display = Path(str(eval_filename or "eval.jsonl")).name
        _check_size(eval_display, len(eval_raw), limit)
        eval_set = D.validate_upload(eval_raw, eval_display, kind="eval", max_bytes=limit, **(eval_columns or {}))
        items = eval_set.items
        warnings += eval_set.warnings
    else:
        if eval_fraction is None or eval_fraction <= 0:
            raise UserError("The evaluation prompts are missing: hold out part of the training data or upload an evaluation set.")
        examples, items = D.train_eval_split(examples, float(eval_fraction), seed=seed)
        split = {"eval_fraction": float(eval_fraction), "seed": seed}
        eval_display = None
    chars = [len(ex.prompt) + len(ex.response) for ex in examples]
    meta = {
        "name": str(name).strip() or Path(train_display).stem,
        "n_train": len(examples), "n_eval": len(items), "created_at": time.time(),
        "source": {"train": train_display, "eval": eval_display},
        "columns": {"prompt": prompt_col, "response": response_col, "eval": eval_columns or {}},
        "split": split, "skipped": data.skipped, "warnings": warnings,
        "avg_chars": sum(chars) / len(chars), "sample": sample,
    }
    root = datasets_dir(workspace)
    base = sanitize_name(meta["name"])
    tmp = Path(tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=root))
    try:
        (tmp / "train.jsonl").write_text(_jsonl(_example_row(ex) for ex in examples), encoding="utf-8")
        (tmp / "eval.jsonl").write_text(_jsonl(_eval_row(it) for it in items), encoding="utf-8")
        original = tmp / "original"
        original.mkdir()
        (original / _clean_filename(train_display)).write_bytes(train_raw)
        if eval_raw is not None:
            eval_name = _clean_filename(eval_display)
            if eval_name == _clean_filename(train_display):
                eval_name = "eval-" + eval_name
            (original / eval_name).write_bytes(eval_raw)
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
        for n in range(1, 10_000):
            final = root / (base if n == 1 else f"{base}-{n}")
            try:
                tmp.rename(final)           # fails if final exists and is not empty
                break
            except OSError:
                if not final.exists():
                    raise
        else:
            raise UserError(f"Could not find a free folder name for dataset {base!r}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info = _read_info(final)
    assert info is not None
    return info


def ensure_sample_dataset(workspace: Path) -> DatasetInfo:
    """The bundled sample (sample_data/train.jsonl, both evaluation sets) as a dataset, made once."""
    existing = get_dataset(workspace, SAMPLE_DATASET)
    if existing is not None:
        return existing
    folder = datasets_dir(workspace) / SAMPLE_DATASET
    if folder.is_dir() and _load_info(folder)[0] is None:
        shutil.rmtree(folder, ignore_errors=True)   # our own sample, damaged: made again
    info = create_dataset(
        workspace, SAMPLE_DATASET, (SAMPLE_DIR / "train.jsonl").read_bytes(), "train.jsonl",
        eval_raw=sample_eval_jsonl(), eval_filename="eval.jsonl", sample=True,
    )
    if info.id != SAMPLE_DATASET:           # another process made it at the same moment
        shutil.rmtree(info.folder, ignore_errors=True)
        return get_dataset(workspace, SAMPLE_DATASET) or info
    meta = json.loads((info.folder / "dataset.json").read_text())
    meta["name"] = "Sample data: Quillhaven Care"
    meta["created_at"] = 0.0                # listed after the user's own datasets
    runstate.write_json_atomic(info.folder / "dataset.json", meta)
    return get_dataset(workspace, SAMPLE_DATASET) or info


def dataset_preview(info: DatasetInfo, n: int = 20) -> tuple[pd.DataFrame, pd.DataFrame]:
    """First rows of the training and evaluation files, as tables."""
    def rows(path: Path) -> list[dict]:
        out = []
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if len(out) >= n:
                    break
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError):
                    continue                # a damaged line: the preview shows the others
                if not isinstance(row, dict):
                    continue
                if "messages" in row:
                    row = {"messages": " | ".join(f"{m['role']}: {m['content']}" for m in row["messages"])}
                elif "must_include" in row:
                    row["must_include"] = "; ".join(row["must_include"])
                out.append(row)
        return out
    return pd.DataFrame(rows(info.train_path)), pd.DataFrame(rows(info.eval_path))


def preview_table(rows: list[dict]) -> pd.DataFrame:
    """Preview rows (from inspect_upload) as a table of short strings."""
    def cell(v):
        if isinstance(v, str):
            return v
        return json.dumps(v, ensure_ascii=False)
    return pd.DataFrame([{k: cell(v) for k, v in r.items()} for r in rows])


# ------------------------------------------------------------------ launch arguments


TRAIN_LIMITS = {
    "r_max": (1, 256), "alpha": (0.01, 1024.0), "steps": (1, 100_000), "batch_size": (1, 256),
    "lr": (1e-7, 0.1), "max_length": (16, 8192), "grad_accum": (1, 256), "ranks_per_step": (1, 256),
}
# The recommended (default) method first: the evidence is in bench/README.md §6.
METHOD_LABELS = {"qdylora": "QDyLoRA (recommended): one run samples a rank each step",
                 "svd": "SVD truncation: one LoRA at r_max, each rank cut from it"}
SCALE_LABELS = {None: "the method's recommended rule", "alpha/b": "α / b (DyLoRA, plain LoRA)",
                "alpha/sqrt(b)": "α / √b (rsLoRA)", "constant": "constant α / √r_max (nested, like a truncated SVD)",
                "alpha/i": "α / i per row (each row keeps its scale at every rank, so low ranks learn fast)",
                "alpha/sqrt(i)": "α / √i per row (row i keeps its scale at every rank)",
                "alpha/i^2": "α / i² per row (the first rows carry still more of the update)"}
ROW_STEPS_LABELS = {None: "the method's recommended rule", "hold": "hold (rows a step did not train stay put)",
                    "momentum": "momentum (they keep moving by AdamW's momentum)",
                    "balanced": "balanced (momentum, and rarely trained rows take larger steps)"}


def _recipe_defaults() -> dict:
    """The library's recipe defaults (TrainConfig's, chosen by bench/rank_search_variants.py), which every preset uses."""
    from dataclasses import fields

    from core.qdylora.config import METHOD_RANK_SAMPLING
    from core.train_config import TrainConfig

    # The fields' own defaults, not a resolved config's: svd records its sampling as "list [r_max]",
    # which the form must not carry over to another r_max or method.
    d = {f.name: f.default for f in fields(TrainConfig)}
    sampling = d["rank_sampling"] or METHOD_RANK_SAMPLING[d["method"]]    # unset: the method's measured best
    return dict(method=d["method"], scale=None, row_steps=None, rank_sampling=sampling, ranks_per_step=d["ranks_per_step"],
                alpha=d["alpha"], lr=d["lr"], update=d["update"])


PRESETS = {
    "Quick demo (CPU, ~5 min)": dict(quant="nf4", r_max=16, steps=40, batch_size=4, max_length=256, **_recipe_defaults()),
    "Standard": dict(quant="nf4", r_max=64, steps=300, batch_size=4, max_length=512, **_recipe_defaults()),
}


def train_form_defaults(preset: str | None = None) -> dict:
    """The Train page's field values before the user changes anything: a preset's
    values (the first preset by default) plus the fields that presets leave alone."""
    preset = preset if preset in PRESETS else next(iter(PRESETS))
    return dict(preset=preset, dataset=None, model="default", model_path="", rank_list="1,2,4,8",
                grad_accum=1, name="run", processes=1, compile=False, **PRESETS[preset])


@dataclass
class TrainForm:
    """The Train page's fields."""

    dataset: DatasetInfo | None
    model: str = "default"
    quant: str = "nf4"
    r_max: int = 16
    alpha: float = 16.0
    rank_sampling: str = "pow2"
    rank_list: str = ""
    update: str = "full"
    steps: int = 40
    batch_size: int = 4
    lr: float = 3e-4
    max_length: int = 256
    grad_accum: int = 1
    seed: int = 42
    method: str = "qdylora"
    scale: str | None = None        # None: the method's recommended rule
    row_steps: str | None = None    # None: the method's recommended rule
    ranks_per_step: int = 1
    processes: int = 1          # data-parallel training processes (qdylora train --processes)
    compile: bool = False       # torch.compile the decoder layers (TrainConfig.compile)


def train_problems(form: TrainForm) -> list[str]:
    """Every reason the form cannot be launched, in words for people ([] = fine)."""
    from core.train_config import TrainConfig

    problems = []
    if form.dataset is None:
        problems.append("Choose a dataset (prepare one on the Data page).")
    if form.model != "default":
        reason = check_model_folder(form.model)
        if reason:
            problems.append(reason)
    checked = len(problems)
    for key, (lo, hi) in TRAIN_LIMITS.items():
        value = getattr(form, key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
            problems.append(f"{key.replace('_', ' ')} must be between {lo:g} and {hi:g} (got {value}).")
    ranks = None
    if form.rank_sampling == "list":
        try:
            ranks = [int(x) for x in form.rank_list.replace(" ", "").split(",") if x]
        except ValueError:
            problems.append(f"The rank list must be comma-separated whole numbers like 1,2,4,8 (got {form.rank_list!r}).")
    if len(problems) > checked:            # TrainConfig would repeat these less clearly
        return problems
    try:
        TrainConfig(data="unused", out="unused", model="default", quant=form.quant, r_max=form.r_max,
                    alpha=form.alpha, rank_sampling=form.rank_sampling, rank_list=ranks, update=form.update,
                    steps=form.steps, batch_size=form.batch_size, grad_accum=form.grad_accum, lr=form.lr,
                    max_length=form.max_length, seed=form.seed, method=form.method, scale=form.scale,
                    row_steps=form.row_steps, ranks_per_step=form.ranks_per_step)
    except UserError as exc:
        text = str(exc).removeprefix("invalid training config: ")
        problems += [p.strip()[0].upper() + p.strip()[1:] + "." for p in text.split(";") if p.strip()]
    if form.compile:
        from core.compiling import cxx_compiler_problem

        missing = cxx_compiler_problem()
        if missing:
            problems.append(missing[0].upper() + missing[1:] + ".")
    if form.processes > 1 and form.batch_size % form.processes:
        problems.append(f"Batch size {form.batch_size} does not divide by {form.processes} processes: each process "
                        "takes an equal share of every batch.")
    return problems


def train_args(form: TrainForm) -> list[str]:
    """CLI arguments of `python -m core train` (without --out) for a valid form."""
    problems = train_problems(form)
    if problems:
        raise UserError(" ".join(problems))
    model = form.model if form.model == "default" else str(Path(form.model.strip()).expanduser().resolve())
    args = ["--data", str(form.dataset.train_path.resolve()), "--model", model, "--quant", form.quant,
            "--r-max", form.r_max, "--alpha", form.alpha, "--rank-sampling", form.rank_sampling,
            "--update", form.update, "--steps", form.steps, "--batch-size", form.batch_size,
            "--grad-accum", form.grad_accum, "--lr", form.lr, "--max-length", form.max_length,
            "--seed", form.seed, "--checkpoint-every", max(1, min(10, form.steps // 4 or 1)), "--no-progress",
            "--method", form.method, "--ranks-per-step", form.ranks_per_step] + (["--scale", form.scale] if form.scale else [])
    if form.row_steps:
        args += ["--row-steps", form.row_steps]
    if form.rank_sampling == "list":
        args += ["--rank-list", form.rank_list.replace(" ", "")]
    if form.processes > 1:
        args += ["--processes", form.processes]
    if form.compile:
        args.append("--compile")
    return [str(a) for a in args]


def refine_problems(rank, steps, lr, r_max: int | None) -> list[str]:
    """Why the Export page's polish form cannot be launched ([] = fine); lr None = the run's."""
    problems = []
    if not _whole_number_in(rank, 1, r_max):
        problems.append(f"The rank to polish must be a whole number from 1 to {r_max or 'r_max'} (got {rank}).")
    lo, hi = TRAIN_LIMITS["steps"]
    if not _whole_number_in(steps, lo, hi):
        problems.append(f"Extra steps must be a whole number from {lo} to {hi:,} (got {steps}).")
    lo, hi = TRAIN_LIMITS["lr"]
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lo <= lr <= hi):
        problems.append(f"The learning rate must be between {lo:g} and {hi:g} (got {lr}).")
    return problems


def refine_args(run_dir: Path, rank: int, steps: int, lr: float | None = None, r_max: int | None = None) -> list[str]:
    """CLI arguments of `python -m core train` (without --out) that polish rank b of a finished run
    as a new run (the parent's recipe at r_max = b, warm-started; see core.refine)."""
    from core.refine import check_warm_start, refine_config

    problems = refine_problems(rank, steps, lr, r_max)
    if problems:
        raise UserError(" ".join(problems))
    cfg = refine_config(Path(run_dir).resolve(), rank, steps, out="unused", lr=lr,
                        checkpoint_every=max(1, min(10, steps // 4 or 1)))
    check_warm_start(cfg)
    return [*cfg.cli_args(), "--no-progress"]


def default_sweep_ranks(r_max: int) -> list[int]:
    """0 (the base model) and the powers of two up to r_max, plus r_max itself: what core.evaluation.sweep.default_ranks
    gives (that module imports torch; core.qdylora.sampling does not)."""
    from core.qdylora.sampling import powers_of_two_ranks

    return [0] + powers_of_two_ranks(r_max)


def parse_rank_text(text: str, r_max: int) -> tuple[list[int], list[str]]:
    """Ranks typed by a user ("0, 1, 2, 4") → (sorted unique ranks, problems)."""
    ranks, problems = [], []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        try:
            b = int(part)
        except ValueError:
            problems.append(f"'{part}' is not a whole number")
            continue
        if not 0 <= b <= r_max:
            problems.append(f"rank {b} is outside 0..{r_max}")
        else:
            ranks.append(b)
    if not ranks and not problems:
        problems.append("no rank given")
    return sorted(set(ranks)), problems


SWEEP_LIMITS = {"max_new_tokens": (1, 1024)}


def _whole_number_in(value, lo: int, hi: int | None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value and (hi is None or value <= hi)


def sweep_problems(ranks: list[int], metrics: list[str], max_prompts, max_new_tokens, n_eval: int | None = None) -> list[str]:
    """Every reason the Sweep form cannot be launched, in words for people ([] = fine).
    n_eval: how many evaluation prompts the dataset has (the most that can be used)."""
    problems = []
    if not ranks:
        problems.append("Choose at least one rank.")
    elif not any(r > 0 for r in ranks):
        problems.append("Choose at least one rank above 0 (0 is only the base model).")
    if not metrics:
        problems.append("Choose at least one quality metric.")
    if max_prompts is not None and not _whole_number_in(max_prompts, 1, n_eval):
        most = f" and {n_eval}" if n_eval else ""
        problems.append(f"Prompts to use must be a whole number between 1{most} (got {max_prompts}).")
    lo, hi = SWEEP_LIMITS["max_new_tokens"]
    if not _whole_number_in(max_new_tokens, lo, hi):
        problems.append(f"Answer length must be between {lo} and {hi} tokens (got {max_new_tokens}).")
    return problems


def sweep_args(run_dir: Path, prompts: Path, ranks: list[int], *, max_prompts: int | None, max_new_tokens: int,
               metrics: list[str], latency: bool, threshold: float = 0.95, recommend_metric: str | None = None,
               workers: int = 1) -> list[str]:
    """CLI arguments of `python -m core sweep` (without --out); the recommendation uses
    `recommend_metric` when it is measured, else the default among `metrics`."""
    from core.evaluation.recommend import default_metric

    problems = sweep_problems(ranks, metrics, max_prompts, max_new_tokens)
    if problems:
        raise UserError(" ".join(problems))
    if recommend_metric not in metrics:
        recommend_metric = default_metric(metrics)[0] or metrics[0]
    args = ["--run", str(Path(run_dir).resolve()), "--prompts", str(Path(prompts).resolve()),
            "--ranks", ",".join(map(str, ranks)), "--max-new-tokens", str(max_new_tokens),
            "--metrics", ",".join(metrics), "--latency", "on" if latency else "off",
            "--recommend-metric", recommend_metric,
            "--threshold", str(threshold), "--no-progress"]
    if max_prompts:
        args += ["--max-prompts", str(int(max_prompts))]
    if workers > 1:
        args += ["--workers", str(int(workers))]
    return args


def export_problems(rank, r_max: int | None) -> list[str]:
    """Why the Export form cannot be launched ([] = fine)."""
    if not _whole_number_in(rank, 1, r_max):
        return [f"The rank to export must be a whole number from 1 to {r_max or 'r_max'} (got {rank})."]
    return []


def export_args(run_dir: Path, rank: int, *, merge: bool, sweep_dir: Path | None = None,
                r_max: int | None = None) -> list[str]:
    """CLI arguments of `python -m core export` (without --out)."""
    problems = export_problems(rank, r_max)
    if problems:
        raise UserError(" ".join(problems))
    args = ["--run", str(Path(run_dir).resolve()), "--rank", str(rank)]
    if merge:
        args.append("--merge")
    if sweep_dir is not None and (Path(sweep_dir) / "summary.csv").is_file():
        args += ["--sweep", str(Path(sweep_dir).resolve())]
    return args


# ------------------------------------------------------------------ reading job folders


@dataclass
class RunView:
    """What a training run folder says, for the dashboard."""

    status: dict | None
    config: dict | None
    steps: pd.DataFrame              # one row per optimizer step (the latest attempt wins)
    histogram: dict[int, int]        # rank → optimizer steps
    start: dict | None               # the last "start" event
    total_steps: int | None
    data_report: dict | None

    @property
    def step(self) -> int:
        if not self.steps.empty:
            return int(self.steps["step"].iloc[-1])
        return int((self.status or {}).get("step") or 0)

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0

    @property
    def last(self) -> dict:
        return {} if self.steps.empty else self.steps.iloc[-1].to_dict()

    @property
    def r_max(self) -> int | None:
        return ((self.config or {}).get("qdylora") or {}).get("r_max")

    @property
    def base_model(self) -> str | None:
        model = (self.config or {}).get("model") or {}
        return model.get("name")

    @property
    def phase(self) -> str | None:
        return (self.status or {}).get("phase")


STEP_COLUMNS = ["step", "loss", "rank", "lr", "tokens_per_s", "elapsed_s", "eta_s", "mem_mb", "time"]


def read_run(run_dir: Path) -> RunView:
    run_dir = Path(run_dir)
    events = runstate.read_events(run_dir)
    steps = [e for e in events if e.get("event") == "step"]
    df = pd.DataFrame(steps, columns=STEP_COLUMNS) if steps else pd.DataFrame(columns=STEP_COLUMNS)
    if not df.empty:
        df = df.drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)
    hist: dict[int, int] = {}
    for r in df["rank"].dropna().astype(int).tolist() if not df.empty else []:
        hist[r] = hist.get(r, 0) + 1
    if not hist:
        saved = read_json_object(run_dir / "rank_histogram.json") or {}
        hist = {int(k): int(v) for k, v in saved.items()}
    starts = [e for e in events if e.get("event") == "start"]
    status = runstate.read_status(run_dir)
    config = read_json_object(run_dir / "config.json")
    total = (status or {}).get("total_steps") or (starts[-1].get("total_steps") if starts else None)
    if total is None and config:
        total = (config.get("train") or {}).get("steps")
    return RunView(status, config, df, dict(sorted(hist.items())), starts[-1] if starts else None, total,
                   read_json_object(run_dir / "data_report.json"))


@dataclass
class SweepView:
    """What a sweep folder says: progress while it runs, tables when it has them."""

    status: dict | None
    config: dict | None              # the sweep's config (ranks, prompts, metrics, …)
    done_units: int
    total_units: int
    eta_s: float | None
    current_rank: int | None
    ranks_done: list[int]
    summary: pd.DataFrame | None
    per_prompt: pd.DataFrame | None
    meta: dict | None                # sweep.json
    sweep_dir: Path | None = None
    by_set: pd.DataFrame | None = None  # summary_by_set.csv: quality per (named evaluation set, rank)
    summary_problem: str | None = None  # why summary.csv or per_prompt.csv could not be read (then summary is None)
    phase: str | None = None         # while running: "latency" (timing the current rank) or "quality" (answering)

    @property
    def fraction(self) -> float:
        return min(1.0, self.done_units / self.total_units) if self.total_units else 0.0

    @property
    def recommendation(self) -> dict | None:
        return (self.meta or {}).get("recommendation")

    @property
    def run_dir(self) -> str | None:
        return (self.meta or {}).get("run") or (self.config or {}).get("run")

    @property
    def metrics(self) -> list[str]:
        """Quality metrics the sweep measured (columns with at least one value)."""
        from core.evaluation.recommend import METRICS

        if self.summary is None:
            return []
        return [m for m in METRICS if m in self.summary.columns and self.summary[m].notna().any()]


def _read_csv(path: Path) -> pd.DataFrame | None:
    if not Path(path).is_file():
        return None
    try:
        return pd.read_csv(path, keep_default_na=True)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, OSError):
        return None


SWEEP_RESULT_FILES = ("summary.csv", "per_prompt.csv", "summary_by_set.csv", "sweep.json")


def sweep_stamp(sweep_dir: Path) -> float:
    """Changes whenever any of a sweep's result files changes (a cache key for pages)."""
    stamps = []
    for name in SWEEP_RESULT_FILES:
        try:
            stamps.append((Path(sweep_dir) / name).stat().st_mtime_ns)
        except OSError:
            stamps.append(0)
    return float(hash(tuple(stamps)))


def read_sweep(sweep_dir: Path) -> SweepView:
    sweep_dir = Path(sweep_dir)
    events = runstate.read_events(sweep_dir)
    done = total = 0
    eta = current = phase = None
    ranks_done: list[int] = []
    for e in events:
        kind = e.get("event")
        if kind == "start":
            total = int(e.get("total_units") or 0)
            done = int(e.get("done_units") or 0)
        elif kind == "prompt":
            done = int(e.get("done_units", done + int(e.get("units") or 1)))
            total = int(e.get("total_units") or total)
            eta = e.get("eta_s")
            current = e.get("rank")
            phase = "quality"
        elif kind == "phase":
            eta = e.get("eta_s", eta)
            current = e.get("rank")
            phase = e.get("phase")
        elif kind == "rank_start":
            current = e.get("rank")
        elif kind == "rank_done" and e.get("rank") is not None:
            ranks_done.append(int(e["rank"]))
            phase = None
    cfg = (read_json_object(sweep_dir / "config.json") or {}).get("config")
    meta = read_json_object(sweep_dir / "sweep.json")
    if meta and meta.get("ranks_done"):
        ranks_done = [int(r) for r in meta["ranks_done"]]
    summary, per_prompt, problem = None, None, None
    if (sweep_dir / SUMMARY_FILE).is_file():
        try:
            summary = read_summary(sweep_dir)
            if (sweep_dir / PER_PROMPT_FILE).is_file():
                read_per_prompt(sweep_dir)              # checked through; the table keeps pandas' own types
                per_prompt = _read_csv(sweep_dir / PER_PROMPT_FILE)
        except UserError as exc:
            summary, problem = None, str(exc)
    return SweepView(runstate.read_status(sweep_dir), cfg, done, total, eta, current, sorted(set(ranks_done)),
                     summary, per_prompt, meta, sweep_dir, _read_csv(sweep_dir / "summary_by_set.csv"), problem, phase)


def eval_fact_count(info: DatasetInfo) -> int:
    """How many of the dataset's evaluation prompts list must-include facts."""
    n = 0
    with open(info.eval_path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                record = json.loads(line) if line.strip() else None
            except (ValueError, RecursionError):
                continue                # a damaged line counts as none (the sweep reports it)
            if isinstance(record, dict) and record.get("must_include"):
                n += 1
    return n


def missing_metric_reasons(view: SweepView) -> dict[str, str]:
    """Metrics the sweep was asked for but has no values for, and why (for people)."""
    from core.evaluation.recommend import METRICS

    asked = (view.config or {}).get("metrics") or []
    have = set(view.metrics)
    notes = " ".join((view.meta or {}).get("notes") or [])
    out = {}
    for m in asked:
        if m in have or m not in METRICS:
            continue
        if m == "fact_recall":
            out[m] = "the evaluation set has no must-include facts (a must_include column), so there was nothing to check"
        elif m == "similarity" and "similarity skipped" in notes:
            out[m] = notes[notes.index("similarity skipped"):].split(";")[0]
        else:
            out[m] = "the sweep recorded no values for it"
    return out


def sweep_facts(view: SweepView) -> dict[str, list[str]]:
    """Prompt id → must-include facts: from per_prompt.csv, or (sweeps made before it kept
    them) from the evaluation set the sweep read."""
    from core.evaluation.tables import facts_by_prompt

    facts = facts_by_prompt(view.per_prompt)
    if facts or view.per_prompt is None or "must_include" in view.per_prompt.columns:
        return facts
    cfg = view.config or {}
    try:
        items = D.load_eval_set(cfg["prompts"], prompt_col=cfg.get("prompt_col", "prompt"),
                                reference_col=cfg.get("reference_col", "reference"), id_col=cfg.get("id_col", "id"),
                                must_include_col=cfg.get("must_include_col", "must_include")).items
    except (KeyError, OSError, DataError, UserError):
        return {}
    return {str(it.id): list(it.must_include) for it in items if it.must_include}


# ------------------------------------------------------------------ comparing ranks


def prompt_degradation(per_prompt: pd.DataFrame, metric: str, threshold: float) -> pd.DataFrame:
    """Which prompts degrade first as the rank drops.

    For each prompt, its value at the highest measured rank is its own reference; a
    lower rank "fails" the prompt when it is worse than that reference by more than the
    tolerance of `recommend_rank` (core.evaluation.recommend.tolerance). `degrades_below` is the highest rank at which the prompt already
    fails (the higher, the earlier it degrades); NaN when no rank > 0 fails it.
    `drop` is how much worse the lowest adapter rank is than the top rank (positive =
    worse). Sorted so the prompts that degrade first come first.
    """
    from core.evaluation.recommend import METRICS, tolerance

    spec = METRICS[metric]
    cols = ["id", "prompt", "top_rank", "top_value", "lowest_rank", "lowest_value", "base_value", "degrades_below", "drop"]
    if per_prompt is None or per_prompt.empty or metric not in per_prompt.columns:
        return pd.DataFrame(columns=cols)
    df = per_prompt[["rank", "id", "prompt", metric]].copy()
    df["rank"] = df["rank"].astype(int)
    df["id"] = df["id"].astype(str)
    out = []
    for pid, g in df.groupby("id", sort=False):
        adapters = g[(g["rank"] > 0) & g[metric].notna()].sort_values("rank")
        if adapters.empty:
            continue
        top = adapters.iloc[-1]
        margin = tolerance(metric, threshold, float(top[metric]))
        bar = float(top[metric]) - margin if spec.higher_is_better else float(top[metric]) + margin
        failing = None
        for _, row in adapters.iloc[:-1][::-1].iterrows():
            v = float(row[metric])
            if (v < bar - 1e-12) if spec.higher_is_better else (v > bar + 1e-12):
                failing = int(row["rank"])
                break
        low = adapters.iloc[0]
        drop = float(top[metric]) - float(low[metric])
        base = g[g["rank"] == 0][metric]
        out.append({
            "id": pid, "prompt": str(top["prompt"]), "top_rank": int(top["rank"]), "top_value": float(top[metric]),
            "lowest_rank": int(low["rank"]), "lowest_value": float(low[metric]),
            "base_value": float(base.iloc[0]) if len(base) and pd.notna(base.iloc[0]) else math.nan,
            "degrades_below": failing if failing is not None else math.nan,
            "drop": drop if spec.higher_is_better else -drop,
        })
    res = pd.DataFrame(out, columns=cols)
    if res.empty:
        return res
    return res.sort_values(["degrades_below", "drop"], ascending=[False, False], na_position="last").reset_index(drop=True)


def answers_side_by_side(per_prompt: pd.DataFrame, prompt_id: str, ranks: list[int] | None = None) -> pd.DataFrame:
    """One row per rank for one prompt: rank, answer and its scores."""
    if per_prompt is None or per_prompt.empty:
        return pd.DataFrame()
    g = per_prompt[per_prompt["id"].astype(str) == str(prompt_id)].copy()
    if ranks:
        g = g[g["rank"].astype(int).isin(ranks)]
    keep = [c for c in ["rank", "answer", "ref_nll", "rouge_l", "fact_recall", "similarity"] if c in g.columns]
    return g[keep].sort_values("rank").reset_index(drop=True)


# ------------------------------------------------------------------ exports


def read_export(export_dir: Path) -> dict | None:
    """The rank card (rank_card.json) of a finished export, with its markdown."""
    card = read_json_object(Path(export_dir) / "rank_card.json")
    if card is None:
        return None
    md = Path(export_dir) / "rank_card.md"
    card = dict(card)
    card["_markdown"] = md.read_text(encoding="utf-8") if md.is_file() else ""
    return card


def zip_folder(folder: Path, include_merged: bool = True) -> bytes:
    """The folder as a zip archive (files under the folder's name; links are skipped)."""
    folder = Path(folder)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            if path.is_symlink() or not path.is_file():
                continue
            if rel.parts[0] in ("job.log", "worker.log") or (not include_merged and rel.parts[0] == "merged"):
                continue
            zf.write(path, str(Path(folder.name) / rel))
    return buf.getvalue()
