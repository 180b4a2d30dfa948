"""core.data: formats, and an error naming the line/row and the problem for each bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.data import (
    EvalItem,
    Example,
    detect_columns,
    load_eval_set,
    load_training_data,
    preview_rows,
    train_eval_split,
    validate_upload,
)
from core.errors import DataError, UserError

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def jsonl(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def data_error(fn, *args, **kwargs) -> DataError:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    return info.value


OK = {"prompt": "p", "response": "r"}


# ----------------------------------------------------------------- training: good


def test_jsonl_prompt_response_and_blank_lines_skipped(tmp_path):
    path = write(tmp_path, "t.jsonl", jsonl(OK, "", "   ", {"prompt": "a", "response": "b", "extra": 1}))
    data = load_training_data(path)
    assert [(e.prompt, e.response, e.messages) for e in data.examples] == [("p", "r", None), ("a", "b", None)]
    assert [s["line"] for s in data.skipped] == [2, 3]
    assert data.examples[1].where == "line 4"
    assert data.format == "jsonl" and data.path == str(path)


def test_jsonl_crlf_and_no_final_newline(tmp_path):
    path = write(tmp_path, "t.jsonl", json.dumps(OK) + "\r\n" + json.dumps(OK))
    data = load_training_data(path)
    assert len(data) == 2 and data.skipped == []


def test_chat_messages_single_turn_and_multi_turn(tmp_path):
    single = {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "hello"}]}
    multi = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
                          {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
                          {"role": "assistant", "content": "A2"}]}
    data = load_training_data(write(tmp_path, "c.jsonl", jsonl(single, multi)))
    a, b = data.examples
    assert (a.prompt, a.response) == ("hi", "hello")
    assert a.messages == single["messages"]
    assert b.prompt == "System: Be brief.\n\nUser: Q1\n\nAssistant: A1\n\nUser: Q2"
    assert b.response == "A2"


def test_csv_with_mapped_columns_and_row_numbers(tmp_path):
    text = 'question,answer\nq1,a1\n,\n"multi\nline q","a, with comma"\n'
    data = load_training_data(write(tmp_path, "t.csv", text), prompt_col="question", response_col="answer")
    assert [(e.prompt, e.response) for e in data.examples] == [("q1", "a1"), ("multi\nline q", "a, with comma")]
    assert data.skipped == [{"line": 3, "row": 2, "reason": "empty row"}]
    assert data.examples[1].where == "row 3 (line 4)"


def test_csv_trailing_empty_cells_are_ignored(tmp_path):
    data = load_training_data(write(tmp_path, "t.csv", "prompt,response\nq,a,,\n"))
    assert (data.examples[0].prompt, data.examples[0].response) == ("q", "a")


def test_tsv_and_bom(tmp_path):
    data = load_training_data(write(tmp_path, "t.tsv", b"\xef\xbb\xbfprompt\tresponse\nq\ta, b\n"))
    assert (data.examples[0].prompt, data.examples[0].response) == ("q", "a, b")


def test_json_array_file(tmp_path):
    path = write(tmp_path, "t.json", json.dumps([OK, OK]))
    assert load_training_data(path).format == "json"
    err = data_error(load_training_data, write(tmp_path, "u.json", json.dumps([OK, {"prompt": "p"}])))
    assert err.row == 2 and "item 2" in str(err) and "missing key 'response'" in str(err)


# ----------------------------------------------------------------- training: errors


@pytest.mark.parametrize(
    "content, line, fragment",
    [
        (jsonl(OK, '{"prompt": "p", "response": '), 2, "not valid JSON"),
        (jsonl(OK, [1, 2]), 2, "expected a JSON object"),
        (jsonl(OK, OK, {"prompt": "p"}), 3, "missing key 'response'"),
        (jsonl({"prompt": "p", "response": "  "}), 1, "'response' is empty"),
        (jsonl(OK, {"prompt": "p", "response": 42}), 2, "'response' must be a string, got a number (42)"),
        (jsonl({"prompt": None, "response": "r"}), 1, "'prompt' must be a string, got null"),
        ('{\n  "prompt": "p"\n}\n', 1, "pretty-printed JSON"),
        (jsonl({"messages": []}), 1, "non-empty list"),
        (jsonl({"messages": [{"role": "user", "content": "q"}]}), 1, "last message must be from the assistant"),
        (jsonl({"messages": [{"role": "assistant", "content": "a"}]}), 1, "needs a user message"),
        (jsonl({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}), 1,
         "messages[1].role is 'bot'"),
        (jsonl({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}), 1,
         "messages[1] (assistant) has empty content"),
        (jsonl({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}), 1,
         "messages[0].content must be a string"),
        (jsonl({"messages": [{"from": "human", "value": "q"}]}), 1, "ShareGPT"),
    ],
)
def test_jsonl_errors_name_line_and_problem(tmp_path, content, line, fragment):
    err = data_error(load_training_data, write(tmp_path, "bad.jsonl", content))
    assert err.line == line
    assert f"line {line}:" in str(err)
    assert fragment in str(err)


def test_not_utf8_names_line_and_byte(tmp_path):
    first = jsonl(OK).encode()
    err = data_error(load_training_data, write(tmp_path, "bad.jsonl", first + b'{"prompt": "caf\xe9"}\n'))
    assert err.line == 2
    offset = len(first) + len(b'{"prompt": "caf')
    assert "not UTF-8" in str(err) and "0xE9" in str(err)
    assert f"byte offset {offset} (byte 16 of the line)" in str(err)


def test_utf16_is_named(tmp_path):
    err = data_error(load_training_data, write(tmp_path, "t.csv", "prompt,response\nq,a\n".encode("utf-16")))
    assert "UTF-16" in str(err)


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("empty.jsonl", b"", "file is empty"),
        ("blank.jsonl", b"\n  \n", "file is empty"),
        ("data.txt", b"x", "unknown file type '.txt'"),
        ("data.xlsx", b"x", "export the sheet as CSV"),
        ("header_only.csv", b"prompt,response\n", "no examples found"),
        ("only_empty_rows.csv", b"prompt,response\n,\n", "1 blank/empty rows skipped"),
    ],
)
def test_file_level_errors(tmp_path, name, content, fragment):
    err = data_error(load_training_data, write(tmp_path, name, content))
    assert fragment in str(err)


def test_missing_file_and_folder(tmp_path):
    assert "file not found" in str(data_error(load_training_data, tmp_path / "nope.jsonl"))
    (tmp_path / "dir.jsonl").mkdir()
    assert "is a folder" in str(data_error(load_training_data, tmp_path / "dir.jsonl"))


def test_csv_missing_columns_lists_existing_ones(tmp_path):
    err = data_error(load_training_data, write(tmp_path, "t.csv", "question,reply\nq,a\n"))
    assert err.line == 1
    assert "'prompt', 'response'" in str(err) and "'question', 'reply'" in str(err)
    err = data_error(load_training_data, write(tmp_path, "u.csv", "Prompt,response\nq,a\n"))
    assert "did you mean 'Prompt'" in str(err)
    err = data_error(load_training_data, write(tmp_path, "v.csv", "prompt;response\nq;a\n"))
    assert "semicolon" in str(err)


@pytest.mark.parametrize(
    "content, row, line, fragment",
    [
        ("prompt,response\nq,a\nq2,\n", 2, 3, "'response' is empty"),
        ("prompt,response\nq,a\nq2\n", 2, 3, "'response' is empty"),
        ("prompt,response\nq,a\n,\nq,a,extra\n", 3, 4, "has 3 values but the header has 2"),
        ('prompt,response\n"multi\nline",a\n  ,x\n', 2, 4, "'prompt' is empty"),
    ],
)
def test_csv_errors_name_row_and_line(tmp_path, content, row, line, fragment):
    err = data_error(load_training_data, write(tmp_path, "t.csv", content))
    assert (err.row, err.line) == (row, line)
    assert f"row {row} (line {line}): " in str(err)
    assert fragment in str(err)


# ----------------------------------------------------------------- evaluation sets


def test_eval_jsonl_and_default_ids(tmp_path):
    path = write(tmp_path, "e.jsonl", jsonl(
        {"id": "q1", "prompt": "p", "reference": "r", "must_include": ["Paris", " 1889 "]},
        "",
        {"prompt": "p2", "reference": "r2"},
        {"id": 7, "prompt": "p3", "reference": "r3", "must_include": ["x", ""]},
    ))
    ev = load_eval_set(path)
    assert [(i.id, i.must_include) for i in ev.items] == [("q1", ["Paris", "1889"]), ("3", []), ("7", ["x"])]
    assert ev.skipped[0]["line"] == 2
    assert any("no 'id'" in w for w in ev.warnings)
    assert any("line 4" in w and "empty" in w for w in ev.warnings)


def test_eval_csv_semicolon_must_include(tmp_path):
    text = "id,prompt,reference,must_include\na,p,r,Leipzig; 2017;\nb,p,r,\n,p,r,x\n"
    ev = load_eval_set(write(tmp_path, "e.csv", text))
    assert [(i.id, i.must_include) for i in ev.items] == [("a", ["Leipzig", "2017"]), ("b", []), ("3", ["x"])]
    assert ev.items[0] == EvalItem("a", "p", "r", ["Leipzig", "2017"], where="row 1 (line 2)")


def test_eval_csv_custom_columns(tmp_path):
    ev = load_eval_set(write(tmp_path, "e.csv", "q,ans\nhello,world\n"), prompt_col="q", reference_col="ans")
    assert (ev.items[0].id, ev.items[0].prompt, ev.items[0].reference) == ("1", "hello", "world")


@pytest.mark.parametrize(
    "rows, line, fragment",
    [
        ([{"id": "a", "prompt": "", "reference": "r"}], 1, "'prompt' is empty"),
        ([{"id": "a", "prompt": "p", "reference": "r"}, {"id": "b", "prompt": "p"}], 2, "missing key 'reference'"),
        ([{"id": "a", "prompt": "p", "reference": " "}], 1, "'reference' is empty"),
        ([{"id": "a", "prompt": "p", "reference": "r", "must_include": "Paris"}], 1, "JSON list of strings"),
        ([{"id": "a", "prompt": "p", "reference": "r", "must_include": [1]}], 1, "JSON list of strings"),
        ([{"id": [1], "prompt": "p", "reference": "r"}], 1, "'id' must be a string or an integer"),
        ([{"id": "a", "prompt": "p", "reference": "r"}, {"id": "b", "prompt": "p", "reference": "r"},
          {"id": "a", "prompt": "p", "reference": "r"}], 3, "duplicate id 'a': line 1 has the same id"),
        ([{"id": "2", "prompt": "p", "reference": "r"}, {"prompt": "p", "reference": "r"}], 2,
         "filled in from row numbers"),
    ],
)
def test_eval_errors(tmp_path, rows, line, fragment):
    err = data_error(load_eval_set, write(tmp_path, "e.jsonl", jsonl(*rows)))
    assert err.line == line and fragment in str(err)


def test_eval_csv_duplicate_names_both_rows(tmp_path):
    err = data_error(load_eval_set, write(tmp_path, "e.csv", "id,prompt,reference\na,p,r\nb,p,r\na,p,r\n"))
    assert "row 3 (line 4): duplicate id 'a': row 1 (line 2) has the same id" in str(err)


def test_eval_csv_missing_reference_column(tmp_path):
    err = data_error(load_eval_set, write(tmp_path, "e.csv", "id,prompt,response\na,p,r\n"))
    assert "no 'reference' column" in str(err) and "'id', 'prompt', 'response'" in str(err)


# ----------------------------------------------------------------- UI helpers


def test_preview_and_detect_columns(tmp_path):
    path = write(tmp_path, "t.jsonl", jsonl(OK, "", {"prompt": "a", "response": "b", "source": "x"}, [1]))
    assert preview_rows(path, n=2) == [OK, {"prompt": "a", "response": "b", "source": "x"}]
    assert preview_rows(path)[-1] == {"value": [1]}
    assert detect_columns(path) == ["prompt", "response", "source"]
    csv_path = write(tmp_path, "t.csv", " question , answer\nq,a\n")
    assert detect_columns(csv_path) == ["question", "answer"]
    assert preview_rows(csv_path) == [{"question": "q", "answer": "a"}]


def test_train_eval_split_is_deterministic_and_keeps_order():
    examples = [Example(f"p{i}", f"r{i}") for i in range(10)]
    train, held = train_eval_split(examples, 0.2, seed=1)
    assert len(train) == 8 and len(held) == 2
    assert train_eval_split(examples, 0.2, seed=1) == (train, held)
    assert {e.prompt for e in train} | {i.prompt for i in held} == {e.prompt for e in examples}
    assert [int(i.id.split("-")[1]) for i in held] == sorted(int(i.id.split("-")[1]) for i in held)
    assert all(i.reference == "r" + i.prompt[1:] and i.must_include == [] for i in held)
    assert train_eval_split(examples, 0.0, seed=1) == (examples, [])
    assert len(train_eval_split(examples[:3], 0.01, seed=0)[1]) == 1  # at least one when > 0
    with pytest.raises(UserError):
        train_eval_split(examples[:1], 0.5, seed=0)
    with pytest.raises(UserError):
        train_eval_split(examples, 1.0, seed=0)


def test_validate_upload(tmp_path):
    data = validate_upload(b"question,answer\nq,a\n", "up.csv", prompt_col="question", response_col="answer")
    assert data.examples[0].response == "a"
    ev = validate_upload(jsonl({"prompt": "p", "reference": "r"}).encode(), "e.jsonl", kind="eval")
    assert ev.items[0].id == "1"
    assert "upload limit is 10 bytes" in str(data_error(validate_upload, b"x" * 11, "big.jsonl", max_bytes=10))
    assert "unknown file type" in str(data_error(validate_upload, b"x", "a.exe"))
    assert "not UTF-8" in str(data_error(validate_upload, b"prompt,response\n\xff,a\n", "a.csv"))
    with pytest.raises(ValueError):
        validate_upload(b"x", "a.csv", reference_col="x")  # not a training column
    assert len(validate_upload(write(tmp_path, "t.jsonl", jsonl(OK)))) == 1


# ----------------------------------------------------------------- sample_data/


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


@pytest.mark.parametrize(
    "name, kwargs",
    [("train.jsonl", {}), ("train_chat.jsonl", {}),
     ("train.csv", {"prompt_col": "question", "response_col": "answer"})],
)
def test_sample_training_files_load(name, kwargs):
    data = load_training_data(_need(SAMPLE / name), **kwargs)
    assert len(data) > 0 and data.skipped == []
    assert all(e.prompt.strip() and e.response.strip() for e in data.examples)


@pytest.mark.parametrize("name", ["eval.jsonl", "eval.csv"])
def test_sample_eval_files_load(name):
    ev = load_eval_set(_need(SAMPLE / name))
    assert len(ev) > 0 and len({i.id for i in ev.items}) == len(ev)
    # README: each must_include string appears verbatim in the reference.
    assert all(m in i.reference for i in ev.items for m in i.must_include)


def test_sample_eval_formats_agree():
    a, b = load_eval_set(_need(SAMPLE / "eval.jsonl")), load_eval_set(_need(SAMPLE / "eval.csv"))
    assert [(i.id, i.prompt, i.reference, i.must_include) for i in a.items] == \
           [(i.id, i.prompt, i.reference, i.must_include) for i in b.items]


@pytest.mark.parametrize(
    "name, loader, kwargs, line, fragment",
    [
        ("bad_json_line.jsonl", load_training_data, {}, 3, "not valid JSON"),
        ("missing_response.jsonl", load_training_data, {}, 2, "missing key 'response'"),
        ("empty_response.jsonl", load_training_data, {}, 4, "'response' is empty"),
        ("not_utf8.csv", load_training_data, {"prompt_col": "question", "response_col": "answer"}, 2, "not UTF-8"),
        ("empty.jsonl", load_training_data, {}, None, "file is empty"),
        ("missing_column.csv", load_training_data, {"prompt_col": "question", "response_col": "answer"}, 1,
         "no 'answer' column"),
        ("eval_duplicate_ids.jsonl", load_eval_set, {}, 3, "duplicate id 'e1': line 1"),
        ("eval_missing_reference.jsonl", load_eval_set, {}, 2, "missing key 'reference'"),
    ],
)
def test_sample_bad_files(name, loader, kwargs, line, fragment):
    err = data_error(loader, _need(SAMPLE / "bad" / name), **kwargs)
    assert err.line == line and fragment in str(err)


def test_every_sample_bad_file_is_rejected():
    bad = sorted((SAMPLE / "bad").glob("*")) if (SAMPLE / "bad").is_dir() else []
    if not bad:
        pytest.skip("no sample_data/bad files")
    for path in bad:
        loader = load_eval_set if path.name.startswith("eval") else load_training_data
        with pytest.raises(DataError):
            loader(path)
