"""Where each architecture keeps its layers, attention, MLP, norms, embeddings and heads.

A data table (frozen dataclasses, one `ArchInfo` per `config.model_type`) plus small accessors.
Depth cuts (`distill.compress.depth.keep_layers`) use the stacks and config keys; width slicing will
use the per-block module names, which is why they are recorded here already.

Path conventions (every path is dotted, as in `named_modules()`):
- stack paths, embeddings, final norms and the pooler are relative to `model.base_model`;
- names inside a block (attention, MLP, norms) are relative to the block;
- the LM head and task heads are relative to the top model.

Layouts were read from transformers' `models/<family>/modeling_<family>.py` (5.x).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from distill.errors import DistillError

# Config lists indexed by layer (transformers 5.x: `layer_types` in Qwen2 and any config that
# passes it, `mlp_layer_types` in MoE-style configs); a depth cut must slice them.
PER_LAYER_KEYS: tuple[str, ...] = ("layer_types", "mlp_layer_types")


@dataclass(frozen=True)
class Attention:
    """One attention sub-layer; every name is relative to the block.

    `fused` names a single projection holding several of Q/K/V stacked along the output axis
    in the order of `fused_parts` (GPT-2: `c_attn` = [Q; K; V], its cross-attention `c_attn`
    = [K; V] with a separate `q_attn`). `conv1d` means the weights are transformers' `Conv1D`,
    stored as (in, out), the transpose of `nn.Linear`, so width slicing cuts the other axis.
    """

    module: str  # the attention module itself (it carries `layer_idx`)
    o: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    fused: str | None = None
    fused_parts: str = ""
    conv1d: bool = False
    # T5: the relative-position table, owned by block 0's self-attention and shared with all
    # later blocks through the `position_bias` they are handed.
    relative_bias: str | None = None


@dataclass(frozen=True)
class Mlp:
    """Feed-forward names relative to the block: `down(act(gate(x)) * up(x))` when gated,
    else `down(act(up(x)))`."""

    up: str
    down: str
    gate: str | None = None
    conv1d: bool = False


@dataclass(frozen=True)
class Stack:
    """One ModuleList of blocks and what lives inside each block."""

    name: str  # "layers", or "encoder" / "decoder" for encoder–decoder models
    path: str  # from `model.base_model` to the ModuleList
    num_layers_key: str  # top-level config key counting these blocks
    attention: Attention
    mlp: tuple[Mlp, ...]  # alternatives; the first whose modules exist applies (T5 gated or not)
    norms: tuple[str, ...]  # per-block norms, in forward order
    final_norm: str | None = None  # from `model.base_model`
    cross_attention: Attention | None = None  # present only when the config enables it
    # Key on the stack's *own* config object (T5Stack deep-copies the config), if it has one.
    stack_config_key: str | None = None
    per_layer_keys: tuple[str, ...] = PER_LAYER_KEYS


@dataclass(frozen=True)
class ConfigKeys:
    """Config attributes of the widths (the stacks carry their own layer-count keys)."""

    hidden_size: str
    num_heads: str
    intermediate_size: str
    num_kv_heads: str | None = None  # None: as many K/V heads as query heads
    head_dim: str | None = None  # None: hidden_size // num_heads


@dataclass(frozen=True)
class Embeddings:
    """Input embeddings, relative to `model.base_model`."""

    token: str
    position: str | None = None  # None: rotary (Llama family) or relative bias (T5)
    token_type: str | None = None
    norm: str | None = None
    projection: str | None = None  # ELECTRA: embedding_size -> hidden_size, when they differ


@dataclass(frozen=True)
class ArchInfo:
    """Layout facts of one model family."""

    family: str
    stacks: tuple[Stack, ...]
    config: ConfigKeys
    embeddings: Embeddings
    lm_head: str | None  # projection to the vocabulary, from the top model
    heads: tuple[str, ...]  # task heads that may exist on the top model (whichever do)
    pooler: str | None = None  # from `model.base_model`
    tie_key: str = "tie_word_embeddings"

    @property
    def layers_path(self) -> str:
        """Path of the first (or only) stack; kept for callers of the one-stack API."""
        return self.stacks[0].path

    @property
    def num_layers_key(self) -> str:
        return self.stacks[0].num_layers_key


# --- the table ---------------------------------------------------------------------------------

def _bert_like(family: str, lm_head: str, heads: tuple[str, ...], *, pooler: str | None,
               projection: str | None = None) -> ArchInfo:
    """BERT, RoBERTa, XLM-R and ELECTRA share the block layout (post-LayerNorm encoder)."""
    attn = Attention("attention.self", q="attention.self.query", k="attention.self.key",
                     v="attention.self.value", o="attention.output.dense")
    cross = Attention("crossattention.self", q="crossattention.self.query",
                      k="crossattention.self.key", v="crossattention.self.value",
                      o="crossattention.output.dense")
    stack = Stack("layers", "encoder.layer", "num_hidden_layers", attn,
                  (Mlp(up="intermediate.dense", down="output.dense"),),
                  norms=("attention.output.LayerNorm", "crossattention.output.LayerNorm",
                         "output.LayerNorm"),
                  cross_attention=cross)
    return ArchInfo(family, (stack,),
                    ConfigKeys("hidden_size", "num_attention_heads", "intermediate_size"),
                    Embeddings("embeddings.word_embeddings", "embeddings.position_embeddings",
                               "embeddings.token_type_embeddings", "embeddings.LayerNorm",
                               projection),
                    lm_head, heads, pooler=pooler)


def _llama_like(family: str) -> ArchInfo:
    """Llama, Qwen2 and Mistral: pre-RMSNorm decoder, grouped-query attention, gated MLP."""
    attn = Attention("self_attn", q="self_attn.q_proj", k="self_attn.k_proj",
                     v="self_attn.v_proj", o="self_attn.o_proj")
    stack = Stack("layers", "layers", "num_hidden_layers", attn,
                  (Mlp(up="mlp.up_proj", down="mlp.down_proj", gate="mlp.gate_proj"),),
                  norms=("input_layernorm", "post_attention_layernorm"), final_norm="norm")
    return ArchInfo(family, (stack,),
                    ConfigKeys("hidden_size", "num_attention_heads", "intermediate_size",
                               num_kv_heads="num_key_value_heads", head_dim="head_dim"),
                    Embeddings("embed_tokens"), "lm_head", ("score", "qa_outputs"))


def _t5_stack(name: str, num_layers_key: str) -> Stack:
    """T5 blocks hold `layer` = [self-attn, (cross-attn,) feed-forward], each with its norm."""
    decoder = name == "decoder"
    ff = "layer.2" if decoder else "layer.1"
    attn = Attention("layer.0.SelfAttention", q="layer.0.SelfAttention.q",
                     k="layer.0.SelfAttention.k", v="layer.0.SelfAttention.v",
                     o="layer.0.SelfAttention.o",
                     relative_bias="layer.0.SelfAttention.relative_attention_bias")
    cross = Attention("layer.1.EncDecAttention", q="layer.1.EncDecAttention.q",
                      k="layer.1.EncDecAttention.k", v="layer.1.EncDecAttention.v",
                      o="layer.1.EncDecAttention.o") if decoder else None
    mlps = (Mlp(up=f"{ff}.DenseReluDense.wi_1", down=f"{ff}.DenseReluDense.wo",
                gate=f"{ff}.DenseReluDense.wi_0"),  # feed_forward_proj="gated-*" (T5 v1.1)
            Mlp(up=f"{ff}.DenseReluDense.wi", down=f"{ff}.DenseReluDense.wo"))
    norms = ("layer.0.layer_norm", "layer.1.layer_norm") + (("layer.2.layer_norm",)
                                                             if decoder else ())
    return Stack(name, f"{name}.block", num_layers_key, attn, mlps, norms,
                 final_norm=f"{name}.final_layer_norm", cross_attention=cross,
                 stack_config_key="num_layers", per_layer_keys=())


_GPT2_STACK = Stack(
    "layers", "h", "n_layer",
    Attention("attn", fused="attn.c_attn", fused_parts="qkv", o="attn.c_proj", conv1d=True),
    (Mlp(up="mlp.c_fc", down="mlp.c_proj", conv1d=True),),
    norms=("ln_1", "ln_cross_attn", "ln_2"), final_norm="ln_f",
    cross_attention=Attention("crossattention", q="crossattention.q_attn",
                              fused="crossattention.c_attn", fused_parts="kv",
                              o="crossattention.c_proj", conv1d=True))

_FAMILIES: dict[str, ArchInfo] = {
    # MiniLM checkpoints are model_type "bert".
    "bert": _bert_like("bert", "cls.predictions.decoder", ("classifier", "cls", "qa_outputs"),
                       pooler="pooler.dense"),
    "roberta": _bert_like("roberta", "lm_head.decoder", ("classifier", "lm_head", "qa_outputs"),
                          pooler="pooler.dense"),
    "xlm-roberta": _bert_like("xlm-roberta", "lm_head.decoder",
                              ("classifier", "lm_head", "qa_outputs"), pooler="pooler.dense"),
    "electra": _bert_like("electra", "generator_lm_head",
                          ("classifier", "generator_predictions", "discriminator_predictions",
                           "qa_outputs"), pooler=None, projection="embeddings_project"),
    "gpt2": ArchInfo("gpt2", (_GPT2_STACK,), ConfigKeys("n_embd", "n_head", "n_inner"),
                     Embeddings("wte", position="wpe"), "lm_head",
                     ("score", "classifier", "qa_outputs", "multiple_choice_head")),
    "llama": _llama_like("llama"),
    "qwen2": _llama_like("qwen2"),
    "mistral": _llama_like("mistral"),
    "t5": ArchInfo("t5", (_t5_stack("encoder", "num_layers"),
                          _t5_stack("decoder", "num_decoder_layers")),
                   ConfigKeys("d_model", "num_heads", "d_ff", head_dim="d_kv"),
                   Embeddings("shared"), "lm_head",
                   ("classification_head", "classifier", "qa_outputs")),
}


# --- accessors ---------------------------------------------------------------------------------

def supported_families() -> list[str]:
    return sorted(_FAMILIES)


def arch_info_for(model_type: str | None) -> ArchInfo:
    """The layout of a `config.model_type`, or a clear error listing the supported ones."""
    if model_type not in _FAMILIES:
        raise DistillError(f"architecture {model_type!r} is not supported for shrinking; "
                           f"supported: {', '.join(supported_families())}")
    return _FAMILIES[model_type]


def arch_info(model: nn.Module) -> ArchInfo:
    """The layout of `model`'s family, or a clear error listing the supported ones."""
    return arch_info_for(getattr(getattr(model, "config", None), "model_type", None))


def find(root: nn.Module, path: str) -> nn.Module | None:
    """The submodule at dotted `path` under `root`, or None where it does not exist
    (optional parts: cross-attention, pooler, ELECTRA's projection, one task head of many)."""
    node: nn.Module | None = root
    for part in filter(None, path.split(".")):
        node = getattr(node, part, None)
        if not isinstance(node, nn.Module):
            return None
    return node


def present_stacks(model: nn.Module) -> list[tuple[Stack, nn.ModuleList]]:
    """Each stack the model actually has, with its ModuleList (T5EncoderModel: encoder only)."""
    info = arch_info(model)
    found = [(stack, find(model.base_model, stack.path)) for stack in info.stacks]
    result = [(stack, blocks) for stack, blocks in found if isinstance(blocks, nn.ModuleList)]
    assert result, f"no layer stack of {info.family} found in {type(model).__name__}"
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


def mlp_names(stack: Stack, block: nn.Module) -> Mlp:
    """The MLP layout that applies to `block` (T5 is gated or not depending on its config)."""
    for mlp in stack.mlp:
        if find(block, mlp.up) is not None:
            return mlp
    raise AssertionError(f"no known MLP layout in block {type(block).__name__}")


def head_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The task heads and LM head present on the top model, by path."""
    info = arch_info(model)
    paths = info.heads + ((info.lm_head,) if info.lm_head else ())
    return {p: m for p in paths if (m := find(model, p)) is not None}


def embeddings_tied(model: nn.Module) -> bool:
    """True when the LM head shares its weight with the token embedding (checked on the
    tensors, not only the config flag, since heads without an LM head tie nothing)."""
    info = arch_info(model)
    head = find(model, info.lm_head) if info.lm_head else None
    emb = find(model.base_model, info.embeddings.token)
    return head is not None and emb is not None and head.weight is emb.weight


@dataclass(frozen=True)
class Dims:
    """Resolved widths of a model (defaults filled in as the modeling code fills them)."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int


def dims(model: nn.Module) -> Dims:
    """The widths of `model`, read through the family's config keys."""
    keys, cfg = arch_info(model).config, model.config
    hidden, heads = getattr(cfg, keys.hidden_size), getattr(cfg, keys.num_heads)
    kv = getattr(cfg, keys.num_kv_heads, None) if keys.num_kv_heads else None
    head_dim = getattr(cfg, keys.head_dim, None) if keys.head_dim else None
    inter = getattr(cfg, keys.intermediate_size)
    # GPT-2 leaves n_inner None to mean 4 * n_embd (GPT2Block does the same).
    return Dims(hidden, heads, kv or heads, head_dim or hidden // heads,
                inter if inter is not None else 4 * hidden)
