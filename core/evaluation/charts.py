"""Static charts (PNG) of a sweep for the decision report: quality, speed, memory per rank.

Ranks sit at evenly spaced positions (base model first), so bars and points line up
whatever the ranks are. matplotlib with the Agg backend; torch-free.
"""
from __future__ import annotations

import io
import math

import pandas as pd

from core.evaluation import wording as w
from core.evaluation.recommend import Recommendation

GREEN, GREY, BLUE, ORANGE = "#2e7d32", "#757575", "#1565c0", "#ef6c00"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def _axes(title: str, ylabel: str, ranks: list[int]):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.2, 3.3))
    ax.set_title(title, fontsize=11, loc="left")
    ax.set_ylabel(ylabel)
    ax.set_xticks(range(len(ranks)), [w.rank_label(r).replace("Rank ", "") if r else "base" for r in ranks])
    ax.set_xlabel("rank")
    ax.grid(axis="y", alpha=0.3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig, ax


def _valid(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def _mark(ax, ranks: list[int], chosen: int | None) -> None:
    """Shade the chosen rank and name it on the axis."""
    if chosen in ranks:
        i = ranks.index(chosen)
        ax.axvspan(i - 0.4, i + 0.4, color=GREEN, alpha=0.12, lw=0)
        labels = [t.get_text() for t in ax.get_xticklabels()]
        labels[i] += " (chosen)"
        ax.set_xticks(range(len(ranks)), labels)
        ax.get_xticklabels()[i].set_color(GREEN)
        ax.get_xticklabels()[i].set_fontweight("bold")


def quality_chart(summary: pd.DataFrame, rec: Recommendation, chosen: int | None) -> bytes:
    """The deciding metric per rank with its 95 % range; the base model's value dashed."""
    metric, spec = rec.metric, rec.spec
    ranks = [int(r) for r in summary["rank"]]
    scale = 100 if spec.percent else 1
    direction = "higher is better" if spec.higher_is_better else "lower is better"
    fig, ax = _axes(f"Quality: {spec.label.lower()} ({direction}; bars: 95 % range)",
                    spec.label + (" (%)" if spec.percent else f" ({spec.unit})" if spec.unit else ""), ranks)
    for i, row in enumerate(summary.to_dict("records")):
        v = row.get(metric)
        if not _valid(v):
            continue
        lo, hi = row.get(f"{metric}_lo"), row.get(f"{metric}_hi")
        err = [[(v - lo) * scale], [(hi - v) * scale]] if _valid(lo) and _valid(hi) else None
        color = GREY if ranks[i] == 0 else (GREEN if ranks[i] == chosen else BLUE)
        ax.errorbar([i], [v * scale], yerr=err, fmt="o", color=color, capsize=4, ms=7)
    if rec.base_value is not None:
        ax.axhline(rec.base_value * scale, ls="--", color=GREY, lw=1, label="base model")
        ax.legend(loc="best", fontsize=8, frameon=False)
    _mark(ax, ranks, chosen)
    return _png(fig)


def speed_chart(summary: pd.DataFrame, chosen: int | None) -> bytes | None:
    """Milliseconds per token, with the adapter (4-bit base, unmerged) and merged; medians
    with the fastest–slowest range."""
    series = [(c, label, color) for c, label, color in
              (("ms_per_token", "with the adapter (4-bit base, unmerged)", ORANGE),
               ("ms_per_token_merged", "merged (what you would serve)", BLUE))
              if c in summary and summary[c].notna().any()]
    if not series:
        return None
    ranks = [int(r) for r in summary["rank"]]
    fig, ax = _axes("Speed: milliseconds per token (lower is faster; bars: fastest–slowest run)", "ms per token", ranks)
    for k, (col, label, color) in enumerate(series):
        xs, ys, lo, hi = [], [], [], []
        for i, row in enumerate(summary.to_dict("records")):
            v = row.get(col)
            if _valid(v):
                xs.append(i + (k - 0.5) * 0.15)
                ys.append(v)
                lo.append(v - row[f"{col}_lo"] if _valid(row.get(f"{col}_lo")) else 0)
                hi.append(row[f"{col}_hi"] - v if _valid(row.get(f"{col}_hi")) else 0)
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o-", color=color, capsize=3, label=label, ms=5)
    ax.set_ylim(bottom=0)
    ax.legend(loc="best", fontsize=8, frameon=False)
    _mark(ax, ranks, chosen)
    return _png(fig)


def memory_chart(summary: pd.DataFrame, chosen: int | None, quant: str | None = "nf4") -> bytes | None:
    """Weights in memory per rank: the 4-bit base plus the adapter, and (dashed) the merged
    full-precision copy you would serve."""
    if "base_mb" not in summary or not summary["base_mb"].notna().any():
        return None
    ranks = [int(r) for r in summary["rank"]]
    base = summary["base_mb"].fillna(0).tolist()
    adapter = summary["adapter_mb"].fillna(0).tolist() if "adapter_mb" in summary else [0] * len(ranks)
    fig, ax = _axes("Memory: model weights (MB)", "MB", ranks)
    xs = list(range(len(ranks)))
    ax.bar(xs, base, color=GREY, alpha=0.6, label=f"{w.base_kind(quant)} base model")
    ax.bar(xs, adapter, bottom=base, color=GREEN, label="adapter")
    for x, b, a in zip(xs, base, adapter):
        if a > 0:
            ax.annotate(f"+{w.mb(a)}", (x, b + a), ha="center", va="bottom", fontsize=7)
    if "merged_mb" in summary and summary["merged_mb"].notna().any():
        ax.axhline(float(summary["merged_mb"].dropna().iloc[0]), ls="--", color=BLUE, lw=1,
                   label="merged full-precision copy")
    ax.legend(loc="best", fontsize=8, frameon=False)
    ax.margins(y=0.15)
    _mark(ax, ranks, chosen)
    return _png(fig)
