"""Tasks: what a task reads, which model class it loads, its losses, metric and direction.

Every stage, the evaluation, the teacher cache and pre-flight go through a `Task`
(`distill.tasks.base`); nothing outside this package asks what kind of model it holds.

    task = get_task("causal-lm")                 # by name (a recipe's `teacher.task`)
    task = resolve_task(None, config, "teacher")  # inferred from a model's config
"""

from __future__ import annotations

from transformers import PretrainedConfig

from distill.errors import DistillError
from distill.tasks.base import Task
from distill.tasks.causal_lm import CausalLM
from distill.tasks.classification import SequenceClassification

TASKS: dict[str, Task] = {t.name: t for t in (SequenceClassification(), CausalLM())}


def get_task(name: str) -> Task:
    """The task called `name`; an unknown name is an error listing the known ones."""
    if name not in TASKS:
        raise DistillError(f"unknown task {name!r}; allowed: {', '.join(TASKS)}")
    return TASKS[name]


def infer_task(config: PretrainedConfig) -> Task:
    """The task a checkpoint was saved for (its `architectures`); a base model without a task
    head (a sentence encoder) is taken as a classifier's body, as before tasks existed."""
    for task in TASKS.values():
        if task.accepts(config):
            return task
    return TASKS["sequence-classification"]


def resolve_task(name: str | None, config: PretrainedConfig, model: str) -> Task:
    """`name`'s task, or the one inferred from `config` when `name` is None.

    Raises:
        DistillError: `name` asks for a causal LM of a checkpoint saved as a classifier (the LM
            head is gone), naming both.
    """
    if name is None:
        return infer_task(config)
    task = get_task(name)
    saved = infer_task(config)
    if task.name == "causal-lm" and saved.name != "causal-lm" and saved.accepts(config):
        raise DistillError(f"teacher.task: {name}, but {model} was saved as a "
                           f"{saved.name} model ({(config.architectures or ['?'])[0]}); "
                           f"allowed: {saved.name} (or omit `task` to infer it)")
    return task
