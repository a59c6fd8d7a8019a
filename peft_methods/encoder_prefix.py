"""Encoder prefixes for T5-family encoder–decoder models: prefix tuning's `encoder_prefix=True`.

METHODS.md §3 gives the encoder and the decoder of an encoder–decoder model separate prefixes;
PEFT 0.21.2 prefixes only the decoder (see prefix_tuning.py). With `encoder_prefix=True` the
self-attention of every encoder layer also gets its own `m` learned keys and values, from a
separate table `[m, L_enc·2·w]` (row j: layer 0 key, layer 0 value, layer 1 key, ...;
`w = num_heads × d_kv`, the encoder attention's `inner_dim`; L_enc = encoder layers).

How they get in. T5's encoder stack drops any cache, so the prefixes cannot travel in the
KV cache like the decoder's. Instead, for the duration of one forward/generate call
(`encoder_prefixes`, a context manager) every encoder `T5Attention`
(`encoder.block[i].layer[0].SelfAttention`) gets a forward pre-hook that rewrites its
arguments, so T5's own attention code does the rest:

- the cache (`cache`, or `past_key_values` before transformers 5.24): a `PrefixKV` holding
  layer i's prefix. T5Attention concatenates it in
  front of the tokens' keys/values (`update`), exactly as it does with a decoder cache, so the
  keys are `[P_k ; K]` and the values `[P_v ; V]` (length m + n). Nothing is stored.
- `mask`: the encoder's 4-d mask `[b, 1, n, n]` (bool for sdpa, additive float for eager, None
  without padding) gets m "visible" columns in front: every real token attends to the
  prefixes. The prefixes are keys/values only — no query rows — so they attend to nothing.
- `position_bias`: T5 adds a relative position bias to the scores. The prefixes have no
  position, so their columns get a bias of exactly 0 and the token columns keep T5's usual
  bias (computed for the n tokens alone, so real tokens see the same relative positions as
  without prefixes):  scores = [q·P_k ; q·K] + [0 ; bias(n, n)] (T5 does not scale by √d).
  Layer 0 builds this `[1, H, n, m + n]` bias; T5 passes it on to the other layers as usual.
  (Letting T5 compute the bias with the prefix as "past" tokens would instead place the
  prefixes at positions -m..-1 before the sentence and give them a query-dependent bias.)

Outside that context the model is untouched (no hooks stay registered), like the decoder
prefixes, which also only exist inside `AdaptedModel.forward/generate`. Eager and sdpa
attention are supported (flex attention's block masks are not).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from peft_methods.base import PeftMethodError
from peft_methods.kv_cache import SPELLED, cache_arg, given_cache

ATTENTION_PARTS = ("q", "k", "v", "o", "n_heads", "key_value_proj_dim", "compute_bias",
                   "has_relative_attention_bias")


def encoder_attentions(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every encoder layer of a T5-family model; a clear error
    for any other model."""
    what = f"encoder_prefix on {type(model).__name__}"
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise PeftMethodError(f"{what}: encoder prefixes need an encoder–decoder model "
                              f"(T5 family, task SEQ_2_SEQ_LM); this model has no separate "
                              f"encoder — leave encoder_prefix false")
    encoder = model.get_encoder() if hasattr(model, "get_encoder") else None
    blocks = getattr(encoder, "block", None)
    try:
        found = [block.layer[0].SelfAttention for block in blocks]
    except (AttributeError, IndexError, TypeError):
        found = []
    if not found or not all(all(hasattr(a, p) for p in ATTENTION_PARTS) for a in found):
        raise PeftMethodError(f"{what}: only T5-family encoders (encoder.block[i].layer[0]."
                              f"SelfAttention with a relative position bias) are supported")
    if not all(cache_arg(a) for a in found):
        raise PeftMethodError(f"{what}: the encoder attention takes no KV cache ({SPELLED})")
    shapes = {(a.n_heads, a.key_value_proj_dim) for a in found}
    if len(shapes) != 1:
        raise PeftMethodError(f"{what}: encoder layers with different attention shapes "
                              f"{sorted(shapes)} are not supported")
    return found


def encoder_dims(model: nn.Module) -> tuple[int, int, int]:
    """(encoder layers, heads, head dim) of a T5-family model."""
    attentions = encoder_attentions(model)
    return len(attentions), attentions[0].n_heads, attentions[0].key_value_proj_dim


class PrefixKV:
    """Stands in for the cache T5Attention reads (`get_seq_length`, `update`): `update`
    returns the layer's prefix in front of the tokens' keys and values, storing nothing."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values  # [b, H, m, head_dim]

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.keys.shape[-2]

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int | None = None,
               *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.cat((self.keys.to(keys.dtype), keys), dim=-2),
                torch.cat((self.values.to(values.dtype), values), dim=-2))


def extend_encoder_mask(mask: torch.Tensor | None, m: int) -> torch.Tensor | None:
    """[..., n] -> [..., m + n]: the prefix columns are visible (True / additive 0)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise PeftMethodError(f"encoder_prefix supports eager and sdpa attention; got a "
                              f"{type(mask).__name__} mask (flex attention?)")
    shape = (*mask.shape[:-1], m)
    pad = mask.new_ones(shape) if mask.dtype == torch.bool else mask.new_zeros(shape)
    return torch.cat((pad, mask), dim=-1)


def prefix_position_bias(attention: nn.Module, bias: torch.Tensor | None, n: int, m: int,
                         like: torch.Tensor) -> torch.Tensor:
    """The bias over [prefix ; tokens] columns: 0 for the m prefix columns, T5's bias for the
    n tokens. A bias already m + n wide (from layer 0) passes through."""
    if bias is not None and bias.shape[-1] == m + n:
        return bias
    if bias is None:
        if attention.has_relative_attention_bias:
            bias = attention.compute_bias(n, n, device=like.device)
        else:
            bias = like.new_zeros(1, attention.n_heads, n, n)
    zeros = bias.new_zeros(*bias.shape[:-1], m)
    return torch.cat((zeros, bias), dim=-1)


def layer_prefixes(table: torch.Tensor, layer: int, batch: int, heads: int, head_dim: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer `layer`'s keys and values from the table [m, L·2·H·head_dim], each
    [batch, H, m, head_dim]."""
    m, width = table.shape[0], heads * head_dim
    key = table[:, 2 * layer * width:(2 * layer + 1) * width]
    value = table[:, (2 * layer + 1) * width:(2 * layer + 2) * width]

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(m, heads, head_dim).transpose(0, 1).unsqueeze(0).expand(
            batch, -1, -1, -1)

    return split(key), split(value)


def _hook(layer: int, table: torch.Tensor):
    def hook(module: nn.Module, args: tuple, kwargs: dict):
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
        call = dict(bound.arguments)
        call.update(call.pop("kwargs", {}))
        if call.get("key_value_states") is not None:
            raise PeftMethodError("encoder_prefix: a hooked encoder attention was called as "
                                  "cross-attention")
        if given_cache(call) is not None:
            raise PeftMethodError("encoder_prefix: the encoder attention already got a cache")
        hidden = call.pop("hidden_states")
        batch, n = hidden.shape[:2]
        m = table.shape[0]
        keys, values = layer_prefixes(table.to(hidden.dtype), layer, batch, module.n_heads,
                                      module.key_value_proj_dim)
        call[cache_arg(module)] = PrefixKV(keys, values)
        call["mask"] = extend_encoder_mask(call.get("mask"), m)
        call["position_bias"] = prefix_position_bias(module, call.get("position_bias"), n, m,
                                                     hidden)
        return (hidden,), call
    return hook


@contextmanager
def encoder_prefixes(model: nn.Module, table: torch.Tensor) -> Iterator[None]:
    """Within this context every encoder self-attention of `model` (T5 family) sees the
    prefixes of `table` [m, L_enc·2·w] (see the module docstring)."""
    attentions = encoder_attentions(model)
    heads, head_dim = attentions[0].n_heads, attentions[0].key_value_proj_dim
    if table.shape[1] != len(attentions) * 2 * heads * head_dim:
        raise PeftMethodError(f"encoder_prefix: the table is {table.shape[1]} wide but "
                              f"{len(attentions)} encoder layers need "
                              f"{len(attentions) * 2 * heads * head_dim}")
    handles = [a.register_forward_pre_hook(_hook(i, table), with_kwargs=True)
               for i, a in enumerate(attentions)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
