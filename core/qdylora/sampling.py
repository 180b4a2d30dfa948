"""Drawing the active rank(s) b of each optimizer step."""
from __future__ import annotations

import bisect
import itertools
import math
import random

from core.qdylora.config import QDyLoRAConfig


def powers_of_two_ranks(r_max: int) -> list[int]:
    """1, 2, 4, … up to r_max, plus r_max itself: the ranks `pow2` draws and a sweep measures by default
    (core.evaluation.sweep.default_ranks, core.workspace_data.default_sweep_ranks add rank 0), one rule for both."""
    ranks = [1 << i for i in range(r_max.bit_length()) if (1 << i) <= r_max]
    # r_max itself must be trained (or exporting it would export untrained rows) and measured.
    return ranks if ranks[-1] == r_max else ranks + [r_max]


def candidate_ranks(cfg: QDyLoRAConfig) -> tuple[list[int], list[float]]:
    """Ranks that can be drawn and their (unnormalised) weights."""
    if cfg.rank_sampling == "list":
        ranks = sorted(set(cfg.rank_list))
        return ranks, [1.0] * len(ranks)
    if cfg.rank_sampling == "pow2":
        ranks = powers_of_two_ranks(cfg.r_max)
        return ranks, [1.0] * len(ranks)
    ranks = list(range(1, cfg.r_max + 1))
    if cfg.rank_sampling == "low":
        return ranks, [1.0 / b for b in ranks]
    if cfg.rank_sampling == "high":
        return ranks, [float(b) for b in ranks]
    return ranks, [1.0] * len(ranks)


def row_train_probabilities(cfg: QDyLoRAConfig) -> list[float]:
    """P(row i is trained in a step) for rows 1..r_max: the chance that the step's largest rank is >= i.

    With k ranks per step the draws are stratified (RankSampler.sample_step), so the largest is
    the draw from the top 1/k of the distribution; the sandwich rule trains r_max every step.
    """
    if cfg.extra_ranks != "none" or cfg.method == "svd":
        return [1.0] * cfg.r_max
    ranks, weights = candidate_ranks(cfg)
    total, k = sum(weights), cfg.ranks_per_step
    probabilities = []
    for row in range(1, cfg.r_max + 1):
        below = sum(w for b, w in zip(ranks, weights) if b < row)   # the top stratum's draw is >= row iff u >= below
        probabilities.append(min(1.0, max(0.0, (total - below) / (total / k))))
    return probabilities


def balanced_row_multipliers(cfg: QDyLoRAConfig) -> list[float]:
    """Row i's step multiplier under row_steps 'balanced': 1/sqrt(P(row i trained)).

    Why the square root: a row trained on a share p of the steps, whose momentum keeps moving it
    in between, sees Adam's second moment at about p·g², so its steps are 1/sqrt(p) larger and
    come on every step: it moves sqrt(p) as fast as a row trained on every step. Rows never
    trained (p = 0) get 1: they have no momentum to scale.
    """
    return [1.0 / math.sqrt(p) if p > 0 else 1.0 for p in row_train_probabilities(cfg)]


class RankSampler:
    """Seeded sampler whose state goes into checkpoints, so a resumed run draws the same ranks."""

    def __init__(self, cfg: QDyLoRAConfig, seed: int):
        self.ranks, self.weights = candidate_ranks(cfg)
        self._rng = random.Random(seed)

    def sample(self) -> int:
        return self._rng.choices(self.ranks, weights=self.weights, k=1)[0]

    def sample_step(self, k: int = 1) -> list[int]:
        """k ranks for one step, stratified: one draw from each 1/k slice of the distribution.

        Stratifying keeps every step's ranks spread from low to high (k independent draws
        could all land low), so each step trains rows at both ends. k = 1 is `sample()`.
        """
        if k == 1:
            return [self.sample()]
        cumulative = list(itertools.accumulate(self.weights))
        total = cumulative[-1]
        draws = []
        for i in range(k):
            u = (i + self._rng.random()) / k * total
            draws.append(self.ranks[min(bisect.bisect_right(cumulative, u), len(self.ranks) - 1)])
        return draws

    def probabilities(self) -> dict[int, float]:
        total = sum(self.weights)
        return {b: w / total for b, w in zip(self.ranks, self.weights)}

    def state_dict(self) -> dict:
        version, internal, gauss = self._rng.getstate()
        return {"version": version, "internal": list(internal), "gauss": gauss}

    def load_state_dict(self, state: dict) -> None:
        self._rng.setstate((state["version"], tuple(state["internal"]), state["gauss"]))
