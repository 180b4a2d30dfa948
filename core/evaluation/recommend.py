"""Which rank to use: the lowest rank that is nearly as good as the best one and not
worse than the base model.

Rule (ranks > 0 are candidates; a rank-0 row, when present, is the base model):
- higher-is-better metrics: acceptable when value >= threshold × best value and
  value >= base value;
- `ref_nll` (lower is better): compare per-token probabilities exp(-nll), i.e.
  1/perplexity: acceptable when exp(-nll) >= threshold × exp(-best_nll), i.e.
  nll <= best_nll - ln(threshold), and nll <= base nll.
The lowest acceptable rank is recommended; none when every rank is worse than base.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import pandas as pd


@dataclass(frozen=True)
class MetricSpec:
    """How to read one summary metric.

    label: name for people.
    higher_is_better: direction of "better".
    description: one line on what it measures.
    fmt: format for showing values.
    """

    label: str
    higher_is_better: bool
    description: str
    fmt: str = "{:.4g}"


METRICS: dict[str, MetricSpec] = {
    "ref_nll": MetricSpec(
        "reference NLL", False,
        "mean negative log-likelihood per reference token (nats); lower is better",
    ),
    "rouge_l": MetricSpec("ROUGE-L", True, "ROUGE-L F-measure of the answer against the reference"),
    "fact_recall": MetricSpec("fact recall", True, "share of must_include facts found in the answer"),
    "similarity": MetricSpec("similarity", True, "cosine similarity of answer and reference embeddings"),
}

# Relative slack for comparisons, so that a value exactly on the bar (up to float
# rounding, e.g. 0.95 × 0.8 = 0.7600000000000001) counts as meeting it.
_REL_TOL = 1e-9


@dataclass
class Recommendation:
    """The outcome of `recommend_rank`.

    rank: the recommended rank, or None when no rank is acceptable.
    metric, threshold: what was asked.
    reason: the rule and the numbers that decided, in a sentence or three.
    best_rank, best_value: the best candidate (lowest rank on ties); None if none.
    base_value: the rank-0 value, None without a (usable) base row.
    bar: the value a rank had to reach (>= for higher-is-better, <= for ref_nll).
    acceptable_ranks: all ranks that passed, ascending.
    table: one row per input row: rank, value, meets_bar, not_worse_than_base,
        acceptable, note.
    notes: rows ignored and other caveats (also appended to `reason`).
    """

    rank: int | None
    metric: str
    threshold: float
    reason: str
    best_rank: int | None
    best_value: float | None
    base_value: float | None
    acceptable_ranks: list[int]
    table: pd.DataFrame
    bar: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready (NaN → None), e.g. for sweep.json."""
        def clean(v):
            if isinstance(v, float) and math.isnan(v):
                return None
            return v.item() if hasattr(v, "item") else v

        return {
            "rank": self.rank, "metric": self.metric, "threshold": self.threshold,
            "reason": self.reason, "best_rank": self.best_rank, "best_value": self.best_value,
            "base_value": self.base_value, "bar": self.bar,
            "acceptable_ranks": list(self.acceptable_ranks), "notes": list(self.notes),
            "table": [{k: clean(v) for k, v in row.items()} for row in self.table.to_dict("records")],
        }


def _validate(metric: str, threshold: float) -> MetricSpec:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid metrics: {', '.join(METRICS)}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}")
    return METRICS[metric]


def _frame(summary: pd.DataFrame | Sequence[dict], metric: str) -> pd.DataFrame:
    df = summary.copy() if isinstance(summary, pd.DataFrame) else pd.DataFrame(list(summary))
    missing = [c for c in ("rank", metric) if c not in df.columns]
    if missing:
        raise ValueError(f"summary has no {missing} column(s); it has: {list(df.columns)}")
    out = pd.DataFrame({
        "rank": pd.to_numeric(df["rank"], errors="raise"),
        # None → NaN; a non-numeric string is a bug upstream, so let it raise.
        "value": pd.to_numeric(df[metric], errors="raise").astype(float),
    })
    if out["rank"].isna().any() or (out["rank"] != out["rank"].round()).any() or (out["rank"] < 0).any():
        raise ValueError(f"ranks must be integers >= 0, got {df['rank'].tolist()}")
    out["rank"] = out["rank"].astype(int)
    dup = sorted(out["rank"][out["rank"].duplicated()].unique().tolist())
    if dup:
        raise ValueError(f"summary has more than one row for rank(s) {dup}")
    return out.sort_values("rank").reset_index(drop=True)


def _fmt(spec: MetricSpec, v: float | None) -> str:
    return "n/a" if v is None else spec.fmt.format(v)


def recommend_rank(
    summary: pd.DataFrame | Sequence[dict],
    metric: str = "ref_nll",
    threshold: float = 0.95,
) -> Recommendation:
    """Recommend the lowest rank whose `metric` is within `threshold` of the best rank
    and not worse than the base model (see the module docstring for the exact rule).

    summary: one row per rank with a `rank` column and a column named `metric`
        (summary.csv from a sweep, as a DataFrame or a list of dicts).
    threshold: in (0, 1]; 1 means "only ranks as good as the best".
    Raises ValueError for an unknown metric (listing the valid ones), a bad threshold,
    missing columns or duplicate ranks.
    """
    spec = _validate(metric, threshold)
    df = _frame(summary, metric)
    hib = spec.higher_is_better
    notes: list[str] = []

    base_value = None
    base_rows = df[df["rank"] == 0]
    if base_rows.empty:
        notes.append("No base row (rank 0): ranks were not compared with the base model.")
    elif math.isnan(base_rows["value"].iloc[0]):
        notes.append(f"The base row (rank 0) has no {metric} value: ranks were not compared with it.")
    else:
        base_value = float(base_rows["value"].iloc[0])

    cand = df[(df["rank"] > 0) & df["value"].notna()]
    nan_ranks = df[(df["rank"] > 0) & df["value"].isna()]["rank"].tolist()
    if nan_ranks:
        notes.append(f"Ignored rank(s) with no {metric} value: {', '.join(map(str, nan_ranks))}.")

    # meets_bar/not_worse_than_base stay None where they do not apply (base, no value).
    table = df.assign(meets_bar=None, not_worse_than_base=None, acceptable=False, note="")
    table.loc[table["rank"] == 0, "note"] = "base model"
    table.loc[table["rank"].isin(nan_ranks), "note"] = "no value"

    if cand.empty:
        reason = f"No rank recommended: no rank > 0 has a {metric} value."
        return Recommendation(None, metric, threshold, " ".join([reason, *notes]), None, None,
                              base_value, [], table, None, notes)

    # Best candidate; idxmin/idxmax return the first, i.e. lowest rank, on ties.
    best_i = cand["value"].idxmax() if hib else cand["value"].idxmin()
    best_rank, best_value = int(cand.at[best_i, "rank"]), float(cand.at[best_i, "value"])
    if hib:
        # threshold × best for positive values; the same margin below best when best <= 0
        # (a similarity can be negative), so that the best rank always meets its own bar.
        bar = best_value - (1 - threshold) * abs(best_value)
        bar_text = f"{metric} ≥ {_fmt(spec, bar)} (= {threshold:g} × best {_fmt(spec, best_value)})"
    else:
        bar = best_value - math.log(threshold)
        bar_text = (f"{metric} ≤ {_fmt(spec, bar)} (= best {_fmt(spec, best_value)} − ln {threshold:g}; "
                    f"per-token probability exp(−NLL) ≥ {threshold:g} × the best's)")

    def tol(ref: float) -> float:
        return _REL_TOL * max(1.0, abs(ref))

    for i in cand.index:
        v = float(table.at[i, "value"])
        meets = v >= bar - tol(bar) if hib else v <= bar + tol(bar)
        if base_value is None:
            not_worse = True
        else:
            not_worse = v >= base_value - tol(base_value) if hib else v <= base_value + tol(base_value)
        table.at[i, "meets_bar"] = bool(meets)
        table.at[i, "not_worse_than_base"] = bool(not_worse)
        table.at[i, "acceptable"] = bool(meets and not_worse)
    acceptable = table[table["acceptable"]]["rank"].astype(int).tolist()

    base_text = "" if base_value is None else f"; base model (rank 0): {_fmt(spec, base_value)}"
    direction = "higher" if hib else "lower"
    if not acceptable:
        # The best rank always meets the bar, so it failed on the base comparison, and
        # with it every other rank.
        reason = (f"No rank recommended: every rank's {metric} is worse than the base model's "
                  f"({direction} is better): best is rank {best_rank} with {_fmt(spec, best_value)}"
                  f"{base_text}.")
        return Recommendation(None, metric, threshold, " ".join([reason, *notes]), best_rank, best_value,
                              base_value, [], table, bar, notes)

    rank = acceptable[0]
    chosen = float(table.loc[table["rank"] == rank, "value"].iloc[0])
    base_rule = " and no worse than the base model" if base_value is not None else ""
    reason = (f"Rank {rank}: the lowest rank with {bar_text}{base_rule}. "
              f"Best: rank {best_rank} with {_fmt(spec, best_value)}{base_text}; "
              f"rank {rank}: {_fmt(spec, chosen)} ({direction} is better).")
    return Recommendation(rank, metric, threshold, " ".join([reason, *notes]), best_rank, best_value,
                          base_value, acceptable, table, bar, notes)
