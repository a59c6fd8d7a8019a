"""What lives inside one block: attention projections, the MLP, the norms.

Read from the module tree: an attention sub-layer is a module whose class is an attention
(`...Attention`, `...Attn`), its projections are told apart by their names (the vocabulary
below covers the names transformers' models use) and checked against the widths later
(`distill.arch.discover`). What is not understood is reported, not guessed: a block whose
projections cannot be placed can still be cut in depth, and a width cut names what is missing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn
from transformers.pytorch_utils import Conv1D

from distill.arch.layout import Attention, Mlp

_ATTENTION_CLASS = re.compile(r"Attention|Attn")
_CROSS = re.compile(r"cross|encdec|encoder_attn", re.IGNORECASE)

# Projection names (the last, or last two, segments of a path inside the block).
_Q = {"q", "q_proj", "query", "q_lin", "query_proj", "q_attn", "wq"}
_K = {"k", "k_proj", "key", "k_lin", "key_proj", "wk"}
_V = {"v", "v_proj", "value", "v_lin", "value_proj", "wv"}
_FUSED_QKV = {"qkv_proj", "c_attn", "query_key_value", "Wqkv", "qkv", "W_pack"}
_Q_LIKE = {"pos_query_proj"}
_K_LIKE = {"pos_key_proj"}
_Q_NORM = {"q_norm", "q_layernorm", "query_layernorm"}
_K_NORM = {"k_norm", "k_layernorm", "key_layernorm"}
_RELATIVE_BIAS = "relative_attention_bias"
_GATE = {"gate_proj", "wi_0", "w1"}
_UP = {"up_proj", "fc1", "c_fc", "wi", "wi_1", "dense_h_to_4h", "lin1", "intermediate.dense",
       "w3", "fc_in"}
_DOWN = {"down_proj", "fc2", "c_proj", "wo", "dense_4h_to_h", "lin2", "output.dense", "w2",
         "Wo", "fc_out"}
_FUSED_GATE_UP = {"gate_up_proj", "Wi"}
_EXPERTS = re.compile(r"Experts|SparseMoe|MoeBlock|MoE", re.IGNORECASE)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "Norm" in type(module).__name__


def _named(path: str, names: set[str]) -> bool:
    """Whether `path` ends with one of `names` (one segment, or two such as `output.dense`)."""
    parts = path.split(".")
    return parts[-1] in names or ".".join(parts[-2:]) in names


@dataclass
class BlockParts:
    """One block's sub-layers, or what could not be placed in it."""

    attention: Attention | None = None
    cross_attention: Attention | None = None
    mlp: Mlp | None = None
    norms: tuple[str, ...] = ()
    problems: list[str] = field(default_factory=list)  # one line each, for width cuts


def read_block(block: nn.Module, first: nn.Module | None = None) -> BlockParts:
    """The parts of `block` (a typical block of its stack; `first`, the stack's block 0, is
    searched for a relative-position table only block 0 holds)."""
    parts = BlockParts()
    roots: list[str] = []
    for name, module in block.named_modules():
        if (name and _ATTENTION_CLASS.search(type(module).__name__)
                and not any(name.startswith(r + ".") for r in roots)
                and any(is_linear(m) for m in module.modules())):
            roots.append(name)
    q_k_norms: set[str] = set()
    for root in roots:
        cross = bool(_CROSS.search(root) or _CROSS.search(type(block.get_submodule(root)).__name__))
        attention = _read_attention(block, root, first, parts.problems, q_k_norms)
        if attention is None:
            continue
        if cross:
            parts.cross_attention = attention
        elif parts.attention is None:
            parts.attention = attention
        else:
            parts.problems.append(f"two self-attention sub-layers ({parts.attention.module}, "
                                  f"{attention.module})")
    if not roots:
        parts.problems.append("no attention sub-layer (a module whose class is an "
                              "...Attention holding linear projections)")
    inside = tuple(r + "." for r in roots)
    rest = {n: m for n, m in block.named_modules() if n and not n.startswith(inside)
            and n not in roots}
    parts.mlp = _read_mlp(rest, parts.problems)
    parts.norms = tuple(n for n, m in block.named_modules()
                        if n and is_norm(m) and n not in q_k_norms
                        and not (parts.mlp and parts.mlp.experts
                                 and n.startswith(parts.mlp.experts + ".")))
    return parts


def _read_attention(block: nn.Module, root: str, first: nn.Module | None,
                    problems: list[str], q_k_norms: set[str]) -> Attention | None:
    """The projections of the attention sub-layer at `root` (relative to the block)."""
    linears = {f"{root}.{n}" if n else root: m
               for n, m in block.get_submodule(root).named_modules() if is_linear(m)}
    roles: dict[str, list[str]] = {r: [] for r in ("q", "k", "v", "fused", "q_like", "k_like")}
    for path in linears:
        for role, names in (("q", _Q), ("k", _K), ("v", _V), ("fused", _FUSED_QKV),
                            ("q_like", _Q_LIKE), ("k_like", _K_LIKE)):
            if _named(path, names):
                roles[role].append(path)
                break
    norms = {n: m for n, m in block.get_submodule(root).named_modules() if is_norm(m)}
    q_norm = next((f"{root}.{n}" for n in norms if _named(n, _Q_NORM)), None)
    k_norm = next((f"{root}.{n}" for n in norms if _named(n, _K_NORM)), None)
    q_k_norms.update(n for n in (q_norm, k_norm) if n)  # never residual-stream norms
    placed = {p for paths in roles.values() for p in paths}
    rest = [p for p in linears if p not in placed]
    single = {r: paths[0] if len(paths) == 1 else None for r, paths in roles.items()
              if r in ("q", "k", "v", "fused")}
    if not (single["fused"] or (single["q"] and single["k"] and single["v"])) or len(rest) != 1:
        problems.append(f"attention {root}: could not tell its projections apart (query/key/"
                        f"value or one fused QKV, then one output projection); its linear "
                        f"layers: {', '.join(sorted(linears)) or 'none'}")
        return None
    o = rest[0]
    fused = single["fused"]
    parts = "".join(p for p in "qkv" if not single[p]) if fused else ""
    anchor = single["q"] or fused or o
    module = anchor.rpartition(".")[0] if "." in anchor else root
    relative = None
    for n, _ in (first or block).get_submodule(root).named_modules():
        if _named(n, {_RELATIVE_BIAS}):
            relative = f"{root}.{n}"
    return Attention(module=module, o=o, q=single["q"], k=single["k"], v=single["v"],
                     fused=fused, fused_parts=parts,
                     conv1d=isinstance(linears[o], Conv1D),
                     q_like=tuple(roles["q_like"]), k_like=tuple(roles["k_like"]),
                     q_norm=q_norm, k_norm=k_norm, relative_bias=relative)


def _read_mlp(rest: dict[str, nn.Module], problems: list[str]) -> Mlp | None:
    """The feed-forward projections among the block's modules outside its attention."""
    experts = next((n for n, m in rest.items() if _EXPERTS.search(type(m).__name__)
                    or n.rpartition(".")[2] == "experts"), None)
    if experts is not None:
        top = experts
        # The outermost MoE module (router + experts) is what a depth cut keeps whole.
        while "." in top:
            parent = rest.get(top.rpartition(".")[0])
            if parent is None or not _EXPERTS.search(type(parent).__name__):
                break
            top = top.rpartition(".")[0]
        return Mlp(down=None, experts=top)
    linears = {n: m for n, m in rest.items() if is_linear(m)}
    found: dict[str, list[str]] = {r: [] for r in ("gate", "up", "down", "fused")}
    for path in linears:
        for role, names in (("gate", _GATE), ("fused", _FUSED_GATE_UP), ("up", _UP),
                            ("down", _DOWN)):
            if _named(path, names):
                found[role].append(path)
                break
    one = {r: paths[0] if len(paths) == 1 else None for r, paths in found.items()}
    extra = sorted(set(linears) - {p for paths in found.values() for p in paths})
    if not one["down"] or not (one["up"] or one["fused"]) or extra:
        problems.append(f"feed-forward: could not tell its projections apart (an input, "
                        f"optionally a gate, and an output projection); linear layers outside "
                        f"the attention: {', '.join(sorted(linears)) or 'none'}")
        return None
    conv = isinstance(linears[one["down"]], Conv1D)
    return Mlp(down=one["down"], up=one["up"], gate=one["gate"], fused_gate_up=one["fused"],
               conv1d=conv)
