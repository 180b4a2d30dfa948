"""Sharded sweeps: worker processes measure different ranks of one sweep at once.

The ranks of a sweep are independent measurements (nothing to all-reduce), so no process
group is needed: the sweep process hands out ranks one at a time to N workers
(`python -m core.evaluation.sharded --out SWEEP`), each pinned to one GPU or to its share of
the CPU cores. A worker loads the run once, measures each rank it is given with the code of
a one-process sweep (`Sweep.evaluate_rank`) and sends the result back on its stdout. The
sweep process alone writes the sweep folder: each rank's file as it arrives, then the same
`summary.csv`, `per_prompt.csv` and `sweep.json` as a one-process sweep (the timing columns
aside: they were measured by processes sharing the machine, which `sweep.json` records as
`run_meta.workers`). Cancel stops every worker at its next batch of prompts and keeps the
finished ranks; `--resume` measures the rest.

Every worker measures as a one-process sweep does: the same batches of prompts encoded
once, and quality on the model the sweep process chose once for all of them
(`quality_path`: auto is decided here, with one float copy of the base per worker that
shares the memory), so that the quality numbers do not depend on which worker measured.

Protocol, one JSON object per line. To a worker: `{"metrics": [...], "quality_path": ...}`
once, then `{"rank": b}` per rank; end of input means no more ranks. From a worker:
`ready`, `rank_start`, `phase` and `prompt` progress events,
`{"event": "result", "rank", "result", "threads"}`, `{"event": "cancelled"}`, or
`{"event": "error", "message"}` before it exits.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from core import distributed, runstate, threads
from core.errors import UserError
from core.evaluation.sweep import Sweep, SweepConfig, SweepResult, planned_float_copy_bytes, read_rank_results

WORKER_LOG = "worker_{index}.log"


class WorkerFailed(RuntimeError):
    """A sweep worker crashed (not bad input: the sweep is marked failed and keeps its finished ranks)."""


def check_workers(workers: int, sweep: Sweep) -> tuple[int, str | None]:
    """How many workers to start (1 = measure in this process) and a note when that is fewer than asked.

    More workers than devices is refused (UserError); more workers than ranks left to measure
    starts one per rank.
    """
    if workers == 1:
        return 1, None
    distributed.check_parallel(workers, "workers", distributed.training_devices("auto"))
    done = read_rank_results(sweep.out) if sweep.resume else {}
    todo = [b for b in sweep.ranks if b not in done]
    if workers <= len(todo):
        return workers, None
    used = max(1, len(todo))
    return used, (f"{workers} workers asked for {len(todo)} rank{'s' if len(todo) != 1 else ''} to measure: "
                  f"using {used} (one per rank)")


def worker_env(index: int, workers: int, devices: distributed.Devices) -> dict:
    """Worker `index` sees one GPU, or gets its share of the CPU cores."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if devices.kind == "cuda":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [x.strip() for x in visible.split(",")] if visible else [str(i) for i in range(devices.count)]
        env["CUDA_VISIBLE_DEVICES"] = ids[index % len(ids)]
    else:
        env["OMP_NUM_THREADS"] = str(distributed.threads_per_process(workers))
    return env


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen
    rank: int | None = None          # the rank it is measuring
    finished: bool = False           # its output ended
    error: str | None = None
    cancelled: bool = False
    threads: dict | None = None      # its thread policy, as it last reported it
    lines: "queue.Queue" = field(default_factory=queue.Queue)


class WorkerPool:
    """The sweep process's side: start workers, hand out ranks, relay progress, collect results."""

    def __init__(self, sweep: Sweep, workers: int):
        from core.jobs import _child_preexec

        self.sweep = sweep
        self.events: "queue.Queue[tuple[int, dict | None]]" = queue.Queue()
        devices = distributed.training_devices("auto")
        module = [sys.executable, "-m", "core.evaluation.sharded", "--out", str(sweep.out)]
        self.workers = []
        for index in range(workers):
            log = open(sweep.out / WORKER_LOG.format(index=index), "ab")
            proc = subprocess.Popen(module, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                    env=worker_env(index, workers, devices), text=True, bufsize=1,
                                    preexec_fn=_child_preexec(os.getpid()))
            log.close()
            worker = Worker(index, proc)
            threading.Thread(target=self._read, args=(worker,), daemon=True).start()
            self._send(worker, {"metrics": sweep.metrics, "quality_path": sweep.quality_path})
            self.workers.append(worker)
        self.model_meta: dict | None = None

    def _read(self, worker: Worker) -> None:
        for line in worker.proc.stdout:
            try:
                self.events.put((worker.index, json.loads(line)))
            except json.JSONDecodeError:
                continue
        self.events.put((worker.index, None))

    @staticmethod
    def _send(worker: Worker, message: dict) -> None:
        try:
            worker.proc.stdin.write(json.dumps(message) + "\n")
            worker.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # it died; its reader reports the end

    @staticmethod
    def _close_input(worker: Worker) -> None:
        try:
            worker.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass

    def _assign(self, worker: Worker, todo: list[int]) -> None:
        if todo:
            worker.rank = todo.pop(0)
            self._send(worker, {"rank": worker.rank})
        else:
            worker.rank = None
            self._close_input(worker)

    def run(self, todo: list[int], done_units: int, total_units: int) -> str:
        """Measure `todo`; returns "completed" or "cancelled", raises WorkerFailed when a worker fails."""
        sweep, todo = self.sweep, list(todo)
        started, stopping = time.time(), False
        for worker in self.workers:
            self._assign(worker, todo)
        self._write_status()
        while not all(w.finished for w in self.workers):
            if not stopping and sweep.should_stop():
                stopping = True
                self.stop()
            try:
                index, event = self.events.get(timeout=0.2)
            except queue.Empty:
                continue
            worker = self.workers[index]
            if event is None:
                worker.finished = True
                worker.proc.wait()
                if worker.rank is not None and not (stopping or worker.cancelled or worker.error):
                    worker.error = f"it stopped (exit code {worker.proc.returncode}) while measuring rank {worker.rank}"
                if worker.error and not stopping:
                    stopping = True
                    self.stop()
                continue
            kind = event.get("event")
            if kind == "ready":
                self.model_meta = sweep.model_meta = event["model"]
            elif kind == "rank_start":
                sweep._emit({"event": "rank_start", "rank": event["rank"], "worker": index})
            elif kind in ("prompt", "phase"):   # a batch of prompts done, or a rank's latency timing begun
                if kind == "prompt":
                    done_units += event["units"]
                elapsed = time.time() - started
                sweep._emit(event | {"done_units": done_units, "total_units": total_units, "worker": index,
                                     "eta_s": elapsed / max(done_units - sweep.units_at_start, 1) * (total_units - done_units)})
            elif kind == "result":
                worker.threads = event.get("threads")
                sweep.threads_meta = [w.threads for w in self.workers if w.threads]
                result = event["result"] | {"workers": len(self.workers)}
                sweep._rank_finished(event["rank"], result)
                worker.rank = None
                if stopping:
                    self._close_input(worker)
                else:
                    self._assign(worker, todo)
                    self._write_status()
            elif kind == "cancelled":
                worker.cancelled = True
                worker.rank = None
            elif kind == "error":
                worker.error = event["message"]
        failed = [w for w in self.workers if w.error]
        if failed:
            raise WorkerFailed("; ".join(f"sweep worker {w.index} failed: {w.error} (see {WORKER_LOG.format(index=w.index)})"
                                     for w in failed))
        return "cancelled" if stopping else "completed"

    def _write_status(self) -> None:
        busy = sorted(w.rank for w in self.workers if w.rank is not None)
        runstate.write_status(self.sweep.out, "running", phase="ranks " + ", ".join(map(str, busy)), ranks=self.sweep.ranks,
                              ranks_done=sorted(self.sweep.results), workers=len(self.workers))

    def stop(self) -> None:
        """Ask every worker to stop at its next batch of prompts (a finished rank still comes back)."""
        import signal

        for worker in self.workers:
            if worker.proc.poll() is None:
                try:
                    worker.proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
            self._close_input(worker)

    def kill(self) -> None:
        for worker in self.workers:
            if worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait()


def run_sharded(sweep: Sweep, workers: int) -> SweepResult:
    """The sweep with `workers` worker processes; the same files as `Sweep.run` in one process."""
    sweep._open_folder()
    sweep.quality_path = plan_quality_path(sweep, workers)
    todo = sweep.todo()
    pool = WorkerPool(sweep, workers)
    try:
        done_units, total_units = sweep._begin(todo, workers=workers)
        status = pool.run(todo, done_units, total_units)
    finally:
        pool.kill()
    if pool.model_meta is None:  # every worker was stopped before its model was loaded
        pool.model_meta = json.loads((Path(sweep.cfg.run) / "config.json").read_text()).get("model")
    sweep.model_meta = pool.model_meta
    return sweep.finish(status)


def plan_quality_path(sweep: Sweep, workers: int) -> str:
    """The model every worker computes quality on, decided once here as a one-process sweep decides it
    (auto: merged when a float copy of the base per worker sharing the memory fits; one GPU per worker)."""
    if sweep.cfg.quality_path != "auto":
        return sweep._choose_quality_path(0, "cpu")
    need, device = planned_float_copy_bytes(sweep.run_config)
    return sweep._choose_quality_path(need, device, copies=1 if device.startswith("cuda") else workers)


# ------------------------------------------------------------------ the worker


class RankWorker(Sweep):
    """A sweep that measures the ranks it is sent and writes nothing: results go to the sweep process."""

    def __init__(self, out: Path, send, should_stop):
        saved = json.loads((Path(out) / "config.json").read_text())["config"]
        super().__init__(SweepConfig.from_dict(saved | {"out": str(out)}), resume=False, should_stop=should_stop)
        self.send = send

    def _emit(self, event: dict) -> None:
        self.send(event)


def worker_main(out: Path) -> int:
    from core.cli import CancelFlag, _quiet_libraries

    # The protocol owns the real stdout; anything else printed (libraries) goes to the worker's log.
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(message: dict) -> None:
        protocol.write(json.dumps(message, default=float) + "\n")

    _quiet_libraries()
    # A job under the thread policy (core/threads.py): its share of the cores (OMP_NUM_THREADS from
    # worker_env) is the most it uses, and it gives threads back while other processes hold cores.
    threads.configure_job()
    worker = RankWorker(out, send, CancelFlag().install())
    try:
        setup = json.loads(sys.stdin.readline() or "{}")
        worker._read_inputs()
        worker.metrics = setup.get("metrics", list(worker.cfg.metrics))
        worker._load_models(setup.get("quality_path"))
        send({"event": "ready", "model": worker.model_meta})
        worker._reset_counters(worker.ranks)  # its own counts; the sweep process counts those of all workers
        for line in sys.stdin:
            rank = int(json.loads(line)["rank"])
            send({"event": "rank_start", "rank": rank})
            result = worker.evaluate_rank(rank)
            if result is None:
                send({"event": "cancelled"})
                return 0
            send({"event": "result", "rank": rank, "result": result, "threads": threads.describe()})
    except (KeyboardInterrupt, BrokenPipeError):
        return 0
    except BaseException as exc:
        import traceback

        traceback.print_exc()
        send({"event": "error", "message": runstate.describe_failure(exc)})
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.evaluation.sharded", description="a sweep worker (started by qdylora sweep --workers)")
    parser.add_argument("--out", required=True, help="the sweep folder (its config.json says what to measure)")
    args = parser.parse_args(argv)
    return worker_main(Path(args.out))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
