"""Checks before any work: everything a recipe names is checked before the run directory exists.

`preflight(recipe, run_dir)` is the first thing `pipeline.run_recipe` does. It reads the data
(files, columns, label sets, sizes), opens the models without their weights (config, weight
files, tokenizer), and plans every stage against the shapes the run will have: student layer
indices and layer maps, shrink steps against the depth and widths they cut, PEFT methods
applied to the model built on the meta device (no memory, no weights) so that a
`target_modules` pattern that matches nothing fails in seconds, not after hours of training.
Problems of the stages are collected and reported together; a missing file or model stops
the check at once (nothing after it could be checked).

What cannot be known before training (a loss that becomes NaN) is caught by the training loop;
that stage then fails with its record in report.json and its checkpoint, and no model.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from transformers import (
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

import peft_methods
from distill.arch import Dims, arch_info, dims, position_limit
from distill.arch.targets import peft_layout
from distill.errors import DistillError
from distill.models.loading import (
    check_weights,
    config_num_layers,
    head_is_fresh,
    load_config,
    load_tokenizer,
    resolve_model_path,
)
from distill.config.recipe import (AdaptStage, DistillStage, EvaluateStage, ExportStage,
                                   FinetuneStage, Recipe, ShrinkStage, TrainArgs)
from distill.models.weights import checkpoint_shapes
from distill.tasks import resolve_task
from distill.tasks.base import Task, TaskData
from peft_methods.prompt_tuning import PromptLearningMethod

# Files a tokenizer is read from; a folder with none of them gives an empty tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


class PreflightError(DistillError):
    """Every problem found before the run started, one line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        if len(problems) == 1:
            message = f"cannot start the run: {problems[0]}"
        else:
            message = f"cannot start the run ({len(problems)} problems):\n" + "\n".join(
                f"  - {p}" for p in problems)
        super().__init__(message)


@dataclass
class Checked:
    """What the checks loaded and the run reuses: the task data and the run's tokenizer."""

    data: TaskData
    tokenizer: PreTrainedTokenizerBase
    task: Task


@dataclass
class _Shape:
    """The shape of the run's latest model as the stages change it (depth, widths)."""

    depth: int | None
    widths: Dims | None


# ----------------------------------------------------------------------------- entry point
def preflight(recipe: Recipe, run_dir: Path | None = None, sharded: bool = False) -> Checked:
    """Check the recipe's output folder, data, models and stages; nothing is written.

    Args:
        recipe: a validated recipe.
        run_dir: where the run will write (checked for being creatable, not created).
        sharded: the launch partitions gradients (FSDP, DeepSpeed): stages that need whole
            gradients fail.

    Returns:
        The loaded task data and the teacher's tokenizer (the run uses them as they are).

    Raises:
        DistillError: the first problem with the output folder, the data or the teacher;
            `PreflightError` with every problem of the stages.
    """
    if run_dir is not None:
        check_output_location(Path(run_dir))
    spec = recipe.teacher
    check_model_source(spec.model, spec.allow_pickle, "teacher")
    try:
        config = load_config(spec.model, spec.trust_remote_code)
    except DistillError as exc:
        raise DistillError(f"teacher.model: {exc}") from None
    task = resolve_task(spec.task, config, spec.model)
    data = task.load_data(recipe.data)
    try:
        tokenizer = load_tokenizer(spec.model, spec.trust_remote_code)
        model = task.meta_model(config, data, spec.trust_remote_code)
    except DistillError as exc:
        raise DistillError(f"teacher.model: {exc}") from None
    problems = tokenizer_problems(tokenizer, spec.model, "teacher.model")
    problems += fits_model(tokenizer, config, recipe.data.max_length, spec.model,
                           "teacher.model", "data.max_length", limit=position_limit(model))
    if recipe.data.teacher_samples:
        problem = task.sample_problem(data)
        problems += [problem] if problem else []
    problems += stage_problems(recipe, task, config, model, tokenizer, data)
    if task.head_from_data:
        problems += teacher_head_problems(recipe, model)
    if sharded:
        problems += sharding_problems(recipe)
    if problems:
        # An adapt stage on the teacher meets the teacher's own limits again: say each once.
        raise PreflightError(list(dict.fromkeys(problems)))
    return Checked(data, tokenizer, task)


def sharding_problems(recipe: Recipe) -> list[str]:
    """Stages an FSDP or DeepSpeed launch cannot train: methods whose per-step hook reads
    whole gradients, and `compile: true` (it compiles the whole model's forward)."""
    problems = [f"stages.{i}.method: {stage.method} reallocates ranks from whole gradients "
                "after each step, and an FSDP or DeepSpeed launch partitions them; launch "
                "with --multi_gpu (DDP)"
                for i, stage in enumerate(recipe.stages)
                if isinstance(stage, AdaptStage) and stage.method in peft_methods.available()
                and peft_methods.get_method(stage.method).reads_gradients]
    for i, stage in enumerate(recipe.stages):
        args, path = ((stage.heal, f"stages.{i}.heal") if isinstance(stage, ShrinkStage)
                      else (stage, f"stages.{i}"))
        if isinstance(args, TrainArgs) and args.compile:
            problems.append(f"{path}.compile: true compiles the whole model, which an FSDP "
                            "or DeepSpeed launch shards; set it to false or launch with "
                            "--multi_gpu (DDP)")
    return problems


def check_output_location(run_dir: Path) -> None:
    """The run directory can be made: no file on its path, and a writable folder above it.

    Existence (`--force`, `--resume`) is the pipeline's to judge; this only rules out places
    where nothing can be written, before any work.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise DistillError(f"--output {run_dir} is a file, not a folder")
    existing = run_dir.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise DistillError(f"cannot create the run directory {run_dir}: {existing} is a file, "
                           "not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DistillError(f"cannot create the run directory {run_dir}: {existing} is not "
                           "writable; choose another --output")


# ----------------------------------------------------------------------------- models
def check_model_source(name: str, allow_pickle: bool, key: str) -> None:
    """A model folder has a config, loadable and readable weight files (their headers are
    read, not their weights) and tokenizer files.

    Args:
        name: as the recipe gives it (built-in, path or hub id).
        allow_pickle: whether pickled weights may be read.
        key: the recipe section, e.g. `teacher` or `stages.3`.
    """
    try:
        path = Path(resolve_model_path(name))
        files = check_weights(name, allow_pickle, f"{key}.allow_pickle")
        # Headers only (no weights): a file cut short by a failed copy fails here, before
        # the run folder exists, not in the middle of the run.
        checkpoint_shapes([f for f in files if f.name.endswith(".safetensors")], name)
    except DistillError as exc:
        raise DistillError(f"{key}.model: {exc}") from None
    if path.is_dir() and not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise DistillError(f"{key}.model: {name} has no tokenizer files (expected one of "
                           f"{', '.join(_TOKENIZER_FILES)}); save the tokenizer with the model: "
                           "`tokenizer.save_pretrained(DIR)`")


def tokenizer_problems(tokenizer: PreTrainedTokenizerBase, name: str, key: str) -> list[str]:
    """A tokenizer that knows only its special tokens would turn every word into [UNK]."""
    if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):
        return [f"{key}: the tokenizer of {name} has only its {len(tokenizer)} special tokens "
                "and no vocabulary; its tokenizer files are missing or empty"]
    return []


def fits_model(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig, max_length: int,
               name: str, key: str, length_key: str, extra_tokens: int = 0,
               limit: int | None = None) -> list[str]:
    """The tokenizer's ids index the model's embedding table; inputs fit its positions.

    Args:
        extra_tokens: positions a method adds in front (prompt tuning's virtual tokens).
        limit: the longest input the model's position table takes (`position_limit`);
            None: no such limit, or not known.
    """
    problems = []
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        problems.append(f"{key}: tokenizer/model mismatch: the tokenizer has {len(tokenizer)} "
                        f"tokens but {name} embeds only {vocab} (vocab_size); token ids "
                        f"{vocab}..{len(tokenizer) - 1} would index past its embedding table. "
                        "Use the tokenizer saved with this model")
    if limit is not None and max_length + extra_tokens > limit:
        if extra_tokens:
            problems.append(f"{key}: {extra_tokens} virtual tokens + {length_key} "
                            f"{max_length} make inputs of {max_length + extra_tokens} "
                            f"positions, longer than {name} takes ({config.model_type} has "
                            f"{limit} positions); allowed: num_virtual_tokens + max_length "
                            f"<= {limit}")
        else:
            problems.append(f"{length_key}: {max_length} is longer than {name} takes "
                            f"({config.model_type} has {limit} positions); allowed: "
                            f"max_length <= {limit}")
    return problems


# ----------------------------------------------------------------------------- stages
def teacher_head_problems(recipe: Recipe, model: PreTrainedModel) -> list[str]:
    """A stage that distills from the teacher's outputs before any `finetune` stage needs a
    teacher whose classification head was trained: a base model's head (a sentence encoder
    loaded as a classifier) is random, and a student taught by it learns noise.

    Args:
        model: the teacher's classifier for the run's labels, on the meta device.
    """
    index = first_stage_taught_by_raw_teacher(recipe)
    if index is None:
        return []
    name = recipe.teacher.model
    try:
        fresh = head_is_fresh(name, model, recipe.teacher.allow_pickle)
    except DistillError as exc:  # unreadable weight files: the teacher's own check says so
        return [f"teacher.model: {exc}"]
    if not fresh:  # trained, or a hub id (nothing local to read before the download)
        return []
    return [f"stages.{index}: the teacher {name} has no trained classification head for the "
            f"{model.config.num_labels} labels (its weights hold none, as a base model's, or "
            "one for another number of labels), so this stage would distill a random head; "
            "add a `finetune` stage before it, which trains the teacher's head, or give a "
            "teacher fine-tuned on this task"]


def first_stage_taught_by_raw_teacher(recipe: Recipe) -> int | None:
    """The first stage that learns from the recipe's teacher as given, its logits weighted
    (`loss.alpha` < 1), before a `finetune` stage replaces the teacher; None if none."""
    for index, stage in enumerate(recipe.stages):
        if isinstance(stage, FinetuneStage):
            return None  # later stages learn from the tuned teacher
        loss = stage.loss if isinstance(stage, DistillStage) else \
            stage.heal.loss if isinstance(stage, ShrinkStage) else None
        if loss is not None and loss.alpha < 1:
            return index
    return None


def stage_problems(recipe: Recipe, task: Task, config: PretrainedConfig,
                   model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: TaskData
                   ) -> list[str]:
    """Plan every stage against the shapes the run will have; one line per problem.

    Args:
        config / model: the teacher's config and its task model on the meta device.
    """
    from distill.stages.distill import (
        plan_layers,  # the stage's own planning, run early
    )

    problems: list[str] = []
    depth = config_num_layers(config)
    # The shape of the teacher and of the run's latest model (stages replace, never mutate).
    teacher = latest = _Shape(depth, _widths(model))
    for index, stage in enumerate(recipe.stages):
        key = f"stages.{index}"
        problems += top_k_problems(stage, task, config, key)
        try:
            if isinstance(stage, DistillStage):
                arch_info(model)  # a clear error for a model whose blocks are not found
                if depth is not None:
                    layers, _ = plan_layers(stage, depth, key)
                    latest = _Shape(len(layers), teacher.widths)
            elif isinstance(stage, ShrinkStage):
                arch_info(model)  # a clear error for a model whose blocks are not found
                start = teacher if stage.start == "teacher" else latest
                latest = shrink_problems(stage, model, _Shape(start.depth, start.widths), key,
                                         problems)
            elif isinstance(stage, AdaptStage):
                problems += adapt_problems(stage, recipe, task, config, tokenizer, data,
                                           latest.depth, key)
            elif isinstance(stage, ExportStage):
                problems += export_problems(stage, key)
            elif isinstance(stage, EvaluateStage):
                for k, extra in enumerate(stage.eval_data):
                    try:
                        task.load_data(extra)
                    except DistillError as exc:
                        problems.append(f"{key}.eval_data.{k}: {exc}")
        except DistillError as exc:
            problems.append(str(exc) if str(exc).startswith(key) else f"{key}: {exc}")
    return problems


def export_problems(stage: ExportStage, key: str) -> list[str]:
    """The packages the stage's formats need must be installed."""
    from distill.serve.formats import missing_packages

    missing = sorted({p for fmt in stage.formats for p in missing_packages(fmt)})
    if not missing:
        return []
    return [f"{key}.formats: the ONNX formats need {', '.join(missing)} (not installed); "
            "pip install 'distill[serve]', or leave onnx and onnx-int8 out"]


def _widths(model: PreTrainedModel) -> Dims | None:
    """The teacher's widths, if its layout is understood (else shrink stages say why)."""
    try:
        return dims(model)
    except DistillError:
        return None


def top_k_problems(stage: object, task: Task, config: PretrainedConfig, key: str) -> list[str]:
    """`loss.top_k` is a token-level setting and must fit the vocabulary."""
    where = {DistillStage: "loss", ShrinkStage: "heal.loss", AdaptStage: "loss"}.get(type(stage))
    if where is None:
        return []
    loss = stage.heal.loss if isinstance(stage, ShrinkStage) else stage.loss  # type: ignore
    if loss.top_k is None:
        return []
    if not task.token_level:
        return [f"{key}.{where}.top_k: applies to token-level tasks (causal-lm) only; this "
                f"run's task is {task.name}"]
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and loss.top_k > vocab:
        return [f"{key}.{where}.top_k: {loss.top_k} is more than the {vocab} tokens of the "
                f"vocabulary; allowed: 1..{vocab}"]
    return []


def shrink_problems(stage: ShrinkStage, model: PreTrainedModel, shape: _Shape, key: str,
                    problems: list[str]) -> _Shape:
    """Check each schedule step against the shape it cuts; return the shape after the last.

    Width targets go through the width cutter's own rules (whole key/value groups, hidden =
    heads × head size where the family ties them) on the meta model.
    """
    from distill.compress.width import width_targets  # the cutter's target rules, without cutting

    info = arch_info(model)
    for k, step in enumerate(stage.schedule):
        where = f"{key}.schedule.{k}"
        if step.layers is not None and shape.depth is not None:
            if step.layers > shape.depth:
                problems.append(f"{where}.layers: {step.layers} is out of range; the model "
                                f"it cuts has {shape.depth} layers, allowed: 1..{shape.depth}")
                return shape
            shape = _Shape(step.layers, shape.widths)
        if shape.widths is not None and any(
                v is not None for v in (step.hidden, step.heads, step.intermediate)):
            try:
                widths = width_targets(model, info, shape.widths, step.hidden, step.heads,
                                       step.intermediate)
            except DistillError as exc:
                problems.append(f"{where}.{exc}")
                return shape
            shape = _Shape(shape.depth, widths)
    return shape


def adapt_problems(stage: AdaptStage, recipe: Recipe, task: Task,
                   teacher_config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase,
                   run_data: TaskData, depth: int | None, key: str) -> list[str]:
    """The adapt stage's data, base model and method, checked against each other."""
    trust = recipe.teacher.trust_remote_code
    data_cfg = stage.data or recipe.data
    data = run_data
    if stage.data is not None:
        try:
            data = task.load_data(stage.data)
        except DistillError as exc:
            return [f"{key}.{exc}" if str(exc).startswith("data.") else f"{key}.data: {exc}"]
    problems: list[str] = []
    if stage.data is not None and stage.data.teacher_samples:
        problem = task.sample_problem(data)
        if problem:
            problems.append(f"{key}.{problem}")
    if stage.model in ("previous", "teacher"):
        name, config = recipe.teacher.model, copy.deepcopy(teacher_config)
        layer_key = next((k for k in ("num_hidden_layers", "n_layer", "num_layers")
                          if isinstance(getattr(config, k, None), int)), None)
        if stage.model == "previous" and depth is not None and layer_key:
            setattr(config, layer_key, depth)  # a student cut from the teacher's layers
    else:
        name = stage.model
        check_model_source(name, stage.allow_pickle, key)
        config = load_config(name, trust)
        own = load_tokenizer(name, trust)
        if own.get_vocab() != tokenizer.get_vocab():
            problems.append(f"{key}.model: tokenizer mismatch: the tokenizer of {name} differs "
                            f"from the run's (the teacher's, {recipe.teacher.model}), which "
                            "tokenizes the data for every stage; adapt a model that shares "
                            "the teacher's vocabulary")
    if stage.teacher != "run" and (stage.loss.alpha < 1 or stage.loss.hidden_mse
                                   or stage.loss.attention_kl or stage.loss.cosine):
        check_model_source(stage.teacher, recipe.teacher.allow_pickle, f"{key}.teacher")
        own = load_tokenizer(stage.teacher, trust)
        if own.get_vocab() != tokenizer.get_vocab():
            problems.append(f"{key}.teacher: tokenizer mismatch: {stage.teacher} and the run's "
                            f"teacher {recipe.teacher.model} tokenize differently ({len(own)} "
                            f"and {len(tokenizer)} tokens), so their outputs cannot be compared "
                            "position by position; distill from a teacher with the run's "
                            "tokenizer")
    extra, limit = 0, None
    try:
        model = task.meta_model(config, data, trust)
        limit = position_limit(model)  # before the method wraps its layers
        adapted = peft_methods.apply(model, stage.method, layout=peft_layout(model),
                                     **method_options(stage))
        cfg = adapted.peft_config
        if isinstance(adapted.method, PromptLearningMethod) or (
                "prefix" in (getattr(cfg, "components", None) or ())):
            extra = int(getattr(cfg, "num_virtual_tokens", 0) or 0)
    except peft_methods.PeftMethodError as exc:
        problems.append(f"{key}.config: {exc}")
    except (RuntimeError, NotImplementedError, TypeError, ValueError, AttributeError):
        pass  # a method that needs real weights to attach (meta tensors): checked at the stage
    length_key = f"{key}.data.max_length" if stage.data is not None else "data.max_length"
    problems += fits_model(tokenizer, config, data_cfg.max_length, name,
                           f"{key}.config" if extra else f"{key}.model", length_key, extra,
                           limit)
    return problems


def method_options(stage: AdaptStage) -> dict:
    """The stage's method options; AdaLoRA's `total_step` (set by the stage from the real
    step count) gets a placeholder."""
    options = dict(stage.config)
    fields = {f.name for f in dataclasses.fields(peft_methods.get_method(stage.method).config_cls)}
    if "total_step" in fields and options.get("total_step") is None:
        options["total_step"] = 10**9  # as `AdaptStage.check`: never a false alarm
    return options
