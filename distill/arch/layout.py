"""The architecture facts of one model, as discovered from it (`distill.arch.discover`).

Frozen dataclasses and path helpers only; nothing here names a model family. Paths are dotted,
as in `named_modules()`:
- stack paths and final norms are relative to `model.base_model`;
- names inside a block (attention, MLP, norms) are relative to the block;
- the token embedding and the LM head are relative to the top model.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Attention:
    """One attention sub-layer; every name is relative to the block.

    `fused` names a single projection holding several of Q/K/V along its output axis, the
    parts in the order of `fused_parts`: stacked ([Q; K; V], GPT-2, Phi-3, ModernBERT; GPT-2's
    cross-attention `c_attn` = [K; V] beside a separate query) or, with `fused_per_head`,
    interleaved head by head ([q_0; k_0; v_0; q_1; ...], GPT-NeoX, BLOOM). `conv1d` means the
    weights are transformers' `Conv1D`, stored (in, out), the transpose of `nn.Linear`.
    """

    module: str  # the module holding the projections (it caches head counts, `layer_idx`)
    o: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    fused: str | None = None
    fused_parts: str = ""
    fused_per_head: bool = False
    conv1d: bool = False
    # Projections laid out head by head like the query / the keys (DeBERTa's position
    # projections, which read the relative-position embeddings).
    q_like: tuple[str, ...] = ()
    k_like: tuple[str, ...] = ()
    # Norms applied to queries / keys: per head (head_dim wide: Qwen3, Gemma 3) or over all
    # heads (heads × head_dim wide: OLMo 2); width cuts slice the latter with the heads.
    q_norm: str | None = None
    k_norm: str | None = None
    # T5: the relative-position table, owned by block 0's self-attention and shared with all
    # later blocks through the `position_bias` they are handed.
    relative_bias: str | None = None


@dataclass(frozen=True)
class Mlp:
    """Feed-forward names relative to the block: `down(act(gate(x)) * up(x))` when gated,
    else `down(act(up(x)))`. `fused_gate_up` holds [gate; up] along its output axis (Phi-3's
    `gate_up_proj`, ModernBERT's `Wi`). `experts` names a mixture-of-experts module: its
    experts are kept whole (depth cuts only)."""

    down: str | None
    up: str | None = None
    gate: str | None = None
    fused_gate_up: str | None = None
    conv1d: bool = False
    experts: str | None = None


@dataclass(frozen=True)
class Stack:
    """One ModuleList of blocks and what lives inside each block."""

    name: str  # "layers", or "encoder" / "decoder" for encoder–decoder models
    path: str  # from `model.base_model` to the ModuleList
    num_layers_key: str  # top-level config key counting these blocks
    heads_key: str  # config key of this stack's attention heads
    intermediate_key: str | None  # config key of this stack's MLP width (None: see below)
    attention: Attention | None
    mlp: Mlp | None
    norms: tuple[str, ...]  # per-block norms of the residual stream, in registration order
    final_norm: str | None = None  # from `model.base_model`
    cross_attention: Attention | None = None
    per_layer_keys: tuple[str, ...] = ()  # top-level config lists indexed by this stack's layer
    # Top-level config lists *of* layer indices (Qwen2-MoE's `mlp_only_layers`): a depth cut
    # renumbers the kept ones and drops the rest.
    layer_index_keys: tuple[str, ...] = ()
    # A config without an MLP-width key builds the MLP `intermediate_ratio` × hidden wide
    # (BLOOM: 4); a width cut must keep that ratio. None with no key: a mixture of experts.
    intermediate_ratio: int | None = None
    # Block 0 is built differently from the others (ModernBERT: no attention norm), so a cut
    # must keep it first.
    pinned_first: bool = False
    # What discovery could not place inside a block, one line each: depth cuts do not need
    # it, width cuts and width importance refuse the stack naming it.
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class ConfigKeys:
    """Config attributes of the model-wide widths (per-stack keys live on `Stack`)."""

    hidden_size: str
    num_kv_heads: str | None = None  # None: as many K/V heads as query heads
    head_dim: str | None = None  # None: hidden_size // num_heads, derived by the model


@dataclass(frozen=True)
class ArchInfo:
    """Layout facts of one model."""

    family: str  # `config.model_type`, for messages
    stacks: tuple[Stack, ...]
    config: ConfigKeys
    token_embedding: str  # from the top model
    lm_head: str | None  # projection to the vocabulary, from the top model

    @property
    def moe(self) -> bool:
        return any(stack.mlp is not None and stack.mlp.experts for stack in self.stacks)


@dataclass(frozen=True)
class Dims:
    """Resolved widths of a model (defaults filled in as the modeling code fills them)."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int


def find(root: nn.Module, path: str) -> nn.Module | None:
    """The submodule at dotted `path` under `root` ("" is `root`), or None where it does not
    exist (optional parts: cross-attention, a pooler, one task head of many)."""
    node: nn.Module | None = root
    for part in filter(None, path.split(".")):
        node = getattr(node, part, None)
        if not isinstance(node, nn.Module):
            return None
    return node
