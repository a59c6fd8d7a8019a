"""Activation importance of heads, MLP neurons and hidden channels (Minitron, METHODS.md §2).

Scores come from forward hooks on a calibration batch; nothing in the model is changed. A
unit's score is the mean size of what it writes, so that a unit whose output is switched off
anywhere on its path ranks last:

- head `h`: the L2 norm of its output *after* its slice of the output projection,
  `||ctx_h @ W_O[:, h]ᵀ||` — the head's contribution to the residual stream. Minitron's
  pre-projection norm `||ctx_h||` would miss a head whose O columns are zero, and it changes
  under the V/O rescaling `W_V·a, W_O/a`, which leaves the model's function unchanged;
- neuron `i`: `mean|a_i| · ||W_down[:, i]||` with `a` the intermediate activation (the input
  of the down projection): again the size of its contribution, `|a_i|·||W_down[:, i]||`;
- hidden channel `c`: `mean|LN(x)_c|`, summed over every hidden-sized norm of the model (the
  normalised hidden states, which is what every sub-layer and head reads).

Means are over the real tokens of the batch (padding, by `attention_mask`, excluded).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from distill.arch import (
    Attention,
    Stack,
    base_prefix,
    dims,
    find,
    is_norm,
    outside_modules,
    present_stacks,
    require_width,
)


@dataclass
class LayerImportance:
    """Scores of one block.

    Attributes:
        heads: [num_heads] self-attention heads, in the model's head order.
        neurons: [intermediate_size] MLP neurons.
        cross_heads: [num_heads] cross-attention heads (decoders of encoder–decoder models),
            else None.
    """

    heads: Tensor
    neurons: Tensor
    cross_heads: Tensor | None = None

    def groups(self, num_kv_heads: int, cross: bool = False) -> Tensor:
        """[num_kv_heads] scores of the key/value groups: the sum over each group's query
        heads (query head `h` reads K/V head `h // (num_heads / num_kv_heads)`)."""
        scores = self.cross_heads if cross else self.heads
        assert scores is not None, "this block has no cross-attention"
        return scores.view(num_kv_heads, -1).sum(-1)


@dataclass
class WidthImportance:
    """Width importance of a whole model.

    Attributes:
        stacks: per stack name ("layers", or "encoder" / "decoder"), one entry per block.
        channels: [hidden_size] hidden channels.
        tokens: number of (unpadded) tokens of the first stack that were seen.
    """

    stacks: dict[str, list[LayerImportance]]
    channels: Tensor
    tokens: int


def attentions(stack: Stack, block: nn.Module) -> Iterator[tuple[bool, Attention]]:
    """(is_cross, names) of each attention sub-layer present in `block`."""
    assert stack.attention is not None, "require_width() first"
    yield False, stack.attention
    cross = stack.cross_attention
    if cross is not None and find(block, cross.module) is not None:
        yield True, cross


def hidden_norms(model: nn.Module) -> dict[nn.Module, str]:
    """Every norm of the base model whose weight spans the hidden size (per-block norms,
    final and embedding norms; not an embedding norm over a narrower embedding size), with
    the name of the stack whose tokens it normalises: a norm outside the blocks belongs to
    the stack it sits beside (a decoder's embedding and final norms), else to the first."""
    info = require_width(model)
    hidden = dims(model, info).hidden_size
    stacks = present_stacks(model, info)
    found: dict[nn.Module, str] = {}

    def add(module: nn.Module | None, owner: str) -> None:
        weight = getattr(module, "weight", None)
        if weight is not None and tuple(weight.shape) == (hidden,) and module not in found:
            found[module] = owner

    prefix = base_prefix(model)
    for path, module in outside_modules(model, info).items():
        if not path.startswith(prefix) or not is_norm(module):
            continue  # task and LM heads are not the residual stream
        inner = path[len(prefix):]
        owner = next((s.name for s, _ in stacks
                      if inner.startswith(s.path.rpartition(".")[0] + ".")
                      and s.path.rpartition(".")[0]), stacks[0][0].name)
        add(module, owner)
    for stack, blocks in stacks:
        for block in blocks:
            for path in stack.norms:
                add(find(block, path), stack.name)
    return found


def out_columns(linear: nn.Module) -> Tensor:
    """The weight of a projection as [out, in] (`Conv1D` stores the transpose)."""
    return linear.weight.t() if isinstance(linear, Conv1D) else linear.weight


class _Mean:
    """Running token-weighted mean of per-unit values."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.weight = 0.0

    def add(self, values: Tensor, mask: Tensor | None) -> None:
        """values: [B, S, U] (or [B*S, U]); mask: [B, S] of 0/1 or None (all tokens count)."""
        # Some models flatten batch and sequence inside a block (OPT): [B*S, U].
        values = values.detach().double().reshape(-1, values.shape[-1])
        if mask is None or mask.numel() != values.shape[0]:
            mask = torch.ones(values.shape[0], dtype=torch.float64, device=values.device)
        mask = mask.reshape(-1).to(values.device, torch.float64)
        total = torch.einsum("nu,n->u", values, mask).cpu()
        self.total = total if self.total is None else self.total + total
        self.weight += float(mask.sum())

    def mean(self) -> Tensor:
        assert self.total is not None, "a hooked module never ran: no calibration batch?"
        return (self.total / max(self.weight, 1.0)).float()


@torch.no_grad()
def width_importance(model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> WidthImportance:
    """Score heads, neurons and hidden channels of `model` on calibration batches.

    Args:
        model: a model of a supported family; run in eval mode without gradients, restored to
            its training mode afterwards, otherwise untouched. With a task head or without
            one (a base model such as a sentence-embedding encoder): the scores read
            activations only, never logits or a loss.
        batches: dicts of model inputs ([B, S] `input_ids`, `attention_mask`, and
            `decoder_input_ids` / `decoder_attention_mask` for T5); `labels` reach only a
            model whose forward takes them.

    Returns:
        The scores (see the module docstring); higher means more important.
    """
    info = require_width(model)
    d = dims(model, info)
    stacks = present_stacks(model, info)
    masks: dict[str, Tensor | None] = {}  # the current batch's token mask per stack
    handles = []
    heads: dict[tuple[str, int, bool], _Mean] = {}
    neurons: dict[tuple[str, int], _Mean] = {}
    channels: list[_Mean] = []

    def head_hook(name: str, o_proj: nn.Module, acc: _Mean):
        def hook(_: nn.Module, args: tuple[Tensor, ...]) -> None:
            ctx = args[0]  # [B, S, heads*head_dim] (or [B*S, ...]), heads concatenated
            w = out_columns(o_proj).detach().double()  # [hidden, heads*head_dim]
            w = w.view(w.shape[0], -1, d.head_dim).transpose(0, 1)  # [heads, hidden, hd]
            gram = w.transpose(1, 2) @ w  # [heads, hd, hd]: ||c Wᵀ||² = c G cᵀ
            c = ctx.double().reshape(-1, w.shape[0], d.head_dim)  # [tokens, heads, hd]
            sq = torch.einsum("nhd,hde,nhe->nh", c, gram, c)
            acc.add(sq.clamp_min(0).sqrt(), masks.get(name))
        return hook

    def neuron_hook(name: str, acc: _Mean):
        def hook(_: nn.Module, args: tuple[Tensor, ...]) -> None:
            acc.add(args[0].abs(), masks.get(name))  # [B, S, intermediate]
        return hook

    def channel_hook(name: str, acc: _Mean):
        def hook(_: nn.Module, __: tuple, out: Tensor) -> None:
            acc.add(out.abs(), masks.get(name))  # [B, S, hidden]
        return hook

    downs: dict[tuple[str, int], nn.Module] = {}
    for stack, blocks in stacks:
        for i, block in enumerate(blocks):
            for cross, names in attentions(stack, block):
                o_proj = find(block, names.o)
                assert o_proj is not None
                acc = heads[stack.name, i, cross] = _Mean()
                handles.append(o_proj.register_forward_pre_hook(
                    head_hook(stack.name, o_proj, acc)))
            assert stack.mlp is not None and stack.mlp.down is not None
            down = downs[stack.name, i] = find(block, stack.mlp.down)
            acc = neurons[stack.name, i] = _Mean()
            handles.append(down.register_forward_pre_hook(neuron_hook(stack.name, acc)))
    for norm, owner in hidden_norms(model).items():
        channels.append(_Mean())
        handles.append(norm.register_forward_hook(channel_hook(owner, channels[-1])))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    first = stacks[0][0].name
    # A base model (no task head) has no `labels` argument: a labelled calibration batch would
    # crash it, so labels go only to models that take them (T5 builds its decoder inputs
    # from them when the batch has none; a classifier just computes an unused loss).
    takes_labels = "labels" in inspect.signature(model.forward).parameters
    try:
        for batch in batches:
            batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()
                     if k != "labels" or takes_labels}
            masks.clear()
            masks[first] = batch.get("attention_mask")
            masks["decoder"] = batch.get("decoder_attention_mask")
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    result: dict[str, list[LayerImportance]] = {}
    for stack, blocks in stacks:
        layers = []
        for i in range(len(blocks)):
            # Contribution of neuron i: |a_i| times the norm of its down-projection column.
            col = out_columns(downs[stack.name, i]).detach().float().norm(dim=0).cpu()
            cross = heads.get((stack.name, i, True))
            layers.append(LayerImportance(heads[stack.name, i, False].mean(),
                                          neurons[stack.name, i].mean() * col,
                                          cross.mean() if cross is not None else None))
        result[stack.name] = layers
    total = torch.stack([c.mean() for c in channels]).sum(0)
    return WidthImportance(result, total, int(neurons[first, 0].weight))
