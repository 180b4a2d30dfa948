"""core.workspace_data: uploads stored whole or not at all, safe names, launch arguments,
readers of job folders, prompt degradation."""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from core import workspace_data as wd
from core.errors import DataError, UserError

ROOT = Path(__file__).resolve().parents[1]
BAD = ROOT / "sample_data" / "bad"
GOOD = (ROOT / "sample_data" / "train.jsonl").read_bytes()


def stored(ws: Path) -> list[str]:
    return sorted(p.name for p in wd.datasets_dir(ws).iterdir())


@pytest.mark.parametrize("name, raw, words", [
    ("empty.jsonl", b"", "file is empty"),
    ("notes.txt", b"hello", "unknown file type"),
    ("bad.csv", (BAD / "not_utf8.csv").read_bytes(), "not UTF-8"),
    ("bad.jsonl", (BAD / "bad_json_line.jsonl").read_bytes(), "line 3"),
])
def test_inspect_upload_names_the_problem(name, raw, words):
    with pytest.raises(DataError) as exc:
        wd.inspect_upload(raw, name)
    assert words in str(exc.value)
    assert "/tmp/" not in str(exc.value)                       # the user's name, not a temp path


def test_inspect_upload_size_limit_and_columns():
    with pytest.raises(DataError, match="upload limit"):
        wd.inspect_upload(GOOD, "train.jsonl", max_bytes=1000)
    insp = wd.inspect_upload((ROOT / "sample_data" / "train.csv").read_bytes(), "train.csv")
    assert insp.columns == ["question", "answer"] and len(insp.preview) == 20 and not insp.chat
    assert wd.guess_column(insp.columns, "prompt") == "question" and wd.guess_column(insp.columns, "response") == "answer"
    assert wd.inspect_upload((ROOT / "sample_data" / "train_chat.jsonl").read_bytes(), "c.jsonl").chat


@pytest.mark.parametrize("file, cols, words", [
    ("missing_column.csv", {"prompt_col": "question", "response_col": "answer"}, "'answer'"),
    ("missing_response.jsonl", {}, "line 2"),
    ("empty_response.jsonl", {}, "line 4"),
    ("empty.jsonl", {}, "empty"),
])
def test_bad_training_files_store_nothing(tmp_path, file, cols, words):
    with pytest.raises(DataError) as exc:
        wd.create_dataset(tmp_path, "x", (BAD / file).read_bytes(), file, **cols)
    assert words in str(exc.value)
    assert stored(tmp_path) == []


def test_bad_eval_file_stores_nothing(tmp_path):
    with pytest.raises(DataError, match="duplicate id"):
        wd.create_dataset(tmp_path, "x", GOOD, "train.jsonl", eval_raw=(BAD / "eval_duplicate_ids.jsonl").read_bytes(),
                          eval_filename="eval.jsonl")
    with pytest.raises(UserError, match="evaluation"):
        wd.create_dataset(tmp_path, "x", GOOD, "train.jsonl", eval_fraction=0)
    assert stored(tmp_path) == []


def test_dataset_split_names_and_contents(tmp_path):
    info = wd.create_dataset(tmp_path, "../../etc/my data!", GOOD, "../../evil name.jsonl", eval_fraction=0.1)
    assert info.folder.parent == wd.datasets_dir(tmp_path) and info.id == "etc-my-data"
    assert info.n_eval == 34 and info.n_train == 309
    assert [p.name for p in (info.folder / "original").iterdir()] == ["evil-name.jsonl"]
    rows = [json.loads(line) for line in info.eval_path.read_text().splitlines()]
    assert rows[0].keys() == {"id", "prompt", "reference", "must_include"} and rows[0]["id"].startswith("train-")
    again = wd.create_dataset(tmp_path, "../../etc/my data!", GOOD, "t.jsonl")
    assert again.id == "etc-my-data-2"
    assert [d.id for d in wd.list_datasets(tmp_path)][:2] == ["etc-my-data-2", "etc-my-data"]
    assert wd.get_dataset(tmp_path, "../etc-my-data") is None


def test_csv_with_mapping_and_separate_eval(tmp_path):
    info = wd.create_dataset(tmp_path, "csv", (ROOT / "sample_data" / "train.csv").read_bytes(), "train.csv",
                             prompt_col="question", response_col="answer",
                             eval_raw=(ROOT / "sample_data" / "eval.csv").read_bytes(), eval_filename="eval.csv")
    assert (info.n_train, info.n_eval) == (60, 66)
    first = json.loads(info.train_path.read_text().splitlines()[0])
    assert set(first) == {"prompt", "response"}
    assert json.loads(info.eval_path.read_text().splitlines()[0])["must_include"] == ["Leipzig", "2017"]


def test_sample_dataset_is_made_once(tmp_path):
    a = wd.ensure_sample_dataset(tmp_path)
    b = wd.ensure_sample_dataset(tmp_path)
    assert a.id == b.id == wd.SAMPLE_DATASET and a.sample and (a.n_train, a.n_eval) == (343, 66 + 48)
    assert stored(tmp_path) == [wd.SAMPLE_DATASET]
    from core.data import load_eval_set

    sets = [it.set for it in load_eval_set(a.eval_path).items]   # both sets, interleaved
    assert sets[:4] == ["FAQ recall", "new wordings"] * 2 and sets.count("new wordings") == 48


def test_upload_limit_from_environment(monkeypatch):
    monkeypatch.setenv(wd.MAX_UPLOAD_ENV, "0.001")
    assert wd.max_upload_bytes() == int(0.001 * 2**20)
    with pytest.raises(DataError, match="upload limit"):
        wd.create_dataset(Path("/nonexistent-never-written"), "x", GOOD, "t.jsonl")


def test_train_problems_and_args(tmp_path):
    ds = wd.ensure_sample_dataset(tmp_path)
    form = wd.TrainForm(dataset=ds, r_max=8, steps=5)
    assert wd.train_problems(form) == []
    args = wd.train_args(form)
    assert args[args.index("--data") + 1] == str(ds.train_path.resolve()) and "--no-progress" in args
    assert any("does not exist" in p for p in wd.train_problems(wd.TrainForm(dataset=ds, model=str(tmp_path / "no"))))
    assert any("r max" in p for p in wd.train_problems(wd.TrainForm(dataset=ds, r_max=0)))
    assert any("Lr" in p or "lr" in p for p in wd.train_problems(wd.TrainForm(dataset=ds, lr=0.5)))
    with pytest.raises(UserError):
        wd.train_args(wd.TrainForm(dataset=None))


def test_the_compile_box_reaches_the_command_and_needs_a_compiler(tmp_path, monkeypatch):
    from core import compiling

    ds = wd.ensure_sample_dataset(tmp_path)
    assert "--compile" not in wd.train_args(wd.TrainForm(dataset=ds))
    monkeypatch.setattr(compiling.shutil, "which", lambda name: "/usr/bin/" + name)
    assert "--compile" in wd.train_args(wd.TrainForm(dataset=ds, compile=True))
    monkeypatch.setattr(compiling.shutil, "which", lambda name: None)
    assert any("C++ compiler" in p for p in wd.train_problems(wd.TrainForm(dataset=ds, compile=True)))
    assert wd.train_problems(wd.TrainForm(dataset=ds)) == []


def test_sweep_and_export_args(tmp_path):
    from core.evaluation.sweep import default_ranks

    for r_max in (1, 4, 6, 64):
        assert wd.default_sweep_ranks(r_max) == default_ranks(r_max)
    assert wd.parse_rank_text("4, 0,2,x,99", 8) == ([0, 2, 4], ["'x' is not a whole number", "rank 99 is outside 0..8"])
    args = wd.sweep_args(tmp_path, tmp_path / "e.jsonl", [0, 1], max_prompts=3, max_new_tokens=8,
                         metrics=["rouge_l"], latency=False)
    assert args[args.index("--recommend-metric") + 1] == "rouge_l" and args[args.index("--max-prompts") + 1] == "3"
    with pytest.raises(UserError):
        wd.export_args(tmp_path, 0, merge=False, r_max=4)
    assert "--sweep" not in wd.export_args(tmp_path, 2, merge=True, sweep_dir=tmp_path, r_max=4)


def test_read_run_keeps_the_last_attempt_of_each_step(tmp_path):
    events = [{"event": "start", "total_steps": 3}] + [
        {"event": "step", "step": s, "loss": loss, "rank": r, "tokens_per_s": 1, "mem_mb": 1, "eta_s": 1}
        for s, loss, r in [(1, 3.0, 1), (2, 2.5, 2), (2, 2.4, 3), (3, 2.0, 1)]]
    (tmp_path / "progress.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + '{"event": "st')
    view = wd.read_run(tmp_path)
    assert view.steps["step"].tolist() == [1, 2, 3] and view.steps["loss"].tolist() == [3.0, 2.4, 2.0]
    assert view.histogram == {1: 2, 3: 1} and view.total_steps == 3 and view.fraction == 1.0


def test_prompt_degradation_orders_by_the_rank_where_a_prompt_first_fails():
    rows = []
    for rank in (0, 1, 2, 4, 8):
        rows += [
            {"rank": rank, "id": "a", "prompt": "A", "rouge_l": 0.8},                        # never degrades
            {"rank": rank, "id": "b", "prompt": "B", "rouge_l": 0.8 if rank >= 4 else 0.3},  # fails at 2
            {"rank": rank, "id": "c", "prompt": "C", "rouge_l": 0.8 if rank >= 8 else 0.5},  # fails at 4
        ]
    deg = wd.prompt_degradation(pd.DataFrame(rows), "rouge_l", 0.9)
    assert deg["id"].tolist() == ["c", "b", "a"]
    assert deg["degrades_below"].tolist()[:2] == [4, 2] and pd.isna(deg["degrades_below"].iloc[2])
    nll = pd.DataFrame([{"rank": r, "id": "x", "prompt": "X", "ref_nll": 1.0 + (0.5 if r < 4 else 0)} for r in (1, 2, 4)])
    out = wd.prompt_degradation(nll, "ref_nll", 0.95)
    assert out["degrades_below"].iloc[0] == 2 and out["drop"].iloc[0] == pytest.approx(0.5)


def test_zip_folder_leaves_out_job_logs_and_optionally_merged(tmp_path):
    folder = tmp_path / "exp"
    (folder / "merged").mkdir(parents=True)
    for name in ("adapter_model.safetensors", "rank_card.json", "job.log", "worker.log", "merged/model.safetensors"):
        (folder / name).write_text("x")
    names = zipfile.ZipFile(io.BytesIO(wd.zip_folder(folder, include_merged=False))).namelist()
    assert sorted(names) == ["exp/adapter_model.safetensors", "exp/rank_card.json"]
    assert "exp/merged/model.safetensors" in zipfile.ZipFile(io.BytesIO(wd.zip_folder(folder))).namelist()
