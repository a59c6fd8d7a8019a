"""`causal-lm`: next-token prediction; perplexity (lower is better).

Data: a text corpus (`builtin:shakespeare`, `builtin:bbc_news`, a folder of .txt/.md files, a
text column, a `datasets` source, or a list of them: `distill.data.text`; or read as a stream:
`distill.data.streaming`) split by whole documents and packed into blocks of `data.max_length`
tokens, every token a target; or instruction/chat data (`builtin:chatterbot`, a .json/.jsonl
file of chat or instruction records: `distill.data.dialogues`), one conversation per sequence,
the loss on the responses only. Model: an `AutoModelForCausalLM`. Distillation compares the
teacher's and the student's next-token distributions at every target position ([B, n, V]
logits, or the teacher's cached top-k), in chunks of positions so that float32 copies of the
whole vocabulary never exist for the whole batch (`distill.kd.token_losses`).
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from transformers import (
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from distill.config.recipe import DataConfig
from distill.data.batching import pad_collator
from distill.data.dialogues import (DialogueDataset, Dialogues, dialogues_from_splits,
                                    is_dialogue_source, is_dialogue_table, load_dialogues,
                                    render, tokenize_dialogues)
from distill.data.hub import check_source_options, is_datasets_source, load_splits
from distill.data.streaming import StreamedText
from distill.data.text import (SHAKESPEARE, BlockDataset, LMText, load_lm_text, mixture_blocks,
                               sample_blocks, text_from_splits, tokenize_blocks)
from distill.errors import DistillError
from distill.kd.token_losses import next_token_mask, token_ce_loss, token_kd_loss, token_nll
from distill.models.loading import check_weights, load_checked, load_config
from distill.kd import topk_cache
from distill.tasks.base import Task, TeacherCache, TeacherTarget, model_device

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_NEW_TOKENS = 32  # greedy tokens per sample
_PROMPT_TOKENS = 32  # tokens of a text document that prompt a sample


def _prompts(data: LMText | Dialogues, split: str, tokenizer: PreTrainedTokenizerBase,
             count: int = 3) -> list[str]:
    """`count` prompts spread over the split (see `CausalLM.serving_metrics`)."""
    items = data.split(split)
    if not items:
        raise DistillError(f"the {split} split holds no text to prompt the model with")
    picks = [items[(i * len(items)) // count] for i in range(count)]
    if isinstance(data, Dialogues):
        return [render(conv[:1], tokenizer, add_generation_prompt=True) for conv in picks]
    return [tokenizer.decode(tokenizer(doc, add_special_tokens=False)["input_ids"]
                             [:_PROMPT_TOKENS]) for doc in picks]


class CausalLM(Task):
    name: ClassVar[str] = "causal-lm"
    metric: ClassVar[str] = "perplexity"
    higher_is_better: ClassVar[bool] = False
    default_dataset: ClassVar[str] = SHAKESPEARE
    calibration_batch_size: ClassVar[int] = 8
    token_level: ClassVar[bool] = True

    # ------------------------------------------------------------------ data
    def load_data(self, cfg: DataConfig) -> LMText | Dialogues:
        check_source_options(cfg.dataset, cfg.config, cfg.split)
        sources = cfg.dataset if isinstance(cfg.dataset, list) else [cfg.dataset]
        dialogue = [s for s in sources if is_dialogue_source(s)]
        if cfg.streaming:
            if dialogue:
                raise DistillError(f"data.streaming: streams text; {dialogue[0]} is "
                                   "conversations, read whole (set data.streaming: false)")
            if cfg.max_train_examples is None or cfg.max_eval_examples is None:
                raise DistillError("data.streaming: needs data.max_train_examples and "
                                   "data.max_eval_examples, the blocks to read from the stream")
            return StreamedText(cfg.dataset, cfg.text_column, cfg.config, cfg.split)
        if dialogue and len(sources) > 1:
            raise DistillError(f"data.dataset: {dialogue[0]} is conversations; a list mixes text "
                               "corpora only; give conversations as the one dataset")
        if dialogue:
            return load_dialogues(dialogue[0], cfg.split_seed)
        if len(sources) == 1 and is_datasets_source(sources[0]):
            splits = load_splits(sources[0], cfg.config, cfg.split)
            if is_dialogue_table(splits["train"].column_names):
                return dialogues_from_splits(splits, sources[0], cfg.split_seed)
            return text_from_splits(splits, sources[0], cfg.text_column, cfg.split_seed)
        return load_lm_text(cfg.dataset, cfg.split_seed, cfg.text_column)

    def tokenize(self, data: LMText | Dialogues, split: str,
                 tokenizer: PreTrainedTokenizerBase, cfg: DataConfig
                 ) -> BlockDataset | DialogueDataset:
        """Text: the split's documents as one stream cut into blocks of `max_length` tokens;
        at most `max_train_examples` (train) or `max_eval_examples` blocks, spread over the
        split. Conversations: one sequence each, labels on the responses only, capped alike.

        Items come in a fixed order shuffled with `data.split_seed` (a stream's in stream
        order), so that the first few -- a shrink's calibration batch, a capped subset of
        conversations -- are drawn from the whole split, not from its first document."""
        cap = cfg.max_train_examples if split == "train" else cfg.max_eval_examples
        rng = np.random.default_rng(cfg.split_seed)
        if isinstance(data, StreamedText):
            assert cap is not None  # load_data refused a stream without caps
            return BlockDataset(data.blocks(split, tokenizer, cfg.max_length, cap))
        if isinstance(data, Dialogues):
            conversations = data.split(split)
            conversations = [conversations[i] for i in rng.permutation(len(conversations))]
            return tokenize_dialogues(conversations, tokenizer, cfg.max_length, cap)
        if cfg.weights is not None and data.parts:
            blocks = mixture_blocks(data.parts, split, tokenizer, cfg.max_length, cfg.weights,
                                    cap, cfg.split_seed)
        else:
            blocks = sample_blocks(tokenize_blocks(data.split(split), tokenizer, cfg.max_length),
                                   cap, cfg.split_seed)
        return BlockDataset(blocks[torch.from_numpy(rng.permutation(len(blocks)))])

    def sample_problem(self, data: LMText | Dialogues | StreamedText) -> str | None:
        if isinstance(data, Dialogues):
            return (f"data.teacher_samples: adds blocks of sampled text to a text corpus; "
                    f"{data.source} is conversations (one per sequence, loss on the answers)")
        return None

    def add_samples(self, dataset: Dataset, blocks: Tensor, seed: int) -> BlockDataset:
        """The corpus blocks and the teacher's sampled blocks [N, max_length], shuffled
        together with `seed` (a shrink's calibration batch, the first blocks, holds both)."""
        if not isinstance(dataset, BlockDataset):
            raise DistillError("data.teacher_samples: adds blocks of sampled text to a text "
                               "corpus, not to conversations")
        if blocks.shape[1] != dataset.blocks.shape[1]:
            raise DistillError(f"data.teacher_samples: sampled blocks of {blocks.shape[1]} "
                               f"tokens do not fit blocks of {dataset.blocks.shape[1]}")
        merged = torch.cat([dataset.blocks, blocks.to(dataset.blocks.dtype)])
        order = np.random.default_rng(seed).permutation(len(merged))
        return BlockDataset(merged[torch.from_numpy(order)])

    def collate(self, tokenizer: PreTrainedTokenizerBase) -> Callable[[list[dict]], dict]:
        return pad_collator(tokenizer)

    def latency_inputs(self, data: LMText | Dialogues, split: str,
                       tokenizer: PreTrainedTokenizerBase, batch: int, max_length: int
                       ) -> dict[str, Tensor]:
        """`batch` rows of `max_length` real tokens of the split (its text repeated when the
        split is shorter than that)."""
        texts = data.split(split)
        if isinstance(data, Dialogues):
            texts = [render(m, tokenizer, add_generation_prompt=False) for m in texts]
        stream = [t for text in texts for t in tokenizer(text, add_special_tokens=False)
                  ["input_ids"]]
        if not stream:
            raise DistillError(f"the {split} split holds no text to time the model on")
        need = batch * max_length
        stream = (stream * -(-need // len(stream)))[:need]
        ids = torch.tensor(stream, dtype=torch.long).view(batch, max_length)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    # ------------------------------------------------------------------ models
    def load_model(self, name: str, data: LMText, *, trust_remote_code: bool = False,
                   allow_pickle: bool = False, load_options: dict[str, Any] | None = None,
                   key: str | None = "teacher.allow_pickle") -> tuple[PreTrainedModel, bool]:
        """The causal LM saved in `name`; a classifier checkpoint is refused (its LM head is
        gone). The head counts as trained when it was in the weights (or tied to them)."""
        config = load_config(name, trust_remote_code)
        if not self.accepts(config) and any(
                a.endswith("ForSequenceClassification") for a in config.architectures or ()):
            raise DistillError(f"{name} is a sequence classifier ({config.architectures[0]}), "
                               "not a causal language model; use `task: "
                               "sequence-classification`, or a model saved with its LM head")
        model, fresh_head = load_checked(
            AutoModelForCausalLM, name, config=config, key=key,
            trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
            **(load_options or {}))
        return model.eval(), not fresh_head

    def meta_model(self, config: PretrainedConfig, data: LMText,
                   trust_remote_code: bool = False) -> PreTrainedModel:
        try:
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(copy.deepcopy(config),
                                                        trust_remote_code=trust_remote_code)
        except (ValueError, KeyError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DistillError(f"{config.model_type} models have no causal-LM form in "
                               f"transformers ({first[:200]})") from None

    def accepts(self, config: PretrainedConfig) -> bool:
        return any(a.endswith(_CAUSAL_SUFFIXES) for a in (config.architectures or ()))

    def already_tuned(self, head_trained: bool) -> bool:
        """Never: a language model's head is always trained, and fine-tuning it means adapting
        it to the corpus."""
        return False

    # ------------------------------------------------------------------ losses
    def hard_loss(self, logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return token_ce_loss(logits, batch["labels"].to(logits.device))

    def kd_loss(self, student_logits: Tensor, teacher: TeacherTarget, batch: dict[str, Tensor],
                *, temperature: float, kind: str = "forward_kl", beta: float = 0.5,
                skew: float = 0.1) -> Tensor:
        """`T² · D(p_T, p_S)` averaged over the target tokens (padding and prompts excluded)."""
        mask = next_token_mask(batch["labels"].to(student_logits.device))
        return token_kd_loss(student_logits, teacher, mask, temperature=temperature,
                             kind=kind, beta=beta, skew=skew)

    def teacher_cache(self, folder: Path, teacher: Callable[[], nn.Module], dataset: Dataset,
                      loader: DataLoader, *, teacher_source: str,
                      tokenizer: PreTrainedTokenizerBase, data_cfg: DataConfig,
                      temperature: float, top_k: int | None, accelerator: Accelerator,
                      bf16: bool = False) -> TeacherCache | None:
        """The teacher's top-k next tokens at every position (`distill.kd.topk_cache`):
        `8k + 4` bytes per token. Without `loss.top_k` nothing is cached (a full float32
        vocabulary row per token would be 4·V bytes: 196 KB for SmolLM2). The teacher runs
        under bf16 autocast when `bf16`, as it would live."""
        if top_k is None or not isinstance(dataset, BlockDataset):
            return None  # conversations have no fixed block shape: the teacher runs live
        vocabulary = tokenizer.get_vocab()
        files = check_weights(teacher_source, allow_pickle=True)  # hashed, never unpickled
        key = topk_cache.fingerprint(files, vocabulary, dataset.blocks, top_k, temperature,
                                     bf16)
        if not files:  # a hub id: nothing local to hash, so its name stands for the weights
            key = hashlib.sha256(f"{teacher_source}\n{key}".encode()).hexdigest()

        def build() -> topk_cache.TopKCache:
            return topk_cache.load_or_compute(folder, key, teacher, dataset.blocks, top_k,
                                              temperature, bf16=bf16)

        # Rank 0 computes what is missing; the others then find every shard verified.
        cache = build() if accelerator.is_main_process else None
        accelerator.wait_for_everyone()
        cache = cache or build()
        return TeacherCache(cache.rows, {"kind": "top-k", "k": top_k,
                                         "bytes_per_token": round(cache.bytes_per_token, 2)})

    # ------------------------------------------------------------------ evaluation
    def score_batch(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """[summed next-token NLL, number of predicted tokens] of the batch, float64."""
        device = model_device(model)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device),
                       use_cache=False).logits
        nll, count = token_nll(logits, batch["labels"].to(device))
        return torch.tensor([float(nll.double()), float(count)], dtype=torch.float64)

    def summarize(self, sums: Tensor, data: LMText) -> dict[str, float]:
        total, count = float(sums[0]), float(sums[1])
        if count == 0:
            raise DistillError("no tokens to predict in the evaluation split")
        mean = total / count
        return {"perplexity": math.exp(mean) if mean < 700 else float("inf"), "nll": mean,
                "tokens": int(count)}

    @torch.inference_mode()
    def serving_metrics(self, model: nn.Module, data: LMText | Dialogues, split: str,
                        tokenizer: PreTrainedTokenizerBase, runs: int) -> dict[str, Any]:
        """Greedy generation at batch 1 from 3 prompts of the split: new tokens per second
        and milliseconds per token (the best of `runs` passes, after one warm-up), and the
        continuations as samples. Text: the first 32 tokens of documents spread over the
        split; conversations: the first question with the generation prompt."""
        prompts = _prompts(data, split, tokenizer)
        device = model_device(model)
        model.eval()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
        best, samples = float("inf"), []
        new_tokens = 0
        for attempt in range(max(1, runs) + 1):
            start, produced, outs = time.perf_counter(), 0, []
            for text in prompts:
                ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
                ids = {k: v.to(device) for k, v in ids.items()}
                out = model.generate(**ids, max_new_tokens=_NEW_TOKENS, do_sample=False,
                                     pad_token_id=pad)
                new = out[0, ids["input_ids"].shape[1]:]
                produced += int(new.numel())
                outs.append(tokenizer.decode(new, skip_special_tokens=True))
            seconds = time.perf_counter() - start
            if attempt > 0 and produced and seconds < best:  # attempt 0 warms up
                best, new_tokens = seconds, produced
            samples = outs
        tokens_per_s = new_tokens / best if new_tokens else None
        return {"generation": {"tokens_per_s": round(tokens_per_s, 2) if tokens_per_s else None,
                               "ms_per_token": round(1000 / tokens_per_s, 3)
                               if tokens_per_s else None,
                               "new_tokens": new_tokens, "batch": 1},
                "samples": [{"prompt": p, "completion": c} for p, c in zip(prompts, samples)]}

    def describe(self, data: LMText | Dialogues | StreamedText) -> dict[str, Any]:
        kind = "conversations" if isinstance(data, Dialogues) else "documents"
        if isinstance(data, StreamedText):
            return {"streamed": True, "documents_read": data.documents_read()}
        return {kind: data.sizes()}
