"""Files that survive a kill -9 or a power cut at any moment, and readers that say what is wrong.

Writers replace a file in one rename after its bytes reached the disk (fsync of the file,
then of its folder), so a reader sees the old version or the new one, never half of one;
a failed write removes its temporary file. Readers of files the project wrote itself
(configs, status) turn every way such a file can be broken (missing, not a regular file,
not UTF-8, not JSON, absurdly nested) into one `DamagedFile` with a message for people.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


class DamagedFile(ValueError):
    """A file that exists but cannot be read as what it should be."""


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in `folder` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file in `folder` (recursively) and the folders themselves to disk, before
    the folder is renamed into place."""
    for path in sorted(Path(folder).rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(folder)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str))


def append_line(path: Path, line: str) -> None:
    """Append one line; a torn last line (a writer killed mid-line) is ended first, so it
    costs only itself and never the line written now."""
    with open(path, "a+b") as fh:
        if fh.seek(0, os.SEEK_END) > 0:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")
        fh.write(line.encode("utf-8") + b"\n")


def read_json(path: Path, what: str = "file"):
    """The parsed JSON of `path`; FileNotFoundError when it is missing, DamagedFile for
    anything else that keeps it from being read (named `what` in the message)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not path.is_file():
        raise DamagedFile(f"{what} {path} is not a regular file")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DamagedFile(f"{what} {path} is not UTF-8 text") from exc
    except json.JSONDecodeError as exc:
        raise DamagedFile(f"{what} {path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from exc
    except RecursionError as exc:
        raise DamagedFile(f"{what} {path} is nested too deeply to be read") from exc
    except OSError as exc:
        raise DamagedFile(f"{what} {path} cannot be read: {exc.strerror or exc}") from exc


def read_json_object(path: Path) -> dict | None:
    """A JSON object from `path`, or None when it is missing or damaged in any way
    (for readers that show whatever is there, like status and progress views)."""
    try:
        data = read_json(path)
    except (FileNotFoundError, DamagedFile):
        return None
    return data if isinstance(data, dict) else None
