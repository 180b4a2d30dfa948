"""Home: every training run, sweep and export, with status, progress and actions."""
from __future__ import annotations

import streamlit as st

from app import ui
from core import workspace_data as wd

st.title("Rank Studio")
st.markdown(
    "Train **one** QDyLoRA adapter on a 4-bit base model, then use **any rank** from 1 to r_max. "
    "Measure quality, speed and memory per rank on your own prompts, pick the lowest rank that is "
    "good enough, and export exactly that rank."
)
steps = st.columns(5)
for col, (key, text) in zip(steps, [("data", "1 · Data"), ("train", "2 · Train"), ("sweep", "3 · Sweep"),
                                     ("compare", "4 · Compare & choose"), ("export", "5 · Export")]):
    col.page_link(ui.page_path(key), label=text, icon=ui.PAGES[key][2])

store = ui.store()
KIND_WORDS = {"train": "Training run", "sweep": "Sweep", "export": "Export"}
OPEN = {"train": ("train", "run"), "sweep": ("compare", "sweep"), "export": ("export", "export")}


def progress_of(job) -> tuple[float | None, str, str | None, str]:
    """(fraction, words, base model, best/recommended rank) for one job."""
    if job.kind == "train":
        view = wd.read_run(job.out_dir)
        words = f"step {view.step} of {view.total_steps or '?'}"
        if job.status == "running" and view.phase == "loading model":
            words = "loading the model…"
        rec = ui.run_recommendation(job, sweeps)
        best = f"rank {rec['rank']}" if rec and rec.get("rank") else ("—" if not rec else "none acceptable")
        return view.fraction, words, view.base_model, best
    if job.kind == "sweep":
        view = wd.read_sweep(job.out_dir)
        words = f"{len(view.ranks_done)} ranks measured"
        if job.status == "running":
            words = f"rank {view.current_rank if view.current_rank is not None else '…'}; {words}"
        rec = view.recommendation
        best = f"rank {rec['rank']}" if rec and rec.get("rank") else "—"
        model = ((view.meta or {}).get("run_meta") or {}).get("model", {}).get("name")
        return view.fraction, words, model, best
    card = wd.read_export(job.out_dir)
    if card:
        return 1.0, "exported", card["base_model"].get("name"), f"rank {card['rank']}"
    return (None if job.active else 0.0), ("exporting…" if job.active else ""), None, "—"


def job_list() -> bool:
    global sweeps
    jobs = store.list()
    sweeps = [j for j in jobs if j.kind == "sweep"]
    queued = sorted((j for j in jobs if j.status == "queued"), key=lambda j: (j.queued_at, j.id))
    running = [j for j in jobs if j.status == "running"]
    if running or queued:
        now = ", ".join(f"**{j.name}** ({KIND_WORDS[j.kind].lower()})" for j in running) or "nothing"
        st.info(f"Running now: {now}. One heavy job runs at a time; others wait in the queue.",
                icon=":material/hourglass_top:")
    if queued:
        st.subheader("Queue")
        for pos, j in enumerate(queued, start=1):
            st.markdown(f"{pos}. **{j.name}** — {KIND_WORDS[j.kind].lower()} #{j.id}, waiting since {ui.age(j.queued_at)}")

    st.subheader("Runs, sweeps and exports")
    if not jobs:
        st.markdown("Nothing yet. Start with the **Data** page (the sample data is ready), then **Train**.")
        st.page_link(ui.page_path("train"), label="Train on the sample data", icon=":material/model_training:")
        return False
    header = st.columns([3, 2, 3, 2, 2, 3])
    for col, text in zip(header, ["Name", "Status", "Progress", "Base model", "Best rank", ""]):
        col.caption(text)
    for job in jobs:
        fraction, words, model, best = progress_of(job)
        with st.container(border=True):
            c = st.columns([3, 2, 3, 2, 2, 3], vertical_alignment="center")
            c[0].markdown(f"**{job.name}**  \n{KIND_WORDS[job.kind]} #{job.id} · {ui.age(job.created_at)}")
            c[1].markdown(ui.badge(job.status))
            if job.status == "queued":
                pos = store.queue_position(job.id)
                c[2].markdown(f"waiting in the queue (position {pos})")
            elif fraction is not None:
                c[2].progress(fraction, text=words)
            else:
                c[2].markdown(words)
            c[3].markdown(model or "—")
            c[4].markdown(best)
            with c[5]:
                page, param = OPEN[job.kind]
                if job.kind == "sweep" and job.status != "completed":
                    page = "sweep"
                if st.button("Open", key=f"open-{job.id}", icon=":material/open_in_new:"):
                    extra = {"run": job.parent_id} if job.kind in ("sweep", "export") and job.parent_id else {}
                    ui.go_to(page, **{param: job.id}, **extra)
                ui.job_actions(job, "home")
            if job.status in ("failed", "died"):
                ui.failure_box(job)
    return any(j.active for j in jobs)


sweeps: list = []
ui.live(any(j.active for j in store.list()), job_list)
