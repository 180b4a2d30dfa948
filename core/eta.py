"""Time-left estimates that follow the machine: seconds per unit over the most recent work only.

An average since the start keeps a job's early speed long after another process took a
core (or gave it back); a moving window of the last steps/prompts forgets it.
"""
from __future__ import annotations

from collections import deque


class MovingRate:
    """Seconds per unit of work over the last `window` measurements (each: units done, seconds taken)."""

    def __init__(self, window: int):
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self._recent: deque[tuple[float, float]] = deque(maxlen=window)

    def add(self, units: float, seconds: float) -> None:
        if units > 0 and seconds >= 0:
            self._recent.append((float(units), float(seconds)))

    @property
    def known(self) -> bool:
        return bool(self._recent)

    def seconds_per_unit(self) -> float | None:
        units = sum(u for u, _ in self._recent)
        return sum(s for _, s in self._recent) / units if units else None

    def eta(self, remaining_units: float) -> float | None:
        rate = self.seconds_per_unit()
        return None if rate is None else max(0.0, remaining_units) * rate


def combined_eta(parts: list[tuple[MovingRate, float]]) -> float | None:
    """Sum of rate × remaining units over phases of different kinds; None while a phase with work left has no rate yet."""
    total = 0.0
    for rate, remaining in parts:
        if remaining <= 0:
            continue
        part = rate.eta(remaining)
        if part is None:
            return None
        total += part
    return total
