"""Data: the sample data or an upload → column mapping → preview → validation → a
dataset (training examples + held-out evaluation prompts) stored in the workspace."""
from __future__ import annotations

import streamlit as st

from app import ui
from core import workspace_data as wd
from core.data import validate_upload
from core.errors import DataError, UserError

st.title("Data")
st.markdown("Training examples are pairs of a **prompt** and the **answer** the model should learn "
            "(or chat `messages`). Evaluation prompts are held back from training: the sweep measures "
            "every rank on them.")

limit = wd.max_upload_bytes()


@st.cache_data(show_spinner=False, max_entries=8)
def inspect(raw: bytes, name: str, max_bytes: int) -> wd.UploadInspection:
    return wd.inspect_upload(raw, name, max_bytes)


@st.cache_data(show_spinner=False, max_entries=8)
def validate(raw: bytes, name: str, kind: str, max_bytes: int, columns: tuple) -> tuple[str | None, dict]:
    """(error message or None, {"n", "skipped", "warnings"}) of a full parse."""
    try:
        parsed = validate_upload(raw, name, kind=kind, max_bytes=max_bytes, **dict(columns))
    except (DataError, UserError) as exc:
        return str(exc), {}
    return None, {"n": len(parsed), "skipped": parsed.skipped, "warnings": getattr(parsed, "warnings", [])}


def show_error(exc: Exception) -> None:
    st.error(f"**This file cannot be used.** {exc}", icon=":material/error:")


def source_picker(label: str, key: str, sample_files: tuple[str, ...], kind: str):
    """Sample file or upload → (bytes, file name) or (None, None)."""
    choice = st.radio(label, ["Sample data", "Upload a file"], horizontal=True, key=f"{key}-src")
    if choice == "Sample data":
        name = st.selectbox("Sample file", sample_files, key=f"{key}-sample",
                            help="Quillhaven Care: a fictional coffee-machine maker (see sample_data/README.md)")
        return (wd.SAMPLE_DIR / name).read_bytes(), name
    up = st.file_uploader(f"{kind} file (JSONL, JSON, CSV or TSV, UTF-8, up to {limit / 2**20:.0f} MB)",
                          type=["jsonl", "json", "csv", "tsv"], key=f"{key}-upload")
    if up is None:
        return None, None
    return up.getvalue(), up.name


def column_choice(label: str, columns: list[str], wanted: str, key: str, optional: bool = False):
    options = ([None] if optional else []) + columns
    guess = wd.guess_column(columns, wanted)
    index = options.index(guess) if guess in options else 0
    return st.selectbox(label, options, index=index, key=key,
                        format_func=lambda c: "(none)" if c is None else c)


# ---------------------------------------------------------------- training file
st.header("1 · Training examples")
raw, name = source_picker("Where do the training examples come from?", "train", wd.SAMPLE_TRAIN_FILES, "Training")
mapping = {}
train_ok = None
if raw is not None:
    try:
        insp = inspect(raw, name, limit)
    except DataError as exc:
        show_error(exc)
        insp = None
    if insp is not None:
        st.caption(f"`{insp.name}` · {insp.size / 1024:.1f} KB · {insp.format.upper()} · columns: "
                   + ", ".join(f"`{c}`" for c in insp.columns))
        if insp.chat:
            st.markdown("Chat format (`messages`): the last assistant message is the answer; no columns to map.")
        else:
            c1, c2 = st.columns(2)
            with c1:
                mapping["prompt_col"] = column_choice("Prompt column", insp.columns, "prompt", "map-prompt")
            with c2:
                mapping["response_col"] = column_choice("Answer column", insp.columns, "response", "map-response")
        st.dataframe(wd.preview_table(insp.preview), hide_index=True, height=240)
        if not insp.chat and mapping["prompt_col"] == mapping["response_col"]:
            st.error("The prompt and the answer must be different columns.")
        else:
            error, result = validate(raw, name, "train", limit, tuple(sorted(mapping.items())))
            if error:
                show_error(error)
            else:
                train_ok = result
                msg = f"All good: **{result['n']} examples** can be used."
                if result["skipped"]:
                    rows = ", ".join(str(s.get("row") or s.get("line")) for s in result["skipped"][:10])
                    msg += f" {len(result['skipped'])} empty row(s) will be skipped (rows/lines {rows})."
                st.success(msg, icon=":material/check_circle:")

# ---------------------------------------------------------------- evaluation
st.header("2 · Evaluation prompts")
mode = st.radio("Evaluation prompts", ["Hold out part of the training examples", "Use a separate evaluation set"],
                key="eval-mode", horizontal=True, label_visibility="collapsed")
eval_raw = eval_name = None
eval_cols: dict = {}
eval_ok = True
fraction = None
if mode.startswith("Hold out"):
    pct = st.slider("Share of examples held out for evaluation", 5, 50, 10, step=5, format="%d%%", key="eval-pct")
    fraction = pct / 100
    if train_ok is not None:
        n_eval = max(1, round(train_ok["n"] * fraction))
        st.caption(f"{n_eval} examples become evaluation prompts (their answers are the references); "
                   f"{train_ok['n'] - n_eval} are used for training.")
else:
    eval_raw, eval_name = source_picker("Where does the evaluation set come from?", "eval", wd.SAMPLE_EVAL_FILES,
                                        "Evaluation")
    eval_ok = False
    if eval_raw is not None:
        try:
            einsp = inspect(eval_raw, eval_name, limit)
        except DataError as exc:
            show_error(exc)
        else:
            c = st.columns(4)
            with c[0]:
                eval_cols["prompt_col"] = column_choice("Prompt column", einsp.columns, "prompt", "emap-prompt")
            with c[1]:
                eval_cols["reference_col"] = column_choice("Reference answer column", einsp.columns, "reference",
                                                           "emap-ref")
            with c[2]:
                id_col = column_choice("Id column", einsp.columns, "id", "emap-id", optional=True)
            with c[3]:
                must = column_choice("Must-include facts column", einsp.columns, "must_include", "emap-must",
                                     optional=True)
            eval_cols["id_col"] = id_col or "id"
            eval_cols["must_include_col"] = must or "must_include"
            st.dataframe(wd.preview_table(einsp.preview), hide_index=True, height=200)
            error, result = validate(eval_raw, eval_name, "eval", limit, tuple(sorted(eval_cols.items())))
            if error:
                show_error(error)
            else:
                eval_ok = True
                st.success(f"All good: **{result['n']} evaluation prompts**.", icon=":material/check_circle:")
                for w in result["warnings"][:5]:
                    st.caption(f"Note: {w}")

# ---------------------------------------------------------------- save
st.header("3 · Save the dataset")
default_name = (name or "dataset").rsplit(".", 1)[0]
ds_name = st.text_input("Dataset name", value=default_name, max_chars=60, key=f"ds-name-{default_name}",
                        help="Letters, digits, dots, dashes and underscores are kept; anything else becomes '-'.")
ready = train_ok is not None and eval_ok and bool(ds_name.strip())
if st.button("Save dataset", type="primary", disabled=not ready, icon=":material/save:"):
    try:
        info = wd.create_dataset(ui.workspace(), ds_name, raw, name, **mapping, eval_fraction=fraction,
                                 eval_raw=eval_raw, eval_filename=eval_name, eval_columns=eval_cols or None,
                                 max_bytes=limit)
    except (DataError, UserError) as exc:
        show_error(exc)
    else:
        st.session_state["saved-dataset"] = info.id
        st.query_params["dataset"] = info.id
if not ready:
    st.caption("Choose a valid training file and evaluation prompts first.")
saved = st.session_state.get("saved-dataset")
if saved:
    info = wd.get_dataset(ui.workspace(), saved)
    if info:
        st.success(f"Saved **{info.name}**: {info.n_train} training examples, {info.n_eval} evaluation prompts.",
                   icon=":material/check_circle:")
        st.page_link(ui.page_path("train"), label="Train on it →", icon=":material/model_training:",
                     query_params={"dataset": info.id})

# ---------------------------------------------------------------- datasets
st.header("Datasets in the workspace")
all_ds = ui.datasets()
if all_ds:
    ids = [d.id for d in all_ds]
    wanted = st.query_params.get("dataset")
    pick = st.selectbox("Dataset", ids, index=ids.index(wanted) if wanted in ids else 0, key="ds-view",
                        format_func=lambda i: next(d.describe() for d in all_ds if d.id == i))
    info = next(d for d in all_ds if d.id == pick)
    tr, ev = wd.dataset_preview(info)
    t1, t2 = st.tabs([f"Training ({info.n_train})", f"Evaluation ({info.n_eval})"])
    t1.dataframe(tr, hide_index=True, height=220)
    t2.dataframe(ev, hide_index=True, height=220)
    st.page_link(ui.page_path("train"), label=f"Train on {info.name} →", icon=":material/model_training:",
                 query_params={"dataset": info.id})
