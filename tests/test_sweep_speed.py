"""The faster sweep measures the same numbers (issue 12, part 2): quality on the merged copy, prompts and
references encoded once, each rank's tables written at once, a time-left estimate that counts the latency phase."""
from __future__ import annotations

import csv
import json
import types

import pytest

from core.evaluation import sweep as sweep_module
from core.evaluation.sweep import SweepConfig, run_sweep
from core.train import TrainConfig, train
from tests.helpers import ROOT, randomize_adapter_b

EVAL = ROOT / "sample_data" / "eval.jsonl"


@pytest.fixture(scope="module")
def runs(tiny_model_dir, small_train_file, tmp_path_factory):
    """A tiny trained run per base quantization, made on first use."""
    made = {}

    def get(quant: str):
        if quant not in made:
            out = tmp_path_factory.mktemp(f"sweep-speed-{quant}") / "run"
            train(TrainConfig(data=str(small_train_file), out=str(out), model=str(tiny_model_dir), quant=quant,
                              r_max=4, steps=1, batch_size=2, max_length=64))
            randomize_adapter_b(out, std=0.2)
            made[quant] = out
        return made[quant]
    return get


@pytest.fixture
def run_dir(runs):
    return runs("nf4")


def config(run_dir, out, **overrides) -> SweepConfig:
    values = dict(run=str(run_dir), prompts=str(EVAL), out=str(out), ranks=[0, 1, 4], max_prompts=6, batch_size=4,
                  max_new_tokens=8, metrics=["ref_nll", "rouge_l"], latency=False, n_bootstrap=100)
    return SweepConfig(**(values | overrides))


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_merged_and_unmerged_quality_paths_give_the_same_answers_and_nll(runs, quant, tmp_path):
    run_dir = runs(quant)
    results = {}
    for path in ("merged", "unmerged"):
        result = run_sweep(config(run_dir, tmp_path / path, quality_path=path))
        assert result.status == "completed"
        results[path] = {(r["rank"], r["id"]): r for r in read_csv(tmp_path / path / "per_prompt.csv")}
        assert {r["quality_path"] for r in read_csv(tmp_path / path / "summary.csv")} == {path}
    assert results["merged"].keys() == results["unmerged"].keys() and len(results["merged"]) == 18
    for key, merged in results["merged"].items():
        unmerged = results["unmerged"][key]
        assert merged["answer"] == unmerged["answer"], key                 # greedy: the same tokens
        assert float(merged["ref_nll"]) == pytest.approx(float(unmerged["ref_nll"]), abs=1e-4)
        assert merged["ref_tokens"] == unmerged["ref_tokens"]
    from core.data import load_eval_set

    ids = [it.id for it in load_eval_set(EVAL).items[:6]]
    rows = read_csv(tmp_path / "merged" / "per_prompt.csv")
    assert [r["id"] for r in rows] == ids * 3          # the file's order, whatever the batches were
    # the ranks really differ, so the equality above is not the base model's answer three times
    assert len({results["merged"][(str(b), "e001")]["ref_nll"] for b in (0, 1, 4)}) == 3


def test_auto_merges_when_the_copy_fits_and_says_why_not_otherwise(run_dir, tmp_path, monkeypatch):
    run_sweep(config(run_dir, tmp_path / "fits", ranks=[1], max_prompts=2))
    meta = json.loads((tmp_path / "fits" / "sweep.json").read_text())
    assert meta["run_meta"]["quality_path"] == "merged"
    monkeypatch.setattr(sweep_module, "available_memory_bytes", lambda device: 1024)
    run_sweep(config(run_dir, tmp_path / "tight", ranks=[1], max_prompts=2))
    meta = json.loads((tmp_path / "tight" / "sweep.json").read_text())
    assert meta["run_meta"]["quality_path"] == "unmerged"
    assert any("would not fit" in note for note in meta["notes"])


def test_each_rank_is_in_the_tables_as_soon_as_it_is_done(run_dir, tmp_path):
    out = tmp_path / "sweep"
    seen = []

    def on_event(event):
        if event["event"] == "rank_done":
            summary = read_csv(out / "summary.csv")
            per_prompt = read_csv(out / "per_prompt.csv")
            seen.append(([int(r["rank"]) for r in summary], sorted({int(r["rank"]) for r in per_prompt})))

    run_sweep(config(run_dir, out, max_prompts=2), on_event=on_event)
    assert seen == [([0], [0]), ([0, 1], [0, 1]), ([0, 1, 4], [0, 1, 4])]


def test_prompts_and_references_are_encoded_and_embedded_once(run_dir, tmp_path, monkeypatch):
    from core.evaluation.metrics import SemanticSimilarity
    from core.runs import encode_prompts

    calls = {"encode": 0, "embed": []}

    def counting_encode(*args, **kwargs):
        calls["encode"] += 1
        return encode_prompts(*args, **kwargs)

    monkeypatch.setattr("core.runs.encode_prompts", counting_encode)
    ok, _ = SemanticSimilarity.availability()
    if ok:
        original = SemanticSimilarity.embed
        monkeypatch.setattr(SemanticSimilarity, "embed", lambda self, texts: calls["embed"].append(len(texts)) or original(self, texts))
    metrics = ["ref_nll", "rouge_l"] + (["similarity"] if ok else [])
    run_sweep(config(run_dir, tmp_path / "sweep", max_prompts=6, metrics=metrics))
    assert calls["encode"] == 2                   # 6 prompts, at most 4 a batch: two batches of 3, once for all ranks
    if ok:
        assert calls["embed"] == [6, 6, 6, 6]     # the references once, then each rank's answers


def test_time_left_counts_the_latency_still_to_measure(run_dir, tmp_path, monkeypatch):
    """Latency 5 s per timing (each rank unmerged, merged once), 1 s per batch of 2 prompts: exact estimates."""
    clock = [0.0]
    monkeypatch.setattr(sweep_module, "time", types.SimpleNamespace(time=lambda: clock[0], perf_counter=lambda: clock[0]))
    timings = []

    def fake_latency(model, tokenizer, prompts, new_tokens, repeats, suffix=""):
        clock[0] += 5.0
        timings.append(suffix)
        return {"ms_per_token" + suffix: 100.0 + len(timings), "latency_runs": 1}

    original_chunk = sweep_module.Sweep._evaluate_chunk

    def timed_chunk(self, rank, chunk, model):
        clock[0] += 1.0
        return original_chunk(self, rank, chunk, model)

    monkeypatch.setattr(sweep_module, "measure_latency", fake_latency)
    monkeypatch.setattr(sweep_module.Sweep, "_evaluate_chunk", timed_chunk)
    events = []
    run_sweep(config(run_dir, tmp_path / "sweep", max_prompts=4, batch_size=2, latency=True), on_event=events.append)
    assert timings == ["", "_merged", "", ""]           # the merged model is timed once: same computation at every rank
    summary = read_csv(tmp_path / "sweep" / "summary.csv")
    assert {r["ms_per_token_merged"] for r in summary} == {"102.0"}
    assert [r["ms_per_token"] for r in summary] == ["101.0", "103.0", "104.0"]
    progress = [e for e in events if e["event"] in ("prompt", "phase")]
    assert [(e["event"], e["rank"]) for e in progress] == [
        ("phase", 0), ("prompt", 0), ("prompt", 0), ("phase", 1), ("prompt", 1), ("prompt", 1),
        ("phase", 4), ("prompt", 4), ("prompt", 4)]
    assert progress[0]["eta_s"] is None and progress[0]["phase"] == "latency"
    # after rank 0's first batch: 10 prompts left at 0.5 s, 2 ranks' latency at 5 s
    assert progress[1]["eta_s"] == pytest.approx(10 * 0.5 + 2 * 5)
    assert progress[5]["eta_s"] == pytest.approx(4 * 0.5 + 1 * 5)
    assert progress[-1]["eta_s"] == 0                # the last answer is the end: latency was measured first


def test_the_sweep_page_knows_when_a_rank_is_being_timed(tmp_path):
    from core import runstate
    from core.workspace_data import read_sweep

    for event in ({"event": "start", "total_units": 8, "done_units": 0}, {"event": "phase", "rank": 0, "phase": "latency",
                  "done_units": 0, "total_units": 8, "eta_s": None}):
        runstate.append_event(tmp_path, event)
    view = read_sweep(tmp_path)
    assert (view.phase, view.current_rank, view.eta_s) == ("latency", 0, None)
    runstate.append_event(tmp_path, {"event": "prompt", "rank": 0, "done": 4, "total": 4, "units": 4, "done_units": 4,
                                     "total_units": 8, "eta_s": 12.0})
    view = read_sweep(tmp_path)
    assert (view.phase, view.done_units, view.eta_s) == ("quality", 4, 12.0)
    runstate.append_event(tmp_path, {"event": "phase", "rank": 1, "phase": "latency", "done_units": 4, "total_units": 8,
                                     "eta_s": 9.0})
    assert (read_sweep(tmp_path).phase, read_sweep(tmp_path).eta_s) == ("latency", 9.0)


@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_one_pass_over_each_prompt_gives_the_nll_and_answers_of_two(runs, quant):
    from core.data import load_eval_set
    from core.evaluation.shared_prompt import nll_and_answers
    from core.evaluation.sweep import PreparedChunk, nll_of_batch, reference_batch
    from core.qdylora import set_rank
    from core.runs import encode_prompts, generate_encoded, load_run

    loaded = load_run(runs(quant))
    set_rank(loaded.model, 3)
    items = load_eval_set(EVAL).items[:5]
    tok = loaded.tokenizer
    chunk = PreparedChunk(items, reference_batch(tok, items), encode_prompts(tok, [it.prompt for it in items], loaded.device))
    assert len({int(n) for n in chunk.prompts["attention_mask"].sum(1)}) > 1        # really left-padded rows
    nll, answers = nll_and_answers(loaded.model, tok, chunk.prompts, chunk.reference_ids, 10)
    assert nll is not None and answers is not None                                 # the shared pass applied
    separate_nll = nll_of_batch(loaded.model, chunk.references)
    separate_answers = generate_encoded(loaded.model, tok, chunk.prompts, max_new_tokens=10)
    assert answers == separate_answers
    for (s, c), (want_s, want_c) in zip(nll, separate_nll):
        assert c == want_c and s / c == pytest.approx(want_s / want_c, abs=1e-4)


def test_quality_path_flag_and_the_size_of_a_float_copy(runs):
    import torch

    from core.cli import build_parser
    from core.evaluation.sweep import float_copy_bytes
    from core.runs import load_run

    args = build_parser().parse_args(["sweep", "--run", "r", "--prompts", "p.jsonl", "--out", "o", "--quality-path", "unmerged"])
    assert SweepConfig.from_cli(args).quality_path == "unmerged"
    assert SweepConfig.from_cli(build_parser().parse_args(["sweep", "--run", "r", "--prompts", "p", "--out", "o"])).quality_path == "auto"
    with pytest.raises(Exception, match="quality_path must be one of"):
        SweepConfig(run="r", prompts="p", out="o", quality_path="fast")
    # a 4-bit base unpacks to the same float copy as the float base (adapters not counted, tied weights once)
    sizes = {}
    for quant in ("nf4", "none"):
        model = load_run(runs(quant)).model
        sizes[quant] = float_copy_bytes(model, torch.float32)
    plain = {id(p): p.numel() for name, p in load_run(runs("none")).model.named_parameters() if "lora_" not in name}
    assert sizes["nf4"] == sizes["none"] == 4 * sum(plain.values())


def test_sweep_workers_are_given_one_quality_path_that_counts_a_float_copy_per_worker(runs):
    """A sharded sweep decides auto once, before its workers load anything (so every rank is measured alike)."""
    import torch

    from core.evaluation.sweep import choose_quality_path, float_copy_bytes, planned_float_copy_bytes
    from core.runs import load_run, run_info

    assert choose_quality_path("auto", 100, 300)[0] == "merged"
    path, why = choose_quality_path("auto", 100, 300, copies=2)      # two workers' copies need 200 > 0.6 × 300
    assert path == "unmerged" and "2 float copies (0 MB each)" in why
    assert choose_quality_path("merged", None, 0)[0] == "merged"
    assert choose_quality_path("auto", None, 10**12)[0] == "unmerged"  # size unknown: the safe path
    # known from the run's config alone (a meta-device skeleton, tied embeddings once) = the loaded model's copy
    for quant in ("nf4", "none"):
        need, device = planned_float_copy_bytes(run_info(runs(quant))["config"])
        assert device == "cpu" and need == float_copy_bytes(load_run(runs(quant)).model, torch.float32)
