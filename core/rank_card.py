"""The rank card of an export: what the adapter is, what was measured (rounded, in words,
the same numbers as the decision report), what changes on a full-precision base, and a
loading snippet that works on another machine. Torch-free.
"""
from __future__ import annotations

import math
from pathlib import Path

from core.evaluation import wording as w
from core.evaluation.recommend import METRICS
from core.model_spec import DEFAULT_MODEL, DEFAULT_MODEL_HUB_ID


def base_model_sources(model: dict, requested: str | None) -> tuple[str | None, str]:
    """(hub id or None, local path) of a run's base model.

    model: the run's resolved model (config.json "model": name, path, ...).
    requested: what the user asked for (config.json "train"."model": "default", a folder
        or a hub id).
    """
    path = str(model.get("path") or "")
    if requested == DEFAULT_MODEL:
        return DEFAULT_MODEL_HUB_ID, path
    if path and not path.startswith(("/", ".", "~")) and path.count("/") == 1 and not Path(path).exists():
        return path, path                   # loaded from the hub by its id
    return None, path


def load_snippet(adapter_folder: str, hub_id: str | None, local_path: str, nf4: bool = True) -> str:
    """Python that loads the adapter with PEFT: the base by hub id where one is known, the
    training machine's local copy as a fallback (or the only source). `nf4`: the numbers
    were measured on the 4-bit base (the snippet says how to load it that way)."""
    fallback = bool(hub_id) and hub_id != local_path
    lines = (["import os", ""] if fallback else []) + [
        "from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", ""]
    if fallback:
        lines += [f"BASE = {hub_id!r}  # the base model on the Hugging Face hub",
                  f"LOCAL_BASE = {local_path!r}  # its copy on the machine that trained the adapter",
                  "if os.path.isdir(LOCAL_BASE):  # use the local copy where it exists (no download)",
                  "    BASE = LOCAL_BASE"]
    elif hub_id:
        lines += [f"BASE = {hub_id!r}  # the base model on the Hugging Face hub"]
    else:
        lines += [f"BASE = {local_path!r}  # a local model folder: copy it along and change this path"]
    lines += [f"ADAPTER = {adapter_folder!r}  # this folder, where you unzipped it", "",
              "tokenizer = AutoTokenizer.from_pretrained(BASE)",
              "base = AutoModelForCausalLM.from_pretrained(BASE)",
              "model = PeftModel.from_pretrained(base, ADAPTER)"]
    if nf4:
        lines += ["# To run it as measured, on the 4-bit NF4 base (needs bitsandbytes), load the base with",
                  "# quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=\"nf4\",",
                  "#     bnb_4bit_use_double_quant=True)  (from transformers import BitsAndBytesConfig)."]
    return "\n".join(lines)


def _float(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def measured_rows(rank_row: dict, base_row: dict | None) -> list[tuple[str, str, str]]:
    """(measure, this rank, base model) rows from two summary.csv rows, rounded in words."""
    base_row = base_row or {}
    out = []

    def get(row, key):
        return _float(row.get(key))

    for m, spec in METRICS.items():
        if get(rank_row, m) is None:
            continue
        out.append((spec.label, w.metric_with_range(m, get(rank_row, m), get(rank_row, f"{m}_lo"), get(rank_row, f"{m}_hi")),
                    w.metric_with_range(m, get(base_row, m), get(base_row, f"{m}_lo"), get(base_row, f"{m}_hi"))))
    for col, label in (("ms_per_token_merged", "Served merged, per token"),
                       ("ms_per_token", "With adapter on 4-bit base, per token"),
                       ("ttft_ms_merged", "First token, served merged")):
        if get(rank_row, col) is not None:
            out.append((label, w.ms_range(get(rank_row, col), get(rank_row, f"{col}_lo"), get(rank_row, f"{col}_hi")),
                        w.ms_range(get(base_row, col), get(base_row, f"{col}_lo"), get(base_row, f"{col}_hi"))))
    if get(rank_row, "adapter_mb") is not None:
        out.append(("Adapter size", w.mb(get(rank_row, "adapter_mb")), "—"))
    if get(rank_row, "base_mb") is not None:
        out.append(("Base model weights (4-bit)", w.mb(get(rank_row, "base_mb")), w.mb(get(base_row, "base_mb"))))
    if get(rank_row, "merged_mb") is not None:
        out.append(("Merged full-precision model", w.mb(get(rank_row, "merged_mb")), "—"))
    return out


def rank_card_markdown(card: dict, with_snippet: bool = True) -> str:
    """The card as Markdown: numbers rounded and in words (raw values stay in rank_card.json)."""
    model = card["base_model"]
    hub = card.get("base_hub_id")
    size = sum(v for k, v in card.get("file_sizes", {}).items() if not k.startswith("merged") and k.endswith(".safetensors"))
    lines = [
        f"# Rank card: {card['run_id']} at rank {card['rank']}", "",
        f"Rank {card['rank']} of a QDyLoRA run (r_max {card['r_max']}) on {model['name']}: a standard PEFT LoRA "
        f"adapter of {w.mb(size / 2**20)} ({w.count(card['adapter_params'])} parameters).", "",
    ]
    measured = card.get("measured")
    if measured:
        sweep = measured.get("sweep_meta") or {}
        n = sweep.get("n_prompts")
        lines += ["## Measured", "",
                  f"Measured by a sweep{f' on {n} evaluation prompts' if n else ''}, on the {model['quant'].upper()} "
                  f"base model (compute {model.get('compute_dtype', '?')}, {model.get('device', '?')}).", "",
                  "| Measure | This rank | Base model |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in measured_rows(measured["rank"], measured.get("base"))]
        rec = measured.get("recommendation") or {}
        if rec.get("reason"):
            same = rec.get("rank") == card["rank"]
            lines += ["", f"**The sweep's decision** ({METRICS[rec['metric']].label.lower() if rec.get('metric') in METRICS else rec.get('metric')}): "
                      f"{rec.get('headline', '')}. {rec['reason']}"
                      + ("" if same else f" This export is rank {card['rank']}, not the recommended one.")]
        lines += [""]
    else:
        lines += ["No sweep measured this rank: the card has no quality, speed or memory numbers.", ""]
    lines += ["## On another base", "", w.FULL_PRECISION_NOTE if model.get("quant") == "nf4" else
              f"Measured on the base model in {model.get('compute_dtype', 'full precision')} (no quantization).", "",
              "## Details", "",
              f"- Base model: {model['name']}" + (f" (hub id `{hub}`)" if hub else "") + f"; local copy `{model['path']}`",
              f"- Trained on the base in {model['quant']} with compute dtype {model.get('compute_dtype', '?')}",
              f"- Rank {card['rank']} of r_max {card['r_max']}; alpha {card['alpha']}; scale {float(card['scale']):.4g}"
              + (f" ({card['scale_rule']}{', ' + card['method'] + ' method' if card.get('method', 'qdylora') != 'qdylora' else ''})"
                 if card.get("scale_rule") else "")
              + (f"; trained with the per-row rule {card['trained_scale_rule']}, each row's factor folded into lora_B"
                 if card.get("method", "qdylora") == "qdylora" and card.get("trained_scale_rule") not in (None, card.get("scale_rule"))
                 else ""),
              f"- Adapted layers: {card.get('adapted_layers', '?')} ({', '.join(card.get('target_modules', []))})",
              "- Files: " + ", ".join(f"{name} {w.mb(size / 2**20)}" for name, size in card.get("file_sizes", {}).items())]
    if with_snippet:
        lines += ["", "## Load it", "", "```python", card["snippet"], "```"]
    return "\n".join(lines) + "\n"
