"""The coverage contract, one row per architecture family (`tests/families.py`).

Every family is proven the same way, on a tiny random model built from its config:
- discovery finds its stacks, projections and widths (nothing is looked up by family name);
- a depth cut and a width cut that keep everything reproduce its outputs exactly;
- real cuts save, reload with plain `AutoModel*` (no missing or unexpected weights) into the
  same outputs, and generate with a KV cache where the model generates;
- LoRA on `all-linear` and prompt tuning apply;
- depth importance ranks a planted identity block last (single-stack models).
A family's exception is its own row's field (`depth`, `width`, `moe`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

import peft_methods as pm
from distill.arch import (arch_info, dims, find, position_limit, present_stacks, require_width,
                          stack_depths)
from distill.compress.depth import keep_layers
from distill.compress.importance import depth_importance
from distill.compress.width import (WidthImportance, shrink_width, width_importance,
                                    width_targets)
from distill.errors import DistillError
from families import DEPTH, FAMILIES, HIDDEN, build, generate, inputs, logits

NAMES = list(FAMILIES)
GENERATES = [n for n in NAMES if FAMILIES[n].kind != "encoder"]
SINGLE_STACK = [n for n in NAMES if FAMILIES[n].kind != "seq2seq"]


@pytest.fixture(scope="module")
def teachers() -> dict:
    return {name: build(name) for name in NAMES}


def _depth_cut(name: str, model: nn.Module, layers: list[int]) -> nn.Module:
    return keep_layers(model, layers)


@pytest.mark.parametrize("name", NAMES)
def test_discovery_finds_stacks_projections_and_widths(teachers, name: str) -> None:
    model, family = teachers[name], FAMILIES[name]
    info = arch_info(model)
    assert info.family == model.config.model_type
    assert find(model, info.token_embedding) is model.get_input_embeddings()
    expected_stacks = 2 if family.kind == "seq2seq" else 1
    assert len(info.stacks) == expected_stacks and all(
        len(blocks) == DEPTH for _, blocks in present_stacks(model))
    for stack, blocks in present_stacks(model):
        block = blocks[-1]
        attention = stack.attention
        assert attention is not None and not stack.problems, stack.problems
        for path in (attention.module, attention.q, attention.k, attention.v, attention.o,
                     attention.fused, *attention.q_like, *attention.k_like):
            if path:
                assert find(block, path) is not None, path
        assert stack.norms and all(find(block, n) is not None for n in stack.norms)
        if family.moe:
            assert stack.mlp is not None and stack.mlp.experts
        else:
            assert stack.mlp is not None and find(block, stack.mlp.down) is not None
    d = dims(model)
    assert (d.hidden_size, d.num_heads, d.head_dim) == (HIDDEN, 4, 8)
    assert d.num_kv_heads == (2 if family.gqa else 4)
    if not family.moe:
        assert d.intermediate_size == (4 * HIDDEN if name == "bloom" else 64)


@pytest.mark.parametrize("name", NAMES)
def test_depth_cut_keeping_everything_is_exact(teachers, name: str) -> None:
    teacher = teachers[name]
    student = keep_layers(teacher, list(range(DEPTH))).eval()
    torch.testing.assert_close(logits(student, name), logits(teacher, name), rtol=0, atol=0)
    if name in GENERATES:
        expected, got = generate(teacher), generate(student)
        assert torch.equal(got.sequences, expected.sequences)
        torch.testing.assert_close(got.scores, expected.scores, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_width_cut_keeping_everything_is_exact(teachers, name: str) -> None:
    teacher, family = teachers[name], FAMILIES[name]
    d = dims(teacher)
    everything = {"hidden": d.hidden_size, "heads": d.num_heads,
                  "intermediate": d.intermediate_size}
    if family.width is None:
        with pytest.raises(DistillError, match="mixture-of-experts"):
            shrink_width(teacher, **everything)
        with pytest.raises(DistillError, match="mixture-of-experts"):  # pre-flight's question
            width_targets(teacher, arch_info(teacher), d, d.hidden_size // 2, None, None)
        return
    student = shrink_width(teacher, **everything).eval()
    torch.testing.assert_close(logits(student, name), logits(teacher, name), rtol=0, atol=0)
    # Ranked by random scores, everything kept in another order: the same function.
    g = torch.Generator().manual_seed(3)
    scores = width_importance(teacher, [inputs(name)])
    shuffled = WidthImportance(
        {k: [type(layer)(torch.rand(layer.heads.shape, generator=g),
                         torch.rand(layer.neurons.shape, generator=g),
                         None if layer.cross_heads is None else
                         torch.rand(layer.cross_heads.shape, generator=g)) for layer in layers]
         for k, layers in scores.stacks.items()},
        torch.rand(scores.channels.shape, generator=g), scores.tokens)
    permuted = shrink_width(teacher, **everything, importance=shuffled).eval()
    torch.testing.assert_close(logits(permuted, name), logits(teacher, name),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_real_cuts_reload_with_plain_transformers_and_generate(teachers, name: str,
                                                               tmp_path: Path) -> None:
    family = FAMILIES[name]
    student = keep_layers(teachers[name], family.depth)
    if family.width is not None:
        student = shrink_width(student, **family.width, importance=width_importance(
            student, [inputs(name)]))
    student.eval()
    student.save_pretrained(tmp_path)
    auto = getattr(transformers, family.auto)
    again, info = auto.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    again.eval()
    assert stack_depths(again) == stack_depths(student)
    assert set(stack_depths(again).values()) == {len(family.depth)}
    torch.testing.assert_close(logits(again, name), logits(student, name), rtol=0, atol=0)
    if family.width is not None:
        assert dims(again).hidden_size == family.width["hidden"]
    if name in GENERATES:
        cached, uncached = generate(again, True), generate(again, False)
        assert torch.equal(cached.sequences, uncached.sequences)
        torch.testing.assert_close(cached.scores, uncached.scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_lora_all_linear_and_prompt_tuning_apply(name: str) -> None:
    model = build(name)
    before = logits(model, name)
    adapted = pm.apply(model, "lora", r=2, target_modules="all-linear")
    report = pm.trainable_report(adapted)
    assert 0 < report["trainable_params"] < sum(p.numel() for p in model.parameters())
    # LoRA starts at B = 0: the adapted model computes the base model's function.
    torch.testing.assert_close(logits(adapted, name), before, rtol=1e-5, atol=1e-6)
    prompted = pm.apply(build(name), "prompt_tuning", num_virtual_tokens=3)
    out = logits(prompted, name)
    assert torch.isfinite(out).all()


def _plant_identity(model: nn.Module, index: int) -> None:
    """Zero block `index`'s attention output and MLP down projection (every expert's, in a
    mixture of experts): on the residual stream the block then adds nothing."""
    info = arch_info(model)
    stack, blocks = present_stacks(model, info)[0]
    block = blocks[index]
    mlp_root = find(block, stack.mlp.experts) if stack.mlp.experts else None
    outputs = [find(block, stack.attention.o)] + (
        [find(block, stack.mlp.down)] if mlp_root is None else [])
    with torch.no_grad():
        for module in outputs:
            for p in module.parameters(recurse=False):
                p.zero_()
        if mlp_root is not None:
            for n, p in mlp_root.named_parameters():
                if "down" in n:
                    p.zero_()


@pytest.mark.parametrize("name", SINGLE_STACK)
def test_importance_ranks_a_planted_identity_block_last(name: str) -> None:
    # Weights 10x the default init scale, so every block changes what it is given measurably.
    model = build(name, initializer_range=0.2, init_std=0.2)
    _plant_identity(model, 2)
    batch = inputs(name)
    batch.setdefault("attention_mask", torch.ones_like(batch["input_ids"]))
    scores = depth_importance(model, [batch], method="influence")
    assert min(range(DEPTH), key=scores.__getitem__) == 2, scores
    # Post-norm blocks (BERT, ...) renormalise what passes through: an identity up to rounding.
    assert abs(scores[2]) < 1e-5 and min(s for i, s in enumerate(scores) if i != 2) > 1e-3


def test_an_unknown_block_layout_is_named() -> None:
    """A block with a projection discovery cannot place: the stack (all a depth cut needs)
    is still found, width cuts name what was not understood."""
    model = build("llama")
    for block in model.model.layers:
        block.mlp.extra = nn.Linear(HIDDEN, HIDDEN)
    info = arch_info(model)
    assert info.stacks[0].path == "layers" and info.stacks[0].mlp is None
    with pytest.raises(DistillError, match=r"not understood: layers: feed-forward: could not "
                                           r"tell .*mlp\.extra"):
        require_width(model)


def test_a_model_without_a_block_stack_is_named() -> None:
    model = build("llama")
    model.config.num_hidden_layers = 7
    with pytest.raises(DistillError, match=r"no stack of blocks found in LlamaForCausalLM .*"
                                           r"num_hidden_layers=7"):
        arch_info(model)


# Learned position tables (64 rows in every tiny config): RoBERTa / XLM-R number positions from
# padding_idx + 1 = 2; BART and OPT store 2 extra rows. Rotary and relative positions: none.
POSITIONS = {"bert": 64, "roberta": 62, "xlm-roberta": 62, "electra": 64, "distilbert": 64,
             "deberta-v2": 64, "gpt2": 64, "opt": 64, "bart": 64}


@pytest.mark.parametrize("name", NAMES)
def test_position_limit_is_read_from_the_position_table(teachers, name: str) -> None:
    model = teachers[name]
    assert position_limit(model) == POSITIONS.get(name)
    limit = POSITIONS.get(name)
    if limit is not None:  # the limit is real: one more position fails, the limit runs
        ids = torch.randint(3, 100, (1, limit))
        model(input_ids=ids, **({"decoder_input_ids": ids[:, :3]}
                                if FAMILIES[name].kind == "seq2seq" else {}))
        with pytest.raises((IndexError, RuntimeError, ValueError)):
            longer = torch.randint(3, 100, (1, limit + 1))
            model(input_ids=longer, **({"decoder_input_ids": longer}
                                       if FAMILIES[name].kind == "seq2seq" else {}))
