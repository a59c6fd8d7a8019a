"""`data.teacher_samples`: training blocks sampled from the teacher (distill/kd/teacher_samples.py).

The samples must follow the teacher's own next-token distribution (temperature 1, nothing
truncated), be generated once per run and read back after, never be used when damaged, and
join the training split of every stage that trains on it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.config.loading import recipe_from_dict
from distill.errors import DistillError
from distill.kd import teacher_samples
from distill.run.pipeline import run_recipe
from test_lm_recipes import lm_recipe, word_tokenizer, write_corpus, write_tiny_lm


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs")


@pytest.fixture(scope="module")
def peaked(tmp_path_factory: pytest.TempPathFactory) -> AutoModelForCausalLM:
    """A tiny random Llama whose next-token distributions are far from uniform (its head
    scaled up), so that a wrong temperature or a truncation shows in the samples."""
    path = write_tiny_lm(tmp_path_factory.mktemp("peaked") / "lm", "llama")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(12.0)
    return model


def first_token_distribution(model: AutoModelForCausalLM, start: int, temperature: float
                             ) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([[start]])).logits[0, -1].double()
    return torch.softmax(logits / temperature, dim=-1)


def test_samples_follow_the_teachers_distribution(peaked: AutoModelForCausalLM) -> None:
    """The first sampled token's frequencies over 3,000 samples match softmax(logits) at
    temperature 1 (total variation ~0.03 from sampling noise) and not at T = 0.7 or 1.5."""
    start = word_tokenizer().eos_token_id
    ids = teacher_samples.sample(peaked, start, count=3000, length=1, seed=0)
    assert ids.shape == (3000, 1) and ids.dtype == torch.int64
    counts = torch.bincount(ids[:, 0], minlength=peaked.config.vocab_size).double()
    observed = counts / counts.sum()

    def tv(p: torch.Tensor) -> float:
        return 0.5 * float((observed - p).abs().sum())

    exact = tv(first_token_distribution(peaked, start, 1.0))
    assert exact < 0.06
    for other in (0.7, 1.5):
        assert tv(first_token_distribution(peaked, start, other)) > exact + 0.05


def test_samples_are_seeded_full_length_and_leave_the_global_rng_alone(
        peaked: AutoModelForCausalLM) -> None:
    start = word_tokenizer().eos_token_id
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = teacher_samples.sample(peaked, start, count=60, length=12, seed=5, eos=start)
    after = torch.rand(1)
    assert torch.equal(before, after)  # the sampler drew from a forked RNG
    b = teacher_samples.sample(peaked, start, count=60, length=12, seed=5, eos=start)
    c = teacher_samples.sample(peaked, start, count=60, length=12, seed=6, eos=start)
    assert a.shape == (60, 12) and torch.equal(a, b) and not torch.equal(a, c)
    # The end-of-text token is held back until the block is full.
    assert not (a == start).any()
    # Opening each block with the start token (a tokenizer that puts BOS in front of every
    # sequence): the start token, then the same first 11 draws.
    kept = teacher_samples.sample(peaked, start, count=60, length=12, seed=5, eos=start,
                                  keep_start=True)
    assert kept.shape == (60, 12) and bool((kept[:, 0] == start).all())
    assert torch.equal(kept[:, 1:], a[:, :11])


def test_samples_are_cached_and_a_damaged_file_is_resampled(peaked: AutoModelForCausalLM,
                                                           tmp_path: Path) -> None:
    start = word_tokenizer().eos_token_id
    loads: list[int] = []

    def teacher() -> AutoModelForCausalLM:
        loads.append(1)
        return peaked

    def get(key: str = "k1") -> tuple[torch.Tensor, dict]:
        return teacher_samples.load_or_sample(tmp_path, key, teacher, start, 20, 8, 0, False)

    ids, info = get()
    assert info["cached"] is False and info["blocks"] == 20 and len(loads) == 1
    again, info = get()
    assert info["cached"] is True and torch.equal(ids, again) and len(loads) == 1
    _, info = get("k2")  # other settings: other samples, never the stored ones
    assert info["cached"] is False and len(loads) == 2
    path = next(tmp_path.glob(f"samples-{'k1'[:32]}*.safetensors"))
    path.write_bytes(path.read_bytes()[:-40])  # a truncated file
    fixed, info = get()
    assert info["cached"] is False and torch.equal(fixed, ids) and len(loads) == 3
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically


def test_a_heal_trains_on_corpus_and_samples(corpus: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A shrink on a tiny Llama with 24 sampled blocks: every heal step trains on the corpus
    blocks plus the samples (more steps than without), the report says what was sampled, and
    a second run reads the samples from the toolkit's cache."""
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    model = write_tiny_lm(tmp_path / "teacher", "llama")
    recipe = lm_recipe(model, corpus)
    recipe["stages"] = [recipe["stages"][2], recipe["stages"][3]]  # shrink, evaluate
    plain = run_recipe(recipe_from_dict(recipe), output=tmp_path / "plain")
    recipe["data"]["teacher_samples"] = 24
    report = run_recipe(recipe_from_dict(recipe), output=tmp_path / "run")
    assert report["data"]["teacher_samples"]["blocks"] == 24
    assert report["data"]["teacher_samples"]["tokens"] == 24 * 32
    steps = json.loads((tmp_path / "run/stages/00-shrink/metrics.json").read_text())["steps"]
    base = json.loads((tmp_path / "plain/stages/00-shrink/metrics.json").read_text())["steps"]
    for with_samples, without in zip(steps, base):
        assert with_samples["steps"] == without["steps"] + math.ceil(24 / 8)
        assert with_samples["teacher_samples"]["blocks"] == 24
    assert steps[0]["teacher_samples"]["cached"] is False
    assert len(list((tmp_path / "cache/teacher_samples").glob("samples-*.safetensors"))) == 1
    # Evaluation is untouched: the held-out splits hold corpus text only.
    assert report["teacher"]["metric"] == plain["teacher"]["metric"]
    again = run_recipe(recipe_from_dict(recipe), output=tmp_path / "again")
    assert again["data"]["teacher_samples"]["cached"] is True
    assert again["final"]["metric"] == report["final"]["metric"]  # the same blocks


def test_teacher_samples_are_refused_where_they_cannot_apply(
        tiny_teacher: Path, tiny_csv: Path, tmp_path: Path) -> None:
    from conftest import tiny_recipe

    recipe = tiny_recipe(tiny_teacher, tiny_csv)
    recipe["data"]["teacher_samples"] = 8
    with pytest.raises(DistillError, match="teacher_samples: adds text sampled from the "
                                           "teacher, for causal-lm"):
        run_recipe(recipe_from_dict(recipe), output=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_teacher_samples_on_conversations_are_refused(corpus: Path, tmp_path: Path) -> None:
    model = write_tiny_lm(tmp_path / "teacher", "llama")
    recipe = lm_recipe(model, corpus)
    recipe["stages"] = [{"kind": "adapt", "method": "lora", "config": {"r": 2},
                         "data": {"dataset": "builtin:chatterbot", "max_length": 32,
                                  "teacher_samples": 4}}]
    with pytest.raises(DistillError, match=r"stages\.0\.data\.teacher_samples: .*"
                                           "conversations"):
        run_recipe(recipe_from_dict(recipe), output=tmp_path / "run")


def test_the_inverse_cdf_draw_follows_softmax_and_never_draws_an_excluded_token() -> None:
    """40,000 draws from 6 scores (one -inf, as the held-back end-of-text token): frequencies
    within 0.01 of softmax; the output is 0 at the drawn token and -inf elsewhere."""
    scores = torch.tensor([[2.0, 0.5, float("-inf"), -1.0, 1.0, 0.0]]).repeat(40_000, 1)
    uniforms = torch.rand(40_000, 3, generator=torch.Generator().manual_seed(0))
    draw = teacher_samples.InverseCdfDraw(uniforms)
    out = draw(torch.zeros(40_000, 2, dtype=torch.long), scores)  # step 1: column 1
    assert torch.equal(out, teacher_samples.InverseCdfDraw(uniforms[:, 1:])(
        torch.zeros(40_000, 1, dtype=torch.long), scores))
    assert ((out == 0).sum(dim=1) == 1).all() and (out[out != 0] == float("-inf")).all()
    drawn = out.argmax(dim=1)
    observed = torch.bincount(drawn, minlength=6).double() / 40_000
    expected = torch.softmax(scores[0].double(), dim=0)
    assert observed[2] == 0 and (observed - expected).abs().max() < 0.01


def test_a_blocks_tokens_do_not_depend_on_the_batch_it_was_sampled_in(
        peaked: AutoModelForCausalLM, monkeypatch: pytest.MonkeyPatch) -> None:
    start = word_tokenizer().eos_token_id
    whole = teacher_samples.sample(peaked, start, count=12, length=10, seed=3, eos=start)
    monkeypatch.setattr(teacher_samples, "MAX_BATCH", 5)
    assert teacher_samples.batch_size(peaked.config, 10) == 5
    assert torch.equal(teacher_samples.sample(peaked, start, count=12, length=10, seed=3,
                                              eos=start), whole)


def test_the_sampling_batch_keeps_the_kv_caches_within_budget() -> None:
    from transformers import GPT2Config, LlamaConfig

    smol = LlamaConfig(num_hidden_layers=30, hidden_size=576, num_attention_heads=9,
                       num_key_value_heads=3)
    big = LlamaConfig(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32)
    assert teacher_samples.batch_size(smol, 128) == teacher_samples.MAX_BATCH
    assert teacher_samples.batch_size(big, 128) == 7  # 135 MB of float32 K and V each
    assert teacher_samples.batch_size(GPT2Config(), 128) == 112  # n_layer, n_head read too
    assert teacher_samples.batch_size(big, 1 << 20) == 1
