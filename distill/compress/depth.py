"""Making students from the teacher's own weights (METHODS.md §2): depth cuts."""

from __future__ import annotations

import copy
from collections import Counter

from torch import nn
from transformers import PreTrainedModel

from distill.arch import Stack, find, present_stacks
from distill.compress.rebuild import fresh_like, shape_mismatches
from distill.errors import DistillError

# T5Attention's flag: the block holding the relative-position table computes the bias that
# every later block of its stack reuses (see `_move_relative_bias`).
_RELATIVE_BIAS_FLAG = "has_relative_attention_bias"

# Scalar config keys that are layer-index thresholds: the number of leading layers with some
# property. Qwen2's `max_window_layers`: layers with index >= it use sliding attention.
_THRESHOLD_KEYS: tuple[str, ...] = ("max_window_layers",)
# Layer counts a stack's own copy of the config may hold (T5Stack's `num_layers`).
_OWN_COUNT_KEYS: tuple[str, ...] = ("num_layers", "num_hidden_layers")


def evenly_spaced(num_keep: int, num_total: int) -> list[int]:
    """`num_keep` layer indices spread evenly over `num_total`, first layer always kept.

    Indices are `floor(i · L / k)`: 3 of 6 -> [0, 2, 4] (DistilBERT keeps every other
    layer), 4 of 6 -> [0, 1, 3, 4], 2 of 6 -> [0, 3].
    """
    if not 1 <= num_keep <= num_total:
        raise DistillError(f"num_layers: {num_keep} is out of range; the teacher has "
                           f"{num_total} layers, allowed: 1..{num_total}")
    return [int(i * num_total / num_keep) for i in range(num_keep)]


def check_layers(layers: list[int], num_total: int, key: str = "layers") -> None:
    """Raise a clear error if any index is outside the teacher's 0..L-1."""
    bad = [i for i in layers if not 0 <= i < num_total]
    if bad:
        raise DistillError(f"{key}: {bad} out of range; the teacher has {num_total} layers, "
                           f"allowed indices 0..{num_total - 1}")


def keep_layers(model: PreTrainedModel, layers: list[int],
                decoder_layers: list[int] | None = None) -> PreTrainedModel:
    """A copy of `model` with only the blocks `layers` (in the given order), weights copied.

    Everything indexed by layer stays consistent, so the result saves and reloads as an
    ordinary Hugging Face model and generates with a KV cache: the config's layer count(s),
    per-layer config lists (`layer_types`, ...), thresholds (`max_window_layers`), the
    attention modules' `layer_idx` (renumbered 0..k-1; decoders index the cache by it) and,
    for T5, the relative-position table (moved to the new first block of its stack).

    Args:
        model: any model whose block stacks `distill.arch` finds; not modified.
        layers: teacher block indices to keep; for an encoder–decoder model, the encoder's.
        decoder_layers: the decoder's indices (encoder–decoder models only). Default: the
            same as `layers` when both stacks have the same depth; required otherwise.

    Raises:
        DistillError: indices out of range, repeated or empty; `decoder_layers` for a model
            without a decoder stack; or a cut the saved config could not express.
    """
    stacks = present_stacks(model)
    picks = _selections(model, stacks, layers, decoder_layers)
    _check_expressible(model, picks)
    student = copy.deepcopy(model)
    for (stack, _), pick in zip(present_stacks(student), picks):
        _cut_stack(student, stack, pick)
    _update_config(student, [(stack, len(blocks)) for stack, blocks in stacks], picks)
    wrong = shape_mismatches(student, fresh_like(student))
    if wrong:
        # A block moved to a position its config builds differently (a dense MLP where the
        # config puts experts, ...): the saved model would not load back as it is.
        raise DistillError(f"layers: {picks if len(picks) > 1 else picks[0]} cannot be kept "
                           f"in this order: the cut {type(model).__name__} would reload with "
                           f"other tensors (ours vs rebuilt): {'; '.join(wrong[:5])}")
    return student


def _selections(model: nn.Module, stacks: list[tuple[Stack, nn.ModuleList]], layers: list[int],
                decoder_layers: list[int] | None) -> list[list[int]]:
    """One checked index list per present stack."""
    if len(stacks) == 1:
        if decoder_layers is not None:
            raise DistillError(f"decoder_layers: only encoder–decoder models have a "
                               f"decoder stack; {type(model).__name__} has one stack, "
                               f"cut it with layers")
        picks, keys = [list(layers)], ["layers"]
    else:
        (_, encoder), (_, decoder) = stacks
        if decoder_layers is None:
            if len(decoder) != len(encoder):
                raise DistillError(f"decoder_layers: required, because the encoder has "
                                   f"{len(encoder)} layers and the decoder {len(decoder)}; "
                                   f"allowed indices 0..{len(decoder) - 1}")
            decoder_layers = layers
        picks, keys = [list(layers), list(decoder_layers)], ["layers", "decoder_layers"]
    for pick, key, (_, blocks) in zip(picks, keys, stacks):
        check_layers(pick, len(blocks), key)
        if not pick:
            raise DistillError(f"{key}: empty; keep at least one of the teacher's "
                               f"{len(blocks)} layers")
        repeated = sorted(i for i, n in Counter(pick).items() if n > 1)
        if repeated:
            raise DistillError(f"{key}: {repeated} repeated; each teacher layer can be kept "
                               f"once")
    return picks


def _check_expressible(model: nn.Module, picks: list[list[int]]) -> None:
    """Refuse cuts whose result a reloaded config would compute differently.

    GPT-2 with `scale_attn_by_inverse_layer_idx` divides attention scores by `layer_idx + 1`,
    fixed at construction; a block moved to another position would be rebuilt with another
    factor on reload, so only prefix cuts (each block keeps its index) are exact.
    """
    for (stack, _), pick in zip(present_stacks(model), picks):
        if stack.pinned_first and pick[0] != 0:
            raise DistillError(f"layers: {pick} puts block {pick[0]} first, but block 0 of this "
                               f"{model.config.model_type} model is built unlike the others "
                               f"(a reloaded model would rebuild position 0 that way); "
                               f"allowed: selections that start with 0")
    if getattr(model.config, "scale_attn_by_inverse_layer_idx", False):
        for pick in picks:
            if pick != list(range(len(pick))):
                raise DistillError(f"layers: {pick} moves blocks to new positions, but this "
                                   f"model scales attention by 1/(layer index + 1) "
                                   f"(scale_attn_by_inverse_layer_idx); allowed: a prefix "
                                   f"such as {list(range(len(pick)))}")


def _cut_stack(student: nn.Module, stack: Stack, pick: list[int]) -> None:
    """Replace the stack's ModuleList by the picked blocks and renumber what is per-layer."""
    old = find(student.base_model, stack.path)
    assert isinstance(old, nn.ModuleList)
    kept = nn.ModuleList([old[i] for i in pick])
    parent_path, _, attr = stack.path.rpartition(".")
    parent = find(student.base_model, parent_path)
    assert parent is not None
    setattr(parent, attr, kept)
    for position, block in enumerate(kept):
        # Every module that knows its layer index (self- and cross-attention) gets the new
        # one: the KV cache is a list indexed by it, so stale indices would collide or overflow.
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
    if stack.attention is not None and stack.attention.relative_bias:
        _move_relative_bias(stack.attention.relative_bias, old[0], kept)
    own_config = getattr(parent, "config", None)
    if own_config is not None and own_config is not student.config:
        # T5Stack keeps its own copy of the config; its cache is sized from its layer count.
        for key in _OWN_COUNT_KEYS:
            if getattr(own_config, key, None) == len(old):
                setattr(own_config, key, len(pick))


def _move_relative_bias(path: str, first_teacher_block: nn.Module,
                        kept: nn.ModuleList) -> None:
    """Give the stack's relative-position table to its new first block, and only to it.

    In T5 the table lives in block 0, but it is a property of the stack: block 0 computes the
    bias from token positions alone (never from hidden states) and hands the same tensor to
    every later block. So the exact student of a cut is: the same table, computed by whatever
    block now runs first, and no table elsewhere (a fresh T5 builds exactly that layout, so
    the result reloads without missing or unexpected keys). Every kept block then sees the
    very bias it saw in the teacher, whether or not block 0 was kept, and in any order.
    """
    owner_path, _, name = path.rpartition(".")
    table = find(first_teacher_block, path)
    assert table is not None, "block 0 of a T5 stack must hold the relative attention bias"
    for position, block in enumerate(kept):
        owner = find(block, owner_path)
        assert owner is not None
        if position == 0:
            setattr(owner, name, table)
            setattr(owner, _RELATIVE_BIAS_FLAG, True)
        elif getattr(owner, _RELATIVE_BIAS_FLAG):
            delattr(owner, name)
            setattr(owner, _RELATIVE_BIAS_FLAG, False)


def _update_config(student: PreTrainedModel, stacks: list[tuple[Stack, int]],
                   picks: list[list[int]]) -> None:
    """Layer counts, per-layer lists, lists of layer indices and layer thresholds of the top
    config follow the cut."""
    config = student.config
    for (stack, old_depth), pick in zip(stacks, picks):
        for key in stack.per_layer_keys:
            values = getattr(config, key, None)
            if values is None:
                continue
            assert len(values) == old_depth, f"config.{key} has {len(values)} entries"
            setattr(config, key, [values[i] for i in pick])
        for key in stack.layer_index_keys:  # indices of layers: renumbered, dropped ones gone
            listed = set(getattr(config, key, None) or ())
            setattr(config, key, [pos for pos, i in enumerate(pick) if i in listed])
        for key in _THRESHOLD_KEYS:
            threshold = getattr(config, key, None)
            if isinstance(threshold, int) and stack.per_layer_keys:
                # Keeps the config self-describing; `layer_types` (sliced above) is what the
                # modeling code reads, and it wins whenever the two could disagree.
                setattr(config, key, sum(1 for i in pick if i < threshold))
        setattr(config, stack.num_layers_key, len(pick))
    base = student.base_model
    if hasattr(base, "has_sliding_layers") and getattr(config, "layer_types", None) is not None:
        # Qwen2Model caches this at construction to decide whether to build the sliding mask.
        base.has_sliding_layers = "sliding_attention" in config.layer_types
    config.validate()
