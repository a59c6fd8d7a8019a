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
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from distill.errors import DistillError
from distill.files import atomic_write
from distill.train.precision import autocast, cast_once

FORMAT = 2  # 2: tokens drawn by inverse CDF (`InverseCdfDraw`); 1: by torch.multinomial
# Sequences sampled at once (more share each read of the weights); fewer when their KV caches
# at full length would pass KV_BUDGET bytes.
MAX_BATCH = 150
KV_BUDGET = 1 << 30


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


def batch_size(config: PretrainedConfig, length: int) -> int:
    """How many sequences of `length` new tokens to sample at once: `MAX_BATCH`, or fewer
    when their float32 KV caches would pass `KV_BUDGET` (SmolLM2 at 128 tokens: the cap; a
    7B Llama-2: 7)."""
    try:
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // \
            config.num_attention_heads
        per_sequence = 2 * config.num_hidden_layers * heads * head_dim * (length + 1) * 4
    except (AttributeError, TypeError):  # a config without the usual names: the cap
        return MAX_BATCH
    return max(1, min(MAX_BATCH, KV_BUDGET // per_sequence))


class InverseCdfDraw(LogitsProcessor):
    """Draws each next token from softmax(scores) by inverse CDF and leaves only it possible,
    so that greedy decoding (`do_sample=False`) emits the draw.

    `generate`'s own sampler, `torch.multinomial`, draws an exponential variate for every
    vocabulary entry of every row (the exponential-race trick): 2.5 M variates per decoding
    step of 50 rows of SmolLM2. One uniform per row against the running sum of the
    probabilities draws from the same distribution (bench/teacher_sampling.py times both).
    Processors `generate` adds itself run first (the end-of-text token held back).

    Args:
        uniforms: [B, N] the draws' uniform variates in [0, 1): row b, step t (the t-th new
            token) uses uniforms[b, t], so a sequence's tokens do not depend on its batch.
        prompt_length: the length of the prompt `generate` starts from.
    """

    def __init__(self, uniforms: Tensor, prompt_length: int = 1) -> None:
        self.uniforms = uniforms
        self.prompt_length = prompt_length

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        """scores [B, V] -> [B, V]: 0 at the drawn token, -inf elsewhere."""
        cdf = torch.softmax(scores.float(), dim=-1).cumsum_(dim=-1)  # [B, V]
        step = input_ids.shape[1] - self.prompt_length
        u = self.uniforms[:, step:step + 1].to(cdf.device)  # [B, 1]
        # Scaled by the total, so that float rounding of the sum cannot run past the last token.
        drawn = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # [B, 1]
        drawn = drawn.clamp_(max=cdf.shape[-1] - 1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, drawn, 0.0)


@torch.no_grad()  # not inference mode, which turns autocast's cache of casts off (`cast_once`)
def sample(teacher: nn.Module, start: int, count: int, length: int, seed: int,
           bf16: bool = False, pad: int | None = None, eos: int | None = None,
           keep_start: bool = False) -> Tensor:
    """[count, length] int64 token ids sampled from `teacher` (see the module docstring).

    With `keep_start` the start token is the block's first token (a tokenizer that puts BOS
    in front of every sequence: the blocks look like the corpus blocks) and `length - 1`
    tokens are drawn; else `length` tokens follow it and it is dropped.

    `eos` (the tokenizer's end-of-text token), and the model's own, are held back until
    `length` tokens are out: every block is whole text.

    The uniform variates of all draws come from one generator seeded `seed`, [count, length]
    at once: the global random state is left as it was, the samples do not depend on what ran
    before, and a block draws with the same variates whatever batch it is sampled in."""
    device = next(teacher.parameters()).device
    own = getattr(getattr(teacher, "generation_config", None), "eos_token_id", None)
    stops = sorted({t for t in ([eos] + (own if isinstance(own, list) else [own]))
                    if t is not None})
    # Greedy over `InverseCdfDraw`'s one-hot scores: a draw at temperature 1, untruncated.
    drawn = length - 1 if keep_start else length
    config = GenerationConfig(do_sample=False, max_new_tokens=drawn, min_new_tokens=drawn,
                              eos_token_id=stops or None,
                              pad_token_id=start if pad is None else pad)
    uniforms = torch.rand(count, length, generator=torch.Generator().manual_seed(seed),
                          dtype=torch.float64).float()  # float64 first: no 1.0 after rounding
    uniforms = uniforms[:, :drawn]  # the same variates for the same draws, start kept or not
    blocks = []
    batch = batch_size(teacher.config, length)
    for first in range(0, count, batch):
        n = min(batch, count - first)
        ids = torch.full((n, 1), start, dtype=torch.long, device=device)
        draw = InverseCdfDraw(uniforms[first:first + n])
        with cast_once(teacher), autocast(bf16, device.type):
            out = teacher.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                   generation_config=config,
                                   logits_processor=LogitsProcessorList([draw]))
        blocks.append(out[:, :length].cpu() if keep_start  # the start token opens the block
                      else out[:, 1:1 + length].cpu())  # the start token is no target
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
                   pad: int | None = None, eos: int | None = None,
                   keep_start: bool = False) -> tuple[Tensor, dict]:
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
    ids = sample(teacher(), start, count, length, seed, bf16, pad, eos, keep_start)
    seconds = time.perf_counter() - started
    atomic_write(path, save({"input_ids": ids.contiguous()}, metadata={"key": key}))
    return ids, {"blocks": count, "tokens": count * length, "seconds": round(seconds, 1),
                 "cached": False, "bf16": bf16}
