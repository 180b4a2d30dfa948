"""The real `qdylora` CLI, killed with SIGKILL at a chosen point (tests/test_fault_injection.py).

`RANK_STUDIO_TEST_FAULT=PHASE[:N] python -m tests.fault_cli <qdylora arguments>`

A kill -9 is what a power cut, the OOM killer or a reboot does to a job: no handler runs,
no file is closed. The phases are the moments where that can cost work or leave a folder
half-changed:

- `model-load`: the base model is loaded, the run folder says "loading model"
- `mid-step:N`: inside optimizer step N (after backward, before the weights change)
- `swap-renamed-old:N`: inside checkpoint save N, after checkpoint/ became checkpoint.old/
  and before checkpoint.tmp/ became checkpoint/
- `swap-before-cleanup:N`: inside checkpoint save N, after the new checkpoint/ is in place
  and before checkpoint.old/ is removed
- `export-write`: while the export writes its temporary folder
- `export-move`: while the finished export moves into an existing output folder
- `sweep-rank:B`: when the sweep starts measuring rank B

Without the variable it is exactly `python -m core`.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

FAULT_ENV = "RANK_STUDIO_TEST_FAULT"


def _die() -> None:
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _install(phase: str, n: int | None) -> None:
    if phase == "model-load":
        import core.train

        real = core.train.load_base_model

        def load_then_die(*args, **kwargs):
            real(*args, **kwargs)
            _die()
        core.train.load_base_model = load_then_die
    elif phase == "mid-step":
        import torch

        real_step = torch.optim.AdamW.step
        calls = {"n": 0}

        def step_then_die(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                _die()
            return real_step(self, *args, **kwargs)
        torch.optim.AdamW.step = step_then_die
    elif phase in ("swap-renamed-old", "swap-before-cleanup"):
        real_rename, real_rmtree = Path.rename, shutil.rmtree
        saves = {"n": 0}

        def rename(self, target):
            if self.name == "checkpoint.tmp":
                saves["n"] += 1
                if phase == "swap-renamed-old" and saves["n"] == n:
                    _die()
            return real_rename(self, target)

        def rmtree(path, *args, **kwargs):
            if Path(path).name == "checkpoint.old" and phase == "swap-before-cleanup" and saves["n"] == n:
                _die()
            return real_rmtree(path, *args, **kwargs)
        Path.rename, shutil.rmtree = rename, rmtree
    elif phase == "export-write":
        import core.export

        real_save = core.export.peft_state_dict

        def write_then_die(*args, **kwargs):
            real_save(*args, **kwargs)
            _die()
        core.export.peft_state_dict = write_then_die
    elif phase == "export-move":
        real_rename = Path.rename
        moved = {"n": 0}

        def rename(self, target):
            if ".tmp-" in self.parent.name:          # an item of the export's temporary folder
                moved["n"] += 1
                if moved["n"] == 2:
                    _die()
            return real_rename(self, target)
        Path.rename = rename
    elif phase == "sweep-rank":
        from core.evaluation.sweep import Sweep

        real_evaluate = Sweep.evaluate_rank

        def evaluate_or_die(self, rank, *args, **kwargs):
            if rank == n:
                _die()
            return real_evaluate(self, rank, *args, **kwargs)
        Sweep.evaluate_rank = evaluate_or_die
    else:
        raise SystemExit(f"unknown fault phase {phase!r}")


def main() -> int:
    spec = os.environ.get(FAULT_ENV)
    if spec:
        phase, _, n = spec.partition(":")
        _install(phase, int(n) if n else None)
    from core.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
