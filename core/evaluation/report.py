"""The decision report: one page a manager can forward, in Markdown and in HTML.

It holds the chosen rank and the reason (the paired decision of
core.evaluation.recommend, in words), the verdict of every measure, the quality / speed /
memory charts, five example answers across ranks, the run's recipe and data, and the
conditions the numbers were measured under. Built from a sweep folder and its run
folder; torch-free (the dashboard builds it in its own process).
"""
from __future__ import annotations

import base64
import html
import io
import json
import re
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from core.evaluation import charts
from core.evaluation import tables as T
from core.evaluation import wording as w
from core.evaluation.recommend import (
    VERDICT_WORDS,
    Recommendation,
    default_metric,
    recommend_across_metrics,
)
from core.errors import UserError

REPORT_MD = "decision_report.md"
REPORT_HTML = "decision_report.html"
CHARTS_DIR = "charts"
N_EXAMPLES = 5


# ------------------------------------------------------------------ a tiny document model


@dataclass
class Doc:
    """A list of blocks rendered to Markdown and to HTML the same way.

    Block kinds: ("h", level, text), ("p", text), ("ul", [text]), ("table", DataFrame),
    ("img", file name, alt), ("note", "success|warning|error", text). Text may use
    **bold**; everything else is escaped.
    """

    blocks: list[tuple] = field(default_factory=list)

    def add(self, *block) -> None:
        self.blocks.append(block)


def _md_cell(value) -> str:
    return " ".join(str(value).split()).replace("|", "\\|")


def to_markdown(doc: Doc) -> str:
    out = []
    for kind, *rest in doc.blocks:
        if kind == "h":
            out.append("#" * rest[0] + " " + rest[1])
        elif kind == "p":
            out.append(rest[0])
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in rest[0]))
        elif kind == "table":
            df = rest[0]
            lines = ["| " + " | ".join(_md_cell(c) for c in df.columns) + " |", "|" + "---|" * len(df.columns)]
            lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{rest[1]}]({CHARTS_DIR}/{rest[0]})")
        elif kind == "note":
            mark = {"success": "✅", "warning": "⚠️", "error": "⛔"}.get(rest[0], "ℹ️")
            out.append(f"> {mark} {rest[1]}")
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(str(text)))


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:960px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ddd;padding:.3em .6em;
text-align:left;vertical-align:top}th{background:#f5f5f5}img{max-width:100%}
.note{padding:.6em .9em;border-radius:6px;margin:.6em 0}.success{background:#e8f5e9}.warning{background:#fff8e1}
.error{background:#ffebee}
"""


def to_html(doc: Doc, title: str, images: dict[str, bytes]) -> str:
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{_CSS}</style></head><body>"]
    for kind, *rest in doc.blocks:
        if kind == "h":
            out.append(f"<h{rest[0]}>{_inline(rest[1])}</h{rest[0]}>")
        elif kind == "p":
            out.append(f"<p>{_inline(rest[0])}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in rest[0]) + "</ul>")
        elif kind == "table":
            df = rest[0]
            head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
                           for row in df.itertuples(index=False))
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(images[rest[0]]).decode("ascii")
            out.append(f"<p><img alt='{html.escape(rest[1])}' src='data:image/png;base64,{data}'></p>")
        elif kind == "note":
            out.append(f"<div class='note {rest[0]}'>{_inline(rest[1])}</div>")
    out.append("</body></html>")
    return "\n".join(out)


# ------------------------------------------------------------------ the report


@dataclass
class DecisionReport:
    """A built report: its Markdown, its self-contained HTML and the chart images."""

    title: str
    rank: int | None
    markdown: str
    html: str
    charts: dict[str, bytes]
    recommendation: Recommendation

    def files(self) -> dict[str, bytes]:
        out = {REPORT_MD: self.markdown.encode("utf-8"), REPORT_HTML: self.html.encode("utf-8")}
        out.update({f"{CHARTS_DIR}/{name}": data for name, data in self.charts.items()})
        return out

    def markdown_zip(self, folder: str = "decision-report") -> bytes:
        """The Markdown with its charts (the HTML too), as a zip."""
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, data in self.files().items():
                zf.writestr(f"{folder}/{name}", data)
        return buf.getvalue()


def write_report(report: DecisionReport, out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    written = []
    for name, data in report.files().items():
        path = out_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.append(path)
    return written


def _short_number(value) -> str:
    """1e-4-style for small numbers such as learning rates ("3e-4"), else as given."""
    if not isinstance(value, (int, float)):
        return "?"
    return f"{value:.0e}".replace("e-0", "e-") if 0 < abs(value) < 0.01 else f"{value:g}"


def _recipe(run_config: dict | None, data_report: dict | None) -> list[str]:
    if not run_config:
        return ["The run's settings could not be read."]
    train, q, model = run_config.get("train") or {}, run_config.get("qdylora") or {}, run_config.get("model") or {}
    data = Path(str(train.get("data", "")))
    meta = data.parent / "dataset.json"
    try:
        data_name = json.loads(meta.read_text()).get("name") or data.name
    except (OSError, ValueError):
        data_name = data.name or "?"
    items = [f"Base model: **{model.get('name', train.get('model', '?'))}**, loaded in "
             f"{'4-bit NF4' if model.get('quant') == 'nf4' else 'full precision'} while training.",
             f"One QDyLoRA run: ranks 1 to {q.get('r_max', '?')} trained together ({q.get('rank_sampling', train.get('rank_sampling', '?'))} "
             f"rank sampling), alpha {q.get('alpha', '?')}.",
             f"{train.get('steps', '?')} training steps of {train.get('batch_size', '?')} examples"
             + (f" × {train['grad_accum']} accumulated" if (train.get("grad_accum") or 1) > 1 else "")
             + f", learning rate {_short_number(train.get('lr'))}, examples cut at {train.get('max_length', '?')} tokens."]
    if data_report:
        n, cut = data_report.get("examples"), data_report.get("truncated")
        items.append(f"Training data: **{data_name}**" + (f", {n} examples" if n is not None else "")
                     + (f" ({cut} cut at the length limit)" if cut else "") + ".")
    else:
        items.append(f"Training data: **{data_name}**.")
    return items


def _conditions(meta: dict, sweep_cfg: dict, summary: pd.DataFrame, n_prompts: int) -> list[str]:
    model = ((meta.get("run_meta") or {}).get("model")) or {}
    quant = model.get("quant")
    items = [f"Base model in **{'4-bit NF4 (double quantization)' if quant == 'nf4' else 'full precision'}**, "
             f"compute in {model.get('compute_dtype', '?')}, on **{str(model.get('device', '?')).upper()}**.",
             f"Quality on {n_prompts} held-out prompts from {Path(str(sweep_cfg.get('prompts', '?'))).name}; answers "
             f"greedy, up to {sweep_cfg.get('max_new_tokens', '?')} tokens. Ranges are 95 % bootstrap intervals over "
             "the prompts; ranks are compared pairwise on the same prompts."]
    runs = summary["latency_runs"].dropna() if "latency_runs" in summary else pd.Series(dtype=float)
    if "ms_per_token" in summary and summary["ms_per_token"].notna().any():
        items.append(f"Speed at batch size 1: median of {int(runs.iloc[0]) if len(runs) else 'several'} timed "
                     f"generations of {sweep_cfg.get('latency_new_tokens', '?')} tokens after a warm-up, with the "
                     "adapter on the 4-bit base and merged into a full-precision copy; ranges are the fastest and "
                     "slowest run.")
        workers = int((meta.get("run_meta") or {}).get("workers") or 1)
        if workers > 1:
            shared = "each on its own GPU" if str(model.get("device", "")).startswith("cuda") else "sharing the CPU cores"
            items.append(f"Speed measured by {workers} sweep workers at once, {shared}: compare ranks with each other, "
                         "and time a single rank alone for absolute numbers.")
    else:
        items.append("Speed was not measured in this sweep.")
    if quant == "nf4":
        items.append(w.FULL_PRECISION_NOTE)
    return items


def build_report(view, run_config: dict | None = None, data_report: dict | None = None, metric: str | None = None,
                 threshold: float | None = None, rank: int | None = None, facts: dict | None = None,
                 run_name: str | None = None) -> DecisionReport:
    """The report of one sweep (a `workspace_data.SweepView`).

    metric, threshold: the decision's (default: the sweep's saved ones, else the default metric).
    rank: the rank chosen, when it is not the recommended one (e.g. the rank exported).
    """
    summary, per_prompt = view.summary, view.per_prompt
    if summary is None or summary.empty or per_prompt is None or per_prompt.empty:
        raise UserError("this sweep has no results yet: nothing to report")
    saved = view.recommendation or {}
    measured = view.metrics
    metric = metric or (saved.get("metric") if saved.get("metric") in measured else default_metric(measured)[0])
    if metric not in measured:
        raise UserError(f"this sweep did not measure {metric}")
    threshold = float(threshold or saved.get("threshold") or 0.95)
    cfg = view.config or {}
    boot = {"n_resamples": int(cfg.get("n_bootstrap") or 2000), "seed": int(cfg.get("seed") or 0)}
    recs = recommend_across_metrics(per_prompt, measured, threshold, **boot)
    rec = recs[metric]
    chosen = rec.rank if rank is None else int(rank)
    facts = facts or {}
    name = run_name or Path(str(view.run_dir or "run")).name
    spec = rec.spec
    why = default_metric(measured)[1] if metric == default_metric(measured)[0] else "it was chosen on the Compare page"

    doc = Doc()
    title = f"Decision report: {name}"
    doc.add("h", 1, title)
    doc.add("p", f"**{w.decision_title(rec, rank)}.** {w.rank_sentence(summary, rec, chosen)}".strip())
    doc.add("note", w.verdict_style(rec.verdict), f"**Verdict: {VERDICT_WORDS[rec.verdict]}.** {rec.reason}")
    if rank is not None and rank != rec.rank:
        doc.add("note", "warning", f"Rank {rank} was chosen by hand; the measurements recommend "
                + (f"rank {rec.rank}." if rec.rank is not None else "no rank."))
    for warning in rec.warnings:
        doc.add("note", "warning", warning)
    doc.add("p", f"Decided on **{spec.label.lower()}** — {spec.description} — because {why}. "
                 f"“As good” means within {w.percent(1 - threshold)} of the best rank with 95 % confidence.")

    doc.add("h", 2, "Every measure")
    doc.add("p", w.across_metrics_words(recs, metric))
    doc.add("table", w.across_metrics_table(recs, metric))

    images = {"quality.png": charts.quality_chart(summary, rec, chosen)}
    quant = (((view.meta or {}).get("run_meta") or {}).get("model") or {}).get("quant")
    speed, memory = charts.speed_chart(summary, chosen), charts.memory_chart(summary, chosen, quant)
    doc.add("h", 2, "Quality")
    doc.add("img", "quality.png", f"{spec.label} per rank")
    doc.add("table", T.summary_table(summary, rec, measured))
    per_set = T.by_set_table(getattr(view, "by_set", None), metric)
    if per_set is not None:
        doc.add("p", f"{spec.label} on each named part of the evaluation (a rank that does well on answers seen in "
                     "training but not on new wordings of the same facts recites rather than knows):")
        doc.add("table", per_set)
    doc.add("h", 2, "Speed")
    if speed is not None:
        images["speed.png"] = speed
        doc.add("img", "speed.png", "Milliseconds per token per rank")
        doc.add("ul", [w.SPEED_ADAPTER, w.SPEED_MERGED])
    else:
        doc.add("p", "Speed was not measured in this sweep.")
    doc.add("h", 2, "Memory")
    if memory is not None:
        images["memory.png"] = memory
        doc.add("img", "memory.png", "Model weights per rank")
        doc.add("p", w.memory_words(summary, chosen, quant))
    else:
        doc.add("p", "Memory was not recorded in this sweep.")

    ranks = sorted({0, chosen or 0, int(summary["rank"].max())} & set(per_prompt["rank"].astype(int)))
    from core.workspace_data import prompt_degradation

    order = prompt_degradation(per_prompt, metric, threshold)["id"].astype(str).tolist()
    examples = T.example_answers(per_prompt, ranks, facts, ids=order, n=N_EXAMPLES)
    doc.add("h", 2, f"{len(examples)} example answers")
    doc.add("p", "The prompts whose answers change most as the rank drops come first. ✓ / ✗: a must-include fact "
                 "found / missing in the answer.")
    for ex in examples:
        doc.add("h", 3, T.prompt_label(ex["id"], ex["prompt"], width=120))
        doc.add("p", f"**Reference:** {ex['reference']}" + (f" **Facts:** {', '.join(ex['facts'])}" if ex["facts"] else ""))
        rows = [{"": w.rank_label(r) + (" ★" if r == chosen and r else ""), "Answer": a["answer"] or "(empty)",
                 "Facts": " ".join(("✓ " if f else "✗ ") + fact for fact, f in a["hits"]) or "—"}
                for r, a in ex["answers"].items()]
        doc.add("table", pd.DataFrame(rows, columns=["", "Answer", "Facts"]))

    doc.add("h", 2, "How the adapter was made")
    doc.add("ul", _recipe(run_config, data_report))
    doc.add("h", 2, "Measurement conditions")
    doc.add("ul", _conditions(view.meta or {}, cfg, summary, rec.n_prompts))
    doc.add("p", f"Report made {time.strftime('%Y-%m-%d %H:%M')} by Rank Studio from the sweep in `{view.sweep_dir}`.")
    return DecisionReport(title, chosen, to_markdown(doc), to_html(doc, title, images), images, rec)


def report_for_sweep(sweep_dir: Path, metric: str | None = None, threshold: float | None = None,
                     rank: int | None = None) -> DecisionReport:
    """Read a sweep folder (and the run it names) and build its report."""
    from core import workspace_data as wd

    view = wd.read_sweep(Path(sweep_dir))
    if view.summary is None:
        raise UserError(view.summary_problem or f"{sweep_dir} is not a sweep folder with results (no summary.csv)")
    run_config = data_report = None
    if view.run_dir and Path(view.run_dir).is_dir():
        run = wd.read_run(Path(view.run_dir))
        run_config, data_report = run.config, run.data_report
    return build_report(view, run_config, data_report, metric, threshold, rank, wd.sweep_facts(view))
