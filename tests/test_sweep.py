"""The rank sweep end to end on a tiny model: outputs, cancel/resume, bad input."""
from __future__ import annotations

import csv
import json

import pytest

from core import runstate
from core.errors import DataError, UserError
from core.evaluation.sweep import SUMMARY_COLUMNS, SweepConfig, default_ranks, parse_ranks, run_sweep
from core.train import TrainConfig, train
from tests.helpers import ROOT, randomize_adapter_b

EVAL = ROOT / "sample_data" / "eval.jsonl"


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, small_train_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep-run") / "run"
    train(TrainConfig(data=str(small_train_file), out=str(out), model=str(tiny_model_dir), quant="none",
                      r_max=4, steps=1, batch_size=2, max_length=64))
    randomize_adapter_b(out)
    return out


def quick(run_dir, out, **overrides) -> SweepConfig:
    values = dict(run=str(run_dir), prompts=str(EVAL), out=str(out), ranks=[0, 1, 2, 4], max_prompts=4,
                  max_new_tokens=6, latency_repeats=1, latency_prompts=1, latency_new_tokens=3, n_bootstrap=200)
    values.update(overrides)
    return SweepConfig(**values)


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_sweep_writes_summary_per_prompt_and_recommendation(run_dir, tmp_path):
    events = []
    result = run_sweep(quick(run_dir, tmp_path / "sweep"), on_event=events.append)
    assert result.status == "completed" and result.ranks_done == [0, 1, 2, 4]
    summary = read_csv(tmp_path / "sweep" / "summary.csv")
    assert list(summary[0]) == SUMMARY_COLUMNS
    assert [int(r["rank"]) for r in summary] == [0, 1, 2, 4]
    base, r4 = summary[0], summary[3]
    assert int(base["adapter_params"]) == 0 and int(r4["adapter_params"]) == 4 * int(summary[1]["adapter_params"])
    for row in summary:
        assert float(row["ref_nll_lo"]) <= float(row["ref_nll"]) <= float(row["ref_nll_hi"])
        assert float(row["ms_per_token"]) > 0 and float(row["ms_per_token_merged"]) > 0 and float(row["peak_mem_mb"]) > 0
    # The adapter changes the model, so ranks differ from the base in NLL.
    assert len({round(float(r["ref_nll"]), 6) for r in summary}) == 4
    per_prompt = read_csv(tmp_path / "sweep" / "per_prompt.csv")
    assert len(per_prompt) == 16 and {"answer", "rouge_l", "fact_recall", "similarity"} <= set(per_prompt[0])
    facts = {r["id"]: json.loads(r["must_include"]) for r in per_prompt if r["rank"] == "1"}
    assert facts["e001"] == ["Leipzig", "2017"]                # the facts travel with the answers
    for row in summary:                                        # latency medians come with their spread
        assert float(row["ms_per_token_lo"]) <= float(row["ms_per_token"]) <= float(row["ms_per_token_hi"])
        assert float(row["ms_per_token_merged_lo"]) <= float(row["ms_per_token_merged_hi"])
        assert int(row["latency_runs"]) == 1 and float(row["merged_mb"]) > 0
    sweep = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert sweep["config"]["ranks"] == [0, 1, 2, 4]
    assert sweep["recommendation"]["metric"] == "ref_nll" and "reason" in sweep["recommendation"]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("rank_done") == 4
    assert all("eta_s" in e for e in events if e["event"] == "prompt")
    # the pages' reader takes the sweep's own table back, words and all
    from core.evaluation.summary import read_per_prompt, read_summary

    table = read_summary(tmp_path / "sweep")
    assert list(table["rank"]) == [0, 1, 2, 4] and set(table["quality_path"]) <= {"merged", "unmerged", ""}
    assert len(read_per_prompt(tmp_path / "sweep")) == 16


def test_cancelled_sweep_keeps_finished_ranks_and_resumes(run_dir, tmp_path, cli_in_process):
    out = tmp_path / "sweep"
    done_ranks = []

    def stop_after_first_rank():
        return len(done_ranks) >= 1

    first = run_sweep(quick(run_dir, out, latency=False, metrics=["ref_nll"]),
                      on_event=lambda e: done_ranks.append(e["rank"]) if e["event"] == "rank_done" else None,
                      should_stop=stop_after_first_rank)
    assert first.status == "cancelled" and first.ranks_done == [0]
    assert runstate.read_status(out)["status"] == "cancelled"
    assert [int(r["rank"]) for r in read_csv(out / "summary.csv")] == [0]
    kept = (out / "ranks" / "rank_0.json").read_text()
    # The CLI resumes from the sweep folder alone: its saved config names the run and prompts.
    code, err = cli_in_process("sweep", "--out", str(out), "--resume", "--no-progress")
    assert code == 0, err
    assert runstate.read_status(out)["status"] == "completed"
    assert [int(r["rank"]) for r in read_csv(out / "summary.csv")] == [0, 1, 2, 4]
    assert (out / "ranks" / "rank_0.json").read_text() == kept  # not measured again


@pytest.mark.parametrize("ranks,message", [("0,1,9", "9 is outside 0..4"), ("1,x", "'x' is not an integer"), ("2.5", "not an integer")])
def test_bad_ranks_fail_before_any_work(run_dir, tmp_path, ranks, message):
    with pytest.raises(UserError, match=message):
        run_sweep(quick(run_dir, tmp_path / "sweep", ranks=ranks))
    assert not (tmp_path / "sweep").exists()


def test_sweep_cli_without_run_or_prompts_is_a_usage_error(tmp_path, cli_in_process):
    code, err = cli_in_process("sweep", "--out", str(tmp_path / "sweep"), "--prompts", str(EVAL))
    assert code == 2 and "--run and --prompts are required" in err
    assert not (tmp_path / "sweep").exists()


def test_bad_eval_file_fails_before_any_work(run_dir, tmp_path):
    with pytest.raises(DataError, match="duplicate"):
        run_sweep(quick(run_dir, tmp_path / "sweep", prompts=str(ROOT / "sample_data" / "bad" / "eval_duplicate_ids.jsonl")))
    with pytest.raises(DataError, match="reference"):
        run_sweep(quick(run_dir, tmp_path / "sweep", prompts=str(ROOT / "sample_data" / "bad" / "eval_missing_reference.jsonl")))
    assert not (tmp_path / "sweep").exists()


def test_default_ranks_and_parse():
    assert default_ranks(64) == [0, 1, 2, 4, 8, 16, 32, 64]
    assert default_ranks(12) == [0, 1, 2, 4, 8, 12]
    assert parse_ranks("4, 0,2,2", 8) == [0, 2, 4]
    with pytest.raises(UserError, match="-1 is outside"):
        parse_ranks("-1", 8)


def test_sweep_config_validation():
    with pytest.raises(UserError, match="metrics"):
        SweepConfig(run="r", prompts="p", out="o", metrics=["bleu"])
    with pytest.raises(UserError, match="threshold"):
        SweepConfig(run="r", prompts="p", out="o", threshold=1.5)


def test_recommendation_can_be_redone_without_rerunning(run_dir, tmp_path):
    from core.cli import main
    from core.evaluation.sweep import recommend_from_sweep

    out = tmp_path / "sweep"
    run_sweep(quick(run_dir, out, latency=False, metrics=["ref_nll", "fact_recall"]))
    before = (out / "summary.csv").read_text()
    import pandas as pd

    from core.evaluation.recommend import recommend_rank

    per_prompt = pd.read_csv(out / "per_prompt.csv")
    for threshold in (1.0, 0.5):
        redone = recommend_from_sweep(out, "fact_recall", threshold)
        assert redone.reason == recommend_rank(per_prompt, "fact_recall", threshold, n_resamples=200).reason
    saved = json.loads((out / "sweep.json").read_text())["recommendation"]
    assert saved["reason"] == recommend_from_sweep(out, "ref_nll", 0.95).reason   # the sweep's resamples and seed
    with pytest.raises(UserError, match="did not measure rouge_l"):
        recommend_from_sweep(out, "rouge_l", 0.9)
    assert main(["recommend", "--sweep", str(out), "--threshold", "1.0"]) == 0
    assert (out / "summary.csv").read_text() == before


def test_several_named_sets_are_reported_apart(run_dir, tmp_path, cli_in_process):
    """Two files (or a `set` field) → per-prompt `set` and summary_by_set.csv per (set, rank)."""
    reworded = ROOT / "sample_data" / "eval_reworded.jsonl"
    out = tmp_path / "sweep"
    code, err = cli_in_process("sweep", "--run", str(run_dir), "--prompts", str(EVAL), str(reworded), "--ranks", "0,2",
                               "--metrics", "ref_nll,fact_recall", "--max-new-tokens", "4", "--latency", "off",
                               "--out", str(out), "--no-progress")
    assert code == 0, err
    per_prompt = read_csv(out / "per_prompt.csv")
    assert {r["set"] for r in per_prompt} == {"FAQ recall", "new wordings"} and len(per_prompt) == 2 * (66 + 48)
    by_set = read_csv(out / "summary_by_set.csv")
    assert [(r["set"], r["rank"]) for r in by_set] == [("FAQ recall", "0"), ("FAQ recall", "2"), ("new wordings", "0"), ("new wordings", "2")]
    overall = {r["rank"]: float(r["ref_nll"]) for r in read_csv(out / "summary.csv")}
    for rank in ("0", "2"):   # the overall NLL is the token-weighted mean of the sets' NLLs
        parts = [(r, [p for p in per_prompt if p["rank"] == rank and p["set"] == r["set"]]) for r in by_set if r["rank"] == rank]
        tokens = [sum(int(p["ref_tokens"]) for p in ps) for _, ps in parts]
        mixed = sum(float(r["ref_nll"]) * t for (r, _), t in zip(parts, tokens)) / sum(tokens)
        assert mixed == pytest.approx(overall[rank], rel=1e-9)
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["prompts"] == [str(EVAL), str(reworded)]
    single = tmp_path / "single"
    run_sweep(quick(run_dir, single, latency=False, metrics=["ref_nll"], prompts=str(ROOT / "sample_data" / "eval.csv")))
    assert not (single / "summary_by_set.csv").exists()
