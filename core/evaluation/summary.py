"""A sweep's summary.csv and per_prompt.csv read back: one checked table each, or a
message that says what is wrong.

Everything that reads finished sweeps (export's rank card, `qdylora recommend`, the
dashboard) goes through `read_summary` / `read_per_prompt`, so a damaged or hand-edited
file is reported the same way everywhere instead of surfacing as a traceback in one of
them. Torch-free.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pandas as pd

from core.errors import UserError

SUMMARY_FILE = "summary.csv"
PER_PROMPT_FILE = "per_prompt.csv"
# the per-prompt columns that hold numbers (the rest are texts: id, prompt, answer, ...)
PER_PROMPT_NUMBERS = ("rank", "ref_nll", "ref_tokens", "rouge_l", "fact_recall", "similarity")


def _number(text: str) -> float | None:
    """The number in a cell; None for an empty cell; ValueError for anything else."""
    if text.strip() == "":
        return None
    value = float(text)
    if math.isinf(value):
        raise ValueError(text)
    return value


def _read_rows(folder: Path, name: str) -> tuple[Path, list[str], list[list[str]]]:
    """Header and non-blank rows of the CSV `name` in a sweep folder, with a 'rank' column;
    UserError naming the file and what is wrong otherwise."""
    path = folder / name
    if not folder.is_dir():
        raise UserError(f"sweep folder {folder} does not exist")
    if not path.is_file():
        raise UserError(f"{folder} is not a sweep folder with results (no {name})")
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
    for n, row in enumerate(body, start=1):
        if len(row) != len(header):
            raise UserError(f"{path} is damaged: row {n} has {len(row)} values for {len(header)} columns")
    return path, header, body


# summary.csv columns that hold words, not numbers
SUMMARY_TEXT = frozenset({"quality_path"})


def _table(path: Path, header: list[str], body: list[list[str]], numeric, words=frozenset()) -> dict[str, list]:
    """Columns of the rows; the `numeric` ones (all but `words` when None) as numbers, NaN for
    empty cells, ranks as ints >= 0."""
    table: dict[str, list] = {h: [] for h in header}
    for n, row in enumerate(body, start=1):
        for name, text in zip(header, row):
            if (numeric is not None and name not in numeric) or name in words:
                table[name].append(text)
                continue
            try:
                value = _number(text)
            except ValueError:
                value = math.nan
                if name != "rank":
                    raise UserError(f"{path} is damaged: row {n} has {name} {text!r}, not a number") from None
            if name == "rank":
                if value is None or not value >= 0 or value != int(value):
                    raise UserError(f"{path} is damaged: row {n} has rank {text!r}, not a whole number >= 0")
                value = int(value)
            table[name].append(math.nan if value is None else value)
    return table


def read_summary(sweep_dir: str | Path) -> pd.DataFrame:
    """summary.csv of a sweep as a table sorted by rank (ranks are ints, every other column
    numeric but the words of SUMMARY_TEXT, empty cells NaN). UserError naming the file, the row and the problem otherwise."""
    path, header, body = _read_rows(Path(sweep_dir), SUMMARY_FILE)
    table = _table(path, header, body, None, words=SUMMARY_TEXT)
    seen: set[int] = set()
    for rank in table["rank"]:
        if rank in seen:
            raise UserError(f"{path} is damaged: rank {rank} appears twice")
        seen.add(rank)
    return pd.DataFrame(table).sort_values("rank").reset_index(drop=True)


def read_per_prompt(sweep_dir: str | Path) -> pd.DataFrame:
    """per_prompt.csv of a sweep (one row per rank and prompt): rank as int, the scores as
    numbers (NaN when empty), the texts as written. UserError naming the file, the row and
    the problem otherwise."""
    path, header, body = _read_rows(Path(sweep_dir), PER_PROMPT_FILE)
    table = _table(path, header, body, PER_PROMPT_NUMBERS)
    if "id" in table:
        seen: set[tuple[int, str]] = set()
        for key in zip(table["rank"], table["id"]):
            if key in seen:
                raise UserError(f"{path} is damaged: rank {key[0]} of prompt {key[1]!r} appears twice")
            seen.add(key)
    return pd.DataFrame(table)
