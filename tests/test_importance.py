"""Depth importance scores and layer selection, on tiny random BERT classifiers and Llama LMs.

The oracle: a block made an exact identity on the residual stream (attention output and MLP
down-projection zeroed, so `x + 0 + 0` passes through) changes nothing when skipped, so it must
rank least important by both scores. For the loss score to rank every *other* block above it,
skipping them must raise the loss, which a random model does not promise for arbitrary labels.
So the calibration labels are sampled from the full model's own predictive distribution: by
Gibbs' inequality the expected cross-entropy is smallest for the model that generated them, and
with peaked outputs (initializer_range 0.2) and enough predictions any real change raises it.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config,
                          GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel,
                          T5Config, T5ForConditionalGeneration)

from distill.errors import DistillError
from distill.compress.importance import (calibration_loss, depth_importance, most_important,
                                select_layers)
from distill.arch import present_stacks
from distill.compress.depth import evenly_spaced, keep_layers


DEPTH, VOCAB = 4, 100


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=DEPTH, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_labels=3,
        initializer_range=0.2)).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=DEPTH, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
        initializer_range=0.2, tie_word_embeddings=True)).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=DEPTH, n_head=4,
                                      n_positions=64, initializer_range=0.2)).eval()


def make_identity_bert(model: BertForSequenceClassification, index: int) -> None:
    # Post-LN block: output = LN(x + 0) twice; x is already LN output with weight 1 / bias 0
    # (fresh init), so the block is the identity up to float rounding.
    block = model.bert.encoder.layer[index]
    for linear in (block.attention.output.dense, block.output.dense):
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)


def make_identity_llama(model: LlamaForCausalLM, index: int) -> None:
    # Pre-norm block: x + o_proj(...) + down_proj(...) = x + 0 + 0, bit for bit.
    block = model.model.layers[index]
    nn.init.zeros_(block.self_attn.o_proj.weight)
    nn.init.zeros_(block.mlp.down_proj.weight)


def self_labelled_batch(model: PreTrainedModel, causal: bool, n: int, seed: int = 0
                        ) -> dict[str, torch.Tensor]:
    """Random ids (some rows padded) with labels sampled from the model's own predictions."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[::3, 9:] = 0
    with torch.no_grad():
        probs = model(input_ids=ids, attention_mask=mask).logits.float().softmax(-1)
    sampled = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=gen)
    sampled = sampled.reshape(probs.shape[:-1])
    if not causal:
        return {"input_ids": ids, "attention_mask": mask, "labels": sampled}
    labels = torch.full_like(ids, -100)
    labels[:, 1:] = sampled[:, :-1]  # the token at t+1 is drawn from the prediction at t
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


CASES: dict[str, tuple[Callable[[], PreTrainedModel], Callable[..., None], bool, int]] = {
    # name: (builder, identity maker, causal, calibration examples); a classifier gets one
    # label per example, so it needs more examples than the LM (11 predictions per row).
    "bert": (tiny_bert, make_identity_bert, False, 256),
    "llama": (tiny_llama, make_identity_llama, True, 16),
}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("index", [1, DEPTH - 1])
def test_identity_block_ranks_least_important_by_both_scores(name: str, index: int) -> None:
    build, make_identity, causal, n = CASES[name]
    model = build()
    make_identity(model, index)
    batch = self_labelled_batch(model, causal, n)
    influence = depth_importance(model, [batch], method="influence")
    loss = depth_importance(model, [batch], method="loss")
    for scores in (influence, loss):
        assert len(scores) == DEPTH
        assert min(range(DEPTH), key=scores.__getitem__) == index, scores
        assert abs(scores[index]) < 1e-5
        assert min(s for i, s in enumerate(scores) if i != index) > 1e-3, scores
    # The identity block is the one `importance` drops first.
    for score in ("influence", "loss"):
        kept = select_layers(model, DEPTH - 1, "importance", [batch], score=score)
        assert kept == [i for i in range(DEPTH) if i != index]


@pytest.mark.parametrize("name", CASES)
def test_loss_score_equals_loss_of_the_cut_model(name: str) -> None:
    """Skipping a block by hook is exact: same loss as `keep_layers` without that block."""
    build, _, causal, _ = CASES[name]
    model = build()
    batches = [self_labelled_batch(model, causal, 8, seed=s) for s in (1, 2)]
    scores = depth_importance(model, batches, method="loss")
    base = calibration_loss(model, batches)
    for i in range(DEPTH):
        cut = keep_layers(model, [j for j in range(DEPTH) if j != i]).eval()
        with torch.no_grad():
            expected = calibration_loss(cut, batches) - base
        assert scores[i] == pytest.approx(expected, abs=1e-5)


def _skip_hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
    """The plain way to skip a block: run it, then hand its input on (the oracle)."""
    h_in = args[0] if args else kwargs["hidden_states"]
    return h_in if isinstance(output, torch.Tensor) else (h_in, *output[1:])


def _last_hidden(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.base_model(input_ids=batch["input_ids"],
                                attention_mask=batch["attention_mask"])[0].float()


@pytest.mark.parametrize("build,causal", [(tiny_llama, True), (tiny_gpt2, True),
                                          (tiny_bert, False)], ids=["llama", "gpt2", "bert"])
def test_replaying_the_blocks_before_the_skip_changes_nothing(
        build: Callable[[], PreTrainedModel], causal: bool) -> None:
    """The scores replay the full pass's outputs for the blocks before the skipped one; they
    must equal running every block with the skipped one hooked to the identity (GPT-2's
    blocks return tuples, Llama's tensors): the loss bit for bit."""
    model = build()
    batches = [self_labelled_batch(model, causal, 6, seed=s) for s in (3, 4)]
    base = calibration_loss(model, batches)
    full = [_last_hidden(model, b) for b in batches]
    masks = [b["attention_mask"].float() for b in batches]
    loss_expected, hidden_expected = [], []
    for block in present_stacks(model)[0][1]:
        handle = block.register_forward_hook(_skip_hook, with_kwargs=True)
        try:
            loss_expected.append(calibration_loss(model, batches) - base)
            change = [((1 - torch.cosine_similarity(f, _last_hidden(model, b), dim=-1)) * m)
                      for f, b, m in zip(full, batches, masks)]
        finally:
            handle.remove()
        hidden_expected.append(float(sum(c.sum() for c in change) / sum(m.sum() for m in masks)))
    assert depth_importance(model, batches, method="loss") == loss_expected
    assert depth_importance(model, batches, method="hidden") == \
        pytest.approx(hidden_expected, abs=1e-6)


def test_an_instance_forward_is_put_back() -> None:
    """accelerate's device hooks set `forward` on the block instance: scoring restores it."""
    model = tiny_llama()
    wrapped = model.model.layers[2]
    original = wrapped.forward
    calls = []

    def forward(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return original(*args, **kwargs)

    wrapped.forward = forward
    depth_importance(model, [self_labelled_batch(model, True, 4)], method="loss")
    assert wrapped.__dict__["forward"] is forward and calls
    assert all("forward" not in block.__dict__
               for i, block in enumerate(model.model.layers) if i != 2)


def test_influence_matches_hidden_states_where_they_are_block_io() -> None:
    """BERT's output_hidden_states are exactly each block's input/output: same scores."""
    model = tiny_bert()
    batch = self_labelled_batch(model, False, 8)
    with torch.no_grad():
        hs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].float()
    expected = [1 - float((torch.cosine_similarity(hs[i], hs[i + 1], dim=-1) * mask).sum()
                          / mask.sum()) for i in range(DEPTH)]
    assert depth_importance(model, [batch]) == pytest.approx(expected, abs=1e-5)


def test_scoring_leaves_the_model_as_it_was() -> None:
    model = tiny_llama()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = self_labelled_batch(model, True, 4)
    for method in ("influence", "loss", "hidden"):
        depth_importance(model, iter([batch]), method=method)  # an iterator is fine
    assert model.training
    assert all(not block._forward_hooks for block in model.model.layers)
    assert all("forward" not in block.__dict__ for block in model.model.layers)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_causal_lm_loss_without_labels_uses_input_ids() -> None:
    model = tiny_llama()
    ids = torch.randint(5, VOCAB, (2, 10))
    with torch.no_grad():
        expected = float(model(input_ids=ids, labels=ids).loss)
    assert calibration_loss(model, [{"input_ids": ids}]) == pytest.approx(expected, rel=1e-5)


def test_strategies_return_the_right_indices() -> None:
    model = tiny_llama()
    assert select_layers(model, 2, "uniform") == evenly_spaced(2, DEPTH) == [0, 2]
    assert select_layers(model, 3, "top") == [0, 1, 2]
    assert select_layers(model, DEPTH, "top") == list(range(DEPTH))
    assert most_important([0.1, 0.9, 0.5, 0.7], 2) == [1, 3]  # ascending, not by score
    assert most_important([0.3, 0.3, 0.3], 2) == [0, 1]  # ties: lower index wins
    batch = self_labelled_batch(model, True, 4)
    scores = depth_importance(model, [batch], method="loss")
    assert select_layers(model, 2, "importance", [batch], score="loss") == \
        most_important(scores, 2)


@pytest.mark.parametrize("keep", [0, DEPTH + 1, -1, 2.5, True, "2"])
def test_bad_keep_is_refused(keep: object) -> None:
    with pytest.raises(DistillError, match=rf"keep: .*allowed: an integer 1\.\.{DEPTH}"):
        select_layers(tiny_llama(), keep, "uniform")  # type: ignore[arg-type]


def test_other_errors_name_what_is_allowed() -> None:
    model = tiny_bert()
    batch = self_labelled_batch(model, False, 4)
    with pytest.raises(DistillError, match="allowed: uniform, top, importance"):
        select_layers(model, 2, "random")
    with pytest.raises(DistillError, match="needs calibration batches"):
        select_layers(model, 2, "importance")
    with pytest.raises(DistillError, match="allowed: auto, loss, hidden, influence"):
        select_layers(model, 2, "importance", [batch], score="fisher")
    with pytest.raises(DistillError, match="at least one calibration batch"):
        depth_importance(model, [])
    with pytest.raises(DistillError, match="needs 'labels'"):
        depth_importance(model, [{"input_ids": batch["input_ids"]}], method="loss")
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64,
                                             num_layers=2, num_heads=4,
                                             decoder_start_token_id=0))
    with pytest.raises(DistillError, match="one layer stack"):
        select_layers(t5, 1, "importance", [batch])
    assert select_layers(t5, 1, "top") == [0]
