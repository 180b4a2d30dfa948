"""Sweep: measure a finished run at several ranks on evaluation prompts (a CLI job)."""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from app import ui
from core import workspace_data as wd
from core.errors import UserError
from core.evaluation.recommend import METRICS
from core.evaluation.wording import verdict_style

st.title("Sweep")
st.markdown("One trained run serves every rank. The sweep answers your evaluation prompts at each chosen "
            "rank (rank 0 is the base model without adapter) and measures quality, speed and memory.")
store = ui.store()


def monitor(job_id: int) -> bool:
    job = store.get(job_id)
    view = wd.read_sweep(job.out_dir)
    ui.job_heading(job, "sweep")
    if job.status == "running" and not view.total_units:
        st.progress(0.0, text="loading the model…")
    elif job.status != "queued":
        eta = f" · about {ui.duration(view.eta_s)} left" if job.status == "running" and view.eta_s is not None else ""
        rank = f"rank {view.current_rank} · " if job.status == "running" and view.current_rank is not None else ""
        timing = "measuring speed · " if job.status == "running" and view.phase == "latency" else ""
        st.progress(view.fraction, text=f"{rank}{timing}{view.done_units} of {view.total_units} answers{eta}")
    if view.ranks_done:
        st.markdown("Ranks measured: " + ", ".join(f"**{r}**" for r in view.ranks_done))
    if view.summary_problem:
        st.warning(view.summary_problem, icon=":material/warning:")
    ui.failure_box(job)
    if view.summary is not None and not job.active:
        if job.status == "completed":
            rec = view.recommendation
            if rec:
                box = {"success": st.success, "warning": st.warning, "error": st.error}[verdict_style(rec.get("verdict"))]
                box(f"**{rec.get('headline') or 'No recommendation'}.** {rec.get('reason', '')}", icon=":material/star:")
        if st.button("Compare the ranks →", type="primary", key=f"to-compare-{job.id}"):
            ui.go_to("compare", sweep=job.id, run=job.parent_id)
    ui.job_actions(job, "sweep")
    return job.active


sweep_job = ui.job_or_none(ui.selected_id("sweep"), "sweep")
if sweep_job is None:
    active = [j for j in store.list("sweep") if j.active]
    sweep_job = active[0] if active else None
if sweep_job is not None:
    ui.live(sweep_job.active, lambda: monitor(sweep_job.id))
    st.divider()

st.header("New sweep")
runs = ui.usable_runs()
if not runs:
    st.info("No finished training run yet. Train one first.", icon=":material/info:")
    st.page_link(ui.page_path("train"), label="Go to Train", icon=":material/model_training:")
    st.stop()
run = ui.pick_job("Training run", runs, "run", "sw-run")
view = wd.read_run(run.out_dir)
r_max = view.r_max or 1
st.caption(f"Base model {view.base_model} · r_max {r_max} · {view.step} steps trained")

datasets = ui.datasets()
train_data = str(((view.config or {}).get("train") or {}).get("data", ""))
own = next((d.id for d in datasets if str(d.train_path.resolve()) == str(Path(train_data).resolve())), None)
ids = [d.id for d in datasets]
ds_id = st.selectbox("Evaluation prompts", ids, index=ids.index(own) if own in ids else 0, key="sw-ds",
                     format_func=lambda i: (lambda d: f"{d.name}: {d.n_eval} prompts"
                                            + (" (held out from this run's data)" if d.id == own else ""))(
                         next(d for d in datasets if d.id == i)))
dataset = wd.get_dataset(ui.workspace(), ds_id)
ranks = st.multiselect("Ranks to measure (0 = base model)", list(range(0, r_max + 1)),
                       default=wd.default_sweep_ranks(r_max), key=f"sw-ranks-{run.id}")
has_facts = wd.eval_fact_count(dataset) > 0
metrics = st.multiselect("Quality metrics", list(METRICS), key=f"sw-metrics-{'facts' if has_facts else 'nofacts'}",
                         default=[m for m in METRICS if has_facts or m != "fact_recall"],
                         format_func=lambda m: METRICS[m].label,
                         help="; ".join(f"{s.label}: {s.description}" for s in METRICS.values()))
if not has_facts:
    st.caption(f"{METRICS['fact_recall'].label} is off: these evaluation prompts list no must-include facts "
               "(a must_include column), so there is nothing to check.")
    if "fact_recall" in metrics:
        st.warning(f"{METRICS['fact_recall'].label} will stay empty: no prompt of this set lists must-include facts.",
                   icon=":material/warning:")
c = st.columns(3, vertical_alignment="bottom")
max_prompts = ui.number_field(c[0], "Prompts to use", min(20, dataset.n_eval), (1, max(1, dataset.n_eval)),
                              key="sw-maxp", help="The first N evaluation prompts; fewer is faster.", step=1)
new_tokens = ui.number_field(c[1], "Answer length (tokens)", 64, wd.SWEEP_LIMITS["max_new_tokens"], key="sw-tokens",
                             step=1)
latency = c[2].checkbox("Measure speed", value=True, key="sw-latency",
                        help="Time to first token and ms per token, with the adapter and merged.")
workers = ui.parallel_choice(
    st.columns(3)[0], "Sweep workers", "sw-workers", 1,
    help="Processes measuring different ranks at once (one per GPU, or sharing the CPU cores); the results are the "
         "same files. On a shared CPU the speed numbers are measured under each other's load.")
if workers > 1 and len(ranks) < workers:
    st.caption(f"{workers} workers for {len(ranks)} rank{'s' if len(ranks) != 1 else ''}: one worker per rank will run.")
name = st.text_input("Sweep name", value=f"{run.name}-sweep", max_chars=60, key="sw-name")
problems = wd.sweep_problems(ranks, metrics, max_prompts, new_tokens, n_eval=dataset.n_eval)
for p in problems:
    st.error(p, icon=":material/block:")
units = len(ranks) * int(max_prompts)
st.caption(f"{units} answers of up to {new_tokens} tokens will be generated"
           + (", plus speed measurements." if latency else "."))
if st.button("Start sweep", type="primary", disabled=bool(problems), icon=":material/play_arrow:"):
    try:
        args = wd.sweep_args(run.out_dir, dataset.eval_path, sorted(ranks), max_prompts=int(max_prompts),
                             max_new_tokens=int(new_tokens), metrics=metrics, latency=latency, workers=workers)
        new = store.submit("sweep", name or "sweep", args, parent_id=run.id)
    except UserError as exc:
        st.error(str(exc))
    else:
        ui.go_to("sweep", sweep=new.id, run=run.id)
