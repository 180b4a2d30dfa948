"""Job store: CLI subprocesses run by detached workers, state in SQLite on disk.

The dashboard never runs long work in its own process. `JobStore.submit` records a
job in `WORKSPACE/jobs.sqlite` and starts a detached worker
(`python -m core.jobs worker --workspace W --job ID`, in its own session) that

1. waits until its job is at the head of the queue and a heavy slot is free
   (every state change happens under an fcntl lock on `WORKSPACE/jobs.lock`),
2. marks the job running and starts the CLI child (`python -m core <kind> ... --out DIR`)
   in a new process group, output appended to `DIR/job.log`,
3. waits for it and records completed / failed / cancelled / died from the exit code and
   `DIR/status.json`.

Nothing depends on the Streamlit server staying alive: a new `JobStore` on the same
workspace (a restarted server, another tab) sees the same jobs. `refresh()` reconciles
the database with reality when a worker vanished (kill -9).

Exit codes expected from the CLI: 0 done (status.json may still say "cancelled" or
"failed", which wins), 130 cancelled (SIGTERM/SIGINT handled cooperatively),
2 input error (`UserError`), anything else failed. Death by a signal is "died" unless
the user asked to cancel.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from core import proc
from core.errors import UserError
from core.fileio import read_json_object

KINDS = ("train", "sweep", "export")
KIND_DIRS = {"train": "runs", "sweep": "sweeps", "export": "exports"}
HEAVY_KINDS = frozenset(KINDS)          # all kinds take the one heavy slot
RESUMABLE_KINDS = ("train", "sweep")
STATUSES = ("queued", "running", "completed", "failed", "cancelled", "died")
ACTIVE = ("queued", "running")
STOPPED = ("cancelled", "died", "failed")
JOB_CONFIG_FILE = "config.json"   # a run or sweep folder holds it from its first moment of work
FINISHED = ("completed", "failed", "cancelled", "died")
EXIT_USER_ERROR = 2
EXIT_CANCELLED = 130
ERROR_TAIL_LINES = 20
LOCK_TIMEOUT_S = 10.0
TRASH_DIR = ".trash"
PROJECT_ROOT = Path(__file__).resolve().parent.parent

_SAFE_RUN = re.compile(r"[^A-Za-z0-9._-]+")

# Popen objects of the workers this process started, so finished ones get reaped
# (a zombie would otherwise look alive to a pid check).
_SPAWNED: dict[int, subprocess.Popen] = {}


def sanitize_name(name: str) -> str:
    """A user-given name made safe as one path component.

    Keeps [A-Za-z0-9._-], turns every run of other characters into one '-', strips
    leading dots/dashes and trailing dashes, caps at 60 characters; "job" if nothing is left.
    """
    s = _SAFE_RUN.sub("-", str(name if name is not None else ""))
    s = s.lstrip(".-")[:60].rstrip("-")
    return s or "job"


def default_workspace() -> Path:
    """`$RANK_STUDIO_WORKSPACE`, else `./workspace`, as an absolute path."""
    return Path(os.environ.get("RANK_STUDIO_WORKSPACE") or "workspace").expanduser().resolve()


class StoreBusy(UserError):
    """The store's lock could not be had in time."""


@dataclass
class Job:
    id: int
    kind: str                   # "train" | "sweep" | "export"
    name: str                   # sanitised
    out_dir: Path
    argv: list[str]             # the full command line of the CLI child
    status: str                 # see STATUSES
    pid: int | None             # the CLI child (leader of its own process group)
    created_at: float
    started_at: float | None
    finished_at: float | None
    exit_code: int | None
    error: str | None           # failed/died: human message + last log lines
    parent_id: int | None
    worker_pid: int | None = None
    cancel_requested: bool = False
    queued_at: float | None = None  # queue order (set on submit and on resume)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def resume_mode(self) -> str | None:
        """How a stopped job goes on: "resume" from its saved state (a train or sweep job
        whose folder holds its config.json, written before any other work), "restart" from
        the beginning (it never saved any state, e.g. it died while queued; or an export),
        None while it is active or after it completed."""
        if self.status not in STOPPED:
            return None
        if self.kind in RESUMABLE_KINDS and (self.out_dir / JOB_CONFIG_FILE).is_file():
            return "resume"
        return "restart"

    @property
    def resumable(self) -> bool:
        return self.resume_mode == "resume"

    @property
    def restartable(self) -> bool:
        return self.resume_mode == "restart"

    @property
    def log_path(self) -> Path:
        return self.out_dir / "job.log"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    out_dir TEXT NOT NULL,
    argv TEXT NOT NULL,
    status TEXT NOT NULL,
    pid INTEGER,
    pid_start INTEGER,
    worker_pid INTEGER,
    worker_start INTEGER,
    pid_started REAL,
    worker_started REAL,
    created_at REAL NOT NULL,
    queued_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    exit_code INTEGER,
    error TEXT,
    parent_id INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status);
"""


# ---------------------------------------------------------------- process checks

def _pid_alive(pid: int | None, start: float | None = None) -> bool:
    """Whether `pid` is a live (non-zombie) process, and the same one if `start` is known."""
    if not pid:
        return False
    popen = _SPAWNED.get(pid)
    if popen is not None and popen.poll() is not None:
        _SPAWNED.pop(pid, None)
        return False
    return proc.is_alive(pid, start)


def _reap_spawned() -> None:
    for pid, popen in list(_SPAWNED.items()):
        if popen.poll() is not None:
            _SPAWNED.pop(pid, None)


def _signal_group(pid: int, sig: int) -> bool:
    try:
        os.killpg(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
            return True
    return False


def _child_preexec(parent_pid: int):
    """In the CLI child: die with SIGTERM (cooperative stop) if the worker dies (Linux)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except Exception:                               # not Linux: no parent-death signal
        return None

    def preexec() -> None:
        try:
            prctl(1, signal.SIGTERM)                # PR_SET_PDEATHSIG
            if os.getppid() != parent_pid:          # the worker died before prctl
                os.kill(os.getpid(), signal.SIGTERM)
        except Exception:
            pass
    return preexec


# ---------------------------------------------------------------- files

def tail_lines(path: Path, n: int) -> list[str]:
    """The last `n` lines of a text file ([] if missing); a carriage-return progress bar
    line keeps only what a terminal would show (its last segment)."""
    if n <= 0:
        return []
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            block, data = 8192, b""
            pos = end
            while pos > 0 and data.count(b"\n") <= n:
                step = min(block, pos)
                pos -= step
                f.seek(pos)
                data = f.read(step) + data
                block = min(block * 2, 1 << 20)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    if pos > 0 and lines:                       # first line may be cut
        lines = lines[1:]
    lines = [ln.rsplit("\r", 1)[-1] if "\r" in ln else ln for ln in lines]
    while lines and not lines[-1].strip():
        lines.pop()
    return lines[-n:]


def _read_status(out_dir: Path, since: float | None) -> dict | None:
    """DIR/status.json if it parses and was written during this attempt."""
    p = out_dir / "status.json"
    try:
        if since is not None and p.stat().st_mtime < since - 1.0:
            return None                         # left over from an earlier attempt
    except OSError:
        return None
    return read_json_object(p)


# ---------------------------------------------------------------- store

class JobStore:
    """Jobs of one workspace. Safe to create many times (every Streamlit rerun)."""

    def __init__(self, workspace: str | Path | None = None, max_heavy: int = 1,
                 python: str = sys.executable, cli_module: str = "core",
                 poll_interval: float = 1.0, lock_timeout: float = LOCK_TIMEOUT_S):
        if max_heavy < 1:
            raise UserError("max_heavy must be at least 1")
        self.workspace = Path(workspace if workspace is not None else default_workspace()).expanduser().resolve()
        self.max_heavy = int(max_heavy)
        self.python = python
        self.cli_module = cli_module
        self.poll_interval = float(poll_interval)
        self.lock_timeout = float(lock_timeout)
        self.db_path = self.workspace / "jobs.sqlite"
        self.lock_path = self.workspace / "jobs.lock"
        self.runs_dir = self.workspace / "runs"
        self.sweeps_dir = self.workspace / "sweeps"
        self.exports_dir = self.workspace / "exports"
        self.uploads_dir = self.workspace / "uploads"
        self.workspace.mkdir(parents=True, exist_ok=True)
        for d in (self.runs_dir, self.sweeps_dir, self.exports_dir, self.uploads_dir):
            d.mkdir(exist_ok=True)
            self._check_inside(d)
        with self._locked(), self._db() as db:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    db.execute(stmt)
            # Databases made before process start times came from core.proc hold them in
            # clock ticks (pid_start, worker_start); those columns are no longer read.
            have = {r["name"] for r in db.execute("PRAGMA table_info(jobs)")}
            for column in ("pid_started", "worker_started"):
                if column not in have:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {column} REAL")
        # set by the worker process only
        self._child: subprocess.Popen | None = None
        self._terminated = False
        self._start_failed = False

    # ------------------------------------------------------------ helpers

    def kind_dir(self, kind: str) -> Path:
        if kind not in KINDS:
            raise UserError(f"Unknown job kind {kind!r}; expected one of {', '.join(KINDS)}")
        return self.workspace / KIND_DIRS[kind]

    def _check_inside(self, path: Path) -> Path:
        """`path` resolved; UserError unless it lies strictly inside the workspace."""
        resolved = Path(path).resolve()
        if resolved == self.workspace or not resolved.is_relative_to(self.workspace):
            raise UserError(f"Path {path} is outside the workspace {self.workspace}")
        return resolved

    @contextlib.contextmanager
    def _locked(self):
        """The store's lock, waited for at most `lock_timeout` seconds: everything done under
        it takes milliseconds, so a longer wait means a stuck holder, not a busy store."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + self.lock_timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise StoreBusy(
                            f"The job store is busy: another process has held {self.lock_path} for over "
                            f"{self.lock_timeout:g} s. Try again; if it persists, a stuck Rank Studio process holds it.")
                    time.sleep(0.02)
            yield
        finally:
            os.close(fd)                        # releases the lock

    @contextlib.contextmanager
    def _db(self):
        """One connection, one IMMEDIATE transaction (committed on success)."""
        db = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA busy_timeout = 30000")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    @staticmethod
    def _job(row: sqlite3.Row) -> Job:
        return Job(
            id=row["id"], kind=row["kind"], name=row["name"], out_dir=Path(row["out_dir"]),
            argv=json.loads(row["argv"]), status=row["status"], pid=row["pid"],
            created_at=row["created_at"], started_at=row["started_at"],
            finished_at=row["finished_at"], exit_code=row["exit_code"], error=row["error"],
            parent_id=row["parent_id"], worker_pid=row["worker_pid"],
            cancel_requested=bool(row["cancel_requested"]), queued_at=row["queued_at"],
        )

    @staticmethod
    def _row(db, job_id: int) -> sqlite3.Row:
        row = db.execute("SELECT * FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
        if row is None:
            raise UserError(f"No job with id {job_id}")
        return row

    def _env(self) -> dict[str, str]:
        from core.threads import job_env

        env = job_env()  # threads and OpenMP waits for a fair share of a busy machine (core/threads.py)
        root = str(PROJECT_ROOT)
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if root not in paths:
            paths.insert(0, root)
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _error_text(self, out_dir: Path, message: str) -> str:
        lines = tail_lines(out_dir / "job.log", ERROR_TAIL_LINES) or \
            tail_lines(out_dir / "train.log", ERROR_TAIL_LINES)
        if not lines:
            return message
        return f"{message}\n\nLast lines of the log:\n" + "\n".join(lines)

    def _spawn_worker(self, db, job_id: int, out_dir: Path) -> None:
        """Start the detached worker of a queued job (caller holds the lock)."""
        cmd = [self.python, "-m", "core.jobs", "worker", "--workspace", str(self.workspace),
               "--job", str(job_id), "--max-heavy", str(self.max_heavy),
               "--poll", str(self.poll_interval)]
        try:
            with open(out_dir / "worker.log", "ab") as log:
                popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=PROJECT_ROOT,
                                         env=self._env(), start_new_session=True)
        except OSError as exc:
            db.execute("UPDATE jobs SET status='failed', finished_at=?, error=? WHERE id=?",
                       (time.time(), f"Could not start the job worker: {exc}", job_id))
            return
        _SPAWNED[popen.pid] = popen
        db.execute("UPDATE jobs SET worker_pid=?, worker_started=? WHERE id=?",
                   (popen.pid, proc.started_at(popen.pid), job_id))

    # ------------------------------------------------------------ public API

    def submit(self, kind: str, name: str, cli_args: list[str], parent_id: int | None = None) -> Job:
        """Queue `python -m <cli_module> <kind> *cli_args --out WORKSPACE/{runs,sweeps,exports}/<name>-<id>`."""
        base = self.kind_dir(kind)
        cli_args = [str(a) for a in cli_args]
        if any(a == "--out" or a.startswith("--out=") for a in cli_args):
            raise UserError("The output folder is chosen by the job store; do not pass --out")
        safe = sanitize_name(name)
        with self._locked(), self._db() as db:
            if parent_id is not None:
                self._row(db, parent_id)
            for _ in range(1000):
                now = time.time()
                cur = db.execute(
                    "INSERT INTO jobs (kind, name, out_dir, argv, status, created_at, queued_at, parent_id)"
                    " VALUES (?, ?, '', '[]', 'queued', ?, ?, ?)", (kind, safe, now, now, parent_id))
                job_id = cur.lastrowid
                out_dir = base / f"{safe}-{job_id}"
                self._check_inside(out_dir)
                try:
                    out_dir.mkdir()
                    break
                except FileExistsError:             # a folder left from an older database
                    db.execute("DELETE FROM jobs WHERE id=?", (job_id,))
            else:
                raise UserError(f"Could not find a free output folder for {safe!r}")
            self._check_inside(out_dir)
            argv = [self.python, "-m", self.cli_module, kind, *cli_args, "--out", str(out_dir)]
            db.execute("UPDATE jobs SET out_dir=?, argv=? WHERE id=?",
                       (str(out_dir), json.dumps(argv), job_id))
            self._spawn_worker(db, job_id, out_dir)
            return self._job(self._row(db, job_id))

    def refresh(self) -> None:
        """Reconcile the database with the processes that actually exist."""
        with self._locked(), self._db() as db:
            self._refresh_locked(db)

    def _refresh_locked(self, db) -> None:
        _reap_spawned()
        now = time.time()
        for row in db.execute("SELECT * FROM jobs WHERE status IN ('queued', 'running')").fetchall():
            if _pid_alive(row["worker_pid"], row["worker_started"]):
                continue                            # the worker will record the outcome
            out_dir = Path(row["out_dir"])
            if row["status"] == "queued":
                msg = (f"The job's worker process (pid {row['worker_pid']}) ended before the job started.")
                lines = tail_lines(out_dir / "worker.log", ERROR_TAIL_LINES)
                if lines:
                    msg += "\n\nLast lines of worker.log:\n" + "\n".join(lines)
                db.execute("UPDATE jobs SET status='died', finished_at=?, error=? WHERE id=?",
                           (now, msg, row["id"]))
                continue
            if _pid_alive(row["pid"], row["pid_started"]):
                continue                            # orphaned CLI still working: keep the slot
            st = _read_status(out_dir, row["started_at"]) or {}
            said = st.get("status")
            error = None
            if said == "completed":
                status = "completed"
            elif said == "cancelled" and row["cancel_requested"]:
                status = "cancelled"
            elif said == "failed":
                status = "failed"
                error = self._error_text(out_dir, f"The job failed: {st.get('error') or 'see the log'}")
            elif said == "cancelled":
                status = "died"
                error = self._error_text(out_dir, (
                    f"The job's worker process (pid {row['worker_pid']}) was killed; the run stopped "
                    "at a step boundary and saved a checkpoint. Resume it to continue."))
            else:
                status = "died"
                error = self._error_text(out_dir, (
                    f"The job's processes are gone (worker pid {row['worker_pid']}, "
                    f"process pid {row['pid']}) and the job did not finish"
                    + (f" (status.json says {said!r})." if said else ".")))
            db.execute("UPDATE jobs SET status=?, finished_at=?, error=? WHERE id=?",
                       (status, now, error, row["id"]))

    def list(self, kind: str | None = None) -> list[Job]:
        """All jobs (of `kind`), newest first, after a refresh."""
        if kind is not None:
            self.kind_dir(kind)
        with self._locked(), self._db() as db:
            self._refresh_locked(db)
            if kind is None:
                rows = db.execute("SELECT * FROM jobs ORDER BY id DESC").fetchall()
            else:
                rows = db.execute("SELECT * FROM jobs WHERE kind=? ORDER BY id DESC", (kind,)).fetchall()
        return [self._job(r) for r in rows]

    def get(self, job_id: int) -> Job:
        with self._locked(), self._db() as db:
            self._refresh_locked(db)
            return self._job(self._row(db, job_id))

    def cancel(self, job_id: int, force: bool = False) -> Job:
        """Queued: cancelled at once. Running: SIGTERM to the CLI's process group (it stops
        at a step boundary, saves a checkpoint); the worker then records "cancelled".
        Idempotent: a second call does not signal again unless `force` (SIGKILL)."""
        with self._locked(), self._db() as db:
            self._refresh_locked(db)
            row = self._row(db, job_id)
            if row["status"] == "queued":
                db.execute("UPDATE jobs SET status='cancelled', finished_at=?, cancel_requested=1 "
                           "WHERE id=?", (time.time(), row["id"]))
            elif row["status"] == "running":
                first = not row["cancel_requested"]
                db.execute("UPDATE jobs SET cancel_requested=1 WHERE id=?", (row["id"],))
                if row["pid"] and _pid_alive(row["pid"], row["pid_started"]) and (first or force):
                    _signal_group(row["pid"], signal.SIGKILL if force else signal.SIGTERM)
            return self._job(self._row(db, job_id))

    def resume(self, job_id: int) -> Job:
        """Re-queue a cancelled/died/failed job in the same out_dir, as its `resume_mode`
        says: with `--resume` (once) when it saved state, else its original command line
        (a restart). The job keeps its id and goes to the back of the queue."""
        with self._locked(), self._db() as db:
            self._refresh_locked(db)
            row = self._row(db, job_id)
            job = self._job(row)
            mode = job.resume_mode
            if mode is None:
                raise UserError(f"Job {job.id} is {job.status}; only cancelled, died or failed jobs can be "
                                "resumed or restarted")
            out_dir = self._check_inside(job.out_dir)
            if not out_dir.is_dir():
                raise UserError(f"The output folder of job {job.id} is gone; it cannot be resumed")
            argv = [a for a in job.argv if a != "--resume"] + (["--resume"] if mode == "resume" else [])
            db.execute(
                "UPDATE jobs SET status='queued', argv=?, queued_at=?, started_at=NULL, finished_at=NULL,"
                " exit_code=NULL, error=NULL, pid=NULL, pid_started=NULL, worker_pid=NULL,"
                " worker_started=NULL, cancel_requested=0 WHERE id=?",
                (json.dumps(argv), time.time(), job.id))
            self._spawn_worker(db, job.id, out_dir)
            return self._job(self._row(db, job_id))

    def delete(self, job_id: int) -> None:
        """Remove a finished job's folder (only if inside the workspace) and its row."""
        with self._locked(), self._db() as db:
            self._refresh_locked(db)
            job = self._job(self._row(db, job_id))
            if job.active:
                raise UserError(f"Job {job.id} is {job.status}; cancel it before deleting it")
            try:
                target = self._check_inside(job.out_dir)
            except UserError:
                target = None                       # never delete outside the workspace
            if target is not None and target.parent != self.workspace:
                if job.out_dir.is_symlink():
                    job.out_dir.unlink()            # a link: drop it, not what it points to
                elif target.is_dir():
                    # One rename under the lock; the slow removal happens after it is released.
                    trash = self.workspace / TRASH_DIR
                    trash.mkdir(exist_ok=True)
                    target.rename(trash / f"{target.name}-{time.time_ns()}")
            db.execute("UPDATE jobs SET parent_id=NULL WHERE parent_id=?", (job.id,))
            db.execute("DELETE FROM jobs WHERE id=?", (job.id,))
        self._empty_trash()

    def _empty_trash(self) -> None:
        """Remove deleted job folders (also ones left by a delete that was killed midway)."""
        trash = self.workspace / TRASH_DIR
        if trash.is_dir():
            for item in trash.iterdir():
                shutil.rmtree(item, ignore_errors=True)

    def log_tail(self, job_id: int, n: int = 40) -> str:
        """The last `n` lines of the job's output (`job.log`; `train.log` if there is none)."""
        with self._locked(), self._db() as db:
            job = self._job(self._row(db, job_id))
        lines = tail_lines(job.out_dir / "job.log", n) or tail_lines(job.out_dir / "train.log", n)
        return "\n".join(lines)

    def queue_position(self, job_id: int) -> int | None:
        """1 = next to start; None unless the job is queued."""
        with self._locked(), self._db() as db:
            self._refresh_locked(db)
            ids = [r[0] for r in db.execute(
                "SELECT id FROM jobs WHERE status='queued' ORDER BY queued_at, id").fetchall()]
        return ids.index(int(job_id)) + 1 if int(job_id) in ids else None

    # ------------------------------------------------------------ worker side

    def _on_term(self, signum, frame) -> None:
        self._terminated = True
        child = self._child
        if child is not None and child.poll() is None:
            _signal_group(child.pid, signal.SIGTERM)

    def run_worker(self, job_id: int) -> int:
        """Body of `python -m core.jobs worker`: wait for a slot, run the CLI, record the end."""
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        me = os.getpid()
        while True:
            try:
                started = self._try_start(job_id, me)
            except StoreBusy:
                started = None                      # a stuck holder: keep waiting, never give up the job
            if started is not None:
                if not started:
                    return 1 if self._start_failed else 0
                break
            time.sleep(self.poll_interval)
        child = self._child
        assert child is not None
        if self._terminated and child.poll() is None:
            _signal_group(child.pid, signal.SIGTERM)
        code = child.wait()
        while True:
            try:
                with self._locked(), self._db() as db:
                    row = db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
                    if row is not None and row["status"] == "running" and row["worker_pid"] == me:
                        self._record_end(db, self._job(row), code)
                return 0
            except StoreBusy:
                time.sleep(self.poll_interval)

    def _try_start(self, job_id: int, me: int) -> bool | None:
        """One look at the queue: True = the CLI child started, False = this worker is done
        (cancelled, deleted, handed over, or the start failed), None = wait and look again."""
        with self._locked(), self._db() as db:
            self._refresh_locked(db)
            row = db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None or row["status"] != "queued" or row["worker_pid"] != me:
                return False                        # cancelled, deleted or handed to another worker
            if self._terminated:
                db.execute("UPDATE jobs SET status='cancelled', finished_at=?, cancel_requested=1"
                           " WHERE id=?", (time.time(), job_id))
                return False
            queued = [r[0] for r in db.execute(
                "SELECT id FROM jobs WHERE status='queued' ORDER BY queued_at, id").fetchall()]
            kinds = ",".join("?" * len(HEAVY_KINDS))
            running = db.execute(
                f"SELECT COUNT(*) FROM jobs WHERE status='running' AND kind IN ({kinds})",
                tuple(HEAVY_KINDS)).fetchone()[0]
            free = self.max_heavy - running if row["kind"] in HEAVY_KINDS else len(queued)
            if queued.index(job_id) >= free:
                return None
            if not self._start_child(db, self._job(row)):
                self._start_failed = True
                return False
            return True

    def _start_child(self, db, job: Job) -> bool:
        now = time.time()
        log_path = job.out_dir / "job.log"
        try:
            self._check_inside(job.out_dir)
            with open(log_path, "ab") as log:
                log.write(f"=== job {job.id} started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                          f"{' '.join(job.argv)}\n".encode())
                log.flush()
                child = subprocess.Popen(job.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=PROJECT_ROOT,
                                         env=self._env(), start_new_session=True,
                                         preexec_fn=_child_preexec(os.getpid()))
        except (OSError, UserError) as exc:
            db.execute("UPDATE jobs SET status='failed', started_at=?, finished_at=?, error=? WHERE id=?",
                       (now, time.time(), f"Could not start the job: {exc}", job.id))
            return False
        self._child = child
        db.execute("UPDATE jobs SET status='running', started_at=?, pid=?, pid_started=? WHERE id=?",
                   (now, child.pid, proc.started_at(child.pid), job.id))
        return True

    def _record_end(self, db, job: Job, code: int) -> None:
        cancel = job.cancel_requested or self._terminated
        st = _read_status(job.out_dir, job.started_at) or {}
        said = st.get("status")
        detail = f": {st['error']}" if st.get("error") else ""
        error = None
        if code == 0:
            status = said if said in ("cancelled", "failed") else "completed"
            if status == "failed":
                error = self._error_text(job.out_dir, f"The job reported failure{detail}")
        elif code == EXIT_CANCELLED or said == "cancelled":
            status = "cancelled"
        elif code < 0:
            sig = -code
            if cancel and sig in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL):
                status = "cancelled"
            else:
                status = "died"
                try:
                    name = signal.Signals(sig).name
                except ValueError:
                    name = f"signal {sig}"
                hint = " (out of memory?)" if sig == signal.SIGKILL else ""
                error = self._error_text(job.out_dir, f"The process was killed by {name}{hint}.")
        else:
            status = "failed"
            what = "stopped on an input error" if code == EXIT_USER_ERROR else "failed"
            error = self._error_text(job.out_dir, f"The job {what} (exit code {code}){detail}.")
        with contextlib.suppress(OSError), open(job.out_dir / "job.log", "ab") as log:
            log.write(f"=== job {job.id} ended: {status} (exit code {code})\n".encode())
        db.execute("UPDATE jobs SET status=?, finished_at=?, exit_code=?, error=?, cancel_requested=? "
                   "WHERE id=?", (status, time.time(), code, error, int(cancel), job.id))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m core.jobs")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker", help="run one queued job (started by JobStore.submit)")
    w.add_argument("--workspace", required=True)
    w.add_argument("--job", type=int, required=True)
    w.add_argument("--max-heavy", type=int, default=1)
    w.add_argument("--poll", type=float, default=1.0)
    args = p.parse_args(argv)
    store = JobStore(args.workspace, max_heavy=args.max_heavy, poll_interval=args.poll)
    return store.run_worker(args.job)


if __name__ == "__main__":
    sys.exit(main())
