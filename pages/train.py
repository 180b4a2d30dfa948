"""Train: the form (presets, estimate before launch) and the live view of a run."""
from __future__ import annotations

import streamlit as st

from app import ui
from core import workspace_data as wd
from core.errors import UserError
from core.estimate import ACCURACY_NOTE, estimate_training, model_shape
from core.qdylora.config import METHOD_RANK_SAMPLING, METHOD_ROW_STEPS, METHOD_SCALE, PER_ROW_RULES
from core.train_config import RECIPE_EVIDENCE

st.title("Train")
store = ui.store()


# ---------------------------------------------------------------- live view of one run
def monitor(job_id: int) -> bool:
    job = store.get(job_id)
    view = wd.read_run(job.out_dir)
    ui.job_heading(job, "run")
    last = view.last
    if job.status == "running" and view.steps.empty:
        st.progress(0.0, text=f"{view.phase or 'starting'}…")
    elif job.status != "queued":
        eta = f" · about {ui.duration(last.get('eta_s'))} left" if job.status == "running" and last else ""
        st.progress(view.fraction, text=f"step {view.step} of {view.total_steps or '?'}{eta}")
    if last:
        m = st.columns(4)
        m[0].metric("Loss", f"{last['loss']:.3f}")
        m[1].metric("Tokens / s", f"{last['tokens_per_s']:.0f}")
        m[2].metric("Memory", f"{last['mem_mb'] / 1024:.2f} GB")
        m[3].metric("Elapsed", ui.duration(last.get("elapsed_s")))
        c1, c2 = st.columns(2)
        c1.plotly_chart(ui.loss_chart(view.steps), key=f"loss-{job.id}")
        c2.plotly_chart(ui.histogram_chart(view.histogram, view.r_max), key=f"hist-{job.id}")
    ui.failure_box(job)
    if job.status == "completed":
        st.success("Training finished: every rank from 1 to "
                   f"{view.r_max} can now be used. Next, measure them on your evaluation prompts.",
                   icon=":material/check_circle:")
    if job.status == "cancelled":
        st.warning("Cancelled; a checkpoint was saved. Resume continues where it stopped.")
    if ui.has_adapter(job) and not job.active:
        if st.button("Sweep the ranks of this run →", type="primary", key=f"to-sweep-{job.id}"):
            ui.go_to("sweep", run=job.id)
    ui.job_actions(job, "train")
    return job.active


run_id = ui.selected_id("run")
job = ui.job_or_none(run_id, "train")
if job is None:
    active = [j for j in store.list("train") if j.active]
    job = active[0] if active else None
if job is not None:
    ui.live(job.active, lambda: monitor(job.id))
    st.divider()

# ---------------------------------------------------------------- the form
# The field values live in st.session_state["train_form"], a plain dict no widget owns:
# Streamlit never drops it on a page switch and the browser never writes it. Each widget
# gets its value through value=/index= and a key that code never writes, and what it
# returns is copied back. (Writing presets into widget keys reached the browser only as a
# one-shot "set value" of one script run; when the browser sent a rerun before mounting
# that run's widgets, later runs carried only the widget default, min_value, which the
# browser showed and sent back: α 0.01 and lr 1e-7 in the launched job.) Choosing a
# preset moves the preset fields to new keys, so the browser mounts fresh widgets that
# start at the preset's values.
FORM = "train_form"
GEN = "train_form_gen"
if FORM not in st.session_state:
    st.session_state[FORM] = wd.train_form_defaults()
st.session_state.setdefault(GEN, 0)
values: dict = st.session_state[FORM]


def field_key(name: str) -> str:
    """The widget key of a field; the preset fields' keys change with each preset chosen."""
    return f"f-{name}-{st.session_state[GEN]}" if name in wd.PRESETS[values["preset"]] else f"f-{name}"


def apply_preset() -> None:
    preset = st.session_state["preset"]
    values.update(preset=preset, **wd.PRESETS[preset])
    st.session_state[GEN] += 1


def keep(name: str, value):
    """Remember what a widget shows (the preset's value or what the user typed)."""
    values[name] = value
    return value


with st.expander("Start a new training run", expanded=job is None or not job.active, icon=":material/add:"):
    presets = list(wd.PRESETS)
    st.radio("Preset", presets, index=presets.index(values["preset"]), key="preset", horizontal=True,
             on_change=apply_preset, help="Fills in the fields below; change any of them afterwards.")
    datasets = ui.datasets()
    ids = [d.id for d in datasets]
    wanted = st.query_params.get("dataset")     # "Train on it →" from the Data page
    if wanted not in ids:
        wanted = values["dataset"]
    c = st.columns([3, 3])
    with c[0]:
        ds_id = keep("dataset", st.selectbox(
            "Dataset", ids, index=ids.index(wanted) if wanted in ids else 0, key="f-dataset",
            format_func=lambda i: next(d.describe() for d in datasets if d.id == i)))
        dataset = wd.get_dataset(ui.workspace(), ds_id)
        st.page_link(ui.page_path("data"), label="Upload your own data", icon=":material/upload:")
    with c[1]:
        model_options = ["default", *wd.extra_models(), "folder"]
        labels = {"default": "SmolLM2-135M-Instruct (bundled default)", "folder": "A local model folder…"}
        model_choice = keep("model", st.selectbox(
            "Base model", model_options, key="f-model", format_func=lambda m: labels.get(m, f"Local: {m}"),
            index=model_options.index(values["model"]) if values["model"] in model_options else 0))
        model = model_choice
        if model_choice == "folder":
            model = keep("model_path", st.text_input("Model folder (holds config.json)", value=values["model_path"],
                                                     key="f-model-path",
                                                     placeholder="/path/to/a/huggingface/model"))
    c = st.columns(4)
    quants, updates, samplings = ["nf4", "none"], ["full", "frozen"], ["uniform", "pow2", "low", "high", "list"]
    quant = keep("quant", c[0].radio(
        "Quantization of the base", quants, index=quants.index(values["quant"]), key=field_key("quant"),
        format_func=lambda q: {"nf4": "4-bit NF4 (QLoRA)", "none": "none (full precision)"}[q]))
    methods, scales = list(wd.METHOD_LABELS), list(wd.SCALE_LABELS)
    method = keep("method", c[3].selectbox(
        "Method", methods, index=methods.index(values["method"]), key=field_key("method"), format_func=wd.METHOD_LABELS.get,
        help="QDyLoRA trains all ranks in one run. SVD truncation trains one ordinary LoRA at r_max and cuts each "
             "rank from it afterwards (rank sampling does not apply)."))
    # Rank sampling, update mode and ranks per step exist only for QDyLoRA: with SVD they are not shown and the
    # run gets their defaults (what the user chose stays remembered for when they switch back).
    sampling_applies = method == "qdylora"
    recipe = wd.train_form_defaults(values["preset"])
    update, sampling, rank_list, ranks_per_step = recipe["update"], recipe["rank_sampling"], "", recipe["ranks_per_step"]
    row_steps = recipe["row_steps"]
    if sampling_applies:
        update = keep("update", c[1].radio(
            "Update mode", updates, index=updates.index(values["update"]), key=field_key("update"),
            format_func=lambda u: {"full": "full (rows 1..b learn)", "frozen": "frozen (only row b)"}[u],
            help="DyLoRA's two variants: 'full' trains all active rows each step, 'frozen' only the sampled one."))
        sampling = keep("rank_sampling", c[2].selectbox(
            "Rank sampling", samplings, index=samplings.index(values["rank_sampling"]), key=field_key("rank_sampling"),
            help="How the rank b of each training step is drawn from 1..r_max."))
        if sampling == "list":
            rank_list = keep("rank_list", c[2].text_input("Ranks to sample", value=values["rank_list"],
                                                          key="f-rank_list"))
    else:
        c[1].caption("Rank sampling does not apply to SVD truncation: it trains one ordinary LoRA at r_max.")
        sampling = METHOD_RANK_SAMPLING[method]     # what svd records as "one rank, r_max" (qdylora's default is not it)
        scales = [rule for rule in scales if rule not in PER_ROW_RULES]   # QDyLoRA's rules (svd refuses them)
    c = st.columns([2, 1, 1])
    scale = keep("scale", c[0].selectbox(
        "Scale at rank b", scales, index=scales.index(values["scale"]) if values["scale"] in scales else 0,
        key=field_key("scale"),
        format_func=lambda rule: wd.SCALE_LABELS[rule] if rule else f"recommended for the method: {wd.SCALE_LABELS[METHOD_SCALE[method]]}",
        help="How strongly rank b's adapter is applied; exported exactly to PEFT."))
    # ui.number_field: out-of-range entries reach train_problems below instead of staying in the browser.
    limits = wd.TRAIN_LIMITS
    if sampling_applies:
        ranks_per_step = keep("ranks_per_step", ui.number_field(
            c[1], "Ranks per step", int(values["ranks_per_step"]), limits["ranks_per_step"], key=field_key("ranks_per_step"),
            step=1, help="Each step splits its examples into this many groups, each trained at its own rank (no extra cost)."))
        row_rules = list(wd.ROW_STEPS_LABELS)
        row_steps = keep("row_steps", c[2].selectbox(
            "Rows a step did not train", row_rules,
            index=row_rules.index(values["row_steps"]) if values.get("row_steps") in row_rules else 0, key=field_key("row_steps"),
            format_func=lambda rule: wd.ROW_STEPS_LABELS[rule] if rule
            else f"recommended for the method: {wd.ROW_STEPS_LABELS[METHOD_ROW_STEPS[method]]}",
            help="What the optimizer does to the adapter rows above a step's rank (bench/README.md §6.7)."))
    st.caption(RECIPE_EVIDENCE)
    c = st.columns(4)
    r_max = keep("r_max", ui.number_field(c[0], "r_max (largest rank)", int(values["r_max"]), limits["r_max"],
                                          key=field_key("r_max"), step=1))
    alpha = keep("alpha", ui.number_field(c[1], "α (alpha)", float(values["alpha"]), limits["alpha"],
                                          key=field_key("alpha"), step=1.0,
                                          help="The adapter's scale at rank b is computed from α by the scale rule."))
    steps = keep("steps", ui.number_field(c[2], "Steps", int(values["steps"]), limits["steps"], key=field_key("steps"),
                                          step=10))
    batch = keep("batch_size", ui.number_field(c[3], "Batch size", int(values["batch_size"]), limits["batch_size"],
                                               key=field_key("batch_size"), step=1))
    c = st.columns(4)
    lr = keep("lr", ui.number_field(c[0], "Learning rate", float(values["lr"]), limits["lr"], key=field_key("lr"),
                                    step=1e-4, format="%.5f"))
    max_length = keep("max_length", ui.number_field(c[1], "Max length (tokens)", int(values["max_length"]),
                                                    limits["max_length"], key=field_key("max_length"), step=32))
    grad_accum = keep("grad_accum", ui.number_field(c[2], "Gradient accumulation", int(values["grad_accum"]),
                                                    limits["grad_accum"], key="f-grad_accum", step=1))
    name = keep("name", c[3].text_input("Run name", value=values["name"], max_chars=60, key="f-name"))
    c = st.columns(4)
    processes = keep("processes", ui.parallel_choice(
        c[0], "Training processes", "f-processes", values.get("processes", 1),
        help="Data-parallel training through Accelerate: each process takes an equal share of every batch (the batch "
             "size must divide by it) and they train the same adapter as one process would. One process per GPU; "
             "on CPU they share the cores, so expect a small gain (docs/SCALING.md)."))
    compile_layers = keep("compile", c[1].checkbox(
        "Compile the model (long runs)", value=bool(values.get("compile", False)), key="f-compile",
        help="torch.compile fuses the small operations of each layer: on a 2-core CPU steps were ~1.27× faster, after "
             "about 2.5 minutes of compiling the first time (~40 s once this machine has compiled it), so it pays "
             "off from roughly 210 steps (~65 then) and slows a short demo run. Needs a C++ compiler (bench/README.md §4.3)."))

    form = wd.TrainForm(dataset=dataset, model=model, quant=quant, r_max=int(r_max), alpha=float(alpha),
                        rank_sampling=sampling, rank_list=rank_list, update=update, steps=int(steps),
                        batch_size=int(batch), lr=float(lr), max_length=int(max_length), grad_accum=int(grad_accum),
                        method=method, scale=scale, row_steps=row_steps, ranks_per_step=int(ranks_per_step),
                        processes=int(processes), compile=bool(compile_layers))
    problems = wd.train_problems(form)

    # -------- estimate before launch
    try:
        cache = None
        if model == "default":
            from core.model_spec import DEFAULT_MODEL_NAME, cache_root
            cache = cache_root() / "models" / DEFAULT_MODEL_NAME
        shape = model_shape(model, cache) if (model == "default" or not wd.check_model_folder(model)) else None
    except (ValueError, KeyError, TypeError, OSError):
        shape = None
    if shape is not None and not problems:
        est = estimate_training(shape, quant=quant, r_max=int(r_max), batch_size=int(batch),
                                max_length=int(max_length), steps=int(steps), grad_accum=int(grad_accum),
                                tokens_per_example=dataset.tokens_per_example if dataset else None,
                                rank_sampling=sampling)
        m = st.columns(4)
        m[0].metric("Estimated time", ui.duration(est.total_seconds),
                    help=f"between {ui.duration(est.total_low)} and {ui.duration(est.total_high)}")
        m[1].metric("Per step", f"{est.seconds_per_step:.2g} s")
        m[2].metric("Estimated memory", f"{est.memory_mb / 1024:.1f} GB")
        m[3].metric("Adapter parameters at r_max", f"{est.adapter_params / 1e6:.2f} M")
        st.caption(f"An estimate, calibrated on a 2-core CPU with the default model. {ACCURACY_NOTE} "
                   + " ".join(est.notes)
                   + (" It is for uncompiled steps: compiling adds its own minutes first and then shortens each step."
                      if compile_layers else ""))
    for p in problems:
        st.error(p, icon=":material/block:")
    if st.button("Start training", type="primary", disabled=bool(problems), icon=":material/play_arrow:"):
        try:
            new = store.submit("train", name or "run", wd.train_args(form))
        except UserError as exc:
            st.error(str(exc))
        else:
            ui.go_to("train", run=new.id)
