"""One tiny random model per architecture family, built from its transformers config.

The coverage matrix (`tests/test_families.py`) runs the same contract on every row: depth 4,
hidden 32, 4 heads of 8 (2 key/value heads where the family has grouped-query attention),
MLP 64, vocab 100. A row states only what is particular to its family: nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from transformers import PreTrainedModel

VOCAB, HIDDEN, DEPTH = 100, 32, 4
SPECIAL = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}


@dataclass(frozen=True)
class Family:
    """How to build one family's tiny model and what its contract row expects."""

    config: str  # transformers config class
    model: str  # transformers model class (with its usual head)
    auto: str  # the Auto class that reloads it
    kind: str  # "encoder" (classifier), "decoder" (causal LM) or "seq2seq"
    kwargs: dict[str, Any] = field(default_factory=dict)
    gqa: bool = False  # 2 key/value heads for 4 query heads
    # Width cut (real, not keeping everything); None: the family is not cut in width.
    width: dict[str, int] | None = field(default_factory=lambda: {"hidden": 16, "heads": 2,
                                                                  "intermediate": 32})
    depth: list[int] = field(default_factory=lambda: [1, 3])  # a real depth cut
    moe: bool = False


_DEC = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": DEPTH,
        "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64,
        **SPECIAL}
_GQA = {**_DEC, "num_key_value_heads": 2}
_ENC = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": DEPTH,
        "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64,
        "num_labels": 3}

FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaConfig", "LlamaForCausalLM", "AutoModelForCausalLM", "decoder",
                    {**_GQA, "tie_word_embeddings": True}, gqa=True),
    "mistral": Family("MistralConfig", "MistralForCausalLM", "AutoModelForCausalLM", "decoder",
                      {**_GQA, "sliding_window": 4}, gqa=True),
    # layers 2, 3 slide over a window of 4 tokens: layer_types is mixed
    "qwen2": Family("Qwen2Config", "Qwen2ForCausalLM", "AutoModelForCausalLM", "decoder",
                    {**_GQA, "use_sliding_window": True, "sliding_window": 4,
                     "max_window_layers": 2}, gqa=True),
    "qwen3": Family("Qwen3Config", "Qwen3ForCausalLM", "AutoModelForCausalLM", "decoder",
                    {**_GQA, "head_dim": 8}, gqa=True),
    "gemma": Family("GemmaConfig", "GemmaForCausalLM", "AutoModelForCausalLM", "decoder",
                    {**_GQA, "head_dim": 8}, gqa=True),
    "gemma2": Family("Gemma2Config", "Gemma2ForCausalLM", "AutoModelForCausalLM", "decoder",
                     {**_GQA, "head_dim": 8, "sliding_window": 4}, gqa=True),
    "gemma3_text": Family("Gemma3TextConfig", "Gemma3ForCausalLM", "AutoModelForCausalLM",
                          "decoder", {**_GQA, "head_dim": 8, "sliding_window": 4,
                                      "layer_types": ["sliding_attention", "full_attention",
                                                      "sliding_attention", "full_attention"]},
                          gqa=True),
    "phi3": Family("Phi3Config", "Phi3ForCausalLM", "AutoModelForCausalLM", "decoder",
                   {**_GQA, "original_max_position_embeddings": 64}, gqa=True),
    "olmo2": Family("Olmo2Config", "Olmo2ForCausalLM", "AutoModelForCausalLM", "decoder",
                    _GQA, gqa=True),
    "gpt2": Family("GPT2Config", "GPT2LMHeadModel", "AutoModelForCausalLM", "decoder",
                   {"vocab_size": VOCAB, "n_embd": HIDDEN, "n_layer": DEPTH, "n_head": 4,
                    "n_inner": 64, "n_positions": 64, **SPECIAL}),
    "gpt_neox": Family("GPTNeoXConfig", "GPTNeoXForCausalLM", "AutoModelForCausalLM",
                       "decoder", _DEC),
    "opt": Family("OPTConfig", "OPTForCausalLM", "AutoModelForCausalLM", "decoder",
                  {**{k: v for k, v in _DEC.items() if k != "intermediate_size"},
                   "ffn_dim": 64, "word_embed_proj_dim": HIDDEN}),
    # QKV fused per head (the OVERRIDES row); the MLP is 4 × hidden with no config key, so a
    # width cut keeps that ratio; ALiBi positions
    "bloom": Family("BloomConfig", "BloomForCausalLM", "AutoModelForCausalLM", "decoder",
                    {"vocab_size": VOCAB, "hidden_size": HIDDEN, "n_layer": DEPTH, "n_head": 4,
                     **SPECIAL}, width={"hidden": 16, "heads": 2, "intermediate": 64}),
    "gptj": Family("GPTJConfig", "GPTJForCausalLM", "AutoModelForCausalLM", "decoder",
                   {"vocab_size": VOCAB, "n_embd": HIDDEN, "n_layer": DEPTH, "n_head": 4,
                    "n_inner": 64, "n_positions": 64, "rotary_dim": 4, **SPECIAL}),
    "stablelm": Family("StableLmConfig", "StableLmForCausalLM", "AutoModelForCausalLM",
                       "decoder", {**_GQA, "partial_rotary_factor": 0.5,
                                   "use_qkv_bias": True}, gqa=True),
    "starcoder2": Family("Starcoder2Config", "Starcoder2ForCausalLM", "AutoModelForCausalLM",
                         "decoder", {**_GQA, "sliding_window": 4}, gqa=True),
    "mixtral": Family("MixtralConfig", "MixtralForCausalLM", "AutoModelForCausalLM", "decoder",
                      {**_GQA, "num_local_experts": 4, "num_experts_per_tok": 2}, gqa=True,
                      width=None, moe=True),
    "bert": Family("BertConfig", "BertForSequenceClassification",
                   "AutoModelForSequenceClassification", "encoder", _ENC),
    "roberta": Family("RobertaConfig", "RobertaForSequenceClassification",
                      "AutoModelForSequenceClassification", "encoder",
                      {**_ENC, "pad_token_id": 1}),
    "xlm-roberta": Family("XLMRobertaConfig", "XLMRobertaForSequenceClassification",
                          "AutoModelForSequenceClassification", "encoder",
                          {**_ENC, "pad_token_id": 1}),
    # embedding_size != hidden_size: ELECTRA's embeddings_project exists
    "electra": Family("ElectraConfig", "ElectraForSequenceClassification",
                      "AutoModelForSequenceClassification", "encoder",
                      {**_ENC, "embedding_size": 24}),
    "distilbert": Family("DistilBertConfig", "DistilBertForSequenceClassification",
                         "AutoModelForSequenceClassification", "encoder",
                         {"vocab_size": VOCAB, "dim": HIDDEN, "n_layers": DEPTH, "n_heads": 4,
                          "hidden_dim": 64, "max_position_embeddings": 64, "num_labels": 3}),
    "deberta-v2": Family("DebertaV2Config", "DebertaV2ForSequenceClassification",
                         "AutoModelForSequenceClassification", "encoder",
                         {**_ENC, "relative_attention": True, "pos_att_type": ["p2c", "c2p"],
                          "max_relative_positions": 16, "position_buckets": 8}),
    "modernbert": Family("ModernBertConfig", "ModernBertForSequenceClassification",
                         "AutoModelForSequenceClassification", "encoder",
                         {**_ENC, "global_attn_every_n_layers": 2, "local_attention": 4,
                          **SPECIAL, "cls_token_id": 2, "sep_token_id": 1},
                         depth=[0, 3]),  # block 0 has no attention norm: it stays first
    "t5": Family("T5Config", "T5ForConditionalGeneration", "AutoModelForSeq2SeqLM", "seq2seq",
                 {"vocab_size": VOCAB, "d_model": HIDDEN, "d_kv": 8, "d_ff": 64,
                  "num_layers": DEPTH, "num_heads": 4, "relative_attention_num_buckets": 8,
                  "relative_attention_max_distance": 16, "decoder_start_token_id": 0,
                  "pad_token_id": 0, "eos_token_id": 1}),
    "bart": Family("BartConfig", "BartForConditionalGeneration", "AutoModelForSeq2SeqLM",
                   "seq2seq", {"vocab_size": VOCAB, "d_model": HIDDEN, "encoder_layers": DEPTH,
                               "decoder_layers": DEPTH, "encoder_attention_heads": 4,
                               "decoder_attention_heads": 4, "encoder_ffn_dim": 64,
                               "decoder_ffn_dim": 64, "max_position_embeddings": 64,
                               "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
                               "decoder_start_token_id": 2, "forced_eos_token_id": 2}),
}


def build(name: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """The family's tiny model in eval mode; the same seed gives the same weights. `overrides`
    change config fields of the row."""
    family = FAMILIES[name]
    torch.manual_seed(seed)
    config = getattr(transformers, family.config)(**{**family.kwargs, **overrides})
    return getattr(transformers, family.model)(config).eval()


def inputs(name: str) -> dict[str, torch.Tensor]:
    """A batch of 2 × 7 tokens; encoders and seq2seq get one right-padded row."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 7), generator=g)
    if FAMILIES[name].kind == "decoder":
        return {"input_ids": ids}
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if FAMILIES[name].kind == "seq2seq":
        batch["decoder_input_ids"] = torch.randint(3, VOCAB, (2, 5), generator=g)
    return batch


@torch.no_grad()
def logits(model: PreTrainedModel, name: str) -> torch.Tensor:
    kwargs = {} if FAMILIES[name].kind == "encoder" else {"use_cache": False}
    return model(**inputs(name), **kwargs).logits


@torch.no_grad()
def generate(model: PreTrainedModel, use_cache: bool = True) -> Any:
    """9 greedy tokens (longer than the sliding windows of 4) with their scores."""
    prompt = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=9,
                          min_new_tokens=9, do_sample=False, use_cache=use_cache,
                          pad_token_id=0, output_scores=True, return_dict_in_generate=True)
