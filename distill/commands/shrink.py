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

from distill.arch import num_layers, position_limit
from distill.data.batching import make_loader
from distill.errors import DistillError
from distill.compress.importance import resolve_score
from distill.models.loading import (count_params, load_checked, load_config, load_tokenizer,
                                    save_model)
from distill.run.ownership import check_claim, local_paths, sibling_lock
from distill.config.recipe import DataConfig, ShrinkStep
from distill.stages.shrink import cut, first_batches
from distill.tasks import TASKS


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


def calibration(model: PreTrainedModel, tokenizer, data: str | None, examples: int,
                max_length: int) -> list[dict[str, torch.Tensor]]:
    """Calibration batches: the training data of the model's task (labelled texts for a
    classifier, text blocks for a causal LM), or text blocks without labels for a base model
    without a task head."""
    task = next((t for t in TASKS.values() if t.accepts(model.config)), None)
    kind = task or TASKS["causal-lm"]
    cfg = DataConfig(dataset=data or kind.default_dataset, max_length=max_length,
                     max_train_examples=max(1, examples))
    task_data = kind.load_data(cfg)
    if task is not None:
        try:
            task.check_model(model.config, task_data, "the model")
        except DistillError as exc:
            raise DistillError(f"--data: {exc}") from None
    loader = make_loader(kind.tokenize(task_data, "train", tokenizer, cfg),
                         kind.collate(tokenizer), kind.calibration_batch_size, shuffle=False,
                         seed=0, group_by_length=False)
    batches = first_batches(loader, examples)
    if task is None:  # nothing to compute a task loss with: the `hidden` score needs none
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
    limit = position_limit(model)
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
