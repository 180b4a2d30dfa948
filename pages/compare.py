"""Compare & choose: quality, speed and memory per rank; a live recommendation."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from app import ui
from core import workspace_data as wd
from core.evaluation.recommend import METRICS, recommend_rank

st.title("Compare & choose a rank")
store = ui.store()


@st.cache_data(show_spinner=False, max_entries=16)
def load(sweep_dir: str, stamp: float) -> wd.SweepView:
    return wd.read_sweep(sweep_dir)


@st.cache_data(show_spinner=False, max_entries=16)
def degradation(sweep_dir: str, stamp: float, metric: str, threshold: float) -> pd.DataFrame:
    return wd.prompt_degradation(load(sweep_dir, stamp).per_prompt, metric, threshold)


sweeps = [j for j in store.list("sweep") if (j.out_dir / "summary.csv").is_file()]
if not sweeps:
    st.info("No sweep with results yet: run a sweep on a trained run first.", icon=":material/info:")
    st.page_link(ui.page_path("sweep"), label="Go to Sweep", icon=":material/tune:")
    st.stop()
job = ui.pick_job("Sweep", sweeps, "sweep", "cmp-sweep")
summary_file = job.out_dir / "summary.csv"
stamp = summary_file.stat().st_mtime
view = load(str(job.out_dir), stamp)
summary = view.summary
if job.status != "completed":
    st.warning(f"This sweep is {ui.STATUS_WORDS.get(job.status, job.status)}; it shows the ranks measured so far: "
               + ", ".join(map(str, view.ranks_done)))
if summary is None or summary.empty or not view.metrics:
    st.info("This sweep has no quality numbers yet.")
    st.stop()

saved = view.recommendation or {}
metrics = view.metrics
c = st.columns([2, 3])
metric = c[0].selectbox("Quality metric", metrics,
                        index=metrics.index(saved["metric"]) if saved.get("metric") in metrics else 0,
                        format_func=lambda m: METRICS[m].label, key="cmp-metric",
                        help="; ".join(f"{METRICS[m].label}: {METRICS[m].description}" for m in metrics))
threshold = c[1].slider("How close to the best rank is good enough?", 0.50, 1.00,
                        float(saved.get("threshold") or 0.95), 0.01, key="cmp-threshold",
                        help="1.00 = only ranks as good as the best; 0.90 = within 10 % of the best "
                             "(for reference NLL: per-token probability within 10 %).")
rec = recommend_rank(summary, metric, threshold)
if rec.rank is not None:
    st.success(f"### Recommended rank: {rec.rank}\n{rec.reason}", icon=":material/star:")
else:
    st.warning(rec.reason, icon=":material/warning:")

tab_q, tab_s, tab_m = st.tabs(["Quality", "Speed", "Memory"])
with tab_q:
    st.plotly_chart(ui.quality_chart(summary, metric, rec.rank, rec.bar), key="chart-quality")
with tab_s:
    fig = ui.lines_chart(summary, ui.LATENCY, "Speed per rank (lower is faster)", "milliseconds", rec.rank)
    if fig is None:
        st.info("This sweep did not measure speed.")
    else:
        st.plotly_chart(fig, key="chart-speed")
with tab_m:
    fig = ui.lines_chart(summary, ui.MEMORY, "Memory per rank", "MB", rec.rank, right=ui.ADAPTER_SIZE,
                         right_title="adapter MB", from_zero=True)
    if fig is None:
        st.info("This sweep did not record memory.")
    else:
        st.plotly_chart(fig, key="chart-memory")
        if "base_mb" in summary and summary["base_mb"].notna().any():
            st.caption(f"The base model's weights take {summary['base_mb'].dropna().iloc[0]:.0f} MB; "
                       "the adapter adds its size on top.")

st.subheader("All numbers")
table = summary.merge(rec.table[["rank", "acceptable"]], on="rank", how="left")
table.insert(0, "", table["rank"].map(lambda r: "★" if r == rec.rank else ("base" if r == 0 else "")))
st.dataframe(table.dropna(axis=1, how="all"), hide_index=True)
st.download_button("Download summary.csv", summary_file.read_bytes(), "summary.csv", "text/csv",
                   icon=":material/download:", on_click="ignore")

per_prompt = view.per_prompt
if per_prompt is not None and not per_prompt.empty:
    st.subheader("Answers side by side")
    prompts = per_prompt.drop_duplicates("id")[["id", "prompt"]]
    pid = st.selectbox("Prompt", prompts["id"].astype(str).tolist(), key="cmp-prompt",
                       format_func=lambda i: f"{i}: {prompts[prompts['id'].astype(str) == i]['prompt'].iloc[0][:90]}")
    measured = sorted(per_prompt["rank"].astype(int).unique().tolist())
    default = sorted({r for r in [0, rec.rank, measured[-1]] if r is not None and r in measured})
    shown = st.multiselect("Ranks", measured, default=default, key="cmp-ranks")
    answers = wd.answers_side_by_side(per_prompt, pid, shown)
    reference = per_prompt[per_prompt["id"].astype(str) == pid]["reference"].iloc[0]
    st.markdown(f"**Reference answer:** {reference}")
    if not answers.empty:
        cols = st.columns(len(answers))
        for col, (_, row) in zip(cols, answers.iterrows()):
            with col.container(border=True):
                title = "Base model (rank 0)" if row["rank"] == 0 else f"Rank {int(row['rank'])}"
                if row["rank"] == rec.rank:
                    title += " ★"
                st.markdown(f"**{title}**")
                st.write(str(row.get("answer", "")))
                if metric in row:
                    st.caption(f"{METRICS[metric].label}: {ui.fmt_value(metric, row[metric])}")

    st.subheader("Which prompts degrade first as the rank drops")
    deg = degradation(str(job.out_dir), stamp, metric, threshold)
    if deg.empty:
        st.info("Not enough ranks to compare prompts.")
    else:
        n_bad = int(deg["degrades_below"].notna().sum())
        st.caption(f"Each prompt is compared with its own answer at the highest measured rank, using the same rule "
                   f"as the recommendation. {n_bad} of {len(deg)} prompts fall short at some lower rank; the ones "
                   "that fall short at the highest rank come first.")
        shown_deg = deg.rename(columns={"degrades_below": "fails at rank", "top_value": "at top rank",
                                        "lowest_value": "at lowest rank", "base_value": "base model",
                                        "drop": "worse by"})
        st.dataframe(shown_deg.head(15), hide_index=True)

if rec.rank is not None:
    if st.button(f"Export rank {rec.rank} →", type="primary", icon=":material/download:"):
        ui.go_to("export", run=job.parent_id, sweep=job.id, rank=rec.rank)
