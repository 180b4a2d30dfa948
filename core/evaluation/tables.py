"""Tables for people from a sweep's results: every number rounded, every column named in
words. (The raw columns stay in summary.csv / per_prompt.csv, offered as downloads.)

Pure functions of DataFrames; the dashboard and the decision report draw what they return.
"""
from __future__ import annotations

import json
import math

import pandas as pd

from core.evaluation import wording as w
from core.evaluation.metrics import fact_hits
from core.evaluation.recommend import METRICS, STATUS_WORDS, Recommendation, relative_gap, tolerance


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def rank_column(ranks) -> list[str]:
    return [w.rank_label(r) for r in ranks]


# ------------------------------------------------------------------ per rank


def summary_table(summary: pd.DataFrame, rec: Recommendation | None, metrics: list[str]) -> pd.DataFrame:
    """One row per rank: quality with 95 % ranges, the verdict, speed, size."""
    status = rec.table.set_index("rank")["status"].to_dict() if rec is not None else {}
    out = pd.DataFrame({"Rank": [w.rank_label(r) + (" ★" if rec is not None and r == rec.rank else "")
                                 for r in summary["rank"].astype(int)]})
    if rec is not None:
        out[f"Verdict on {rec.spec.label.lower()}"] = [STATUS_WORDS.get(status.get(int(r), ""), "")
                                                      for r in summary["rank"]]
    for m in metrics:
        if m in summary and summary[m].notna().any():
            out[f"{METRICS[m].label} (95 % range)"] = [
                w.metric_with_range(m, row.get(m), row.get(f"{m}_lo"), row.get(f"{m}_hi")) for row in summary.to_dict("records")]
    speed = [("ms_per_token_merged", "Served merged, per token"), ("ms_per_token", "With adapter on 4-bit base, per token")]
    for col, label in speed:
        if col in summary and summary[col].notna().any():
            out[label] = [w.ms_range(row.get(col), row.get(f"{col}_lo"), row.get(f"{col}_hi"))
                          for row in summary.to_dict("records")]
    if "adapter_mb" in summary and summary["adapter_mb"].notna().any():
        out["Adapter size"] = ["—" if int(r) == 0 else w.mb(v) for r, v in zip(summary["rank"], summary["adapter_mb"])]
    if "adapter_params" in summary and summary["adapter_params"].notna().any():
        out["Adapter parameters"] = ["—" if int(r) == 0 else w.count(v)
                                     for r, v in zip(summary["rank"], summary["adapter_params"])]
    return out


# ------------------------------------------------------------------ per prompt


def facts_by_prompt(per_prompt: pd.DataFrame | None) -> dict[str, list[str]]:
    """Prompt id → its must-include facts, from per_prompt.csv's `must_include` (JSON lists)."""
    out: dict[str, list[str]] = {}
    if per_prompt is None or per_prompt.empty or "must_include" not in per_prompt.columns:
        return out
    for pid, raw in zip(per_prompt["id"].astype(str), per_prompt["must_include"]):
        if pid in out or _missing(raw) or not str(raw).strip():
            continue
        try:
            facts = json.loads(raw)
        except ValueError:
            facts = [x.strip() for x in str(raw).split(";")]
        out[pid] = [str(f) for f in facts if str(f).strip()]
    return out


def prompt_label(pid, prompt, width: int = 50) -> str:
    text = " ".join(str(prompt).split())
    return f"{pid} · {text if len(text) <= width else text[: width - 1] + '…'}"


def _fact_words(hits: list[tuple[str, bool]]) -> str:
    return " · ".join(("✓ " if found else "✗ ") + fact for fact, found in hits)


def _fact_kind(hits: list[tuple[str, bool]]) -> str:
    found = sum(f for _, f in hits)
    return "hit" if found == len(hits) else ("miss" if found == 0 else "partial")


def prompt_grid(per_prompt: pd.DataFrame, metric: str, threshold: float, facts: dict[str, list[str]],
                only: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Prompts × ranks: each cell the prompt's score at that rank and, where the prompt has
    must-include facts, which ones the answer has (✓) or misses (✗).

    Returns (cells, kinds): same shape; kinds say how to highlight a cell: "hit" (all
    facts found), "partial", "miss" (none found), "fails" (no facts, and the score misses
    the tolerance of the prompt's own highest-rank score) or "".
    only: the prompt ids to keep (e.g. those that degrade), in that order.
    """
    spec = METRICS[metric]
    df = per_prompt.copy()
    df["rank"] = df["rank"].astype(int)
    df["id"] = df["id"].astype(str)
    ranks = sorted(df["rank"].unique().tolist())
    ids = list(dict.fromkeys(df["id"]))
    if only is not None:
        keep = set(only)
        ids = [i for i in dict.fromkeys(str(x) for x in only) if i in set(ids) and i in keep]
    prompts = df.drop_duplicates("id").set_index("id")["prompt"]
    columns = rank_column(ranks)
    cells = pd.DataFrame("", index=[prompt_label(i, prompts[i], width=45) for i in ids], columns=columns)
    kinds = pd.DataFrame("", index=cells.index, columns=columns)
    by = df.set_index(["id", "rank"])
    for pid, label in zip(ids, cells.index):
        adapters = [r for r in ranks if r > 0 and (pid, r) in by.index and not _missing(by.loc[(pid, r)].get(metric))]
        top_value = float(by.loc[(pid, adapters[-1])][metric]) if adapters else None
        for r, col in zip(ranks, columns):
            if (pid, r) not in by.index:
                continue
            row = by.loc[(pid, r)]
            value = row.get(metric)
            text = spec.show(value, unit=False)
            hits = fact_hits(str(row.get("answer") or ""), facts.get(pid, []))
            if hits:
                text += "  " + _fact_words(hits)
                kinds.loc[label, col] = _fact_kind(hits)
            elif top_value is not None and r > 0 and not _missing(value):
                gap = (float(value) - top_value) if spec.higher_is_better else (top_value - float(value))
                if gap < -tolerance(metric, threshold, top_value) - 1e-12:
                    kinds.loc[label, col] = "fails"
            cells.loc[label, col] = text
    return cells, kinds


def degradation_table(deg: pd.DataFrame, metric: str) -> pd.DataFrame:
    """`workspace_data.prompt_degradation` in words: no "None", no negative "worse by"."""
    spec = METRICS[metric]
    cols = ["Prompt", "First falls short at", "At the highest rank", "At the lowest rank", "Base model",
            "Lowest vs highest rank"]
    if deg is None or deg.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for r in deg.to_dict("records"):
        gap = relative_gap(metric, r["lowest_value"], r["top_value"]) if not _missing(r["top_value"]) else math.nan
        if _missing(gap) or abs(gap) < 0.0005:
            change = "same"
        else:
            change = f"{w.percent(gap)} {'worse' if gap > 0 else 'better'}"
        rows.append({
            "Prompt": prompt_label(r["id"], r["prompt"]),
            "First falls short at": "holds up at every rank" if _missing(r["degrades_below"])
            else f"rank {int(r['degrades_below'])}",
            "At the highest rank": f"{spec.show(r['top_value'])} (rank {int(r['top_rank'])})",
            "At the lowest rank": f"{spec.show(r['lowest_value'])} (rank {int(r['lowest_rank'])})",
            "Base model": spec.show(r["base_value"]),
            "Lowest vs highest rank": change,
        })
    return pd.DataFrame(rows, columns=cols)


def example_answers(per_prompt: pd.DataFrame, ranks: list[int], facts: dict[str, list[str]],
                    ids: list[str] | None = None, n: int = 5) -> list[dict]:
    """Up to `n` prompts (ids in the order given, else the first ones) with the reference,
    the facts and each rank's answer with its fact hits: for the report."""
    df = per_prompt.copy()
    df["rank"] = df["rank"].astype(int)
    df["id"] = df["id"].astype(str)
    order = [str(i) for i in (ids or [])] + list(dict.fromkeys(df["id"]))
    chosen = list(dict.fromkeys(i for i in order if i in set(df["id"])))[:n]
    out = []
    for pid in chosen:
        g = df[df["id"] == pid].set_index("rank")
        first = g.iloc[0]
        answers = {}
        for r in ranks:
            if r in g.index:
                answer = "" if _missing(g.loc[r].get("answer")) else str(g.loc[r].get("answer"))
                answers[r] = {"answer": answer, "hits": fact_hits(answer, facts.get(pid, []))}
        out.append({"id": pid, "prompt": str(first["prompt"]), "reference": str(first["reference"]),
                    "facts": facts.get(pid, []), "answers": answers})
    return out


def by_set_table(by_set: pd.DataFrame | None, metric: str) -> pd.DataFrame | None:
    """One row per named evaluation set, one column per rank: the metric with its 95 % range, in words.
    None when the sweep has no named sets or did not measure the metric."""
    if by_set is None or by_set.empty or metric not in by_set.columns or by_set[metric].isna().all():
        return None
    ranks = sorted(int(r) for r in by_set["rank"].unique())
    rows = []
    for name, group in by_set.groupby("set", sort=False):
        cells = {int(r["rank"]): w.metric_with_range(metric, r[metric], r.get(f"{metric}_lo"), r.get(f"{metric}_hi"))
                 for _, r in group.iterrows()}
        rows.append({"Evaluation set": name} | {w.rank_label(b): cells.get(b, "—") for b in ranks})
    return pd.DataFrame(rows)
