"""A generated corpus of bad inputs, each tried as a new user (or a hostile one) would.

Two families:
- data files: (file kind × encoding × field type × structure), fed to `qdylora train`
  (training sets) or `qdylora sweep` (evaluation sets) and to the Data page's save
  (`create_dataset`);
- the CLI: (command × flag × bad value), and the launch forms' values (Train, Sweep,
  Export pages).

Every case must end in exit code 2 (or, on a page, a UserError the page shows), a
one-line message naming the problem, no traceback, and nothing written or changed in any
existing folder (a snapshot of all of them is compared) and no new output folder. Fast:
nothing here loads a model; the only run is the shared tiny one (tests/conftest.py).
"""
from __future__ import annotations

import codecs
import csv
import io
import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from core import proc
from core.errors import UserError
from tests.conftest import SAMPLE
from tests.helpers import snapshot

GOOD = {"prompt": "What does the QB-100 cost?", "response": "It costs 89 euros, VAT included."}
GOOD_EVAL = {"id": "e1", "prompt": "Who founded Quillhaven?", "reference": "Ilse Varga founded it.",
             "must_include": ["Ilse Varga"]}


def nested(depth: int):
    value: object = "x"
    for _ in range(depth):
        value = [value]
    return value


# ---------------------------------------------------------------- data files


def jsonl(*rows) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def json_array(*rows) -> bytes:
    return json.dumps(list(rows), indent=1).encode()


def table(rows: list[list[str]], delimiter: str = ",") -> bytes:
    buf = io.StringIO()
    csv.writer(buf, delimiter=delimiter, lineterminator="\n").writerows(rows)
    return buf.getvalue().encode()


# A JSON value where a text belongs → words its message must contain.
BAD_TEXT_VALUES = {
    "number": (5, "must be a string"),
    "float-nan": (float("nan"), "must be a string"),
    "null": (None, "must be a string"),
    "list": (["a"], "must be a string"),
    "object": ({"text": "a"}, "must be a string"),
    "bool": (True, "must be a string"),
    "empty": ("", "is empty"),
    "blank": (" \t ", "is empty"),
    "lone-surrogate": ("caf\ud800e", "surrogate"),
    "deep": (nested(80), "nested more than"),
}
# Bytes of a whole file in an encoding that is not UTF-8 → words.
ENCODINGS = {
    "utf16-le": (lambda text: codecs.BOM_UTF16_LE + text.encode("utf-16-le"), "UTF-16"),
    "utf16-be": (lambda text: codecs.BOM_UTF16_BE + text.encode("utf-16-be"), "UTF-16"),
    "latin1": (lambda text: text.replace("euros", "café").encode("latin-1"), "not UTF-8"),
    "cp1252-quotes": (lambda text: text.replace("What", "\u201cWhat\u201d").encode("cp1252"), "not UTF-8"),
    "zip": (lambda text: b"PK\x03\x04" + text.encode(), "zip"),
    "binary": (lambda text: bytes(range(256)) * 4, "not UTF-8"),
}


def training_cases() -> list:
    """(id, file name, bytes, words) for bad training files."""
    cases = []
    for field in ("prompt", "response"):
        for name, (value, words) in BAD_TEXT_VALUES.items():
            bad = {**GOOD, field: value}
            cases.append((f"jsonl-{field}-{name}", "t.jsonl", jsonl(GOOD, bad), [words, "line 2"]))
            cases.append((f"json-{field}-{name}", "t.json", json_array(GOOD, bad), [words, "item 2"]))
        for name, cell in (("empty", ""), ("blank", "   ")):
            for kind, delim in (("csv", ","), ("tsv", "\t")):
                row = [GOOD["prompt"], cell] if field == "response" else [cell, GOOD["response"]]
                cases.append((f"{kind}-{field}-{name}", f"t.{kind}",
                               table([["prompt", "response"], [GOOD["prompt"], GOOD["response"]], row], delim),
                               [f"'{field}' is empty", "row 2"]))
    structures = {
        "missing-prompt": (jsonl({"response": "x"}), ["missing key 'prompt'"]),
        "missing-response": (jsonl(GOOD, {"prompt": "x"}), ["missing key 'response'", "line 2"]),
        "line-is-array": (jsonl(GOOD, [1, 2]), ["expected a JSON object"]),
        "line-is-string": (jsonl(GOOD, '"just text"'), ["expected a JSON object"]),
        "line-is-number": (jsonl(GOOD, "7"), ["expected a JSON object"]),
        "truncated-line": (jsonl(GOOD, '{"prompt": "a", "response": '), ["not valid JSON", "line 2"]),
        "trailing-comma": (jsonl('{"prompt": "a", "response": "b",}'), ["not valid JSON"]),
        "single-quotes": (jsonl("{'prompt': 'a', 'response': 'b'}"), ["not valid JSON"]),
        "raw-control-char": (b'{"prompt": "a\x01b", "response": "c"}\n', ["not valid JSON"]),
        "pretty-printed": (json.dumps(GOOD, indent=2).encode(), ["pretty-printed"]),
        "deep-line": (b"[" * 100_000 + b"\n", ["nested more than"]),
        "deep-object-line": (b'{"a":' * 50_000 + b"\n", ["nested more than"]),
        "deep-extra-field": (jsonl({**GOOD, "meta": nested(100)}), ["nested more than"]),
        "surrogate-in-key": (b'{"prompt": "a", "response": "b", "\\udc01x": 1}\n', ["surrogate", "key"]),
        "messages-not-list": (jsonl({"messages": "hi"}), ["'messages' must be a non-empty list"]),
        "messages-empty": (jsonl({"messages": []}), ["non-empty list"]),
        "message-not-object": (jsonl({"messages": ["hi", "there"]}), ["must be an object"]),
        "message-no-role": (jsonl({"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}),
                            ["has no 'role'"]),
        "message-bad-role": (jsonl({"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "a"}]}),
                             ["allowed roles"]),
        "message-content-number": (jsonl({"messages": [{"role": "user", "content": 5},
                                                       {"role": "assistant", "content": "a"}]}), ["must be a string"]),
        "message-surrogate": (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": '
                              b'"\\udfff"}]}\n', ["surrogate", "messages[1].content"]),
        "last-not-assistant": (jsonl({"messages": [{"role": "user", "content": "hi"}]}), ["last message"]),
        "no-user-turn": (jsonl({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}),
                         ["needs a user message"]),
        "sharegpt-keys": (jsonl({"messages": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a"}]}),
                          ["ShareGPT"]),
        "empty-user-turn": (jsonl({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "a"}]}),
                            ["empty content"]),
    }
    cases += [(f"jsonl-{k}", "t.jsonl", raw, words) for k, (raw, words) in structures.items()]
    arrays = {
        "items-are-numbers": (b"[1, 2]", ["expected a JSON object", "item 1"]),
        "unclosed": (b'[{"prompt": "a", "response": "b"}', ["not valid JSON"]),
        "deep": (b"[" * 100_000, ["nested more than"]),
        "deep-item": (json_array(GOOD, {**GOOD, "x": nested(70)}), ["nested more than", "item 2"]),
        "surrogate-item": (b'[{"prompt": "\\ud834", "response": "b"}]', ["surrogate", "item 1"]),
        "empty-array": (b"[]", ["no examples"]),
    }
    cases += [(f"json-{k}", "t.json", raw, words) for k, (raw, words) in arrays.items()]
    tables = {
        "no-prompt-column": ([["question", "response"], ["a", "b"]], ["no 'prompt' column", "question"]),
        "no-response-column": ([["prompt", "answer"], ["a", "b"]], ["no 'response' column"]),
        "case-mismatch": ([["Prompt", "response"], ["a", "b"]], ["case-sensitive"]),
        "duplicate-column": ([["prompt", "prompt", "response"], ["a", "b", "c"]], ["columns named 'prompt'"]),
        "too-many-values": ([["prompt", "response"], ["a", "b", "c"]], ["3 values", "2 columns"]),
        "header-only": ([["prompt", "response"]], ["no examples found"]),
        "empty-rows-only": ([["prompt", "response"], ["", ""], [" ", ""]], ["no examples found", "skipped"]),
    }
    for kind, delim in (("csv", ","), ("tsv", "\t")):
        cases += [(f"{kind}-{k}", f"t.{kind}", table(rows, delim), words) for k, (rows, words) in tables.items()]
        cases.append((f"{kind}-unclosed-quote", f"t.{kind}",
                      f'prompt{delim}response\n"a{delim}b\nc{delim}d\n'.encode(), ["never closed", "row 1"]))
        cases.append((f"{kind}-unclosed-quote-last-cell", f"t.{kind}",
                      f'prompt{delim}response\nq{delim}"unfinished answer\nq2{delim}a2\n'.encode(), ["never closed"]))
        cases.append((f"{kind}-stray-quote", f"t.{kind}",
                      f'prompt{delim}response\n"a"x{delim}b\n'.encode(), ["closing quote"]))
        cases.append((f"{kind}-empty-header", f"t.{kind}", f"\n{GOOD['prompt']}{delim}b\n".encode(), ["header row"]))
    cases.append(("csv-semicolons", "t.csv", b"prompt;response\na;b\n", ["semicolon"]))
    text = jsonl(GOOD).decode()
    for kind in ("jsonl", "json", "csv", "tsv"):
        source = text if kind in ("jsonl", "json") else "prompt,response\nWhat,It costs 89 euros\n".replace(
            ",", "\t" if kind == "tsv" else ",")
        for name, (encode, words) in ENCODINGS.items():
            cases.append((f"{kind}-{name}", f"t.{kind}", encode(source), [words]))
        cases.append((f"{kind}-empty-file", f"t.{kind}", b"", ["empty"]))
        cases.append((f"{kind}-blank-file", f"t.{kind}", b"\n \n\n", ["empty"]))
    for name, words in (("t.txt", ["unknown file type"]), ("t.xlsx", ["export the sheet as CSV"]),
                        ("train", ["no extension"]), ("t.parquet", ["unknown file type"])):
        cases.append((f"extension-{name}", name, jsonl(GOOD), words))
    return cases


def eval_cases() -> list:
    """(id, file name, bytes, words) for bad evaluation sets."""
    two = {**GOOD_EVAL, "id": "e2"}
    structures = {
        "missing-reference": (jsonl({"prompt": "a"}), ["missing key 'reference'"]),
        "reference-number": (jsonl({"prompt": "a", "reference": 3}), ["'reference' must be a string"]),
        "empty-prompt": (jsonl({"prompt": "", "reference": "r"}), ["'prompt' is empty"]),
        "duplicate-ids": (jsonl(GOOD_EVAL, GOOD_EVAL), ["duplicate id 'e1'"]),
        "id-object": (jsonl({**GOOD_EVAL, "id": {"a": 1}}), ["'id' must be a string or an integer"]),
        "id-bool": (jsonl({**GOOD_EVAL, "id": True}), ["'id' must be a string or an integer"]),
        "must-include-string": (jsonl({**GOOD_EVAL, "must_include": "Ilse"}), ["JSON list of strings"]),
        "must-include-numbers": (jsonl({**GOOD_EVAL, "must_include": [1, 2]}), ["JSON list of strings"]),
        "reference-surrogate": (b'{"prompt": "a", "reference": "\\ud801"}\n', ["surrogate"]),
        "deep-must-include": (jsonl({**GOOD_EVAL, "must_include": nested(90)}), ["nested more than"]),
        "line-is-list": (jsonl(GOOD_EVAL, [two]), ["expected a JSON object", "line 2"]),
    }
    cases = [(f"eval-jsonl-{k}", "e.jsonl", raw, words) for k, (raw, words) in structures.items()]
    cases += [
        ("eval-csv-no-reference-column", "e.csv", table([["id", "prompt", "answer"], ["1", "a", "b"]]),
         ["no 'reference' column"]),
        ("eval-csv-unclosed-quote", "e.csv", b'id,prompt,reference\n1,"a,b\n', ["never closed"]),
        ("eval-csv-duplicate-ids", "e.csv", table([["id", "prompt", "reference"], ["1", "a", "b"], ["1", "c", "d"]]),
         ["duplicate id '1'"]),
        ("eval-utf16", "e.jsonl", codecs.BOM_UTF16_LE + jsonl(GOOD_EVAL).decode().encode("utf-16-le"), ["UTF-16"]),
        ("eval-empty", "e.jsonl", b"", ["empty"]),
        ("eval-deep", "e.jsonl", b"[" * 100_000, ["nested more than"]),
    ]
    return cases


TRAINING = training_cases()
EVALS = eval_cases()


# ---------------------------------------------------------------- the world the cases run in


@pytest.fixture(scope="module")
def world(tmp_path_factory, finished_tiny_run, tiny_model_dir):
    """Folders every case may point at; none of them may change."""
    root = tmp_path_factory.mktemp("world")
    w = {"root": root, "run": finished_tiny_run, "model": tiny_model_dir}
    data = root / "data"
    data.mkdir()
    (data / "train.jsonl").write_bytes(jsonl(GOOD, GOOD))
    (data / "eval.jsonl").write_bytes((SAMPLE / "eval.jsonl").read_bytes())
    os.mkfifo(data / "pipe.jsonl")
    (data / "plain.txt").write_text("not a folder")
    (data / "empty-model").mkdir()
    (root / "busy").mkdir()
    (root / "busy" / "keep.txt").write_text("precious")
    (root / "outs").mkdir()
    w.update(data=data, train=data / "train.jsonl", eval=data / "eval.jsonl", pipe=data / "pipe.jsonl",
             file=data / "plain.txt", empty_model=data / "empty-model", busy=root / "busy", outs=root / "outs")

    def run_copy(name: str, drop: tuple = (), **files) -> Path:
        folder = root / name
        shutil.copytree(finished_tiny_run, folder)
        for rel in drop:
            target = folder / rel
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        for rel, content in files.items():
            target = folder / rel.replace("__", "/")
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.mkdir() if content is None else target.write_text(content)
        return folder

    w["no_adapter"] = run_copy("no-adapter", drop=("adapter",))
    me = os.getpid()
    w["running"] = run_copy("running", **{"status.json": json.dumps(
        {"status": "running", "pid": me, "pid_started_at": proc.started_at(me), "step": 1, "total_steps": 2})})
    w["bad_adapter"] = run_copy("bad-adapter", **{"adapter__adapter.safetensors": b"not safetensors"})
    w["unfinished"] = run_copy("unfinished", **{"status.json": json.dumps(
        {"status": "cancelled", "pid": None, "step": 1, "total_steps": 2})})
    config = json.loads((finished_tiny_run / "config.json").read_text())

    def with_config(text):
        return {"config.json": text}

    damaged = {
        "list": "[1, 2]",
        "truncated": '{"train": {"data": ',
        "not-utf8": b'{"train": "\xff\xfe"}',
        "train-not-object": json.dumps({**config, "train": 5}),
        "r-max-text": json.dumps({**config, "qdylora": {**config["qdylora"], "r_max": "four"}}),
        "r-max-zero": json.dumps({**config, "qdylora": {**config["qdylora"], "r_max": 0}}),
        "alpha-inf": json.dumps({**config, "qdylora": {**config["qdylora"], "alpha": float("inf")}}),
        "weight-decay-nan": json.dumps({**config, "train": {**config["train"], "weight_decay": float("nan")}}),
        "lr-text": json.dumps({**config, "train": {**config["train"], "lr": "fast"}}),
        "no-model": json.dumps({k: v for k, v in config.items() if k != "model"}),
        "model-path-number": json.dumps({**config, "model": {**config["model"], "path": 7}}),
        "deep": "[" * 100_000,
    }
    w["damaged"] = {name: run_copy(f"damaged-{name}", **with_config(text)) for name, text in damaged.items()}
    w["config_dir"] = run_copy("config-is-dir", drop=("config.json",), **{"config.json": None})

    sweeps = root / "sweeps"
    sweeps.mkdir()
    header = "rank,ref_nll,ref_nll_lo,ref_nll_hi,rouge_l,rouge_l_lo,rouge_l_hi\n"
    good_rows = "0,2.0,1.9,2.1,0.2,0.1,0.3\n1,1.6,1.5,1.7,0.5,0.4,0.6\n2,1.45,1.4,1.5,0.6,0.5,0.7\n4,1.4,1.3,1.5,0.62,0.5,0.7\n"
    summaries = {
        "good": header + good_rows,
        "empty": "",
        "header-only": header,
        "rank-abc": header + "abc,1.0,1,1,0.1,0.1,0.1\n",
        "rank-negative": header + "-1,1.0,1,1,0.1,0.1,0.1\n",
        "rank-fraction": header + "1.5,1.0,1,1,0.1,0.1,0.1\n",
        "no-rank-column": "ref_nll,rouge_l\n1.0,0.5\n",
        "ragged": header + "1,1.0\n",
        "value-text": header + "1,low,1,1,0.1,0.1,0.1\n",
        "duplicate-rank": header + "1,1.0,1,1,0.1,0.1,0.1\n1,1.1,1,1,0.1,0.1,0.1\n",
        "not-utf8": b"rank,ref_nll\n\xff,1\n",
        "unclosed-quote": header + '1,"1.0,1,1\n',
    }
    # per_prompt.csv (what `recommend` reads), damaged in the same ways
    pp_header = "rank,id,ref_nll,ref_tokens,rouge_l\n"
    pp_rows = "".join(f"{b},p{i},{2.0 - 0.1 * b - 0.01 * i:.3f},10,{0.2 + 0.1 * b:.2f}\n"
                      for b in (0, 1, 2, 4) for i in range(6))
    per_prompts = {
        "good": pp_header + pp_rows,
        "empty": "",
        "header-only": pp_header,
        "rank-abc": pp_header + "abc,p1,1.0,10,0.1\n",
        "rank-negative": pp_header + "-1,p1,1.0,10,0.1\n",
        "rank-fraction": pp_header + "1.5,p1,1.0,10,0.1\n",
        "no-rank-column": "id,ref_nll\np1,1.0\n",
        "ragged": pp_header + "1,p1\n",
        "value-text": pp_header + "1,p1,low,10,0.1\n",
        "duplicate-rank": pp_header + "1,p1,1.0,10,0.1\n1,p1,1.1,10,0.1\n",
        "not-utf8": b"rank,id,ref_nll\n\xff,p1,1\n",
        "unclosed-quote": pp_header + '1,"p1,1.0,10,0.1\n',
    }
    w["sweeps"] = {}
    for name, text in summaries.items():
        folder = sweeps / name
        folder.mkdir()
        (folder / "summary.csv").write_bytes(text if isinstance(text, bytes) else text.encode())
        rows = per_prompts[name]
        (folder / "per_prompt.csv").write_bytes(rows if isinstance(rows, bytes) else rows.encode())
        (folder / "config.json").write_text(json.dumps({"config": {"run": str(finished_tiny_run), "prompts": "p",
                                                                   "out": str(folder)}}))
        w["sweeps"][name] = folder
    w["sweeps"]["missing"] = sweeps / "no-such-sweep"
    for name, text in {"broken-json": "{", "list": "[1]", "metrics-number": json.dumps(
            {"config": {"run": str(finished_tiny_run), "prompts": str(data / "eval.jsonl"), "metrics": 5}})}.items():
        folder = sweeps / f"config-{name}"
        folder.mkdir()
        (folder / "config.json").write_text(text)
        w["sweeps"][f"config-{name}"] = folder
    ws = root / "ws"
    from core.jobs import JobStore
    from core import workspace_data as wd

    JobStore(ws)
    wd.ensure_sample_dataset(ws)
    w["ws"] = ws
    return w


@pytest.fixture
def unchanged(world, tmp_path, monkeypatch):
    """Run a case in an empty working directory; afterwards nothing anywhere may differ."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    folders = [world["root"], world["run"], cwd]
    before = snapshot(*folders)
    yield
    assert snapshot(*folders) == before, "a refused input wrote or changed files"


@pytest.fixture
def cli(capsys):
    """`qdylora ARGS` in this process: (exit code, stderr). Signal handlers restored after."""
    from core.cli import main

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def call(*args):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:     # argparse refusals
            code = exc.code
        return code, capsys.readouterr().err

    yield call
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def assert_refused(code, err: str, words: list[str]) -> None:
    assert code == 2, f"exit code {code}, stderr:\n{err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"the message is not one line:\n{err}"
    assert "Traceback" not in err
    for word in words:
        assert word.lower() in lines[0].lower(), f"{word!r} not in: {lines[0]}"


def assert_page_refusal(exc: BaseException, words: list[str]) -> None:
    message = str(exc)
    assert "\n" not in message, f"the page message is not one line:\n{message}"
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in: {message}"


# ---------------------------------------------------------------- data files through the CLI and the Data page


def _write_case(world, tmp_path, name: str, raw: bytes) -> Path:
    folder = tmp_path / "case"
    folder.mkdir()
    path = folder / name
    path.write_bytes(raw)
    return path


@pytest.mark.parametrize("case_id,name,raw,words", TRAINING, ids=[c[0] for c in TRAINING])
def test_bad_training_file_via_cli(case_id, name, raw, words, world, tmp_path, cli, unchanged):
    path = _write_case(world, tmp_path, name, raw)
    before = snapshot(path.parent)
    out = world["outs"] / case_id
    code, err = cli("train", "--data", path, "--model", world["model"], "--quant", "none", "--out", out)
    assert_refused(code, err, words + [name])
    assert not out.exists() and snapshot(path.parent) == before


@pytest.mark.parametrize("case_id,name,raw,words", TRAINING, ids=[c[0] for c in TRAINING])
def test_bad_training_file_on_the_data_page(case_id, name, raw, words, world):
    from core import workspace_data as wd

    before = snapshot(world["ws"])
    try:                                # the first look (columns, preview) may already refuse it
        wd.inspect_upload(raw, name)
    except UserError as exc:
        assert_page_refusal(exc, [name])
    with pytest.raises(UserError) as info:
        wd.create_dataset(world["ws"], "corpus", raw, name)
    assert_page_refusal(info.value, words + [name])
    assert snapshot(world["ws"]) == before


@pytest.mark.parametrize("case_id,name,raw,words", EVALS, ids=[c[0] for c in EVALS])
def test_bad_eval_file_via_cli(case_id, name, raw, words, world, tmp_path, cli, unchanged):
    path = _write_case(world, tmp_path, name, raw)
    out = world["outs"] / case_id
    code, err = cli("sweep", "--run", world["run"], "--prompts", path, "--out", out)
    assert_refused(code, err, words + [name])
    assert not out.exists()


@pytest.mark.parametrize("case_id,name,raw,words", EVALS, ids=[c[0] for c in EVALS])
def test_bad_eval_file_on_the_data_page(case_id, name, raw, words, world):
    from core import workspace_data as wd

    before = snapshot(world["ws"])
    with pytest.raises(UserError) as info:
        wd.create_dataset(world["ws"], "corpus", jsonl(GOOD, GOOD), "train.jsonl", eval_raw=raw, eval_filename=name)
    assert_page_refusal(info.value, words + [name])
    assert snapshot(world["ws"]) == before


# ---------------------------------------------------------------- the CLI: command × flag × bad value

# Placeholders in argv: {train} {eval} {model} {run} {out} and world keys; "{damaged:NAME}", "{sweep:NAME}".
TRAIN = ["train", "--data", "{train}", "--model", "{model}", "--quant", "none", "--out", "{out}"]
QDYLORA = TRAIN + ["--method", "qdylora"]   # rank-sampling options belong to this method
GENERATE = ["generate", "--run", "{run}", "--rank", "1", "--prompt", "hello"]
EXPORT = ["export", "--run", "{run}", "--rank", "1", "--out", "{out}"]
SWEEP = ["sweep", "--run", "{run}", "--prompts", "{eval}", "--out", "{out}"]
RECOMMEND = ["recommend", "--sweep", "{sweep:good}"]

CLI_CASES = [
    # argparse: types and choices, as one line
    (TRAIN + ["--r-max", "abc"], ["--r-max", "invalid int"]),
    (TRAIN + ["--r-max", "1.5"], ["--r-max", "invalid int"]),
    (TRAIN + ["--steps", "ten"], ["--steps"]),
    (TRAIN + ["--lr", "fast"], ["--lr", "invalid float"]),
    (TRAIN + ["--alpha", "big"], ["--alpha"]),
    (TRAIN + ["--quant", "int3"], ["--quant", "invalid choice"]),
    (TRAIN + ["--device", "tpu"], ["--device", "invalid choice"]),
    (TRAIN + ["--rank-sampling", "zipf"], ["--rank-sampling"]),
    (TRAIN + ["--update", "half"], ["--update"]),
    (TRAIN + ["--lr-schedule", "step"], ["--lr-schedule"]),
    (TRAIN + ["--rank-list", "a,b"], ["--rank-list", "comma-separated integers"]),
    (["train", "--data", "{train}"], ["--out", "required"]),
    (["fly"], ["invalid choice"]),
    ([], ["required"]),
    # train: values
    (TRAIN + ["--r-max", "0"], ["r_max"]),
    (TRAIN + ["--r-max", "-3"], ["r_max"]),
    (TRAIN + ["--steps", "0"], ["steps"]),
    (TRAIN + ["--steps", "-1"], ["steps"]),
    (TRAIN + ["--batch-size", "0"], ["batch_size"]),
    (TRAIN + ["--grad-accum", "0"], ["grad_accum"]),
    (TRAIN + ["--max-length", "4"], ["max_length"]),
    (TRAIN + ["--max-length", "0"], ["max_length"]),
    (TRAIN + ["--checkpoint-every", "0"], ["checkpoint_every"]),
    (TRAIN + ["--lr", "0"], ["lr"]),
    (TRAIN + ["--lr", "1"], ["lr"]),
    (TRAIN + ["--lr", "-1e-4"], ["lr"]),
    (TRAIN + ["--lr", "nan"], ["lr", "nan"]),
    (TRAIN + ["--lr", "inf"], ["lr", "inf"]),
    (TRAIN + ["--alpha", "0"], ["alpha"]),
    (TRAIN + ["--alpha", "-1"], ["alpha"]),
    (TRAIN + ["--alpha", "inf"], ["alpha", "finite"]),
    (TRAIN + ["--alpha", "nan"], ["alpha", "finite"]),
    (TRAIN + ["--dropout", "1"], ["dropout"]),
    (TRAIN + ["--dropout", "-0.1"], ["dropout"]),
    (TRAIN + ["--dropout", "nan"], ["dropout"]),
    (TRAIN + ["--warmup-ratio", "1"], ["warmup_ratio"]),
    (TRAIN + ["--warmup-ratio", "-0.5"], ["warmup_ratio"]),
    (TRAIN + ["--warmup-ratio", "nan"], ["warmup_ratio"]),
    (TRAIN + ["--max-grad-norm", "nan"], ["max_grad_norm", "finite"]),
    (TRAIN + ["--max-grad-norm", "inf"], ["max_grad_norm", "finite"]),
    (TRAIN + ["--max-grad-norm", "-1"], ["max_grad_norm"]),
    (QDYLORA + ["--rank-sampling", "list"], ["rank_list"]),
    (QDYLORA + ["--rank-sampling", "list", "--rank-list", "0,2"], ["rank_list entries"]),
    (QDYLORA + ["--rank-sampling", "list", "--rank-list", "1,99", "--r-max", "8"], ["rank_list entries", "r_max=8"]),
    (TRAIN + ["--target-modules", "nope"], ["target modules nope", "q_proj"]),
    (TRAIN + ["--target-modules", "q_proj,attention"], ["attention", "name no linear layer"]),
    (TRAIN + ["--target-modules", ","], ["target_modules"]),
    (["train", "--data", "{train}", "--model", "/no/such/model", "--out", "{out}"], ["neither"]),
    (["train", "--data", "{train}", "--model", "{file}", "--out", "{out}"], ["no config.json"]),
    (["train", "--data", "{train}", "--model", "{empty_model}", "--out", "{out}"], ["no config.json"]),
    (["train", "--data", "{train}", "--model", "a/b/c", "--out", "{out}"], ["neither"]),
    (["train", "--model", "{model}", "--out", "{out}"], ["--data is required"]),
    (["train", "--data", "{pipe}", "--model", "{model}", "--out", "{out}"], ["not a regular file"]),
    (["train", "--data", "/dev/null", "--model", "{model}", "--out", "{out}"], ["not a regular file"]),
    (["train", "--data", "{data}", "--model", "{model}", "--out", "{out}"], ["is a folder"]),
    (["train", "--data", "{data}/missing.jsonl", "--model", "{model}", "--out", "{out}"], ["file not found"]),
    # train: output folders
    (TRAIN[:-1] + [""], ["output folder is empty"]),
    (TRAIN[:-1] + ["{file}"], ["is a file"]),
    (TRAIN[:-1] + ["{file}/run"], ["which is a file"]),
    (TRAIN[:-1] + ["/sys/rank-studio-run"], ["cannot"]),
    (TRAIN[:-1] + ["{run}"], ["already holds files"]),
    (TRAIN[:-1] + ["{busy}"], ["already holds files"]),
    (TRAIN[:-1] + ["{running}"], ["already holds files"]),
    (["train", "--resume", "--out", "{outs}/missing"], ["not a training run folder"]),
    (["train", "--resume", "--out", "{run}"], ["already completed"]),
    (["train", "--resume", "--out", "{running}"], ["still running"]),
    (["train", "--resume", "--out", "{sweep:good}"], ["not a training run config", "sweep"]),
    (["train", "--resume", "--out", "{config_dir}"], ["not a regular file"]),
    (["train", "--resume", "--out", ""], ["output folder is empty"]),
    # train: the method options (scale rule, ranks per step, sandwich, SVD, warm start)
    (TRAIN + ["--scale", "alpha"], ["--scale", "invalid choice"]),
    (TRAIN + ["--method", "lora"], ["--method", "invalid choice"]),
    (TRAIN + ["--extra-ranks", "all"], ["--extra-ranks", "invalid choice"]),
    (TRAIN + ["--row-steps", "drift"], ["--row-steps", "invalid choice"]),
    (QDYLORA + ["--update", "frozen", "--row-steps", "balanced"], ["row_steps 'hold'"]),
    (TRAIN + ["--ranks-per-step", "abc"], ["--ranks-per-step", "invalid int"]),
    (QDYLORA + ["--ranks-per-step", "0"], ["ranks_per_step"]),
    (QDYLORA + ["--ranks-per-step", "-2"], ["ranks_per_step"]),
    (QDYLORA + ["--ranks-per-step", "5", "--batch-size", "4"], ["ranks_per_step (5) cannot exceed", "= 4"]),
    (QDYLORA + ["--ranks-per-step", "3", "--batch-size", "1", "--grad-accum", "2"], ["ranks_per_step (3) cannot exceed"]),
    (QDYLORA + ["--distill", "0.5"], ["distill needs extra_ranks"]),
    (QDYLORA + ["--distill", "nan", "--extra-ranks", "max"], ["distill", "finite"]),
    (QDYLORA + ["--distill", "2", "--extra-ranks", "max"], ["distill"]),
    (QDYLORA + ["--update", "frozen", "--ranks-per-step", "2"], ["frozen"]),
    # method svd trains one adapter at r_max: sampling options are refused, never dropped
    (TRAIN + ["--method", "svd", "--rank-sampling", "high"], ["rank_sampling applies to method qdylora only"]),
    (TRAIN + ["--method", "svd", "--ranks-per-step", "2", "--extra-ranks", "max"],
     ["ranks_per_step, extra_ranks apply to method qdylora only"]),
    (TRAIN + ["--method", "svd", "--update", "frozen"], ["update applies to method qdylora only"]),
    (TRAIN + ["--init-from", "{run}"], ["init_from and init_rank go together"]),
    (TRAIN + ["--init-from", "{unfinished}", "--init-rank", "2", "--r-max", "2"], ["has not finished", "cancelled"]),
    (TRAIN + ["--init-from", "{run}", "--init-rank", "3", "--r-max", "2"], ["must have r_max 3"]),
    (TRAIN + ["--init-from", "{run}", "--init-rank", "9", "--r-max", "9"], ["rank must be an integer in 1..4"]),
    (TRAIN + ["--init-from", "{data}", "--init-rank", "2", "--r-max", "2"], ["not a training run folder"]),
]
REFINE = ["refine", "--run", "{run}", "--rank", "2", "--steps", "2", "--out", "{out}"]
CLI_CASES += [
    # refine: a rank of a finished run, polished as a new run
    (REFINE[:4] + ["0"] + REFINE[5:], ["rank must be an integer in 1..4"]),
    (REFINE[:4] + ["5"] + REFINE[5:], ["rank must be an integer in 1..4"]),
    (REFINE[:4] + ["-1"] + REFINE[5:], ["rank must be an integer in 1..4"]),
    (REFINE[:4] + ["abc"] + REFINE[5:], ["--rank", "invalid int"]),
    (REFINE[:6] + ["0"] + REFINE[7:], ["steps"]),
    (REFINE[:6] + ["x"] + REFINE[7:], ["--steps", "invalid int"]),
    (REFINE[:5] + REFINE[7:], ["--steps", "required"]),
    (REFINE + ["--lr", "nan"], ["lr"]),
    (REFINE + ["--lr", "2"], ["lr"]),
    (REFINE + ["--batch-size", "0"], ["batch_size"]),
    (["refine", "--run", "{unfinished}", "--rank", "2", "--steps", "2", "--out", "{out}"], ["has not finished", "cancelled"]),
    (["refine", "--run", "{running}", "--rank", "2", "--steps", "2", "--out", "{out}"], ["has not finished"]),
    (["refine", "--run", "{no_adapter}", "--rank", "2", "--steps", "2", "--out", "{out}"], ["no saved adapter"]),
    (["refine", "--run", "{data}", "--rank", "2", "--steps", "2", "--out", "{out}"], ["not a training run folder"]),
    (["refine", "--run", "{sweep:good}", "--rank", "2", "--steps", "2", "--out", "{out}"], ["not a training run config"]),
    (["refine", "--run", "{outs}/missing", "--rank", "2", "--steps", "2", "--out", "{out}"], ["does not exist"]),
    (["refine", "--run", "{file}", "--rank", "2", "--steps", "2", "--out", "{out}"], ["does not exist"]),
    (["refine", "--run", "{damaged:truncated}", "--rank", "2", "--steps", "2", "--out", "{out}"], ["not valid JSON"]),
    (["refine", "--run", "{damaged:alpha-inf}", "--rank", "2", "--steps", "2", "--out", "{out}"], ["damaged", "alpha"]),
    (REFINE + ["--data", "{pipe}"], ["not a regular file"]),
    (REFINE + ["--data", "{data}/missing.jsonl"], ["file not found"]),
    (REFINE[:-1] + [""], ["output folder is empty"]),
    (REFINE[:-1] + ["{busy}"], ["already holds files"]),
    (REFINE[:-1] + ["{run}"], ["already holds files"]),
    (REFINE[:-1] + ["{file}/run"], ["which is a file"]),
]
DAMAGED_WORDS = {
    "list": ["not a training run config"], "truncated": ["not valid JSON"], "not-utf8": ["not UTF-8"],
    "train-not-object": ["damaged", "object"], "r-max-text": ["damaged", "r_max"], "r-max-zero": ["damaged", "r_max"],
    "alpha-inf": ["damaged", "alpha"], "weight-decay-nan": ["damaged", "weight_decay"], "lr-text": ["damaged", "lr"],
    "no-model": ["damaged", "'model'"], "model-path-number": ["damaged", "'model'"], "deep": ["nested too deeply"],
}
for _name, _words in DAMAGED_WORDS.items():
    CLI_CASES += [
        (["train", "--resume", "--out", f"{{damaged:{_name}}}"], _words),
        (["generate", "--run", f"{{damaged:{_name}}}", "--rank", "1", "--prompt", "hi"], _words),
        (["export", "--run", f"{{damaged:{_name}}}", "--rank", "1", "--out", "{out}"], _words),
        (["sweep", "--run", f"{{damaged:{_name}}}", "--prompts", "{eval}", "--out", "{out}"], _words),
    ]
CLI_CASES += [
    # generate
    (GENERATE[:4] + ["-1"] + GENERATE[5:], ["rank must be an integer", "r_max=4"]),
    (GENERATE[:4] + ["5"] + GENERATE[5:], ["rank must be an integer", "r_max=4"]),
    (GENERATE[:4] + ["abc"] + GENERATE[5:], ["--rank", "invalid int"]),
    (GENERATE + ["--sample", "--temperature", "-1"], ["temperature"]),
    (GENERATE + ["--sample", "--temperature", "0"], ["temperature"]),
    (GENERATE + ["--sample", "--temperature", "nan"], ["temperature"]),
    (GENERATE + ["--sample", "--temperature", "inf"], ["temperature"]),
    (GENERATE + ["--sample", "--top-p", "0"], ["top_p"]),
    (GENERATE + ["--sample", "--top-p", "1.5"], ["top_p"]),
    (GENERATE + ["--sample", "--top-p", "-0.1"], ["top_p"]),
    (GENERATE + ["--sample", "--top-p", "nan"], ["top_p"]),
    (GENERATE + ["--max-new-tokens", "0"], ["max_new_tokens"]),
    (GENERATE + ["--max-new-tokens", "-5"], ["max_new_tokens"]),
    (["generate", "--run", "{run}", "--rank", "1"], ["--prompt", "required"]),
    (["generate", "--run", "{outs}/missing", "--rank", "1", "--prompt", "hi"], ["does not exist"]),
    (["generate", "--run", "{data}", "--rank", "1", "--prompt", "hi"], ["not a training run folder"]),
    (["generate", "--run", "{sweep:good}", "--rank", "1", "--prompt", "hi"], ["not a training run config"]),
    (["generate", "--run", "{no_adapter}", "--rank", "1", "--prompt", "hi"], ["no saved adapter"]),
    (["generate", "--run", "{config_dir}", "--rank", "1", "--prompt", "hi"], ["not a regular file"]),
    # export
    (EXPORT[:4] + ["0"] + EXPORT[5:], ["rank 0 is the base model"]),
    (EXPORT[:4] + ["5"] + EXPORT[5:], ["r_max=4"]),
    (EXPORT[:4] + ["-2"] + EXPORT[5:], ["r_max=4"]),
    (EXPORT[:-1] + [""], ["output folder is empty"]),
    (EXPORT[:-1] + ["{busy}"], ["already holds files"]),
    (EXPORT[:-1] + ["{run}"], ["already holds files"]),
    (EXPORT[:-1] + ["{file}"], ["is a file"]),
    (EXPORT[:-1] + ["{file}/export"], ["which is a file"]),
    (EXPORT[:-1] + ["/sys/rank-studio-export"], ["cannot"]),
    (EXPORT + ["--merge-dtype", "int8"], ["--merge-dtype", "invalid choice"]),
    (["export", "--run", "{no_adapter}", "--rank", "1", "--out", "{out}"], ["no saved adapter"]),
    (["export", "--run", "{bad_adapter}", "--rank", "1", "--out", "{out}"], ["adapter", "cannot be read"]),
    (["export", "--run", "{outs}/missing", "--rank", "1", "--out", "{out}"], ["does not exist"]),
]
SUMMARY_WORDS = {
    "missing": ["does not exist"], "empty": ["is empty"], "header-only": ["no measured rank"],
    "rank-abc": ["rank 'abc'", "whole number"], "rank-negative": ["rank '-1'"], "rank-fraction": ["rank '1.5'"],
    "no-rank-column": ["no 'rank' column"], "ragged": ["row 1", "2 values"], "value-text": ["ref_nll 'low'"],
    "duplicate-rank": ["rank 1 appears twice"], "not-utf8": ["not UTF-8"], "unclosed-quote": ["not valid CSV"],
}
# `recommend` decides from per_prompt.csv, damaged in the same ways (a rank and prompt twice)
PER_PROMPT_WORDS = SUMMARY_WORDS | {"duplicate-rank": ["rank 1 of prompt 'p1' appears twice"]}
for _name, _words in SUMMARY_WORDS.items():
    CLI_CASES += [
        (EXPORT + ["--sweep", f"{{sweep:{_name}}}"], _words),
        (["recommend", "--sweep", f"{{sweep:{_name}}}"], PER_PROMPT_WORDS[_name]),
    ]
CLI_CASES += [
    (EXPORT[:4] + ["3"] + EXPORT[5:] + ["--sweep", "{sweep:good}"], ["did not measure rank 3"]),
    (["export", "--run", "{run}", "--rank", "1", "--out", "{out}", "--sweep", "{data}"], ["no summary.csv"]),
    # sweep
    (SWEEP + ["--ranks", "abc"], ["'abc' is not an integer"]),
    (SWEEP + ["--ranks", "9"], ["9 is outside 0..4"]),
    (SWEEP + ["--ranks", "-1"], ["outside 0..4"]),
    (SWEEP + ["--ranks", ","], ["lists no rank"]),
    (SWEEP + ["--metrics", "bogus"], ["bogus"]),
    (SWEEP + ["--metrics", ","], ["non-empty subset"]),
    (SWEEP + ["--metrics", "rouge_l", "--recommend-metric", "ref_nll"], ["ref_nll", "not among the metrics"]),
    (SWEEP + ["--recommend-metric", "bogus"], ["recommend metric must be one of"]),
    (SWEEP + ["--threshold", "0"], ["threshold"]),
    (SWEEP + ["--threshold", "1.5"], ["threshold"]),
    (SWEEP + ["--threshold", "nan"], ["threshold"]),
    (SWEEP + ["--threshold", "-1"], ["threshold"]),
    (SWEEP + ["--max-new-tokens", "0"], ["max_new_tokens"]),
    (SWEEP + ["--batch-size", "0"], ["batch_size"]),
    (SWEEP + ["--max-prompts", "0"], ["max_prompts"]),
    (SWEEP + ["--latency-repeats", "0"], ["latency_repeats"]),
    (SWEEP + ["--latency", "maybe"], ["--latency", "invalid choice"]),
    (SWEEP[:-1] + [""], ["output folder is empty"]),
    (SWEEP[:-1] + ["{busy}"], ["already holds files"]),
    (SWEEP[:-1] + ["{run}"], ["already holds files"]),
    (SWEEP[:-1] + ["{file}/sweep"], ["which is a file"]),
    (SWEEP[:-1] + ["/sys/rank-studio-sweep"], ["cannot"]),
    (["sweep", "--out", "{out}"], ["--run and --prompts are required"]),
    (["sweep", "--run", "{no_adapter}", "--prompts", "{eval}", "--out", "{out}"], ["no saved adapter"]),
    (["sweep", "--run", "{run}", "--prompts", "{pipe}", "--out", "{out}"], ["not a regular file"]),
    (["sweep", "--run", "{run}", "--prompts", "{data}", "--out", "{out}"], ["is a folder"]),
    (["sweep", "--resume", "--out", "{run}"], ["training run folder, not a sweep"]),
    (["sweep", "--resume", "--out", "{outs}/missing"], ["not a sweep folder"]),
    (["sweep", "--resume", "--out", "{sweep:config-broken-json}"], ["not valid JSON"]),
    (["sweep", "--resume", "--out", "{sweep:config-list}"], ["not a sweep config"]),
    (["sweep", "--resume", "--out", "{sweep:config-metrics-number}"], ["damaged", "metrics"]),
    # recommend
    (RECOMMEND + ["--metric", "bogus"], ["--metric", "invalid choice"]),
    (RECOMMEND + ["--metric", "similarity"], ["did not measure similarity"]),
    (RECOMMEND + ["--threshold", "0"], ["threshold"]),
    (RECOMMEND + ["--threshold", "nan"], ["threshold"]),
    (RECOMMEND + ["--threshold", "2"], ["threshold"]),
    (RECOMMEND + ["--threshold", "-1"], ["threshold"]),
    (["recommend", "--sweep", "{data}"], ["not a sweep folder with results", "no per_prompt.csv"]),
]


def _fill(arg: str, world, out: Path) -> str:
    if arg.startswith("{damaged:"):
        return str(world["damaged"][arg[9:-1]])
    if arg.startswith("{sweep:"):
        return str(world["sweeps"][arg[7:-1]])
    values = {k: str(v) for k, v in world.items() if isinstance(v, (str, Path))} | {"out": str(out)}
    return arg.format(**values) if "{" in arg else arg


def _cli_id(argv: list[str]) -> str:
    return " ".join(a.replace("{", "").replace("}", "") for a in argv if a not in (
        "--data", "--model", "--quant", "none", "{train}", "{model}", "{out}", "--out", "--run", "{run}",
        "--prompts", "{eval}", "--prompt", "hello")) or "(no arguments)"


@pytest.mark.parametrize("argv,words", CLI_CASES, ids=[_cli_id(a) for a, _ in CLI_CASES])
def test_bad_cli_input(argv, words, world, cli, unchanged, request):
    out = world["outs"] / f"out-{abs(hash(request.node.name))}"
    code, err = cli(*[_fill(a, world, out) for a in argv])
    assert_refused(code, err, words)
    assert not out.exists()


# ---------------------------------------------------------------- the launch forms (page messages)

TRAIN_FORM = [("r_max", v) for v in (0, -1, 999)] + [("alpha", v) for v in (0.0, 2000.0, float("nan"), float("inf"))] + \
    [("steps", v) for v in (0, -5, 1_000_000)] + [("batch_size", v) for v in (0, 1000)] + \
    [("lr", v) for v in (0.0, 5.0, float("nan"))] + [("max_length", v) for v in (0, 8, 100_000)] + \
    [("grad_accum", v) for v in (0, 999)] + [("ranks_per_step", v) for v in (0, -1, 999, 5)]


@pytest.mark.parametrize("name,value", TRAIN_FORM, ids=[f"{n}={v}" for n, v in TRAIN_FORM])
def test_train_form_refuses_out_of_range_values(name, value, world):
    from core import workspace_data as wd

    form = wd.TrainForm(dataset=wd.get_dataset(world["ws"], wd.SAMPLE_DATASET), **{name: value})
    problems = wd.train_problems(form)
    # the field's label in words ("ranks per step") or, from TrainConfig's own checks, its name
    said = name.replace("_", " ") if any(name.replace("_", " ") in p for p in problems) else name
    assert problems and any(said in p.lower() for p in problems), problems
    with pytest.raises(UserError) as info:
        wd.train_args(form)
    assert_page_refusal(info.value, [said])


SWEEP_FORM = [({"max_prompts": 0}, "Prompts to use"), ({"max_prompts": 99}, "Prompts to use"),
              ({"max_new_tokens": 0}, "Answer length"), ({"max_new_tokens": 5000}, "Answer length"),
              ({"ranks": []}, "at least one rank"), ({"ranks": [0]}, "above 0"), ({"metrics": []}, "quality metric")]


@pytest.mark.parametrize("change,words", SWEEP_FORM, ids=[str(c) for c, _ in SWEEP_FORM])
def test_sweep_form_refuses_bad_values(change, words):
    from core import workspace_data as wd

    values = {"ranks": [0, 1, 2], "metrics": ["ref_nll"], "max_prompts": 5, "max_new_tokens": 64} | change
    problems = wd.sweep_problems(n_eval=20, **values)
    assert len(problems) == 1 and words in problems[0], problems


@pytest.mark.parametrize("rank", [0, -1, 5, 999])
def test_export_form_refuses_bad_ranks(rank):
    from core import workspace_data as wd

    assert wd.export_problems(rank, 4)
    with pytest.raises(UserError) as info:
        wd.export_args(Path("run"), rank, merge=False, r_max=4)
    assert_page_refusal(info.value, ["from 1 to 4"])


POLISH_FORM = [({"rank": 0}, "rank to polish"), ({"rank": 5}, "rank to polish"), ({"steps": 0}, "Extra steps"),
               ({"steps": 1_000_000}, "Extra steps"), ({"lr": float("nan")}, "learning rate"),
               ({"lr": 5.0}, "learning rate"), ({"lr": 0.0}, "learning rate")]


@pytest.mark.parametrize("change,words", POLISH_FORM, ids=[str(c) for c, _ in POLISH_FORM])
def test_polish_form_refuses_bad_values(change, words, world):
    from core import workspace_data as wd

    values = {"rank": 2, "steps": 20, "lr": 2e-4} | change
    problems = wd.refine_problems(r_max=4, **values)
    assert len(problems) == 1 and words in problems[0], problems
    with pytest.raises(UserError) as info:
        wd.refine_args(world["run"], values["rank"], values["steps"], lr=values["lr"], r_max=4)
    assert_page_refusal(info.value, [words])


def test_the_corpus_is_large_enough():
    n = (2 * len(TRAINING) + 2 * len(EVALS) + len(CLI_CASES) + len(TRAIN_FORM) + len(SWEEP_FORM) + 4
         + len(POLISH_FORM))
    assert n >= 200, n
