"""Compare & choose: the decision in words, every measure's verdict, quality / speed / memory,
the prompts × ranks grid, answers side by side, your own questions, the decision report."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from app import ui
from core import playground as pg
from core import workspace_data as wd
from core.errors import UserError
from core.evaluation import tables as T
from core.evaluation import wording as w
from core.evaluation.metrics import fact_hits
from core.evaluation.recommend import (
    AS_GOOD,
    METRICS,
    default_metric,
    recommend_across_metrics,
)

st.title("Compare & choose a rank")
store = ui.store()
TOLERANCES = [1, 2, 3, 5, 10, 15, 20, 30, 50]       # percent of the best rank's score
GRID_COLORS = {"hit": "#e8f5e9", "partial": "#fff8e1", "miss": "#ffebee", "fails": "#ffebee"}


@st.cache_data(show_spinner=False, max_entries=16)
def load(sweep_dir: str, stamp: float) -> wd.SweepView:
    return wd.read_sweep(sweep_dir)


@st.cache_data(show_spinner=False, max_entries=32)
def decisions(sweep_dir: str, stamp: float, threshold: float) -> dict:
    view = load(sweep_dir, stamp)
    cfg = view.config or {}
    return recommend_across_metrics(view.per_prompt, view.metrics, threshold,
                                    n_resamples=int(cfg.get("n_bootstrap") or 2000), seed=int(cfg.get("seed") or 0))


@st.cache_data(show_spinner=False, max_entries=16)
def degradation(sweep_dir: str, stamp: float, metric: str, threshold: float) -> pd.DataFrame:
    return wd.prompt_degradation(load(sweep_dir, stamp).per_prompt, metric, threshold)


@st.cache_data(show_spinner=False, max_entries=16)
def facts(sweep_dir: str, stamp: float) -> dict:
    return wd.sweep_facts(load(sweep_dir, stamp))


@st.cache_data(show_spinner="Writing the decision report…", max_entries=8)
def report(sweep_dir: str, stamp: float, metric: str, threshold: float) -> tuple[str, bytes]:
    from core.evaluation.report import report_for_sweep

    built = report_for_sweep(sweep_dir, metric, threshold)
    return built.html, built.markdown_zip("decision-report")


sweeps = [j for j in store.list("sweep") if (j.out_dir / "summary.csv").is_file()]
if not sweeps:
    st.info("No sweep with results yet: run a sweep on a trained run first.", icon=":material/info:")
    st.page_link(ui.page_path("sweep"), label="Go to Sweep", icon=":material/tune:")
    st.stop()
job = ui.pick_job("Sweep", sweeps, "sweep", "cmp-sweep")
stamp = wd.sweep_stamp(job.out_dir)
sweep_dir = str(job.out_dir)
view = load(sweep_dir, stamp)
summary, per_prompt = view.summary, view.per_prompt
if job.status != "completed":
    st.warning(f"This sweep is {ui.STATUS_WORDS.get(job.status, job.status)}; it shows the ranks measured so far: "
               + ", ".join(map(str, view.ranks_done)))
    if job.active:
        @st.fragment(run_every="5s")
        def _next_rank() -> None:
            """Redraw the page when the running sweep has written another rank."""
            if wd.sweep_stamp(job.out_dir) != stamp:
                st.rerun()

        _next_rank()
if view.summary_problem:
    st.warning(view.summary_problem, icon=":material/warning:")
    st.stop()
if summary is None or summary.empty or not view.metrics or per_prompt is None or per_prompt.empty:
    st.info("This sweep has no quality numbers yet.")
    st.stop()

# ------------------------------------------------------------------ the decision
saved = view.recommendation or {}
metrics = view.metrics
auto_metric, why = default_metric(metrics)
decision_box = st.container()
with st.expander("How the decision is made", icon=":material/tune:"):
    c = st.columns([2, 3])
    metric = c[0].selectbox("Deciding measure", metrics,
                            index=metrics.index(saved["metric"]) if saved.get("metric") in metrics else metrics.index(auto_metric),
                            format_func=lambda m: METRICS[m].label, key="cmp-metric",
                            help="; ".join(f"{METRICS[m].label}: {METRICS[m].description}" for m in metrics))
    saved_pct = round(100 * (1 - float(saved.get("threshold") or 0.95)))
    tolerance_pct = c[1].select_slider(
        "Good enough: within this much of the best rank", TOLERANCES,
        value=min(TOLERANCES, key=lambda t: abs(t - saved_pct)), format_func=lambda t: f"{t} %", key="cmp-tolerance",
        help="A rank counts as good as the best when, compared prompt by prompt, the whole 95 % range of its "
             "difference to the best rank stays within this share (for reference loss: of the per-token probability).")
    for m in metrics:
        st.markdown(f"- **{METRICS[m].label}**: {METRICS[m].description}.")
    for m, reason in wd.missing_metric_reasons(view).items():
        st.markdown(f"- **{METRICS[m].label}** is not shown: {reason}.")
threshold = round(1 - tolerance_pct / 100, 4)
recs = decisions(sweep_dir, stamp, threshold)
rec = recs[metric]
chosen = rec.rank

with decision_box:
    body = f"### {w.decision_title(rec)}\n{w.rank_sentence(summary, rec)}\n\n{rec.reason}"
    box = {"success": st.success, "warning": st.warning, "error": st.error}[w.verdict_style(rec.verdict)]
    box(body, icon=":material/star:" if rec.verdict == AS_GOOD else ":material/help:")
    for warning in rec.warnings:
        st.warning(warning, icon=":material/fact_check:")
    reason_metric = why if metric == auto_metric else "you chose it below"
    st.caption(f"Decided on **{METRICS[metric].label.lower()}** because {reason_metric}. A rank is as good as the "
               f"best when it is within {tolerance_pct} % of it with 95 % confidence, compared on the same "
               f"{rec.n_prompts} prompts.")

st.subheader("Every measure")
st.markdown(w.across_metrics_words(recs, metric))
st.dataframe(w.across_metrics_table(recs, metric), hide_index=True)

tab_q, tab_s, tab_m, tab_grid, tab_answers, tab_play, tab_all = st.tabs(
    ["Quality", "Speed", "Memory", "Prompts × ranks", "Answers side by side", "Try your own question", "All numbers"])

with tab_q:
    st.plotly_chart(ui.quality_chart(summary, metric, chosen, rec.best_value, rec.tolerance), key="chart-quality")
    st.caption("Dots are each rank's average over the prompts, bars its 95 % range. The shaded band holds the "
               "values within the tolerance of the best rank; the decision itself compares ranks prompt by prompt, "
               "which is sharper than comparing these bars.")
    per_set = T.by_set_table(view.by_set, metric)
    if per_set is not None:
        st.markdown(f"**{METRICS[metric].label} on each part of the evaluation**")
        st.dataframe(per_set, hide_index=True)
        st.caption("The evaluation prompts come in named sets. On the sample data, *FAQ recall* asks for answers "
                   "that were in the training data word for word, *new wordings* for the same facts in words never "
                   "trained on: a rank that does well only on the first recites rather than knows.")

with tab_s:
    fig = ui.speed_chart(summary, chosen)
    if fig is None:
        st.info("This sweep did not measure speed.")
    else:
        st.plotly_chart(fig, key="chart-speed")
        st.markdown(f"- {w.SPEED_ADAPTER}\n- {w.SPEED_MERGED}")
        row = summary[summary["rank"] == (chosen if chosen is not None else int(summary["rank"].max()))]
        if not row.empty:
            r = row.iloc[0].to_dict()
            for col, (key, label) in zip(st.columns(3), [("ms_per_token_merged", "Served merged, per token"),
                                                         ("ms_per_token", "With adapter on 4-bit base, per token"),
                                                         ("ttft_ms_merged", "First token, served merged")]):
                col.metric(label, w.ms(r.get(key)))
                spread = w.ms_spread(r.get(f"{key}_lo"), r.get(f"{key}_hi"))
                if spread:
                    col.caption(f"fastest–slowest run: {spread}")
            st.caption(f"{w.rank_label(r['rank'])}: medians of the timed runs at batch size 1.")

with tab_m:
    quant = (((view.meta or {}).get("run_meta") or {}).get("model") or {}).get("quant")
    fig = ui.memory_chart(summary, chosen, quant)
    if fig is None:
        st.info("This sweep did not record memory.")
    else:
        st.plotly_chart(fig, key="chart-memory")
        st.markdown(w.memory_words(summary, chosen, quant))

with tab_grid:
    deg = degradation(sweep_dir, stamp, metric, threshold)
    degrading = deg[deg["degrades_below"].notna()]["id"].astype(str).tolist() if not deg.empty else []
    prompt_facts = facts(sweep_dir, stamp)
    only = st.toggle(f"Only the prompts that degrade ({len(degrading)} of {per_prompt['id'].nunique()})",
                     key="cmp-grid-degrading", disabled=not degrading)
    cells, kinds = T.prompt_grid(per_prompt, metric, threshold, prompt_facts, only=degrading if only else None)
    styled = cells.style.apply(lambda _: kinds.map(lambda k: f"background-color: {GRID_COLORS[k]}" if k else ""), axis=None)
    st.dataframe(styled)
    unit_words = f" (in {METRICS[metric].unit})" if METRICS[metric].unit else ""
    if prompt_facts:
        st.caption(f"Each cell: the prompt's {METRICS[metric].label.lower()}{unit_words} at that rank, then its must-include "
                   "facts found (✓) or missing (✗) in the answer. Green: every fact found; yellow: some; red: none.")
    else:
        st.caption(f"Each cell: the prompt's {METRICS[metric].label.lower()}{unit_words} at that rank. Red: worse than the prompt's "
                   f"own highest-rank answer by more than {tolerance_pct} %. (This evaluation set has no must-include "
                   "facts to check.)")
    st.markdown("**Which prompts degrade first as the rank drops**")
    if deg.empty:
        st.info("Not enough ranks to compare prompts.")
    else:
        st.caption(f"Each prompt is compared with its own answer at the highest measured rank, with the same "
                   f"tolerance as the decision. {len(degrading)} of {len(deg)} prompts fall short at some lower rank; "
                   "the ones that fall short earliest come first.")
        st.dataframe(T.degradation_table(deg.head(15), metric), hide_index=True)

with tab_answers:
    prompts = per_prompt.drop_duplicates("id")[["id", "prompt"]]
    pid = st.selectbox("Prompt", prompts["id"].astype(str).tolist(), key="cmp-prompt",
                       format_func=lambda i: T.prompt_label(i, prompts[prompts["id"].astype(str) == i]["prompt"].iloc[0], 90))
    measured = sorted(per_prompt["rank"].astype(int).unique().tolist())
    default = sorted({r for r in [0, chosen, measured[-1]] if r is not None and r in measured})
    shown = st.multiselect("Ranks", measured, default=default, key="cmp-ranks", format_func=w.rank_label)
    answers = wd.answers_side_by_side(per_prompt, pid, shown)
    reference = per_prompt[per_prompt["id"].astype(str) == pid]["reference"].iloc[0]
    st.markdown(f"**Reference answer:** {reference}")
    wanted = prompt_facts.get(pid, [])
    if wanted:
        st.caption("Must include: " + ", ".join(wanted))
    if not answers.empty:
        for col, (_, row) in zip(st.columns(len(answers)), answers.iterrows()):
            with col.container(border=True):
                st.markdown(f"**{w.rank_label(row['rank'])}{' ★' if row['rank'] == chosen else ''}**")
                st.write(str(row.get("answer", "")))
                hits = fact_hits(str(row.get("answer") or ""), wanted)
                if hits:
                    st.caption(" ".join(("✓ " if found else "✗ ") + fact for fact, found in hits))
                if metric in row:
                    st.caption(f"{METRICS[metric].label}: {METRICS[metric].show(row[metric])}")

with tab_play:
    run_dir = view.run_dir
    r_max = int(((view.meta or {}).get("run_meta") or {}).get("r_max") or max(view.ranks_done or [1]))
    folder = pg.folder_for(ui.workspace(), run_dir) if run_dir else None
    st.markdown("Ask your own question and read the answers of several ranks, and of the base model, side by side. "
                "The run is loaded once in a helper process; answers appear as they are written.")
    c = st.columns([5, 4, 2], vertical_alignment="bottom")
    question = c[0].text_area("Your question", key="pg-question", max_chars=pg.MAX_PROMPT_CHARS, height=80,
                              placeholder="e.g. " + str(per_prompt["prompt"].iloc[0]))
    pg_ranks = c[1].multiselect("Ranks (0 = base model)", list(range(r_max + 1)), key="pg-ranks", format_func=w.rank_label,
                                default=sorted({0, chosen or 0, r_max}))
    # ui.number_field: an out-of-range length reaches pg.ask's check instead of staying in the browser.
    tokens = ui.number_field(c[2], "Answer length", 64, (1, pg.MAX_NEW_TOKENS), key="pg-tokens", step=8,
                             help="Most tokens per answer.")
    buttons = st.container(horizontal=True)
    if buttons.button("Ask", type="primary", icon=":material/send:", key="pg-ask", disabled=folder is None):
        try:
            pg.ask(folder, run_dir, question, sorted(pg_ranks), int(tokens), r_max)
        except (UserError, OSError) as exc:
            st.error(str(exc), icon=":material/block:")
    state = pg.worker_state(folder) if folder else None
    if pg.is_running(state) and buttons.button("Stop the playground", icon=":material/stop:", key="pg-stop",
                                               help="Frees the memory the loaded run takes; the next question loads it again"):
        pg.stop(folder)
    if any(j.status == "running" for j in store.list()):
        st.caption("A training, sweep or export job is running at the same time: answers come more slowly.")

    def busy() -> bool:
        """Whether the worker is loading or still answering the latest question."""
        state, answers = pg.worker_state(folder), pg.read_answers(folder) or {}
        return pg.is_running(state) and (state.get("phase") in ("starting", "loading model")
                                         or answers.get("status") == "running"
                                         or (pg.read_request(folder) or {}).get("id") not in (None, answers.get("id")))

    def answers_view() -> bool:
        state, answers = pg.worker_state(folder), pg.read_answers(folder)
        if state and state.get("status") in ("failed", "died"):
            st.error(f"The playground stopped: {state.get('error') or 'see playground.log'}", icon=":material/error:")
        elif pg.is_running(state) and state.get("phase") in ("starting", "loading model"):
            st.info("Loading the run… the first answer takes a little longer.", icon=":material/hourglass_top:")
        if answers:
            st.markdown(f"**Question:** {answers['prompt']}")
            if answers.get("error"):
                st.error(answers["error"], icon=":material/error:")
            order = answers.get("order") or []
            for col, b in zip(st.columns(max(1, len(order))), order):
                slot = answers["ranks"][str(b)]
                with col.container(border=True):
                    st.markdown(f"**{w.rank_label(b)}{' ★' if b == chosen else ''}**")
                    st.write(slot["text"] + ("" if slot["done"] else " ▌"))
                    if slot["done"]:
                        st.caption(f"{slot['tokens']} tokens in {slot['seconds']:.1f} s")
                    elif answers.get("status") == "superseded":
                        st.caption("stopped: a newer question came")
            if answers.get("status") == "done":
                st.caption("Greedy answers, each rank merged into a full-precision copy of the 4-bit base: the same "
                           "function as the adapter, only faster.")
        return busy()

    if folder is not None:
        ui.live(busy(), answers_view, every="700ms")

with tab_all:
    st.dataframe(T.summary_table(summary, rec, metrics), hide_index=True)
    c = st.columns(2)
    c[0].download_button("Download summary.csv (raw numbers)", (job.out_dir / "summary.csv").read_bytes(), "summary.csv", "text/csv",
                         icon=":material/download:", on_click="ignore")
    c[1].download_button("Download per_prompt.csv (every answer)", (job.out_dir / "per_prompt.csv").read_bytes(),
                         "per_prompt.csv", "text/csv", icon=":material/download:", on_click="ignore")

# ------------------------------------------------------------------ report and export
st.subheader("Decision report")
st.caption("One page with the decision, the reason, the charts, five example answers, the recipe and the measurement "
           "conditions: something to forward.")
c = st.container(horizontal=True)
# Built on the first click only (charts take a second or two), then cached.
c.download_button("Decision report (HTML)", lambda: report(sweep_dir, stamp, metric, threshold)[0],
                  f"{job.out_dir.name}-decision-report.html", "text/html", type="primary",
                  icon=":material/description:", on_click="ignore", key="cmp-report-html")
c.download_button("Decision report (Markdown + charts, .zip)", lambda: report(sweep_dir, stamp, metric, threshold)[1],
                  f"{job.out_dir.name}-decision-report.zip", "application/zip", icon=":material/folder_zip:",
                  on_click="ignore", key="cmp-report-md")
if chosen is not None:
    if c.button(f"Export rank {chosen} →", icon=":material/ios_share:"):
        ui.go_to("export", run=job.parent_id, sweep=job.id, rank=chosen)
