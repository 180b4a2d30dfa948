"""The playground worker (`python -m core playground`): load a run once, answer questions
at several ranks, stream the text to answers.json. The file protocol is in core.playground.

Answers come from the rank merged into a full-precision copy of the base (the sweep's
MergedModel): the same function as the adapter on the 4-bit base, several times faster
per token, and switching rank rewrites the merged weights in a fraction of a second.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

from core import playground as pg
from core import runstate

log = logging.getLogger("rank_studio.playground")


class _Chunks(TextStreamer):
    """Hands each piece of decoded answer text to `on_text` as soon as it is final."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text
        self.tokens = 0

    def put(self, value) -> None:
        if self.next_tokens_are_prompt is False:
            self.tokens += int(value.numel())
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.on_text(text)


class _StopWhen(StoppingCriteria):
    def __init__(self, stop: Callable[[], bool]):
        self.stop = stop

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.stop(), dtype=torch.bool, device=input_ids.device)


class Playground:
    """One loaded run answering questions from a playground folder."""

    def __init__(self, run_dir: Path, folder: Path, should_stop: Callable[[], bool] = lambda: False):
        self.run_dir, self.folder, self.should_stop = Path(run_dir), Path(folder), should_stop

    def load(self) -> None:
        from core.evaluation.sweep import MergedModel
        from core.runs import load_run

        runstate.write_status(self.folder, "running", phase="loading model", run=str(self.run_dir))
        self.loaded = load_run(self.run_dir)
        self.merged = MergedModel(self.loaded)
        runstate.write_status(self.folder, "running", phase="ready", run=str(self.run_dir), r_max=self.loaded.r_max)

    def _write(self, state: dict) -> None:
        runstate.write_json_atomic(self.folder / pg.ANSWERS_FILE, state)

    def answer(self, request: dict) -> dict:
        """Answer one request rank after rank; stops early when a newer one arrives."""
        from core.runs import encode_prompts

        ranks = [int(r) for r in request["ranks"] if 0 <= int(r) <= self.loaded.r_max]
        state = {"id": request["id"], "prompt": request["prompt"], "status": "running", "order": ranks, "error": None,
                 "ranks": {str(b): {"text": "", "done": False, "tokens": 0, "seconds": None} for b in ranks}}
        self._write(state)

        def superseded() -> bool:
            newer = pg.read_request(self.folder)
            return self.should_stop() or (newer is not None and newer.get("id") != request["id"])

        tokenizer = self.loaded.tokenizer
        inputs = encode_prompts(tokenizer, [request["prompt"]], self.loaded.device)
        for b in ranks:
            if superseded():
                state["status"] = "superseded"
                self._write(state)
                return state
            slot = state["ranks"][str(b)]
            self.merged.set_rank(b)
            started = time.perf_counter()

            def on_text(text: str, slot=slot) -> None:
                slot["text"] += text
                self._write(state)

            chunks = _Chunks(tokenizer, on_text)
            with torch.no_grad():
                self.merged.model.generate(**inputs, max_new_tokens=int(request["max_new_tokens"]), do_sample=False,
                                           temperature=None, top_p=None, top_k=None,
                                           pad_token_id=tokenizer.pad_token_id, streamer=chunks,
                                           stopping_criteria=StoppingCriteriaList([_StopWhen(superseded)]))
            slot.update(text=slot["text"].strip(), done=True, tokens=chunks.tokens,
                        seconds=round(time.perf_counter() - started, 2))
            self._write(state)
        state["status"] = "superseded" if superseded() else "done"
        self._write(state)
        return state

    def serve(self, idle_exit_s: float = pg.IDLE_EXIT_S, poll_s: float = 0.2) -> None:
        """Answer new requests until stopped or idle for `idle_exit_s` seconds."""
        last_id, idle_since = None, time.time()
        while not self.should_stop():
            request = pg.read_request(self.folder)
            if request is not None and request.get("id") != last_id:
                last_id = request.get("id")
                try:
                    self.answer(request)
                except Exception as exc:     # a bad question must not take the loaded model down
                    log.exception("answering %s failed", last_id)
                    self._write({"id": last_id, "prompt": request.get("prompt"), "status": "failed", "order": [],
                                 "ranks": {}, "error": runstate.describe_failure(exc)})
                idle_since = time.time()
            elif time.time() - idle_since > idle_exit_s:
                log.info("no question for %.0f s: exiting", idle_exit_s)
                break
            time.sleep(poll_s)


def run_playground(run_dir: Path, folder: Path, idle_exit_s: float = pg.IDLE_EXIT_S,
                   should_stop: Callable[[], bool] = lambda: False) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handler = runstate.attach_log(folder, "playground.log")
    playground = Playground(run_dir, folder, should_stop)
    try:
        playground.load()
        playground.serve(idle_exit_s)
        runstate.write_status(folder, "completed", phase="stopped", run=str(run_dir))
    except BaseException as exc:
        runstate.record_failure(folder, exc, phase="stopped")
        raise
    finally:
        runstate.detach_log(handler)
