"""Architecture facts, read from the model: one source for depth and width cuts, importance
scores, the PEFT methods' default targets and pre-flight.

`arch_info(model)` discovers the layout (`distill.arch.discover`); the helpers below answer
the questions the rest of the toolkit asks of it. Nothing outside this package names a model
family.
"""

from __future__ import annotations

from torch import nn

from distill.arch.block import is_norm
from distill.arch.discover import OVERRIDES, discover
from distill.arch.layout import ArchInfo, Attention, ConfigKeys, Dims, Mlp, Stack, find
from distill.errors import DistillError

__all__ = ["OVERRIDES", "ArchInfo", "Attention", "ConfigKeys", "Dims", "Mlp", "Stack",
           "arch_info", "base_prefix", "dims", "embeddings_tied", "find", "is_norm",
           "layer_stack", "num_layers", "outside_modules", "position_limit", "present_stacks",
           "require_width", "stack_depths"]


def arch_info(model: nn.Module) -> ArchInfo:
    """The layout of `model` (real or on the meta device), or a DistillError naming what
    could not be found."""
    return discover(model)


def present_stacks(model: nn.Module, info: ArchInfo | None = None
                   ) -> list[tuple[Stack, nn.ModuleList]]:
    """Each stack with its ModuleList of blocks (T5EncoderModel: the encoder only)."""
    info = info or arch_info(model)
    result = []
    for stack in info.stacks:
        blocks = find(model.base_model, stack.path)
        assert isinstance(blocks, nn.ModuleList), stack.path
        result.append((stack, blocks))
    return result


def layer_stack(model: nn.Module) -> nn.ModuleList:
    """The first (or only) ModuleList of blocks: the encoder of an encoder–decoder model."""
    return present_stacks(model)[0][1]


def num_layers(model: nn.Module) -> int:
    """Depth of the first (or only) stack; see `stack_depths` for encoder–decoder models."""
    return len(layer_stack(model))


def stack_depths(model: nn.Module) -> dict[str, int]:
    """Number of blocks per stack name, e.g. {"encoder": 6, "decoder": 6}."""
    return {stack.name: len(blocks) for stack, blocks in present_stacks(model)}


def require_width(model: nn.Module, info: ArchInfo | None = None) -> ArchInfo:
    """The layout, if every block is understood well enough to cut or score its widths."""
    info = info or arch_info(model)
    if info.moe:
        raise DistillError(f"{info.family}: width cuts do not apply to mixture-of-experts "
                           f"blocks (experts are kept whole); cut depth with `layers`")
    problems = [f"{stack.name}: {p}" for stack in info.stacks for p in stack.problems]
    if problems:
        raise DistillError(f"{info.family}: width cuts need each block's attention and MLP "
                           f"projections; not understood: {'; '.join(problems)}. Depth cuts "
                           f"still apply; see the README (adding an architecture)")
    widths = {(getattr(model.config, s.heads_key), _mlp_width(model.config, info, s))
              for s in info.stacks}
    if len(widths) > 1:
        raise DistillError(f"{info.family}: the encoder and decoder have different widths "
                           f"(heads, MLP: {sorted(widths, key=str)}); width cuts need them "
                           f"equal")
    return info


def dims(model: nn.Module, info: ArchInfo | None = None) -> Dims:
    """The widths of `model` (of its first stack), read through the discovered config keys."""
    info = info or arch_info(model)
    keys, cfg, stack = info.config, model.config, info.stacks[0]
    hidden, heads = getattr(cfg, keys.hidden_size), getattr(cfg, stack.heads_key)
    kv = getattr(cfg, keys.num_kv_heads, None) if keys.num_kv_heads else None
    head_dim = getattr(cfg, keys.head_dim, None) if keys.head_dim else None
    return Dims(hidden, heads, kv or heads, head_dim or hidden // heads,
                _mlp_width(cfg, info, stack))


def _mlp_width(cfg: object, info: ArchInfo, stack: Stack) -> int:
    """A stack's MLP width by its config key, or as the config derives it."""
    hidden = getattr(cfg, info.config.hidden_size)
    if stack.intermediate_key is None:
        return (stack.intermediate_ratio or 4) * hidden
    inter = getattr(cfg, stack.intermediate_key)
    # GPT-2 leaves n_inner None to mean 4 * n_embd (GPT2Block does the same).
    return inter if inter is not None else 4 * hidden


def embeddings_tied(model: nn.Module) -> bool:
    """True when the LM head shares its weight with the token embedding (checked on the
    tensors, not only the config flag, since heads without an LM head tie nothing)."""
    info = arch_info(model)
    head = find(model, info.lm_head) if info.lm_head else None
    emb = find(model, info.token_embedding)
    return head is not None and emb is not None and head.weight is emb.weight


def outside_modules(model: nn.Module, info: ArchInfo | None = None) -> dict[str, nn.Module]:
    """Every module of the top model outside the stacks, by path: embeddings, embedding and
    final norms, projections, pooler, task and LM heads."""
    info = info or arch_info(model)
    prefix = base_prefix(model)
    stacks = tuple(f"{prefix}{stack.path}" for stack in info.stacks)
    return {n: m for n, m in model.named_modules()
            if not any(n == s or n.startswith(s + ".") for s in stacks)}


def base_prefix(model: nn.Module) -> str:
    """Path of `model.base_model` inside `model`, with a trailing dot ("" for a base model)."""
    base = model.base_model
    if base is model:
        return ""
    return next(n for n, m in model.named_modules() if m is base) + "."


def position_limit(model: nn.Module) -> int | None:
    """Longest input a model with a learned position table takes (None: rotary or relative
    positions, no such limit). Inputs past it fail with an index error deep in the forward
    pass. The table is an embedding named for positions (`wpe`,
    `position_embeddings`, `embed_positions`); its first rows may be reserved: BART and OPT
    offset positions by 2 (`offset`), RoBERTa numbers them from `padding_idx + 1`."""
    if getattr(model.config, "position_embedding_type", "absolute") != "absolute":
        return None
    limits = []
    for path, module in model.named_modules():
        leaf = path.rpartition(".")[2]
        if isinstance(module, nn.Embedding) and ("position" in leaf or leaf == "wpe"):
            offset = getattr(module, "offset", 0)
            offset = offset if isinstance(offset, int) else 0
            if module.padding_idx is not None:
                offset += module.padding_idx + 1
            limits.append(module.num_embeddings - offset)
    return min(limits) if limits else None
