"""An AppTest for every page, through the router (app/main.py).

Jobs come from a real JobStore whose CLI is tests/fake_cli.py (seconds, no model); their
folders are then filled with hand-made results that follow docs/ARCHITECTURE.md.
Launch buttons are checked at the core boundary: `JobStore.submit` records the CLI
arguments and starts the fake CLI instead of training.
"""
from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.jobs import JobStore
from core import workspace_data as wd

ROOT = Path(__file__).resolve().parents[1]
MAIN = str(ROOT / "app" / "main.py")
FAST = ["--steps", "1", "--step-s", "0.01"]
SUMMARY_COLUMNS = [
    "rank", "ref_nll", "ref_nll_lo", "ref_nll_hi", "ppl", "rouge_l", "rouge_l_lo", "rouge_l_hi",
    "fact_recall", "fact_recall_lo", "fact_recall_hi", "similarity", "similarity_lo", "similarity_hi",
    "ttft_ms", "ms_per_token", "tokens_per_s", "ms_per_token_merged", "adapter_params", "adapter_mb",
    "base_mb", "peak_mem_mb",
]
# ref_nll: best is rank 4 (1.40); at threshold 0.95 the bar is 1.451 → rank 2; at 0.80 → rank 1.
NLL = {0: 2.0, 1: 1.60, 2: 1.45, 4: 1.40}
ROUGE = {0: 0.20, 1: 0.50, 2: 0.60, 4: 0.62}


def _wait(store, job_id, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = store.get(job_id)
        if not job.active:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def _jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _csv(path: Path, columns, rows) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def make_run(folder: Path, data: Path, r_max: int = 4, steps: int = 4) -> None:
    (folder / "config.json").write_text(json.dumps({
        "train": {"data": str(data), "model": "default", "quant": "nf4", "r_max": r_max, "steps": steps},
        "qdylora": {"r_max": r_max, "alpha": 16.0, "dropout": 0.05},
        "model": {"name": "SmolLM2-135M-Instruct", "path": "/models/smol", "quant": "nf4",
                  "compute_dtype": "float32", "device": "cpu"},
    }))
    (folder / "status.json").write_text(json.dumps({"status": "completed", "pid": 1, "step": steps,
                                                     "total_steps": steps, "updated_at": time.time()}))
    ranks = [1, 3, 2, 4]
    _jsonl(folder / "progress.jsonl", [{"event": "start", "step": 0, "total_steps": steps}] + [
        {"event": "step", "step": i + 1, "total_steps": steps, "loss": 3.0 - 0.4 * i, "rank": ranks[i % 4],
         "lr": 2e-4, "tokens_per_s": 90.0, "elapsed_s": 5.0 * (i + 1), "eta_s": 5.0 * (steps - i - 1),
         "mem_mb": 2100.0, "time": time.time()} for i in range(steps)] + [{"event": "end", "status": "completed"}])
    (folder / "rank_histogram.json").write_text(json.dumps({"1": 1, "2": 1, "3": 1, "4": 1}))
    (folder / "adapter").mkdir(exist_ok=True)
    (folder / "adapter" / "adapter.safetensors").write_bytes(b"placeholder")


def make_sweep(folder: Path, run_dir: Path) -> None:
    rows = []
    for b in (0, 1, 2, 4):
        rows.append({
            "rank": b, "ref_nll": NLL[b], "ref_nll_lo": NLL[b] - 0.05, "ref_nll_hi": NLL[b] + 0.05, "ppl": 2.718 ** NLL[b],
            "rouge_l": ROUGE[b], "rouge_l_lo": ROUGE[b] - 0.05, "rouge_l_hi": ROUGE[b] + 0.05,
            "similarity": 0.5 + ROUGE[b] / 2, "similarity_lo": 0.45 + ROUGE[b] / 2, "similarity_hi": 0.55 + ROUGE[b] / 2,
            "ttft_ms": 20 + b, "ms_per_token": 10 + b, "tokens_per_s": 1000 / (10 + b), "ms_per_token_merged": 10,
            "adapter_params": 1000 * b, "adapter_mb": 0.004 * b, "base_mb": 160.0, "peak_mem_mb": 900 + b,
        })
    _csv(folder / "summary.csv", SUMMARY_COLUMNS, rows)
    prompts = {"e1": ("Who founded Quillhaven?", "Ilse Varga founded it."),
               "e2": ("What does the QB-100 cost?", "It costs €89."),
               "e3": ("Opening hours?", "Monday to Friday 08:00 to 18:00.")}
    per = []
    for b in (0, 1, 2, 4):
        for pid, (prompt, ref) in prompts.items():
            worse = pid == "e2" and b < 4      # e2 degrades first
            per.append({"rank": b, "id": pid, "prompt": prompt, "reference": ref,
                        "answer": f"answer of rank {b} to {pid}", "ref_nll": NLL[b] + (0.5 if worse else 0),
                        "rouge_l": ROUGE[b] - (0.3 if worse else 0), "fact_recall": 1.0, "similarity": 0.7})
    _csv(folder / "per_prompt.csv", ["rank", "id", "prompt", "reference", "answer", "ref_nll", "rouge_l",
                                     "fact_recall", "similarity"], per)
    (folder / "sweep.json").write_text(json.dumps({
        "config": {"ranks": [0, 1, 2, 4]}, "run": str(run_dir), "ranks_done": [0, 1, 2, 4],
        "run_meta": {"model": {"name": "SmolLM2-135M-Instruct"}, "r_max": 4},
        "recommendation": {"rank": 2, "metric": "ref_nll", "threshold": 0.95, "reason": "test"},
        "skipped_rows": [], "notes": []}))
    (folder / "config.json").write_text(json.dumps({"config": {"run": str(run_dir), "ranks": [0, 1, 2, 4]}}))
    (folder / "status.json").write_text(json.dumps({"status": "completed", "pid": 1, "updated_at": time.time()}))
    _jsonl(folder / "progress.jsonl", [{"event": "start", "total_units": 12, "done_units": 0},
                                       {"event": "prompt", "rank": 4, "done": 3, "total": 3, "units": 3,
                                        "done_units": 12, "total_units": 12, "eta_s": 0},
                                       {"event": "end", "status": "completed"}])


def make_export(folder: Path, run_dir: Path) -> None:
    card = {"run_id": run_dir.name, "rank": 2, "r_max": 4, "alpha": 16.0, "scale": 8.0,
            "base_model": {"name": "SmolLM2-135M-Instruct", "path": "/models/smol", "quant": "nf4",
                           "compute_dtype": "float32"},
            "adapter_params": 2000, "merged": False, "file_sizes": {"adapter_model.safetensors": 8000},
            "snippet": "from peft import PeftModel\nmodel = PeftModel.from_pretrained(base, 'x')"}
    (folder / "rank_card.json").write_text(json.dumps(card))
    (folder / "rank_card.md").write_text("# Rank card: demo at rank 2\n")
    (folder / "adapter_model.safetensors").write_bytes(b"x" * 10)
    (folder / "adapter_config.json").write_text("{}")


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


@pytest.fixture
def results(workspace):
    """A finished run, its finished sweep and an export of rank 2."""
    from core import workspace_data as wd

    store = workspace
    data = wd.get_dataset(store.workspace, wd.SAMPLE_DATASET)
    run = _wait(store, store.real_submit("train", "demo run", FAST).id)
    make_run(run.out_dir, data.train_path)
    sweep = _wait(store, store.real_submit("sweep", "demo sweep", FAST, parent_id=run.id).id)
    make_sweep(sweep.out_dir, run.out_dir)
    export = _wait(store, store.real_submit("export", "demo export", FAST, parent_id=run.id).id)
    make_export(export.out_dir, run.out_dir)
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
    assert args[args.index("--scale") + 1] == standard["scale"] and args[args.index("--method") + 1] == standard["method"]
    assert args[args.index("--model") + 1] == "default"
    assert args[args.index("--data") + 1].endswith("sample-quillhaven/train.jsonl")


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
    field(at.selectbox, "Rank sampling").set_value("list").run()
    at.text_input(key="f-rank_list").set_value("1,99").run()
    assert any("rank_list entries" in e.value.lower() for e in at.error)
    assert button(at, "Start training").disabled
    assert workspace.submitted == []


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


def test_compare_page_recommends_live(results):
    store, run, sweep, export = results
    at = app("compare", sweep=sweep.id)
    assert any("Recommended rank: 2" in s.value for s in at.success)
    assert len(at.get("plotly_chart")) == 3                       # quality, speed, memory
    assert at.dataframe                                           # all numbers + degradation
    at.slider(key="cmp-threshold").set_value(0.80).run()
    assert any("Recommended rank: 1" in s.value for s in at.success)
    at.selectbox(key="cmp-metric").set_value("rouge_l").run()
    assert any("Recommended rank" in s.value for s in at.success)
    assert any(b.label.startswith("Export rank") for b in at.button)


def test_compare_page_side_by_side_and_degradation(results):
    store, run, sweep, export = results
    at = app("compare", sweep=sweep.id)
    at.selectbox(key="cmp-prompt").set_value("e2").run()
    body = texts(at)
    assert "answer of rank 0 to e2" in body and "answer of rank 4 to e2" in body
    deg = at.dataframe[-1].value
    assert deg.iloc[0]["id"] == "e2"                             # degrades first


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


def test_export_page_shows_card_snippet_and_download(results):
    store, run, sweep, export = results
    at = app("export", export=export.id, run=run.id)
    assert any("exported" in s.value for s in at.success)
    assert at.get("download_button")
    assert any("PeftModel" in c.value for c in at.code)


def test_dashboard_process_never_imports_torch(tmp_path):
    """Pages validate and estimate in the server process; torch (~300 MB, seconds) stays in the jobs."""
    code = (
        "import sys\n"
        "from streamlit.testing.v1 import AppTest\n"
        f"at = AppTest.from_file({MAIN!r}, default_timeout=60)\n"
        "at.run()\n"
        "for page in ('data', 'train', 'sweep', 'compare', 'export'):\n"
        "    at.switch_page(f'../pages/{page}.py')\n"
        "    at.run()\n"
        "    assert not at.exception, [e.value for e in at.exception]\n"
        "from core.workspace_data import TrainForm, train_problems\n"
        "problems = train_problems(TrainForm(dataset=None, r_max=8, lr=2.0))\n"
        "assert any('lr' in p.lower() for p in problems), problems\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    import os
    import subprocess

    env = dict(os.environ, RANK_STUDIO_WORKSPACE=str(tmp_path / "ws"))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["False", "False"]
