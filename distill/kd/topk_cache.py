"""A language-model teacher's top-k, computed once and kept on disk (METHODS.md §1).

For every position of every block of a fixed token corpus the teacher's k most probable next
tokens at temperature T are stored: log-probabilities (float32), token ids (int32) and the log
of the remaining mass (float32), `8k + 4` bytes per token (516 B at k = 64, against 4·V = 196 KB
for SmolLM2's full float32 row). Distillation then reads the top-k (`distill.kd.token_losses.TopK`)
and needs no teacher at all: the teacher is loaded only when a shard has to be computed.
The teacher runs in the stage's precision, as a live teacher would: under bf16 autocast where the
stage trains so (its soft labels then carry bf16 logits, as the student's do).

    <cache>/manifest.json        key, k, temperature, block shape, per shard: rows, bytes, sha256
    <cache>/shard-00000.safetensors  log_probs [r, n, k], indices [r, n, k], tail [r, n]

Shards hold `shard_rows` consecutive blocks. Each is written atomically and recorded in the
manifest only once it is on disk; a shard that is missing, cut short or changed (its size or
SHA-256 differ from the manifest) is recomputed, never used, and only it. A cache whose key
differs (another teacher's weights, tokenizer, corpus, max length, k, T or precision:
`fingerprint`) is recomputed whole.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor, nn

from distill.files import atomic_write
from distill.kd.token_losses import TopK, top_k
from distill.train.precision import autocast, cast_once

FORMAT = 2  # 2: the precision is part of the key
MANIFEST = "manifest.json"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(weight_files: list[Path], vocabulary: dict[str, int], input_ids: Tensor,
                k: int, temperature: float, bf16: bool = False) -> str:
    """Everything the stored top-k depends on, hashed.

    Args:
        weight_files: the teacher's weight files (their bytes are hashed: a re-trained teacher
            at the same path gets a new key).
        vocabulary: the tokenizer's token -> id map.
        input_ids: [N, n] the corpus as the teacher sees it (data, preprocessing, max length).
        k, temperature: the cache's settings.
        bf16: whether the teacher runs under bf16 autocast (other logits than float32's).
    """
    digest = hashlib.sha256(json.dumps({"format": FORMAT, "k": k, "temperature": temperature,
                                        "bf16": bf16, "shape": list(input_ids.shape)}).encode())
    for path in sorted(weight_files):
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    digest.update(json.dumps(sorted(vocabulary.items())).encode())
    digest.update(input_ids.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


class TopKCache:
    """The stored top-k of a corpus of blocks; `rows(indices)` gives a `TopK` batch.

    Build it with `load_or_compute`.
    """

    def __init__(self, folder: Path, manifest: dict) -> None:
        self.folder, self.manifest = folder, manifest
        self.shard_rows: int = manifest["shard_rows"]
        self._open: dict[int, object] = {}

    def __len__(self) -> int:
        return self.manifest["blocks"]

    @property
    def bytes_per_token(self) -> float:
        """Disk bytes per stored position (all shards)."""
        total = sum(s["bytes"] for s in self.manifest["shards"])
        return total / (self.manifest["blocks"] * self.manifest["block_length"])

    def _shard(self, index: int):
        if index not in self._open:
            name = self.manifest["shards"][index]["file"]
            self._open[index] = safe_open(str(self.folder / name), framework="pt")
        return self._open[index]

    def rows(self, indices: Tensor) -> TopK:
        """The top-k of blocks `indices` [b] -> TopK with [b, n, k] / [b, n] tensors."""
        parts: dict[str, list[Tensor]] = {"log_probs": [], "indices": [], "tail": []}
        for i in indices.tolist():
            shard, row = divmod(int(i), self.shard_rows)
            handle = self._shard(shard)
            for name, out in parts.items():
                out.append(handle.get_slice(name)[row:row + 1])
        return TopK(torch.cat(parts["log_probs"]).float(),
                    torch.cat(parts["indices"]).to(torch.int64), torch.cat(parts["tail"]))


def _verified(folder: Path, entry: dict) -> bool:
    """The shard is on disk with the size and SHA-256 its manifest entry records."""
    path = folder / entry["file"]
    try:
        return path.stat().st_size == entry["bytes"] and _sha256(path.read_bytes()) == \
            entry["sha256"]
    except OSError:
        return False


@torch.no_grad()  # not inference mode, which turns autocast's cache of casts off (`cast_once`)
def _compute(teacher: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, k: int,
             temperature: float, batch_size: int, bf16: bool = False) -> dict[str, Tensor]:
    """The teacher's top-k of blocks [r, n] -> the shard's tensors."""
    teacher.eval()
    device = next(teacher.parameters()).device
    outs: list[TopK] = []
    with cast_once(teacher), autocast(bf16, device.type):
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start:start + batch_size].to(device)
            mask = None if attention_mask is None else \
                attention_mask[start:start + batch_size].to(device)
            logits = teacher(input_ids=ids, attention_mask=mask).logits
            outs.append(top_k(logits, k, temperature))
    return {"log_probs": torch.cat([o.log_probs for o in outs]).float().cpu().contiguous(),
            "indices": torch.cat([o.indices for o in outs]).to(torch.int32).cpu().contiguous(),
            "tail": torch.cat([o.tail for o in outs]).float().cpu().contiguous()}


def load_or_compute(folder: Path, key: str, teacher: Callable[[], nn.Module],
                    input_ids: Tensor, k: int, temperature: float,
                    attention_mask: Tensor | None = None, shard_rows: int = 256,
                    batch_size: int = 8, bf16: bool = False) -> TopKCache:
    """The top-k cache of `input_ids` [N, n] in `folder`: shards that are there, complete and
    belong to `key` are kept; the others are computed, written and recorded one by one (a kill
    loses at most the shard being written).

    Args:
        teacher: a zero-argument loader; called only if some shard must be computed.
        key: `fingerprint(...)` of this teacher, tokenizer, corpus, k, T and precision.
        bf16: run the teacher under bf16 autocast.
    """
    folder = Path(folder)
    blocks, length = input_ids.shape
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = {}
    fresh = {"format": FORMAT, "key": key, "k": k, "temperature": temperature, "bf16": bf16,
             "blocks": blocks, "block_length": length, "shard_rows": shard_rows}
    if {name: manifest.get(name) for name in fresh} != fresh:
        manifest = fresh | {"shards": []}
    shards = manifest["shards"]
    count = -(-blocks // shard_rows)
    shards[:] = (shards + [None] * count)[:count]
    model: nn.Module | None = None
    for index in range(count):
        entry = shards[index]
        if entry is not None and _verified(folder, entry):
            continue
        if model is None:
            model = teacher()
        start, end = index * shard_rows, min((index + 1) * shard_rows, blocks)
        mask = None if attention_mask is None else attention_mask[start:end]
        data = save(_compute(model, input_ids[start:end], mask, k, temperature, batch_size,
                             bf16))
        name = f"shard-{index:05d}.safetensors"
        atomic_write(folder / name, data)
        shards[index] = {"file": name, "rows": end - start, "bytes": len(data),
                         "sha256": _sha256(data)}
        atomic_write(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    if not (folder / MANIFEST).is_file():  # everything was already there but the manifest
        atomic_write(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return TopKCache(folder, manifest)
