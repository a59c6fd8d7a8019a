"""Runs a recipe's stages in order; owns the run directory and the report.

Run directory (DESIGN.md, fixed):

    <run>/recipe.yaml  report.json  report.md  *.png
    <run>/stages/<NN>-<kind>/{model/, metrics.json, log.jsonl, ...}

plus `.distill.json` (the marker that makes it ours: see `distill.run.ownership`; it also keeps the
resolved recipe and its hash for `--resume`), `state.json` (what `--resume` continues from) and,
while a process writes it, `.distill.lock`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from distill.train import parallel
from distill.train.checkpoint import remove_all as remove_checkpoints
from distill.run.context import ModelRef, RunContext, StageResult
from distill.errors import DistillError
from distill.files import atomic_write
from distill.models.loading import (
    count_params,
    dir_size_mb,
    quiet_transformers,
    resolve_model_path,
)
from distill.run.ownership import (FolderLock, check_claim, claim, clean_leftovers, local_paths,
                               read_marker)
from distill.run.preflight import preflight
from distill.config.recipe import AdaptStage, EvaluateStage, ExportStage, Recipe
from distill.config.loading import dump_recipe, recipe_to_dict
from distill.run.report import write_report
from distill.stages import RUNNERS
from distill.stages.training import load_frozen_teacher
from distill.train.loop import make_accelerator

def stage_dir_name(index: int, kind: str) -> str:
    return f"{index:02d}-{kind}"


def absolute_paths(recipe: Recipe) -> Recipe:
    """The recipe with every local model, data and offload path made absolute, so that the
    stored recipe means the same from any working folder (`--resume` from elsewhere)."""
    def fix(name: str | list[str] | None) -> str | list[str] | None:
        if isinstance(name, list):  # a text mixture
            return [fix(n) for n in name]  # type: ignore[misc]
        return str(Path(name).expanduser().absolute()) if local_paths(name) else name

    teacher = dataclasses.replace(
        recipe.teacher, model=fix(recipe.teacher.model),
        offload_folder=None if recipe.teacher.offload_folder is None
        else str(Path(recipe.teacher.offload_folder).expanduser().absolute()))
    stages = []
    for stage in recipe.stages:
        if isinstance(stage, AdaptStage):
            data = stage.data and dataclasses.replace(stage.data, dataset=fix(stage.data.dataset))
            stage = dataclasses.replace(stage, model=fix(stage.model), data=data,
                                        teacher=fix(stage.teacher) if stage.teacher != "run"
                                        else stage.teacher)
        elif isinstance(stage, ExportStage):
            stage = dataclasses.replace(stage, model=fix(stage.model))
        elif isinstance(stage, EvaluateStage):
            stage = dataclasses.replace(stage, eval_data=[
                dataclasses.replace(d, dataset=fix(d.dataset)) for d in stage.eval_data])
        stages.append(stage)
    return dataclasses.replace(recipe, teacher=teacher, stages=stages,
                               data=dataclasses.replace(recipe.data,
                                                        dataset=fix(recipe.data.dataset)))


def recipe_inputs(recipe: Recipe) -> list[Path]:
    """The local files and folders a recipe reads (models, data): a run never deletes them."""
    names = [recipe.teacher.model, recipe.data.dataset]
    for stage in recipe.stages:
        if isinstance(stage, AdaptStage):
            names += [stage.model, stage.data.dataset if stage.data else None,
                      stage.teacher if stage.teacher != "run" else None]
        elif isinstance(stage, ExportStage):
            names.append(stage.model)
        elif isinstance(stage, EvaluateStage):
            names += [d.dataset for d in stage.eval_data]
    flat = [n for name in names for n in (name if isinstance(name, list) else [name])]
    return local_paths(*flat)


def recipe_digest(recipe: Recipe) -> str:
    """SHA-256 of the resolved recipe (canonical JSON): what `--resume` must find unchanged."""
    text = json.dumps(recipe_to_dict(recipe), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain-data recipes."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in _differences(old.get(k), new.get(k), f"{path}.{k}" if path else str(k))]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new))
                for d in _differences(a, b, f"{path}.{i}")]
    return [] if old == new else [path or "(the whole recipe)"]


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(data, indent=2, default=str))


def static_metrics(ctx: RunContext, path: str) -> dict:
    """Params and size of a saved model without evaluating it (for runs with no evaluate)."""
    params, non_emb = count_params(ctx.load_model(path)[0])
    return {"params": params, "params_non_embedding": non_emb,
            "size_mb": round(dir_size_mb(Path(resolve_model_path(path))), 3)}


def fill_model_metrics(report: dict, ctx: RunContext, evaluated: dict[str, dict]) -> None:
    """Put each model's metrics into `teacher`, the stage records and `final`."""
    def metrics_for(label: str, path: str) -> dict:
        if path == ctx.teacher_source and "teacher" in evaluated:
            label = "teacher"  # the tuned teacher was evaluated once, under that name
        return evaluated.get(label) or static_metrics(ctx, path)

    report["teacher"] = metrics_for("teacher", ctx.teacher_source)
    last = report["teacher"]
    for ref in ctx.models:
        rec = report["stages"][ref.stage_index]
        metrics = metrics_for(ref.label, ref.path)
        if ref.step_index is not None:
            rec["steps"][ref.step_index]["model"] = metrics
        rec["model"] = metrics  # a stage's model is its last one
        last = metrics
    report["final"] = last


STATE_NAME = "state.json"


def save_state(run_dir: Path, completed: int, ctx: RunContext, report: dict,
               evaluated: dict[str, dict]) -> None:
    """What `--resume` needs after each finished stage: how many are done, the models made so
    far, the current teacher and the metrics measured (written atomically)."""
    _write_json(run_dir / STATE_NAME, {
        "completed": completed, "teacher_source": ctx.teacher_source,
        "models": [dataclasses.asdict(m) for m in ctx.models],
        "evaluated": evaluated, "report": report})


def load_state(run_dir: Path) -> dict:
    path = run_dir / STATE_NAME
    if not path.is_file():
        return {"completed": 0}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise DistillError(f"{path} is damaged; the run cannot be resumed (start it again with "
                           "--force)") from None


def resume_recipe(run_dir: str | Path, console: Console | None = None) -> dict:
    """Continue the run in `run_dir` with its own `recipe.yaml`: finished stages are skipped,
    the stage that was running continues from its last complete checkpoint.

    Refused when the folder is not a run of ours, or when its recipe.yaml no longer is the
    recipe the run started with (the differing keys are named).
    """
    from distill.config.loading import load_recipe

    run_dir = Path(run_dir).absolute()
    marker = read_marker(run_dir)
    if marker is None or marker.get("kind") != "run":
        raise DistillError(f"--resume {run_dir}: not a run directory of distill (no "
                           ".distill.json marking a run)")
    if not (run_dir / "recipe.yaml").is_file():
        raise DistillError(f"--resume {run_dir}: its recipe.yaml is missing; the run cannot be "
                           "resumed (start it again with --force)")
    recipe = load_recipe(run_dir / "recipe.yaml")
    if marker.get("recipe_sha256") != recipe_digest(recipe):
        changed = _differences(marker.get("recipe") or {}, recipe_to_dict(recipe))
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5
                                          else "")
        raise DistillError(f"--resume {run_dir}: recipe.yaml was changed since the run started "
                           f"({shown}); a resumed run must continue the same recipe: undo the "
                           "change, or start a new run with --output")
    return run_recipe(recipe, output=run_dir, console=console, resume=True)


def run_recipe(recipe: Recipe, output: str | Path | None = None, force: bool = False,
               console: Console | None = None, resume: bool = False) -> dict:
    """Run every stage of `recipe`; return the report (also written to the run folder).

    Args:
        recipe: a validated recipe (see `distill.load_recipe`).
        output: the run directory; default `<recipe.output_dir>/<recipe.name>`.
        force: replace an existing run directory (only one that distill made, and only when
            none of the recipe's models or data lie inside it).
        resume: continue the run already in `output` (see `resume_recipe`).
    """
    console = console or Console()
    quiet_transformers()
    recipe = absolute_paths(recipe)
    run_dir = (Path(output) if output else Path(recipe.output_dir) / recipe.name).absolute()
    accelerator = make_accelerator()
    main = accelerator.is_main_process
    if not resume:  # may this folder be written? (nothing is changed yet)
        check_claim(run_dir, force=force, inputs=recipe_inputs(recipe))
    # Everything that can be checked before hours of training is checked first.
    # (distill.run.preflight: data, models, tokenizers, stage plans), before the run dir exists.
    checked = preflight(recipe, run_dir,
                        sharded=parallel.strategy_for(accelerator).shards_gradients)
    # Every rank has checked the folder (and run pre-flight) before rank 0 writes into it:
    # a rank that checked later would find rank 0's marker and refuse the run as existing.
    accelerator.wait_for_everyone()
    lock = FolderLock(run_dir, what="the run directory")
    if main:
        lock.acquire()
    try:
        if main:
            if resume:
                for path in clean_leftovers(run_dir):
                    console.print("removed the leftover of an interrupted save: "
                                  f"{escape(str(path))}")
            else:
                claim(run_dir, "run", force=force, inputs=recipe_inputs(recipe),
                      recipe_sha256=recipe_digest(recipe), recipe=recipe_to_dict(recipe))
                dump_recipe(recipe, run_dir / "recipe.yaml")
        accelerator.wait_for_everyone()
        return _run_stages(recipe, run_dir, checked, accelerator, console, resume)
    finally:
        lock.release()


def _run_stages(recipe: Recipe, run_dir: Path, checked: Any, accelerator: Any,
                console: Console, resume: bool) -> dict:
    """The stages of a prepared run folder, in order (see `run_recipe`)."""
    main = accelerator.is_main_process
    data, tokenizer, task = checked.data, checked.tokenizer, checked.task
    state = load_state(run_dir) if resume else {"completed": 0}
    ctx = RunContext(recipe=recipe, run_dir=run_dir, data=data, tokenizer=tokenizer,
                     accelerator=accelerator, teacher_source=recipe.teacher.model,
                     task=task, console=console)
    ctx.teacher_model = lambda: load_frozen_teacher(ctx)
    report: dict = {"recipe": recipe.name, "task": task.name, "teacher": {}, "stages": [],
                    "final": {}, "data": {"dataset": recipe.data.dataset, "sizes": data.sizes(),
                                          **task.describe(data)}}
    evaluated: dict[str, dict] = {}
    done = state["completed"]
    if done:
        ctx.teacher_source = state["teacher_source"]
        ctx.models = [ModelRef(**m) for m in state["models"]]
        evaluated, report = state["evaluated"], state["report"]
    console.print(f"[bold]{escape(recipe.name)}[/]: {len(recipe.stages)} stages -> "
                  f"{escape(str(run_dir))}  (data {data.sizes()})")
    if resume:
        console.print(f"resuming after {done} finished stage(s)")
    for index, stage in enumerate(recipe.stages):
        name = stage_dir_name(index, stage.kind)
        stage_dir = run_dir / "stages" / name
        if index < done:
            if main:  # a kill after the state was saved may have left them
                remove_checkpoints(stage_dir)
            continue
        console.rule(f"stage {name}")
        start = time.perf_counter()
        record: dict = {"index": index, "kind": stage.kind, "status": "running"}
        report["stages"].append(record)
        try:
            result: StageResult = RUNNERS[stage.kind](ctx, stage, stage_dir)
        except BaseException as exc:
            record.update(status="failed", seconds=round(time.perf_counter() - start, 2))
            if isinstance(exc, DistillError):  # the user's problem, as the CLI prints it
                record["error"] = str(exc)
            if main:
                write_report(run_dir, report)
            raise
        record.update(status=result.status, seconds=round(time.perf_counter() - start, 2))
        if "precision" in result.metrics:  # what `bf16` resolved to, and the measurement
            record["precision"] = result.metrics["precision"]
        if "exports" in result.metrics:  # each served artifact, checked and timed
            record["exports"] = result.metrics["exports"]
        if result.step_models:
            record["steps"] = []
            for k, (step_name, path) in enumerate(result.step_models):
                record["steps"].append({"index": k, "name": step_name,
                                        "artifact": str(path.relative_to(run_dir))})
                ctx.models.append(ModelRef(f"{name}/{step_name}", str(path), index, k))
        if result.model_dir is not None:
            record["artifact"] = str(result.model_dir.relative_to(run_dir))
            if not result.step_models:
                ctx.models.append(ModelRef(name, str(result.model_dir), index,
                                           kind=result.artifact_kind))
        if ctx.samples_info is not None:
            report["data"]["teacher_samples"] = ctx.samples_info
        if result.model_metrics is not None:
            evaluated[name] = result.model_metrics
        if stage.kind == "evaluate":
            evaluated.update(result.metrics["models"])
        if main:
            # Order matters for a kill at any instant: the stage's own files, then the report,
            # then the state that marks it finished, and only then its checkpoints go.
            _write_json(stage_dir / "metrics.json", result.metrics)
            write_report(run_dir, report)
            save_state(run_dir, index + 1, ctx, report, evaluated)
            remove_checkpoints(stage_dir)
    if main:
        fill_model_metrics(report, ctx, evaluated)
        write_report(run_dir, report)
    return report
