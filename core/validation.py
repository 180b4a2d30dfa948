"""Checks of single values that every config and command shares.

Each check returns None when the value is fine, else the problem in words for people, so
a caller can gather every problem and report them at once. Numbers must be finite: NaN
passes most comparisons unnoticed (`nan < 0` is False) and inf slips through upper-less
bounds, and either one turns training into NaN losses.
"""
from __future__ import annotations

import math


def _bound(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return "a finite number"


def number_problem(name: str, value, lo: float | None = None, hi: float | None = None, *,
                   lo_open: bool = False, hi_open: bool = False, integer: bool = False, note: str = "") -> str | None:
    """None when `value` is a finite number (an int if `integer`) within the bounds, else why not.

    lo/hi: bounds, inclusive unless lo_open/hi_open. note: appended to the message (e.g. "0 disables").
    """
    kind = "an integer" if integer else "a finite number"
    wanted = f"{name} must be {kind}" + (f" {_bound(lo, hi, lo_open, hi_open)}" if lo is not None or hi is not None else "")
    wanted += f" ({note})" if note else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        return f"{wanted}, got {value!r}"
    if not math.isfinite(value):
        return f"{wanted}, got {value!r}"
    if lo is not None and (value <= lo if lo_open else value < lo):
        return f"{wanted}, got {value!r}"
    if hi is not None and (value >= hi if hi_open else value > hi):
        return f"{wanted}, got {value!r}"
    return None


def check_generation(max_new_tokens, temperature, top_p) -> None:
    """UserError listing every bad text-generation setting (checked before a model loads)."""
    from core.errors import UserError

    problems = [number_problem("max_new_tokens", max_new_tokens, lo=1, integer=True),
                number_problem("temperature", temperature, lo=0, lo_open=True),
                number_problem("top_p", top_p, lo=0, hi=1, lo_open=True)]
    problems = [p for p in problems if p]
    if problems:
        raise UserError("; ".join(problems))
