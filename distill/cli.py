"""The `distill` command line: parse, call the library, print with rich.

Every user error is printed in one or two lines and exits with code 2 (no traceback).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from distill.errors import DistillError

app = typer.Typer(
    name="distill", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Compress transformer models: distill a teacher into a smaller student, shrink it "
         "from the teacher's weights, attach PEFT adapters; all from YAML recipes.")
# Piped output (CI logs, `| tee`) gets a wide console so the tables are not truncated.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


@app.callback()
def _setup() -> None:
    """Compress transformer models (see `distill COMMAND --help`)."""
    import gc

    from distill.models.loading import quiet_transformers

    quiet_transformers()
    # torch's and transformers' objects (~350k) live as long as the process: out of the
    # garbage collector's sight, every full collection skips them (accelerate collects at each
    # stage end: 0.2-0.3 s a pass with them, ~30 ms without).
    gc.freeze()


def _is_peft_error(exc: BaseException) -> bool:
    """A user error raised by `peft_methods` (imported only when a ValueError occurs)."""
    from peft_methods.base import PeftMethodError

    return isinstance(exc, PeftMethodError)


def _os_error(exc: OSError) -> str:
    """A file-system failure in one line: what happened, to which file, what to do."""
    import errno

    where = f": {exc.filename}" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device{where}; free some space or write elsewhere"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied{where}"
    if exc.errno == errno.EROFS:
        return f"the file system is read-only{where}; write elsewhere"
    if exc.strerror:
        return f"{exc.strerror}{where}"
    # A library's own OSError (transformers raises them for unloadable folders): its first line.
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return first[:300]


def explain(exc: BaseException) -> str | None:
    """The one- or two-line message for a failure the user can cause, or None for a bug.

    Our own `DistillError`s say what is wrong already; expected failures of the libraries we
    call (files and disks, damaged weight files, memory, input nested past Python's limits) are
    translated here, the one place every command passes through.
    """
    from distill.errors import DistillError

    if isinstance(exc, DistillError):
        return str(exc)
    if isinstance(exc, ValueError) and _is_peft_error(exc):
        return str(exc)
    if isinstance(exc, UnicodeDecodeError):
        return (f"a file is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as "
                "UTF-8")
    if isinstance(exc, OSError):
        return _os_error(exc)
    if isinstance(exc, RecursionError):
        return "the input is nested too deeply to read (Python's recursion limit)"
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return ("out of memory; lower batch_size or data.max_length, or use a smaller model "
                "(teacher.dtype: bfloat16 halves a float32 teacher)")
    if type(exc).__name__ == "SafetensorError":
        first = (str(exc).strip().splitlines() or ["damaged"])[0]
        return f"a safetensors weights file could not be read ({first}); it is damaged or " \
               "not a safetensors file"
    return None


def _name_flags(message: str, flags: dict[str, str]) -> str:
    """`message` with each whole recipe key of `flags` replaced by its option (an item's
    index too: `stages.0.formats.1` is the option `--format`, given twice or more)."""
    import re

    for key in sorted(flags, key=len, reverse=True):
        message = re.sub(rf"(?<![\w.]){re.escape(key)}(?:\.\d+)?(?![\w])", flags[key],
                         message)
    return message


def _user_errors(flags: dict[str, str] | None = None
                 ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The error boundary of a command: an expected failure becomes a one- or two-line message
    on stderr and exit code 2; a bug keeps its traceback, with a line asking to report it.

    Args:
        flags: recipe keys -> the command's options (`{"data.max_length": "--max-length"}`),
            so a message names what the user typed.
    """
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except (typer.Exit, typer.Abort, SystemExit):
                raise
            except KeyboardInterrupt:
                err_console.print("[yellow]interrupted[/]")
                raise typer.Exit(130) from None
            except Exception as exc:
                message = explain(exc)
                if message is None:
                    err_console.print("[bold red]unexpected error[/] (a bug in distill: please "
                                      "report it with the traceback below)", highlight=False)
                    raise
                message = _name_flags(message, flags or {})
                err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False,
                                  soft_wrap=True)
                raise typer.Exit(2) from None
        return wrapper
    return decorate


def resolve_recipe_path(recipe: str) -> Path:
    """A recipe file path, or the name of a shipped recipe (`minilm-rotten-tomatoes`)."""
    path = Path(recipe)
    if path.is_file():
        return path
    for candidate in (RECIPES_DIR / recipe, RECIPES_DIR / f"{recipe}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = ", ".join(p.stem for p in sorted(RECIPES_DIR.glob("*.yaml")))
    raise DistillError(f"recipe not found: {recipe} (not a file, nor a shipped recipe: {shipped})")


# What a one-off command's message says instead of the recipe key it checked.
DATA_FLAGS = {"data.dataset": "--data", "data.max_length": "--max-length",
              "data.text_column": "--text-column", "data.label_column": "--label-column",
              "data.config": "--data-config", "data.split": "--data-split"}
# A hub dataset's configuration and the one split read as the whole source (`data.config`,
# `data.split` in a recipe), for the commands that read a dataset.
DataConfigOpt = Annotated[str | None, typer.Option(
    "--data-config", help="The dataset's configuration (a hub id's subset, e.g. 'en').")]
DataSplitOpt = Annotated[str | None, typer.Option(
    "--data-split", help="Read only this split of the dataset (e.g. 'train') and carve "
    "train/validation/test from it 80/10/10.")]
ATTACH_FLAGS = DATA_FLAGS | {
    "teacher.model": "STUDENT", "stages.0.method": "--method", "stages.0.config": "--option",
    "stages.0.epochs": "--epochs", "stages.0.learning_rate": "--lr",
    "stages.0.batch_size": "--batch-size", "stages.0.bf16": "--bf16", "seed": "--seed"}

SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a recipe key: --set stages.1.loss.alpha=0.7 (repeatable).")]


@app.command()
@_user_errors()
def run(recipe: Annotated[str | None, typer.Argument(
            help="Recipe file or shipped recipe name.")] = None,
        output: Annotated[Path | None, typer.Option(
            "--output", "-o", help="Run directory (default: runs/<recipe name>).")] = None,
        overrides: SetOpt = None,
        force: Annotated[bool, typer.Option(help="Replace an existing run directory.")] = False,
        resume: Annotated[Path | None, typer.Option(
            "--resume", help="Continue a killed or failed run: its finished stages are kept, "
            "the running one continues from its last checkpoint.")] = None,
        ) -> None:
    """Run a recipe: every stage in order, then print the results table."""
    from distill.run.pipeline import resume_recipe, run_recipe
    from distill.config.loading import load_recipe
    from distill.run.report import print_report

    if resume is not None:
        if recipe is not None or overrides or output is not None or force:
            raise DistillError("--resume RUN_DIR continues a run with its own recipe.yaml; "
                               "give no RECIPE, --set, --output or --force with it")
        report = resume_recipe(resume, console=console)
    else:
        if recipe is None:
            raise DistillError("give a RECIPE to run (file or shipped name; see `distill "
                               "recipes`), or --resume RUN_DIR")
        loaded = load_recipe(resolve_recipe_path(recipe), overrides or [])
        report = run_recipe(loaded, output=output, force=force, console=console)
    print_report(report, console)


@app.command()
@_user_errors()
def validate(recipe: Annotated[str, typer.Argument(help="Recipe file or shipped name.")],
             overrides: SetOpt = None) -> None:
    """Check a recipe without running it: its keys, then its data, models and stage plans
    (what `run` checks before any work); report every problem at once."""
    from distill.run.preflight import preflight
    from distill.config.loading import load_recipe

    loaded = load_recipe(resolve_recipe_path(recipe), overrides or [])
    preflight(loaded)
    kinds = " -> ".join(s.kind for s in loaded.stages)
    console.print(f"[green]ok[/]: {escape(loaded.name)}: {kinds}")


@app.command("recipes")
@_user_errors()
def list_recipes() -> None:
    """List the shipped recipes with one line each."""
    from distill.config.loading import read_yaml

    table = Table("recipe", "stages", "description")
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        data = read_yaml(path) or {}
        kinds = " -> ".join(str(s.get("kind")) for s in data.get("stages", [])
                            if isinstance(s, dict))
        table.add_row(path.stem, kinds, str(data.get("description", "")).strip())
    console.print(table)


@app.command()
@_user_errors()
def inspect(model: Annotated[str, typer.Argument(
        help="builtin:NAME, a local HF directory or a hub id.")]) -> None:
    """Show a model's layers, widths, parameters and size."""
    from distill.commands.inspect import describe_model

    table = Table("property", "value", title=escape(model))
    for key, value in describe_model(model).items():
        table.add_row(key, f"{value:,}" if isinstance(value, int) else escape(str(value)))
    console.print(table)


@app.command()
@_user_errors(DATA_FLAGS)
def shrink(model: Annotated[str, typer.Argument(help="builtin:NAME, HF directory or .gguf.")],
           out: Annotated[Path, typer.Option("--out", "-o", help="Where to save the result.")],
           layers: Annotated[int | None, typer.Option(help="Keep this many layers.")] = None,
           hidden: Annotated[int | None, typer.Option(help="New hidden size.")] = None,
           heads: Annotated[int | None, typer.Option(help="Attention heads per layer.")] = None,
           intermediate: Annotated[int | None, typer.Option(help="MLP width.")] = None,
           strategy: Annotated[str, typer.Option(
               help="Depth: importance, uniform or top.")] = "importance",
           score: Annotated[str, typer.Option(
               help="Depth importance: auto (loss with a task head, else hidden), loss, "
                    "hidden (change of the final hidden states) or influence.")] = "auto",
           data: Annotated[str | None, typer.Option(
               help="Calibration data (default: the task data for classifiers, "
                    "Shakespeare for language models).")] = None,
           examples: Annotated[int, typer.Option(help="Calibration examples.")] = 64,
           max_length: Annotated[int | None, typer.Option(
               help="Calibration tokens per example (default: 128, or the model's limit).")]
           = None,
           force: Annotated[bool, typer.Option(
               help="Replace an earlier `distill shrink` result in --out.")] = False) -> None:
    """Cut a model once — fewer layers and/or narrower — from its own weights; no training."""
    from distill.commands.shrink import shrink_model
    from distill.config.recipe import ShrinkStep

    step = ShrinkStep(layers=layers, hidden=hidden, heads=heads, intermediate=intermediate)
    problems = step.check("shrink")
    if problems:
        raise DistillError(problems[0].replace("a step needs", "pass").replace(
            "layers, hidden, heads, intermediate", "--layers, --hidden, --heads, --intermediate"))
    result = shrink_model(model, out, step, strategy=strategy, score=score, data=data,
                          examples=examples, max_length=max_length, force=force)
    table = Table("", "layers", "hidden", "params", "non-embedding params",
                  title=escape(f"{model} -> {out}"))
    for row in ("before", "after"):
        r = result[row]
        table.add_row(row, str(r["layers"]), str(r["hidden_size"]), f"{r['params']:,}",
                      f"{r['params_non_embedding']:,}")
    console.print(table)
    if "kept_layers" in result:
        # The score is named because `auto` picks it from the model (task head or not).
        by = f", by score {result['score']}" if "score" in result else ""
        console.print(f"kept layers ({strategy}): {result['kept_layers']}{by}")


def _bf16_setting(value: str) -> bool | str:
    """`--bf16 auto|true|false` as the recipe key takes it."""
    choices = {"auto": "auto", "true": True, "false": False}
    if value.lower() not in choices:
        raise DistillError(f"--bf16 {value!r}: choose auto, true or false")
    return choices[value.lower()]


@app.command()
@_user_errors(ATTACH_FLAGS)
def attach(student: Annotated[str | None, typer.Argument(
               help="A saved student (HF directory).")] = None,
           method: Annotated[str, typer.Option(help="PEFT method (see --list).")] = "lora",
           data: Annotated[str, typer.Option(help="Dataset: builtin:NAME, file or folder.")]
           = "builtin:bbc_news",
           option: Annotated[list[str] | None, typer.Option(
               "--option", "-O", help="Method option KEY=VALUE, e.g. -O r=8 "
               "-O 'target_modules=[query, value]' (repeatable).")] = None,
           epochs: float = 5, learning_rate: Annotated[float, typer.Option(
               "--lr", help="Learning rate.")] = 1e-3,
           batch_size: int = 32, max_length: int = 128, seed: int = 0,
           text_column: str = "text", label_column: str = "label",
           data_config: DataConfigOpt = None, data_split: DataSplitOpt = None,
           bf16: Annotated[str, typer.Option(
               help="bfloat16 autocast: auto (timed on this machine), true or false.")]
           = "auto",
           output: Annotated[Path | None, typer.Option(
               "--output", "-o", help="Run directory (default: runs/attach-<method>).")] = None,
           force: Annotated[bool, typer.Option(help="Replace an existing run directory.")]
           = False,
           list_methods: Annotated[bool, typer.Option(
               "--list", help="List the methods and exit.")] = False,
           ) -> None:
    """Attach a PEFT adapter to a student and train it on a task (a one-stage recipe).

    Reports trainable parameters, their share of the model, the test metric of the model's
    task (accuracy, or perplexity for a causal LM) and seconds per step; the adapter is saved
    in Hugging Face PEFT's format.
    """
    import peft_methods
    from distill.commands.attach import attach as attach_fn
    from distill.commands.attach import parse_options
    from distill.config.recipe import DataConfig

    if list_methods:
        table = Table("method", "PEFT type", "mergeable", "description")
        for name in peft_methods.available():
            m = peft_methods.get_method(name)
            doc = (type(m).__doc__ or "").strip().splitlines()[0] if type(m).__doc__ else ""
            table.add_row(name, m.peft_type, "yes" if m.mergeable else "no", doc)
        console.print(table)
        return
    if student is None:
        raise DistillError("attach: give the student to adapt, e.g. distill attach "
                           "runs/NAME/stages/01-distill/model --method lora")
    cfg = DataConfig(dataset=data, text_column=text_column, label_column=label_column,
                     max_length=max_length, config=data_config, split=data_split)
    rec = attach_fn(student, method, cfg, parse_options(option or []), output=output,
                    force=force, console=console, epochs=epochs, learning_rate=learning_rate,
                    batch_size=batch_size, seed=seed, bf16=_bf16_setting(bf16))
    table = Table("metric", "value", title=escape(f"{method} on {student} for {data}"))
    table.add_row("trainable params", f"{rec['trainable_params']:,}")
    table.add_row("share of the model", f"{rec['trainable_percent']:.3f} %")
    table.add_row(f"test {rec['metric']['name']}", f"{rec['metric']['value']:.4f}")
    table.add_row("seconds per step", f"{rec['seconds_per_step']:.3f}")
    table.add_row("adapter", escape(f"{rec['run_dir']}/{rec['adapter']}"))
    console.print(table)


@app.command("export")
@_user_errors(DATA_FLAGS | {"teacher.model": "MODEL", "stages.0.formats": "--format",
                            "teacher.task": "--task", "stages.0.split": "--split",
                            "stages.0.batch_size": "--batch-size"})
def export_cmd(model: Annotated[str, typer.Argument(
                   help="A saved model: classifier or causal LM directory, built-in name.")],
               fmt: Annotated[list[str] | None, typer.Option(
                   "--format", "-f", help="bf16, onnx or onnx-int8 (repeatable; default: "
                   "all three).")] = None,
               data: Annotated[str | None, typer.Option(
                   help="The task's data the artifacts are checked on (default: "
                        "builtin:rotten_tomatoes for a classifier, builtin:shakespeare for a "
                        "causal LM).")] = None,
               task: Annotated[str | None, typer.Option(
                   help="sequence-classification or causal-lm (default: from the model's "
                        "config).")] = None,
               text_column: str = "text", label_column: str = "label",
               data_config: DataConfigOpt = None, data_split: DataSplitOpt = None,
               max_length: int = 128,
               split: Annotated[str, typer.Option(
                   help="test or validation: where every artifact is checked.")] = "test",
               batch_size: Annotated[int, typer.Option(
                   help="The check's batch size (ONNX int8 scales its activations per batch: "
                        "give the batch you serve with).")] = 64,
               trim_vocabulary: Annotated[bool, typer.Option(
                   help="Keep only the tokens the data uses (and the special ones).")] = False,
               latency: Annotated[bool, typer.Option(help="Time every artifact.")] = True,
               output: Annotated[Path | None, typer.Option(
                   "--output", "-o", help="Run directory (default: runs/export).")] = None,
               force: Annotated[bool, typer.Option(help="Replace an existing run directory.")]
               = False,
               ) -> None:
    """Export a model for serving (bf16 safetensors, ONNX, ONNX int8), each artifact checked
    against the float32 model (test metric, largest logit difference, agreement) and timed
    at batch 1 and 32 (a one-stage recipe)."""
    from distill.commands.export import export
    from distill.config.recipe import DataConfig

    cfg = DataConfig(dataset=data or "", text_column=text_column, label_column=label_column,
                     max_length=max_length, config=data_config, split=data_split)
    got = export(model, cfg, fmt, output=output, force=force, console=console, task=task,
                 latency=latency, trim_vocabulary=trim_vocabulary, split=split,
                 batch_size=batch_size)
    metric = next(iter(got["exports"].values()))["metric"]["name"]
    table = Table("artifact", metric, "max |Δlogit|", "agreement", "MB", "batch 1 (ms)",
                  "batch 32 (ms)", title=escape(f"{model} exported ({got['run_dir']})"))
    for name, row in got["exports"].items():
        times = row.get("latency_ms", {})
        table.add_row(escape(row["artifact"]), f"{row['metric']['value']:.4f}",
                      f"{row['max_logit_diff']:.2e}", f"{row['agreement']:.4f}",
                      f"{row['size_mb']:.1f}", f"{times.get('batch1', float('nan')):.1f}",
                      f"{times.get('batch32', float('nan')):.1f}")
    console.print(table)


@app.command("eval")
@_user_errors(DATA_FLAGS | {"data.max_eval_examples": "--max-examples"})
def eval_cmd(model: Annotated[str, typer.Argument(
                 help="A saved model: classifier or causal LM directory, built-in name.")],
             data: Annotated[str | None, typer.Option(
                 help="Dataset: builtin:NAME, file or folder (default: builtin:rotten_tomatoes "
                      "for a classifier, builtin:shakespeare for a causal LM).")] = None,
             task: Annotated[str | None, typer.Option(
                 help="sequence-classification or causal-lm (default: from the model's "
                      "config).")] = None,
             split: Annotated[str, typer.Option(help="test or validation.")] = "test",
             text_column: str = "text", label_column: str = "label",
             data_config: DataConfigOpt = None, data_split: DataSplitOpt = None,
             max_length: int = 128,
             max_examples: Annotated[int | None, typer.Option(
                 help="Evaluate on the first N examples only.")] = None,
             latency: Annotated[bool, typer.Option(help="Measure CPU latency.")] = True,
             ) -> None:
    """Evaluate a saved model on a dataset split: its task's metrics (accuracy and F1, or
    perplexity), size, latency."""
    from distill.config.recipe import DataConfig
    from distill.stages.evaluate import evaluate_saved_model

    if split not in ("test", "validation"):
        raise DistillError(f"--split: {split!r} is not allowed; allowed: test, validation")
    cfg = DataConfig(dataset=data or "", text_column=text_column, label_column=label_column,
                     max_length=max_length, max_eval_examples=max_examples,
                     config=data_config, split=data_split)
    rec = evaluate_saved_model(model, cfg, split=split, latency=latency, task=task)
    table = Table("metric", "value", title=escape(f"{model} on {rec['dataset']} ({split})"))
    table.add_row(rec["metric"]["name"], f"{rec['metric']['value']:.4f}")
    for name in rec["other_metrics"]:
        table.add_row(name, f"{rec[name]:.4f}" if isinstance(rec[name], float)
                      else f"{rec[name]:,}")
    table.add_row("params", f"{rec['params']:,}")
    table.add_row("size_mb", f"{rec['size_mb']:.1f}")
    for k, v in rec.get("latency_ms", {}).items():
        table.add_row(f"latency {k} (ms)", f"{v:.1f}")
    console.print(table)


@app.command()
@_user_errors()
def report(run_dir: Annotated[Path, typer.Argument(help="A run directory.")]) -> None:
    """Print a finished run's tables and re-render report.md and the plots."""
    from distill.run.report import load_report, print_report, write_report

    from distill.run.ownership import FolderLock, is_ours

    data = load_report(run_dir)
    if not is_ours(run_dir):
        raise DistillError(f"{run_dir} was not made by distill (no .distill.json); `distill "
                           "report` re-renders only runs of its own, and writes nothing here")
    with FolderLock(run_dir):
        write_report(run_dir, data, redraw=True)
    print_report(data, console)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
