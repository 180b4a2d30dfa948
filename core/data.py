"""Reading training data and evaluation sets, with errors that point at the line/row.

Formats (chosen by file extension, case-insensitive):
- `.jsonl`, `.json`: one JSON object per line. A `.json` file whose first non-blank
  character is `[` is read as one JSON array of objects instead (items are "rows").
- `.csv` (comma) and `.tsv` (tab): a header row, then one record per row.

Locations in errors: JSONL lines are 1-based physical lines of the file. CSV rows are
1-based data rows counted after the header, always reported with their file line, as
"row 3 (line 4)" (a quoted value spanning lines makes the two drift apart).

Only rows that carry no data are skipped (blank JSONL lines, CSV rows with every cell
empty); each skip is listed in `skipped`. Anything else that is wrong is an error:
silently dropping a malformed example would train or evaluate on less than the user
thinks.
"""
from __future__ import annotations

import csv
import io
import json
import os
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

from core.errors import DataError, UserError

TRAIN_EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv")
CHAT_ROLES = ("system", "user", "assistant")
# Streamlit's own default upload cap is 200 MB; training/eval text files are far smaller.
MAX_UPLOAD_BYTES = 50 * 1024 * 1024
# How many JSONL objects detect_columns looks at: keys are usually uniform, and the
# column-mapping UI must not wait for a full read of a large file.
DETECT_SCAN_ROWS = 200
# Records nest a few levels (messages → turn → text); far deeper nesting is damage or an
# attack, and Python's JSON reader would hit its recursion limit near 1000.
MAX_JSON_DEPTH = 64
# A \uD800-\uDFFF escape: the only way a lone surrogate (not a character, and not
# encodable as UTF-8) gets into text decoded from UTF-8.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE = re.compile("[\ud800-\udfff]")


# --------------------------------------------------------------------------- types


@dataclass
class Example:
    """One training example.

    prompt: the input text. For chat-format sources: when the turns before the last
        assistant turn are a single user message, its content; otherwise those turns
        rendered one per paragraph as "System: ...", "User: ...", "Assistant: ...",
        joined by blank lines (empty system messages left out).
    response: the target text (for chat sources, the last assistant message's content).
    messages: the original `[{role, content}, ...]` list when the source was chat
        format (so training can apply the model's chat template), else None.
    where: where it came from, e.g. "line 4" or "row 3 (line 4)" (for reports).
    """

    prompt: str
    response: str
    messages: list[dict] | None = None
    where: str | None = None


@dataclass
class TrainingData:
    """A parsed training file.

    examples: the examples in file order.
    path: the file (or upload name) they came from.
    skipped: one dict per skipped record: {"line": int, "row": int | None, "reason": str}.
    format: "jsonl", "json" (a JSON array) or "csv"/"tsv".
    """

    examples: list[Example]
    path: str
    skipped: list[dict] = field(default_factory=list)
    format: str = "jsonl"

    def __len__(self) -> int:
        return len(self.examples)


EVAL_SET_KEY = "set"  # optional field of an evaluation record: which named part of the evaluation it belongs to


@dataclass
class EvalItem:
    """One evaluation prompt.

    id: unique within the set; the record's row number (CSV data row, JSONL line) when
        the source gives none.
    prompt: the input given to the model.
    reference: the expected answer (for reference NLL, ROUGE-L and similarity).
    must_include: facts the answer should contain (for fact recall); may be empty.
    where: where it came from, e.g. "line 4" or "row 3 (line 4)".
    set: the named part of the evaluation it belongs to (the record's `set` field, else
        its file's name when several files are evaluated together; "" otherwise), so that a
        sweep can report, e.g., "FAQ recall" and "new wordings" apart.
    """

    id: str
    prompt: str
    reference: str
    must_include: list[str] = field(default_factory=list)
    where: str | None = None
    set: str = ""


@dataclass
class EvalSet:
    """A parsed evaluation set.

    items: the items in file order.
    path: the file (or upload name).
    skipped: as in TrainingData.
    warnings: things that did not stop loading but the user should see
        (ids filled in from row numbers, empty must_include entries dropped).
    format: as in TrainingData.
    """

    items: list[EvalItem]
    path: str
    skipped: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    format: str = "jsonl"

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class _Record:
    """One raw record before validation.

    value: the parsed JSON value, or for CSV the row as {column: text}.
    line: 1-based file line where the record starts (None inside a JSON array).
    row: CSV data row or JSON array item, 1-based (None for JSONL).
    is_csv: whether it came from a CSV/TSV file.
    """

    value: object
    line: int | None
    row: int | None = None
    is_csv: bool = False

    @property
    def where(self) -> str:
        if self.is_csv:
            return f"row {self.row} (line {self.line})"
        if self.row is not None:
            return f"item {self.row}"
        return f"line {self.line}"

    @property
    def number(self) -> int:
        """The number used as a default id: CSV row / array item, else JSONL line."""
        return self.row if self.row is not None else self.line


def _error(name: str, rec: _Record, problem: str) -> DataError:
    """A DataError located at `rec`.

    DataError(line=, row=) would print "line 4, row 3"; the convention here is
    "row 3 (line 4)", so for rows the location goes into the message and line/row are
    set afterwards for callers that highlight the spot.
    """
    if rec.row is None:
        return DataError(name, problem, line=rec.line)
    err = DataError(name, f"{rec.where}: {problem}")
    err.problem, err.line, err.row = problem, rec.line, rec.row
    return err


# ------------------------------------------------------------------ reading bytes


def _file_format(name: str) -> str:
    suffix = Path(name).suffix.lower()
    if suffix in (".jsonl", ".json"):
        return suffix[1:]
    if suffix in (".csv", ".tsv"):
        return suffix[1:]
    hint = " (export the sheet as CSV)" if suffix in (".xlsx", ".xls", ".ods") else ""
    shown = f"'{suffix}'" if suffix else "no extension"
    raise DataError(name, f"unknown file type {shown}{hint}; use one of {', '.join(TRAIN_EXTENSIONS)}")


def _read_bytes(path) -> bytes:
    p = Path(path)
    if not p.exists():
        raise DataError(p, "file not found")
    if p.is_dir():
        raise DataError(p, "is a folder, not a data file")
    if not p.is_file():
        # A pipe would block the read forever (and signals with it); a device never ends.
        raise DataError(p, "is not a regular file (a pipe, device or socket); give a data file")
    try:
        return p.read_bytes()
    except OSError as e:
        raise DataError(p, f"cannot read the file: {e.strerror or e}") from e


def _decode(name: str, raw: bytes) -> str:
    """UTF-8 text without a BOM, or a DataError saying where decoding failed."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(name, "file is UTF-16 encoded; save it as UTF-8")
    if raw.startswith(b"PK\x03\x04"):
        raise DataError(name, "file is a zip archive (an Excel workbook?), not text; export it as CSV or JSONL")
    try:
        # utf-8-sig drops the byte-order mark Excel puts in front of "CSV UTF-8" files.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line_start = raw.rfind(b"\n", 0, e.start) + 1
        line = raw.count(b"\n", 0, e.start) + 1
        bad = raw[e.start:e.start + 1].hex().upper()
        raise DataError(
            name,
            f"not UTF-8 text: byte 0x{bad} at byte offset {e.start} (byte {e.start - line_start + 1} "
            f"of the line) cannot be decoded; save the file as UTF-8",
            line=line,
        ) from e


def _lines(text: str) -> list[str]:
    """Physical lines. Not str.splitlines(): that also splits on U+2028 and friends,
    which JSON allows raw inside strings."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line; it does not start a new one
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _short(value, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------ raw records


def _iter_json_records(name: str, text: str, fmt: str, skipped: list[dict]) -> Iterator[_Record]:
    if _content_format(fmt, text) == "json":
        yield from _iter_json_array(name, text)
        return
    lines = _lines(text)
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            skipped.append({"line": i, "row": None, "reason": "blank line"})
            continue
        try:
            value = json.loads(line)
        except RecursionError:
            raise _too_deep(name, i) from None
        except json.JSONDecodeError as e:
            hint = ""
            if i == 1 and line.strip() in ("{", "["):
                hint = " (the file looks like pretty-printed JSON; JSONL needs one complete object per line)"
            raise DataError(name, f"not valid JSON: {e.msg} at column {e.colno}{hint}", line=i) from e
        yield _Record(value, i)


def _iter_json_array(name: str, text: str) -> Iterator[_Record]:
    try:
        values = json.loads(text)
    except RecursionError:
        raise _too_deep(name, None) from None
    except json.JSONDecodeError as e:
        raise DataError(name, f"not valid JSON: {e.msg} at column {e.colno}", line=e.lineno) from e
    if not isinstance(values, list):
        raise DataError(name, f"expected a JSON array of objects, got {_json_type(values)}")
    for i, value in enumerate(values, start=1):
        # Lines are unknown inside a parsed document, so items are located by position.
        yield _Record(value, None, row=i)


def _too_deep(name: str, line: int | None) -> DataError:
    return DataError(name, f"JSON nested more than {MAX_JSON_DEPTH} levels deep; a record is an object of texts", line=line)


def _nesting_exceeds(value, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def _lone_surrogate(value, path: str = "") -> tuple[str, str] | None:
    """(where, the escape) of the first lone surrogate in a parsed JSON value's texts or keys."""
    if isinstance(value, str):
        found = _SURROGATE.search(value)
        return (f"'{path}'" if path else "a value", f"\\u{ord(found.group()):04x}") if found else None
    if isinstance(value, dict):
        for key, child in value.items():
            name = _printable(key)
            if _SURROGATE.search(key):
                return f"the key '{name}'", _lone_surrogate(key)[1]
            hit = _lone_surrogate(child, f"{path}.{name}" if path else name)
            if hit:
                return hit
    elif isinstance(value, list):
        for i, child in enumerate(value):
            hit = _lone_surrogate(child, f"{path}[{i}]")
            if hit:
                return hit
    return None


def _printable(text: str) -> str:
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _checked_json(name: str, records: Iterator[_Record], text: str) -> Iterator[_Record]:
    """JSON records that nest sanely and hold only real characters (checked before any
    field is looked at, so no later step trips over them)."""
    maybe_surrogates = _SURROGATE_ESCAPE.search(text) is not None
    for rec in records:
        if _nesting_exceeds(rec.value, MAX_JSON_DEPTH):
            raise _error(name, rec, f"nested more than {MAX_JSON_DEPTH} levels deep; a record is an object of texts")
        hit = _lone_surrogate(rec.value) if maybe_surrogates else None
        if hit:
            raise _error(name, rec, f"{hit[0]} holds {hit[1]}, half of a UTF-16 surrogate pair without its other "
                                    "half: not a character; fix or remove that escape")
        yield rec


def _csv_reader(text: str, fmt: str):
    # Long answers exceed csv's default 128 KiB field limit; the limit is process-wide,
    # so only ever raise it.
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 28))
    # strict: an unclosed quote is an error, not a value that swallows the rest of the file.
    return csv.reader(io.StringIO(text, newline=""), delimiter="\t" if fmt == "tsv" else ",", strict=True)


def _csv_problem(e: csv.Error) -> str:
    """csv's terse errors, said so that the fix is clear."""
    text = str(e)
    if "unexpected end of data" in text:
        return ('a quoted value that starts here is never closed: a \" without its closing \"; '
                'a quote mark inside a quoted value must be doubled ("")')
    if "expected after" in text:
        return ('a closing quote is followed by more text; a quote mark inside a value must be doubled ("") '
                "and the whole value put in quotes")
    return f"cannot parse as CSV: {text}"


def _csv_header(name: str, reader) -> list[str]:
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise DataError(name, f"header: {_csv_problem(e)}", line=1) from e
    if header is None or not any(h.strip() for h in header):
        raise DataError(name, "the first line should be a header row naming the columns, but it is empty", line=1)
    return [h.strip() for h in header]


def _iter_csv_records(name: str, text: str, fmt: str, skipped: list[dict]) -> Iterator[_Record]:
    reader = _csv_reader(text, fmt)
    header = _csv_header(name, reader)
    row = 0
    while True:
        start_line = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            rec = _Record(None, start_line, row=row + 1, is_csv=True)
            raise _error(name, rec, _csv_problem(e)) from e
        row += 1
        rec = _Record(None, start_line, row=row, is_csv=True)
        if not any(c.strip() for c in cells):
            skipped.append({"line": start_line, "row": row, "reason": "empty row"})
            continue
        if len(cells) > len(header) and not any(c.strip() for c in cells[len(header):]):
            cells = cells[: len(header)]  # trailing empty cells, as spreadsheets often write
        if len(cells) > len(header):
            sep = "tab" if fmt == "tsv" else "comma"
            raise _error(
                name, rec,
                f"has {len(cells)} values but the header has {len(header)} columns; "
                f"is there an unquoted {sep} in a value? Put such values in double quotes",
            )
        # Short rows are allowed: the columns they lack read as empty, and the
        # per-column checks then name the missing value.
        rec.value = {h: (cells[i] if i < len(cells) else "") for i, h in enumerate(header)}
        yield rec


def _content_format(fmt: str, text: str) -> str:
    """The format actually read: "json" only for a `.json` file holding an array."""
    if fmt == "json":
        return "json" if text.lstrip().startswith("[") else "jsonl"
    return fmt


def _records(name: str, text: str, fmt: str, skipped: list[dict]) -> Iterator[_Record]:
    if fmt in ("csv", "tsv"):
        return _iter_csv_records(name, text, fmt, skipped)
    return _checked_json(name, _iter_json_records(name, text, fmt, skipped), text)


def _check_columns(name: str, text: str, fmt: str, wanted: list[str], what: str) -> None:
    """For CSV: fail early, naming the columns that exist, when a mapped one is absent."""
    if fmt not in ("csv", "tsv"):
        return
    header = _csv_header(name, _csv_reader(text, fmt))
    for col in wanted:
        count = header.count(col)
        if count > 1:
            raise DataError(name, f"the header has {count} columns named '{col}'; rename all but one", line=1)
    missing = [c for c in wanted if c not in header]
    if missing:
        raise DataError(name, _missing_columns_message(missing, header, fmt, what), line=1)


def _missing_columns_message(missing: list[str], header: list[str], fmt: str, what: str) -> str:
    names = ", ".join(f"'{c}'" for c in missing)
    found = ", ".join(f"'{h}'" for h in header)
    msg = f"no {names} column{'s' if len(missing) > 1 else ''} for the {what}; the header has: {found}"
    lower = {h.lower(): h for h in header}
    near = [f"'{lower[c.lower()]}' for '{c}'" for c in missing if c.lower() in lower]
    if near:
        msg += f" (did you mean {', '.join(near)}? column names are case-sensitive)"
    elif fmt == "csv" and len(header) == 1 and ";" in header[0]:
        msg += " (the file looks semicolon-separated; save it comma-separated)"
    else:
        msg += "; choose the columns to use"
    return msg


# ------------------------------------------------------------------ field checks


def _require_object(name: str, rec: _Record) -> dict:
    if not isinstance(rec.value, dict):
        hint = ""
        if isinstance(rec.value, list) and rec.line == 1:
            hint = " (a JSON array of records belongs in a .json file; JSONL has one object per line)"
        raise _error(name, rec, f"expected a JSON object {{...}}, got {_json_type(rec.value)}{hint}")
    return rec.value


def _text_field(name: str, rec: _Record, obj: dict, key: str, required: bool = True) -> str | None:
    """The non-empty string at obj[key]; None when absent and not required."""
    if key not in obj or (obj[key] is None and not required):
        if not required:
            return None
        found = ", ".join(f"'{k}'" for k in obj) or "none"
        thing = "column" if rec.is_csv else "key"
        raise _error(name, rec, f"missing {thing} '{key}' (found: {found})")
    value = obj[key]
    if not isinstance(value, str):
        raise _error(name, rec, f"'{key}' must be a string, got {_json_type(value)} ({_short(value)})")
    if not value.strip():
        raise _error(name, rec, f"'{key}' is empty")
    return value


def _render_turns(turns: list[dict]) -> str:
    turns = [t for t in turns if t["content"].strip()]  # only empty system turns remain to drop
    if len(turns) == 1 and turns[0]["role"] == "user":
        return turns[0]["content"]
    return "\n\n".join(f"{t['role'].capitalize()}: {t['content']}" for t in turns)


def _chat_example(name: str, rec: _Record, messages) -> Example:
    if not isinstance(messages, list) or not messages:
        what = "an empty list" if isinstance(messages, list) else _json_type(messages)
        raise _error(name, rec, f"'messages' must be a non-empty list of {{role, content}} objects, got {what}")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _error(name, rec, f"messages[{i}] must be an object {{role, content}}, got {_json_type(m)}")
        if "role" not in m and {"from", "value"} <= m.keys():
            raise _error(name, rec, f"messages[{i}] uses ShareGPT keys 'from'/'value'; use 'role'/'content'")
        for key in ("role", "content"):
            if key not in m:
                raise _error(name, rec, f"messages[{i}] has no '{key}'")
            if not isinstance(m[key], str):
                raise _error(name, rec, f"messages[{i}].{key} must be a string, got {_json_type(m[key])}")
        if m["role"] not in CHAT_ROLES:
            raise _error(name, rec, f"messages[{i}].role is '{m['role']}'; allowed roles: {', '.join(CHAT_ROLES)}")
        # An empty system prompt is common in exported chats and harmless; an empty
        # user or assistant turn is not.
        if m["role"] != "system" and not m["content"].strip():
            raise _error(name, rec, f"messages[{i}] ({m['role']}) has empty content")
        clean.append({"role": m["role"], "content": m["content"]})
    if clean[-1]["role"] != "assistant":
        raise _error(name, rec, f"the last message must be from the assistant (it is '{clean[-1]['role']}')")
    if not any(m["role"] == "user" for m in clean[:-1]):
        raise _error(name, rec, "'messages' needs a user message before the last assistant message")
    return Example(_render_turns(clean[:-1]), clean[-1]["content"], messages=clean, where=rec.where)


def _example(name: str, rec: _Record, prompt_col: str, response_col: str) -> Example:
    obj = _require_object(name, rec)
    # Chat format wins when both are present: it carries the turn structure.
    if "messages" in obj and not rec.is_csv:
        return _chat_example(name, rec, obj["messages"])
    prompt = _text_field(name, rec, obj, prompt_col)
    response = _text_field(name, rec, obj, response_col)
    return Example(prompt, response, where=rec.where)


# ------------------------------------------------------------------ training data


def _parse_training(name: str, raw: bytes, prompt_col: str, response_col: str) -> TrainingData:
    fmt = _file_format(name)
    if not raw.strip():
        raise DataError(name, "file is empty" if not raw else "file is empty (only blank lines)")
    text = _decode(name, raw)
    _check_columns(name, text, fmt, [prompt_col, response_col], "training data")
    skipped: list[dict] = []
    examples = [_example(name, rec, prompt_col, response_col) for rec in _records(name, text, fmt, skipped)]
    if not examples:
        raise DataError(name, f"no examples found{_skipped_note(skipped)}")
    return TrainingData(examples, name, skipped, _content_format(fmt, text))


def _skipped_note(skipped: list[dict]) -> str:
    return f" ({len(skipped)} blank/empty rows skipped)" if skipped else ""


def load_training_data(path, prompt_col: str = "prompt", response_col: str = "response") -> TrainingData:
    """Read a training file (JSONL `prompt`/`response` or `messages`; CSV/TSV with a header).

    prompt_col/response_col name the CSV columns (or JSONL keys) to use.
    Raises DataError naming the file, the line/row and the problem.
    """
    return _parse_training(str(path), _read_bytes(path), prompt_col, response_col)


# ------------------------------------------------------------------ evaluation sets


def _eval_id(name: str, rec: _Record, obj: dict, id_col: str) -> str | None:
    value = obj.get(id_col)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _error(name, rec, f"'{id_col}' must be a string or an integer, got {_json_type(value)} ({_short(value)})")
    return str(value).strip()


def _must_include(name: str, rec: _Record, obj: dict, col: str, csv_like: bool, warnings: list[str]) -> list[str]:
    value = obj.get(col)
    if value is None:
        return []
    if csv_like:
        # Empty pieces ("a;;b", a trailing ";", an empty cell) carry nothing: dropped quietly.
        return [p.strip() for p in value.split(";") if p.strip()]
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise _error(name, rec, f"'{col}' must be a JSON list of strings like [\"Paris\", \"1889\"], got {_short(value)}")
    kept = [p.strip() for p in value if p.strip()]
    # An empty fact would count as "found" in every answer, inflating fact recall.
    if len(kept) < len(value):
        warnings.append(f"{rec.where}: dropped {len(value) - len(kept)} empty '{col}' entry/entries")
    return kept


def _parse_eval(name: str, raw: bytes, prompt_col: str, reference_col: str, id_col: str, must_include_col: str) -> EvalSet:
    fmt = _file_format(name)
    if not raw.strip():
        raise DataError(name, "file is empty" if not raw else "file is empty (only blank lines)")
    text = _decode(name, raw)
    _check_columns(name, text, fmt, [prompt_col, reference_col], "evaluation set")
    csv_like = fmt in ("csv", "tsv")
    skipped: list[dict] = []
    warnings: list[str] = []
    items: list[EvalItem] = []
    first_seen: dict[str, tuple[_Record, bool]] = {}
    auto_ids = 0
    for rec in _records(name, text, fmt, skipped):
        obj = _require_object(name, rec)
        prompt = _text_field(name, rec, obj, prompt_col)
        reference = _text_field(name, rec, obj, reference_col)
        item_id = _eval_id(name, rec, obj, id_col)
        auto = item_id is None
        if auto:
            item_id = str(rec.number)
            auto_ids += 1
        if item_id in first_seen:
            other, other_auto = first_seen[item_id]
            note = " (ids are filled in from row numbers when missing; give every item an id)" if auto or other_auto else ""
            raise _error(name, rec, f"duplicate id '{item_id}': {other.where} has the same id{note}")
        first_seen[item_id] = (rec, auto)
        must = _must_include(name, rec, obj, must_include_col, csv_like, warnings)
        group = obj.get(EVAL_SET_KEY)
        items.append(EvalItem(item_id, prompt, reference, must, where=rec.where,
                              set=group.strip() if isinstance(group, str) else ""))
    if not items:
        raise DataError(name, f"no evaluation items found{_skipped_note(skipped)}")
    fmt = _content_format(fmt, text)
    if auto_ids:
        unit = {"csv": "row", "tsv": "row", "json": "item"}.get(fmt, "line")
        warnings.insert(0, f"{auto_ids} item(s) have no '{id_col}'; their {unit} number is used as the id")
    return EvalSet(items, name, skipped, warnings, fmt)


def load_eval_set(
    path,
    prompt_col: str = "prompt",
    reference_col: str = "reference",
    id_col: str = "id",
    must_include_col: str = "must_include",
) -> EvalSet:
    """Read an evaluation set (JSONL or CSV/TSV): id (optional), prompt, reference,
    must_include (optional; a JSON list of strings in JSONL, `;`-separated in CSV).

    Raises DataError for an empty prompt, a missing/empty reference, or duplicate ids
    (naming both rows).
    """
    return _parse_eval(str(path), _read_bytes(path), prompt_col, reference_col, id_col, must_include_col)


def load_eval_sets(paths, **columns) -> EvalSet:
    """One or several evaluation files as one set; items of a file that names no `set` are
    labelled with the file's name (without extension). Ids must be unique across files."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if len(paths) == 1:
        return load_eval_set(paths[0], **columns)
    items, skipped, warnings, seen = [], [], [], {}
    for path in paths:
        part = load_eval_set(path, **columns)
        for item in part.items:
            if item.id in seen:
                raise DataError(path, f"duplicate id '{item.id}': {seen[item.id]} has the same id (ids must be unique across the files)")
            seen[item.id] = f"{path}, {item.where}"
            items.append(item if item.set else replace(item, set=Path(path).stem))
        skipped += [dict(s, file=str(path)) for s in part.skipped]
        warnings += [f"{Path(path).name}: {w}" for w in part.warnings]
    return EvalSet(items, ", ".join(map(str, paths)), skipped, warnings, "mixed")


# ------------------------------------------------------------------ UI helpers


def preview_rows(path, n: int = 20) -> list[dict]:
    """The first `n` records as they are in the file, unvalidated, for a preview table.

    JSONL objects come back as parsed (a non-object line is shown as {"value": ...});
    CSV rows as {column: text}. Blank lines are left out. Raises DataError when the
    file cannot be read, decoded or parsed within those records.
    """
    name = str(path)
    fmt = _file_format(name)
    text = _decode(name, _read_bytes(path))
    rows: list[dict] = []
    for rec in _records(name, text, fmt, []):
        if len(rows) >= n:
            break
        rows.append(rec.value if isinstance(rec.value, dict) else {"value": rec.value})
    return rows


def detect_columns(path) -> list[str]:
    """Column names (CSV header) or keys (union over the first DETECT_SCAN_ROWS JSON
    objects, in order of first appearance), for a column-mapping UI."""
    name = str(path)
    fmt = _file_format(name)
    text = _decode(name, _read_bytes(path))
    if fmt in ("csv", "tsv"):
        return _csv_header(name, _csv_reader(text, fmt))
    keys: dict[str, None] = {}
    for i, rec in enumerate(_records(name, text, fmt, [])):
        if i >= DETECT_SCAN_ROWS:
            break
        if isinstance(rec.value, dict):
            keys.update(dict.fromkeys(rec.value))
    return list(keys)


def train_eval_split(examples: list[Example], eval_fraction: float, seed: int = 0) -> tuple[list[Example], list[EvalItem]]:
    """Hold out round(len × eval_fraction) examples (at least 1 when the fraction is > 0)
    as EvalItems: reference = response, no must_include, id "train-N" with N the
    example's 1-based position. Both lists keep file order; the choice depends only on
    `seed` and the number of examples.
    """
    if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, (int, float)) or not 0 <= eval_fraction < 1:
        raise UserError(f"eval fraction must be a number in [0, 1), got {eval_fraction!r}")
    n = len(examples)
    n_eval = max(1, round(n * eval_fraction)) if eval_fraction > 0 else 0
    if n_eval and n - n_eval < 1:
        raise UserError(f"cannot hold out {n_eval} of {n} example(s) for evaluation and still train on any")
    held = set(random.Random(seed).sample(range(n), n_eval))
    train = [ex for i, ex in enumerate(examples) if i not in held]
    items = [
        EvalItem(f"train-{i + 1}", ex.prompt, ex.response, [], where=ex.where)
        for i, ex in enumerate(examples) if i in held
    ]
    return train, items


def validate_upload(
    data: bytes | str | os.PathLike,
    name: str | None = None,
    *,
    kind: str = "train",
    max_bytes: int = MAX_UPLOAD_BYTES,
    **columns: str,
) -> TrainingData | EvalSet:
    """Check an upload before it is stored: size, extension, UTF-8, and a full parse.

    data: the uploaded bytes (e.g. `uploaded.getvalue()`), or a path to a file.
    name: the upload's file name (sets the format and appears in errors); required
        for bytes.
    kind: "train" (→ TrainingData) or "eval" (→ EvalSet).
    columns: column mapping passed on, e.g. prompt_col="question".
    """
    if kind not in ("train", "eval"):
        raise ValueError(f"kind must be 'train' or 'eval', got {kind!r}")
    allowed = _UPLOAD_COLUMNS[kind]
    unknown = sorted(set(columns) - set(allowed))
    if unknown:
        raise ValueError(f"unknown column argument(s) {unknown} for kind={kind!r}; valid: {list(allowed)}")
    if isinstance(data, (bytes, bytearray)):
        if not name:
            raise ValueError("name is required when data is bytes")
        size = len(data)
    else:
        name = name or str(data)
        p = Path(data)
        size = p.stat().st_size if p.is_file() else 0
    if size > max_bytes:
        raise DataError(name, f"file is {_size(size)}; the upload limit is {_size(max_bytes)}")
    _file_format(name)  # reject an unknown type before reading anything
    raw = bytes(data) if isinstance(data, (bytes, bytearray)) else _read_bytes(data)
    cols = {**allowed, **columns}
    if kind == "train":
        return _parse_training(name, raw, cols["prompt_col"], cols["response_col"])
    return _parse_eval(name, raw, cols["prompt_col"], cols["reference_col"], cols["id_col"], cols["must_include_col"])


# Column arguments validate_upload accepts per kind, with their defaults.
_UPLOAD_COLUMNS = {
    "train": {"prompt_col": "prompt", "response_col": "response"},
    "eval": {"prompt_col": "prompt", "reference_col": "reference", "id_col": "id", "must_include_col": "must_include"},
}
