"""core.evaluation.recommend: the paired decision and its wording on hand-made per-prompt tables."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from core.evaluation.recommend import (
    AS_GOOD,
    CANNOT_TELL,
    METRICS,
    NO_DATA,
    NO_GAIN,
    default_metric,
    recommend_across_metrics,
    recommend_rank,
    relative_gap,
    tolerance,
)
from core.evaluation.stats import bootstrap_mean_ci

NAN = float("nan")
# Eight prompts of different difficulty: what a rank does is added to these.
PROMPTS = np.array([1.5, 1.6, 1.4, 1.7, 1.5, 1.6, 1.55, 1.45])


def rows(values: dict[int, list[float]], metric: str = "ref_nll", **extra) -> list[dict]:
    out = []
    for rank, vs in values.items():
        for i, v in enumerate(vs):
            row = {"rank": rank, "id": f"p{i}", metric: v}
            for column, by_rank in extra.items():
                row[column] = by_rank[rank][i]
            out.append(row)
    return out


def noise(seed: int, scale: float) -> np.ndarray:
    return scale * np.random.default_rng(seed).standard_normal(len(PROMPTS))


# ------------------------------------------------------------- the three verdicts


def test_clear_winner_is_the_best_rank_when_every_smaller_rank_is_worse():
    rec = recommend_rank(rows({0: PROMPTS + 1.0, 1: PROMPTS + 0.5, 2: PROMPTS + 0.3, 4: PROMPTS}))
    assert (rec.verdict, rec.rank, rec.best_rank) == (AS_GOOD, 4, 4)
    assert rec.headline == "Choose rank 4"
    assert rec.table.set_index("rank")["status"].to_dict() == {0: "base", 1: "worse", 2: "worse", 4: "best"}
    assert "Rank 4 is the best rank on reference loss (1.54 nats/token)" in rec.reason
    assert "every smaller rank is measurably worse on these 8 prompts (95 %)" in rec.reason


def test_lowest_rank_within_tolerance_is_as_good_as_the_best():
    # rank 2 is 0.01 nats worse on every prompt: inside ±(−ln 0.95) = ±0.051.
    rec = recommend_rank(rows({0: PROMPTS + 1.0, 1: PROMPTS + 0.3, 2: PROMPTS + 0.01, 4: PROMPTS, 8: PROMPTS + 0.002}))
    assert (rec.verdict, rec.rank, rec.best_rank) == (AS_GOOD, 2, 4)
    assert rec.acceptable_ranks == [2, 4, 8]
    assert rec.tolerance == pytest.approx(-math.log(0.95))
    assert rec.reason.startswith("Rank 2 is as good as the best rank, 4 (difference within ±5 %, 95 % confidence)")
    assert "1 % worse on reference loss" in rec.reason          # 1 − exp(−0.01) = 1.0 %
    assert "measurably better than the base model" in rec.reason
    # A stricter tolerance (±0.5 %) no longer accepts rank 2.
    assert recommend_rank(rows({0: PROMPTS + 1.0, 2: PROMPTS + 0.01, 4: PROMPTS}), threshold=0.995).rank == 4


def test_all_tied_ranks_cannot_be_told_apart_and_the_smallest_is_the_safe_pick():
    # Every rank beats the base clearly, but between ranks the per-prompt differences
    # go both ways and are larger than the tolerance: these prompts cannot decide.
    values = {0: PROMPTS + 1.0, 1: PROMPTS + noise(1, 0.3), 2: PROMPTS + noise(2, 0.3), 4: PROMPTS - 0.05}
    rec = recommend_rank(rows(values))
    assert (rec.verdict, rec.rank, rec.best_rank) == (CANNOT_TELL, 1, 4)
    assert rec.headline == "Ranks cannot be told apart: rank 1 is the safe pick"
    assert rec.reason.startswith("The ranks cannot be told apart on these 8 prompts — add prompts or train longer.")
    assert "The smallest rank, 1, is the safe pick" in rec.reason
    status = rec.table.set_index("rank")["status"]
    assert status[1] == status[2] == "cannot_tell"


def test_worse_than_base_means_no_rank():
    rec = recommend_rank(rows({0: PROMPTS, 1: PROMPTS + 0.2, 2: PROMPTS + 0.1, 4: PROMPTS + 0.05}))
    assert (rec.verdict, rec.rank, rec.best_rank) == (NO_GAIN, None, 4)
    assert rec.headline == "No rank beats the base model"
    assert "measurably worse than the base model" in rec.reason and "Keep the base model" in rec.reason
    assert rec.acceptable_ranks == []


def test_not_measurably_better_than_base_means_no_rank():
    # The case: ranks a little better on average, but not on the same prompts.
    values = {0: PROMPTS, 1: PROMPTS + noise(3, 0.4) - 0.05, 2: PROMPTS + noise(4, 0.4) - 0.1}
    rec = recommend_rank(rows(values))
    assert rec.verdict == NO_GAIN and rec.rank is None
    assert "not measurably better than the base model" in rec.reason


def test_too_few_prompts_cannot_decide():
    rec = recommend_rank(rows({0: [3.0, 3.1], 1: [1.0, 1.1], 2: [1.5, 1.4]}))
    assert (rec.verdict, rec.rank) == (CANNOT_TELL, 1)
    assert rec.reason.startswith("Only 2 prompts measured: too few to tell the ranks or the base model apart")


# ------------------------------------------------------------- one noisy prompt


def test_one_hard_prompt_cancels_out_in_pairs():
    """One prompt is far harder than the rest for every model: separate intervals per rank
    overlap completely, yet the same prompts compared pairwise still decide."""
    hard = PROMPTS.copy()
    hard[3] = 6.0
    values = {0: hard + 0.8, 1: hard + 0.3, 2: hard + 0.01, 4: hard}
    separate = {r: bootstrap_mean_ci(v) for r, v in values.items()}
    assert separate[1].lo < separate[4].hi and separate[0].lo < separate[4].hi   # overlap: "cannot tell" unpaired
    rec = recommend_rank(rows(values))
    assert (rec.verdict, rec.rank) == (AS_GOOD, 2)
    assert rec.table.set_index("rank")["status"][1] == "worse"


def test_one_noisy_prompt_alone_does_not_make_a_winner():
    """Ranks 1 and 4 agree on seven prompts; on one, rank 1 answers far worse. The mean
    says rank 4 is better, but one prompt is no evidence: the verdict is "cannot tell"."""
    values = {0: PROMPTS + 1.0, 1: PROMPTS.copy(), 4: PROMPTS.copy()}
    values[1][5] += 2.0
    rec = recommend_rank(rows(values))
    assert rec.best_rank == 4
    assert (rec.verdict, rec.rank) == (CANNOT_TELL, 1)


# ------------------------------------------------------------- metrics and weights


def test_higher_is_better_metric_and_percent_wording():
    values = {0: [0.2] * 8, 1: list(0.5 + noise(5, 0.01)), 2: [0.6] * 8, 4: [0.61] * 8}
    rec = recommend_rank(rows(values, "rouge_l"), "rouge_l", 0.95)
    # tolerance 5 % of 0.61 = 0.0305: rank 2 (−0.01 on every prompt) passes, rank 1 does not.
    assert (rec.verdict, rec.rank) == (AS_GOOD, 2)
    assert rec.tolerance == pytest.approx(0.05 * 0.61)
    assert "61 %" in rec.reason and "word overlap" in rec.reason


def test_ref_nll_is_weighted_by_reference_tokens():
    # p0 has 100 reference tokens, the others 1: rank 1 is better only on p0.
    tokens = {r: [100] + [1] * 7 for r in (1, 2)}
    values = {1: [1.0] + [2.0] * 7, 2: [2.0] + [1.0] * 7}
    weighted = recommend_rank(rows(values, ref_tokens=tokens))
    assert weighted.best_rank == 1 and weighted.best_value == pytest.approx((100 + 14) / 107)
    assert recommend_rank(rows(values)).best_rank == 2       # unweighted: rank 2 wins 7 of 8


def test_missing_values_are_paired_on_common_prompts_and_noted():
    facts = {0: [0.0] * 8, 1: [NAN] * 8, 2: [1.0] * 7 + [None], 4: [1.0] * 8}
    rec = recommend_rank(rows(facts, "fact_recall"), "fact_recall")
    assert rec.rank == 2 and rec.verdict == AS_GOOD
    assert any("Ignored rank(s) with no facts included value: 1" in n for n in rec.notes)
    assert rec.table.set_index("rank").loc[2, "n"] == 7


def test_no_base_row_decides_among_ranks_with_a_note():
    rec = recommend_rank(rows({1: PROMPTS + 0.3, 2: PROMPTS}))
    assert rec.rank == 2 and rec.base_value is None
    assert any("base model (rank 0) was not measured" in n for n in rec.notes)


def test_no_rank_with_values():
    rec = recommend_rank(rows({0: [0.1] * 8, 1: [NAN] * 8}, "similarity"), "similarity")
    assert rec.verdict == NO_DATA and rec.rank is None and "no rank above 0" in rec.reason


# ------------------------------------------------------------- warnings


def test_warns_when_answers_miss_the_facts_even_at_the_best_rank():
    facts = {0: [0.0] * 8, 1: [0.0] * 8, 2: [0.25] * 8}
    rec = recommend_rank(rows({0: PROMPTS + 1.0, 1: PROMPTS + 0.5, 2: PROMPTS}, fact_recall=facts))
    assert rec.rank == 2
    assert len(rec.warnings) == 1 and "even at rank 2" in rec.warnings[0] and "only 25 %" in rec.warnings[0]
    good = recommend_rank(rows({0: PROMPTS + 1.0, 2: PROMPTS}, fact_recall={0: [0.0] * 8, 2: [0.9] * 8}))
    assert good.warnings == []


def test_warns_on_low_meaning_match():
    sim = {0: [0.3] * 8, 4: [0.45] * 8}
    rec = recommend_rank(rows({0: PROMPTS + 1.0, 4: PROMPTS}, similarity=sim))
    assert any("meaning match is only 0.45" in w for w in rec.warnings)


# ------------------------------------------------------------- across metrics, helpers, inputs


def test_across_metrics_and_default_metric():
    per = rows({0: PROMPTS + 1.0, 1: PROMPTS + 0.3, 2: PROMPTS}, rouge_l={0: [0.1] * 8, 1: [0.5] * 8, 2: [0.5] * 8},
               fact_recall={0: [NAN] * 8, 1: [NAN] * 8, 2: [NAN] * 8})
    recs = recommend_across_metrics(per, ["ref_nll", "rouge_l", "fact_recall", "similarity"])
    assert list(recs) == ["ref_nll", "rouge_l"]               # no values: left out
    assert recs["ref_nll"].rank == 2 and recs["rouge_l"].rank == 1
    assert default_metric(["rouge_l", "ref_nll"])[0] == "ref_nll"
    metric, why = default_metric(["similarity", "rouge_l"])
    assert metric == "rouge_l" and "was not measured" in why


def test_same_input_same_decision_and_json_ready():
    values = {0: PROMPTS + 1.0, 1: PROMPTS + noise(1, 0.3), 2: PROMPTS + noise(2, 0.3), 4: PROMPTS - 0.05}
    a, b = recommend_rank(rows(values)), recommend_rank(pd.DataFrame(rows(values)).sample(frac=1, random_state=0))
    assert a.reason == b.reason and a.table.equals(b.table)
    json.dumps(a.to_dict())


def test_tolerance_and_relative_gap():
    assert tolerance("ref_nll", 0.9, 1.23) == pytest.approx(-math.log(0.9))
    assert tolerance("similarity", 0.9, -0.5) == pytest.approx(0.05)
    assert relative_gap("rouge_l", 0.57, 0.6) == pytest.approx(0.05)
    assert relative_gap("ref_nll", 1.0 - math.log(0.95), 1.0) == pytest.approx(0.05)


def test_values_are_shown_rounded_with_units():
    assert METRICS["ref_nll"].show(1.23456) == "1.23 nats/token"
    assert METRICS["rouge_l"].show(0.4149) == "41 %" and METRICS["similarity"].show(0.7251) == "0.73"
    assert METRICS["fact_recall"].show(None) == "—" and METRICS["rouge_l"].show(NAN) == "—"


@pytest.mark.parametrize("threshold", [0, -0.1, 1.01, NAN, "0.9", True])
def test_bad_threshold(threshold):
    with pytest.raises(ValueError, match="threshold"):
        recommend_rank(rows({1: [0.1]}, "rouge_l"), "rouge_l", threshold)


def test_bad_metric_lists_valid_ones():
    with pytest.raises(ValueError) as info:
        recommend_rank(rows({1: [0.1]}, "rouge_l"), "bleu")
    for name in METRICS:
        assert name in str(info.value)


def test_bad_tables():
    with pytest.raises(ValueError, match=r"no \['rouge_l'\] column"):
        recommend_rank([{"rank": 1, "id": "a", "ref_nll": 1.0}], "rouge_l")
    with pytest.raises(ValueError, match="more than one row"):
        recommend_rank(rows({1: [0.1]}, "rouge_l") * 2, "rouge_l")
    with pytest.raises(ValueError, match="integers >= 0"):
        recommend_rank([{"rank": -1, "id": "a", "ref_nll": 1.0}])


def test_registry_directions():
    assert METRICS["ref_nll"].higher_is_better is False
    assert all(METRICS[m].higher_is_better for m in ("rouge_l", "fact_recall", "similarity"))
