"""Width cuts (heads, MLP neurons, hidden channels) and their importance scores, on tiny random
models of every family with its usual head. Nothing is downloaded."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (AutoModelForCausalLM, AutoModelForSeq2SeqLM,
                          AutoModelForSequenceClassification, BertConfig,
                          BertForSequenceClassification, ElectraConfig,
                          ElectraForSequenceClassification, GPT2Config, GPT2LMHeadModel,
                          LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          PreTrainedModel, Qwen2Config, Qwen2ForCausalLM, RobertaConfig,
                          RobertaForSequenceClassification, T5Config, T5ForConditionalGeneration,
                          XLMRobertaConfig, XLMRobertaForSequenceClassification)

from distill.arch import Dims, dims, embeddings_tied, find
from distill.errors import DistillError
from distill.compress.width import WidthImportance, shrink_width, width_importance

VOCAB, HIDDEN, DEPTH, HEADS, HEAD_DIM, INTER = 100, 32, 2, 4, 8, 64
ENC = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": DEPTH,
       "num_attention_heads": HEADS, "intermediate_size": INTER, "max_position_embeddings": 64,
       "num_labels": 3}
DEC = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": DEPTH,
       "num_attention_heads": HEADS, "num_key_value_heads": 2, "intermediate_size": INTER,
       "max_position_embeddings": 64, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}
T5 = {"vocab_size": VOCAB, "d_model": HIDDEN, "d_kv": HEAD_DIM, "d_ff": INTER,
      "num_layers": DEPTH, "num_heads": HEADS, "relative_attention_num_buckets": 8,
      "relative_attention_max_distance": 16, "decoder_start_token_id": 0, "pad_token_id": 0,
      "eos_token_id": 1}

BUILDERS: dict[str, Callable[[], PreTrainedModel]] = {
    "bert": lambda: BertForSequenceClassification(BertConfig(**ENC)),
    "roberta": lambda: RobertaForSequenceClassification(RobertaConfig(**ENC, pad_token_id=1)),
    "xlm-roberta": lambda: XLMRobertaForSequenceClassification(
        XLMRobertaConfig(**ENC, pad_token_id=1)),
    # embedding_size 16 < hidden: the embeddings are not hidden channels, the projection is
    "electra": lambda: ElectraForSequenceClassification(ElectraConfig(**ENC, embedding_size=16)),
    "electra-noproj": lambda: ElectraForSequenceClassification(
        ElectraConfig(**ENC, embedding_size=HIDDEN)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=DEPTH,
                                               n_head=HEADS, n_positions=64, bos_token_id=0,
                                               eos_token_id=1)),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**DEC, tie_word_embeddings=True)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**DEC, use_sliding_window=True,
                                                  sliding_window=4, max_window_layers=1)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**DEC, sliding_window=4)),
    "t5": lambda: T5ForConditionalGeneration(T5Config(**T5)),
    "t5-gated": lambda: T5ForConditionalGeneration(T5Config(**T5,
                                                            feed_forward_proj="gated-gelu")),
}
ENCODERS = ("bert", "roberta", "xlm-roberta", "electra", "electra-noproj")
DECODERS = ("gpt2", "llama", "qwen2", "mistral")
SEQ2SEQ = ("t5", "t5-gated")
TIED = ENCODERS + ("gpt2",)  # head size = hidden // heads: hidden and heads are cut together


def auto(family: str):
    return (AutoModelForSequenceClassification if family in ENCODERS else
            AutoModelForCausalLM if family in DECODERS else AutoModelForSeq2SeqLM)


def build(family: str, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    return BUILDERS[family]().eval()


@pytest.fixture(scope="module")
def teachers() -> dict[str, PreTrainedModel]:
    return {family: build(family) for family in BUILDERS}


@pytest.fixture(scope="module")
def scores(teachers) -> dict[str, WidthImportance]:
    return {family: width_importance(model, [inputs(family, seed=3)])
            for family, model in teachers.items()}


def inputs(family: str, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # one padded row
    if family in DECODERS:
        return {"input_ids": ids}
    batch = {"input_ids": ids, "attention_mask": mask}
    if family in SEQ2SEQ:
        batch["decoder_input_ids"] = torch.randint(2, VOCAB, (2, 5), generator=g)
    return batch


@torch.no_grad()
def logits(model: nn.Module, family: str) -> torch.Tensor:
    return model(**inputs(family), use_cache=False).logits


@torch.no_grad()
def generate(model: PreTrainedModel, use_cache: bool = True):
    prompt = torch.randint(2, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    return model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                          use_cache=use_cache, pad_token_id=0, output_scores=True,
                          return_dict_in_generate=True)


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def keep_all(family: str) -> dict[str, int]:
    return {"hidden": HIDDEN, "heads": HEADS, "intermediate": 4 * HIDDEN if family == "gpt2"
            else INTER}


# --- keep-all cuts reproduce the model ---------------------------------------------------------

@pytest.mark.parametrize("family", list(BUILDERS))
def test_keep_all_in_order_is_exact(teachers, family: str) -> None:
    teacher = teachers[family]
    student = shrink_width(teacher, **keep_all(family))
    assert student is not teacher and dims(student) == dims(teacher)
    torch.testing.assert_close(logits(student, family), logits(teacher, family), rtol=0, atol=0)
    if family in DECODERS + SEQ2SEQ:
        assert torch.equal(generate(student).sequences, generate(teacher).sequences)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_keep_all_by_importance_is_a_permutation(teachers, scores, family: str) -> None:
    teacher = teachers[family]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = shrink_width(teacher, **keep_all(family), importance=scores[family])
    torch.testing.assert_close(logits(student, family), logits(teacher, family),
                               rtol=1e-5, atol=1e-5)
    # The importance order really permuted channels, heads and neurons ...
    moved = [k for k, v in student.state_dict().items() if not torch.equal(v, before[k])]
    assert any("embed" in k or "wte" in k or "shared" in k for k in moved)
    assert any("q" in k.rsplit(".", 2)[-2] or "c_attn" in k for k in moved)
    # ... and the teacher is untouched.
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


# --- real cuts ---------------------------------------------------------------------------------

def cut_targets(family: str, kind: str) -> dict[str, int]:
    if family in TIED:  # hidden and heads only together (hidden = heads * 8)
        table = {"hidden": {"hidden": 24, "heads": 3}, "heads": {"hidden": 8, "heads": 1},
                 "intermediate": {"intermediate": 40},
                 "all": {"hidden": 24, "heads": 3, "intermediate": 40}}
    else:  # GQA families: heads in whole groups of 2; T5: any count
        heads = 3 if family in SEQ2SEQ else 2
        table = {"hidden": {"hidden": 24}, "heads": {"heads": heads},
                 "intermediate": {"intermediate": 40},
                 "all": {"hidden": 20, "heads": heads, "intermediate": 40}}
    return table[kind]


@pytest.mark.parametrize("kind", ["hidden", "heads", "intermediate", "all"])
@pytest.mark.parametrize("family", list(BUILDERS))
def test_cut_runs_generates_and_reloads(teachers, scores, family: str, kind: str,
                                        tmp_path: Path) -> None:
    teacher = teachers[family]
    targets = cut_targets(family, kind)
    student = shrink_width(teacher, **targets, importance=scores[family]).eval()
    old = dims(teacher)
    heads = targets.get("heads", old.num_heads)
    expected = Dims(targets.get("hidden", old.hidden_size), heads,
                    heads // (old.num_heads // old.num_kv_heads), HEAD_DIM,
                    targets.get("intermediate", old.intermediate_size))
    assert dims(student) == expected
    out = logits(student, family)
    assert out.shape == logits(teacher, family).shape and torch.isfinite(out).all()
    if family in DECODERS + SEQ2SEQ:
        cached, uncached = generate(student, True), generate(student, False)
        assert torch.equal(cached.sequences, uncached.sequences)
        torch.testing.assert_close(cached.scores, uncached.scores, rtol=1e-5, atol=1e-5)
    student.save_pretrained(tmp_path)
    again, info = auto(family).from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    assert type(again) is type(student) and dims(again) == expected
    torch.testing.assert_close(logits(again.eval(), family), out, rtol=0, atol=0)
    if family in ("llama", "gpt2"):
        assert embeddings_tied(student) and embeddings_tied(again)


def test_param_counts_by_hand(teachers) -> None:
    # BERT, hidden 24 = 3 heads x 8, intermediate 40, 3 labels, 2 token types, 64 positions
    h, a, i = 24, 24, 40
    layer = 3 * (h * a + a) + (a * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h
    bert = (VOCAB + 64 + 2) * h + 2 * h + DEPTH * layer + (h * h + h) + (h * 3 + 3)
    student = shrink_width(teachers["bert"], hidden=24, heads=3, intermediate=40)
    assert params(student) == bert
    # Llama with GQA (2 of 4 heads = 1 of 2 groups), head_dim kept at 8, hidden 20, tied head
    h, q, kv, i = 20, 2 * 8, 1 * 8, 40
    layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
    llama = VOCAB * h + DEPTH * layer + h
    student = shrink_width(teachers["llama"], hidden=20, heads=2, intermediate=40)
    assert params(student) == llama
    assert student.config.head_dim == 8 and student.config.num_key_value_heads == 1


# --- importance --------------------------------------------------------------------------------

def test_planted_head_neuron_and_channel_rank_last() -> None:
    teacher = build("bert")
    layer = teacher.bert.encoder.layer
    with torch.no_grad():
        layer[0].attention.output.dense.weight[:, 16:24] = 0  # head 2 writes nothing
        layer[1].attention.self.value.weight[8:16] = 0  # head 1: zero values ...
        layer[1].attention.self.value.bias[8:16] = 0  # ... so its context is zero
        layer[1].output.dense.weight[:, 5] = 0  # neuron 5 writes nothing
        for norm in [teacher.bert.embeddings.LayerNorm, *(m for m in teacher.modules()
                                                          if isinstance(m, nn.LayerNorm))]:
            norm.weight[7] = 0  # channel 7 is zero after every norm
            norm.bias[7] = 0
    imp = width_importance(teacher, [inputs("bert")])
    assert imp.stacks["layers"][0].heads.argmin() == 2
    assert imp.stacks["layers"][1].heads.argmin() == 1
    assert imp.stacks["layers"][1].neurons.argmin() == 5
    assert imp.channels.argmin() == 7 and imp.channels[7] == 0
    assert imp.tokens == 12  # 7 + 5 unpadded tokens
    student = shrink_width(teacher, hidden=24, heads=3, intermediate=63, importance=imp)
    s_layer = student.bert.encoder.layer
    order = torch.argsort(imp.channels, descending=True, stable=True)[:24]
    assert 7 not in order
    assert torch.equal(student.bert.embeddings.word_embeddings.weight,
                       teacher.bert.embeddings.word_embeddings.weight[:, order])
    assert torch.equal(s_layer[1].output.dense.weight,
                       layer[1].output.dense.weight[order][:, _order(imp, 1)])
    # the planted heads are gone: their O columns (layer 0) / V rows (layer 1) nowhere
    assert s_layer[0].attention.output.dense.weight.abs().sum(0).min() > 0
    assert s_layer[1].attention.self.value.weight.abs().sum(1).min() > 0


def _order(imp: WidthImportance, layer: int) -> torch.Tensor:
    neurons = imp.stacks["layers"][layer].neurons
    return torch.argsort(neurons, descending=True, stable=True)[:63]


def test_the_planted_head_is_the_one_dropped_and_heads_keep_their_order() -> None:
    """Head 2's output is switched off: cutting to 3 heads drops it, and the kept heads stay
    in their order (0, 1, 3), since some models tie a head's behaviour to its index."""
    teacher = build("bert")
    with torch.no_grad():
        teacher.bert.encoder.layer[0].attention.output.dense.weight[:, 16:24] = 0
    imp = width_importance(teacher, [inputs("bert")])
    assert imp.stacks["layers"][0].heads.argmin() == 2
    student = shrink_width(teacher, heads=3, hidden=24, importance=imp)
    hid = torch.argsort(imp.channels, descending=True, stable=True)[:24]
    span = torch.cat([torch.arange(0, 16), torch.arange(24, 32)])
    o = student.bert.encoder.layer[0].attention.output.dense.weight
    teacher_o = teacher.bert.encoder.layer[0].attention.output.dense.weight
    assert torch.equal(o, teacher_o[hid][:, span])


def test_gpt2_fused_qkv_is_cut_per_part() -> None:
    teacher = build("gpt2")
    c_attn = teacher.transformer.h[0].attn.c_attn  # Conv1D: weight [in, 3*hidden]
    with torch.no_grad():
        c_attn.weight[:, 2 * HIDDEN + 8:2 * HIDDEN + 16] = 0  # V of head 1
        c_attn.bias[2 * HIDDEN + 8:2 * HIDDEN + 16] = 0
    imp = width_importance(teacher, [inputs("gpt2")])
    assert imp.stacks["layers"][0].heads.argmin() == 1
    student = shrink_width(teacher, hidden=24, heads=3, importance=imp)
    heads = torch.tensor([0, 2, 3])  # head 1 dropped, the others in order
    hid = torch.argsort(imp.channels, descending=True, stable=True)[:24]
    span = (heads[:, None] * 8 + torch.arange(8)).flatten()
    parts = [c_attn.weight[hid][:, p * HIDDEN + span] for p in range(3)]  # Q, K, V apart
    got = student.transformer.h[0].attn
    assert torch.equal(got.c_attn.weight, torch.cat(parts, dim=1))
    assert torch.equal(got.c_attn.bias, torch.cat([c_attn.bias[p * HIDDEN + span]
                                                   for p in range(3)]))
    assert torch.equal(got.c_proj.weight, teacher.transformer.h[0].attn.c_proj.weight[span][:, hid])
    assert (got.num_heads, got.split_size, got.embed_dim, got.c_attn.nf) == (3, 24, 24, 72)


def test_gqa_keeps_whole_groups_by_importance() -> None:
    teacher = build("llama")
    attn = teacher.model.layers[0].self_attn
    with torch.no_grad():
        attn.o_proj.weight[:, 16:32] = 0  # query heads 2 and 3 = the whole K/V group 1
    imp = width_importance(teacher, [inputs("llama")])
    assert imp.stacks["layers"][0].groups(2).argmin() == 1
    student = shrink_width(teacher, heads=2, importance=imp)
    got = student.model.layers[0].self_attn
    assert torch.equal(got.k_proj.weight, attn.k_proj.weight[:8])
    assert torch.equal(got.v_proj.weight, attn.v_proj.weight[:8])
    assert torch.equal(got.q_proj.weight, attn.q_proj.weight[:16])
    assert torch.equal(got.o_proj.weight, attn.o_proj.weight[:, :16])
    assert got.num_key_value_groups == 2 and student.config.num_key_value_heads == 1
    # hidden was not asked for: no reordering, the residual stream stays the teacher's
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.model.layers[1].mlp.down_proj.weight,
                       teacher.model.layers[1].mlp.down_proj.weight)


OTHER_HEADS = {
    # BERT's table lists both `cls` and `cls.predictions.decoder` (tied to the embeddings)
    "bert-mlm": (lambda: __import__("transformers").BertForMaskedLM(BertConfig(**ENC)),
                 {"hidden": 24, "heads": 3}),
    "gpt2-double-heads": (lambda: __import__("transformers").GPT2DoubleHeadsModel(GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=DEPTH, n_head=HEADS)), {"hidden": 24,
                                                                         "heads": 3}),
    "llama-classifier": (lambda: __import__("transformers").LlamaForSequenceClassification(
        LlamaConfig(**DEC)), {"hidden": 20, "heads": 2}),
    "t5-encoder": (lambda: __import__("transformers").T5EncoderModel(T5Config(**T5)),
                   {"hidden": 20, "heads": 3}),
}


@pytest.mark.parametrize("name", list(OTHER_HEADS))
def test_other_heads_are_cut_consistently(name: str) -> None:
    make, targets = OTHER_HEADS[name]
    torch.manual_seed(0)
    teacher = make().eval()
    batch = {"input_ids": inputs("llama")["input_ids"]}
    imp = width_importance(teacher, [batch])
    full = shrink_width(teacher, **{k: getattr(dims(teacher), n) for k, n in (
        ("hidden", "hidden_size"), ("heads", "num_heads"), ("intermediate",
                                                            "intermediate_size"))},
        importance=imp)
    with torch.no_grad():
        want, got = teacher(**batch), full(**batch)
    key = "last_hidden_state" if name == "t5-encoder" else "logits"
    expected = want[key]
    if key == "last_hidden_state":  # a bare model returns the (permuted) hidden channels
        expected = expected[..., torch.argsort(imp.channels, descending=True, stable=True)]
    torch.testing.assert_close(got[key], expected, rtol=1e-5, atol=1e-5)
    student = shrink_width(teacher, **targets, intermediate=40, importance=imp)
    with torch.no_grad():
        assert torch.isfinite(student(**batch)[key]).all()


def test_t5_keeps_one_head_selection_per_stack_with_its_bias_columns(teachers, scores) -> None:
    teacher, imp = teachers["t5"], scores["t5"]
    student = shrink_width(teacher, heads=3, hidden=24, importance=imp)
    hid = torch.argsort(imp.channels, descending=True, stable=True)[:24]
    for name in ("encoder", "decoder"):
        total = sum(layer.heads for layer in imp.stacks[name])
        heads = torch.sort(torch.argsort(total, descending=True, stable=True)[:3]).values
        span = (heads[:, None] * 8 + torch.arange(8)).flatten()
        t_blocks, s_blocks = getattr(teacher, name).block, getattr(student, name).block
        table = s_blocks[0].layer[0].SelfAttention.relative_attention_bias
        assert torch.equal(table.weight,
                           t_blocks[0].layer[0].SelfAttention.relative_attention_bias.weight[
                               :, heads])
        for t, s in zip(t_blocks, s_blocks, strict=True):  # every block keeps the same heads
            assert torch.equal(s.layer[0].SelfAttention.q.weight,
                               t.layer[0].SelfAttention.q.weight[span][:, hid])
        assert getattr(student, name).config.d_model == 24
    # tied T5 scales the decoder output by d_model**-0.5: the change is folded into the norm
    torch.testing.assert_close(student.decoder.final_layer_norm.weight,
                               teacher.decoder.final_layer_norm.weight[hid] * math.sqrt(24 / 32))
    assert student.model_dim == 24
    assert student.encoder.embed_tokens.weight is student.shared.weight
    assert student.lm_head.weight is student.shared.weight


def test_electra_keeps_narrow_embeddings_and_cuts_the_projection(teachers) -> None:
    teacher = teachers["electra"]
    student = shrink_width(teacher, hidden=24, heads=3)
    assert student.config.embedding_size == 16 and student.config.hidden_size == 24
    assert torch.equal(student.electra.embeddings.word_embeddings.weight,
                       teacher.electra.embeddings.word_embeddings.weight)
    assert student.electra.embeddings_project.weight.shape == (24, 16)
    with pytest.raises(DistillError, match="hidden: 16 equals the embedding size .*allowed: a "
                                           "hidden size other than 16"):
        shrink_width(teacher, hidden=16, heads=2)
    narrow = shrink_width(teachers["electra-noproj"], hidden=24, heads=3)
    assert narrow.config.embedding_size == 24 and find(narrow.electra,
                                                       "embeddings_project") is None


def test_importance_leaves_the_model_as_it_was(teachers) -> None:
    model = copy.deepcopy(teachers["qwen2"]).train()
    before = logits(model.eval(), "qwen2")
    model.train()
    imp = width_importance(model, [inputs("qwen2"), inputs("qwen2", seed=5)])
    assert model.training and not any(m._forward_hooks or m._forward_pre_hooks
                                      for m in model.modules())
    assert imp.tokens == 28 and len(imp.stacks["layers"]) == DEPTH
    assert imp.stacks["layers"][0].heads.shape == (HEADS,) and imp.channels.shape == (HIDDEN,)
    assert imp.stacks["layers"][0].cross_heads is None
    torch.testing.assert_close(logits(model.eval(), "qwen2"), before, rtol=0, atol=0)
    t5 = width_importance(teachers["t5"], [inputs("t5")])
    assert t5.stacks["decoder"][1].cross_heads.shape == (HEADS,)
    assert t5.stacks["encoder"][0].cross_heads is None
    assert t5.tokens == 12  # the encoder's unpadded tokens


# --- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("family, targets, message", [
    ("llama", {"hidden": 0}, r"hidden: 0 is not allowed; the model has 32, .* 1\.\.32"),
    ("llama", {"hidden": 40}, r"hidden: 40 is not allowed; the model has 32"),
    ("llama", {"intermediate": 2.5}, r"intermediate: 2\.5 is not allowed"),
    ("llama", {"heads": True}, r"heads: True is not allowed"),
    ("llama", {"heads": 3}, (r"heads: 3 is not a multiple of 2, the query heads per "
                             r"key/value group .*allowed: 2, 4")),
    ("t5", {"heads": 5}, r"heads: 5 is not allowed; the model has 4"),
    ("bert", {"hidden": 16}, (r"hidden=16: bert computes the head size as hidden_size // "
                              r"num_attention_heads.*allowed \(hidden, heads\) pairs: "
                              r"\(8, 1\), \(16, 2\), \(24, 3\), \(32, 4\); pass both")),
    ("gpt2", {"heads": 2}, r"heads=2: gpt2 computes the head size .* hidden 32 ≠ 2 heads × 8"),
    ("roberta", {"hidden": 20, "heads": 3}, r"hidden=20, heads=3: roberta"),
])
def test_bad_targets_are_clear_errors(teachers, family: str, targets: dict,
                                      message: str) -> None:
    with pytest.raises(DistillError, match=message):
        shrink_width(teachers[family], **targets)


def test_importance_of_another_shape_is_refused(teachers, scores) -> None:
    smaller = shrink_width(teachers["llama"], intermediate=40)
    with pytest.raises(DistillError, match=r"importance: scores do not fit this model.*"
                                           r"intermediate 40; compute width_importance"):
        shrink_width(smaller, hidden=16, importance=scores["llama"])


def test_hidden_cut_of_a_decoder_with_external_cross_attention_is_refused() -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=1, n_head=HEADS,
                                       add_cross_attention=True)).eval()
    with pytest.raises(DistillError, match="cross-attention reads the hidden states of a "
                                           "separate encoder"):
        shrink_width(model, hidden=24, heads=3)
    student = shrink_width(model, intermediate=40)
    cross = student.transformer.h[0].crossattention
    assert cross.c_attn.weight.shape == (HIDDEN, 2 * HIDDEN)


def test_depth_then_two_width_cuts_chain(tmp_path: Path) -> None:
    """T5 after a depth cut (its relative-position table moved to the new first block), cut
    twice in width with fresh scores each time, still reloads exactly."""
    from distill.compress.depth import keep_layers

    torch.manual_seed(0)
    teacher = T5ForConditionalGeneration(T5Config(**{**T5, "num_layers": 3})).eval()
    student = keep_layers(teacher, [2, 1])
    for targets in ({"hidden": 24, "heads": 3, "intermediate": 40}, {"hidden": 16, "heads": 2}):
        imp = width_importance(student, [inputs("t5")])
        student = shrink_width(student, **targets, importance=imp).eval()
    assert dims(student) == Dims(16, 2, 2, HEAD_DIM, 40)
    student.save_pretrained(tmp_path)
    again, info = AutoModelForSeq2SeqLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    torch.testing.assert_close(logits(again.eval(), "t5"), logits(student, "t5"), rtol=0, atol=0)
