"""Numbers for people: rounded values with units, and the sentences that sum up a decision.

The dashboard, the decision report and the rank card all format through here, so the
same number reads the same everywhere. Torch-free.
"""
from __future__ import annotations

import math

import pandas as pd

from core.evaluation.recommend import (
    AS_GOOD,
    CANNOT_TELL,
    METRICS,
    NO_GAIN,
    VERDICT_WORDS,
    join_words,
    percent,
    Recommendation,
    relative_gap,
)

# What "adapter" and "merged" speed mean, in one line each (the speed tab, the report, the card).
SPEED_ADAPTER = ("With the adapter: the 4-bit base model plus the rank-b adapter, unmerged — how the run was "
                 "trained. Every layer unpacks its 4-bit weights and runs two extra small matrix products per "
                 "token, which is slow on a CPU.")
SPEED_MERGED = ("Merged: the adapter folded into a full-precision copy of the base — what you would serve. "
                "No extra work per token, so every rank runs at the same speed.")
# What changes when the adapter goes onto a full-precision base instead of the NF4 one it was measured on.
FULL_PRECISION_NOTE = (
    "These numbers were measured on the 4-bit NF4 base the adapter was trained with. On a full-precision "
    "(16/32-bit) base the adapter works unchanged, but the base weights differ slightly from their 4-bit "
    "rounding, so answers can differ a little and quality may move by about the measured noise; the base "
    "takes about 3-4× more memory, and speed depends on the hardware (merged weights run at the merged speed).")


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def ms(value) -> str:
    """Milliseconds for people: "8.2 ms", "410 ms", "3.3 s"."""
    if _missing(value):
        return "—"
    v = float(value)
    if v >= 1000:
        return f"{v / 1000:.1f} s"
    return f"{v:.1f} ms" if v < 10 else f"{v:.0f} ms"


def ms_spread(lo, hi) -> str:
    """A fastest–slowest range: "380–450 ms", "2.7–3.1 s"; "" when unknown or a single value."""
    if _missing(lo) or _missing(hi) or ms(lo) == ms(hi):
        return ""
    low, high = ms(lo), ms(hi)
    if low.split()[-1] == high.split()[-1]:          # same unit: "380–450 ms"
        low = low.rsplit(" ", 1)[0]
    return f"{low}–{high}"


def ms_range(value, lo=None, hi=None) -> str:
    """A median with its spread: "410 ms (380–450 ms)"."""
    if _missing(value):
        return "—"
    spread = ms_spread(lo, hi)
    return f"{ms(value)} ({spread})" if spread else ms(value)


def mb(value) -> str:
    """Megabytes for people: "0.04 MB", "3.1 MB", "166 MB", "1.2 GB"."""
    if _missing(value):
        return "—"
    v = float(value)
    if v >= 1024:
        return f"{v / 1024:.1f} GB"
    if v >= 10:
        return f"{v:.0f} MB"
    return f"{v:.1f} MB" if v >= 1 else f"{v:.2f} MB"


def count(value) -> str:
    return "—" if _missing(value) else f"{int(value):,}"


def times(value) -> str:
    """A ratio: "8×", "1.5×"."""
    if _missing(value):
        return "—"
    v = float(value)
    return f"{v:.0f}×" if v >= 9.95 or abs(v - round(v)) < 0.05 else f"{v:.1f}×"


def rank_label(rank) -> str:
    return "Base model" if int(rank) == 0 else f"Rank {int(rank)}"


def metric_with_range(metric: str, value, lo=None, hi=None) -> str:
    """"1.45 (1.40–1.50) nats/token", "62 % (55–70 %)"."""
    spec = METRICS[metric]
    if _missing(value):
        return "—"
    if _missing(lo) or _missing(hi) or spec.show(lo) == spec.show(hi):
        return spec.show(value)
    if spec.percent:
        return f"{spec.show(value)} ({100 * lo:.{spec.decimals}f}–{spec.show(hi)})"
    unit = f" {spec.unit}" if spec.unit else ""
    return f"{spec.show(value, unit=False)} ({spec.show(lo, unit=False)}–{spec.show(hi, unit=False)}){unit}"


def _row(summary: pd.DataFrame, rank: int) -> dict:
    rows = summary[summary["rank"].astype(int) == int(rank)]
    return rows.iloc[0].to_dict() if len(rows) else {}


def rank_sentence(summary: pd.DataFrame | None, rec: Recommendation, rank: int | None = None) -> str:
    """A rank in one sentence: "Rank 2 is within 3 % of the best rank (4), 8× smaller than
    rank 16 and as fast when merged." `rank`: another rank than the recommended one.
    Empty when there is no rank (or it was not measured)."""
    b = rec.rank if rank is None else rank
    values = rec.table.set_index("rank")["value"]
    if b is None or b == 0 or b not in values.index or _missing(values[b]) or rec.best_value is None:
        return ""
    spec, b = rec.spec, int(b)
    if b == rec.best_rank:
        parts = [f"Rank {b} is the best rank on {spec.label.lower()}"]
    else:
        gap = relative_gap(rec.metric, float(values[b]), float(rec.best_value))
        if gap <= 0.0005:
            parts = [f"Rank {b} is as good as the best rank ({rec.best_rank}) on {spec.label.lower()}"]
        else:
            parts = [f"Rank {b} is within {percent(gap)} of the best rank ({rec.best_rank}) on {spec.label.lower()}"]
    if summary is not None and not summary.empty:
        mine = _row(summary, b)
        top = int(summary["rank"].max())
        high = _row(summary, top)
        if top > b and not _missing(mine.get("adapter_params")) and float(mine.get("adapter_params") or 0) > 0 \
                and not _missing(high.get("adapter_params")):
            parts.append(f"{times(float(high['adapter_params']) / float(mine['adapter_params']))} smaller than rank {top}")
        merged, merged_top = mine.get("ms_per_token_merged"), high.get("ms_per_token_merged")
        if top != b and not _missing(merged) and not _missing(merged_top) and float(merged_top) > 0:
            ratio = float(merged) / float(merged_top)
            if abs(ratio - 1) <= 0.1:
                parts.append("as fast when merged")
            else:
                parts.append(f"{percent(abs(1 - ratio))} {'faster' if ratio < 1 else 'slower'} than rank {top} when merged")
    return join_words(parts) + "."


def base_kind(quant: str | None) -> str:
    """How the base model was held: "4-bit" (NF4) or "full-precision"."""
    return "4-bit" if quant in (None, "nf4") else "full-precision"


def memory_words(summary: pd.DataFrame, rank: int | None, quant: str | None = "nf4") -> str:
    """What the weights take: the base (4-bit unless `quant` says otherwise), the adapter at
    `rank`, the merged copy."""
    row = _row(summary, rank) if rank is not None else {}
    if not row:
        row = _row(summary, int(summary["rank"].max()))
    parts = []
    if not _missing(row.get("base_mb")):
        parts.append(f"The {base_kind(quant)} base model's weights take {mb(row['base_mb'])}")
    if not _missing(row.get("adapter_mb")) and int(row["rank"]) > 0:
        parts.append(f"the rank-{int(row['rank'])} adapter adds {mb(row['adapter_mb'])}")
    text = join_words(parts) + "." if parts else ""
    if not _missing(row.get("merged_mb")):
        text += (f" Merged into a full-precision copy (what you would serve without 4-bit kernels) the model takes "
                 f"{mb(row['merged_mb'])} at every rank.")
    if "peak_mem_mb" in summary and summary["peak_mem_mb"].notna().any():
        timed = "merged_mb" in summary and summary["merged_mb"].notna().any()
        loaded = [f"the {base_kind(quant)} model"] + (["the merged copy used for timing"] if timed else []) + ["the metric models"]
        text += (f" The sweep process peaked at {mb(summary['peak_mem_mb'].max())} (everything it had loaded: "
                 f"{join_words(loaded)}).")
    return text.strip()


def decision_title(rec: Recommendation, rank: int | None = None) -> str:
    """The decision as a title: "Use rank 2", "Use rank 1 — the safe pick; …", "Keep the base model: …"."""
    chosen = rec.rank if rank is None else rank
    if rank is not None and rank != rec.rank:
        return f"Use rank {rank}"
    if rec.verdict == AS_GOOD:
        return f"Use rank {chosen}"
    if rec.verdict == CANNOT_TELL:
        return f"Use rank {chosen} — the safe pick; the ranks cannot be told apart yet"
    if rec.verdict == NO_GAIN:
        return "Keep the base model: no rank beats it"
    return rec.headline


def verdict_style(verdict: str) -> str:
    """How loudly to show a verdict: "success", "warning" or "error"."""
    return {AS_GOOD: "success", CANNOT_TELL: "warning", NO_GAIN: "error"}.get(verdict, "warning")


def across_metrics_words(recs: dict[str, Recommendation], chosen: str) -> str:
    """One sentence on whether the metrics agree with the decision."""
    if not recs:
        return ""
    picks = {m: r.rank for m, r in recs.items()}
    mine = picks.get(chosen)
    agree = [m for m, r in picks.items() if r == mine]
    if len(recs) == 1:
        return f"Only {METRICS[chosen].label.lower()} was measured."
    what = f"rank {mine}" if mine is not None else "no rank"
    if len(agree) == len(recs):
        return f"All {len(recs)} measures agree: {what}."
    others = "; ".join(f"{METRICS[m].label.lower()} picks {'rank ' + str(r) if r is not None else 'no rank'}"
                       for m, r in picks.items() if r != mine)
    text = f"{len(agree)} of {len(recs)} measures agree on {what}; {others}."
    chosen_ranks = [r for r in picks.values() if r is not None]
    if chosen_ranks and max(chosen_ranks) != mine:
        text += f" Rank {max(chosen_ranks)} is the most cautious choice (the highest of the picks)."
    return text


def across_metrics_table(recs: dict[str, Recommendation], chosen: str) -> pd.DataFrame:
    """Measure × recommended rank, with the verdict and agreement with the decision."""
    mine = recs[chosen].rank if chosen in recs else None
    rows = []
    for m, r in recs.items():
        rows.append({
            "Measure": METRICS[m].label + (" (decides)" if m == chosen else ""),
            "Recommended rank": "none" if r.rank is None else str(r.rank),
            "Verdict": VERDICT_WORDS[r.verdict],
            "Best rank": "—" if r.best_rank is None else str(r.best_rank),
            "Agrees": "✓" if r.rank == mine else "✗",
        })
    return pd.DataFrame(rows, columns=["Measure", "Recommended rank", "Verdict", "Best rank", "Agrees"])
