"""Tiny random models of each family the PEFT methods support, built from configs.

BERT (sequence classification, 3 labels), GPT-2 (causal LM, fused Conv1D attention), Llama
(causal LM with grouped KV heads), T5 (encoder–decoder). Hidden 32, 2 layers, vocab 100:
nothing is downloaded and a forward pass takes milliseconds.
"""

from __future__ import annotations

import torch
from torch import nn

import peft_methods as pm
from distill.arch.targets import peft_layout
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config,
                          GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel,
                          T5Config, T5ForConditionalGeneration)

VOCAB, HIDDEN, DEPTH = 100, 32, 2
FAMILIES = ("bert", "gpt2", "llama", "t5")
DECODERS = ("gpt2", "llama")


def build(family: str, seed: int = 0) -> PreTrainedModel:
    """A fresh tiny model; the same seed gives the same weights."""
    torch.manual_seed(seed)
    if family == "bert":
        model = BertForSequenceClassification(BertConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=DEPTH, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64, num_labels=3))
    elif family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=DEPTH,
                                           n_head=4, n_positions=64, bos_token_id=0,
                                           eos_token_id=1, pad_token_id=0))
    elif family == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=DEPTH, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
            bos_token_id=0, eos_token_id=1, pad_token_id=0))
    elif family == "t5":
        model = T5ForConditionalGeneration(T5Config(
            vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=64, num_layers=DEPTH, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    else:
        raise KeyError(family)
    return model.eval()


def inputs(family: str, batch: int = 2, length: int = 7, seed: int = 1
           ) -> dict[str, torch.Tensor]:
    """A batch with one right-padded row (the attention mask matters) and, for T5, decoder ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, length - 2:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if family == "t5":
        out["decoder_input_ids"] = torch.randint(2, VOCAB, (batch, 5), generator=g)
    return out


def labels_for(family: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Training targets: class ids for BERT, next tokens for the LMs, decoder targets for T5."""
    if family == "bert":
        return torch.arange(batch["input_ids"].shape[0]) % 3
    if family == "t5":
        return batch["decoder_input_ids"].clone()
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    return labels


def logits(model: nn.Module, family: str, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(family, **kw)).logits


def apply(model: nn.Module, method: str, **options) -> pm.AdaptedModel:
    """`peft_methods.apply` with the model's layout (the methods' default targets), as the
    toolkit applies methods."""
    return pm.apply(model, method, layout=peft_layout(model), **options)
