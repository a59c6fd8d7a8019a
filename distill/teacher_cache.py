"""Teacher outputs computed once, stored on disk, read back (offline distillation).

For classifiers the full logits of every training example are kept: [N, C] float32, a few
hundred KB for 10k examples. Later epochs then need no teacher forward pass, which on CPU is
about a third of a distillation step.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader



def fingerprint(teacher_path: str, num_examples: int, max_length: int, first_ids: list[int]
                ) -> str:
    """Identifies the (teacher, data) pair a cache belongs to; a mismatch means recompute."""
    blob = json.dumps([str(teacher_path), num_examples, max_length, first_ids[:64]])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@torch.inference_mode()
def compute_logits(teacher: nn.Module, loader: DataLoader, num_examples: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Teacher logits for every example, indexed by the batch's `idx`.

    Returns:
        [num_examples, C] float32 on CPU.
    """
    teacher.eval()
    out: torch.Tensor | None = None
    for batch in loader:
        logits = teacher(input_ids=batch["input_ids"].to(device),
                         attention_mask=batch["attention_mask"].to(device)).logits.float().cpu()
        if out is None:
            out = torch.zeros(num_examples, logits.shape[-1])
        out[batch["idx"].cpu()] = logits
    assert out is not None, "empty loader"
    return out


def load_or_compute(cache_dir: Path, key: str, teacher: nn.Module, loader: DataLoader,
                    num_examples: int, device: torch.device | str = "cpu",
                    write: bool = True) -> torch.Tensor:
    """Read `cache_dir/logits.safetensors` if its key matches, else compute and store it."""
    path = cache_dir / "logits.safetensors"
    if path.is_file():
        try:
            tensors = load_file(str(path))
            meta_key = (cache_dir / "key.txt").read_text().strip()
            if meta_key == key and tensors["logits"].shape[0] == num_examples:
                return tensors["logits"]
        except (OSError, KeyError, RuntimeError):
            pass  # unreadable or stale: recompute
    logits = compute_logits(teacher, loader, num_examples, device)
    if write:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"logits": logits.contiguous()}, str(tmp))
        tmp.replace(path)
        (cache_dir / "key.txt").write_text(key)
    return logits
