"""An AppTest for every page, through the router (app/main.py).

Jobs come from a real JobStore whose CLI is tests/fake_cli.py (seconds, no model); their
folders are then filled with hand-made results that follow docs/ARCHITECTURE.md.
Launch buttons are checked at the core boundary: `JobStore.submit` records the CLI
arguments and starts the fake CLI instead of training.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.jobs import JobStore
from core import workspace_data as wd
from tests.sweep_fixtures import make_export, make_run, make_sweep

ROOT = Path(__file__).resolve().parents[1]
MAIN = str(ROOT / "app" / "main.py")
FAST = ["--steps", "1", "--step-s", "0.01"]


def _wait(store, job_id, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = store.get(job_id)
        if not job.active:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """An empty workspace; the app's job store runs the fake CLI and records submissions."""
    from app import ui

    ws = tmp_path / "ws"
    monkeypatch.setenv("RANK_STUDIO_WORKSPACE", str(ws))
    store = JobStore(ws, python=sys.executable, cli_module="tests.fake_cli", poll_interval=0.05)
    submitted: list[dict] = []
    real_submit = store.submit

    def submit(kind, name, cli_args, parent_id=None):
        submitted.append({"kind": kind, "name": name, "args": [str(a) for a in cli_args], "parent_id": parent_id})
        return real_submit(kind, name, FAST, parent_id=parent_id)

    store.submit = submit
    store.submitted = submitted
    store.real_submit = real_submit
    monkeypatch.setattr(ui, "store", lambda: store)
    from core import workspace_data as wd

    wd.ensure_sample_dataset(ws)
    yield store
    for job in store.list():
        if job.active:
            store.cancel(job.id, force=True)


def run_and_sweep(store, **sweep_options):
    """A finished run on the sample data and its finished sweep (tests/sweep_fixtures.py)."""
    from core import workspace_data as wd

    data = wd.get_dataset(store.workspace, wd.SAMPLE_DATASET)
    run = _wait(store, store.real_submit("train", "demo run", FAST).id)
    make_run(run.out_dir, data.train_path)
    sweep = _wait(store, store.real_submit("sweep", "demo sweep", FAST, parent_id=run.id).id)
    make_sweep(sweep.out_dir, run.out_dir, **sweep_options)
    return run, sweep


@pytest.fixture
def results(workspace):
    """A finished run, its finished sweep and an export of rank 2."""
    store = workspace
    run, sweep = run_and_sweep(store)
    export = _wait(store, store.real_submit("export", "demo export", FAST, parent_id=run.id).id)
    make_export(export.out_dir, run.out_dir, sweep.out_dir)
    return store, run, sweep, export


def app(page: str | None = None, **params) -> AppTest:
    at = AppTest.from_file(MAIN, default_timeout=60)
    for k, v in params.items():
        at.query_params[k] = str(v)
    at.run()
    if page:
        at.switch_page(f"../pages/{page}.py")
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def texts(at) -> str:
    parts = [m.value for m in at.markdown] + [m.value for m in at.caption] + [e.value for e in at.success]
    parts += [e.value for e in at.error] + [e.value for e in at.warning] + [e.value for e in at.info]
    parts += [h.value for h in at.header] + [h.value for h in at.subheader] + [h.value for h in at.title]
    return "\n".join(str(p) for p in parts)


def field(widgets, label: str):
    """The widget with this label (the Train page's preset fields change keys with each preset)."""
    matches = [w for w in widgets if w.label == label]
    assert len(matches) == 1, f"no single widget {label!r}; labels: {[w.label for w in widgets]}"
    return matches[0]


def button(at, label: str):
    matches = [b for b in at.button if b.label == label]
    assert matches, f"no button {label!r}; buttons: {[b.label for b in at.button]}"
    return matches[0]


# ---------------------------------------------------------------- Home


def test_home_empty_workspace_points_to_the_first_steps(workspace):
    at = app()
    assert at.title[0].value == "Rank Studio"
    assert "Nothing yet" in texts(at)


def test_home_lists_jobs_with_status_model_and_best_rank(results):
    store, run, sweep, export = results
    at = app()
    body = texts(at)
    for name in ("demo-run", "demo-sweep", "demo-export"):
        assert name in body
    assert ":green-badge[finished]" in body and "SmolLM2-135M-Instruct" in body and "rank 2" in body
    assert len([b for b in at.button if b.label == "Open"]) == 3


def test_home_delete_asks_first(results):
    store, run, sweep, export = results
    at = app()
    at.button(key=f"home-delete-{export.id}").click().run()
    assert "cannot be undone" in texts(at)
    assert any(j.id == export.id for j in store.list())          # not yet
    at.button(key=f"home-really-{export.id}").click().run()
    assert all(j.id != export.id for j in store.list())
    assert not export.out_dir.exists()


def test_home_shows_died_job_with_resume_and_queue(workspace):
    store = workspace
    died = _wait(store, store.real_submit("train", "crashed", ["--steps", "1", "--fail-at", "1"]).id)
    assert died.status == "failed"
    at = app()
    body = texts(at)
    assert "crashed" in body and ":red-badge[failed]" in body
    assert any("boom" in e.value or "failed" in e.value for e in at.error)
    at.button(key=f"home-resume-{died.id}").click().run()
    assert store.get(died.id).status in ("queued", "running", "completed", "failed")


# ---------------------------------------------------------------- Data


def test_data_page_validates_the_sample_and_saves_a_dataset(workspace):
    at = app("data")
    assert any("343 examples" in s.value for s in at.success)
    at.text_input(key="ds-name-train").set_value("my data").run()
    button(at, "Save dataset").click().run()
    assert not at.exception
    from core import workspace_data as wd

    saved = [d for d in wd.list_datasets(workspace.workspace) if d.name == "my data"]
    assert saved and saved[0].n_eval == round(343 * 0.1) and saved[0].n_train == 343 - saved[0].n_eval
    assert any("Saved" in s.value for s in at.success)


def test_data_page_maps_csv_columns_and_separate_eval_set(workspace):
    at = app("data")
    at.selectbox(key="train-sample").set_value("train.csv").run()
    assert at.selectbox(key="map-prompt").value == "question"
    assert at.selectbox(key="map-response").value == "answer"
    assert any("60 examples" in s.value for s in at.success)
    at.selectbox(key="map-response").set_value("question").run()
    assert any("different columns" in e.value for e in at.error)
    at.selectbox(key="map-response").set_value("answer").run()
    at.radio(key="eval-mode").set_value("Use a separate evaluation set").run()
    at.selectbox(key="eval-sample").set_value("eval.csv").run()
    assert any("66 evaluation prompts" in s.value for s in at.success)


# ---------------------------------------------------------------- Train


def test_train_page_shows_estimate_and_launches_with_the_form_values(workspace):
    at = app("train")
    assert at.radio(key="preset").value.startswith("Quick demo")
    assert any(m.label == "Estimated time" for m in at.metric)
    assert not at.error
    at.radio(key="preset").set_value("Standard").run()
    assert field(at.number_input, "r_max (largest rank)").value == 64
    field(at.number_input, "Steps").set_value(7).run()
    button(at, "Start training").click().run()
    sub = workspace.submitted[-1]
    assert sub["kind"] == "train"
    args = sub["args"]
    assert args[args.index("--r-max") + 1] == "64" and args[args.index("--steps") + 1] == "7"
    standard = wd.PRESETS["Standard"]
    assert args[args.index("--alpha") + 1] == str(standard["alpha"]) and args[args.index("--lr") + 1] == str(standard["lr"])
    assert args[args.index("--method") + 1] == standard["method"]
    assert "--scale" not in args and standard["scale"] is None      # the method's recommended rule
    assert "--row-steps" not in args and standard["row_steps"] is None
    assert args[args.index("--rank-sampling") + 1] == standard["rank_sampling"] == "pow2"
    assert args[args.index("--model") + 1] == "default"
    assert args[args.index("--data") + 1].endswith("sample-quillhaven/train.jsonl")


def test_train_page_passes_the_chosen_row_steps_and_refuses_them_with_frozen_updates(workspace):
    at = app("train")
    field(at.selectbox, "Rows a step did not train").set_value("balanced").run()
    button(at, "Start training").click().run()
    args = workspace.submitted[-1]["args"]
    assert args[args.index("--row-steps") + 1] == "balanced"
    field(at.radio, "Update mode").set_value("frozen").run()
    assert any("row_steps 'hold'" in e.value for e in at.error), [e.value for e in at.error]


def test_train_page_compiles_only_when_asked_and_says_the_estimate_is_for_uncompiled_steps(workspace, monkeypatch):
    from core import compiling

    monkeypatch.setattr(compiling.shutil, "which", lambda name: "/usr/bin/" + name)   # whether or not this machine has g++
    at = app("train")
    assert at.checkbox(key="f-compile").value is False
    button(at, "Start training").click().run()
    assert "--compile" not in workspace.submitted[-1]["args"]
    at.checkbox(key="f-compile").check().run()
    assert any("uncompiled steps" in c.value for c in at.caption)
    button(at, "Start training").click().run()
    assert "--compile" in workspace.submitted[-1]["args"]


def test_train_form_keeps_preset_and_typed_values_through_reruns_and_page_switches(workspace):
    """α and the learning rate are never typed here; they must stay the preset's, not
    fall to the widgets' min_value, and typed values must survive leaving the page."""
    at = app("train")

    def shown() -> dict:
        return {label: field(at.number_input, label).value
                for label in ["r_max (largest rank)", "α (alpha)", "Learning rate", "Steps"]}

    presets = list(wd.PRESETS.values())
    assert all(p["lr"] > 1e-6 and p["alpha"] > 1 for p in presets)  # well above the widgets' minimum values
    quick = {"r_max (largest rank)": 16, "α (alpha)": presets[0]["alpha"], "Learning rate": presets[0]["lr"], "Steps": 40}
    assert shown() == quick
    field(at.number_input, "Steps").set_value(4).run()
    assert shown() == {**quick, "Steps": 4}
    at.switch_page("../pages/data.py").run()
    at.switch_page("../pages/train.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert shown() == {**quick, "Steps": 4}
    at.radio(key="preset").set_value("Standard").run()
    standard = {"r_max (largest rank)": 64, "α (alpha)": presets[1]["alpha"], "Learning rate": presets[1]["lr"], "Steps": 300}
    assert shown() == standard
    field(at.number_input, "r_max (largest rank)").set_value(8).run()
    at.switch_page("../pages/home.py").run()
    at.switch_page("../pages/train.py").run()
    assert at.radio(key="preset").value == "Standard"
    assert shown() == {**standard, "r_max (largest rank)": 8}
    assert not at.warning, [w.value for w in at.warning]
    button(at, "Start training").click().run()
    args = workspace.submitted[-1]["args"]
    assert args[args.index("--alpha") + 1] == str(presets[1]["alpha"]) and args[args.index("--lr") + 1] == str(presets[1]["lr"])
    assert args[args.index("--r-max") + 1] == "8" and args[args.index("--steps") + 1] == "300"


def test_train_page_refuses_bad_values_before_launch(workspace, tmp_path):
    at = app("train")
    at.selectbox(key="f-model").set_value("folder").run()
    at.text_input(key="f-model-path").set_value(str(tmp_path / "nowhere")).run()
    assert any("does not exist" in e.value for e in at.error)
    assert button(at, "Start training").disabled
    (tmp_path / "empty-model").mkdir()
    at.text_input(key="f-model-path").set_value(str(tmp_path / "empty-model")).run()
    assert any("no config.json" in e.value for e in at.error)
    at.selectbox(key="f-model").set_value("default").run()
    field(at.selectbox, "Method").set_value("qdylora").run()   # rank sampling applies to QDyLoRA only
    field(at.selectbox, "Rank sampling").set_value("list").run()
    at.text_input(key="f-rank_list").set_value("1,99").run()
    assert any("rank_list entries" in e.value.lower() for e in at.error)
    assert button(at, "Start training").disabled
    assert workspace.submitted == []


def test_train_page_shows_rank_sampling_only_for_qdylora(workspace):
    at = app("train")
    labels = lambda: {w.label for w in [*at.selectbox, *at.radio, *at.number_input]}
    assert {"Rank sampling", "Update mode", "Ranks per step"} <= labels()
    field(at.selectbox, "Rank sampling").set_value("high").run()
    field(at.selectbox, "Scale at rank b").set_value("alpha/i").run()
    field(at.selectbox, "Method").set_value("svd").run()
    assert not {"Rank sampling", "Update mode", "Ranks per step"} & labels()
    assert "Rank sampling does not apply to SVD truncation: it trains one ordinary LoRA at r_max." in texts(at)
    scale_options = field(at.selectbox, "Scale at rank b").options
    assert wd.SCALE_LABELS["alpha/i"] not in scale_options and wd.SCALE_LABELS["constant"] in scale_options
    assert not at.error, [e.value for e in at.error]
    button(at, "Start training").click().run()
    args = workspace.submitted[-1]["args"]
    assert args[args.index("--method") + 1] == "svd" and "high" not in args and "alpha/i" not in args
    field(at.selectbox, "Method").set_value("qdylora").run()
    assert field(at.selectbox, "Rank sampling").value == "high"   # remembered for when it applies again


def fake_devices(monkeypatch, kind: str, count: int):
    from core import distributed

    names = ("NVIDIA H100 80GB HBM3",) * count if kind == "cuda" else ()
    monkeypatch.setattr(distributed, "find_devices", lambda: distributed.Devices(kind, count, names))


def test_train_page_offers_processes_only_when_there_are_several_devices(workspace, monkeypatch):
    fake_devices(monkeypatch, "cuda", 1)
    at = app("train")
    assert "Devices found: 1 GPU (NVIDIA H100 80GB HBM3): one process." in texts(at)
    assert not [w for w in at.number_input if w.label == "Training processes"]
    button(at, "Start training").click().run()
    assert "--processes" not in workspace.submitted[-1]["args"]

    fake_devices(monkeypatch, "cuda", 2)
    at = app("train")
    assert "Devices found: 2 × NVIDIA H100 80GB HBM3." in texts(at)
    field(at.number_input, "Training processes").set_value(2).run()
    field(at.number_input, "Batch size").set_value(3).run()
    assert any("does not divide by 2 processes" in e.value for e in at.error)
    assert button(at, "Start training").disabled
    field(at.number_input, "Batch size").set_value(4).run()
    button(at, "Start training").click().run()
    args = workspace.submitted[-1]["args"]
    assert args[args.index("--processes") + 1] == "2" and args[args.index("--batch-size") + 1] == "4"


def test_train_page_monitors_a_run(results):
    store, run, sweep, export = results
    at = app("train", run=run.id)
    body = texts(at)
    assert "demo-run" in body and "Training finished" in body
    assert {m.label for m in at.metric} >= {"Loss", "Tokens / s", "Memory"}
    assert len(at.get("plotly_chart")) == 2
    assert any(b.label.startswith("Sweep the ranks") for b in at.button)


# ---------------------------------------------------------------- Sweep


def test_sweep_page_defaults_and_launch(results):
    store, run, sweep, export = results
    at = app("sweep", run=run.id)
    ms = at.multiselect(key=f"sw-ranks-{run.id}")
    assert ms.value == [0, 1, 2, 4]
    at.number_input(key="sw-maxp").set_value(5).run()
    at.checkbox(key="sw-latency").uncheck().run()
    button(at, "Start sweep").click().run()
    sub = store.submitted[-1]
    assert sub["kind"] == "sweep" and sub["parent_id"] == run.id
    args = sub["args"]
    assert args[args.index("--ranks") + 1] == "0,1,2,4" and args[args.index("--latency") + 1] == "off"
    assert args[args.index("--max-prompts") + 1] == "5" and args[args.index("--prompts") + 1].endswith("eval.jsonl")


def test_sweep_page_offers_workers_when_there_are_several_devices(results, monkeypatch):
    store, run, sweep, export = results
    fake_devices(monkeypatch, "cpu", 4)
    at = app("sweep", run=run.id)
    assert "Devices found: 4 CPU cores, no GPU." in texts(at)
    at.number_input(key="sw-workers").set_value(3).run()
    at.multiselect(key=f"sw-ranks-{run.id}").set_value([0, 4]).run()
    assert "3 workers for 2 ranks: one worker per rank will run." in texts(at)
    button(at, "Start sweep").click().run()
    args = store.submitted[-1]["args"]
    assert args[args.index("--workers") + 1] == "3"
    fake_devices(monkeypatch, "cpu", 1)
    at = app("sweep", run=run.id)
    assert "Devices found: 1 CPU core, no GPU: one process." in texts(at) and "sw-workers" not in [w.key for w in at.number_input]


def test_sweep_page_leaves_fact_recall_out_when_the_set_has_no_facts(results):
    from core import workspace_data as wd

    store, run, sweep, export = results
    at = app("sweep", run=run.id)
    assert "fact_recall" in at.multiselect(key="sw-metrics-facts").value       # the sample lists facts
    raw = (ROOT / "sample_data" / "train.jsonl").read_bytes()
    plain = wd.create_dataset(store.workspace, "no facts", raw, "train.jsonl", eval_fraction=0.1)
    at.run()
    at.selectbox(key="sw-ds").set_value(plain.id).run()
    assert at.multiselect(key="sw-metrics-nofacts").value == ["ref_nll", "rouge_l", "similarity"]
    assert "Facts included is off: these evaluation prompts list no must-include facts" in texts(at)
    at.multiselect(key="sw-metrics-nofacts").set_value(["ref_nll", "fact_recall"]).run()
    assert any("will stay empty" in w.value for w in at.warning)


def test_sweep_page_refuses_only_rank_zero(results):
    store, run, sweep, export = results
    at = app("sweep", run=run.id)
    at.multiselect(key=f"sw-ranks-{run.id}").set_value([0]).run()
    assert any("above 0" in e.value for e in at.error)
    assert button(at, "Start sweep").disabled


def test_sweep_page_shows_a_finished_sweep(results):
    store, run, sweep, export = results
    at = app("sweep", sweep=sweep.id, run=run.id)
    assert "Ranks measured" in texts(at)
    assert any(b.label.startswith("Compare the ranks") for b in at.button)


# ---------------------------------------------------------------- Compare


def shown_tables(at) -> list:
    return [d.value for d in at.dataframe]


def table(at, first_column: str):
    """The shown table whose first column is `first_column`."""
    matches = [t for t in shown_tables(at) if len(t.columns) and t.columns[0] == first_column]
    assert len(matches) == 1, [list(t.columns)[:2] for t in shown_tables(at)]
    return matches[0]


def test_compare_page_decides_in_plain_words(results):
    store, run, sweep, export = results
    at = app("compare", sweep=sweep.id)
    decision = at.success[0].value
    assert decision.startswith("### Use rank 2\nRank 2 is within 2 % of the best rank (4) on reference loss, "
                               "2× smaller than rank 4 and as fast when merged.")
    assert "Rank 2 is as good as the best rank, 4 (difference within ±5 %, 95 % confidence)" in decision
    body = texts(at)
    assert "Decided on **reference loss** because it scores the whole reference answer" in body
    assert "All 4 measures agree: rank 2." in body
    assert len(at.get("plotly_chart")) == 3                       # quality, speed, memory
    across = table(at, "Measure")
    assert across["Recommended rank"].tolist() == ["2", "2", "2", "2"] and set(across["Agrees"]) == {"✓"}
    for shown in shown_tables(at):                               # raw column names only in the CSV downloads
        names = " ".join(map(str, shown.columns))
        assert not any(raw in names for raw in ("ref_nll", "_lo", "ttft", "ms_per_token", "adapter_mb")), names
    speed = {m.label: m.value for m in at.metric}
    assert speed["Served merged, per token"] == "412 ms" and speed["With adapter on 4-bit base, per token"] == "3.4 s"
    assert "fastest–slowest run: 3.2–3.6 s" in body
    assert any("what you would serve" in m.value for m in at.markdown)
    downloads = [d.label for d in at.get("download_button")]
    assert "Decision report (HTML)" in downloads and "Download summary.csv (raw numbers)" in downloads
    assert any(b.label == "Export rank 2 →" for b in at.button)


def test_compare_page_reports_each_named_evaluation_set(results):
    store, run, sweep, export = results
    at = app("compare", sweep=sweep.id)
    assert not [t for t in shown_tables(at) if list(t.columns)[:1] == ["Evaluation set"]]  # one unnamed set
    rows = [{"set": name, "rank": b, "ref_nll": nll, "ref_nll_lo": nll - 0.1, "ref_nll_hi": nll + 0.1}
            for name, shift in (("FAQ recall", 0.0), ("new wordings", 0.8)) for b, nll in ((0, 3.9 + shift), (2, 1.2 + shift))]
    import pandas as pd

    pd.DataFrame(rows).to_csv(sweep.out_dir / "summary_by_set.csv", index=False)
    at = app("compare", sweep=sweep.id)
    per_set = table(at, "Evaluation set")
    assert per_set["Evaluation set"].tolist() == ["FAQ recall", "new wordings"]
    assert list(per_set.columns) == ["Evaluation set", "Base model", "Rank 2"]
    assert per_set["Rank 2"].tolist() == ["1.20 (1.10–1.30) nats/token", "2.00 (1.90–2.10) nats/token"]
    assert "recites rather than knows" in texts(at)


def test_compare_page_says_what_is_wrong_with_a_damaged_per_prompt_file(results):
    store, run, sweep, export = results
    path = sweep.out_dir / "per_prompt.csv"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text(lines[0] + "abc" + lines[1][lines[1].index(","):] + "".join(lines[2:]), encoding="utf-8")
    at = app("compare", sweep=sweep.id)               # no exception (app() checks)
    assert any("per_prompt.csv is damaged: row 1 has rank 'abc'" in w.value for w in at.warning), \
        [w.value for w in at.warning]


def test_compare_page_tolerance_and_metric_change_the_decision(results):
    store, run, sweep, export = results
    at = app("compare", sweep=sweep.id)
    at.select_slider(key="cmp-tolerance").set_value(20).run()
    assert at.success[0].value.startswith("### Use rank 1")
    at.selectbox(key="cmp-metric").set_value("rouge_l").run()
    body = texts(at)
    assert "Decided on **word overlap** because you chose it below" in body
    assert "(decides)" in table(at, "Measure")["Measure"].iloc[1]


def test_compare_page_grid_marks_facts_and_filters_degrading_prompts(results):
    store, run, sweep, export = results
    at = app("compare", sweep=sweep.id)
    grid = table(at, "Base model")
    assert list(grid.columns) == ["Base model", "Rank 1", "Rank 2", "Rank 4"] and len(grid) == 8
    assert grid.loc[grid.index[0], "Rank 1"].endswith("✓ Ilse Varga · ✗ 2017")
    at.toggle(key="cmp-grid-degrading").set_value(True).run()
    assert len(table(at, "Base model")) == 8                   # within 5 %: rank 1 falls short everywhere
    at.select_slider(key="cmp-tolerance").set_value(20).run()   # within 20 %: only on e2
    grid = table(at, "Base model")
    assert [i.split(" · ")[0] for i in grid.index] == ["e2"]
    deg = table(at, "Prompt")
    assert deg.iloc[0]["Prompt"].startswith("e2 · ") and deg.iloc[0]["First falls short at"] == "rank 1"
    assert "None" not in " ".join(deg.astype(str).values.ravel())


def test_compare_page_side_by_side_answers_with_facts(results):
    store, run, sweep, export = results
    at = app("compare", sweep=sweep.id)
    at.selectbox(key="cmp-prompt").set_value("e2").run()
    body = texts(at)
    assert "answer of rank 0 to e2" in body and "answer of rank 4 to e2, €89" in body
    assert "✗ €89" in body and "✓ €89" in body


def test_compare_page_says_why_fact_recall_is_missing(workspace):
    import json

    run, sweep = run_and_sweep(workspace, metrics=("ref_nll", "rouge_l"))

    cfg = json.loads((sweep.out_dir / "config.json").read_text())
    cfg["config"]["metrics"] = ["ref_nll", "rouge_l", "fact_recall"]
    (sweep.out_dir / "config.json").write_text(json.dumps(cfg))
    at = app("compare", sweep=sweep.id)
    assert "**Facts included** is not shown: the evaluation set has no must-include facts" in texts(at)


def test_playground_streams_answers_of_several_ranks(results, monkeypatch):
    from core import playground as pg

    monkeypatch.setattr(pg, "CLI_MODULE", "tests.fake_playground")
    store, run, sweep, export = results
    at = app("compare", sweep=sweep.id)
    assert at.multiselect(key="pg-ranks").value == [0, 2, 4]
    at.button(key="pg-ask").click().run()
    assert any("Type a question first" in e.value for e in at.error)
    at.number_input(key="pg-tokens").set_value(9999).run()       # no browser-side limit: the check says why
    at.text_area(key="pg-question").set_value("Where do you ship from?").run()
    at.button(key="pg-ask").click().run()
    assert any("The answer length must be 1 to 512 tokens." in e.value for e in at.error)
    at.number_input(key="pg-tokens").set_value(64).run()
    at.button(key="pg-ask").click().run()
    folder = pg.folder_for(store.workspace, run.out_dir)
    deadline = time.time() + 30
    while (pg.read_answers(folder) or {}).get("status") != "done" and time.time() < deadline:
        time.sleep(0.1)
    at.run()
    body = texts(at)
    assert "**Question:** Where do you ship from?" in body
    for b in (0, 2, 4):
        assert f"answer of rank {b} to: Where do you ship from?" in body
    assert "**Base model**" in body and "**Rank 2 ★**" in body
    at.button(key="pg-stop").click().run()
    deadline = time.time() + 10
    while pg.is_running(pg.worker_state(folder)) and time.time() < deadline:
        time.sleep(0.1)
    assert pg.worker_state(folder)["status"] == "completed"


# ---------------------------------------------------------------- Export


def test_export_page_prefills_the_recommendation_and_launches(results):
    store, run, sweep, export = results
    at = app("export", run=run.id, sweep=sweep.id)
    rank_input = [n for n in at.number_input if n.label == "Rank to export"][0]
    assert rank_input.value == 2
    at.checkbox(key="ex-merge").check().run()
    button(at, "Export").click().run()
    sub = store.submitted[-1]
    assert sub["kind"] == "export" and sub["parent_id"] == run.id
    args = sub["args"]
    assert args[args.index("--rank") + 1] == "2" and "--merge" in args
    assert args[args.index("--sweep") + 1] == str(sweep.out_dir.resolve())


def test_export_page_polishes_the_chosen_rank_as_a_new_training_run(results):
    store, run, sweep, export = results
    at = app("export", run=run.id, sweep=sweep.id)
    [n for n in at.number_input if n.label == "Extra steps"][0].set_value(12).run()
    button(at, "Polish rank 2").click().run()
    assert not at.error, [e.value for e in at.error]
    sub = store.submitted[-1]
    assert sub["kind"] == "train" and sub["parent_id"] == run.id
    args = sub["args"]
    assert args[args.index("--init-from") + 1] == str(run.out_dir.resolve())
    assert args[args.index("--init-rank") + 1] == "2" and args[args.index("--r-max") + 1] == "2"
    assert args[args.index("--steps") + 1] == "12" and args[args.index("--rank-list") + 1] == "2"


def test_export_page_shows_card_snippet_once_and_the_report(results):
    store, run, sweep, export = results
    at = app("export", export=export.id, run=run.id)
    assert any("exported" in s.value for s in at.success)
    downloads = [d.label for d in at.get("download_button")]
    assert "Download adapter + rank card (.zip)" in downloads and "Decision report (HTML)" in downloads
    snippets = [c.value for c in at.code if c.language == "python"]
    assert len(snippets) == 1 and "'HuggingFaceTB/SmolLM2-135M-Instruct'" in snippets[0]
    body = texts(at)
    assert body.count("PeftModel.from_pretrained") == 0                # the snippet is the code block only
    assert "| Reference loss | 1.48 (1.42–1.54) nats/token |" in body and "measured on the 4-bit NF4 base" in body


def test_dashboard_process_never_imports_torch(tmp_path):
    """Pages validate, estimate, decide, write the decision report and ask the playground in
    the server process; torch (~300 MB, seconds) stays in the jobs and the playground worker."""
    code = (
        "import sys, time\n"
        "from streamlit.testing.v1 import AppTest\n"
        "from core import playground as pg\n"
        "from core import workspace_data as wd\n"
        "from core.jobs import JobStore\n"
        "from tests.sweep_fixtures import make_export, make_run, make_sweep\n"
        f"store = JobStore({str(tmp_path / 'ws')!r}, cli_module='tests.fake_cli', poll_interval=0.05)\n"
        "data = wd.ensure_sample_dataset(store.workspace)\n"
        "def done(job):\n"
        "    while store.get(job.id).active:\n"
        "        time.sleep(0.05)\n"
        "    return job\n"
        f"run = done(store.submit('train', 'r', {FAST!r}))\n"
        "make_run(run.out_dir, data.train_path)\n"
        f"sweep = done(store.submit('sweep', 's', {FAST!r}, parent_id=run.id))\n"
        "make_sweep(sweep.out_dir, run.out_dir)\n"
        f"export = done(store.submit('export', 'e', {FAST!r}, parent_id=run.id))\n"
        "make_export(export.out_dir, run.out_dir, sweep.out_dir)\n"
        "pg.CLI_MODULE = 'tests.fake_playground'\n"
        f"at = AppTest.from_file({MAIN!r}, default_timeout=60)\n"
        "at.query_params['export'] = str(export.id)\n"
        "at.run()\n"
        "for page in ('data', 'train', 'sweep', 'compare', 'export'):\n"
        "    at.switch_page(f'../pages/{page}.py')\n"
        "    at.run()\n"
        "    assert not at.exception, [e.value for e in at.exception]\n"
        "    if page == 'compare':\n"
        "        at.text_area(key='pg-question').set_value('Hello?').run()\n"
        "        at.button(key='pg-ask').click().run()\n"
        "        assert 'Decision report (HTML)' in [d.label for d in at.get('download_button')]\n"
        "    if page == 'export':\n"
        "        assert 'Decision report (HTML)' in [d.label for d in at.get('download_button')]\n"
        "pg.stop(pg.folder_for(store.workspace, run.out_dir))\n"
        "from core.evaluation.report import report_for_sweep\n"
        "assert report_for_sweep(sweep.out_dir).charts\n"
        "from core.workspace_data import TrainForm, train_problems\n"
        "problems = train_problems(TrainForm(dataset=None, r_max=8, lr=2.0))\n"
        "assert any('lr' in p.lower() for p in problems), problems\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    import os
    import subprocess

    env = dict(os.environ, RANK_STUDIO_WORKSPACE=str(tmp_path / "ws"), PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["False", "False"]
