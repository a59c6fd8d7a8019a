"""Runs a recipe's stages in order; owns the run directory and the report.

Run directory (DESIGN.md, fixed):

    <run>/recipe.yaml  report.json  report.md  *.png
    <run>/stages/<NN>-<kind>/{model/, metrics.json, log.jsonl, ...}
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

from rich.console import Console

from distill import parallel
from distill.context import ModelRef, RunContext, StageResult
from distill.errors import DistillError
from distill.files import atomic_write
from distill.models import (
    count_params,
    dir_size_mb,
    quiet_transformers,
    resolve_model_path,
)
from distill.preflight import preflight
from distill.recipe import Recipe, dump_recipe
from distill.report import write_report
from distill.stages import RUNNERS
from distill.training import make_accelerator

_RUN_MARKERS = ("recipe.yaml", "report.json", "stages")


def stage_dir_name(index: int, kind: str) -> str:
    return f"{index:02d}-{kind}"


def prepare_run_dir(run_dir: Path, force: bool) -> None:
    """Create the run folder; an existing non-empty one needs `force` and must be a run."""
    if run_dir.exists() and any(run_dir.iterdir()):
        if not force:
            raise DistillError(f"run directory {run_dir} already exists; pass --force to "
                               "replace it, --resume to continue it, or --output DIR for "
                               "another one")
        if not any((run_dir / m).exists() for m in _RUN_MARKERS):
            raise DistillError(f"{run_dir} is not empty and is not a run directory; "
                               "refusing to delete it: choose another --output")
        shutil.rmtree(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise DistillError(f"cannot write to the run directory {run_dir}: "
                           f"{exc.strerror or exc}") from None


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(data, indent=2, default=str))


def static_metrics(path: str, trust_remote_code: bool = False, allow_pickle: bool = False
                   ) -> dict:
    """Params and size of a saved model without evaluating it (for runs with no evaluate)."""
    from distill.stages.evaluate import load_saved_classifier

    params, non_emb = count_params(load_saved_classifier(path, trust_remote_code, allow_pickle))
    return {"params": params, "params_non_embedding": non_emb,
            "size_mb": round(dir_size_mb(Path(resolve_model_path(path))), 3)}


def fill_model_metrics(report: dict, ctx: RunContext, evaluated: dict[str, dict]) -> None:
    """Put each model's metrics into `teacher`, the stage records and `final`."""
    def metrics_for(label: str, path: str) -> dict:
        if path == ctx.teacher_source and "teacher" in evaluated:
            label = "teacher"  # the tuned teacher was evaluated once, under that name
        return evaluated.get(label) or static_metrics(
            path, ctx.recipe.teacher.trust_remote_code, ctx.recipe.teacher.allow_pickle)

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
    the stage that was running continues from its last complete checkpoint."""
    from distill.recipe import load_recipe

    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file():
        raise DistillError(f"--resume {run_dir}: not a run directory (no recipe.yaml)")
    return run_recipe(load_recipe(run_dir / "recipe.yaml"), output=run_dir, console=console,
                      resume=True)


def run_recipe(recipe: Recipe, output: str | Path | None = None, force: bool = False,
               console: Console | None = None, resume: bool = False) -> dict:
    """Run every stage of `recipe`; return the report (also written to the run folder).

    Args:
        recipe: a validated recipe (see `distill.load_recipe`).
        output: the run directory; default `<recipe.output_dir>/<recipe.name>`.
        force: replace an existing run directory.
        resume: continue the run already in `output` (see `resume_recipe`).
    """
    console = console or Console()
    quiet_transformers()
    run_dir = Path(output) if output else Path(recipe.output_dir) / recipe.name
    accelerator = make_accelerator()
    main = accelerator.is_main_process
    # Everything that can be checked before hours of training is checked first.
    # (distill.preflight: data, models, tokenizers, stage plans), before the run dir exists.
    checked = preflight(recipe, run_dir,
                        sharded=parallel.strategy_for(accelerator).shards_gradients)
    data, tokenizer = checked.data, checked.tokenizer
    state = load_state(run_dir) if resume else {"completed": 0}
    if main and not resume:
        prepare_run_dir(run_dir, force)
        dump_recipe(recipe, run_dir / "recipe.yaml")
    accelerator.wait_for_everyone()

    ctx = RunContext(recipe=recipe, run_dir=run_dir, data=data, tokenizer=tokenizer,
                     accelerator=accelerator, teacher_source=recipe.teacher.model,
                     console=console)
    report: dict = {"recipe": recipe.name, "teacher": {}, "stages": [], "final": {},
                    "data": {"dataset": recipe.data.dataset, "sizes": data.sizes(),
                             "labels": data.label_names}}
    evaluated: dict[str, dict] = {}
    done = state["completed"]
    if done:
        ctx.teacher_source = state["teacher_source"]
        ctx.models = [ModelRef(**m) for m in state["models"]]
        evaluated, report = state["evaluated"], state["report"]
    console.print(f"[bold]{recipe.name}[/]: {len(recipe.stages)} stages -> {run_dir}  "
                  f"(data {data.sizes()})")
    if resume:
        console.print(f"resuming after {done} finished stage(s)")
    for index, stage in enumerate(recipe.stages):
        if index < done:
            continue
        name = stage_dir_name(index, stage.kind)
        stage_dir = run_dir / "stages" / name
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
        if result.model_metrics is not None:
            evaluated[name] = result.model_metrics
        if stage.kind == "evaluate":
            evaluated.update(result.metrics["models"])
        if main:
            _write_json(stage_dir / "metrics.json", result.metrics)
            write_report(run_dir, report)
            save_state(run_dir, index + 1, ctx, report, evaluated)
    if main:
        fill_model_metrics(report, ctx, evaluated)
        write_report(run_dir, report)
    return report
