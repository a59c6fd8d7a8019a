"""Instruction and chat data for language models: conversations -> splits -> token sequences
whose loss falls on the responses only.

    dialogues = load_dialogues("builtin:chatterbot")          # three splits of conversations
    items = tokenize_dialogues(dialogues.train, tokenizer, max_length=256)

Sources: `builtin:chatterbot` (the `chatterbot-corpus` package's English YAML dialogues: each
conversation's turns alternate user / assistant), or a `.json`/`.jsonl` file of records that are
either chat `{"messages": [{"role": ..., "content": ...}, ...]}` or instructions
`{"instruction": ..., "input": ... (optional), "output": ...}` (Alpaca style: the input is
appended to the instruction after a blank line). A hub dataset or a folder saved by
`datasets` whose columns are `messages`, or `instruction` and `output`, is read as those
records (`dialogues_from_splits`), its own splits kept and the missing ones carved out of train.

Splits are by whole conversations: shuffled with `numpy.random.default_rng(split_seed)`, test
the first 10 %, validation the next 10 %, train the rest, as `distill.data.tables` does for rows.

A conversation is rendered with the tokenizer's chat template when it has one, else as
`User: ...` / `Assistant: ...` lines with the EOS after each answer. Each assistant turn is
tokenized on its own after the prompt that precedes it (the text the template renders up to
the generation prompt), exactly as the model sees it when it generates; those tokens are the
targets, every prompt token is labelled -100 (no loss, not counted by perplexity).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from distill.config.schema import check_seed
from distill.data.splits import carve_missing, holdout_split
from distill.data.text import sequence_prefix
from distill.errors import DistillError

CHATTERBOT = "builtin:chatterbot"
_SUFFIXES = (".json", ".jsonl")
IGNORE_INDEX = -100

Message = dict[str, str]  # {"role": "user" | "assistant" | "system", "content": str}


@dataclass
class Dialogues:
    """Conversations split by whole conversations."""

    train: list[list[Message]]
    validation: list[list[Message]]
    test: list[list[Message]]
    source: str

    def sizes(self) -> dict[str, int]:
        return {split: len(getattr(self, split)) for split in ("train", "validation", "test")}

    def split(self, name: str) -> list[list[Message]]:
        if name not in ("train", "validation", "test"):
            raise DistillError(f"split {name!r} is unknown; allowed: train, validation, test")
        return getattr(self, name)


def is_dialogue_source(source: str) -> bool:
    """Whether `source` names instruction/chat data (rather than a text corpus)."""
    return source == CHATTERBOT or Path(source).suffix.lower() in _SUFFIXES


def load_dialogues(source: str, split_seed: int = 0) -> Dialogues:
    """Read the conversations of `source` and split them (see the module docstring)."""
    check_seed(split_seed, "split_seed")
    conversations = _chatterbot() if source == CHATTERBOT else _records(Path(source))
    parts = holdout_split(len(conversations), split_seed, source, "conversations")
    return Dialogues(**{split: [conversations[i] for i in idx] for split, idx in parts.items()},
                     source=source)


def _chatterbot() -> list[list[Message]]:
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise DistillError(f"{CHATTERBOT} needs the pip package chatterbot-corpus; run "
                           "`make setup`")
    folder = Path(spec.submodule_search_locations[0]) / "data" / "english"
    out = []
    for path in sorted(folder.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for turns in data.get("conversations") or []:
            messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": str(t)}
                        for i, t in enumerate(turns or [])]
            if len(messages) % 2:  # a last question without an answer teaches nothing
                messages = messages[:-1]
            if messages:
                out.append(messages)
    return out


def _records(path: Path) -> list[list[Message]]:
    if not path.is_file():
        raise DistillError(f"instruction data not found: {path}; allowed: {CHATTERBOT}, or a "
                           f"{'/'.join(_SUFFIXES)} file of chat or instruction records")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except ValueError as exc:
        raise DistillError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(records, list):
        raise DistillError(f"{path}: expected a list of records")
    return [_conversation(r, f"{path} record {i + 1}") for i, r in enumerate(records)]


def is_dialogue_table(columns: list[str]) -> bool:
    """Whether a table with these columns holds chat or instruction records."""
    return "messages" in columns or {"instruction", "output"} <= set(columns)


def dialogues_from_splits(splits: dict, source: str, split_seed: int) -> Dialogues:
    """The conversations of `datasets` splits (`distill.data.hub.load_splits`) whose rows are
    chat or instruction records; missing splits carved out of train."""
    check_seed(split_seed, "split_seed")
    conversations = {split: [_conversation(r, f"{source} {split} record {i + 1}")
                             for i, r in enumerate(dataset)]
                     for split, dataset in splits.items()}
    parts = carve_missing(conversations, split_seed, source, "conversations")
    return Dialogues(parts["train"], parts["validation"], parts["test"], source=source)


def _conversation(record: Any, where: str) -> list[Message]:
    """One record as messages; a record of neither form is an error naming `where`."""
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        messages = record["messages"]
        for m in messages:
            if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                    and isinstance(m.get("content"), str)):
                raise DistillError(f"{where}: each message needs a role (system, user or "
                                   "assistant) and a string content")
        if not any(m["role"] == "assistant" for m in messages):
            raise DistillError(f"{where}: no assistant message, so nothing to learn")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if isinstance(record, dict) and isinstance(record.get("instruction"), str) and \
            isinstance(record.get("output"), str):
        prompt = record["instruction"]
        if isinstance(record.get("input"), str) and record["input"].strip():
            prompt = f"{prompt}\n\n{record['input']}"
        return [{"role": "user", "content": prompt},
                {"role": "assistant", "content": record["output"]}]
    raise DistillError(f"{where}: expected {{\"messages\": [...]}} or {{\"instruction\": ..., "
                       "\"output\": ...}} with string values")


# ----------------------------------------------------------------------------- tokenizing
def render(messages: list[Message], tokenizer: PreTrainedTokenizerBase,
           add_generation_prompt: bool) -> str:
    """The conversation as the model reads it: the tokenizer's chat template, or plain
    `User:`/`Assistant:` lines with the EOS closing each answer."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    eos = tokenizer.eos_token or ""
    text = "".join(f"User: {m['content']}\n" if m["role"] != "assistant"
                   else f"Assistant: {m['content']}{eos}\n" for m in messages)
    return text + ("Assistant: " if add_generation_prompt else "")


def encode(messages: list[Message], tokenizer: PreTrainedTokenizerBase, max_length: int,
           prefix: list[int] | None = None) -> tuple[list[int], list[int]]:
    """Token ids of the conversation and their labels: the ids on assistant turns, -100 on
    everything else; starting with the tokenizer's sequence prefix (BOS where it adds one;
    `prefix`, when the caller has it already: `sequence_prefix(tokenizer)`); cut to
    `max_length` tokens."""
    ids: list[int] = []
    labels: list[int] = []
    done = ""  # the text already tokenized
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:i], tokenizer, add_generation_prompt=True)
        full = render(messages[:i + 1], tokenizer, add_generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise DistillError("the tokenizer's chat template does not render a conversation "
                               "as its prompt followed by the answer; response-only labels "
                               "cannot be placed")
        for text, learn in ((prompt[len(done):], False), (full[len(prompt):], True)):
            piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            ids += piece
            labels += piece if learn else [IGNORE_INDEX] * len(piece)
        done = full
        if len(ids) >= max_length:
            break
    prefix = sequence_prefix(tokenizer) if prefix is None else prefix
    if prefix and ids[:len(prefix)] != prefix:  # a chat template may render BOS itself
        ids, labels = prefix + ids, [IGNORE_INDEX] * len(prefix) + labels
    return ids[:max_length], labels[:max_length]


@dataclass(eq=False)
class DialogueDataset(Dataset):
    """Tokenized conversations: `input_ids`, `attention_mask`, `labels` (-100 on prompts),
    `idx`."""

    input_ids: list[list[int]]
    labels: list[list[int]]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict:
        ids = self.input_ids[i]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": self.labels[i],
                "idx": i}


def tokenize_dialogues(conversations: list[list[Message]], tokenizer: PreTrainedTokenizerBase,
                       max_length: int, cap: int | None = None) -> DialogueDataset:
    """The conversations tokenized with response-only labels; those whose answers all fall
    past `max_length` are left out (nothing to learn or score). At most `cap` of them."""
    ids, labels = [], []
    prefix = sequence_prefix(tokenizer)  # once, not per conversation
    for messages in conversations:
        x, y = encode(messages, tokenizer, max_length, prefix)
        if any(t != IGNORE_INDEX for t in y[1:]):  # a target the model can predict
            ids.append(x)
            labels.append(y)
        if cap is not None and len(ids) >= cap:
            break
    if not ids:
        raise DistillError(f"no conversation has an answer within max_length {max_length} "
                           "tokens; raise data.max_length")
    return DialogueDataset(ids, labels)
