"""Which rank to use, decided with paired comparisons over the same prompts.

Every rank answered the same prompts, so ranks are compared prompt by prompt: the
difference "rank b − best rank" (and "rank b − base model") is computed per prompt and
its mean gets a 95 % percentile-bootstrap interval (prompts resampled, the same
resample for both ranks). A hard prompt is hard for every rank and cancels out, which
separate intervals per rank cannot do.

The tolerance comes from `threshold` (0.95 = "within 5 % of the best"):
- higher-is-better metrics: ±(1 − threshold) × |best value|;
- `ref_nll` (lower is better): ±(−ln threshold) nats, i.e. the per-token probability
  exp(−NLL) within (1 − threshold) of the best rank's.

Each rank > 0 is then
- "best": the best mean (lowest rank on ties);
- "as_good": the whole interval of its difference to the best lies within ±tolerance;
- "worse": the interval lies entirely on the worse side of 0;
- "cannot_tell": neither — these prompts cannot say.

The verdict is one of three things (see `recommend_rank`):
- AS_GOOD: "rank b is as good as the best" — b is the lowest rank that is as good as
  the best and measurably better than the base model (or the best itself, when every
  smaller rank is measurably worse);
- CANNOT_TELL: the smaller ranks cannot be told apart from the best — add prompts or
  train longer; the smallest rank not shown to be worse is the safe pick (also when
  fewer than MIN_PROMPTS prompts were measured: then nothing can be told apart);
- NO_GAIN: no rank is measurably better than the base model (rank None).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from core.evaluation.stats import bootstrap_ratio_ci


@dataclass(frozen=True)
class MetricSpec:
    """How to read and show one quality metric.

    label: the name people see ("Reference loss"); the CSV keeps the technical key.
    higher_is_better: direction of "better".
    description: one line on what it measures, in plain words.
    unit: unit shown after a value ("" when none; percent values carry "%").
    percent: values are shares in [0, 1], shown as percentages.
    decimals: digits shown after the point (of the percentage when `percent`).
    """

    label: str
    higher_is_better: bool
    description: str
    unit: str = ""
    percent: bool = False
    decimals: int = 2

    def show(self, value, unit: bool = True) -> str:
        """The value rounded for people ("1.45 nats/token", "62 %"); "—" when missing."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "—"
        if self.percent:
            return f"{100 * float(value):.{self.decimals}f} %"
        text = f"{float(value):.{self.decimals}f}"
        return f"{text} {self.unit}" if unit and self.unit else text


METRICS: dict[str, MetricSpec] = {
    "ref_nll": MetricSpec(
        "Reference loss", False,
        "how surprised the model is by the reference answer, per token — its negative log-likelihood; lower is better",
        unit="nats/token", decimals=2,
    ),
    "rouge_l": MetricSpec(
        "Word overlap", True,
        "share of the reference's words that the answer repeats in order — the ROUGE-L F-measure; higher is better",
        percent=True, decimals=0,
    ),
    "fact_recall": MetricSpec(
        "Facts included", True,
        "share of the must-include facts that appear in the answer; higher is better",
        percent=True, decimals=0,
    ),
    "similarity": MetricSpec(
        "Meaning match", True,
        "how close the answer's meaning is to the reference, from 1 (same meaning) down — the cosine of sentence embeddings; higher is better",
        decimals=2,
    ),
}

# The metric that decides unless someone picks another, and why (shown with the decision).
DEFAULT_METRIC = "ref_nll"
DEFAULT_METRIC_WHY = (
    "it scores the whole reference answer on every prompt without depending on one generated answer, "
    "so it is the steadiest measure when there are few prompts"
)

AS_GOOD, CANNOT_TELL, NO_GAIN, NO_DATA = "as_good", "cannot_tell", "no_gain", "no_data"
VERDICT_WORDS = {
    AS_GOOD: "as good as the best",
    CANNOT_TELL: "ranks cannot be told apart",
    NO_GAIN: "no rank beats the base model",
    NO_DATA: "no data",
}
STATUS_WORDS = {
    "best": "best", "as_good": "as good as the best", "worse": "measurably worse",
    "cannot_tell": "cannot tell", "base": "base model", "no_value": "no value",
}

# Fewer prompts than this cannot tell ranks apart: a bootstrap over two or three prompts
# gives ranges far narrower than the truth.
MIN_PROMPTS = 5
# Below these, answers are said to miss the reference facts even at the best rank.
FACT_RECALL_WARN = 0.75      # fewer than 3 in 4 must-include facts found
SIMILARITY_WARN = 0.6        # all-MiniLM cosine: on-topic answers with wrong facts land around 0.4-0.6


@dataclass
class Recommendation:
    """The outcome of `recommend_rank`.

    rank: the rank to use; None for NO_GAIN / NO_DATA.
    verdict: AS_GOOD, CANNOT_TELL, NO_GAIN or NO_DATA.
    headline: the decision in a few words ("Choose rank 2").
    reason: why, in plain sentences with rounded numbers.
    metric, threshold, confidence: what was asked.
    tolerance: ±difference (metric units) that still counts as "as good".
    best_rank, best_value, base_value: the best rank > 0 and the base model (rank 0).
    n_prompts: prompts with a value at the best rank.
    acceptable_ranks: ranks as good as the best (the best included) that beat the base.
    table: one row per rank: rank, value, n, vs_best_lo, vs_best_hi, vs_base_lo,
        vs_base_hi (paired differences, positive = better), status, beats_base.
    warnings: answers that miss the reference facts, etc.
    notes: ignored rows and other caveats.
    """

    rank: int | None
    verdict: str
    headline: str
    reason: str
    metric: str
    threshold: float
    confidence: float
    tolerance: float | None
    best_rank: int | None
    best_value: float | None
    base_value: float | None
    n_prompts: int
    acceptable_ranks: list[int]
    table: pd.DataFrame
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def spec(self) -> MetricSpec:
        return METRICS[self.metric]

    def to_dict(self) -> dict:
        """JSON-ready (NaN → None), e.g. for sweep.json."""
        def clean(v):
            if isinstance(v, float) and math.isnan(v):
                return None
            return v.item() if hasattr(v, "item") else v

        return {
            "rank": self.rank, "verdict": self.verdict, "headline": self.headline, "reason": self.reason,
            "metric": self.metric, "threshold": self.threshold, "confidence": self.confidence,
            "tolerance": self.tolerance, "best_rank": self.best_rank, "best_value": self.best_value,
            "base_value": self.base_value, "n_prompts": self.n_prompts,
            "acceptable_ranks": list(self.acceptable_ranks), "warnings": list(self.warnings),
            "notes": list(self.notes),
            "table": [{k: clean(v) for k, v in row.items()} for row in self.table.to_dict("records")],
        }


# ------------------------------------------------------------------ small rules


def tolerance(metric: str, threshold: float, best_value: float) -> float:
    """The ±difference to the best rank that still counts as "as good" (metric units)."""
    if METRICS[metric].higher_is_better:
        return (1 - threshold) * abs(best_value)
    return -math.log(threshold)


def relative_gap(metric: str, value: float, best_value: float) -> float:
    """How much worse `value` is than `best_value`, as a share (0.03 = 3 % worse; negative
    = better). For `ref_nll` it is the share of per-token probability lost."""
    if METRICS[metric].higher_is_better:
        return (best_value - value) / abs(best_value) if best_value else 0.0
    return 1 - math.exp(-(value - best_value))


def _gain(metric: str, value, reference):
    """value − reference oriented so that positive = better."""
    return value - reference if METRICS[metric].higher_is_better else reference - value


def _value_at_gain(metric: str, best_value: float, gain: float) -> float:
    """The metric value that is `gain` better than `best_value` (the inverse of `_gain`)."""
    return best_value + gain if METRICS[metric].higher_is_better else best_value - gain


def _span_words(low: float, high: float) -> str:
    """Relative gaps (positive = worse), low <= high, as words: "between 0.3 % and 2 % worse"."""
    same = percent(low) == percent(high)
    if percent(low) == percent(0.0) and high > 0:
        return f"at most {percent(high)} worse"
    if low >= 0:
        return f"{percent(high)} worse" if same else f"between {percent(low)} and {percent(high)} worse"
    if high <= 0:
        return f"{percent(low)} better" if same else f"between {percent(high)} and {percent(low)} better"
    return f"between {percent(low)} better and {percent(high)} worse"


def _gain_span(metric: str, reference: float, lo: float, hi: float) -> str:
    """A paired interval of gains against `reference` as relative words."""
    gaps = sorted(relative_gap(metric, _value_at_gain(metric, reference, g), reference) for g in (lo, hi))
    return _span_words(gaps[0], gaps[1])


def _validate(metric: str, threshold: float, confidence: float) -> MetricSpec:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid metrics: {', '.join(METRICS)}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return METRICS[metric]


def _frame(per_prompt: pd.DataFrame | Sequence[dict], metric: str) -> pd.DataFrame:
    """rank, id, value, weight: one row per (rank, prompt)."""
    df = per_prompt.copy() if isinstance(per_prompt, pd.DataFrame) else pd.DataFrame(list(per_prompt))
    missing = [c for c in ("rank", "id", metric) if c not in df.columns]
    if missing:
        raise ValueError(f"per-prompt table has no {missing} column(s); it has: {list(df.columns)}")
    ranks = pd.to_numeric(df["rank"], errors="raise")
    if ranks.isna().any() or (ranks != ranks.round()).any() or (ranks < 0).any():
        raise ValueError(f"ranks must be integers >= 0, got {sorted(set(df['rank'].tolist()))}")
    out = pd.DataFrame({
        "rank": ranks.astype(int), "id": df["id"].astype(str),
        # None → NaN; a non-numeric string is a bug upstream, so let it raise.
        "value": pd.to_numeric(df[metric], errors="raise").astype(float),
    })
    # ref_nll per prompt is a mean over its reference tokens; the rank's value is the
    # token-weighted mean, so differences are weighted the same way.
    weight = pd.to_numeric(df["ref_tokens"], errors="coerce") if metric == "ref_nll" and "ref_tokens" in df else None
    out["weight"] = 1.0 if weight is None else weight.fillna(1.0).clip(lower=0).astype(float)
    dup = out.duplicated(["rank", "id"])
    if dup.any():
        raise ValueError(f"per-prompt table has more than one row for (rank, id) {out[dup][['rank', 'id']].values.tolist()[:3]}")
    return out


def _paired(values: pd.DataFrame, weights: pd.Series, metric: str, rank: int, other: int,
            confidence: float, n_resamples: int, seed: int) -> tuple[float, float, float, int]:
    """Mean, lo, hi of the paired gain (rank − other, positive = better) over the prompts
    both have a value for, weighted like the rank values."""
    if rank == other:
        n = int(values[rank].notna().sum())
        return (0.0, 0.0, 0.0, n) if n else (math.nan, math.nan, math.nan, 0)
    pair = values[[rank, other]].dropna()
    if pair.empty:
        return math.nan, math.nan, math.nan, 0
    gain = _gain(metric, pair[rank].to_numpy(), pair[other].to_numpy())
    w = weights.loc[pair.index].to_numpy()
    if np.allclose(gain, gain[0]):          # identical differences: no spread to resample
        return float(gain[0]), float(gain[0]), float(gain[0]), len(pair)
    iv = bootstrap_ratio_ci(list(w * gain), list(w), confidence=confidence, n_resamples=n_resamples, seed=seed)
    return iv.mean, iv.lo, iv.hi, iv.n


def percent(share: float) -> str:
    """A share as a rounded percentage of its size ("3 %", "0.4 %"; the sign is dropped)."""
    p = 100 * abs(share)
    return f"{p:.1f} %" if p < 9.95 and round(p, 1) != round(p) else f"{p:.0f} %"


def join_words(items) -> str:
    """"a", "a and b", "a, b and c"."""
    items = [str(x) for x in items]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _fact_warnings(per_prompt: pd.DataFrame, ranks: list[int]) -> list[str]:
    """Answers that miss the reference facts even at the rank that gets most of them."""
    df = per_prompt if isinstance(per_prompt, pd.DataFrame) else pd.DataFrame(list(per_prompt))
    out = []
    checks = [("fact_recall", FACT_RECALL_WARN,
               "Answers miss the reference facts: even at rank {rank}, the best on this measure, only {value} of the "
               "must-include facts appear in the answers. Read the example answers before you ship; train longer "
               "or on more data."),
              ("similarity", SIMILARITY_WARN,
               "Answers are far from the reference answers: even at rank {rank}, the best on this measure, the "
               "meaning match is only {value} (1 = same meaning). Read the example answers before you ship; "
               "they may state wrong facts.")]
    for column, limit, text in checks:
        if column not in df.columns:
            continue
        values = pd.to_numeric(df[column], errors="coerce")
        means = values.groupby(pd.to_numeric(df["rank"]).astype(int)).mean().dropna()
        means = means[means.index.isin(ranks)]
        if means.empty:
            continue
        top_rank = int(means.idxmax())
        if means.max() < limit:
            out.append(text.format(rank=top_rank, value=METRICS[column].show(float(means.max()))))
    return out


# ------------------------------------------------------------------ the rule


def recommend_rank(
    per_prompt: pd.DataFrame | Sequence[dict],
    metric: str = DEFAULT_METRIC,
    threshold: float = 0.95,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> Recommendation:
    """Decide which rank to use from per-prompt scores (per_prompt.csv of a sweep).

    per_prompt: one row per (rank, prompt) with `rank`, `id` and a column named
        `metric` (`ref_tokens` weights `ref_nll` when present; `fact_recall` and
        `similarity`, when present, feed the warnings). Rank 0 is the base model.
    threshold: in (0, 1]; the tolerance is "within (1 − threshold) of the best".
    Pure: the same input and seed give the same decision. Raises ValueError for an
    unknown metric, a bad threshold or confidence, missing columns or duplicate rows.
    """
    spec = _validate(metric, threshold, confidence)
    df = _frame(per_prompt, metric)
    notes: list[str] = []
    values = df.pivot(index="id", columns="rank", values="value")
    weights = df.groupby("id")["weight"].max().reindex(values.index)

    def wmean(rank: int) -> float:
        col = values[rank].dropna()
        w = weights.loc[col.index]
        return float((col * w).sum() / w.sum()) if len(col) and w.sum() > 0 else math.nan

    means = {int(r): wmean(int(r)) for r in values.columns}
    candidates = [r for r in sorted(means) if r > 0 and not math.isnan(means[r])]
    no_value = [r for r in sorted(means) if r > 0 and math.isnan(means[r])]
    if no_value:
        notes.append(f"Ignored rank(s) with no {spec.label.lower()} value: {join_words(no_value)}.")
    base_value = means.get(0)
    if base_value is not None and math.isnan(base_value):
        base_value = None
    if base_value is None:
        notes.append("The base model (rank 0) was not measured on this metric: ranks were not compared with it.")

    table_cols = ["rank", "value", "n", "vs_best_lo", "vs_best_hi", "vs_base_lo", "vs_base_hi", "status", "beats_base"]
    if not candidates:
        reason = f"No rank can be recommended: no rank above 0 has a {spec.label.lower()} value."
        rows = [{"rank": r, "value": means[r], "status": "base" if r == 0 else "no_value"} for r in sorted(means)]
        return Recommendation(None, NO_DATA, "No recommendation", " ".join([reason, *notes]), metric, threshold,
                              confidence, None, None, None, base_value, 0, [],
                              pd.DataFrame(rows, columns=table_cols), [], notes)

    def better(a: float, b: float) -> bool:
        return a > b if spec.higher_is_better else a < b

    best_rank = candidates[0]
    for r in candidates[1:]:
        if better(means[r], means[best_rank]):
            best_rank = r
    best_value = means[best_rank]
    tol = tolerance(metric, threshold, best_value)
    slack = 1e-9 * max(1.0, tol)            # a difference exactly on the tolerance counts as within it
    n_prompts = int(values[best_rank].notna().sum())

    rows = []
    for r in sorted(means):
        row = {"rank": r, "value": means[r], "n": int(values[r].notna().sum()), "vs_best_lo": math.nan,
               "vs_best_hi": math.nan, "vs_base_lo": math.nan, "vs_base_hi": math.nan, "beats_base": None}
        if r == 0:
            row["status"] = "base"
        elif r in no_value:
            row["status"] = "no_value"
        else:
            _, lo, hi, _ = _paired(values, weights, metric, r, best_rank, confidence, n_resamples, seed)
            row.update(vs_best_lo=lo, vs_best_hi=hi)
            if r == best_rank:
                row["status"] = "best"
            elif lo >= -tol - slack and hi <= tol + slack:
                row["status"] = "as_good"
            elif hi < 0:
                row["status"] = "worse"
            else:
                row["status"] = "cannot_tell"
            if base_value is not None:
                _, blo, bhi, _ = _paired(values, weights, metric, r, 0, confidence, n_resamples, seed)
                row.update(vs_base_lo=blo, vs_base_hi=bhi, beats_base=bool(blo > 0))
        rows.append(row)
    table = pd.DataFrame(rows, columns=table_cols)
    by_rank = {int(row["rank"]): row for row in rows}
    warnings = _fact_warnings(per_prompt, candidates)
    conf = f"{confidence:.0%}".replace("%", " %")
    tol_words = f"±{percent(1 - threshold)}" if threshold < 1 else "no tolerance"
    label = spec.label.lower()

    def finish(rank, verdict, headline, reason, acceptable) -> Recommendation:
        return Recommendation(rank, verdict, headline, " ".join([reason, *notes]), metric, threshold, confidence, tol,
                              best_rank, best_value, base_value, n_prompts, acceptable, table, warnings, notes)

    if n_prompts < MIN_PROMPTS:
        safe = candidates[0]
        reason = (f"Only {n_prompts} prompt{'s' if n_prompts != 1 else ''} measured: too few to tell the ranks or the "
                  f"base model apart (a decision needs at least {MIN_PROMPTS}, better 20 or more) — add prompts. "
                  f"The smallest rank, {safe}, is the safe pick.")
        return finish(safe, CANNOT_TELL, f"Too few prompts to decide: rank {safe} is the safe pick", reason, [])

    best_row = by_rank[best_rank]
    if base_value is not None and not best_row["beats_base"]:
        lo, hi = best_row["vs_base_lo"], best_row["vs_base_hi"]
        if hi < 0:
            how = "measurably worse than the base model"
        else:
            how = "not measurably better than the base model"
        reason = (f"No rank beats the base model on these {n_prompts} prompts: the best, rank {best_rank}, is {how} "
                  f"on {label} ({spec.show(best_value)} against {spec.show(base_value)} for the base; paired over "
                  f"the same prompts it is {_gain_span(metric, base_value, lo, hi)}, {conf}). Keep the base model, "
                  "or add training data or train longer before choosing a rank.")
        return finish(None, NO_GAIN, "No rank beats the base model", reason, [])

    def fine(r: int) -> bool:
        return base_value is None or bool(by_rank[r]["beats_base"])

    acceptable = [r for r in candidates if by_rank[r]["status"] in ("best", "as_good") and fine(r)]
    chosen = acceptable[0]                  # the best rank itself is always acceptable here
    unclear = [r for r in candidates if r < chosen and by_rank[r]["status"] == "cannot_tell"
               and not (base_value is not None and by_rank[r]["vs_base_hi"] < 0)]
    worse = [r for r in candidates if r < chosen and by_rank[r]["status"] == "worse"]
    base_words = "" if base_value is None else " and measurably better than the base model"

    if chosen == best_rank and unclear:
        safe = unclear[0]
        others = [r for r in unclear if r != safe]
        told = (f" (rank{'s' if len(worse) > 1 else ''} {join_words(worse)} measurably worse)" if worse else "")
        reason = (f"The ranks cannot be told apart on these {n_prompts} prompts — add prompts or train longer. "
                  f"Rank{'s' if others else ''} {join_words(unclear)} might be as good as the best, rank "
                  f"{best_rank}, or worse by more than the tolerated {tol_words}: paired over the same prompts, rank "
                  f"{safe} is {_gain_span(metric, best_value, by_rank[safe]['vs_best_lo'], by_rank[safe]['vs_best_hi'])}"
                  f" on {label} ({conf}){told}. The smallest rank, {safe}, is the safe pick: nothing shows it is worse.")
        if base_value is not None and not by_rank[safe]["beats_base"]:
            reason += f" Note that rank {safe} is not measurably better than the base model either."
        return finish(safe, CANNOT_TELL, f"Ranks cannot be told apart: rank {safe} is the safe pick", reason, acceptable)

    if chosen == best_rank:
        smaller = [r for r in candidates if r < best_rank]
        if smaller:
            reason = (f"Rank {best_rank} is the best rank on {label} ({spec.show(best_value)}){base_words}; "
                      f"every smaller rank is measurably worse on these {n_prompts} prompts ({conf}).")
        else:
            reason = (f"Rank {best_rank} is the smallest rank measured and the best on {label} "
                      f"({spec.show(best_value)}){base_words}.")
        return finish(chosen, AS_GOOD, f"Choose rank {chosen}", reason, acceptable)

    row = by_rank[chosen]
    span = _gain_span(metric, best_value, row["vs_best_lo"], row["vs_best_hi"])
    reason = (f"Rank {chosen} is as good as the best rank, {best_rank} (difference within {tol_words}, {conf} "
              f"confidence){base_words}: paired over the same {n_prompts} prompts, it is {span} on {label} "
              f"({spec.show(means[chosen])} against {spec.show(best_value)}).")
    if unclear:
        reason += (f" Rank{'s' if len(unclear) > 1 else ''} {join_words(unclear)} could not be told apart from "
                   "the best either; more prompts would show whether a smaller rank is enough.")
    return finish(chosen, AS_GOOD, f"Choose rank {chosen}", reason, acceptable)


def recommend_across_metrics(
    per_prompt: pd.DataFrame | Sequence[dict],
    metrics: Sequence[str],
    threshold: float = 0.95,
    **kwargs,
) -> dict[str, Recommendation]:
    """`recommend_rank` for each metric that has values (in the order given)."""
    df = per_prompt if isinstance(per_prompt, pd.DataFrame) else pd.DataFrame(list(per_prompt))
    out = {}
    for m in metrics:
        if m in df.columns and pd.to_numeric(df[m], errors="coerce").notna().any():
            out[m] = recommend_rank(df, m, threshold, **kwargs)
    return out


def default_metric(available: Sequence[str]) -> tuple[str | None, str]:
    """The metric that decides by default among `available`, and why (a clause)."""
    if DEFAULT_METRIC in available:
        return DEFAULT_METRIC, DEFAULT_METRIC_WHY
    for m in METRICS:
        if m in available:
            return m, f"{METRICS[DEFAULT_METRIC].label.lower()} was not measured in this sweep"
    return None, "no quality metric was measured"
