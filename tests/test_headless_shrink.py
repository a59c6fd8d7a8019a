"""Shrinking a model without a task head (a sentence-embedding base encoder): the `hidden` depth
score, `auto` score selection, width cuts, and `distill shrink` on such a model.

The oracle for `hidden` is the one of tests/test_importance.py: a block made an exact identity
on the residual stream (attention output and MLP down-projection zeroed, so the post-LN block
computes LN(LN(x + 0) + 0) = x for a fresh LayerNorm) changes nothing when skipped, so it must
rank least important. Every other block of a random model with peaked weights
(initializer_range 0.2) turns the hidden states enough to score clearly above it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (AutoModel, BertConfig, BertForSequenceClassification, BertModel,
                          LlamaConfig, LlamaForCausalLM)
from typer.testing import CliRunner

from conftest import write_tiny_bert
from distill.cli import app
from distill.errors import DistillError
from distill.compress.importance import (calibration_loss, depth_importance, resolve_score,
                                select_layers)
from distill.config.recipe import ShrinkStep
from distill.compress.depth import keep_layers
from distill.stages.shrink import cut

runner = CliRunner()
DEPTH, VOCAB, HIDDEN = 4, 100, 32
ALLOWED_HEADLESS = "allowed for it: auto, hidden, influence"


def tiny_base(seed: int = 0) -> BertModel:
    """A random BERT encoder without any head, like all-MiniLM-L6-v2 but tiny."""
    torch.manual_seed(seed)
    return BertModel(BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=DEPTH, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, initializer_range=0.2)).eval()


def make_identity(model: BertModel, index: int) -> None:
    """Zero block `index`'s output projections: the residual passes through unchanged."""
    block = model.encoder.layer[index]
    for linear in (block.attention.output.dense, block.output.dense):
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)


def batch(n: int = 8, seed: int = 0, labels: bool = False) -> dict[str, torch.Tensor]:
    """(n, 12) random ids, every third row right-padded from position 9 on."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[::3, 9:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if labels:  # what a classifier's calibration batch carries; a base model must ignore it
        out["labels"] = torch.arange(n) % 3
    return out


@pytest.mark.parametrize("index", [1, DEPTH - 1])
def test_hidden_score_ranks_an_identity_block_least_important(index: int) -> None:
    model = tiny_base()
    make_identity(model, index)
    batches = [batch(seed=1, labels=True), batch(seed=2)]
    scores = depth_importance(model, batches, method="hidden")
    assert len(scores) == DEPTH
    assert min(range(DEPTH), key=scores.__getitem__) == index, scores
    assert abs(scores[index]) < 1e-5
    assert min(s for i, s in enumerate(scores) if i != index) > 1e-3, scores
    # `auto` on a base model is `hidden`, so the default importance cut drops that block.
    assert resolve_score(model) == "hidden"
    kept = select_layers(model, DEPTH - 1, "importance", batches, score="auto")
    assert kept == [i for i in range(DEPTH) if i != index]


def test_hidden_score_is_the_output_change_of_the_cut_model() -> None:
    """Skipping by hook is exact: 1 − masked mean cos between the full model's last hidden
    state and that of `keep_layers` without the block."""
    model = tiny_base()
    b = batch(seed=3)
    mask = b["attention_mask"].float()
    with torch.no_grad():
        full = model(**b).last_hidden_state
        expected = []
        for i in range(DEPTH):
            small = keep_layers(model, [j for j in range(DEPTH) if j != i]).eval()
            cos = torch.cosine_similarity(full, small(**b).last_hidden_state, dim=-1)
            expected.append(float(((1 - cos) * mask).sum() / mask.sum()))
    assert depth_importance(model, [b], method="hidden") == pytest.approx(expected, abs=1e-5)


def test_influence_works_without_a_head() -> None:
    model = tiny_base()
    make_identity(model, 2)
    scores = depth_importance(model, [batch(labels=True)], method="influence")
    assert min(range(DEPTH), key=scores.__getitem__) == 2


def test_auto_is_loss_with_a_task_head_and_hidden_is_allowed_there_too() -> None:
    torch.manual_seed(0)
    clf = BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=DEPTH, num_attention_heads=4,
        intermediate_size=64, num_labels=3)).eval()
    lm = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=DEPTH, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64)).eval()
    assert resolve_score(clf) == resolve_score(lm) == "loss"
    assert [resolve_score(clf, s) for s in ("loss", "hidden", "influence")] == \
        ["loss", "hidden", "influence"]
    # `hidden` reads the base model's output, so a model with a head can use it as well.
    assert len(depth_importance(clf, [batch(labels=True)], method="hidden")) == DEPTH
    assert len(depth_importance(lm, [batch()], method="hidden")) == DEPTH


def test_loss_on_a_headless_model_is_a_clear_error() -> None:
    model = tiny_base()
    b = batch(labels=True)
    for call in (lambda: depth_importance(model, [b], method="loss"),
                 lambda: select_layers(model, 2, "importance", [b], score="loss"),
                 lambda: calibration_loss(model, [b]),
                 lambda: cut(model, ShrinkStep(layers=2), [b], "importance", "loss")):
        with pytest.raises(DistillError, match=rf"'loss' needs a task head.*BertModel has "
                                               rf"none.*{ALLOWED_HEADLESS}$"):
            call()
    with pytest.raises(DistillError, match="unknown; allowed: auto, loss, hidden, influence"):
        select_layers(model, 2, "importance", [b], score="mse")
    # uniform and top need no score: a headless model cuts with them as before.
    assert cut(model, ShrinkStep(layers=2), [], "uniform", "loss")[1] == {"kept_layers": [0, 2]}


def test_cut_in_depth_and_width_of_a_headless_model(tmp_path: Path) -> None:
    model = tiny_base()
    make_identity(model, 1)
    batches = [batch(seed=4, labels=True)]  # labels present: width scoring must ignore them
    step = ShrinkStep(layers=3, hidden=16, heads=2, intermediate=32)
    small, info = cut(model, step, batches)
    assert info == {"score": "hidden", "kept_layers": [0, 2, 3]}
    assert isinstance(small, BertModel)
    config = small.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.intermediate_size) == (3, 16, 2, 32)
    small.save_pretrained(tmp_path / "small")
    reloaded = AutoModel.from_pretrained(tmp_path / "small").eval()
    b = batch(seed=5)
    with torch.no_grad():
        expected, got = small.eval()(**b).last_hidden_state, reloaded(**b).last_hidden_state
    assert got.shape == (8, 12, 16)
    torch.testing.assert_close(got, expected)


def test_cli_shrinks_a_tiny_headless_model_and_names_the_score(tmp_path: Path) -> None:
    src = write_tiny_bert(tmp_path / "base")  # a BertModel (no head) with its tokenizer
    result = runner.invoke(app, ["shrink", str(src), "--out", str(tmp_path / "a"),
                                 "--layers", "3", "--examples", "4", "--max-length", "16"])
    assert result.exit_code == 0, result.output
    assert "kept layers (importance): [" in result.output
    assert "by score hidden" in result.output
    assert AutoModel.from_pretrained(tmp_path / "a").config.num_hidden_layers == 3
    result = runner.invoke(app, ["shrink", str(src), "--out", str(tmp_path / "b"),
                                 "--hidden", "16", "--heads", "2", "--intermediate", "32",
                                 "--examples", "4", "--max-length", "16"])
    assert result.exit_code == 0, result.output
    assert AutoModel.from_pretrained(tmp_path / "b").config.hidden_size == 16
    result = runner.invoke(app, ["shrink", str(src), "--out", str(tmp_path / "c"),
                                 "--layers", "3", "--score", "loss"])
    assert result.exit_code == 2
    assert "'loss' needs a task head" in result.output
    assert ALLOWED_HEADLESS in " ".join(result.output.split())  # the console may wrap it
    assert not (tmp_path / "c").exists()


@pytest.mark.integration
def test_cli_shrinks_the_builtin_sentence_embedding_model(tmp_path: Path) -> None:
    """The README's one-off cut of all-MiniLM-L6-v2 (a base encoder) works by default."""
    result = runner.invoke(app, ["shrink", "builtin:minilm-l6", "--layers", "3",
                                 "--out", str(tmp_path / "mini"), "--examples", "16",
                                 "--max-length", "32"])
    assert result.exit_code == 0, result.output
    assert "by score hidden" in result.output
    small = AutoModel.from_pretrained(tmp_path / "mini")
    assert type(small).__name__ == "BertModel" and small.config.num_hidden_layers == 3
