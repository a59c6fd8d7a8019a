"""Architecture facts read from the model itself (issue: every common architecture).

`discover(model)` works on any model transformers builds, on the meta device too (it reads
module trees, parameter shapes and the config, never values):

- stacks: the outermost `ModuleList`s under `model.base_model` whose length is one of the
  config's layer counts (`num_hidden_layers`, `n_layer`, `encoder_layers`, ...) and whose blocks
  hold linear layers; two of them are the encoder and decoder of an encoder–decoder model;
- inside a block (`distill.arch.block`): the attention projections, MLP, norms;
- config keys: which attribute holds the hidden size, heads, key/value heads, head size and MLP
  width, each checked against the projection shapes;
- config lists indexed by layer (`layer_types`, ...): any list of a stack's length whose key
  names layers; and lists of layer indices (`mlp_only_layers`);
- block 0 built unlike the others (must stay first), final norms, the token embedding and LM
  head.

`OVERRIDES` holds the few facts a module tree does not show, per `config.model_type`.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from distill.arch.block import BlockParts, is_linear, is_norm, read_block
from distill.arch.layout import ArchInfo, Attention, ConfigKeys, Stack, find
from distill.errors import DistillError

# Facts the module tree does not show. GPT-NeoX and BLOOM reshape their fused QKV output to
# [heads, 3 × head_dim]: the parts are interleaved head by head, not stacked.
OVERRIDES: dict[str, dict[str, Any]] = {
    "gpt_neox": {"fused_per_head": True},
    "bloom": {"fused_per_head": True},
}

_LAYER_COUNT = re.compile(r"^(num_|n_)?(hidden_|encoder_|decoder_)?layers?$")
_LAYER_COUNT_ORDER = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers")
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "dim")
_HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads", "n_heads")
_KV_KEYS = ("num_key_value_heads", "num_kv_heads")
_HEAD_DIM_KEYS = ("head_dim", "d_kv")
_FFN_KEYS = ("intermediate_size", "n_inner", "d_ff", "ffn_dim", "hidden_dim", "ffn_hidden_size")
# (model class, config JSON) -> whether an explicit `head_dim` in the config is read.
_SETTABLE: dict[tuple[type, str], bool] = {}
_FINAL_NORMS = {"norm", "ln_f", "final_layer_norm", "final_norm", "final_layernorm"}


def discover(model: nn.Module) -> ArchInfo:
    """The layout of `model`, or a DistillError naming what was not found."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None) or type(model).__name__
    base = getattr(model, "base_model", None)
    if config is None or not isinstance(base, nn.Module):
        raise DistillError(f"{type(model).__name__} is not a transformers model (no config "
                           f"or base model); distill cuts transformers models")
    values = config.to_dict()
    found = _stack_lists(model, values, family)
    parts = [read_block(blocks[-1], blocks[0]) for _, _, blocks, _ in found]
    hidden = _hidden_width(model, found, parts)
    hidden_key = next((k for k in _HIDDEN_KEYS if values.get(k) == hidden), None)
    if hidden_key is None:
        raise DistillError(f"{family}: no config key holds the hidden size {hidden} (looked "
                           f"for {', '.join(_HIDDEN_KEYS)})")
    kv_key = next((k for k in _KV_KEYS if isinstance(values.get(k), int)), None)
    head_dim_key = next((k for k in _HEAD_DIM_KEYS if isinstance(values.get(k), int)), None)
    if head_dim_key is None and _head_dim_settable(model, hidden_key, found, parts):
        head_dim_key = "head_dim"
    stacks = []
    for (name, path, blocks, count_key), part in zip(found, parts):
        stacks.append(_stack(model, values, family, name, path, blocks, count_key, part,
                             hidden, kv_key, head_dim_key))
    return ArchInfo(family, tuple(stacks), ConfigKeys(hidden_key, kv_key, head_dim_key),
                    token_embedding=_path_of(model, model.get_input_embeddings()) or "",
                    lm_head=_path_of(model, _output_embeddings(model)))


def _stack_lists(model: nn.Module, values: dict[str, Any], family: str
                 ) -> list[tuple[str, str, nn.ModuleList, str]]:
    """(name, path from base_model, blocks, layer-count key) of each stack."""
    counts = {k: v for k, v in values.items() if _LAYER_COUNT.match(k) and isinstance(v, int)
              and not isinstance(v, bool)}
    lists: list[tuple[str, nn.ModuleList]] = []
    for path, module in model.base_model.named_modules():
        if (isinstance(module, nn.ModuleList) and len(module) and len(module) in counts.values()
                and not any(path.startswith(p + ".") for p, _ in lists)
                and len({type(b) for b in module}) == 1
                and any(is_linear(m) for m in module[0].modules())):
            lists.append((path, module))
    if not lists:
        wanted = ", ".join(f"{k}={v}" for k, v in counts.items()) or "none in the config"
        raise DistillError(f"{family}: no stack of blocks found in {type(model).__name__} (a "
                           f"ModuleList of transformer blocks as long as a layer count: "
                           f"{wanted})")
    two = len(lists) > 1
    result = []
    for path, blocks in lists:
        segments = path.split(".")
        name = ("decoder" if two and any("decoder" in s for s in segments) else
                "encoder" if two or (getattr(model.config, "is_encoder_decoder", False)
                                     and any("encoder" in s for s in segments)) else "layers")
        keys = [k for k, v in counts.items() if v == len(blocks)
                and (("decoder" in k) == (name == "decoder"))]
        keys.sort(key=lambda k: (_LAYER_COUNT_ORDER.index(k) if k in _LAYER_COUNT_ORDER
                                 else len(_LAYER_COUNT_ORDER)))
        if not keys:
            raise DistillError(f"{family}: no config key counts the {len(blocks)} blocks of "
                               f"{path}")
        result.append((name, path, blocks, keys[0]))
    return result


def _hidden_width(model: nn.Module, found: list[tuple[str, str, nn.ModuleList, str]],
                  parts: list[BlockParts]) -> int:
    """The residual-stream width: what a block's norms span (else the token embedding's,
    which differs from it only where an embedding projection exists, as in ELECTRA)."""
    for (_, _, blocks, _), part in zip(found, parts):
        for path in part.norms:
            weight = getattr(find(blocks[-1], path), "weight", None)
            if weight is not None and weight.dim() == 1:
                return int(weight.shape[0])
    return int(model.get_input_embeddings().weight.shape[1])


def _stack(model: nn.Module, values: dict[str, Any], family: str, name: str, path: str,
           blocks: nn.ModuleList, count_key: str, parts: BlockParts, hidden: int,
           kv_key: str | None, head_dim_key: str | None) -> Stack:
    prefix = f"{name}_" if name in ("encoder", "decoder") else None
    heads_key = next((k for k in ((f"{prefix}attention_heads",) if prefix else ()) + _HEAD_KEYS
                      if isinstance(values.get(k), int)), None)
    problems = list(parts.problems)
    if heads_key is None:
        problems.append(f"no config key holds the number of attention heads (looked for "
                        f"{', '.join(_HEAD_KEYS)})")
    attention = _override(family, parts.attention)
    cross = _override(family, parts.cross_attention)
    ffn_key, ratio = None, None
    if parts.mlp is not None and parts.mlp.down is not None:
        width = _in_features(find(blocks[-1], parts.mlp.down))
        candidates = ((f"{prefix}ffn_dim",) if prefix else ()) + _FFN_KEYS
        ffn_key = next((k for k in candidates if values.get(k) == width), None) or next(
            (k for k in candidates if k in values and values[k] is None), None)
        if ffn_key is None and width % hidden == 0:
            ratio = width // hidden  # no key: the model derives the width from the hidden size
        elif ffn_key is None:
            problems.append(f"no config key holds the MLP width {width} (looked for "
                            f"{', '.join(candidates)})")
    if heads_key and attention is not None:
        problems += _check_heads(blocks[-1], attention, values, heads_key, kv_key,
                                 head_dim_key, hidden)
    parent = path.rpartition(".")[0]
    finals = [n for n, m in model.base_model.named_modules()
              if is_norm(m) and n.rpartition(".")[0] == parent
              and n.rpartition(".")[2] in _FINAL_NORMS]
    mine = {k: v for k, v in values.items() if isinstance(v, list) and "layer" in k
            and (prefix is None or name in k)}
    keys = tuple(k for k, v in mine.items() if len(v) == len(blocks)
                 and all(isinstance(x, (str, int, float, bool)) or x is None for x in v))
    index_keys = tuple(k for k, v in mine.items() if k not in keys and all(
        isinstance(x, int) and not isinstance(x, bool) and 0 <= x < len(blocks) for x in v))
    return Stack(name=name, path=path, num_layers_key=count_key, heads_key=heads_key or "",
                 intermediate_key=ffn_key, intermediate_ratio=ratio, attention=attention,
                 mlp=parts.mlp, norms=parts.norms, final_norm=finals[0] if finals else None,
                 cross_attention=cross, per_layer_keys=keys, layer_index_keys=index_keys,
                 pinned_first=_first_differs(blocks, attention),
                 problems=tuple(problems))


def _head_dim_settable(model: nn.Module, hidden_key: str,
                       found: list[tuple[str, str, nn.ModuleList, str]],
                       parts: list[BlockParts]) -> bool:
    """Whether the model reads an explicit `head_dim` from its config when one is given
    (many derive it as hidden // heads only by default): tried by building the model on the
    meta device with another hidden size and the same head size."""
    attention = parts[0].attention
    if attention is None:
        return False
    config = model.config
    key = (type(model), config.to_json_string(use_diff=False))
    if key not in _SETTABLE:
        hidden = getattr(config, hidden_key)
        trial = copy.deepcopy(config)
        setattr(trial, hidden_key, hidden * 2)
        linear = find(found[0][2][-1], attention.q or attention.fused or "")
        try:
            trial.head_dim = hidden // _heads(config)  # (a read-only property in some configs)
            with torch.device("meta"):
                built = type(model)(trial)
            blocks = find(built.base_model, found[0][1])
            same = _out_features(find(blocks[-1], attention.q or attention.fused or "")) \
                == _out_features(linear)
        except Exception:  # a config the trial change breaks: not settable
            same = False
        _SETTABLE[key] = same
    return _SETTABLE[key]


def _heads(config: Any) -> int:
    return next(getattr(config, k) for k in _HEAD_KEYS
                if isinstance(getattr(config, k, None), int))


def _override(family: str, attention: Attention | None) -> Attention | None:
    fields = OVERRIDES.get(family, {})
    if attention is None or not fields or not attention.fused:
        return attention
    return dataclasses.replace(attention, **fields)


def _in_features(linear: nn.Module | None) -> int:
    assert linear is not None
    return int(linear.weight.shape[0] if isinstance(linear, Conv1D) else linear.weight.shape[1])


def _out_features(linear: nn.Module | None) -> int:
    assert linear is not None
    return int(linear.weight.shape[1] if isinstance(linear, Conv1D) else linear.weight.shape[0])


def _check_heads(block: nn.Module, attention: Attention, values: dict[str, Any], heads_key: str,
                 kv_key: str | None, head_dim_key: str | None, hidden: int) -> list[str]:
    """The projection widths agree with heads × head size from the config keys."""
    heads = values[heads_key]
    kv = values[kv_key] if kv_key else heads
    head_dim = values.get(head_dim_key or "") or hidden // max(heads, 1)
    want = {"q": heads * head_dim, "k": kv * head_dim, "v": kv * head_dim}
    if attention.fused:
        got = _out_features(find(block, attention.fused))
        expected = sum(want[p] for p in attention.fused_parts)
        if got != expected:
            return [f"{attention.fused}: {got} outputs, expected {expected} ({heads} heads, "
                    f"{kv} key/value heads of {head_dim})"]
    for part in "qkv":
        path = getattr(attention, part)
        if path and _out_features(find(block, path)) != want[part]:
            return [f"{path}: {_out_features(find(block, path))} outputs, expected "
                    f"{want[part]} ({heads if part == 'q' else kv} heads of {head_dim})"]
    return []


def _first_differs(blocks: nn.ModuleList, attention: Attention | None) -> bool:
    """Block 0 has other parameters than block 1 (beyond a relative-position table, which
    `distill.compress.depth` moves): such a block was built for position 0 only."""
    if len(blocks) < 2:
        return False
    table = attention.relative_bias if attention else None

    def names(block: nn.Module) -> set[str]:
        return {n for n, _ in block.named_parameters() if not (table and n.startswith(table))}
    return names(blocks[0]) != names(blocks[1])


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def _path_of(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((n for n, m in model.named_modules() if m is target), None)
