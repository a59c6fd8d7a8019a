"""Depth importance of each block on a calibration batch, and layer selection (METHODS.md §2).

    scores = depth_importance(model, batches, method="influence")   # one float per block
    layers = select_layers(model, keep=20, strategy="importance", batches=batches)
    student = keep_layers(model, layers)

Three scores, higher = more important (plus `auto`, which picks one, see `resolve_score`):

- `influence`: block influence `1 − cos(h_in, h_out)`, the mean over real tokens (attention
  mask 1) of the cosine between the hidden state entering and leaving the block. A block that
  barely turns the residual stream scores near 0. h_in / h_out are captured with forward hooks
  on the blocks themselves, not read from `output_hidden_states`: for Llama-family and GPT-2
  models the last entry of that tuple is taken *after* the final norm, which would make the
  last block look far more important than it is.
- `loss`: the calibration loss with the block skipped minus the loss of the full model
  (negative when skipping helps). A block is skipped by a forward hook that replaces its output
  hidden state with its input. That is exact: every other block sees precisely the inputs it
  would see in `keep_layers(model, all but i)` (rotary tables, masks and per-block attention
  types live outside the skipped block), so the loss is that of the cut model -- and it is fast,
  because no model copy is made (`keep_layers` deep-copies the whole model, 30 times for a
  30-layer model), and because the blocks before the skipped one are not run again: they see
  exactly the inputs of the full model's pass, so they replay the outputs recorded in it
  (`_each_skipped`; L(L+1)/2 block passes per batch for all L skips instead of L(L+1)). Needs
  a task head to have a loss: a sequence classifier or a causal LM.
- `hidden`: how much skipping the block (the same exact hook) changes the model's *output*,
  its final hidden states `last_hidden_state`: `1 − cos(h_full, h_skipped)` per token, the
  mean over real tokens. Needs no head and no labels, so it is the score of base models such
  as sentence-embedding encoders (all-MiniLM-L6-v2), whose output *is* the hidden states.
  Cosine rather than MSE because (a) embeddings are consumed by cosine similarity (after mean
  pooling and normalisation), so a change of direction is what hurts and a change of scale
  mostly does not; (b) it is scale-free, so it needs no normalising across models whose hidden
  states differ in size by orders of magnitude (a few massive outlier channels would dominate
  an MSE); (c) it is bounded (0..2) and reads like `influence`. Compared per token, not per
  pooled sentence vector, so it holds for any pooling (mean, CLS, last token). Replays the
  blocks before the skipped one as `loss` does.

Loss: cross-entropy against the batch's `labels` for sequence classifiers (MSE for a
one-output regression head); next-token cross-entropy for causal LMs (labels = `labels` or the
input ids, padding ignored), token-weighted over all batches, in float32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from distill.arch import num_layers, present_stacks
from distill.errors import DistillError
from distill.tasks.perplexity import next_token_labels
from distill.kd.token_losses import IGNORE_INDEX, token_nll
from distill.compress.depth import evenly_spaced

STRATEGIES: tuple[str, ...] = ("uniform", "top", "importance")
# What `depth_importance` computes; `SCORE_CHOICES` adds `auto` (see `resolve_score`).
SCORES: tuple[str, ...] = ("loss", "hidden", "influence")
SCORE_CHOICES: tuple[str, ...] = ("auto", *SCORES)

Batch = dict[str, torch.Tensor]
T = TypeVar("T")
_UNSET = object()  # no instance-level attribute


def resolve_score(model: PreTrainedModel, score: str = "auto") -> str:
    """The depth score `score` means for `model`: `auto` becomes `loss` when the model has a
    task head to compute a loss with (`loss_head`), else `hidden`; the others are checked.

    Raises:
        DistillError: an unknown score, or `loss` for a model without a supported head (the
            message names the scores that do work for it).
    """
    if score not in SCORE_CHOICES:
        raise DistillError(f"importance score {score!r} is unknown; allowed: "
                           + ", ".join(SCORE_CHOICES))
    head = loss_head(model)
    if score == "auto":
        return "loss" if head is not None else "hidden"
    if score == "loss" and head is None:
        raise DistillError(f"importance score 'loss' needs a task head to compute a loss "
                           f"(a sequence classifier or a causal LM); {type(model).__name__} "
                           "has none (a base model such as a sentence-embedding encoder, or "
                           "another head); allowed for it: auto, hidden, influence")
    return score


def loss_head(model: PreTrainedModel) -> str | None:
    """`"classifier"` or `"causal-lm"`: the task heads whose loss the `loss` score can compute;
    None for base models (`BertModel`, `LlamaModel`) and other heads (masked LM, ...)."""
    if type(model).__name__.endswith("ForSequenceClassification"):
        return "classifier"
    if _is_causal_lm(model):
        return "causal-lm"
    return None


def depth_importance(model: PreTrainedModel, batches: Iterable[Batch],
                     method: str = "influence") -> list[float]:
    """Importance of each block of the model's layer stack (higher = keep it).

    Args:
        model: a single-stack model whose stack `distill.arch` finds (encoder or decoder,
            with a classifier head, an LM head or none); run in eval mode, gradients off, and
            left in its previous mode.
        batches: calibration batches: `input_ids` (B, T), `attention_mask` (B, T) optional,
            `labels` ((B,) for classifiers; optional (B, T) for causal LMs; only `loss` reads
            them), plus any other model inputs (`token_type_ids`, ...). Read once for
            `influence`, L + 1 times for `loss` and `hidden`, so an iterator is materialised
            first.
        method: "influence", "loss", "hidden" or "auto" (see the module docstring and
            `resolve_score`).

    Returns:
        L floats, index i = block i.

    Raises:
        DistillError: unknown method, `loss` without a supported head, no batches, an
            encoder–decoder model, or a classifier batch without labels (loss method).
    """
    method = resolve_score(model, method)
    blocks = _single_stack(model)
    batches = list(batches)
    if not batches:
        raise DistillError("importance needs at least one calibration batch; got none")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if method == "influence":
                return _influence(model, blocks, batches)
            if method == "hidden":
                return _hidden_change(model, blocks, batches)
            return _loss_increase(model, blocks, batches)
    finally:
        model.train(was_training)


def select_layers(model: PreTrainedModel, keep: int, strategy: str = "uniform",
                  batches: Iterable[Batch] | None = None, score: str = "influence"
                  ) -> list[int]:
    """Which `keep` of the model's L blocks a depth cut keeps, in ascending order.

    Args:
        model: the teacher (for T5, `uniform` and `top` pick the encoder's indices).
        keep: number of blocks to keep, 1..L.
        strategy: `uniform` (evenly spaced, `distill.compress.depth.evenly_spaced`), `top` (drop
            the top blocks: keep 0..keep-1), or `importance` (the `keep` blocks with the
            highest `score`, see `depth_importance`).
        batches: calibration batches; required for `importance`.
        score: "influence", "loss", "hidden" or "auto", for `importance`.

    Raises:
        DistillError: `keep` not an integer in 1..L, unknown strategy or score, `loss` for a
            model without a supported head, or `importance` without batches.
    """
    total = num_layers(model)
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= total:
        raise DistillError(f"keep: {keep!r} is not a layer count the model allows; it has "
                           f"{total} layers, allowed: an integer 1..{total}")
    if strategy == "uniform":
        return evenly_spaced(keep, total)
    if strategy == "top":
        return list(range(keep))
    if strategy == "importance":
        score = resolve_score(model, score)  # before the batches: the clearer error first
        if batches is None:
            raise DistillError("strategy 'importance' needs calibration batches to score "
                               "the layers; pass batches, or use 'uniform' or 'top'")
        return most_important(depth_importance(model, batches, score), keep)
    raise DistillError(f"layer selection strategy {strategy!r} is unknown; allowed: "
                       + ", ".join(STRATEGIES))


def most_important(scores: list[float], keep: int) -> list[int]:
    """Indices of the `keep` highest scores, in ascending index order (the order the blocks
    run in). Ties go to the lower index, so the choice is deterministic."""
    if not 1 <= keep <= len(scores):
        raise DistillError(f"keep: {keep} out of range; allowed 1..{len(scores)}")
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(ranked[:keep])


@torch.no_grad()
def calibration_loss(model: PreTrainedModel, batches: Iterable[Batch]) -> float:
    """Mean loss over `batches`, weighted by predictions (examples or tokens), in float32.

    The model is run as it is (call `model.eval()` first to switch dropout off).

    Raises:
        DistillError: the model has no head with a loss (see `loss_head`), or nothing to
            predict.
    """
    if loss_head(model) is None:
        resolve_score(model, "loss")  # raises the error that names the scores that do work
    total, count = 0.0, 0
    for batch in batches:
        loss_sum, n = _batch_loss(model, batch)
        total += float(loss_sum.double())
        count += n
    if count == 0:
        raise DistillError("the calibration batches hold nothing to predict (all labels "
                           "masked)")
    return total / count


# --- internals ------------------------------------------------------------------------------

def _single_stack(model: PreTrainedModel) -> nn.ModuleList:
    stacks = present_stacks(model)
    if len(stacks) != 1:
        raise DistillError(f"importance scores need a model with one layer stack; "
                           f"{type(model).__name__} has {len(stacks)} (encoder–decoder); "
                           "use strategy 'uniform' or 'top'")
    return stacks[0][1]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _is_causal_lm(model: PreTrainedModel) -> bool:
    return bool(model.can_generate()) and not model.config.is_encoder_decoder


def _inputs(model: PreTrainedModel, batch: Batch) -> dict[str, Any]:
    """The batch's model inputs on the model's device, labels withheld (the loss is ours, in
    float32, and a base model's forward takes no `labels`); a decoder is told to keep no KV
    cache (nothing is generated, and `_each_skipped` needs blocks without side effects)."""
    device = _device(model)
    inputs: dict[str, Any] = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    if _is_causal_lm(model):
        inputs["use_cache"] = False
    return inputs


def _forward(model: PreTrainedModel, batch: Batch) -> torch.Tensor:
    """The logits of a model with a task head: (B, C) for classifiers, (B, T, V) for LMs."""
    return model(**_inputs(model, batch)).logits


def _final_hidden(model: PreTrainedModel, batch: Batch) -> torch.Tensor:
    """(B, T, d) final hidden states: `last_hidden_state` of the base model.

    The base model is called directly, head or not: its output is what every head reads and
    what an embedding model returns, and skipping the head saves a vocabulary projection."""
    output = model.base_model(**_inputs(model, batch))
    return output[0]  # last_hidden_state, whatever the output class


def _batch_loss(model: PreTrainedModel, batch: Batch) -> tuple[torch.Tensor, int]:
    """(summed loss, number of predictions) of one batch."""
    logits = _forward(model, batch)
    if logits.dim() == 3 and _is_causal_lm(model):
        return token_nll(logits, next_token_labels(batch))
    labels = batch.get("labels")
    if labels is None:
        raise DistillError("the 'loss' importance score of a classifier needs 'labels' in "
                           "the calibration batches; add them or use score 'hidden' or "
                           "'influence'")
    labels = labels.to(logits.device)
    logits = logits.float()
    if logits.dim() == 2 and logits.shape[-1] == 1 and labels.is_floating_point():
        # One-output regression head (problem_type "regression").
        return F.mse_loss(logits.squeeze(-1), labels.float(), reduction="sum"), labels.numel()
    flat, target = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    loss = F.cross_entropy(flat, target, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((target != IGNORE_INDEX).sum())


def _hidden_in(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden state a block was called with: its first positional argument in every
    supported family, `hidden_states=` as a fallback."""
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(output: Any) -> torch.Tensor:
    """The hidden state a block returns: the tensor itself, or the first item of a tuple."""
    return output if isinstance(output, torch.Tensor) else output[0]


def _as_output(like: Any, hidden: torch.Tensor) -> Any:
    """`hidden` in the structure of the block output `like`: the tensor itself, or `like`'s
    tuple with its first item replaced."""
    if isinstance(like, torch.Tensor):
        return hidden
    return (hidden, *like[1:])


def _each_skipped(blocks: nn.ModuleList, run: Callable[[], T],
                  consume: Callable[[int, T], None]) -> T:
    """`run()` on the full model, then once per block i with block i skipped (the identity
    on the residual stream), handing each result to `consume(i, result)`; returns the full
    model's result.

    With block i skipped, blocks 0..i-1 see exactly the inputs they saw in the full pass, so
    they are not run again: their `forward` is swapped, for that call only, for one that
    returns the output recorded in the full pass (the same tensors a recomputation would give,
    bit for bit). Skipping block i costs the blocks after it plus the embeddings and head:
    L(L+1)/2 block passes for all L skips instead of L(L+1). `run` must not make blocks
    write state (pass `use_cache=False` to decoders: a KV cache would miss the replayed
    layers).
    """
    outputs: list[Any] = [None] * len(blocks)

    def recorder(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            outputs[index] = output
        return hook

    handles = [block.register_forward_hook(recorder(i)) for i, block in enumerate(blocks)]
    try:
        full = run()
    finally:
        for handle in handles:
            handle.remove()
    for i in range(len(blocks)):
        patched = list(blocks)[:i + 1]
        # An instance-level `forward` (accelerate's device hooks set one) is put back as it was.
        saved = [block.__dict__.get("forward", _UNSET) for block in patched]
        for j, block in enumerate(patched[:i]):
            block.forward = functools.partial(_replay, outputs[j])
        patched[i].forward = functools.partial(_identity, outputs[i])
        try:
            consume(i, run())
        finally:
            for block, forward in zip(patched, saved):
                if forward is _UNSET:
                    del block.forward
                else:
                    block.forward = forward
    return full


def _replay(output: Any, *args: Any, **kwargs: Any) -> Any:
    """A block's `forward` that returns its recorded `output` whatever it is called with."""
    return output


def _identity(like: Any, *args: Any, **kwargs: Any) -> Any:
    """A block's `forward` that passes its input hidden state through, shaped as `like`."""
    return _as_output(like, _hidden_in(args, kwargs))


def _loss_increase(model: PreTrainedModel, blocks: nn.ModuleList,
                   batches: list[Batch]) -> list[float]:
    """Per block: the calibration loss with it skipped minus the full model's loss.

    Batch-outer, block-inner (see `_each_skipped`), so one batch's recorded block outputs are
    held at a time; sums are token- (or example-) weighted over all batches, in float64."""
    skipped = [0.0] * len(blocks)
    total, count = 0.0, 0

    def add(i: int, result: tuple[torch.Tensor, int]) -> None:
        skipped[i] += float(result[0].double())

    for batch in batches:
        loss_sum, n = _each_skipped(blocks, lambda: _batch_loss(model, batch), add)
        total += float(loss_sum.double())
        count += n
    if count == 0:
        raise DistillError("the calibration batches hold nothing to predict (all labels "
                           "masked)")
    return [s / count - total / count for s in skipped]


def _influence(model: PreTrainedModel, blocks: nn.ModuleList,
               batches: list[Batch]) -> list[float]:
    """1 − mean cos(h_in, h_out) per block, averaged over the real tokens of all batches."""
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    mask: torch.Tensor | None = None  # (B, T) of the batch in flight, set before each forward

    def recorder(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                 output: Any) -> None:
            h_in, h_out = _hidden_in(args, kwargs).float(), _hidden_out(output).float()
            cos = F.cosine_similarity(h_in, h_out, dim=-1)  # (B, T)
            sums[index] += (cos * mask.to(cos.device)).sum().double().cpu()
        return hook

    handles = [block.register_forward_hook(recorder(i), with_kwargs=True)
               for i, block in enumerate(blocks)]
    tokens = 0
    try:
        for batch in batches:
            ids = batch["input_ids"]
            mask = batch.get("attention_mask", torch.ones_like(ids)).float()
            tokens += int(mask.sum())
            _final_hidden(model, batch)  # the hooks record; the head (if any) is not needed
    finally:
        for handle in handles:
            handle.remove()
    if tokens == 0:
        raise DistillError("the calibration batches hold no real tokens (attention mask all 0)")
    return (1.0 - sums / tokens).tolist()


def _hidden_change(model: PreTrainedModel, blocks: nn.ModuleList,
                   batches: list[Batch]) -> list[float]:
    """1 − mean cos(h_full, h_skipped) of the final hidden states, per skipped block.

    The loop runs batch-outer, block-inner (`_each_skipped`) so that only one batch's
    full-model output (B, T, d) is held at a time, however many calibration batches there are.
    """
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    tokens = 0
    for batch in batches:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask", torch.ones_like(ids)).float()  # (B, T)
        tokens += int(mask.sum())
        full: torch.Tensor | None = None  # (B, T) float32, set by the full pass

        def add(i: int, skipped: torch.Tensor) -> None:
            cos = F.cosine_similarity(full, skipped, dim=-1)  # (B, T)
            sums[i] += ((1.0 - cos) * mask.to(cos.device)).sum().double().cpu()

        def run() -> torch.Tensor:
            nonlocal full
            out = _final_hidden(model, batch).float()  # (B, T, d)
            if full is None:
                full = out
            return out

        _each_skipped(blocks, run, add)
    if tokens == 0:
        raise DistillError("the calibration batches hold no real tokens (attention mask all 0)")
    return (sums / tokens).tolist()
