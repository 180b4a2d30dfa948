"""sample_data/eval_reworded.*: held-out references that are new wordings of the trained facts.

`eval.jsonl` ("FAQ recall") reuses training responses word for word, so it rewards
reciting. These checks keep the second set honest: it must state the trained facts
(every must_include string is taught somewhere) in words the model never saw.
"""
from __future__ import annotations

import csv
import json
import re
import string
from pathlib import Path

import pytest

from core.data import load_eval_set

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
REWORDED = ("eval_reworded.jsonl", "eval_reworded.csv")
GREETING = "Hi from Quillhaven Care! "
CLOSING = " Warm regards, the Quillhaven Care team."
MAX_SHARED_RUN = 7  # words; a run of 8+ shared with a training response counts as recited
MIN_COMBINED = 12
MAX_WITHOUT_FACTS = 2  # off-topic / refusal items


# ------------------------------------------------------------------ text helpers


def body(answer: str) -> str:
    """The answer without the house greeting and closing (which every answer shares)."""
    if answer.startswith(GREETING):
        answer = answer[len(GREETING):]
    if answer.endswith(CLOSING):
        answer = answer[: -len(CLOSING)]
    return answer.strip()


def sentences(text: str) -> list[str]:
    """Split on . ! ? followed by whitespace, so "quillhaven.example" or "1.0 litre" stay whole."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def words(text: str) -> list[str]:
    """Casefolded whitespace tokens with punctuation stripped from their edges."""
    edge = string.punctuation + "“”‘’"
    return [t for t in (w.strip(edge) for w in text.casefold().split()) if t]


def prompt_key(prompt: str) -> str:
    """A prompt with case, whitespace and punctuation removed, for near-equality."""
    return "".join(ch for ch in prompt.casefold() if ch.isalnum())


def longest_shared_run(text: str, others: list[list[str]]) -> tuple[int, str]:
    """Length (in words) and text of the longest run of consecutive words of `text` that
    also occurs, consecutively, in one of `others` (each a word list)."""
    mine = words(text)
    best, best_run = 0, ""
    for other in others:
        # classic longest-common-substring DP over words
        prev = [0] * (len(other) + 1)
        for a in mine:
            cur = [0] * (len(other) + 1)
            for j, b in enumerate(other, 1):
                if a == b:
                    cur[j] = prev[j - 1] + 1
                    if cur[j] > best:
                        best, best_run = cur[j], " ".join(other[j - cur[j]: j])
            prev = cur
    return best, best_run


def copied_sentences(text: str, training_bodies: list[str]) -> list[str]:
    return [s for s in sentences(text) if any(s in t for t in training_bodies)]


def combines_facts(must_include: list[str], training_answers: list[str]) -> bool:
    """True when no single training answer holds every must_include string: the
    reference joins facts taught in different answers."""
    return len(must_include) >= 2 and not any(all(m in a for m in must_include) for a in training_answers)


# ------------------------------------------------------------------ the data


def _jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (SAMPLE / name).read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def train_answers() -> list[str]:
    """Responses of train.jsonl, the full training set (the one must_include facts come from)."""
    return [r["response"] for r in _jsonl("train.jsonl")]


@pytest.fixture(scope="module")
def all_train_answers(train_answers) -> list[str]:
    """Every answer a model may be trained on: train.jsonl, train_chat.jsonl's assistant
    turns (some two-turn chats say new things) and train.csv."""
    chat = [m["content"] for r in _jsonl("train_chat.jsonl") for m in r["messages"] if m["role"] == "assistant"]
    with open(SAMPLE / "train.csv", encoding="utf-8", newline="") as f:
        table = [row["answer"] for row in csv.DictReader(f)]
    return list(dict.fromkeys(train_answers + chat + table))


@pytest.fixture(scope="module")
def seen_prompts() -> set[str]:
    prompts = [r["prompt"] for r in _jsonl("train.jsonl")] + [r["prompt"] for r in _jsonl("eval.jsonl")]
    prompts += [m["content"] for r in _jsonl("train_chat.jsonl") for m in r["messages"] if m["role"] == "user"]
    with open(SAMPLE / "train.csv", encoding="utf-8", newline="") as f:
        prompts += [row["question"] for row in csv.DictReader(f)]
    return {prompt_key(p) for p in prompts}


@pytest.fixture(scope="module")
def items():
    return load_eval_set(SAMPLE / "eval_reworded.jsonl").items


# ------------------------------------------------------------------ the checks


@pytest.mark.parametrize("name", REWORDED)
def test_loads_cleanly(name):
    ev = load_eval_set(SAMPLE / name)
    assert len(ev) == 48 and ev.skipped == [] and ev.warnings == []
    assert [i.id for i in ev.items] == [f"w{n:03d}" for n in range(1, 49)]


def test_jsonl_and_csv_agree():
    a, b = (load_eval_set(SAMPLE / name) for name in REWORDED)
    assert [(i.id, i.prompt, i.reference, i.must_include) for i in a.items] == \
           [(i.id, i.prompt, i.reference, i.must_include) for i in b.items]


def test_house_style(items):
    bad = [i.id for i in items
           if not (i.reference.startswith(GREETING) and i.reference.endswith(CLOSING)
                   and 1 <= len(sentences(body(i.reference))) <= 4)]
    assert bad == [], f"not greeting + 1-4 sentences + closing: {bad}"


def test_prompts_are_new(items, seen_prompts):
    keys = [prompt_key(i.prompt) for i in items]
    assert len(set(keys)) == len(keys), "two prompts differ only in case or punctuation"
    seen = [i.id for i in items if prompt_key(i.prompt) in seen_prompts]
    assert seen == [], f"prompt already in a training file or eval.jsonl: {seen}"


def test_no_reference_is_a_training_answer(items, all_train_answers):
    known = {body(a) for a in all_train_answers}
    assert [i.id for i in items if body(i.reference) in known] == []


def test_no_sentence_is_copied(items, all_train_answers):
    bodies = [body(a) for a in all_train_answers]
    copied = {i.id: c for i in items if (c := copied_sentences(body(i.reference), bodies))}
    assert copied == {}, f"sentences found verbatim in a training answer: {copied}"


def test_no_long_run_shared_with_training(items, all_train_answers):
    others = [words(body(a)) for a in all_train_answers]
    long_runs = {}
    for i in items:
        n, run = longest_shared_run(body(i.reference), others)
        if n > MAX_SHARED_RUN:
            long_runs[i.id] = f"{n} words: {run}"
    assert long_runs == {}, f"runs of {MAX_SHARED_RUN + 1}+ words shared with a training answer: {long_runs}"


def test_must_include_is_stated_and_taught(items, train_answers):
    assert all(1 <= len(i.must_include) <= 3 or not i.must_include for i in items)
    assert sum(not i.must_include for i in items) <= MAX_WITHOUT_FACTS
    missing = {i.id: m for i in items for m in i.must_include if m not in i.reference}
    assert missing == {}, f"must_include not in its reference: {missing}"
    untaught = {i.id: m for i in items for m in i.must_include if not any(m in a for a in train_answers)}
    assert untaught == {}, f"must_include not in any train.jsonl response: {untaught}"


def test_some_items_combine_two_facts(items, all_train_answers):
    combined = [i.id for i in items if combines_facts(i.must_include, all_train_answers)]
    assert len(combined) >= MIN_COMBINED, f"only {len(combined)} items combine facts: {combined}"


def test_checks_catch_a_recited_answer(train_answers):
    """The helpers themselves flag what they must: a copied sentence, a long shared run,
    a reworded prompt that only changes case and punctuation, and facts from one answer."""
    answer = train_answers[0]
    copy = GREETING + "Well. " + sentences(body(answer))[0] + CLOSING
    assert copied_sentences(body(copy), [body(answer)])
    assert longest_shared_run(body(answer), [words(body(answer))])[0] == len(words(body(answer)))
    assert longest_shared_run("one two three", [words("three two one")]) == (1, "one")
    assert prompt_key("How do I reset the QB-100?") == prompt_key("how do i reset the qb 100")
    assert not combines_facts(["€89", "QB-100"], ["The QB-100 is €89."])
    assert combines_facts(["€89", "3 years"], ["The QB-100 is €89.", "It has 3 years."])
