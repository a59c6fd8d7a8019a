"""The model's layout as `peft_methods` takes it: where the PEFT methods' default targets are.

`peft_methods` reads no model family (it imports torch and transformers only); the toolkit
passes it this `Layout`, made from the same discovered facts as the cutters use, so LoRA's
query/value projections, IA3's keys/values/feed-forward outputs, the bottleneck adapters'
sub-layer outputs and UniPELT's prefix-reading attention are found on every architecture
`distill.arch` understands.
"""

from __future__ import annotations

from torch import nn

from distill.arch import arch_info, base_prefix, find, present_stacks
from distill.errors import DistillError
from peft_methods import Layout


def peft_layout(model: nn.Module) -> Layout | None:
    """Full module paths of `model`'s query, key, value (fused QKV standing for each) and
    output projections, feed-forward outputs and prefix-reading self-attention modules; None
    where the architecture is not understood (the methods then ask for their targets)."""
    try:
        info = arch_info(model)
    except DistillError:
        return None
    prefix = base_prefix(model)
    roles: dict[str, list[str]] = {r: [] for r in (
        "query", "key", "value", "attention_output", "cross_attention_output", "ffn_output",
        "prefix_attention")}
    decoder = [s for s in info.stacks if s.name == "decoder"]
    for stack, blocks in present_stacks(model, info):
        for i in range(len(blocks)):
            at = f"{prefix}{stack.path}.{i}."
            present = blocks[i]
            for attention, output in ((stack.attention, "attention_output"),
                                      (stack.cross_attention, "cross_attention_output")):
                if attention is None or find(present, attention.module) is None:
                    continue
                for role, part in (("query", "q"), ("key", "k"), ("value", "v")):
                    own = getattr(attention, part)
                    path = own or (attention.fused if part in attention.fused_parts else None)
                    if path:
                        roles[role].append(at + path)
                roles[output].append(at + attention.o)
            if stack.mlp is not None and stack.mlp.down:
                roles["ffn_output"].append(at + stack.mlp.down)
            # The prefix is read by the self-attention of the stack that generates: the
            # decoder of an encoder–decoder model, else the only stack.
            if stack.attention is not None and (not decoder or stack in decoder):
                roles["prefix_attention"].append(at + stack.attention.module)
    return Layout(**{role: tuple(dict.fromkeys(paths)) for role, paths in roles.items()})
