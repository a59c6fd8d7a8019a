"""Teacher outputs computed once, stored on disk, read back (offline distillation).

For classifiers the full logits of every training example are kept: [N, C] float32, a few
hundred KB for 10k examples. Later epochs then need no teacher forward pass, which on CPU is
about a third of a distillation step.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors.torch import load_file, save
from torch import nn
from torch.utils.data import DataLoader

from distill.files import atomic_write


def fingerprint(teacher_path: str, num_examples: int, max_length: int, first_ids: list[int]
                ) -> str:
    """Identifies the (teacher, data) pair a cache belongs to; a mismatch means recompute."""
    blob = json.dumps([str(teacher_path), num_examples, max_length, first_ids[:64]])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@torch.inference_mode()
def compute_logits(teacher: nn.Module, loader: Iterable[dict], num_examples: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Teacher logits for every example, indexed by the batch's `idx`.

    Returns:
        [num_examples, C] float32 on CPU.
    """
    out = _fill(teacher, loader, num_examples, device)
    assert out is not None, "empty loader"
    return out


@torch.inference_mode()
def _fill(teacher: nn.Module, batches: Iterable[dict], num_examples: int,
          device: torch.device | str) -> torch.Tensor | None:
    """[num_examples, C] with the rows of `batches` filled (zeros elsewhere); None if none."""
    teacher.eval()
    out: torch.Tensor | None = None
    for batch in batches:
        logits = teacher(input_ids=batch["input_ids"].to(device),
                         attention_mask=batch["attention_mask"].to(device)).logits.float().cpu()
        if out is None:
            out = torch.zeros(num_examples, logits.shape[-1])
        out[batch["idx"].cpu()] = logits
    return out


def _read(cache_dir: Path, key: str, num_examples: int) -> torch.Tensor | None:
    """The stored logits if the cache is complete and belongs to `key`, else None."""
    path = cache_dir / "logits.safetensors"
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
        meta_key = (cache_dir / "key.txt").read_text().strip()
        if meta_key == key and tensors["logits"].shape[0] == num_examples:
            return tensors["logits"]
    except (OSError, KeyError, RuntimeError):
        pass  # unreadable or stale: recompute
    return None


def _compute_sharded(teacher: nn.Module, loader: DataLoader, num_examples: int,
                     device: torch.device | str, accelerator: Accelerator) -> torch.Tensor:
    """Rank r computes batches r, r+N, ...; the rows are summed over ranks (each row is
    non-zero on exactly one rank, so the sum is exact and equals the 1-process logits)."""
    n, rank = accelerator.num_processes, accelerator.process_index
    part = _fill(teacher, (b for i, b in enumerate(loader) if i % n == rank), num_examples,
                 device)
    width = torch.tensor([0 if part is None else part.shape[1]], device=accelerator.device)
    classes = int(accelerator.reduce(width, reduction="max"))
    if part is None:
        part = torch.zeros(num_examples, classes)
    return accelerator.reduce(part.to(accelerator.device), reduction="sum").cpu()


def load_or_compute(cache_dir: Path, key: str, teacher: Callable[[], nn.Module],
                    loader: DataLoader,
                    num_examples: int, device: torch.device | str = "cpu",
                    write: bool = True, accelerator: Accelerator | None = None
                    ) -> torch.Tensor:
    """Read `cache_dir/logits.safetensors` if its key matches, else compute and store it
    (`teacher()` loads the teacher only then).

    With an `accelerator` of N > 1 processes every rank must call this: rank 0 decides
    whether the cache is usable (and hands its copy to the others), the computation is split
    over the ranks, and only rank 0 writes (whatever `write` says on the other ranks).
    """
    path = cache_dir / "logits.safetensors"
    multi = accelerator is not None and accelerator.num_processes > 1
    if not multi:
        cached = _read(cache_dir, key, num_examples)
        if cached is not None:
            return cached
        logits = compute_logits(teacher(), loader, num_examples, device)
    else:
        assert accelerator is not None
        write = write and accelerator.is_main_process
        cached = _read(cache_dir, key, num_examples) if accelerator.is_main_process else None
        cached = broadcast_object_list([cached], from_process=0)[0]
        if cached is not None:
            return cached
        logits = _compute_sharded(teacher(), loader, num_examples, device, accelerator)
    if write:
        atomic_write(path, save({"logits": logits.contiguous()}))
        atomic_write(cache_dir / "key.txt", key)
    return logits
