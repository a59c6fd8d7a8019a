"""Width cuts: fewer attention heads, MLP neurons and hidden channels (Minitron, METHODS.md §2).

`shrink_width` keeps the most important units (see `distill.compress.width_importance`), ordered
by importance (heads: in their original order), and slices every tensor that touches them, so
the result is an ordinary Hugging Face model of the same class whose config matches its
weights. With no importance it keeps the first units in their order, and a cut keeping
everything reproduces the model exactly.

Where things are comes from `distill.arch` (discovered from the model). Inside the blocks each
projection is cut by its role (query / key / value heads, fused QKV stacked or interleaved per
head, MLP neurons, fused gate-up); everything outside the blocks (embeddings, norms, pooler,
projections, task and LM heads) is cut by shape: every axis that spans the hidden size reads
or writes hidden channels. What a config can express is checked before anything is cut:
- Models whose config carries the head size (`head_dim`, `d_kv`) have independent hidden,
  heads and intermediate widths. The head size is never cut, and is written to the config
  explicitly (some configs default it to hidden_size // heads).
- Models that derive the head size as hidden // heads (BERT, GPT-2, ...) map heads × head_dim
  back onto the hidden size, so a cut keeps hidden == heads × head_dim: the two go together.
- Grouped-query attention keeps whole key/value groups: heads must be a multiple of
  heads / kv_heads, and kv_heads shrinks with it.
- A relative-position bias per head computed once per stack by its first block (T5) and
  added in every block: a stack keeps the same self-attention heads in all its blocks.
- An embedding projection (ELECTRA) exists only while embedding_size != hidden_size: such a
  model cannot be cut to hidden == embedding_size.
- Single-stack models with cross-attention (GPT-2 / BERT as decoders of a separate encoder)
  keep their hidden size: the encoder's states would have to lose the same channels.
- Mixture-of-experts blocks are not cut in width (experts are kept whole).

A width left at None is not touched, not even reordered, so the hidden states of a heads- or
neurons-only cut stay comparable with the teacher's channel by channel.
"""

from __future__ import annotations

import copy
import re

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from distill.arch import (
    ArchInfo,
    Attention,
    Dims,
    Stack,
    arch_info,
    dims,
    find,
    outside_modules,
    present_stacks,
    require_width,
)
from distill.compress.rebuild import fresh_like, shape_mismatches
from distill.errors import DistillError
from distill.compress.width_importance import (
    LayerImportance,
    WidthImportance,
    attentions,
    width_importance,
)

# Config keys of widths that may equal the hidden size (and then follow it).
_WIDTH_KEY = re.compile(r"(hidden_size|embedding_size|embed_dim|embed_proj_dim)$")

__all__ = ["LayerImportance", "WidthImportance", "shrink_width", "width_importance"]


def shrink_width(model: PreTrainedModel, *, hidden: int | None = None, heads: int | None = None,
                 intermediate: int | None = None,
                 importance: WidthImportance | None = None) -> PreTrainedModel:
    """A copy of `model` with fewer hidden channels, attention heads and/or MLP neurons.

    Args:
        model: a model whose blocks `distill.arch` understands; not modified.
        hidden: hidden size to keep. None: unchanged.
        heads: attention heads per layer to keep (with grouped-query attention a multiple of
            heads / kv_heads; whole key/value groups are kept). None: unchanged.
        intermediate: MLP width per layer to keep. None: unchanged.
        importance: scores from `width_importance` on this model; for each width given
            (even at its current size) the top units are kept, most important first (attention
            heads in their original order). None:
            the first units, in their order. Widths left at None are never reordered.

    Returns:
        The new model (eval/train mode as `model`), its config and every module's cached
        widths updated, so it runs, generates and `save_pretrained` / `from_pretrained`
        round-trips into the same shapes.

    Raises:
        DistillError: a target that is not a positive int no larger than the current size, a
            combination the family's config cannot express, or `importance` that does not fit.
    """
    info = arch_info(model)  # width_targets checks that widths can be cut (require_width)
    old = dims(model, info)
    new = width_targets(model, info, old, hidden, heads, intermediate)
    if importance is not None:
        _check_importance(model, importance, old)
    # Widths left at None keep their order (see the module docstring).
    ranked = importance is not None
    hid = _top(importance.channels if ranked and hidden is not None else None,
               new.hidden_size)
    student = copy.deepcopy(model)
    cut = _Cutter()
    for stack, blocks in present_stacks(student, info):
        scores = importance.stacks[stack.name] if ranked else None
        picks = _head_picks(stack, blocks, scores if heads is not None else None, old, new)
        for i, block in enumerate(blocks):
            for cross, names in attentions(stack, block):
                _cut_attention(cut, block, names, picks[i, cross], old, hid)
            neurons = _top(scores[i].neurons if scores and intermediate is not None else None,
                           new.intermediate_size)
            _cut_mlp(cut, block, stack, neurons, old, hid)
            for path in stack.norms:
                norm = find(block, path)
                if _spans(norm, old.hidden_size):
                    cut.norm(norm, hid)
    _cut_outside(cut, student, info, old, hid)
    cut.retie(student)
    _update_config(student, info, old, new)
    _match_fresh(student, old, new)
    return student


def _spans(module: nn.Module | None, size: int) -> bool:
    """A norm with a per-channel weight of `size` (ModernBERT's first block has Identity)."""
    weight = getattr(module, "weight", None)
    return weight is not None and tuple(weight.shape) == (size,)


# --- targets -----------------------------------------------------------------------------------

def width_targets(model: nn.Module, info: ArchInfo, old: Dims, hidden: int | None,
                  heads: int | None, intermediate: int | None) -> Dims:
    """The new widths, or a DistillError naming the target, its value and what is allowed
    (pre-flight asks this of the teacher on the meta device, before any work)."""
    require_width(model, info)  # blocks understood, no mixture of experts

    def check(key: str, value: int | None, current: int) -> int:
        if value is None:
            return current
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= current:
            raise DistillError(f"{key}: {value!r} is not allowed; the model has {current}, a "
                               f"width cut keeps a whole number 1..{current}")
        return value

    new_hidden = check("hidden", hidden, old.hidden_size)
    new_heads = check("heads", heads, old.num_heads)
    new_inter = check("intermediate", intermediate, old.intermediate_size)
    ratio = old.num_heads // old.num_kv_heads
    if new_heads % ratio:
        allowed = ", ".join(str(ratio * k) for k in range(1, old.num_kv_heads + 1))
        raise DistillError(
            f"heads: {new_heads} is not a multiple of {ratio}, the query heads per key/value "
            f"group (num_attention_heads {old.num_heads} / key/value heads "
            f"{old.num_kv_heads}); whole groups are kept so the ratio stays valid; allowed: "
            f"{allowed}")
    if info.config.head_dim is None and new_hidden != new_heads * old.head_dim:
        # BERT family and GPT-2: head size = hidden // heads, O maps heads*head_dim -> hidden.
        pairs = ", ".join(f"({k * old.head_dim}, {k})" for k in range(1, old.num_heads + 1))
        given = ", ".join(f"{k}={v}" for k, v in (("hidden", hidden), ("heads", heads))
                          if v is not None)
        raise DistillError(
            f"{given}: {info.family} computes the head size as hidden_size // "
            f"num_attention_heads, so a width cut keeps hidden = heads × {old.head_dim} (the "
            f"head size is not cut) and hidden {new_hidden} ≠ {new_heads} heads × "
            f"{old.head_dim}; allowed (hidden, heads) pairs: {pairs}; pass both")
    mlp_ratio = info.stacks[0].intermediate_ratio
    if mlp_ratio and new_inter != mlp_ratio * new_hidden:
        # No config key holds the MLP width: the model builds it mlp_ratio × hidden (BLOOM).
        given = ", ".join(f"{k}={v}" for k, v in (("hidden", hidden),
                                                  ("intermediate", intermediate))
                          if v is not None)
        raise DistillError(
            f"{given}: {info.family} builds its MLP {mlp_ratio} × hidden_size wide (no config key "
            f"sets it), so a width cut keeps intermediate = {mlp_ratio} × hidden, and "
            f"{new_inter} ≠ {mlp_ratio} × {new_hidden}; pass both, e.g. hidden {new_hidden} with "
            f"intermediate {mlp_ratio * new_hidden}")
    emb_size = find(model, info.token_embedding).weight.shape[1]
    if new_hidden == emb_size != old.hidden_size:
        # The embeddings are narrower than the hidden size and projected up to it; configs
        # build that projection only while the two sizes differ.
        raise DistillError(
            f"hidden: {new_hidden} equals the embedding size of this {info.family} model; its "
            f"config then has no embedding projection, but this model's projection cannot be "
            f"dropped; allowed: a hidden size other than {emb_size}")
    if new_hidden != old.hidden_size and len(info.stacks) == 1 and any(
            find(block, stack.cross_attention.module) is not None
            for stack, blocks in present_stacks(model, info) if stack.cross_attention
            for block in blocks):
        raise DistillError(
            f"hidden: {new_hidden} is not allowed for this {info.family} model: its "
            f"cross-attention reads the hidden states of a separate encoder, whose channels "
            f"would have to be cut alike; cut heads and intermediate only")
    return Dims(new_hidden, new_heads, new_heads // ratio, old.head_dim, new_inter)


def _check_importance(model: nn.Module, importance: WidthImportance, old: Dims) -> None:
    """Refuse scores measured on a model of other shapes (e.g. before an earlier cut)."""
    depths = {stack.name: len(blocks) for stack, blocks in present_stacks(model)}
    scored = {name: len(layers) for name, layers in importance.stacks.items()}
    shapes_ok = depths == scored and importance.channels.numel() == old.hidden_size and all(
        layer.heads.numel() == old.num_heads and layer.neurons.numel() == old.intermediate_size
        for layers in importance.stacks.values() for layer in layers)
    if not shapes_ok:
        raise DistillError(
            f"importance: scores do not fit this model (layers {scored}, hidden "
            f"{importance.channels.numel()}); the model has layers {depths}, hidden "
            f"{old.hidden_size}, {old.num_heads} heads, intermediate {old.intermediate_size}; "
            f"compute width_importance on the model being cut")


def _top(scores: Tensor | None, keep: int) -> Tensor:
    """[keep] indices: the highest scores, best first (ties in index order), or 0..keep-1."""
    if scores is None:
        return torch.arange(keep)
    return torch.argsort(scores, descending=True, stable=True)[:keep]


def _pick_heads(scores: Tensor | None, old: Dims, new: Dims, ratio: int) -> tuple[Tensor, Tensor]:
    """([heads] query heads, [kv_heads] key/value heads) to keep, by group.

    Query head `h` reads K/V head `h // ratio`, so keeping K/V groups `g` and, for each, its
    query heads `g*ratio .. g*ratio+ratio-1` in order keeps that pairing valid. The kept groups
    stay in their original order: some models tie a head's behaviour to its index (BLOOM's
    ALiBi slope per head), which a reordering would hand to another head."""
    group_scores = None if scores is None else scores.view(old.num_kv_heads, ratio).sum(-1)
    groups = torch.sort(_top(group_scores, new.num_kv_heads)).values
    return (groups[:, None] * ratio + torch.arange(ratio)).flatten(), groups


def _head_picks(stack: Stack, blocks: nn.ModuleList, scores: list[LayerImportance] | None,
                old: Dims, new: Dims) -> dict[tuple[int, bool], tuple[Tensor, Tensor]]:
    """(query heads, K/V heads) to keep per (block index, is cross-attention).

    T5 adds the relative-position bias computed by a stack's first block to every block's
    self-attention, head by head, so its stack keeps one selection (by the summed scores) in
    all blocks; elsewhere, and for T5's cross-attention (no bias), each block picks its own."""
    ratio = old.num_heads // old.num_kv_heads
    shared = None
    if stack.attention is not None and stack.attention.relative_bias:
        shared = _pick_heads(sum(s.heads for s in scores) if scores else None, old, new, ratio)
    picks = {}
    for i, block in enumerate(blocks):
        for cross, _ in attentions(stack, block):
            if shared is not None and not cross:
                picks[i, cross] = shared
            else:
                layer = scores[i] if scores else None
                picks[i, cross] = _pick_heads(
                    None if layer is None else layer.cross_heads if cross else layer.heads,
                    old, new, ratio)
    return picks


def _span(units: Tensor, width: int) -> Tensor:
    """[len(units) * width] feature indices of whole units (heads) of `width` features."""
    return (units[:, None] * width + torch.arange(width)).flatten()


# --- slicing -----------------------------------------------------------------------------------

class _Cutter:
    """Slices parameters once each; tied parameters (embeddings = LM head) stay tied."""

    def __init__(self) -> None:
        # id(old parameter) -> (old, new); the old one is kept alive so ids stay unique.
        self.done: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}
        self.made: set[int] = set()  # ids of the new parameters, never to be cut again

    def param(self, module: nn.Module, name: str, cuts: dict[int, Tensor]) -> None:
        """Replace `module.<name>` by its slice: `cuts` maps a dim to the [k] indices kept."""
        old = module._parameters.get(name)
        if old is None or not cuts:  # nothing to cut: keep the tensor (and any tie) as is
            return
        assert id(old) not in self.made, f"{name} of {type(module).__name__} cut twice"
        shape = list(old.shape)
        for dim, index in cuts.items():
            shape[dim] = len(index)
        if id(old) in self.done:  # a tied alias: must be cut alike, then share the new one
            new = self.done[id(old)][1]
            assert list(new.shape) == shape, f"tied {name} cut two ways: {new.shape} {shape}"
        else:
            data = old.detach()
            for dim, index in cuts.items():
                data = data.index_select(dim, index.to(data.device))
            new = nn.Parameter(data, requires_grad=old.requires_grad)
            self.done[id(old)] = (old, new)
            self.made.add(id(new))
        module._parameters[name] = new

    def linear(self, module: nn.Module | None, *, rows: Tensor | None = None,
               cols: Tensor | None = None) -> None:
        """Keep output features `rows` and input features `cols` of a Linear or Conv1D."""
        assert module is not None
        conv = isinstance(module, Conv1D)  # weight stored [in, out]
        out_dim, in_dim = (1, 0) if conv else (0, 1)
        cuts = {d: i for d, i in ((out_dim, rows), (in_dim, cols)) if i is not None}
        self.param(module, "weight", cuts)
        if rows is not None:
            self.param(module, "bias", {0: rows})
        n_in, n_out = (module.weight.shape[0], module.weight.shape[1]) if conv else (
            module.weight.shape[1], module.weight.shape[0])
        if conv:
            module.nx, module.nf = n_in, n_out
        else:
            module.in_features, module.out_features = n_in, n_out

    def norm(self, module: nn.Module, hid: Tensor) -> None:
        """LayerNorm / RMSNorm: per-channel weight (and bias)."""
        self.param(module, "weight", {0: hid})
        self.param(module, "bias", {0: hid})
        if isinstance(module, nn.LayerNorm):
            module.normalized_shape = (len(hid),)

    def embedding(self, module: nn.Module | None, hid: Tensor, dim: int = 1) -> None:
        if module is not None:
            self.param(module, "weight", {dim: hid})
            module.embedding_dim = module.weight.shape[1]

    def retie(self, model: nn.Module) -> None:
        """Point every remaining alias of a cut parameter (e.g. T5's per-stack embed_tokens,
        which the table does not list) at its new tensor."""
        for module in model.modules():
            for name, p in module._parameters.items():
                if p is not None and id(p) in self.done:
                    module._parameters[name] = self.done[id(p)][1]
                    if isinstance(module, nn.Embedding):
                        module.embedding_dim = module.weight.shape[1]


def _cut_attention(cut: _Cutter, block: nn.Module, names: Attention,
                   picked: tuple[Tensor, Tensor], old: Dims, hid: Tensor) -> None:
    """Q/K/V rows (or the parts of a fused projection), O columns, hidden inputs and outputs,
    head-laid-out extras (DeBERTa's position projections), all-head q/k norms and T5's per-head
    bias column. Cached head counts are set from a fresh model afterwards (`_match_fresh`)."""
    q_heads, kv_heads = picked
    q, kv = _span(q_heads, old.head_dim), _span(kv_heads, old.head_dim)
    if names.fused and names.fused_per_head:
        # [q_h; k_h; v_h] per head (no grouped KV in these models): keep whole head blocks.
        width = len(names.fused_parts) * old.head_dim
        cut.linear(find(block, names.fused), rows=_span(q_heads, width), cols=hid)
    elif names.fused:
        # [Q; K; V] (or [K; V]) stacked along the output axis: cut each part on its own.
        widths = {"q": old.num_heads * old.head_dim, "k": old.num_kv_heads * old.head_dim,
                  "v": old.num_kv_heads * old.head_dim}
        parts, offset = [], 0
        for part in names.fused_parts:
            parts.append(offset + (q if part == "q" else kv))
            offset += widths[part]
        cut.linear(find(block, names.fused), rows=torch.cat(parts), cols=hid)
    for paths, rows in (((names.q, *names.q_like), q), ((names.k, names.v, *names.k_like), kv)):
        for path in paths:
            if path:
                cut.linear(find(block, path), rows=rows, cols=hid)
    cut.linear(find(block, names.o), rows=hid, cols=q)
    for path, span in ((names.q_norm, q), (names.k_norm, kv)):
        norm = find(block, path) if path else None
        if norm is not None and _spans(norm, old.num_heads * old.head_dim if path == names.q_norm
                                       else old.num_kv_heads * old.head_dim) \
                and not _spans(norm, old.head_dim):
            cut.norm(norm, span)  # over all heads (OLMo 2); a per-head norm is kept
    if names.relative_bias and (table := find(block, names.relative_bias)) is not None:
        cut.embedding(table, q_heads)  # [buckets, heads]


def _cut_mlp(cut: _Cutter, block: nn.Module, stack: Stack, neurons: Tensor, old: Dims,
             hid: Tensor) -> None:
    """Up / gate rows (both halves of a fused gate-up), down columns, hidden channels."""
    mlp = stack.mlp
    assert mlp is not None and mlp.down is not None
    for path in (mlp.up, mlp.gate):
        if path:
            cut.linear(find(block, path), rows=neurons, cols=hid)
    if mlp.fused_gate_up:
        rows = torch.cat([neurons, old.intermediate_size + neurons])
        cut.linear(find(block, mlp.fused_gate_up), rows=rows, cols=hid)
    cut.linear(find(block, mlp.down), rows=hid, cols=neurons)


def _cut_outside(cut: _Cutter, model: PreTrainedModel, info: ArchInfo, old: Dims,
                 hid: Tensor) -> None:
    """Embeddings, projections, norms, pooler, task and LM heads: every axis of hidden size.

    These differ in layout from model to model (a Linear, dense → out_proj, dense → LayerNorm
    → decoder, an embedding projection, relative-position embeddings, ...) but every axis of
    theirs that spans the hidden size reads or writes hidden channels, so they are cut by
    shape. Only an output count equal to the hidden size (labels, vocabulary) is ambiguous."""
    size = old.hidden_size
    if torch.equal(hid, torch.arange(size)):
        return  # hidden channels kept in order: nothing outside the blocks changes
    outputs = {getattr(model.config, "num_labels", None), getattr(model.config, "vocab_size",
                                                                  None)}
    for path, m in outside_modules(model, info).items():
        if isinstance(m, (nn.Linear, Conv1D)):
            n_in, n_out = (m.nx, m.nf) if isinstance(m, Conv1D) else (m.in_features,
                                                                      m.out_features)
            if n_out == size and size in outputs:
                raise DistillError(
                    f"hidden: cannot cut this model: {path} has {size} outputs, the hidden "
                    f"size, which is also its number of labels or tokens; cut heads and "
                    f"intermediate only")
            cut.linear(m, rows=hid if n_out == size else None,
                       cols=hid if n_in == size else None)
        elif isinstance(m, nn.Embedding):
            if m.weight.shape[1] == size:
                cut.embedding(m, hid)
        elif _spans(m, size) and any(True for _ in m.parameters(recurse=False)):
            cut.norm(m, hid)


# --- config and cached widths ------------------------------------------------------------------

def _update_config(model: PreTrainedModel, info: ArchInfo, old: Dims, new: Dims) -> None:
    """Every config object (T5 stacks keep their own copies) gets the new widths."""
    keys = info.config
    configs = {id(model.config): model.config}
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig):
            configs[id(config)] = config
    for config in configs.values():
        setattr(config, keys.hidden_size, new.hidden_size)
        for stack in info.stacks:
            if hasattr(config, stack.heads_key):
                setattr(config, stack.heads_key, new.num_heads)
            # GPT-2's n_inner=None means 4*n_embd: write it, or a hidden cut would change it.
            if stack.intermediate_key and hasattr(config, stack.intermediate_key):
                setattr(config, stack.intermediate_key, new.intermediate_size)
        if keys.num_kv_heads:
            setattr(config, keys.num_kv_heads, new.num_kv_heads)
        if keys.head_dim:  # explicit: a default of hidden // heads would change it
            setattr(config, keys.head_dim, new.head_dim)
        for key, value in config.to_dict().items():
            # Other widths equal to the hidden size (embeddings without a projection, ELECTRA's
            # `embedding_size`, OPT's `word_embed_proj_dim`, DeBERTa's `pooler_hidden_size`)
            # were cut as hidden channels outside the blocks; a differing one was not.
            if _WIDTH_KEY.search(key) and key != keys.hidden_size and value == old.hidden_size:
                setattr(config, key, new.hidden_size)
    if (getattr(model.config, "scale_decoder_outputs", False) and new.hidden_size !=
            old.hidden_size and info.lm_head and find(model, info.lm_head) is not None):
        # T5 with tied embeddings multiplies the decoder output by d_model**-0.5 before the LM
        # head. Fold the change of that factor into the final norm (which multiplies the same
        # tensor) so the kept channels feed the LM head at the teacher's scale.
        final = find(model.base_model, info.stacks[-1].final_norm or "")
        assert final is not None
        with torch.no_grad():
            final.weight.mul_((new.hidden_size / old.hidden_size) ** 0.5)
    model.config.validate()


def _match_fresh(model: PreTrainedModel, old: Dims, new: Dims) -> None:
    """Make the cut model what loading it back would build.

    A fresh model of the same class from the new config (on the meta device: no memory, no
    init) must have our tensor shapes, or the saved model would not reload. Widths that
    modules cache at construction (head counts, `all_head_size`, `embed_dim`, ...) are copied
    from it, so the cut model computes as its reload will; so is a cached √hidden embedding
    scale (Gemma), a buffer the meta model cannot hold."""
    fresh = fresh_like(model)
    wrong = shape_mismatches(model, fresh)
    if wrong:
        raise DistillError(f"width cut of {type(model).__name__} left tensors the config does "
                           f"not describe (ours vs expected): {'; '.join(wrong[:5])}")
    mine = dict(model.named_modules())
    for name, module in fresh.named_modules():
        ours = mine.get(name)
        if ours is None:
            continue
        for attr, value in vars(module).items():
            current = getattr(ours, attr, None)
            if (isinstance(value, (int, float)) and not isinstance(value, bool)
                    and isinstance(current, (int, float)) and not isinstance(current, bool)
                    and current != value):
                setattr(ours, attr, value)
        for attr, buffer in list(ours._buffers.items()):
            if (buffer is not None and buffer.dim() == 0 and new.hidden_size != old.hidden_size
                    and buffer.is_floating_point()
                    and abs(float(buffer) / old.hidden_size ** 0.5 - 1) < 1e-2):
                ours._buffers[attr] = torch.tensor(new.hidden_size ** 0.5, dtype=buffer.dtype,
                                                   device=buffer.device)
