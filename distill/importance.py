"""Depth importance of each block on a calibration batch, and layer selection (METHODS.md §2).

    scores = depth_importance(model, batches, method="influence")   # one float per block
    layers = select_layers(model, keep=20, strategy="importance", batches=batches)
    student = keep_layers(model, layers)

Two scores, higher = more important:

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
  30-layer model). The skipped block still computes its output, which is then thrown away;
  that costs 1/L of each forward, less than a copy would.

Loss: cross-entropy against the batch's `labels` for sequence classifiers (MSE for a
one-output regression head); next-token cross-entropy for causal LMs (labels = `labels` or the
input ids, padding ignored), token-weighted over all batches, in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from distill.arch import num_layers, present_stacks
from distill.errors import DistillError
from distill.perplexity import IGNORE_INDEX, next_token_labels, token_nll
from distill.shrinking import evenly_spaced

STRATEGIES: tuple[str, ...] = ("uniform", "top", "importance")
SCORES: tuple[str, ...] = ("influence", "loss")

Batch = dict[str, torch.Tensor]


def depth_importance(model: PreTrainedModel, batches: Iterable[Batch],
                     method: str = "influence") -> list[float]:
    """Importance of each block of the model's layer stack (higher = keep it).

    Args:
        model: a single-stack model of a family in `distill.arch` (encoder classifier or
            causal LM); run in eval mode, gradients off, and left in its previous mode.
        batches: calibration batches: `input_ids` (B, T), `attention_mask` (B, T) optional,
            `labels` ((B,) for classifiers; optional (B, T) for causal LMs), plus any other
            model inputs (`token_type_ids`, ...). Read once for `influence`, L + 1 times for
            `loss`, so an iterator is materialised first.
        method: "influence" or "loss" (see the module docstring).

    Returns:
        L floats, index i = block i.

    Raises:
        DistillError: unknown method, no batches, an encoder–decoder model, or a classifier
            batch without labels (loss method).
    """
    if method not in SCORES:
        raise DistillError(f"importance score {method!r} is unknown; allowed: "
                           + ", ".join(SCORES))
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
            base = calibration_loss(model, batches)
            scores = []
            for block in blocks:
                handle = block.register_forward_hook(_skip_block, with_kwargs=True)
                try:
                    scores.append(calibration_loss(model, batches) - base)
                finally:
                    handle.remove()
            return scores
    finally:
        model.train(was_training)


def select_layers(model: PreTrainedModel, keep: int, strategy: str = "uniform",
                  batches: Iterable[Batch] | None = None, score: str = "influence"
                  ) -> list[int]:
    """Which `keep` of the model's L blocks a depth cut keeps, in ascending order.

    Args:
        model: the teacher (for T5, `uniform` and `top` pick the encoder's indices).
        keep: number of blocks to keep, 1..L.
        strategy: `uniform` (evenly spaced, `distill.shrinking.evenly_spaced`), `top` (drop
            the top blocks: keep 0..keep-1), or `importance` (the `keep` blocks with the
            highest `score`, see `depth_importance`).
        batches: calibration batches; required for `importance`.
        score: "influence" or "loss", for `importance`.

    Raises:
        DistillError: `keep` not an integer in 1..L, unknown strategy or score, or
            `importance` without batches.
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
        if score not in SCORES:
            raise DistillError(f"importance score {score!r} is unknown; allowed: "
                               + ", ".join(SCORES))
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
    """
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


def _forward(model: PreTrainedModel, batch: Batch) -> torch.Tensor:
    """The model's logits for a batch, labels withheld (the loss is ours, in float32)."""
    device = _device(model)
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    return model(**inputs).logits


def _batch_loss(model: PreTrainedModel, batch: Batch) -> tuple[torch.Tensor, int]:
    """(summed loss, number of predictions) of one batch."""
    logits = _forward(model, batch)
    if logits.dim() == 3 and _is_causal_lm(model):
        return token_nll(logits, next_token_labels(batch))
    labels = batch.get("labels")
    if labels is None:
        raise DistillError("the 'loss' importance score of a classifier needs 'labels' in "
                           "the calibration batches; add them or use score 'influence'")
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


def _skip_block(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                output: Any) -> Any:
    """Forward hook making a block the identity on the residual stream (same output shape)."""
    h_in = _hidden_in(args, kwargs)
    if isinstance(output, torch.Tensor):
        return h_in
    return (h_in, *output[1:])


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
            _forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    if tokens == 0:
        raise DistillError("the calibration batches hold no real tokens (attention mask all 0)")
    return (1.0 - sums / tokens).tolist()
