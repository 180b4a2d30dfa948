"""A sweep's summary.csv read back: one checked table, or a message that says what is wrong.

Everything that reads finished sweeps (export's rank card, `qdylora recommend`, the
dashboard) goes through `read_summary`, so a damaged or hand-edited file is reported the
same way everywhere instead of surfacing as a traceback in one of them. Torch-free.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pandas as pd

from core.errors import UserError

SUMMARY_FILE = "summary.csv"


def _number(text: str) -> float | None:
    """The number in a cell; None for an empty cell; ValueError for anything else."""
    if text.strip() == "":
        return None
    value = float(text)
    if math.isinf(value):
        raise ValueError(text)
    return value


def read_summary(sweep_dir: str | Path) -> pd.DataFrame:
    """summary.csv of a sweep as a table sorted by rank (ranks are ints, every other column
    numeric, empty cells NaN). UserError naming the file, the row and the problem otherwise."""
    folder = Path(sweep_dir)
    path = folder / SUMMARY_FILE
    if not folder.is_dir():
        raise UserError(f"sweep folder {folder} does not exist")
    if not path.is_file():
        raise UserError(f"{folder} is not a sweep folder with results (no {SUMMARY_FILE})")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh, strict=True))
    except UnicodeDecodeError:
        raise UserError(f"{path} is damaged: not UTF-8 text") from None
    except csv.Error as exc:
        raise UserError(f"{path} is damaged: not valid CSV ({exc})") from None
    except OSError as exc:
        raise UserError(f"{path} cannot be read: {exc.strerror or exc}") from None
    if not rows or not any(cell.strip() for cell in rows[0]):
        raise UserError(f"{path} is empty: the sweep wrote no results (resume or re-run it)")
    header, body = [h.strip() for h in rows[0]], [r for r in rows[1:] if any(c.strip() for c in r)]
    if "rank" not in header:
        raise UserError(f"{path} is damaged: it has no 'rank' column")
    if not body:
        raise UserError(f"{path} has no measured rank (resume or re-run the sweep)")
    table: dict[str, list] = {h: [] for h in header}
    seen: set[int] = set()
    for n, row in enumerate(body, start=1):
        if len(row) != len(header):
            raise UserError(f"{path} is damaged: row {n} has {len(row)} values for {len(header)} columns")
        for name, text in zip(header, row):
            try:
                value = _number(text)
            except ValueError:
                value = math.nan
                if name != "rank":
                    raise UserError(f"{path} is damaged: row {n} has {name} {text!r}, not a number") from None
            if name == "rank":
                if value is None or not value >= 0 or value != int(value):
                    raise UserError(f"{path} is damaged: row {n} has rank {text!r}, not a whole number >= 0")
                if int(value) in seen:
                    raise UserError(f"{path} is damaged: rank {int(value)} appears twice")
                seen.add(int(value))
                value = int(value)
            table[name].append(math.nan if value is None else value)
    return pd.DataFrame(table).sort_values("rank").reset_index(drop=True)
