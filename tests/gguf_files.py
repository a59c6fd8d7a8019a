"""Writing tiny random transformers models as GGUF files, the way llama.cpp's converter does.

`write_gguf(model, path, arch)` is a miniature `convert_hf_to_gguf.py` for the families the
coverage matrix builds (`tests/families.py`): tensor names come from the `gguf` package's own
`TensorNameMap` (the table llama.cpp and transformers' GGUF reader both use), the metadata holds
llama.cpp's keys for the architecture, and the few value/layout conventions llama.cpp applies on
the way out are applied here, because those are exactly what transformers undoes on the way in:

- llama (and Mistral, which llama.cpp writes as "llama"): Q/K rows permuted into llama.cpp's
  rotary order (`LlamaModel.permute`), per query head for Q, per key/value head for K;
- gemma2 / gemma3: every RMSNorm weight stored as `w + 1` (ggml's norm does not add the 1 that
  Gemma's `(1 + w)` norm does);
- gpt2: the Conv1D weights (stored in-by-out by transformers) transposed to out-by-in rows, and
  the tied embedding written a second time as `output.weight`, as llama.cpp does for GPT-2.

Weights are written as F32, so a correct round trip through transformers is exact. Every file
carries a tokenizer of exactly the model's vocabulary size (the tiny models have 100 tokens):
byte-level BPE, or SentencePiece for Gemma as llama.cpp writes it.

`GGUF_FAMILIES` says which llama.cpp architecture each readable family is written as, and which
config fields its tiny model takes at the value transformers' reader assumes because it does not
read them from the file; `build_for_gguf(name)` builds that model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import transformers
from transformers import PreTrainedConfig, PreTrainedModel

from families import FAMILIES

# GGUF architecture (`general.architecture`) -> the `gguf.MODEL_ARCH` member naming its tensors.
_ARCHS = {"llama": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3", "phi3": "PHI3", "gpt2": "GPT2",
          "gemma2": "GEMMA2", "gemma3": "GEMMA3", "t5": "T5", "bloom": "BLOOM",
          "stablelm": "STABLELM", "starcoder2": "STARCODER2"}
# Architectures whose HF norms compute `x * (1 + w)`: llama.cpp stores `w + 1` for them.
_NORM_PLUS_ONE = {"gemma2", "gemma3"}
# Architectures with rotary embeddings (llama.cpp states the rotary width for them).
_ROTARY = {"llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "stablelm", "starcoder2"}
# Architectures that state their head width, which need not be hidden / heads.
_HEAD_WIDTH = {"qwen3", "gemma2", "gemma3", "t5"}
# Architectures whose llama.cpp files carry a SentencePiece vocabulary rather than byte-level BPE.
_SENTENCEPIECE = {"gemma2", "gemma3"}
# GPT-2's Conv1D layers, stored transposed with respect to nn.Linear.
_CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")
# llama.cpp's `tokenizer.ggml.token_type` value for control tokens (pad/eos/bos) and normal ones.
_CONTROL, _NORMAL = 3, 1

# (HF name, GGUF name, tensor) -> the tensor as llama.cpp stores it
TensorFix = Callable[[str, str, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class GgufFamily:
    """How a coverage-matrix family is written to GGUF."""

    arch: str  # llama.cpp's `general.architecture`
    # Config changes from the family's row, for what transformers' GGUF reader (5.23) cannot
    # take from the file and so fills in with the config class's default: the tiny model is
    # built with that default, as real checkpoints of the family have it.
    overrides: dict[str, Any] = field(default_factory=dict)


GGUF_FAMILIES: dict[str, GgufFamily] = {
    "llama": GgufFamily("llama"),
    # llama.cpp writes Mistral as "llama"; neither reader keeps a sliding window for it.
    "mistral": GgufFamily("llama", {"sliding_window": None}),
    # the qwen2 keys have no sliding window either
    "qwen2": GgufFamily("qwen2", {"use_sliding_window": False}),
    # `qwen3.attention.key_length` is not read: the head width is Qwen3Config's 128 (as in every
    # released Qwen3), not hidden / heads
    "qwen3": GgufFamily("qwen3", {"head_dim": 128}),
    "phi3": GgufFamily("phi3"),
    # `gpt2.context_length` goes to `n_ctx`, not `n_positions`, and the FFN width to no field:
    # both stay GPT-2's (1024 positions, 4 × hidden)
    "gpt2": GgufFamily("gpt2", {"n_positions": 1024, "n_inner": None}),
    "gemma2": GgufFamily("gemma2"),
    # no layer pattern is read (the default is 5 sliding layers, then a full one): 6 layers with
    # the default pattern hold one layer of each kind
    "gemma3_text": GgufFamily("gemma3", {"layer_types": None, "num_hidden_layers": 6}),
    # flan-T5, the T5 transformers' reader is written for: gated-GELU FFN, untied output head;
    # the relative-attention distance is not read (128, as in every T5)
    "bloom": GgufFamily("bloom"),
    # the rotary width is read, the share of the head it covers is not: StableLM's 0.25
    "stablelm": GgufFamily("stablelm", {"partial_rotary_factor": 0.25}),
    "starcoder2": GgufFamily("starcoder2", {"sliding_window": None}),
    "t5": GgufFamily("t5", {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
                            "relative_attention_max_distance": 128}),
}


def build_for_gguf(name: str, seed: int = 0) -> PreTrainedModel:
    """The family's tiny model (as `tests.families.build`) with its `GGUF_FAMILIES` overrides."""
    family = FAMILIES[name]
    kwargs = {**family.kwargs, **GGUF_FAMILIES[name].overrides}
    config = getattr(transformers, family.config)(**kwargs)
    torch.manual_seed(seed)
    return getattr(transformers, family.model)(config).eval()


def write_gguf(model: PreTrainedModel, path: Path, arch: str) -> None:
    """Write `model` to `path` as an F32 GGUF file of llama.cpp architecture `arch`.

    Args:
        model: a tiny model from `tests.families.build` (or one built the same way).
        path: the `.gguf` file to create.
        arch: llama.cpp's name for the architecture: "llama" (also for Mistral), "qwen2",
            "qwen3", "phi3", "gpt2", "gemma2", "gemma3" or "t5".
    """
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    # Real files carry names like "Mistral 7B Instruct". (transformers 5.23 switches to its
    # Mistral reader only for the exact name "mistral", and that reader then fails: gguf 0.19
    # has no "mistral" architecture to name the tensors by. Other names load as Llama.)
    writer.add_name(f"tiny {config.model_type}")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_hparams(writer, config, arch)
    _add_tokenizer(writer, config, arch)
    name_map = gguf.TensorNameMap(getattr(gguf.MODEL_ARCH, _ARCHS[arch]),
                                  config.num_hidden_layers)
    fix = _tensor_fix(config, arch)
    written: set[int] = set()
    for hf_name, tensor in model.state_dict().items():
        # A tied weight is one tensor under two names; llama.cpp writes it once (the
        # embedding) and the reader ties it again when `output.weight` is absent.
        if tensor.data_ptr() in written:
            continue
        written.add(tensor.data_ptr())
        module, _, kind = hf_name.rpartition(".")
        # (the table lists BLOOM's embedding norm without its `transformer.` prefix)
        gguf_module = name_map.get_name(module) or name_map.get_name(module.split(".", 1)[-1])
        if gguf_module is None:
            raise KeyError(f"{arch}: no GGUF name for {hf_name}")
        gguf_name = f"{gguf_module}.{kind}"
        data = fix(hf_name, gguf_name, tensor.detach().float().numpy())
        writer.add_tensor(gguf_name, np.ascontiguousarray(data))
        if arch == "gpt2" and gguf_module == "token_embd":
            # llama.cpp's GPT2Model writes the (tied) embedding again as the output head.
            writer.add_tensor("output.weight", np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tensor_fix(config: PreTrainedConfig, arch: str) -> TensorFix:
    """The per-tensor layout/value change llama.cpp applies for `arch` (identity elsewhere)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", heads)

    def fix(hf_name: str, gguf_name: str, w: np.ndarray) -> np.ndarray:
        if arch == "llama" and gguf_name.endswith(".attn_q.weight"):
            return _llama_cpp_permute(w, heads)
        if arch == "llama" and gguf_name.endswith(".attn_k.weight"):
            return _llama_cpp_permute(w, kv_heads)
        if arch in _NORM_PLUS_ONE and gguf_name.endswith("norm.weight"):
            return w + 1
        if arch == "gpt2" and hf_name.endswith(_CONV1D):
            return w.T
        if arch == "bloom" and gguf_name.split(".")[-2] == "attn_qkv":
            # BLOOM's fused QKV is [q_h; k_h; v_h] per head; llama.cpp stacks [Q; K; V].
            return w.reshape(heads, 3, -1, *w.shape[1:]).swapaxes(0, 1).reshape(w.shape)
        return w

    return fix


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order (convert_hf_to_gguf.py `LlamaModel.permute`): within each head,
    the interleaved rotary pairs of GPT-J style instead of HF's two halves."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _add_hparams(writer: Any, config: PreTrainedConfig, arch: str) -> None:
    """The `{arch}.*` hyper-parameters llama.cpp writes for this architecture."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = (getattr(config, "head_dim", None) or getattr(config, "d_kv", None)
                or hidden // heads)
    ffn = (getattr(config, "intermediate_size", None) or getattr(config, "d_ff", None)
           or getattr(config, "n_inner", None) or 4 * hidden)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(getattr(config, "max_position_embeddings", None)
                              or getattr(config, "n_positions", 512))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_vocab_size(config.vocab_size)
    if getattr(config, "rms_norm_eps", None) is not None:
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if getattr(config, "layer_norm_epsilon", None) is not None:
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
    if arch in _ROTARY:
        # Gemma 3 keeps one set of rotary parameters per attention kind; `rope.freq_base` is
        # the full-attention one (the reader leaves the sliding layers at the config default).
        rope = config.rope_parameters
        rope = rope.get("full_attention", rope)
        writer.add_rope_freq_base(rope["rope_theta"])
        writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    if arch in _HEAD_WIDTH:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch in {"gemma2", "gemma3"}:
        writer.add_sliding_window(config.sliding_window)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    if arch == "t5":
        writer.add_relative_attn_buckets_count(config.relative_attention_num_buckets)
        writer.add_decoder_start_token_id(config.decoder_start_token_id)


def _add_tokenizer(writer: Any, config: PreTrainedConfig, arch: str) -> None:
    """A BPE vocabulary of exactly `config.vocab_size` tokens, as llama.cpp writes one.

    The model's pad/eos/bos ids (and an unknown token) are control tokens; the rest are single
    characters (space, letters, digits, ...) and the few merged pieces of "the" and " a", enough
    for short English text to tokenize. Byte-level ("gpt2", space spelled `Ġ`) for most
    architectures; SentencePiece ("llama", space spelled `▁`, no merge list: the reader derives
    merges from the token order) for Gemma, whose tokenizer class only reads that spelling.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = {config.pad_token_id: "<pad>", config.eos_token_id: "</s>",
                getattr(config, "bos_token_id", None): "<s>"}
    specials.pop(None, None)
    # An unknown token too: Gemma's tokenizer class refuses a vocabulary without one.
    unk_id = min(set(range(config.vocab_size)) - set(specials))
    specials[unk_id] = "<unk>"
    sentencepiece = arch in _SENTENCEPIECE
    space = "\u2581" if sentencepiece else "\u0120"  # ▁ or Ġ
    words = [space + "t", "he", space + "the", space + "a"]
    chars = [space] + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    rest = [c for c in bytes_to_unicode().values() if c not in chars]
    plain = iter(chars + words + rest)
    tokens = [specials[i] if i in specials else next(plain) for i in range(config.vocab_size)]
    assert set(words) <= set(tokens), "vocabulary too small for the merged pieces"
    if sentencepiece:
        writer.add_tokenizer_model("llama")
        writer.add_token_scores([-float(i) for i in range(len(tokens))])  # earlier = preferred
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_merges([f"{space} t", "h e", f"{space}t he", f"{space} a"])
    writer.add_token_list(tokens)
    writer.add_token_types([_CONTROL if i in specials else _NORMAL for i in range(len(tokens))])
    writer.add_pad_token_id(config.pad_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_unk_token_id(unk_id)
    if getattr(config, "bos_token_id", None) is not None:
        writer.add_bos_token_id(config.bos_token_id)
    writer.add_add_bos_token(False)
