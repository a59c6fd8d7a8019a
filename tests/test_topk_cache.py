"""The language-model teacher cache (distill/kd/topk_cache.py): what it stores is the teacher's
top-k, a second run needs no teacher, a damaged or missing shard is recomputed (only it), and
another teacher, corpus, k or T means another cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distill.kd.token_losses import token_kd_loss, top_k
from distill.kd.topk_cache import MANIFEST, fingerprint, load_or_compute

K, T, VOCAB = 5, 2.0, 40


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def corpus() -> torch.Tensor:
    return torch.randint(0, VOCAB, (10, 12), generator=torch.Generator().manual_seed(0))


class Loader:
    """A teacher loader that counts its calls (and can refuse to be called)."""

    def __init__(self, model: torch.nn.Module, allowed: bool = True) -> None:
        self.model, self.allowed, self.calls = model, allowed, 0

    def __call__(self) -> torch.nn.Module:
        assert self.allowed, "the teacher was loaded although the cache was complete"
        self.calls += 1
        return self.model


def test_the_cache_holds_the_teachers_top_k_and_needs_no_teacher_later(corpus, tmp_path
                                                                       ) -> None:
    teacher = tiny_llama(0)
    cache = load_or_compute(tmp_path, "key", Loader(teacher), corpus, K, T, shard_rows=4)
    with torch.no_grad():
        live = top_k(teacher(input_ids=corpus).logits, K, T)
    rows = torch.tensor([9, 0, 4, 5])
    got = cache.rows(rows)
    assert torch.equal(got.indices, live.indices[rows])
    assert torch.equal(got.log_probs, live.log_probs[rows])
    assert torch.equal(got.tail, live.tail[rows])
    assert len(cache) == 10 and cache.bytes_per_token > 8 * K + 4  # + safetensors headers
    again = load_or_compute(tmp_path, "key", Loader(teacher, allowed=False), corpus, K, T,
                            shard_rows=4)
    assert torch.equal(again.rows(rows).log_probs, got.log_probs)
    # The loss from the cache is the loss from the live teacher.
    student = tiny_llama(1)(input_ids=corpus[rows]).logits
    assert torch.equal(token_kd_loss(student, got, temperature=T),
                       token_kd_loss(student, top_k(
                           teacher(input_ids=corpus[rows]).logits, K, T), temperature=T))


@pytest.mark.parametrize("damage", ["flip a byte", "cut short", "delete"])
def test_a_damaged_shard_is_recomputed_never_used(corpus, tmp_path, damage: str) -> None:
    teacher = tiny_llama(0)
    reference = load_or_compute(tmp_path / "ref", "key", Loader(teacher), corpus, K, T,
                                shard_rows=4).rows(torch.arange(10))
    load_or_compute(tmp_path / "c", "key", Loader(teacher), corpus, K, T, shard_rows=4)
    shard = tmp_path / "c" / "shard-00001.safetensors"
    others = {p.name: p.read_bytes() for p in (tmp_path / "c").glob("shard-*")
              if p != shard}
    data = shard.read_bytes()
    if damage == "flip a byte":
        shard.write_bytes(data[:-20] + bytes([data[-20] ^ 1]) + data[-19:])
    elif damage == "cut short":
        shard.write_bytes(data[: len(data) // 2])
    else:
        shard.unlink()
    loader = Loader(teacher)
    cache = load_or_compute(tmp_path / "c", "key", loader, corpus, K, T, shard_rows=4)
    assert loader.calls == 1 and shard.read_bytes() == data  # recomputed, the same bytes
    assert {p.name: p.read_bytes() for p in (tmp_path / "c").glob("shard-*")
            if p != shard} == others  # and only it
    got = cache.rows(torch.arange(10))
    assert torch.equal(got.log_probs, reference.log_probs)


def test_another_key_or_setting_is_another_cache(corpus, tmp_path) -> None:
    teacher = tiny_llama(0)
    load_or_compute(tmp_path, "key", Loader(teacher), corpus, K, T, shard_rows=4)
    for key, k, t in (("other", K, T), ("key", K + 1, T), ("key", K, 1.0)):
        loader = Loader(teacher)
        cache = load_or_compute(tmp_path, key, loader, corpus, k, t, shard_rows=4)
        assert loader.calls == 1, (key, k, t)
        assert cache.rows(torch.tensor([0])).indices.shape[-1] == k
        load_or_compute(tmp_path, "key", Loader(teacher), corpus, K, T, shard_rows=4)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["key"] == "key" and len(manifest["shards"]) == 3


def test_the_fingerprint_follows_weights_vocabulary_corpus_k_and_temperature(corpus, tmp_path
                                                                             ) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights-1")
    vocab = {"a": 0, "b": 1}
    base = fingerprint([weights], vocab, corpus, K, T)
    assert fingerprint([weights], dict(vocab), corpus.clone(), K, T) == base
    changed = [fingerprint([weights], {"a": 1, "b": 0}, corpus, K, T),
               fingerprint([weights], vocab, corpus[:, :-1], K, T),
               fingerprint([weights], vocab, corpus.flip(0), K, T),
               fingerprint([weights], vocab, corpus, K + 1, T),
               fingerprint([weights], vocab, corpus, K, 1.0),
               fingerprint([weights], vocab, corpus, K, T, bf16=True)]
    weights.write_bytes(b"weights-2")  # re-trained in place
    changed.append(fingerprint([weights], vocab, corpus, K, T))
    assert len({base, *changed}) == 1 + len(changed)


def test_padding_is_seen_as_the_teacher_sees_it(tmp_path) -> None:
    """With an attention mask the stored top-k is the teacher's under that mask."""
    teacher = tiny_llama(0)
    ids = torch.randint(0, VOCAB, (3, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    cache = load_or_compute(Path(tmp_path), "k", Loader(teacher), ids, K, T,
                            attention_mask=mask)
    with torch.no_grad():
        live = top_k(teacher(input_ids=ids, attention_mask=mask).logits, K, T)
    assert torch.equal(cache.rows(torch.arange(3)).log_probs, live.log_probs)


def test_under_bf16_the_teacher_runs_as_a_live_bf16_teacher_would(corpus, tmp_path) -> None:
    """`bf16=True`: the top-k of the teacher's logits under bf16 autocast (what the stage's
    live teacher gives), a cache of its own beside the float32 one."""
    teacher = tiny_llama(0)
    for p in teacher.parameters():
        p.requires_grad_(False)  # frozen, as a stage's teacher: `cast_once` must restore it
    cache = load_or_compute(tmp_path, "key", Loader(teacher), corpus, K, T, shard_rows=4,
                            bf16=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        live = top_k(teacher(input_ids=corpus).logits, K, T)
    rows = torch.arange(10)
    assert torch.equal(cache.rows(rows).indices, live.indices)
    assert torch.equal(cache.rows(rows).log_probs, live.log_probs)
    assert not any(p.requires_grad for p in teacher.parameters())
    loader = Loader(teacher)
    load_or_compute(tmp_path, "key", loader, corpus, K, T, shard_rows=4)  # float32: recomputed
    assert loader.calls == 1
