"""Files the toolkit reads and writes: JSON lines, atomic writes of files and folders, and the
root of its cache (converted GGUF models, tokenized data).

The writers write beside the target and rename into place (`os.replace` is atomic within one
file system): a crash or kill leaves the old version or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

CACHE_ENV = "DISTILL_CACHE"


def cache_root() -> Path:
    """Root of the toolkit's cache: `$DISTILL_CACHE`, else `~/.cache/distill`. Everything in it
    can be rebuilt, so it is safe to delete."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "distill"


def json_lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) for each non-blank line of a JSON-lines text.

    Lines end at "\n" alone, as JSON Lines defines them (a "\r" before it is whitespace to a
    JSON parser), never at what `str.splitlines()` also breaks on: U+0085, U+2028, U+2029, form
    feeds and a lone "\r" are ordinary characters inside a string (real reviews hold them).
    Decode the file's bytes yourself (`read_text` would fold a lone "\r" into "\n").
    """
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip(" \t\r"):
            yield number, line


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write `data` (text as UTF-8) to `path`, flushed to disk before the rename.

    The temp file is opened with `open(..., "xb")` rather than `mkstemp` so it gets the
    umask's permissions (mkstemp's 0600 would make e.g. report.json private to its writer).
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()  # into the OS before fsync, or the tail may still sit in our buffer
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(root: Path) -> None:
    """Give `root` and everything below it the permissions the umask allows.

    Writers such as safetensors' `save_file` create their files 0600 whatever the umask; what
    the toolkit saves is the user's, readable as any file they create would be.
    """
    mask = _umask()
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield an empty folder beside `target` to fill; when the block ends without an error it
    takes `target`'s place, otherwise it is deleted.

    An existing `target` is renamed aside first and deleted only once the new folder is in
    place, so a kill at any instant leaves the old folder or the new one under `target` (at
    worst beside a `.tmp-*` leftover, which `distill.run.ownership.clean_leftovers` removes). The
    caller decides whether `target` may be replaced (see `distill.run.ownership`).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    old = tmp.with_name(tmp.name + "-old")
    try:
        yield tmp
        follow_umask(tmp)  # mkdtemp's folder is 0700, safetensors' files 0600
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    finally:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
