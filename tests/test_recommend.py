"""core.evaluation.recommend: the rank rule on hand-made summary tables."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from core.evaluation.recommend import METRICS, recommend_rank

NAN = float("nan")


def table(metric: str, values: dict[int, float]) -> list[dict]:
    return [{"rank": r, metric: v} for r, v in values.items()]


# ------------------------------------------------------------- higher is better


def test_rouge_lowest_rank_within_threshold_of_best():
    rows = table("rouge_l", {0: 0.20, 1: 0.30, 2: 0.37, 4: 0.39, 8: 0.40, 16: 0.41})
    rec = recommend_rank(rows, "rouge_l", 0.95)
    # bar = 0.95 × 0.41 = 0.3895 → ranks 4, 8, 16 pass; 4 is the lowest.
    assert rec.rank == 4
    assert (rec.best_rank, rec.best_value, rec.base_value) == (16, 0.41, 0.20)
    assert rec.acceptable_ranks == [4, 8, 16]
    assert rec.bar == pytest.approx(0.3895)
    for number in ("rank 16", "0.41", "0.3895", "0.95", "0.2", "rank 4", "0.39"):
        assert number in rec.reason


def test_value_exactly_on_the_bar_is_acceptable():
    rows = table("fact_recall", {1: 0.76, 2: 0.8})
    assert recommend_rank(rows, "fact_recall", 0.95).rank == 1  # 0.76 == 0.95 × 0.8
    assert recommend_rank(rows, "fact_recall", 0.96).rank == 2


def test_threshold_one_means_only_the_best():
    rows = table("similarity", {0: 0.5, 1: 0.6, 2: 0.7, 4: 0.7, 8: 0.69})
    rec = recommend_rank(rows, "similarity", 1.0)
    assert rec.rank == 2 and rec.acceptable_ranks == [2, 4] and rec.best_rank == 2  # ties: lowest rank


def test_must_not_be_worse_than_base():
    rows = table("rouge_l", {0: 0.395, 1: 0.39, 2: 0.40, 4: 0.41})
    rec = recommend_rank(rows, "rouge_l", 0.9)
    # rank 1 meets 0.9 × 0.41 = 0.369 but is below base 0.395.
    assert rec.rank == 2
    row1 = rec.table[rec.table["rank"] == 1].iloc[0]
    assert row1["meets_bar"] and not row1["not_worse_than_base"] and not row1["acceptable"]


def test_no_acceptable_rank_when_all_worse_than_base():
    rec = recommend_rank(table("rouge_l", {0: 0.5, 1: 0.3, 2: 0.4}), "rouge_l")
    assert rec.rank is None and rec.acceptable_ranks == []
    assert "worse than the base" in rec.reason and "0.4" in rec.reason and "0.5" in rec.reason


def test_negative_best_value_still_meets_its_own_bar():
    rec = recommend_rank(table("similarity", {1: -0.2, 2: -0.1}), "similarity", 0.9)
    assert rec.rank == 2 and rec.bar == pytest.approx(-0.11)


# ------------------------------------------------------------- ref_nll (lower)


def test_ref_nll_uses_per_token_probability():
    # bar = 1.50 − ln 0.95 = 1.5513: rank 4 (1.55) passes, rank 2 (1.56) does not.
    rows = table("ref_nll", {0: 2.0, 1: 1.9, 2: 1.56, 4: 1.55, 8: 1.50, 16: 1.52})
    rec = recommend_rank(rows, "ref_nll", 0.95)
    assert rec.rank == 4
    assert rec.bar == pytest.approx(1.5 - math.log(0.95))
    assert math.exp(-1.55) >= 0.95 * math.exp(-1.5) > math.exp(-1.56)
    assert rec.acceptable_ranks == [4, 8, 16]
    for number in ("rank 8", "1.5", "1.551", "ln 0.95", "2", "1.55"):
        assert number in rec.reason


def test_ref_nll_exactly_on_the_bar_and_base():
    best = 1.0
    rows = table("ref_nll", {0: 1.2, 1: best - math.log(0.9), 3: best})
    assert recommend_rank(rows, "ref_nll", 0.9).rank == 1
    rows = table("ref_nll", {0: 1.0, 1: 1.0, 2: 0.99})  # equal to base is "not worse"
    assert recommend_rank(rows, "ref_nll", 0.95).rank == 1


def test_ref_nll_worse_than_base():
    rec = recommend_rank(table("ref_nll", {0: 1.0, 2: 1.2, 4: 1.1}))
    assert rec.rank is None and rec.best_rank == 4 and "worse than the base" in rec.reason


def test_no_base_row():
    rec = recommend_rank(table("ref_nll", {2: 1.2, 4: 1.1}), "ref_nll", 0.9)  # bar 1.1 − ln 0.9 = 1.205
    assert rec.rank == 2 and rec.base_value is None
    assert any("No base row" in n for n in rec.notes)


# ------------------------------------------------------------- NaN and inputs


def test_nan_rows_are_ignored_with_a_note():
    rows = table("fact_recall", {0: 0.1, 1: NAN, 2: 0.5, 4: None, 8: 0.52})
    rec = recommend_rank(rows, "fact_recall")
    assert rec.rank == 2
    assert "1, 4" in rec.reason and rec.notes
    assert rec.table.loc[rec.table["rank"] == 1, "note"].iloc[0] == "no value"


def test_all_nan_gives_no_rank():
    rec = recommend_rank(table("fact_recall", {0: NAN, 1: NAN, 2: NAN}), "fact_recall")
    assert rec.rank is None and "no rank > 0 has a fact_recall value" in rec.reason


def test_nan_base_is_ignored():
    rec = recommend_rank(table("rouge_l", {0: NAN, 1: 0.1, 2: 0.2}), "rouge_l", 0.5)
    assert rec.rank == 1 and rec.base_value is None


def test_dataframe_input_unsorted_and_json_ready():
    df = pd.DataFrame({"rank": [8, 0, 2], "rouge_l": [0.4, 0.1, 0.39], "other": [1, 2, 3]})
    rec = recommend_rank(df, "rouge_l")
    assert rec.rank == 2 and rec.table["rank"].tolist() == [0, 2, 8]
    json.dumps(rec.to_dict())


@pytest.mark.parametrize("threshold", [0, -0.1, 1.01, NAN, "0.9", True])
def test_bad_threshold(threshold):
    with pytest.raises(ValueError, match="threshold"):
        recommend_rank(table("rouge_l", {1: 0.1}), "rouge_l", threshold)


def test_bad_metric_lists_valid_ones():
    with pytest.raises(ValueError) as info:
        recommend_rank(table("rouge_l", {1: 0.1}), "bleu")
    for name in METRICS:
        assert name in str(info.value)


def test_bad_tables():
    with pytest.raises(ValueError, match="no \\['rouge_l'\\] column"):
        recommend_rank([{"rank": 1, "ref_nll": 1.0}], "rouge_l")
    with pytest.raises(ValueError, match="more than one row"):
        recommend_rank(table("rouge_l", {1: 0.1}) * 2, "rouge_l")


def test_registry_directions():
    assert METRICS["ref_nll"].higher_is_better is False
    assert all(METRICS[m].higher_is_better for m in ("rouge_l", "fact_recall", "similarity"))
