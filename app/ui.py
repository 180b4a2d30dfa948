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

from core import workspace_data as wd
from core.errors import UserError
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


def live(active: bool, body: Callable[[], None]) -> None:
    """Run `body`; while `active`, re-run it every 2 s (a fragment) until nothing is
    active any more, then rerun the whole page once so polling stops."""
    if not active:
        body()
        return

    @st.fragment(run_every=POLL)
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


def _x_ranks(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["rank"] > 0]


def _base(df: pd.DataFrame, col: str) -> float | None:
    row = df[df["rank"] == 0]
    if row.empty or col not in row or pd.isna(row[col].iloc[0]):
        return None
    return float(row[col].iloc[0])


def _rank_axis(fig: go.Figure, ranks) -> None:
    ranks = sorted(int(r) for r in ranks)
    if ranks and max(ranks) / max(1, min(ranks)) >= 8:
        fig.update_xaxes(type="log", tickvals=ranks, ticktext=[str(r) for r in ranks])
    else:
        fig.update_xaxes(tickvals=ranks)


def _mark_rank(fig: go.Figure, rank: int | None) -> None:
    if rank:
        fig.add_vline(x=rank, line_dash="dot", line_color="green",
                      annotation_text=f"recommended: {rank}", annotation_position="top left")


def quality_chart(summary: pd.DataFrame, metric: str, rec_rank: int | None, bar: float | None) -> go.Figure:
    spec = METRICS[metric]
    df = _x_ranks(summary)
    fig = go.Figure()
    lo, hi = f"{metric}_lo", f"{metric}_hi"
    err = None
    if lo in df and hi in df and df[lo].notna().any():
        err = dict(type="data", symmetric=False, array=(df[hi] - df[metric]).clip(lower=0),
                   arrayminus=(df[metric] - df[lo]).clip(lower=0), thickness=1.5)
    fig.add_scatter(x=df["rank"], y=df[metric], error_y=err, mode="lines+markers", name=spec.label,
                    hovertemplate="rank %{x}<br>" + spec.label + " %{y:.4g}<extra></extra>")
    base = _base(summary, metric)
    if base is not None:
        fig.add_hline(y=base, line_dash="dash", line_color="gray",
                      annotation_text="base model (rank 0)", annotation_position="bottom right")
    if bar is not None:
        fig.add_hline(y=bar, line_dash="dot", line_color="orange", annotation_text="acceptable",
                      annotation_position="top right")
    _mark_rank(fig, rec_rank)
    _rank_axis(fig, df["rank"])
    direction = "higher is better" if spec.higher_is_better else "lower is better"
    return _layout(fig, f"Quality: {spec.label} ({direction}; 95% intervals)", "rank", spec.label)


LATENCY = {"ms_per_token": "ms per token (adapter)", "ms_per_token_merged": "ms per token (merged)",
           "ttft_ms": "time to first token (ms)"}
MEMORY = {"peak_mem_mb": "peak memory while answering (MB)"}
ADAPTER_SIZE = {"adapter_mb": "adapter size (MB, right axis)"}


def lines_chart(summary: pd.DataFrame, columns: dict[str, str], title: str, y: str, rec_rank: int | None,
                right: dict[str, str] | None = None, right_title: str = "", from_zero: bool = False) -> go.Figure | None:
    """Lines per rank for `columns` (left axis) and `right` (right axis); the base model
    (rank 0) row, when measured, is drawn as a dashed line for the first left column."""
    df = _x_ranks(summary)
    present = {c: label for c, label in columns.items() if c in df and df[c].notna().any()}
    present_right = {c: label for c, label in (right or {}).items() if c in df and df[c].notna().any()}
    if not present and not present_right:
        return None
    fig = go.Figure()
    for col, label in present.items():
        fig.add_scatter(x=df["rank"], y=df[col], mode="lines+markers", name=label)
    for col, label in present_right.items():
        fig.add_bar(x=df["rank"], y=df[col], name=label, yaxis="y2", opacity=0.35)
    if present_right:
        fig.update_layout(yaxis2=dict(title=right_title, overlaying="y", side="right", showgrid=False,
                                      rangemode="tozero"))
    if from_zero:
        fig.update_yaxes(rangemode="tozero")
    if present:
        first, label = next(iter(present.items()))
        base_value = _base(summary, first)
        if base_value is not None:
            fig.add_hline(y=base_value, line_dash="dash", line_color="gray", annotation_text=f"base model: {label}",
                          annotation_position="bottom right")
    _mark_rank(fig, rec_rank)
    _rank_axis(fig, df["rank"])
    return _layout(fig, title, "rank", y)


def fmt_value(metric: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return METRICS[metric].fmt.format(value) if metric in METRICS else f"{value:.4g}"
