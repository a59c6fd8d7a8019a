"""`distill shrink`: one cut of any supported model, outside a recipe, over the stage's code.

The model keeps its head (classifier, LM head, or none). Calibration data for importance
scores: the task data for classifiers (with labels), held-out-free Shakespeare training text
for causal LMs, and the same text for models without a task head.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers import PreTrainedModel

from distill.compress.arch import num_layers
from distill.data.tables import load_task_data, make_loader, tokenize_split
from distill.errors import DistillError
from distill.compress.importance import resolve_score
from distill.data.text import SHAKESPEARE, lm_batches, lm_blocks
from distill.models.loading import (count_params, load_checked, load_config, load_tokenizer,
                                    save_model)
from distill.run.ownership import check_claim, local_paths, sibling_lock
from distill.run.preflight import position_limit
from distill.config.recipe import DataConfig, ShrinkStep
from distill.stages.shrink import cut, first_batches


def load_any(name: str, trust_remote_code: bool = False) -> PreTrainedModel:
    """A saved model with the head its config names (safetensors only)."""
    config = load_config(name, trust_remote_code)  # clear errors, remote code refused
    arch = (config.architectures or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModel
    # Every weight file checked first (no pickle, ever), then weights that must fit the config.
    model, _ = load_checked(cls, name, trust_remote_code=trust_remote_code, key=None,
                            dtype=torch.float32)
    return model.eval()


def is_classifier(model: PreTrainedModel) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def calibration(model: PreTrainedModel, tokenizer, data: str | None, examples: int,
                max_length: int) -> list[dict[str, torch.Tensor]]:
    """Calibration batches for `model`: labelled task data for classifiers, else LM text."""
    if is_classifier(model):
        task = load_task_data(DataConfig(dataset=data or "builtin:rotten_tomatoes",
                                          max_length=max_length))
        labels = [str(v) for v in model.config.id2label.values()]
        if len(labels) != len(task.label_names):
            raise DistillError(f"--data has {len(task.label_names)} labels "
                               f"{task.label_names}; the model predicts {len(labels)}")
        loader = make_loader(tokenize_split(task.train, tokenizer, max_length), tokenizer,
                             32, shuffle=False, seed=0)
        return first_batches(loader, examples)
    blocks = lm_blocks(tokenizer, "train", max_length, source=data or SHAKESPEARE,
                       max_blocks=max(1, examples), seed=0)
    batches = list(lm_batches(blocks, batch_size=8))
    if not type(model).__name__.endswith("ForCausalLM"):
        batches = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    return batches


def check_options(model: PreTrainedModel, step: ShrinkStep, examples: int,
                  max_length: int | None) -> int:
    """The one-off's own options against the loaded model, named as the user typed them;
    returns the calibration length (default: 128 tokens, or fewer if the model takes fewer)."""
    depth = num_layers(model)
    if step.layers is not None and not 1 <= step.layers <= depth:
        raise DistillError(f"--layers {step.layers}: the model has {depth} layers; allowed: "
                           f"1..{depth}")
    if examples < 1:
        raise DistillError(f"--examples {examples}: allowed: 1 or more calibration examples")
    limit = position_limit(model.config)
    if max_length is None:
        return min(128, limit or 128)
    if not 8 <= max_length <= (limit or 4096):
        raise DistillError(f"--max-length {max_length}: allowed: 8..{limit or 4096} tokens"
                           + (f" ({model.config.model_type} has {limit} positions)"
                              if limit else ""))
    return max_length


def shrink_model(name: str, out: str | Path, step: ShrinkStep, *, strategy: str = "importance",
                 score: str = "auto", data: str | None = None, examples: int = 64,
                 max_length: int | None = None, trust_remote_code: bool = False,
                 force: bool = False) -> dict:
    """Cut `name` once by `step` and save the result (HF format) to `out`.

    `out` is written only when it does not exist, is empty, or (with `force`) is an earlier
    result of the toolkit's that holds neither the model nor the data read here
    (`distill.run.ownership`); it is replaced in one rename, under a lock.

    `score` ranks the layers of an importance depth cut: `auto` is `loss` for a model with a
    task head and `hidden` for one without (`distill.compress.importance.resolve_score`).

    Returns:
        {"before": {...}, "after": {...}, "kept_layers": [...], "score": "..."} with layers,
        hidden size and parameter counts; `kept_layers` for a depth cut, `score` (resolved)
        when it ranked the layers by importance.
    """
    out = Path(out).expanduser().absolute()
    check_claim(out, force=force, inputs=local_paths(name, data), flag="--out")  # before any work
    model = load_any(name, trust_remote_code)
    tokenizer = load_tokenizer(name, trust_remote_code)
    max_length = check_options(model, step, examples, max_length)
    if strategy == "importance" and step.layers is not None:
        resolve_score(model, score)  # a score this model cannot use fails before data loads
    needs_data = strategy == "importance" and step.layers is not None or any(
        v is not None for v in (step.hidden, step.heads, step.intermediate))
    batches = calibration(model, tokenizer, data, examples, max_length) if needs_data else []

    def shape(m: PreTrainedModel) -> dict:
        params, non_emb = count_params(m)
        return {"layers": num_layers(m), "hidden_size": m.config.hidden_size,
                "params": params, "params_non_embedding": non_emb}

    before = shape(model)
    small, info = cut(model, step, batches, strategy, score)
    with sibling_lock(out):
        check_claim(out, force=force, inputs=local_paths(name, data), flag="--out")  # still so?
        save_model(small, tokenizer, out, marker={"kind": "shrink", "source": name})
    return {"before": before, "after": shape(small), **info}
