"""Depth cuts in detail: layer indices, per-layer config lists, KV caches, T5's shared
relative-position table, copies not shares, and the selections that are refused.

The contract every family meets (keep-all exactness, reload, generate) is
`tests/test_families.py`; these are the finer points, on tiny random models built from
their configs (4 layers, hidden 32, vocab 100); nothing is downloaded.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
import transformers
from transformers import (AutoModelForSeq2SeqLM, GPT2Config, GPT2LMHeadModel, PreTrainedModel,
                          T5Config, T5ForConditionalGeneration)

from distill.arch import embeddings_tied, find, present_stacks, stack_depths
from distill.errors import DistillError
from distill.compress.depth import keep_layers
from families import DEPTH, FAMILIES, HIDDEN, VOCAB, build, generate, logits

# The nine families these finer points were first written for; every family meets the
# contract in tests/test_families.py. Models, inputs and generation: tests/families.py.
NAMES = ("bert", "roberta", "xlm-roberta", "electra", "gpt2", "llama", "qwen2", "mistral", "t5")
ENCODERS = tuple(n for n in NAMES if FAMILIES[n].kind == "encoder")
DECODERS = tuple(n for n in NAMES if FAMILIES[n].kind == "decoder")


@pytest.fixture(scope="module")
def teachers() -> dict[str, PreTrainedModel]:
    return {family: build(family) for family in NAMES}


def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def stacks(model: nn.Module) -> list[nn.ModuleList]:
    return [blocks for _, blocks in present_stacks(model)]


def relative_table(block: nn.Module) -> nn.Embedding | None:
    return find(block, "layer.0.SelfAttention.relative_attention_bias")


# --- depth cuts --------------------------------------------------------------------------------

@pytest.mark.parametrize("family", DECODERS + ("t5",))
def test_generate_with_kv_cache_after_a_cut(teachers, family: str) -> None:
    student = keep_layers(teachers[family], [0, 3]).eval()
    for stack, blocks in present_stacks(student):
        assert [find(b, stack.attention.module).layer_idx for b in blocks] == [0, 1]
    cached, uncached = generate(student, use_cache=True), generate(student, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.scores, uncached.scores, rtol=1e-5, atol=1e-5)


CUTS = {"t5": ([1, 3], [0, 2])}  # encoder drops block 0 (moves the table), decoder keeps it


@pytest.mark.parametrize("family", NAMES)
def test_cut_saves_and_reloads_with_plain_transformers(teachers, family: str,
                                                       tmp_path: Path) -> None:
    layers, decoder_layers = CUTS.get(family, ([1, 3], None))
    student = keep_layers(teachers[family], layers, decoder_layers).eval()
    student.save_pretrained(tmp_path)
    auto = getattr(transformers, FAMILIES[family].auto)
    again, info = auto.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    torch.testing.assert_close(logits(again.eval(), family), logits(student, family),
                               rtol=0, atol=0)
    assert stack_depths(again) == stack_depths(student)
    assert again.config.num_hidden_layers == 2
    if family == "t5":
        assert (again.config.num_layers, again.config.num_decoder_layers) == (2, 2)
    if family == "llama":
        assert embeddings_tied(again)
    if family == "qwen2":  # teacher: [full, full, sliding, sliding]
        assert again.config.layer_types == ["full_attention", "sliding_attention"]
        assert again.config.max_window_layers == 1


@pytest.mark.parametrize("family", NAMES)
def test_params_drop_by_the_removed_blocks_and_kept_blocks_are_copies(teachers,
                                                                      family: str) -> None:
    teacher = teachers[family]
    picks = [[1, 3], [0, 2]] if family == "t5" else [[1, 3]]
    student = keep_layers(teacher, *picks)
    removed = 0
    for t_blocks, s_blocks, pick in zip(stacks(teacher), stacks(student), picks):
        removed += sum(params(t_blocks[i]) for i in range(DEPTH) if i not in pick)
        if family == "t5" and 0 not in pick:
            # Block 0's relative-position table is the stack's, not the block's: it moves to
            # the new first block instead of leaving with block 0.
            removed -= relative_table(t_blocks[0]).weight.numel()
        for position, i in enumerate(pick):
            expected = dict(t_blocks[i].named_parameters())
            if family == "t5":
                expected.pop("layer.0.SelfAttention.relative_attention_bias.weight", None)
                if position == 0:
                    expected["layer.0.SelfAttention.relative_attention_bias.weight"] = (
                        relative_table(t_blocks[0]).weight)
            got = dict(s_blocks[position].named_parameters())
            assert got.keys() == expected.keys()
            for name, p in got.items():
                assert torch.equal(p, expected[name]), name
                assert p.data_ptr() != expected[name].data_ptr()  # copied, not shared
    assert params(teacher) - params(student) == removed > 0
    assert params(teacher) == sum(p.numel() for p in teacher.parameters())  # teacher untouched


def test_t5_without_block_0_equals_the_teacher_skipping_block_0(teachers) -> None:
    """Expected: the teacher run with block 0 of each stack skipped, i.e. its residual updates
    not applied, while it still computes the relative-position bias that every later block
    reads. That is what dropping a block means for the blocks that remain (they see exactly the
    positions they were trained with). The student must match it bit for bit."""

    class SkipBlock(nn.Module):
        def __init__(self, block: nn.Module) -> None:
            super().__init__()
            self.block = block

        def forward(self, hidden_states, *args, **kwargs):
            _, bias, cross_bias = self.block(hidden_states, *args, **kwargs)
            return hidden_states, bias, cross_bias

    teacher = teachers["t5"]
    reference = copy.deepcopy(teacher)
    for stack in (reference.encoder, reference.decoder):
        stack.block[0] = SkipBlock(stack.block[0])
    student = keep_layers(teacher, [1, 2, 3]).eval()
    expected = logits(reference, "t5")
    torch.testing.assert_close(logits(student, "t5"), expected, rtol=0, atol=0)
    for blocks in stacks(student):
        assert relative_table(blocks[0]) is not None
        assert all(relative_table(b) is None for b in blocks[1:])
    # Control: without the table the cut stack has no position information at all.
    naive = copy.deepcopy(student)
    for blocks in stacks(naive):
        attention = find(blocks[0], "layer.0.SelfAttention")
        del attention.relative_attention_bias
        attention.has_relative_attention_bias = False
    assert not torch.allclose(logits(naive, "t5"), expected, atol=1e-3)


def test_t5_reordered_blocks_keep_one_table_in_front(teachers) -> None:
    teacher = teachers["t5"]
    student = keep_layers(teacher, [2, 0])
    encoder = student.encoder.block
    assert relative_table(encoder[1]) is None
    assert torch.equal(relative_table(encoder[0]).weight,
                       relative_table(teacher.encoder.block[0]).weight)


def test_t5_with_unequal_stacks_needs_decoder_layers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = T5ForConditionalGeneration(T5Config(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=64, num_layers=4, num_decoder_layers=3,
        num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()
    with pytest.raises(DistillError, match="decoder_layers: required.*encoder has 4 layers and "
                                           r"the decoder 3; allowed indices 0\.\.2"):
        keep_layers(teacher, [0, 2])
    with pytest.raises(DistillError, match=r"decoder_layers: \[3\] out of range"):
        keep_layers(teacher, [0, 2], decoder_layers=[3])
    student = keep_layers(teacher, [0, 3], decoder_layers=[2]).eval()
    assert stack_depths(student) == {"encoder": 2, "decoder": 1}
    assert student.decoder.config.num_layers == 1 and student.encoder.config.num_layers == 2
    cached, uncached = generate(student, True), generate(student, False)
    assert torch.equal(cached.sequences, uncached.sequences)
    student.save_pretrained(tmp_path)
    again = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert (again.config.num_layers, again.config.num_decoder_layers) == (2, 1)
    torch.testing.assert_close(logits(again, "t5"), logits(student, "t5"), rtol=0, atol=0)


def test_bad_selections_are_clear_errors(teachers) -> None:
    llama = teachers["llama"]
    with pytest.raises(DistillError, match="decoder_layers: only encoder–decoder models"):
        keep_layers(llama, [0], decoder_layers=[0])
    with pytest.raises(DistillError, match=r"layers: \[1\] repeated"):
        keep_layers(llama, [1, 1])
    with pytest.raises(DistillError, match="layers: empty"):
        keep_layers(llama, [])
    with pytest.raises(DistillError, match=r"\[4\] out of range; the teacher has 4 layers"):
        keep_layers(llama, [0, 4])


def test_gpt2_layer_scaled_attention_allows_only_prefix_cuts() -> None:
    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=DEPTH, n_head=4,
                                         n_positions=64, scale_attn_by_inverse_layer_idx=True,
                                         bos_token_id=0, eos_token_id=1)).eval()
    with pytest.raises(DistillError, match=r"allowed: a prefix such as \[0, 1\]"):
        keep_layers(teacher, [0, 2])
    student = keep_layers(teacher, [0, 1]).eval()
    fresh = copy.deepcopy(student.config)
    rebuilt = GPT2LMHeadModel(fresh).eval()
    rebuilt.load_state_dict(student.state_dict())
    torch.testing.assert_close(logits(rebuilt, "gpt2"), logits(student, "gpt2"), rtol=0, atol=0)


def test_a_block_built_for_its_position_is_not_moved() -> None:
    """Blocks a config builds differently by position: ModernBERT's block 0 (no attention
    norm) must stay first; Qwen2-MoE's dense blocks listed in `mlp_only_layers` move with the
    list renumbered, but its periodic `decoder_sparse_step` cannot follow a cut that puts a
    dense block where the period says experts. Refused with the reason, never saved wrong."""
    from transformers import (ModernBertConfig, ModernBertModel, Qwen2MoeConfig,
                              Qwen2MoeForCausalLM)

    torch.manual_seed(0)
    bert = ModernBertModel(ModernBertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=DEPTH, num_attention_heads=4,
        intermediate_size=64, pad_token_id=0, eos_token_id=1, bos_token_id=2, cls_token_id=2,
        sep_token_id=1))
    with pytest.raises(DistillError, match=r"puts block 1 first.*allowed: selections that "
                                           r"start with 0"):
        keep_layers(bert, [1, 3])
    assert len(keep_layers(bert, [0, 3]).layers) == 2

    def moe(**kwargs) -> Qwen2MoeForCausalLM:
        return Qwen2MoeForCausalLM(Qwen2MoeConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=DEPTH, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64, moe_intermediate_size=16,
            shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
            **kwargs)).eval()

    listed = moe(mlp_only_layers=[2])  # block 2 dense, the others experts
    student = keep_layers(listed, [0, 2, 3])
    assert student.config.mlp_only_layers == [1]
    with torch.no_grad():  # the student saves and reloads as it is
        rebuilt = Qwen2MoeForCausalLM(copy.deepcopy(student.config)).eval()
        rebuilt.load_state_dict(student.state_dict())
        ids = torch.randint(2, VOCAB, (1, 6))
        torch.testing.assert_close(rebuilt(ids).logits, student(ids).logits, rtol=0, atol=0)
    periodic = moe(decoder_sparse_step=2)  # blocks 1, 3 experts; 0, 2 dense
    with pytest.raises(DistillError, match=r"layers: \[0, 2\] cannot be kept in this order.*"
                                           r"would reload with other tensors"):
        keep_layers(periodic, [0, 2])
    assert len(keep_layers(periodic, [0, 1]).model.layers) == 2
