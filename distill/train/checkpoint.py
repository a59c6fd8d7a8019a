"""Training checkpoints that a killed run can trust.

A checkpoint is a folder `<loop dir>/checkpoint/step-<N>/` holding
- `weights.safetensors`  the training unit's weights (student, loss projections, adapters);
- `best.safetensors`     the best-on-validation weights kept so far (when there are any);
- `state.pt`             optimizer, scheduler, RNG states and the data position
                         (tensors, numbers and lists only: loaded with `weights_only=True`);
- `loop.json`            counters, history, best metric;
- `manifest.json`        every file's size and SHA-256, written last.

It is written into a temporary sibling folder and renamed into place, then `latest` (a one-line
file, itself replaced atomically) points at it; the previous checkpoint is kept until the new one
is complete. On load a checkpoint whose files do not match its manifest (a truncated file, a
half-copied folder) is skipped for the one before it, never used.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from distill.files import atomic_directory, atomic_write

LATEST = "latest"
MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied embeddings): store copies.
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def save_checkpoint(directory: Path, step: int, weights: dict[str, torch.Tensor],
                    state: dict[str, Any], loop: dict[str, Any],
                    best: dict[str, torch.Tensor] | None = None, keep: int = 2) -> Path:
    """Write checkpoint `step-<step>` under `directory` atomically; keep the last `keep`."""
    final = directory / f"step-{step}"
    with atomic_directory(final) as tmp:
        save_file(_contiguous(weights), str(tmp / "weights.safetensors"))
        if best is not None:
            save_file(_contiguous(best), str(tmp / "best.safetensors"))
        torch.save(state, tmp / "state.pt")
        (tmp / "loop.json").write_text(json.dumps(loop, indent=1), encoding="utf-8")
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
                    for name in files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    atomic_write(directory / LATEST, final.name + "\n")
    for old in _candidates(directory)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _candidates(directory: Path) -> list[Path]:
    """Complete-looking checkpoint folders, newest first (`latest` first when it names one)."""
    found = sorted((p for p in directory.glob("step-*") if p.is_dir()),
                   key=lambda p: int(p.name.split("-", 1)[1]) if p.name[5:].isdigit() else -1,
                   reverse=True)
    pointer = directory / LATEST
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        found.sort(key=lambda p: p.name != name)
    return found


def verify(folder: Path) -> bool:
    """True when every file listed in the manifest exists with its recorded size and hash."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    for name, meta in manifest.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != meta["bytes"] \
                or _sha256(path) != meta["sha256"]:
            return False
    return True


def load_latest(directory: Path, damaged: list[Path] | None = None) -> dict[str, Any] | None:
    """The newest verified checkpoint under `directory` as
    `{"path", "weights", "best", "state", "loop"}`, or None when there is none.

    Newer checkpoints that fail verification are skipped and appended to `damaged`.
    """
    if not directory.is_dir():
        return None
    for folder in _candidates(directory):
        if not verify(folder):
            if damaged is not None:
                damaged.append(folder)
            continue
        best = folder / "best.safetensors"
        return {
            "path": folder,
            "weights": load_file(str(folder / "weights.safetensors")),
            "best": load_file(str(best)) if best.is_file() else None,
            # Our own file, but still: no arbitrary objects are unpickled.
            "state": torch.load(folder / "state.pt", map_location="cpu", weights_only=True),
            "loop": json.loads((folder / "loop.json").read_text(encoding="utf-8")),
        }
    return None


def remove_all(folder: Path) -> None:
    """Drop every `checkpoint/` folder under `folder` (a stage's, or a shrink step's).

    Call it only once the loops' results are durable (model saved, state recorded): until then
    the checkpoints are what a resume continues from.
    """
    for directory in sorted(Path(folder).rglob("checkpoint"), key=lambda p: -len(p.parts)):
        # Only what `save_checkpoint` writes (a `latest` pointer, `step-N` folders), or empty.
        if directory.is_dir() and not directory.is_symlink() and (
                (directory / LATEST).is_file() or any(directory.glob("step-*"))
                or not any(directory.iterdir())):
            shutil.rmtree(directory, ignore_errors=True)
