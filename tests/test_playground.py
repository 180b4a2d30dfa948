"""The playground on a tiny trained run: streamed answers per rank, equal to the run's own
answers at that rank; the worker process and its file protocol; bad questions."""
from __future__ import annotations

import json
import time

import pytest

from core import playground as pg
from core import runstate
from core.errors import UserError
from core.train import TrainConfig, train
from tests.helpers import randomize_adapter_b

QUESTION = "What does the QB-100 cost?"


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, small_train_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("pg-run") / "run"
    train(TrainConfig(data=str(small_train_file), out=str(out), model=str(tiny_model_dir), quant="none",
                      r_max=4, steps=1, batch_size=2, max_length=64))
    randomize_adapter_b(out, std=0.5)
    return out


@pytest.fixture(scope="module")
def playground(run_dir, tmp_path_factory):
    from core.playground_worker import Playground

    p = Playground(run_dir, tmp_path_factory.mktemp("pg"))
    p.load()
    return p


def request(ranks, tokens=8, rid="q1", prompt=QUESTION) -> dict:
    return {"id": rid, "prompt": prompt, "ranks": ranks, "max_new_tokens": tokens}


def test_answers_stream_per_rank_and_match_the_run_at_that_rank(playground, run_dir):
    from core.runs import generate_at_rank

    written = []
    real_write = playground._write
    playground._write = lambda state: (written.append(json.loads(json.dumps(state))), real_write(state))
    try:
        state = playground.answer(request([0, 1, 4]))
    finally:
        playground._write = real_write
    assert state["status"] == "done" and state["order"] == [0, 1, 4]
    expected = {b: generate_at_rank(playground.loaded, [QUESTION], b, max_new_tokens=8)[0] for b in (0, 1, 4)}
    assert {int(b): a["text"] for b, a in state["ranks"].items()} == expected
    assert len({a["text"] for a in state["ranks"].values()}) > 1, "ranks must differ for this test to mean anything"
    assert all(a["done"] and a["tokens"] >= 1 and a["seconds"] >= 0 for a in state["ranks"].values())
    # Streamed: the file showed rank 4's answer growing before it was done.
    partial = [s["ranks"]["4"]["text"] for s in written if s["ranks"]["4"]["text"] and not s["ranks"]["4"]["done"]]
    assert partial and all(expected[4].startswith(p.strip()) for p in partial)
    assert pg.read_answers(playground.folder)["id"] == "q1"


def test_a_newer_question_supersedes_the_one_being_answered(playground):
    runstate.write_json_atomic(playground.folder / pg.REQUEST_FILE, request([1], rid="newer"))
    state = playground.answer(request([0, 1, 2], rid="older"))
    assert state["status"] == "superseded" and not any(a["done"] for a in state["ranks"].values())


def test_the_worker_process_answers_through_files_and_stops(run_dir, tmp_path, playground):
    folder = tmp_path / "pg"
    rid = pg.ask(folder, run_dir, QUESTION, [0, 2], 8, r_max=4)
    assert pg.is_running(pg.worker_state(folder)) and pg.read_request(folder)["id"] == rid
    deadline = time.time() + 240
    answers = None
    while time.time() < deadline:
        answers = pg.read_answers(folder)
        if answers and answers["id"] == rid and answers["status"] == "done":
            break
        assert pg.worker_state(folder)["status"] == "running", (folder / "worker.log").read_text()[-2000:]
        time.sleep(0.3)
    assert answers and answers["status"] == "done", answers
    assert pg.worker_state(folder)["phase"] == "ready"
    from core.runs import generate_at_rank

    assert answers["ranks"]["2"]["text"] == generate_at_rank(playground.loaded, [QUESTION], 2, max_new_tokens=8)[0]
    assert pg.start(folder, run_dir)["pid"] == pg.worker_state(folder)["pid"]     # one worker per run
    assert pg.stop(folder)
    deadline = time.time() + 60
    while pg.is_running(pg.worker_state(folder)) and time.time() < deadline:
        time.sleep(0.2)
    assert pg.worker_state(folder)["status"] == "completed"
    assert not pg.stop(folder)


@pytest.mark.parametrize("prompt,ranks,tokens,message", [
    ("  ", [0], 8, "Type a question"),
    ("x" * (pg.MAX_PROMPT_CHARS + 1), [0], 8, "the limit is"),
    (QUESTION, [], 8, "at least one rank"),
    (QUESTION, [0, 9], 8, "from 0 to 4; not 9"),
    (QUESTION, [1], 0, "answer length"),
])
def test_bad_questions_are_refused_before_anything_starts(tmp_path, prompt, ranks, tokens, message):
    with pytest.raises(UserError, match=message):
        pg.ask(tmp_path / "pg", tmp_path / "run", prompt, ranks, tokens, r_max=4)
    assert not (tmp_path / "pg").exists()
