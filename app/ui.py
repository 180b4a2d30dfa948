"""Small shared pieces of the dashboard: the job store, page links, selection in the URL,
status badges, formatting, the live-polling wrapper and the charts.

Business logic lives in `core` (mostly `core.workspace_data`); this module only draws.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core import distributed
from core import workspace_data as wd
from core.errors import UserError
from core.evaluation import wording as w
from core.evaluation.recommend import METRICS
from core.jobs import Job, JobStore, default_workspace

ROOT = Path(__file__).resolve().parent.parent
PAGES_DIR = ROOT / "pages"
# key → (file, title, icon); the order is the navigation's.
PAGES = {
    "home": ("home.py", "Runs", ":material/home:"),
    "data": ("data.py", "Data", ":material/table_view:"),
    "train": ("train.py", "Train", ":material/model_training:"),
    "sweep": ("sweep.py", "Sweep", ":material/tune:"),
    "compare": ("compare.py", "Compare & choose", ":material/compare_arrows:"),
    "export": ("export.py", "Export", ":material/download:"),
}
POLL = "2s"
STATUS_COLORS = {"queued": "gray", "running": "blue", "completed": "green", "cancelled": "orange",
                 "failed": "red", "died": "red"}
STATUS_WORDS = {"queued": "waiting", "running": "running", "completed": "finished", "cancelled": "cancelled",
                "failed": "failed", "died": "died"}


# ------------------------------------------------------------------ pages


def page_path(key: str) -> str:
    return str(PAGES_DIR / PAGES[key][0])


def nav_pages() -> list:
    return [st.Page(page_path(k), title=t, icon=i, default=(k == "home")) for k, (_, t, i) in PAGES.items()]


def go_to(key: str, **params) -> None:
    st.switch_page(page_path(key), query_params={k: str(v) for k, v in params.items() if v is not None})


# ------------------------------------------------------------------ workspace


@st.cache_resource(show_spinner=False)
def _store(workspace: str) -> JobStore:
    store = JobStore(workspace)
    wd.ensure_sample_dataset(store.workspace)
    return store


def store() -> JobStore:
    """The job store of the workspace ($RANK_STUDIO_WORKSPACE or ./workspace)."""
    return _store(str(default_workspace()))


def workspace() -> Path:
    return store().workspace


def datasets() -> list[wd.DatasetInfo]:
    """The workspace's datasets; a damaged one is skipped with a warning, never breaks the page."""
    found, damaged = wd.scan_datasets(workspace())
    for problem in damaged:
        st.warning(problem, icon=":material/warning:")
    return found


def parallel_choice(column, label: str, key: str, value: int, help: str) -> int:
    """The devices found, and how many processes to spread the job over when there is more than one."""
    devices = distributed.find_devices()
    if devices.count < 2:
        column.caption(f"Devices found: {devices.describe()}: one process.")
        return 1
    chosen = int(column.number_input(label, 1, devices.count, min(max(1, int(value)), devices.count), key=key, step=1,
                                     help=help))
    column.caption(f"Devices found: {devices.describe()}.")
    return chosen


# ------------------------------------------------------------------ selection in the URL


def selected_id(param: str) -> int | None:
    raw = st.query_params.get(param)
    try:
        return int(raw) if raw is not None else None
    except (TypeError, ValueError):
        return None


def select(param: str, value) -> None:
    if value is None:
        st.query_params.pop(param, None)
    else:
        st.query_params[param] = str(value)


def job_or_none(job_id: int | None, kind: str | None = None) -> Job | None:
    if job_id is None:
        return None
    try:
        job = store().get(job_id)
    except UserError:
        return None
    return job if kind is None or job.kind == kind else None


def pick_job(label: str, jobs: list[Job], param: str, key: str, help: str | None = None) -> Job | None:
    """A selectbox of jobs whose choice is kept in the URL (?param=id)."""
    if not jobs:
        return None
    ids = [j.id for j in jobs]
    wanted = selected_id(param)
    index = ids.index(wanted) if wanted in ids else 0
    by_id = {j.id: j for j in jobs}
    chosen = st.selectbox(label, ids, index=index, key=key, help=help,
                          format_func=lambda i: job_label(by_id[i]))
    if chosen != wanted:
        select(param, chosen)
    return by_id[chosen]


def job_label(job: Job) -> str:
    return f"{job.name} (#{job.id}, {STATUS_WORDS.get(job.status, job.status)}, {age(job.created_at)})"


# ------------------------------------------------------------------ jobs


def has_adapter(job: Job) -> bool:
    return (job.out_dir / "adapter" / "adapter.safetensors").is_file()


def usable_runs() -> list[Job]:
    """Training runs with a saved adapter (finished, or stopped with one)."""
    return [j for j in store().list("train") if has_adapter(j) and j.status != "running"]


def sweeps_of(run: Job) -> list[Job]:
    return [j for j in store().list("sweep") if j.parent_id == run.id]


def run_recommendation(run: Job, sweeps: list[Job] | None = None) -> dict | None:
    """The recommendation of the run's newest finished sweep."""
    for sw in sweeps if sweeps is not None else sweeps_of(run):
        if sw.parent_id == run.id and sw.status == "completed":
            rec = wd.read_sweep(sw.out_dir).recommendation
            if rec:
                return rec
    return None


def badge(status: str) -> str:
    return f":{STATUS_COLORS.get(status, 'gray')}-badge[{STATUS_WORDS.get(status, status)}]"


def age(ts: float | None) -> str:
    if not ts:
        return "—"
    s = max(0.0, time.time() - ts)
    if s < 60:
        return "just now"
    if s < 3600:
        return f"{s // 60:.0f} min ago"
    if s < 86400:
        return f"{s // 3600:.0f} h ago"
    return f"{s // 86400:.0f} days ago"


def duration(seconds: float | None) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "—"
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:02.0f} s"
    return f"{seconds // 3600:.0f} h {(seconds % 3600) // 60:02.0f} min"


def job_heading(job: Job, what: str) -> None:
    """Name, number and status of a job, and its place in the queue while it waits."""
    head = st.columns([4, 2], vertical_alignment="center")
    head[0].subheader(f"{job.name} · {what} #{job.id}")
    head[1].markdown(badge(job.status))
    if job.status == "queued":
        st.info(f"Waiting in the queue (position {store().queue_position(job.id)}): one heavy job runs at a time.",
                icon=":material/hourglass_top:")


def failure_box(job: Job) -> None:
    """A failed/died job: the human message, and the log tail folded away."""
    if job.status in ("failed", "died"):
        message = (job.error or "The job stopped without saying why.").split("\n\nLast lines", 1)[0]
        st.error(message, icon=":material/error:")
        if job.resumable and job.status == "died":
            st.caption("It can be resumed from its last checkpoint.")
        elif job.restartable and job.status == "died":
            st.caption("It never saved any progress; it can be started again.")
    if job.status != "queued":
        with st.expander("Log (last lines)"):
            st.code(store().log_tail(job.id, 40) or "(empty)", language=None)


def job_actions(job: Job, key: str, allow_delete: bool = True) -> None:
    """Cancel / resume / delete buttons for one job (delete asks first)."""
    s = store()
    confirm_key = f"confirm-delete-{job.id}"
    row = st.container(horizontal=True)
    if job.active:
        if row.button("Cancel", key=f"{key}-cancel-{job.id}", icon=":material/stop:",
                      help="Stops at the next step and saves a checkpoint"):
            s.cancel(job.id)
            st.rerun()
    elif job.resume_mode:
        label, help_text = (("Resume", "Continues from the last checkpoint") if job.resumable else
                            ("Restart", "Runs the job again from the start (it saved no progress)"))
        if row.button(label, key=f"{key}-resume-{job.id}", icon=":material/play_arrow:", help=help_text):
            try:
                s.resume(job.id)
            except UserError as exc:
                st.error(str(exc))
            else:
                st.rerun()
    if allow_delete and not job.active:
        if row.button("Delete", key=f"{key}-delete-{job.id}", icon=":material/delete:"):
            st.session_state[confirm_key] = True
    if st.session_state.get(confirm_key):
        st.warning(f"Delete **{job.name}** (#{job.id}) and all its files? This cannot be undone.")
        confirm = st.container(horizontal=True)
        if confirm.button("Yes, delete", key=f"{key}-really-{job.id}", type="primary"):
            st.session_state.pop(confirm_key, None)
            try:
                s.delete(job.id)
            except UserError as exc:
                st.error(str(exc))
            else:
                st.rerun()
        if confirm.button("Keep it", key=f"{key}-keep-{job.id}"):
            st.session_state.pop(confirm_key, None)
            st.rerun()


def number_field(where, label: str, value, limits: tuple, key: str, help: str | None = None, **kwargs):
    """A number input whose every entry reaches the script, in range or not.

    Given min_value/max_value, the browser keeps an out-of-range entry to itself: it turns
    the field red and the script goes on with the previous value, so a launch would use a
    number the user no longer sees. Without them every entry arrives; the page checks it
    against `limits` (the same ones core validates with) and blocks the launch with why."""
    lo, hi = limits
    hint = f"From {lo:g} to {hi:g}."
    return where.number_input(label, value=value, key=key, help=f"{help} {hint}" if help else hint, **kwargs)


def live(active: bool, body: Callable[[], None], every: str = POLL) -> None:
    """Run `body`; while `active`, re-run it every `every` (a fragment) until nothing is
    active any more, then rerun the whole page once so polling stops."""
    if not active:
        body()
        return

    @st.fragment(run_every=every)
    def _poll():
        try:
            still = body()
        except UserError as exc:        # e.g. the job store stayed locked: say so, poll again
            st.error(str(exc), icon=":material/error:")
            return
        if still is False:
            st.rerun()
    _poll()


# ------------------------------------------------------------------ charts


def _layout(fig: go.Figure, title: str, x: str, y: str, height: int = 320) -> go.Figure:
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, height=height,
                      margin=dict(l=10, r=10, t=50, b=10), legend=dict(orientation="h", y=-0.25))
    return fig


def loss_chart(steps: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    if not steps.empty:
        fig.add_scatter(x=steps["step"], y=steps["loss"], mode="lines+markers", name="loss",
                        marker=dict(size=4), customdata=steps["rank"],
                        hovertemplate="step %{x}<br>loss %{y:.3f}<br>rank %{customdata}<extra></extra>")
        if len(steps) >= 5:
            smooth = steps["loss"].rolling(max(3, len(steps) // 10), min_periods=1).mean()
            fig.add_scatter(x=steps["step"], y=smooth, mode="lines", name="smoothed", line=dict(width=3))
    return _layout(fig, "Training loss", "step", "loss")


def histogram_chart(hist: dict[int, int], r_max: int | None) -> go.Figure:
    ranks = list(range(1, (r_max or max(hist, default=1)) + 1))
    fig = go.Figure(go.Bar(x=ranks, y=[hist.get(r, 0) for r in ranks], name="steps"))
    return _layout(fig, "Sampled ranks", "rank", "optimizer steps")


GREEN, GREY, BLUE, ORANGE = "#2e7d32", "#9e9e9e", "#1565c0", "#ef6c00"


def _rank_positions(fig: go.Figure, ranks: list[int], chosen: int | None) -> None:
    """Ranks at evenly spaced positions (base model first), so that points and bars line
    up whatever the ranks are; the chosen rank shaded and named on the axis."""
    labels = ["base" if r == 0 else str(r) for r in ranks]
    if chosen in ranks:
        i = ranks.index(chosen)
        labels[i] = f"<b>{labels[i]} (chosen)</b>"
        fig.add_vrect(x0=i - 0.4, x1=i + 0.4, fillcolor=GREEN, opacity=0.12, line_width=0)
    fig.update_xaxes(tickvals=list(range(len(ranks))), ticktext=labels, range=[-0.6, len(ranks) - 0.4])


def _spread(df: pd.DataFrame, col: str) -> dict | None:
    lo, hi = f"{col}_lo", f"{col}_hi"
    if lo not in df or hi not in df or not df[lo].notna().any():
        return None
    return dict(type="data", symmetric=False, array=(df[hi] - df[col]).clip(lower=0).fillna(0),
                arrayminus=(df[col] - df[lo]).clip(lower=0).fillna(0), thickness=1.5)


def quality_chart(summary: pd.DataFrame, metric: str, chosen: int | None, best: float | None = None,
                  tolerance: float | None = None) -> go.Figure:
    """The metric per rank with its 95 % range; the base model grey and dashed across; the
    band of values within the tolerance of the best rank shaded."""
    spec = METRICS[metric]
    df = summary[summary[metric].notna()].reset_index(drop=True) if metric in summary else summary.iloc[:0]
    ranks = [int(r) for r in df["rank"]]
    scale = 100 if spec.percent else 1
    unit = "%" if spec.percent else spec.unit
    fig = go.Figure()
    colors = [GREY if r == 0 else (GREEN if r == chosen else BLUE) for r in ranks]
    err = _spread(df, metric)
    if err is not None:
        err.update(array=err["array"] * scale, arrayminus=err["arrayminus"] * scale)
    fig.add_scatter(x=list(range(len(ranks))), y=df[metric] * scale, error_y=err, mode="markers",
                    marker=dict(size=11, color=colors), name=spec.label, showlegend=False,
                    customdata=[w.rank_label(r) for r in ranks],
                    hovertemplate="%{customdata}<br>" + spec.label + " %{y:.2f} " + unit + "<extra></extra>")
    base = _base(summary, metric)
    if base is not None:
        fig.add_hline(y=base * scale, line_dash="dash", line_color=GREY, annotation_text="base model",
                      annotation_position="bottom right")
    if best is not None and tolerance:
        lo, hi = (best - tolerance, best) if spec.higher_is_better else (best, best + tolerance)
        fig.add_hrect(y0=lo * scale, y1=hi * scale, fillcolor=GREEN, opacity=0.08, line_width=0,
                      annotation_text="as good as the best", annotation_position="top left")
    _rank_positions(fig, ranks, chosen)
    direction = "higher is better" if spec.higher_is_better else "lower is better"
    return _layout(fig, f"{spec.label} per rank ({direction}; bars: 95 % range)", "rank",
                   spec.label + (f" ({unit})" if unit else ""))


def _base(df: pd.DataFrame, col: str) -> float | None:
    row = df[df["rank"] == 0]
    if row.empty or col not in row or pd.isna(row[col].iloc[0]):
        return None
    return float(row[col].iloc[0])


SPEED_SERIES = {"ms_per_token": ("with the adapter (4-bit base, unmerged)", ORANGE),
                "ms_per_token_merged": ("merged (what you would serve)", BLUE)}


def speed_chart(summary: pd.DataFrame, chosen: int | None) -> go.Figure | None:
    """Milliseconds per token per rank, with the adapter and merged: medians with the
    fastest–slowest timed run."""
    series = {c: v for c, v in SPEED_SERIES.items() if c in summary and summary[c].notna().any()}
    if not series:
        return None
    ranks = [int(r) for r in summary["rank"]]
    fig = go.Figure()
    for col, (label, color) in series.items():
        fig.add_scatter(x=list(range(len(ranks))), y=summary[col], error_y=_spread(summary, col), mode="lines+markers",
                        name=label, line=dict(color=color), customdata=[w.ms(v) for v in summary[col]],
                        hovertemplate="%{customdata} per token<extra>" + label + "</extra>")
    fig.update_yaxes(rangemode="tozero")
    _rank_positions(fig, ranks, chosen)
    return _layout(fig, "Milliseconds per token (lower is faster; bars: fastest–slowest run)", "rank", "ms per token")


def memory_chart(summary: pd.DataFrame, chosen: int | None, quant: str | None = "nf4") -> go.Figure | None:
    """Weights per rank: the 4-bit base plus the adapter (stacked), and the merged
    full-precision copy as a dashed line."""
    if "base_mb" not in summary or not summary["base_mb"].notna().any():
        return None
    ranks = [int(r) for r in summary["rank"]]
    x = list(range(len(ranks)))
    adapter = summary["adapter_mb"].fillna(0) if "adapter_mb" in summary else pd.Series([0.0] * len(ranks))
    fig = go.Figure()
    fig.add_bar(x=x, y=summary["base_mb"], name=f"{w.base_kind(quant)} base model", marker_color=GREY,
                hovertemplate="base model %{y:.0f} MB<extra></extra>")
    fig.add_bar(x=x, y=adapter, name="adapter", marker_color=GREEN, text=[f"+{w.mb(v)}" if v else "" for v in adapter],
                textposition="outside", hovertemplate="adapter %{y:.2f} MB<extra></extra>")
    fig.update_layout(barmode="stack")
    if "merged_mb" in summary and summary["merged_mb"].notna().any():
        fig.add_hline(y=float(summary["merged_mb"].dropna().iloc[0]), line_dash="dash", line_color=BLUE,
                      annotation_text="merged full-precision copy", annotation_position="top left")
    _rank_positions(fig, ranks, chosen)
    return _layout(fig, "Model weights per rank (MB)", "rank", "MB")
