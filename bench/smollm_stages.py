"""What the SmolLM2 training benchmarks share: a student cut from the teacher, and the run
context a stage of ours gets for a few Shakespeare blocks (data, tokenizer, task)."""

from __future__ import annotations

from pathlib import Path

TEACHER = "builtin:smollm2-135m"


def prepare(work: Path, layers: int) -> Path:
    """The teacher cut to `layers` evenly spaced layers, saved under `work/student` (once)."""
    from distill.compress.depth import evenly_spaced, keep_layers
    from distill.models.loading import load_tokenizer, save_model
    from distill.tasks import get_task

    out = work / "student"
    teacher, _ = get_task("causal-lm").load_model(TEACHER, None)
    student = keep_layers(teacher, evenly_spaced(layers, teacher.config.num_hidden_layers))
    save_model(student, load_tokenizer(TEACHER), out)
    return out


def context(work: Path, name: str, blocks: int, block_tokens: int = 128):
    """The `RunContext` of a run in `work/name` on the first `blocks` Shakespeare training
    blocks of `block_tokens` tokens, its console quiet."""
    from distill.config.recipe import DataConfig, ModelSpec, Recipe
    from distill.models.loading import load_tokenizer
    from distill.run.context import RunContext
    from distill.tasks import get_task
    from distill.train.loop import make_accelerator

    task = get_task("causal-lm")
    data_cfg = DataConfig(dataset="builtin:shakespeare", max_length=block_tokens,
                          max_train_examples=blocks, max_eval_examples=8)
    recipe = Recipe(name="bench", teacher=ModelSpec(model=TEACHER), data=data_cfg)
    ctx = RunContext(recipe=recipe, run_dir=work / name, data=task.load_data(data_cfg),
                     tokenizer=load_tokenizer(TEACHER), accelerator=make_accelerator(),
                     teacher_source=TEACHER, task=task)
    ctx.console.quiet = True
    return ctx
