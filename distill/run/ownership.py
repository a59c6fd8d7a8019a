"""Which folders are the toolkit's own, and who is writing one right now.

A folder that a command creates (a run directory, `distill shrink --out`, `distill attach
--output`) gets a marker file, `.distill.json`, before anything else is written into it. Only a
folder with that marker is ever emptied or replaced (`--force`), and only when no model or data
file the command reads lives inside it. A folder without the marker is the user's: a command
refuses to write into it unless it is empty, whatever the flags.

While a command writes into its folder it holds `.distill.lock` there, made with `O_EXCL` and
holding the writer's PID, host and start time. A second writer (a `--force` into a live run, two
`--resume` of one run) fails with a message naming the owner. A lock left by a killed process
(same host, that PID no longer running, or running but started later) is stale and taken over.

    check_claim(out, force=True, inputs=[teacher_dir])   # before any work: may it be written?
    with FolderLock(out):
        claim(out, "run", force=True, inputs=[teacher_dir])  # empties an old run of ours
        ...
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from distill.errors import DistillError
from distill.files import atomic_write

MARKER = ".distill.json"
LOCK = ".distill.lock"
# The exact names our writers give their temporaries (distill.files, peft_methods.ops): a
# folder from `mkdtemp(prefix=".tmp-<target>-")` (8 random characters; "-old" while a
# replaced target waits to go) and a file `.<target>.<pid>.<8 hex>.tmp` from `atomic_write`.
_TMP_DIR = re.compile(r"\.tmp-.+-[a-z0-9_]{8}(-old)?")
_TMP_FILE = re.compile(r"\..+\.\d+\.[0-9a-f]{8}\.tmp")


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a folder the toolkit made, or None (no marker, or not ours)."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("tool") == "distill" else None


def is_ours(folder: Path) -> bool:
    return read_marker(folder) is not None


def write_marker(folder: Path, kind: str, **extra: Any) -> None:
    """Mark `folder` as made by the toolkit (`kind`: run, shrink, ...); `extra` is kept."""
    from distill import __version__

    old = read_marker(folder) or {}
    data = {"tool": "distill", "kind": kind, "version": __version__,
            "created": old.get("created") or time.strftime("%Y-%m-%dT%H:%M:%S%z")} | extra
    atomic_write(Path(folder) / MARKER, json.dumps(data, indent=1) + "\n")


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies below it (after resolving links)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_claim(folder: Path, *, force: bool, inputs: Iterable[Path] = (),
                flag: str = "--output") -> None:
    """Raise a DistillError unless the command may write `folder` (nothing is changed).

    Allowed: a folder that does not exist, an empty one, or, with `force`, one the toolkit made
    that holds none of `inputs` (models and data files the command reads).

    Args:
        folder: where the command will write.
        force: the user asked to replace an earlier result.
        inputs: local paths the command reads; replacing a folder that holds one is refused.
        flag: the option the user gave the folder with, for the messages.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DistillError(f"{flag} {folder} is a file, not a folder")
    for source in inputs:
        if Path(source).exists() and folder.exists() and _inside(Path(source), folder):
            raise DistillError(f"{flag} {folder} holds {source}, which this command reads; "
                               "write the result somewhere else")
    if not folder.exists() or not any(c.name != LOCK for c in folder.iterdir()):
        return  # empty, or holding only the lock this command took
    marker = read_marker(folder)
    if marker is None:
        raise DistillError(f"{flag} {folder} is not empty and was not made by distill (no "
                           f"{MARKER}); refusing to write into it or delete it: choose another "
                           f"{flag}")
    if not force:
        resume = " or --resume to continue it," if marker.get("kind") == "run" else ""
        raise DistillError(f"{flag} {folder} already exists; pass --force to replace it,{resume}"
                           f" or choose another {flag}")


def claim(folder: Path, kind: str, *, force: bool, inputs: Iterable[Path] = (),
          flag: str = "--output", **extra: Any) -> None:
    """Make `folder` an empty folder of the toolkit's, marked as `kind` (see `check_claim`).

    An earlier result of ours is emptied child by child with its marker removed last, so a
    kill half-way leaves a folder that is still recognisably ours (and `--force` works again).
    """
    folder = Path(folder)
    check_claim(folder, force=force, inputs=inputs, flag=flag)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for child in folder.iterdir():
            if child.name in (MARKER, LOCK):
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        write_marker(folder, kind, **extra)
    except OSError as exc:
        raise DistillError(f"cannot write {flag} {folder}: {exc.strerror or exc}") from None


def clean_leftovers(folder: Path) -> list[Path]:
    """Remove what interrupted atomic writes left under a folder of ours; return what went.

    Only the exact names our writers give their temporaries are touched (`_TMP_DIR`,
    `_TMP_FILE`), never through a link, and only below a marked folder.
    """
    if not is_ours(folder):
        return []
    gone = []
    for path in sorted(Path(folder).rglob(".*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_symlink():
            continue
        if _TMP_DIR.fullmatch(path.name) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            gone.append(path)
        elif _TMP_FILE.fullmatch(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            gone.append(path)
    return gone


def local_paths(*names: str | None) -> list[Path]:
    """The names (models, data) that are existing local paths, not built-ins or hub ids: what a
    command reads from disk, and so may never replace or delete."""
    return [Path(n).expanduser() for n in names
            if n and not n.startswith("builtin:") and Path(n).expanduser().exists()]


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (Linux), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _process_start(pid: int) -> float | None:
    """When process `pid` started (seconds since boot, Linux), or None when unknown."""
    fields = _stat(pid)
    try:
        return int(fields[19]) / os.sysconf("SC_CLK_TCK") if fields else None
    except (ValueError, IndexError):
        return None


def _alive(owner: dict[str, Any]) -> bool:
    """Whether the process that wrote a lock still runs (unknown hosts count as alive)."""
    if owner.get("host") != socket.gethostname():
        return True
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    fields = _stat(pid)
    if fields and fields[0] in ("Z", "X"):
        return False  # killed, not yet reaped (a container's init may never reap it)
    started, recorded = _process_start(pid), owner.get("process_start")
    # The PID was reused by a process that started after the lock was written.
    return not (started is not None and isinstance(recorded, (int, float))
                and abs(started - recorded) > 1.0)


def sibling_lock(folder: Path) -> FolderLock:
    """The lock of a folder that is swapped in whole: `<parent>/.<name>.distill.lock`."""
    folder = Path(folder)
    return FolderLock(folder.parent, f".{folder.name}{LOCK}")


class FolderLock:
    """`with FolderLock(folder):` — one writer at a time (see the module docstring)."""

    def __init__(self, folder: Path, name: str = LOCK, what: str = "the folder") -> None:
        """Lock `folder / name`; a folder that is replaced as a whole (a saved model) is locked
        by a sibling name in its parent (`sibling_lock`), since a lock inside would go with it.
        `what` names the folder in messages ("the run directory")."""
        self.path = Path(folder) / name
        self.what = what
        # The folder the lock protects, for messages.
        self.guarded = (self.path.parent if name == LOCK
                        else self.path.parent / name.removesuffix(LOCK).removeprefix("."))
        self.held = False

    def _owner(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "process_start": _process_start(os.getpid()),
              "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for _ in range(2):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                owner = self._owner()
                if not owner:
                    # Written this instant by another writer, or an empty file left by a kill
                    # between create and write: a second look tells them apart.
                    time.sleep(0.2)
                    owner = self._owner()
                if owner and _alive(owner):
                    raise DistillError(
                        f"{self.guarded} is in use by another distill process (PID "
                        f"{owner.get('pid')} on {owner.get('host')}, since "
                        f"{owner.get('since')}); wait for it to end, or stop it; if it is gone, "
                        f"delete {self.path}") from None
                self.path.unlink(missing_ok=True)  # stale: its writer is gone
                continue
            except OSError as exc:
                raise DistillError(f"cannot write to {self.what} {self.guarded}: "
                                   f"{exc.strerror or exc}") from None
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(me) + "\n")
            self.held = True
            return
        raise DistillError(f"{self.path.parent}: could not take the lock {self.path}; another "
                           "process keeps taking it")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
