"""The CLI end to end on a tiny model: train → generate → export → PEFT reload; bad input; kill -9."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from core import runstate
from tests.helpers import ROOT, run_cli

BAD = ROOT / "sample_data" / "bad"


def test_train_generate_export_reload(tiny_model_dir, small_train_file, tmp_path):
    run_dir, export_dir = tmp_path / "run", tmp_path / "export"
    res = run_cli("train", "--data", str(small_train_file), "--model", str(tiny_model_dir), "--quant", "nf4",
                  "--r-max", "4", "--steps", "3", "--batch-size", "2", "--max-length", "64", "--out", str(run_dir))
    assert res.returncode == 0, res.stderr
    assert "training" in res.stderr and "3/3" in res.stderr  # the progress bar
    assert sorted(p.name for p in run_dir.iterdir()) == sorted([
        "adapter", "checkpoint", "config.json", "data_report.json", "progress.jsonl", "rank_histogram.json",
        "status.json", "train.log"])
    execution = json.loads((run_dir / "config.json").read_text())["execution"]
    assert execution["threads"]["mode"] == "auto" and execution["threads"]["OMP_WAIT_POLICY"] == "PASSIVE"   # a job (issue 12)

    gen = run_cli("generate", "--run", str(run_dir), "--rank", "2", "--prompt", "Hello?", "--max-new-tokens", "5")
    assert gen.returncode == 0, gen.stderr
    assert "error" not in gen.stdout.lower() and len(gen.stdout.splitlines()) <= 5

    exp = run_cli("export", "--run", str(run_dir), "--rank", "2", "--out", str(export_dir))
    assert exp.returncode == 0, exp.stderr
    assert sorted(p.name for p in export_dir.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "export_config.json", "rank_card.json", "rank_card.md"]
    card = json.loads((export_dir / "rank_card.json").read_text())
    assert card["rank"] == 2 and card["base_model"]["quant"] == "nf4"

    check = subprocess.run(
        [sys.executable, "-c", "import sys; from peft import PeftModel; from transformers import AutoModelForCausalLM;"
         "m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sys.argv[1]), sys.argv[2]);"
         "print(m.peft_config['default'].r)", str(tiny_model_dir), str(export_dir)],
        capture_output=True, text=True, cwd=ROOT)
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == "2"


@pytest.mark.parametrize("name,where", [
    ("bad_json_line.jsonl", "line 3"), ("missing_response.jsonl", "line 2"), ("empty_response.jsonl", "line 4"),
    ("not_utf8.csv", "UTF-8"), ("empty.jsonl", "empty"), ("missing_column.csv", "reply"),
])
def test_bad_data_exits_2_and_leaves_no_run(name, where, tiny_model_dir, tmp_path, cli_in_process):
    extra = ["--prompt-col", "question", "--response-col", "answer"] if name.endswith(".csv") else []
    code, err = cli_in_process("train", "--data", str(BAD / name), *extra, "--model", str(tiny_model_dir), "--out", str(tmp_path / "run"))
    assert code == 2
    assert name in err and where in err
    assert not (tmp_path / "run").exists()


def test_missing_data_file_and_bad_rank(tiny_model_dir, small_train_file, tmp_path, cli_in_process):
    code, err = cli_in_process("train", "--data", str(tmp_path / "nope.jsonl"), "--model", str(tiny_model_dir), "--out", str(tmp_path / "r"))
    assert code == 2 and "nope.jsonl" in err
    code, err = cli_in_process("generate", "--run", str(tmp_path), "--rank", "1", "--prompt", "x")
    assert code == 2 and "not a training run" in err
    run_dir = tmp_path / "run"
    assert cli_in_process("train", "--data", str(small_train_file), "--model", str(tiny_model_dir), "--quant", "none",
                          "--r-max", "4", "--steps", "1", "--batch-size", "2", "--out", str(run_dir), "--no-progress")[0] == 0
    code, err = cli_in_process("generate", "--run", str(run_dir), "--rank", "5", "--prompt", "x")
    assert code == 2 and "r_max=4" in err
    code, err = cli_in_process("train", "--data", str(small_train_file), "--model", str(tiny_model_dir), "--out", str(run_dir))
    assert code == 2 and "already holds files" in err


def test_kill_9_leaves_a_died_run_that_resumes(tiny_model_dir, small_train_file, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "core", "train", "--data", str(small_train_file), "--model", str(tiny_model_dir),
         "--quant", "none", "--r-max", "4", "--steps", "400", "--batch-size", "2", "--max-length", "48",
         "--checkpoint-every", "2", "--out", str(run_dir), "--no-progress"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "checkpoint" / "state.json").is_file():
        time.sleep(0.2)
    assert (run_dir / "checkpoint" / "state.json").is_file(), "no checkpoint appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    status = runstate.read_status(run_dir)
    assert status["status"] == "died" and "resume" in status["error"]
    checkpoint_step = json.loads((run_dir / "checkpoint" / "state.json").read_text())["step"]
    assert checkpoint_step >= 2

    # Resume to a reachable total: shorten the run's planned steps through its own config.
    config = json.loads((run_dir / "config.json").read_text())
    config["train"]["steps"] = checkpoint_step + 2
    (run_dir / "config.json").write_text(json.dumps(config))
    res = run_cli("train", "--out", str(run_dir), "--resume", "--no-progress")
    assert res.returncode == 0, res.stderr
    final = runstate.read_status(run_dir)
    assert final["status"] == "completed" and final["step"] == checkpoint_step + 2
    starts = [e for e in runstate.read_events(run_dir) if e["event"] == "start"]
    assert starts[-1]["resumed"] is True and starts[-1]["step"] == checkpoint_step


def test_sigterm_cancels_cooperatively(tiny_model_dir, small_train_file, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "core", "train", "--data", str(small_train_file), "--model", str(tiny_model_dir),
         "--quant", "none", "--r-max", "4", "--steps", "400", "--batch-size", "2", "--max-length", "48",
         "--out", str(run_dir), "--no-progress"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(e["event"] == "step" for e in runstate.read_events(run_dir)):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    status = runstate.read_status(run_dir)
    assert status["status"] == "cancelled"
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert state["step"] == status["step"] >= 1


def test_train_flags_are_the_config_fields_and_round_trip():
    """Every TrainConfig field has a flag, unset flags keep the config's defaults, and cli_args reproduces a config."""
    from core.cli import build_parser, train_config_from_args
    from core.train_config import TrainConfig

    cfg = TrainConfig(data="d.jsonl", out="o", scale="constant", ranks_per_step=2, rank_sampling="list", rank_list=[1, 3],
                      target_modules=["q_proj", "v_proj"], lr=3e-4, gradient_checkpointing=True, init_from="parent",
                      init_rank=3, r_max=3, weight_decay=0.01, extra_ranks="max", distill=0.25)
    assert train_config_from_args(build_parser().parse_args(["train", *cfg.cli_args(), "--out", "o"]), out="o") == cfg
    defaults = train_config_from_args(build_parser().parse_args(["train", "--data", "d.jsonl", "--out", "o"]), out="o")
    assert defaults == TrainConfig(data="d.jsonl", out="o")


def test_refine_through_the_cli_and_its_bad_input(tiny_model_dir, small_train_file, tmp_path, cli_in_process):
    parent = tmp_path / "parent"
    assert cli_in_process("train", "--data", str(small_train_file), "--model", str(tiny_model_dir), "--quant", "none",
                          "--r-max", "4", "--steps", "1", "--batch-size", "2", "--max-length", "48", "--out", str(parent),
                          "--no-progress")[0] == 0
    for args, message in [
        (["--rank", "5"], "1..4"), (["--rank", "0"], "1..4"), (["--run", str(tmp_path / "nope")], "does not exist"),
    ]:
        base = {"--run": str(parent), "--rank": "2", "--steps": "1", "--out": str(tmp_path / "new")}
        base.update(dict(zip(args[::2], args[1::2])))
        code, err = cli_in_process("refine", *[x for kv in base.items() for x in kv], "--no-progress")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "new").exists()
    for flag, value in [("--scale", "alpha*b"), ("--method", "magic"), ("--extra-ranks", "all"), ("--row-steps", "drift")]:
        code, err = cli_in_process("train", "--data", str(small_train_file), "--model", str(tiny_model_dir), flag, value,
                                   "--out", str(tmp_path / "bad"))
        assert code == 2 and value in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "bad").exists()
    code, err = cli_in_process("refine", "--run", str(parent), "--rank", "2", "--steps", "2", "--lr", "5e-4",
                               "--out", str(tmp_path / "refined"), "--no-progress")
    assert code == 0, err
    config = json.loads((tmp_path / "refined" / "config.json").read_text())
    assert config["train"]["init_from"] == str(parent) and config["train"]["r_max"] == 2
    assert config["train"]["lr"] == 5e-4 and config["train"]["steps"] == 2
    gen = cli_in_process("generate", "--run", str(tmp_path / "refined"), "--rank", "2", "--prompt", "Hi", "--max-new-tokens", "3")
    assert gen[0] == 0
