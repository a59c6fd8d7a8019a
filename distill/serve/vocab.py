"""Vocabulary trimming: a task student keeps the tokens its task's data uses.

A classifier's embedding table is most of a small student (MiniLM-L6's 30,522 rows are 11.9 M
of the 3-layer student's 17.4 M parameters), yet a task's data touches a few thousand of them.
`trim` keeps the rows of the tokens in `keep` (the data's tokens plus the special ones), in
their old order, and rewrites the tokenizer to match: its vocabulary, added tokens, the ids its
post-processor inserts ([CLS], [SEP], ...) and the ids in its config. Both save and load with
plain `AutoModel*` / `AutoTokenizer`.

Tokenization of text made of kept tokens does not change: WordPiece takes the longest
vocabulary entry at each position, Unigram the best-scoring segmentation and WordLevel the
whole word; a kept entry is still there and no new one appears, so the same pieces win. BPE
applies merge rules in order, where removing a token would break the merges that build longer
ones: refused. Text with
tokens outside `keep` becomes the unknown token: the trimmed model serves the task's
vocabulary only.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from distill.errors import DistillError

TRIMMABLE = ("WordPiece", "Unigram", "WordLevel")
# Config keys that hold a token id.
_ID_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id",
            "unk_token_id", "mask_token_id", "decoder_start_token_id")


def kept_ids(tokenizer: PreTrainedTokenizerBase, datasets: Iterable[Iterable[dict]]
             ) -> list[int]:
    """The ids of every token in `datasets` (items with `input_ids`) and of the tokenizer's
    special and added tokens, sorted."""
    keep = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    for dataset in datasets:
        for item in dataset:
            keep.update(item["input_ids"])
    return sorted(keep)


def trim(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, keep: list[int]
         ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, torch.Tensor]:
    """`model` (changed in place) and a new tokenizer with the vocabulary `keep` (sorted old
    ids); also the lookup old id -> new id [V_old] (the unknown token's new id where an old
    token is gone).

    Raises:
        DistillError: the tokenizer is not a fast WordPiece or Unigram tokenizer.
    """
    spec = _tokenizer_json(tokenizer)
    kind = spec["model"]["type"]
    if kind not in TRIMMABLE:
        raise DistillError(f"vocabulary trimming supports WordPiece, Unigram and WordLevel "
                           f"tokenizers; this one is {kind} (its merges build tokens from "
                           "the ones a trim would remove)")
    old_size = model.get_input_embeddings().weight.shape[0]
    mapping = {old: new for new, old in enumerate(keep)}
    unk = mapping.get(tokenizer.unk_token_id) if tokenizer.unk_token_id is not None else None
    lookup = torch.full((max(old_size, len(tokenizer)),), -1 if unk is None else unk,
                        dtype=torch.long)
    lookup[torch.tensor(keep)] = torch.arange(len(keep))
    new_tokenizer = _trim_tokenizer(tokenizer, spec, mapping)
    _trim_embeddings(model, keep, mapping)
    return model, new_tokenizer, lookup


def _tokenizer_json(tokenizer: PreTrainedTokenizerBase) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DistillError(f"vocabulary trimming needs a fast tokenizer (tokenizer.json); "
                           f"{type(tokenizer).__name__} has none")
    return json.loads(backend.to_str())


def _remap_ids(node: Any, mapping: dict[int, int]) -> Any:
    """The post-processor's and padding's token ids renumbered (`ids`, `pad_id`, and
    BERT/RoBERTa processors' `[token, id]` pairs)."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "ids" and isinstance(value, list):
                out[key] = [mapping[i] for i in value]
            elif key == "pad_id" and isinstance(value, int):
                out[key] = mapping.get(value, value)
            elif key in ("sep", "cls") and isinstance(value, list) and len(value) == 2:
                out[key] = [value[0], mapping[value[1]]]
            else:
                out[key] = _remap_ids(value, mapping)
        return out
    if isinstance(node, list):
        return [_remap_ids(v, mapping) for v in node]
    return node


def _trim_tokenizer(tokenizer: PreTrainedTokenizerBase, spec: dict,
                    mapping: dict[int, int]) -> PreTrainedTokenizerBase:
    """The tokenizer saved, its files rewritten for the kept ids, and loaded back."""
    model = spec["model"]
    if model["type"] in ("WordPiece", "WordLevel"):
        model["vocab"] = {tok: mapping[i] for tok, i in model["vocab"].items() if i in mapping}
    else:  # Unigram: [piece, score] by id
        if model.get("unk_id") is not None:
            model["unk_id"] = mapping[model["unk_id"]]
        model["vocab"] = [entry for i, entry in enumerate(model["vocab"]) if i in mapping]
    spec["added_tokens"] = [t | {"id": mapping[t["id"]]} for t in spec.get("added_tokens", [])
                            if t["id"] in mapping]
    for key in ("post_processor", "padding"):
        spec[key] = _remap_ids(spec.get(key), mapping)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tokenizer.save_pretrained(folder)
        # Only tokenizer.json describes the new vocabulary: the slow tokenizer's files go.
        for name in ("vocab.txt", "spiece.model", "sentencepiece.bpe.model", "vocab.json"):
            (folder / name).unlink(missing_ok=True)
        (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False),
                                               encoding="utf-8")
        config_path = folder / "tokenizer_config.json"
        if config_path.is_file():
            config = json.loads(config_path.read_text(encoding="utf-8"))
            added = config.get("added_tokens_decoder") or {}
            config["added_tokens_decoder"] = {str(mapping[int(i)]): v for i, v in added.items()
                                              if int(i) in mapping}
            config_path.write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
        return AutoTokenizer.from_pretrained(folder)


def _trim_embeddings(model: PreTrainedModel, keep: list[int], mapping: dict[int, int]) -> None:
    """The embedding rows (and a separate output head's rows) of `keep`, in place; the
    modules stay (a scaled embedding keeps its scale), their weights shrink."""
    index = torch.tensor(keep)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    emb.weight = nn.Parameter(emb.weight.detach()[index].clone(),
                              requires_grad=emb.weight.requires_grad)
    emb.num_embeddings = len(keep)
    if emb.padding_idx is not None:
        emb.padding_idx = mapping.get(emb.padding_idx)
    if head is not None:
        if tied:
            head.weight = emb.weight
        else:
            head.weight = nn.Parameter(head.weight.detach()[index].clone())
        if getattr(head, "bias", None) is not None:
            head.bias = nn.Parameter(head.bias.detach()[index].clone())
        head.out_features = len(keep)
    config = model.config
    config.vocab_size = len(keep)
    for key in _ID_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int):
            setattr(config, key, mapping.get(value))
