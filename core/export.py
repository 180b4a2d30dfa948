"""Rank b of a run → a standard PEFT LoRA folder, a rank card, optionally merged weights.

PEFT scales a LoRA adapter by lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora.
`peft_scale_fields` picks the pair that gives exactly the scale the run uses at rank b
under its scale rule, so no weight is rescaled.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core import proc, runstate
from core.config_io import ConfigDict
from core.errors import RunError, UserError
from core.fileio import fsync_tree, read_json_object
from core.evaluation.summary import SUMMARY_FILE, read_summary
from core.models import compute_dtype_for, dtype_from_name, pick_device
from core.qdylora.config import QDyLoRAConfig, peft_scale_fields
from core.qdylora.inject import ADAPTER_FILE
from core.preflight import check_output_folder, make_output_folder
from core.qdylora.truncation import inference_adapter_state, inference_config
from core.rank_card import base_model_sources, load_snippet, rank_card_markdown
from core.runs import check_rank, run_info
from core.train import ADAPTER_DIR

PEFT_PREFIX = "base_model.model."
CARD_FILE = "rank_card.json"
CONFIG_FILE = "export_config.json"
EXPORT_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors", "rank_card.md", "merged", CONFIG_FILE,
                          CARD_FILE})
TMP_INFIX = ".tmp-"
MERGE_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ExportConfig(ConfigDict):
    run: str = field(metadata={"help": "Run folder to export from."})
    rank: int = field(metadata={"help": "Rank b to export (1..r_max)."})
    out: str = field(metadata={"help": "Export folder to create (must be missing or empty)."})
    merge: bool = field(default=False, metadata={"help": "Also write merged weights W0 + s(b) B A into a 16/32-bit base copy."})
    merge_dtype: str = field(default="auto", metadata={"help": "Merged weights dtype: auto (float32 on CPU, bf16/fp16 on GPU), float32, bfloat16, float16."})
    sweep: str | None = field(default=None, metadata={"help": "Sweep folder whose measured numbers for this rank go into the rank card."})

    def __post_init__(self):
        if self.merge_dtype not in MERGE_DTYPES:
            raise UserError(f"merge dtype must be one of {', '.join(MERGE_DTYPES)}, got {self.merge_dtype!r}")


def peft_state_dict(adapter: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Our '<module>.lora_A' tensors at r_max → PEFT's key names, truncated to rank b."""
    out = {}
    for key, tensor in adapter.items():
        module, kind = key.rsplit(".", 1)
        sliced = tensor[:rank] if kind == "lora_A" else tensor[:, :rank]
        out[f"{PEFT_PREFIX}{module}.{kind}.weight"] = sliced.contiguous().clone()
    return out


def peft_adapter_config(rank: int, qcfg: QDyLoRAConfig, target_modules: list[str], base_path: str) -> dict:
    """PEFT's adapter_config.json for rank b; qcfg is the adapter as used (see truncation.inference_config)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path,
        "r": rank, **peft_scale_fields(qcfg.alpha, rank, qcfg.scale, qcfg.r_max),
        "lora_dropout": qcfg.dropout, "target_modules": sorted(target_modules),
        "bias": "none", "use_dora": False, "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
    }


def sweep_numbers(sweep_dir: str | Path | None, rank: int) -> dict | None:
    """The sweep's summary row for this rank (and the base row), if the sweep measured it."""
    if not sweep_dir:
        return None
    measured = read_summary(sweep_dir)["rank"].tolist()  # checks the whole file first
    if rank not in measured:
        raise UserError(f"sweep {sweep_dir} did not measure rank {rank} (it has {measured})")
    with open(Path(sweep_dir) / SUMMARY_FILE, newline="", encoding="utf-8") as fh:
        rows = {int(float(r["rank"])): r for r in csv.DictReader(fh)}
    meta = read_json_object(Path(sweep_dir) / "sweep.json") or {}
    rec = meta.get("recommendation") if isinstance(meta.get("recommendation"), dict) else {}
    run_meta = meta.get("run_meta") if isinstance(meta.get("run_meta"), dict) else {}
    return {"rank": rows[rank], "base": rows.get(0), "sweep": str(sweep_dir), "recommendation": rec or None,
            "sweep_meta": {"n_prompts": rec.get("n_prompts"), "model": run_meta.get("model")}}


def export_rank(cfg: ExportConfig, on_progress=None) -> dict:
    """Write the export folder; returns the rank card. Nothing is written when input is bad."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    report = on_progress or (lambda message: None)
    run_dir, out = Path(cfg.run), check_output_folder(cfg.out)
    info = run_info(run_dir)
    config = info["config"]
    r_max = config["qdylora"]["r_max"]
    check_rank(cfg.rank, r_max)
    if cfg.rank == 0:
        raise UserError("rank 0 is the base model itself: there is no adapter to export")
    if not info["has_adapter"]:
        raise UserError(f"run {run_dir} has no saved adapter yet")
    incomplete = _incomplete_export(out)
    if not incomplete and not runstate.folder_is_empty_or_missing(out):
        raise UserError(f"output folder {out} already holds files; choose a new folder")
    measured = sweep_numbers(cfg.sweep, cfg.rank)
    try:
        adapter = load_file(str(run_dir / ADAPTER_DIR / ADAPTER_FILE))
    except (SafetensorError, OSError) as exc:
        raise RunError(f"the adapter of run {run_dir} cannot be read ({exc}); resume the run to save it again") from None

    trained = QDyLoRAConfig.from_dict(config["qdylora"])
    qcfg = inference_config(trained)
    adapter = inference_adapter_state(adapter, trained)
    _remove_stale_attempts(out, incomplete)
    modules = sorted({key.rsplit(".", 1)[0] for key in adapter})
    leaf_names = sorted({m.rsplit(".", 1)[-1] for m in modules})
    base_path = config["model"]["path"]
    tmp = out.with_name(out.name + f"{TMP_INFIX}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    make_output_folder(tmp)
    try:
        report("writing PEFT adapter")
        save_file(peft_state_dict(adapter, cfg.rank), str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        adapter_cfg = peft_adapter_config(cfg.rank, qcfg, leaf_names, base_path)
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_cfg, indent=2))
        if cfg.merge:
            report("merging rank into the base weights")
            write_merged(run_dir, cfg.rank, cfg.merge_dtype, tmp / "merged")
        file_sizes = {
            str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        card = {
            "run_id": run_dir.name, "run_dir": str(run_dir.resolve()), "rank": cfg.rank, "r_max": r_max,
            "alpha": qcfg.alpha, "scale_rule": qcfg.scale, "scale": qcfg.scale_at(cfg.rank), "method": qcfg.method,
            "trained_scale_rule": trained.scale,
            "base_model": config["model"], "trained_steps": (info["status"] or {}).get("step"),
            "adapter_params": sum(cfg.rank * (adapter[f"{m}.lora_A"].shape[1] + adapter[f"{m}.lora_B"].shape[0]) for m in modules),
            "target_modules": leaf_names, "adapted_layers": len(modules), "merged": cfg.merge,
            "file_sizes": file_sizes, "measured": measured, "created_at": time.time(),
            "base_hub_id": base_model_sources(config["model"], config["train"].get("model"))[0],
            "snippet": load_snippet(out.name, base_model_sources(config["model"], config["train"].get("model"))[0],
                                    base_path, nf4=config["model"].get("quant") == "nf4"),
        }
        (tmp / CARD_FILE).write_text(json.dumps(card, indent=2, default=str))
        (tmp / "rank_card.md").write_text(rank_card_markdown(card))
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2))
        fsync_tree(tmp)
        if out.exists():
            # checked above: empty, or only the job store's logs (core.jobs made the folder).
            # export_config.json moves first and the rank card last, so a folder holding the
            # one without the other is known to be an export stopped while moving in.
            order = {CONFIG_FILE: 0, CARD_FILE: 2}
            for item in sorted(tmp.iterdir(), key=lambda p: order.get(p.name, 1)):
                item.rename(out / item.name)
            tmp.rmdir()
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report("done")
    return card


def _incomplete_export(out: Path) -> list[Path]:
    """The files of an export that was stopped while moving into `out` (its export_config.json
    but no rank card yet); [] when `out` holds anything else or a finished export."""
    if not (out / CONFIG_FILE).is_file() or (out / CARD_FILE).exists():
        return []
    items = [p for p in out.iterdir() if p.name not in runstate.JOB_STORE_FILES]
    return items if items and all(p.name in EXPORT_FILES for p in items) else []


def _remove_stale_attempts(out: Path, incomplete: list[Path]) -> None:
    """Clear what stopped attempts of this export left: their temporary folders next to
    `out` (whose process is gone) and an incomplete export inside it."""
    for tmp in out.parent.glob(out.name + TMP_INFIX + "*"):
        pid = tmp.name.rsplit(TMP_INFIX, 1)[-1]
        if tmp.is_dir() and pid.isdigit() and not proc.is_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
    for item in incomplete:
        if item.is_dir():
            shutil.rmtree(item)
        else:
            item.unlink()


def write_merged(run_dir: Path, rank: int, merge_dtype: str, folder: Path) -> None:
    """W' = W0 + s(b) B[:, :b] A[:b] in a 16/32-bit copy of the base.

    W0 is the weight the run trained against: for an NF4 run that is the dequantized NF4
    weight, not the original float weight (merging into 4-bit would round the update away).
    """
    from transformers import AutoModelForCausalLM

    from core.qdylora import qdylora_layers
    from core.runs import load_run

    device = pick_device("auto")
    dtype = compute_dtype_for(device) if merge_dtype == "auto" else dtype_from_name(merge_dtype)
    loaded = load_run(run_dir)
    merged_weights = {}
    with torch.no_grad():
        for name, layer in qdylora_layers(loaded.model).items():
            merged_weights[name] = (layer.base_weight_float() + layer.delta_weight(rank)).cpu()
    del loaded
    plain = AutoModelForCausalLM.from_pretrained(run_info(run_dir)["config"]["model"]["path"], dtype=torch.float32)
    with torch.no_grad():
        for name, weight in merged_weights.items():
            plain.get_submodule(name).weight.copy_(weight)
    plain = plain.to(dtype)
    plain.save_pretrained(folder, safe_serialization=True)
    from core.models import load_tokenizer

    load_tokenizer(run_info(run_dir)["config"]["model"]["path"]).save_pretrained(folder)
