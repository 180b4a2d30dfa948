"""Small helpers shared by tests (not fixtures)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def randomize_adapter_b(run_dir: Path, seed: int = 0, std: float = 0.05) -> None:
    """Give B real values so that every rank changes the output (B starts at zero)."""
    from safetensors.torch import load_file, save_file

    path = Path(run_dir) / "adapter" / "adapter.safetensors"
    state = load_file(str(path))
    gen = torch.Generator().manual_seed(seed)
    for key, tensor in state.items():
        if key.endswith("lora_B"):
            state[key] = torch.randn(tensor.shape, generator=gen) * std
    save_file(state, str(path))


def run_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-m", "core", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def kill_store_processes(db_path: Path) -> None:
    """SIGKILL every worker and CLI process a job store's database names (test cleanup)."""
    import contextlib
    import signal
    import sqlite3

    from core.jobs import _pid_alive

    with contextlib.suppress(sqlite3.Error):
        db = sqlite3.connect(db_path)
        try:
            for pid, wpid in db.execute("SELECT pid, worker_pid FROM jobs"):
                for p in (wpid, pid):
                    if p and _pid_alive(p):
                        with contextlib.suppress(OSError):
                            os.killpg(p, signal.SIGKILL)
        finally:
            db.close()


def snapshot(*folders: Path) -> dict:
    """Every file and folder under `folders` with its size, modification time and bytes'
    hash: equal snapshots mean nothing was written, changed or removed there."""
    import hashlib

    state = {}
    for folder in folders:
        folder = Path(folder)
        if not folder.exists():
            state[str(folder)] = None
            continue
        for path in [folder, *sorted(folder.rglob("*"))]:
            st = path.lstat()
            digest = hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() and not path.is_symlink() else None
            state[str(path)] = (st.st_mode, st.st_size if digest else None, st.st_mtime_ns if digest else None, digest)
    return state
