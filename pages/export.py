"""Export: one rank of a run → PEFT adapter (+ merged model) and a rank card; zip download."""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from app import ui
from core import workspace_data as wd
from core.errors import UserError
from core.evaluation.recommend import METRICS
from core.rank_card import rank_card_markdown
from core.refine import default_refine_lr

st.title("Export a rank")
store = ui.store()


@st.cache_data(show_spinner="Writing the decision report…", max_entries=8)
def decision_report(sweep_dir: str, stamp: float, rank: int) -> tuple[str, bytes]:
    from core.evaluation.report import report_for_sweep

    built = report_for_sweep(sweep_dir, rank=rank)
    return built.html, built.markdown_zip(f"decision-report-rank{rank}")


def card_body(card: dict) -> str:
    """The rank card without its loading snippet (the page shows that once, above)."""
    try:
        return rank_card_markdown({k: v for k, v in card.items() if not k.startswith("_")}, with_snippet=False)
    except (KeyError, TypeError, ValueError):           # a card from an older export
        return card["_markdown"].split("## Load it")[0]


def finished_export(job) -> None:
    card = wd.read_export(job.out_dir)
    if card is None:
        st.warning("This export has no rank card.")
        return
    st.success(f"Rank {card['rank']} of {card['run_id']} exported: a PEFT LoRA adapter"
               + (" and a merged model" if card.get("merged") else "") + ".", icon=":material/check_circle:")
    c = st.columns(2)
    c[0].download_button(
        "Download adapter + rank card (.zip)", lambda: wd.zip_folder(job.out_dir, include_merged=False),
        file_name=f"{job.out_dir.name}.zip", mime="application/zip", type="primary",
        icon=":material/download:", key=f"zip-{job.id}", on_click="ignore")
    if card.get("merged"):
        size = sum(v for k, v in card.get("file_sizes", {}).items() if k.startswith("merged"))
        c[1].download_button(
            f"Download with the merged model ({size / 2**20:.0f} MB, .zip)", lambda: wd.zip_folder(job.out_dir),
            file_name=f"{job.out_dir.name}-merged.zip", mime="application/zip", icon=":material/download:",
            key=f"zip-merged-{job.id}", on_click="ignore")
    sweep_dir = (card.get("measured") or {}).get("sweep")
    if sweep_dir and (Path(sweep_dir) / "summary.csv").is_file():
        stamp = wd.sweep_stamp(sweep_dir)
        c = st.container(horizontal=True)
        c.download_button("Decision report (HTML)", lambda: decision_report(sweep_dir, stamp, int(card["rank"]))[0],
                          f"{job.out_dir.name}-decision-report.html", "text/html",
                          icon=":material/description:", key=f"report-html-{job.id}", on_click="ignore")
        c.download_button("Decision report (Markdown + charts, .zip)",
                          lambda: decision_report(sweep_dir, stamp, int(card["rank"]))[1],
                             f"{job.out_dir.name}-decision-report.zip", "application/zip",
                             icon=":material/folder_zip:", key=f"report-md-{job.id}", on_click="ignore")
    st.markdown("**Load it with PEFT** (on any machine: the base model comes from the hub where it has a hub id)")
    st.code(card.get("snippet", ""), language="python")
    st.caption(f"Folder: `{job.out_dir}`")
    tab_md, tab_json = st.tabs(["Rank card", "rank_card.json"])
    with tab_md:
        st.markdown(card_body(card))
    with tab_json:
        st.json({k: v for k, v in card.items() if not k.startswith("_")}, expanded=False)


def monitor(job_id: int) -> bool:
    job = store.get(job_id)
    head = st.columns([4, 2], vertical_alignment="center")
    head[0].subheader(f"{job.name} · export #{job.id}")
    head[1].markdown(ui.badge(job.status))
    if job.status == "queued":
        st.info(f"Waiting in the queue (position {store.queue_position(job.id)}).", icon=":material/hourglass_top:")
    elif job.status == "running":
        st.progress(0.5, text=(store.log_tail(job.id, 1) or "exporting…")[-120:])
    elif job.status == "completed":
        finished_export(job)
    ui.failure_box(job)
    if not job.active:
        ui.job_actions(job, "export")
    return job.active


export_job = ui.job_or_none(ui.selected_id("export"), "export")
if export_job is not None:
    ui.live(export_job.active, lambda: monitor(export_job.id))
    st.divider()

st.header("New export")
runs = ui.usable_runs()
if not runs:
    st.info("No trained run yet. Train one first.", icon=":material/info:")
    st.stop()
run = ui.pick_job("Training run", runs, "run", "ex-run")
view = wd.read_run(run.out_dir)
r_max = view.r_max or 1
sweeps = [s for s in ui.sweeps_of(run) if (s.out_dir / "summary.csv").is_file()]
sweep = None
if sweeps:
    sweep = ui.pick_job("Numbers for the rank card from sweep", sweeps, "sweep", "ex-sweep")
rec = wd.read_sweep(sweep.out_dir).recommendation if sweep else None
wanted = ui.selected_id("rank")
default = wanted if wanted and 1 <= wanted <= r_max else (rec or {}).get("rank") or r_max
rank = ui.number_field(st, "Rank to export", int(default), (1, r_max), key=f"ex-rank-{run.id}-{default}", step=1)
problems = wd.export_problems(rank, r_max)
if rec and rec.get("rank"):
    label = METRICS[rec["metric"]].label.lower() if rec.get("metric") in METRICS else rec.get("metric")
    st.caption(f"Recommended by the sweep: rank **{rec['rank']}** — {rec.get('headline', '')} (on {label}, within "
               f"{round(100 * (1 - float(rec.get('threshold') or 0.95)))} % of the best rank).")
merge = st.checkbox("Also write a merged model (the adapter folded into a full-precision copy of the base)",
                    key="ex-merge", help="Runs without PEFT, but is as large as the base model.")
name = st.text_input("Export name", value=f"{run.name}-rank{int(rank)}", max_chars=60, key=f"ex-name-{int(rank)}")
if sweep is not None and int(rank) not in wd.read_sweep(sweep.out_dir).ranks_done:
    st.caption(f"The sweep did not measure rank {int(rank)}: the rank card will have no measured numbers.")
for p in problems:
    st.error(p, icon=":material/block:")
if st.button("Export", type="primary", icon=":material/ios_share:", disabled=bool(problems)):
    try:
        measured = sweep is not None and int(rank) in wd.read_sweep(sweep.out_dir).ranks_done
        args = wd.export_args(run.out_dir, int(rank), merge=merge, sweep_dir=sweep.out_dir if measured else None,
                              r_max=r_max)
        new = store.submit("export", name or "export", args, parent_id=run.id)
    except UserError as exc:
        st.error(str(exc))
    else:
        ui.go_to("export", export=new.id, run=run.id, sweep=sweep.id if sweep else None, rank=int(rank))

with st.expander(f"Polish rank {int(rank)} before exporting it", icon=":material/auto_fix_high:"):
    st.markdown(f"Continue training rank {int(rank)} of this run on its own, starting from exactly what it is now. "
                "The result is a new training run (sweep and export it like any other).")
    c = st.columns([1, 1, 2], vertical_alignment="bottom")
    # ui.number_field: out-of-range entries reach refine_problems below instead of staying in the browser.
    polish_steps = ui.number_field(c[0], "Extra steps", 40, wd.TRAIN_LIMITS["steps"], key=f"polish-steps-{run.id}", step=1)
    polish_lr = ui.number_field(c[1], "Learning rate", default_refine_lr((view.config or {}).get("train", {})),
                                wd.TRAIN_LIMITS["lr"], key=f"polish-lr-{run.id}", format="%.5f")
    polish_problems = wd.refine_problems(rank, polish_steps, polish_lr, r_max)
    for p in polish_problems:
        st.error(p, icon=":material/block:")
    if c[2].button(f"Polish rank {int(rank)}", icon=":material/play_arrow:", key=f"polish-{run.id}",
                   disabled=bool(polish_problems)):
        try:
            args = wd.refine_args(run.out_dir, int(rank), int(polish_steps), lr=float(polish_lr), r_max=r_max)
            new = store.submit("train", f"{run.name}-rank{int(rank)}-polished", args, parent_id=run.id)
        except UserError as exc:
            st.error(str(exc))
        else:
            ui.go_to("train", run=new.id)

previous = [j for j in store.list("export") if j.parent_id == run.id and (export_job is None or j.id != export_job.id)]
if previous:
    st.subheader("Earlier exports of this run")
    for j in previous:
        card = wd.read_export(j.out_dir)
        what = f"rank {card['rank']}" if card else ui.STATUS_WORDS.get(j.status, j.status)
        if st.button(f"{j.name} (#{j.id}, {what}, {ui.age(j.created_at)})", key=f"prev-{j.id}"):
            ui.go_to("export", export=j.id, run=run.id)
