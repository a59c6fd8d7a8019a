"""What the training stages share: the frozen teacher, the loss, the KD training call, the
PEFT method on the model that trains, and saving a student.

`kd_train` is the one place a stage turns its settings into `Objective` + `train_loop`:
finetune, distill, heal and adapt differ by the loss weights and by what trains.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

import peft_methods
from distill.arch import num_layers
from distill.arch.targets import peft_layout
from distill.config.recipe import LossConfig, TrainArgs
from distill.errors import DistillError
from distill.files import atomic_write
from distill.kd.losses import DistillationLoss, LossWeights, default_layer_map
from distill.models.loading import config_num_layers, load_config, save_model, \
    teacher_load_options
from distill.run.context import RunContext
from distill.train.loop import LoopResult, train_loop
from distill.train.objective import FrozenTeacher, Objective
from distill.train.precision import Precision, autocast, decide


def load_frozen_teacher(ctx: RunContext, eager_attention: bool = False,
                        source: str | None = None) -> PreTrainedModel:
    """The run's task teacher (or `source`), frozen, in eval mode: on the run's device in the
    recipe's `teacher.dtype`, or spread over devices by `teacher.device_map` (one process
    only)."""
    spec = ctx.recipe.teacher
    if spec.device_map is not None and ctx.accelerator.num_processes > 1:
        raise DistillError(
            f"teacher.device_map: {spec.device_map!r} spreads one teacher over the devices of "
            f"one process, but this run has {ctx.accelerator.num_processes} processes; use "
            "`teacher.dtype: bfloat16` (half the memory) or run in one process")
    options = teacher_load_options(spec.dtype, spec.device_map, spec.offload_folder,
                                   spec.max_memory)
    teacher, _ = ctx.load_model(source or ctx.teacher_source, load_options=options)
    if eager_attention:
        # Fused attention kernels do not return attention maps.
        teacher.set_attn_implementation("eager")
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.eval()
    # A dispatched teacher stays where device_map put it; its hooks move inputs and outputs.
    return teacher if spec.device_map is not None else teacher.to(ctx.accelerator.device)


def student_source(ctx: RunContext, teacher: PreTrainedModel) -> PreTrainedModel:
    """The model a student is cut from: the frozen teacher itself, or a float32 copy on the
    run's device when the teacher is kept in another dtype or spread by a device map."""
    spec = ctx.recipe.teacher
    if spec.dtype in (None, "float32") and spec.device_map is None:
        return teacher
    full, _ = ctx.load_model(ctx.teacher_source, load_options={"dtype": torch.float32})
    return full.to(ctx.accelerator.device)


def frozen_teacher(ctx: RunContext, eager_attention: bool = False,
                   source: str | None = None) -> FrozenTeacher:
    """The stage's teacher (the run's, or `source`), loaded on first use only."""
    return FrozenTeacher(lambda: load_frozen_teacher(ctx, eager_attention, source))


def kd_loss(ctx: RunContext, model: nn.Module, teacher_config: PretrainedConfig,
            loss_cfg: LossConfig) -> DistillationLoss:
    """The stage's loss module for `model` against a teacher of `teacher_config`."""
    base = getattr(model, "get_base_model", lambda: model)()
    depth_s, depth_t = num_layers(base), config_num_layers(teacher_config)
    layer_map = loss_cfg.layer_map or default_layer_map(depth_s, depth_t)
    if len(layer_map) != depth_s or any(not 0 <= j < depth_t for j in layer_map):
        raise DistillError(f"loss.layer_map: {layer_map} must give one teacher layer "
                           f"(0..{depth_t - 1}) for each of the {depth_s} student layers")
    weights = LossWeights(loss_cfg.alpha, loss_cfg.temperature, loss_cfg.hidden_mse,
                          loss_cfg.attention_kl, loss_cfg.cosine, loss_cfg.divergence,
                          loss_cfg.beta, loss_cfg.skew)
    return DistillationLoss(ctx.task, weights, layer_map, base.config.hidden_size,
                            teacher_config.hidden_size)


def probe_step(ctx: RunContext, model: nn.Module, batch_size: int
               ) -> Callable[[bool], None]:
    """One forward + backward of `model` on the first `batch_size` training examples (this
    process's share of a batch), under bf16 autocast when called with True: what
    `precision.decide` times. It leaves no trace: the random state (dropout) is restored, the
    gradients are cleared and no weight changes. A model with no trainable weight yet (a
    shrink stage's starting model, before a heal attaches what trains) is timed as if every
    weight trained, then frozen again."""
    dataset = ctx.tokenized("train")
    share = max(1, batch_size // ctx.accelerator.num_processes)
    batch = ctx.task.collate(ctx.tokenizer)([dataset[i] for i in range(min(share, len(dataset)))])
    device = ctx.accelerator.device
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}

    def step(bf16: bool) -> None:
        was_training = model.training
        frozen = ([] if any(p.requires_grad for p in model.parameters()) else
                  [p for p in model.parameters() if p.is_floating_point()])
        model.train()
        try:
            for p in frozen:
                p.requires_grad_(True)
            with torch.random.fork_rng(devices=[]):
                with autocast(bf16, device.type):
                    loss = model(**inputs).logits.float().mean()
                loss.backward()
        finally:
            model.train(was_training)
            for p in model.parameters():
                p.grad = None
            for p in frozen:
                p.requires_grad_(False)

    return step


def stage_precision(ctx: RunContext, model: nn.Module, args: TrainArgs, folder: Path,
                    desc: str) -> Precision:
    """The stage's precision (`precision.decide` on `model`), decided once per stage.

    Rank 0 decides and every rank takes its decision (each rank calls this once, whatever
    the files say: a rank that read the file rank 0 had just written, and skipped the
    broadcast, would leave rank 0 waiting in it). The decision is kept in
    `folder/precision.json`, so a resumed stage trains on in the precision it started in (and
    finds the teacher cache it made) whatever a new measurement would say."""
    saved = folder / "precision.json"
    device = ctx.accelerator.device.type
    decided = None
    if ctx.is_main:
        if saved.is_file():
            record = json.loads(saved.read_text(encoding="utf-8"))
            decided = record if record.get("setting") == args.bf16 else None
        if decided is None:
            step = probe_step(ctx, model, args.batch_size) if args.bf16 == "auto" else None
            decided = decide(args.bf16, device, step).record()
            atomic_write(saved, json.dumps(decided, indent=2) + "\n")
            if args.bf16 == "auto":
                speed = (f"; one step {decided['fp32_step_s']:.3f} s fp32, "
                         f"{decided['bf16_step_s']:.3f} s bf16"
                         if "bf16_step_s" in decided else "")
                ctx.console.print(f"  {desc}: bf16 auto -> "
                                  f"{'bf16 autocast' if decided['bf16'] else 'fp32'} "
                                  f"({decided['decided_by']} on this {device}{speed})")
    return Precision.from_record(ctx.from_main(decided))


def kd_train(ctx: RunContext, model: nn.Module, teacher: FrozenTeacher | None,
             teacher_source: str,
             args: TrainArgs, loss_cfg: LossConfig, *, cache_teacher: bool, cache_dir: Path,
             log_path: Path, desc: str, validate: Callable[[], float] | None = None,
             seed: int | None = None, precision: Precision | None = None
             ) -> tuple[LoopResult, dict]:
    """Train `model` (plain or PEFT-adapted) in place on the task's hard loss plus the KD
    terms against `teacher` (best validation weights kept).

    Every training stage trains through it: `finetune` (alpha = 1, no teacher), `distill`,
    the heal phases of `shrink`, and `adapt` (with or without KD). `teacher_source` names the
    teacher (its config sizes the layer map); `teacher` may be None when no term needs it.
    `seed`: the stage's seed when the caller seeded before building the model (a new head);
    else the stage is seeded here. `validate` replaces the task's validation metric.

    With logit losses only, the teacher's soft labels come from the run's teacher cache in
    `cache_dir` (computed once, reused by every epoch and every later stage with the same
    teacher and data; what it stores is the task's choice: a classifier's logits, a language
    model's top-k).

    Returns:
        (the loop's result, a summary for metrics.json).
    """
    config = load_config(teacher_source, ctx.recipe.teacher.trust_remote_code)
    loss = kd_loss(ctx, model, config, loss_cfg)
    seed = ctx.stage_seed(args.seed) if seed is None else seed
    if precision is None:
        precision = stage_precision(ctx, model, args, log_path.parent, desc)
    bf16 = precision.bf16
    cached, cache_info = None, None
    uses_teacher = loss.needs_teacher_logits or loss.needs_hidden or loss.needs_attentions
    if uses_teacher and teacher is None:
        raise DistillError(f"{desc}: loss.alpha {loss.w.alpha:g} < 1 needs a teacher")
    if cache_teacher and teacher is not None and loss.needs_teacher_logits and not (
            loss.needs_hidden or loss.needs_attentions):
        # In the precision the loop trains in.
        cache = ctx.task.teacher_cache(
            cache_dir, teacher.get, ctx.tokenized("train"),
            ctx.loader("train", args.eval_batch_size), teacher_source=teacher_source,
            tokenizer=ctx.tokenizer,
            data_cfg=ctx.recipe.data, temperature=loss_cfg.temperature, top_k=loss_cfg.top_k,
            accelerator=ctx.accelerator, bf16=bf16)
        if cache is not None:
            cached, cache_info = cache.lookup, cache.info
    model.train()
    validation = ctx.validation(model, args.eval_batch_size)
    if validate is not None:
        validation["evaluate"] = validate
    result = train_loop(
        Objective(model, loss, teacher if uses_teacher else None, cached, loss_cfg.top_k),
        ctx.loader("train", args.batch_size, shuffle=True, seed=seed,
                   group_by_length=args.group_by_length, accumulate=args.grad_accum_steps),
        args,
        accelerator=ctx.accelerator, keep=model, bf16=bf16, log_path=log_path, desc=desc,
        console=ctx.console, **validation)
    summary = {"loss": vars(loss.w) | {"top_k": loss_cfg.top_k}, "steps": result.steps,
               "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
               "train_seconds": round(result.seconds, 2), "bf16": bf16, "compile": args.compile,
               "precision": precision.record(),
               f"best_validation_{ctx.task.metric}": result.best_metric,
               "best_epoch": result.best_epoch, "history": result.history, "seed": seed}
    if ctx.samples_info is not None:
        summary["teacher_samples"] = ctx.samples_info
    if uses_teacher and teacher is not None:
        summary |= {"layer_map": loss.layer_map, "teacher": teacher_source,
                    "teacher_cache": cache_info, "teacher_loaded": teacher.loaded}
    return result, summary


def with_method(ctx: RunContext, model: PreTrainedModel, args: TrainArgs
                ) -> nn.Module:
    """`model` as the stage trains it: itself (`method: full`) or with the stage's PEFT
    method attached (everything else frozen)."""
    if args.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    adapted = apply_method(model, args.method, dict(args.config))
    share = peft_methods.trainable_report(adapted)
    ctx.console.print(f"  {args.method}: {share['trainable_params']:,} trainable parameters "
                      f"({share['trainable_percent']:.2f} % of {share['total_params']:,})")
    return adapted


def merged(model: nn.Module) -> PreTrainedModel:
    """The plain student: a PEFT method merged into its weights and its layers unwrapped."""
    if isinstance(model, peft_methods.AdaptedModel):
        model = peft_methods.merge_and_unload(model)
        for p in model.parameters():
            p.requires_grad_(True)
    return model


def apply_method(model: nn.Module, method: str, options: dict) -> peft_methods.AdaptedModel:
    """`peft_methods.apply` with the model's layout (the methods' default targets) and its
    user errors turned into DistillError (exit code 2)."""
    try:
        return peft_methods.apply(model, method, layout=peft_layout(model), **options)
    except peft_methods.PeftMethodError as exc:
        raise DistillError(f"{method}: {exc}".replace(f"{method}: {method}: ", f"{method}: ")
                           ) from None


def save_student(ctx: RunContext, student: PreTrainedModel, out: Path) -> Path:
    """Save in HF format from the main process; every process waits for it."""
    if ctx.is_main:
        save_model(ctx.accelerator.unwrap_model(student), ctx.tokenizer, out)
    ctx.accelerator.wait_for_everyone()
    return out
