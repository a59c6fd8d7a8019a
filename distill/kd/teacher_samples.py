"""Text sampled from the teacher: general training blocks in the teacher's own distribution.

A depth cut damages what a language model knows about text in general, and a heal on a few
narrow corpora gives back mostly what those corpora hold: SmolLM2 cut 30 -> 20 and healed
200 steps on Shakespeare + Rotten Tomatoes came back to 0.86x the teacher's perplexity on
held-out text of that mixture but 2.37x on BBC News, a corpus the heal never saw. Blocks
sampled from the teacher itself are the teacher's general text, whatever it was trained on
(LLM-QAT's data-free distillation, Liu et al. 2023); healing on half mixture, half teacher
samples, at the same steps, gave 0.96x and 2.10x (one seed, a one-shot cut; see the README).

`data.teacher_samples: N` adds N such blocks to the training split: each one sampled from the
teacher's start token at temperature 1 (no top-k/top-p truncation: the teacher's distribution
as it is), `data.max_length` tokens long (the end-of-text token is held back until then, so
every block is full). They are generated once and kept in the toolkit's cache
(`$DISTILL_CACHE/teacher_samples`, beside the tokenized data), keyed by everything that
determines them, so later runs with the same teacher and settings read them; a damaged file is
sampled again, never used.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor, nn
from transformers import GenerationConfig, PreTrainedTokenizerBase

from distill.errors import DistillError
from distill.files import atomic_write
from distill.train.precision import autocast

FORMAT = 1
BATCH = 50  # sequences sampled at once (the KV caches of 50 x 128 tokens of SmolLM2: ~0.3 GB)


def start_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token every sample starts from: the tokenizer's BOS, else its EOS (GPT-2's
    `<|endoftext|>` opens a document as well as it ends one)."""
    for token in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token is not None:
            return int(token)
    raise DistillError("data.teacher_samples: the tokenizer has neither a BOS nor an EOS token "
                       "to start a sample from")


def fingerprint(weight_files: list[Path], vocabulary: dict[str, int], count: int,
                length: int, seed: int, bf16: bool) -> str:
    """Everything the samples depend on, hashed: the teacher's weight bytes, the tokenizer's
    vocabulary, how many blocks of how many tokens, the seed, and the precision they were
    sampled in (bf16 and fp32 draw different tokens from the same seed)."""
    digest = hashlib.sha256(json.dumps({"format": FORMAT, "count": count, "length": length,
                                        "seed": seed, "bf16": bf16}).encode())
    for path in sorted(weight_files):
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    digest.update(json.dumps(sorted(vocabulary.items())).encode())
    return digest.hexdigest()


@torch.inference_mode()
def sample(teacher: nn.Module, start: int, count: int, length: int, seed: int,
           bf16: bool = False, pad: int | None = None, eos: int | None = None) -> Tensor:
    """[count, length] int64 token ids sampled from `teacher` (see the module docstring).

    `eos` (the tokenizer's end-of-text token), and the model's own, are held back until
    `length` tokens are out: every block is whole text.

    Batch b draws with seed `seed + b` in a forked RNG, so the global random state is left as
    it was and the samples do not depend on what ran before."""
    device = next(teacher.parameters()).device
    own = getattr(getattr(teacher, "generation_config", None), "eos_token_id", None)
    stops = sorted({t for t in ([eos] + (own if isinstance(own, list) else [own]))
                    if t is not None})
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              max_new_tokens=length, min_new_tokens=length,
                              eos_token_id=stops or None,
                              pad_token_id=start if pad is None else pad)
    blocks = []
    for b, first in enumerate(range(0, count, BATCH)):
        n = min(BATCH, count - first)
        ids = torch.full((n, 1), start, dtype=torch.long, device=device)
        with torch.random.fork_rng(devices=[]), autocast(bf16, device.type):
            torch.manual_seed(seed + b)
            out = teacher.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                   generation_config=config)
        blocks.append(out[:, 1:1 + length].cpu())  # the start token is no target
    return torch.cat(blocks).to(torch.int64)


def _read(path: Path, key: str) -> Tensor | None:
    """The stored ids when the file is whole and was written for `key`, else None."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            if (fh.metadata() or {}).get("key") != key:
                return None
            return fh.get_tensor("input_ids")
    except (SafetensorError, OSError, ValueError, KeyError):
        return None


def load_or_sample(folder: Path, key: str, teacher: Callable[[], nn.Module], start: int,
                   count: int, length: int, seed: int, bf16: bool,
                   pad: int | None = None, eos: int | None = None) -> tuple[Tensor, dict]:
    """The samples stored under `key` in `folder`, else sampled (`teacher()` loads it only
    then) and stored atomically.

    Returns:
        ([count, length] token ids, info for metrics: blocks, tokens, seconds spent sampling
        (0 when read back), whether they came from the cache).
    """
    path = folder / f"samples-{key[:32]}.safetensors"
    if path.is_file():
        ids = _read(path, key)
        if ids is not None and tuple(ids.shape) == (count, length):
            return ids, {"blocks": count, "tokens": count * length, "seconds": 0.0,
                         "cached": True, "bf16": bf16}
    started = time.perf_counter()
    ids = sample(teacher(), start, count, length, seed, bf16, pad, eos)
    seconds = time.perf_counter() - started
    atomic_write(path, save({"input_ids": ids.contiguous()}, metadata={"key": key}))
    return ids, {"blocks": count, "tokens": count * length, "seconds": round(seconds, 1),
                 "cached": False, "bf16": bf16}
