"""Hand-made run, sweep and export folders that follow docs/ARCHITECTURE.md (no model).

The sweep: ranks 0, 1, 2, 4 on eight prompts with must-include facts. Paired over the
prompts, rank 2 is as good as rank 4 (the best) at the default tolerance and rank 1 is
worse; at threshold 0.80 rank 1 is good enough too. Prompt e2 degrades first.
"""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path

from core.evaluation.metrics import fact_recall
from core.evaluation.stats import bootstrap_mean_ci

RANKS = (0, 1, 2, 4)
DIFFICULTY = [1.30, 1.50, 1.40, 1.60, 1.45, 1.55, 1.35, 1.50]
SHIFT = {0: 0.60, 1: 0.10, 2: 0.02, 4: 0.0}
WIGGLE = [0.01, -0.01, 0.02, 0.0, -0.02, 0.01, 0.0, -0.01]
PROMPTS = [
    ("e1", "Who founded Quillhaven?", "Ilse Varga founded Quillhaven in 2017.", ["Ilse Varga", "2017"]),
    ("e2", "What does the QB-100 cost?", "The QB-100 costs €89.", ["€89"]),
    ("e3", "What are the opening hours?", "Monday to Friday 08:00 to 18:00.", ["08:00", "18:00"]),
    ("e4", "Where is Quillhaven based?", "In Leipzig, Germany.", ["Leipzig"]),
    ("e5", "How long is the kettle warranty?", "Two years.", ["two years"]),
    ("e6", "Who leads customer care?", "Marta Oyelaran.", ["Marta Oyelaran"]),
    ("e7", "Is the GrindLine dishwasher safe?", "No, wipe it with a dry cloth.", ["dry cloth"]),
    ("e8", "What is the MilkCloud?", "Our milk frother.", ["frother"]),
]
PER_PROMPT_COLUMNS = ["rank", "id", "prompt", "reference", "answer", "ref_nll", "ref_tokens", "rouge_l",
                      "fact_recall", "similarity", "must_include"]


def _jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _csv(path: Path, columns, rows) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def make_run(folder: Path, data: Path, r_max: int = 4, steps: int = 4) -> None:
    (folder / "config.json").write_text(json.dumps({
        "train": {"data": str(data), "out": str(folder), "model": "default", "quant": "nf4", "r_max": r_max,
                  "steps": steps, "batch_size": 4, "lr": 3e-4, "max_length": 256, "rank_sampling": "uniform"},
        "qdylora": {"r_max": r_max, "alpha": 16.0, "dropout": 0.05, "rank_sampling": "uniform"},
        "model": {"name": "SmolLM2-135M-Instruct", "path": "/models/smol", "quant": "nf4",
                  "compute_dtype": "float32", "device": "cpu"},
    }))
    (folder / "status.json").write_text(json.dumps({"status": "completed", "pid": 1, "step": steps,
                                                     "total_steps": steps, "updated_at": time.time()}))
    ranks = [1, 3, 2, 4]
    _jsonl(folder / "progress.jsonl", [{"event": "start", "step": 0, "total_steps": steps}] + [
        {"event": "step", "step": i + 1, "total_steps": steps, "loss": 3.0 - 0.4 * i, "rank": ranks[i % 4],
         "lr": 2e-4, "tokens_per_s": 90.0, "elapsed_s": 5.0 * (i + 1), "eta_s": 5.0 * (steps - i - 1),
         "mem_mb": 2100.0, "time": time.time()} for i in range(steps)] + [{"event": "end", "status": "completed"}])
    (folder / "rank_histogram.json").write_text(json.dumps({"1": 1, "2": 1, "3": 1, "4": 1}))
    (folder / "data_report.json").write_text(json.dumps({"examples": 40, "truncated": 1}))
    (folder / "adapter").mkdir(exist_ok=True)
    (folder / "adapter" / "adapter.safetensors").write_bytes(b"placeholder")


def per_prompt_rows() -> list[dict]:
    rows = []
    for b in RANKS:
        for i, (pid, prompt, ref, facts) in enumerate(PROMPTS):
            nll = DIFFICULTY[i] + SHIFT[b] + (WIGGLE[i] * (b in (1, 2)))
            if pid == "e2" and b == 1:
                nll += 0.3                       # e2 degrades first
            found = facts if b >= 2 else facts[: len(facts) // 2]
            answer = f"answer of rank {b} to {pid}" + ("".join(f", {f}" for f in found) if b > 0 else "")
            rouge = {0: 0.20, 1: 0.50, 2: 0.60, 4: 0.61}[b] + WIGGLE[i] / 4
            rows.append({"rank": b, "id": pid, "prompt": prompt, "reference": ref, "answer": answer,
                         "ref_nll": round(nll, 4), "ref_tokens": 10, "rouge_l": round(rouge, 4),
                         "fact_recall": fact_recall(answer, facts), "similarity": round(0.5 + rouge / 2, 4),
                         "must_include": json.dumps(facts)})
    return rows


def summary_rows(per_prompt: list[dict]) -> list[dict]:
    out = []
    for b in RANKS:
        mine = [r for r in per_prompt if r["rank"] == b]
        row = {"rank": b}
        for m in ("ref_nll", "rouge_l", "fact_recall", "similarity"):
            iv = bootstrap_mean_ci([r[m] for r in mine], n_resamples=200)
            row.update({m: iv.mean, f"{m}_lo": iv.lo, f"{m}_hi": iv.hi})
        adapter = 3300.0 + 40 * b if b else 2900.0
        row.update(ppl=2.718 ** row["ref_nll"], ttft_ms=adapter * 1.5, ttft_ms_lo=adapter * 1.4, ttft_ms_hi=adapter * 1.7,
                   ms_per_token=adapter, ms_per_token_lo=adapter - 200, ms_per_token_hi=adapter + 250,
                   tokens_per_s=1000 / adapter, ms_per_token_merged=410.0 + b, ms_per_token_merged_lo=380.0,
                   ms_per_token_merged_hi=450.0, ttft_ms_merged=600.0, adapter_params=36864 * b,
                   adapter_mb=36864 * b * 4 / 2**20, base_mb=166.0, merged_mb=538.0, peak_mem_mb=1900.0 + b,
                   latency_runs=6)
        out.append(row)
    return out


def make_sweep(folder: Path, run_dir: Path, metrics=("ref_nll", "rouge_l", "fact_recall", "similarity")) -> None:
    dropped = [m for m in ("ref_nll", "rouge_l", "fact_recall", "similarity") if m not in metrics]

    def keep(key: str) -> bool:
        return not any(key == m or key.startswith(m + "_") for m in dropped)

    per = [{k: v for k, v in row.items() if keep(k)} for row in per_prompt_rows()]
    summary = [{k: v for k, v in row.items() if keep(k)} for row in summary_rows(per_prompt_rows())]
    _csv(folder / "summary.csv", list(summary[0]), summary)
    _csv(folder / "per_prompt.csv", [c for c in PER_PROMPT_COLUMNS if keep(c)], per)
    from core.evaluation.recommend import recommend_rank

    rec = recommend_rank(per, "ref_nll" if "ref_nll" in metrics else metrics[0], 0.95).to_dict()
    rec.pop("table")
    config = {"run": str(run_dir), "prompts": "/data/eval.jsonl", "ranks": list(RANKS), "metrics": list(metrics),
              "max_new_tokens": 64, "latency_new_tokens": 16, "n_bootstrap": 2000, "seed": 0}
    (folder / "sweep.json").write_text(json.dumps({
        "config": config, "run": str(run_dir), "ranks_done": list(RANKS),
        "run_meta": {"model": {"name": "SmolLM2-135M-Instruct", "path": "/models/smol", "quant": "nf4",
                               "compute_dtype": "float32", "device": "cpu"}, "r_max": 4},
        "recommendation": rec, "skipped_rows": [], "notes": []}))
    (folder / "config.json").write_text(json.dumps({"config": config}))
    (folder / "status.json").write_text(json.dumps({"status": "completed", "pid": 1, "updated_at": time.time()}))
    _jsonl(folder / "progress.jsonl", [{"event": "start", "total_units": 32, "done_units": 0},
                                       {"event": "prompt", "rank": 4, "done": 8, "total": 8, "units": 8,
                                        "done_units": 32, "total_units": 32, "eta_s": 0},
                                       {"event": "end", "status": "completed"}])


def make_export(folder: Path, run_dir: Path, sweep_dir: Path | None = None) -> None:
    from core.rank_card import load_snippet, rank_card_markdown

    measured = None
    if sweep_dir is not None:
        with open(sweep_dir / "summary.csv", newline="") as fh:
            rows = {int(float(r["rank"])): r for r in csv.DictReader(fh)}
        meta = json.loads((sweep_dir / "sweep.json").read_text())
        measured = {"rank": rows[2], "base": rows[0], "sweep": str(sweep_dir),
                    "recommendation": meta["recommendation"], "sweep_meta": {"n_prompts": 8}}
    card = {"run_id": run_dir.name, "run_dir": str(run_dir), "rank": 2, "r_max": 4, "alpha": 16.0, "scale": 8.0,
            "base_model": {"name": "SmolLM2-135M-Instruct", "path": "/models/smol", "quant": "nf4",
                           "compute_dtype": "float32", "device": "cpu"},
            "base_hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "adapter_params": 73728, "adapted_layers": 210,
            "target_modules": ["q_proj", "v_proj"], "merged": False,
            "file_sizes": {"adapter_model.safetensors": 295000}, "measured": measured,
            "snippet": load_snippet(folder.name, "HuggingFaceTB/SmolLM2-135M-Instruct", "/models/smol")}
    (folder / "rank_card.json").write_text(json.dumps(card))
    (folder / "rank_card.md").write_text(rank_card_markdown(card))
    (folder / "adapter_model.safetensors").write_bytes(b"x" * 10)
    (folder / "adapter_config.json").write_text("{}")
