"""Run reports: report.json, report.md, rich tables and matplotlib plots.

The run directory layout and the `report.json` schema are fixed (DESIGN.md). Everything here
tolerates a partially filled report -- a failed run still gets one: missing keys show as "—".

    write_report(Path("runs/demo"), report)   # report.json, report.md, loss_*.png, tradeoff.png
    print_report(load_report(Path("runs/demo")))

The plots are `distill.run.plots`'s; reading a partial report, `distill.run.report_data`'s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from distill.errors import DistillError
from distill.files import atomic_write
from distill.run.plots import plot_adapters, plot_losses, plot_tradeoff
from distill.run.report_data import (as_dict, extra, metric_name, metric_names, num,
                                     report_models, report_stages)

DASH = "—"
_STATUS_STYLE = {"done": "green", "skipped": "yellow", "failed": "bold red"}
# Text columns are left-aligned; numbers right-aligned so their decimal points line up.
_LEFT = {"Model", "Method", "Kind", "Status", "Artifact", "Prompt", "Continuation"}


# ----------------------------------------------------------------------------- file IO
def write_report(run_dir: Path, report: dict, redraw: bool = False) -> None:
    """Write report.json, the plots and report.md into a run directory.

    report.json goes first: the machine-readable record must exist even if plotting fails.

    Args:
        run_dir: the run directory (created if missing).
        report: a report following the DESIGN.md schema; may be partially filled.
        redraw: draw every plot, also those already drawn from the same inputs.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # NaN/inf (a diverged run) -> null: Python writes bare NaN, which strict JSON readers reject.
    # default=str: a Path left in the dict (an artifact) is written as its text, not a crash.
    report = json.loads(json.dumps(report, default=str), parse_constant=lambda _: None)
    text = json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    atomic_write(run_dir / "report.json", text.encode("utf-8"))
    plots = plot_losses(run_dir, report, redraw)
    tradeoff = plot_tradeoff(run_dir, report, redraw)
    if tradeoff is not None:
        plots.append(tradeoff)
    adapters = plot_adapters(run_dir, report, redraw)
    if adapters is not None:
        plots.append(adapters)
    markdown = render_markdown(report, plots=[p.name for p in plots])
    atomic_write(run_dir / "report.md", markdown.encode("utf-8"))


def load_report(run_dir: Path) -> dict:
    """Read a run directory's report.json.

    Raises:
        DistillError: when the file is missing, unreadable, or not a JSON object.
    """
    head = f"{run_dir} is not a run directory: no report.json"
    try:
        report = json.loads((Path(run_dir) / "report.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DistillError(f"{head} in it") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DistillError(f"{head} that can be read ({exc})") from None
    if not isinstance(report, dict):
        raise DistillError(f"{head} holding a JSON object (found {type(report).__name__})")
    return report


# ----------------------------------------------------------------------------- table data
def _fmt(value: Any, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    number = num(value)
    return DASH if number is None else f"{number * scale:{spec}}{suffix}"


def _cell(text: Any, limit: int = 160) -> str:
    """One table cell of free text: line breaks shown as ↵, pipes escaped, cut to `limit`."""
    text = str(text).replace("\r", "").replace("\n", "↵ ").replace("|", "\\|").strip()
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _sample_rows(report: dict) -> list[list[str]]:
    """(model, prompt, continuation, tokens/s) for every model that recorded samples."""
    rows = []
    for label, model, _ in report_models(report):
        speed = as_dict(model.get("generation")).get("tokens_per_s")
        for k, sample in enumerate(model.get("samples") or []):
            if isinstance(sample, dict):
                rows.append([label if k == 0 else "", _cell(sample.get("prompt", "")),
                             _cell(sample.get("completion", "")),
                             _fmt(speed, ".1f") if k == 0 else ""])
    return rows


def _model_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of the models table, shared by rich and markdown output."""
    models = report_models(report)
    names = metric_names(models)
    # One metric name -> it is the header; mixed names (unusual) -> name each cell instead.
    metric_header = names[0] if len(names) == 1 else "Metric"
    has_f1 = any(num(m.get("f1_macro")) is not None for _, m, _ in models)
    has_method = any(extra(m, s, "method") is not None for _, m, s in models)
    has_trainable = any(extra(m, s, "trainable_params") is not None for _, m, s in models)

    # More datasets of the task (the evaluate stage's eval_data): one column each, "metric
    # (retention)", named after the dataset.
    others = next((m["eval_data"] for _, m, _ in models if m.get("eval_data")), [])
    header = ["Model", "Params (M)", "Non-emb params (M)", "Size (MB)", metric_header,
              *(["F1 macro"] if has_f1 else []), "Latency b1 (ms)", "Latency b32 (ms)",
              "Retention", *(f"{metric_header} on {_data_name(d.get('dataset'))}"
                             for d in others),
              *(["Method"] if has_method else []), *(["Trainable"] if has_trainable else [])]

    rows = []
    for label, m, stage in models:
        metric, latency = as_dict(m.get("metric")), as_dict(m.get("latency_ms"))
        metric_cell = _fmt(metric.get("value"), ".4f")
        if len(names) > 1 and metric_cell != DASH:
            metric_cell += f" ({metric_name(m)})"
        row = [label, _fmt(m.get("params"), ".2f", 1e-6),
               _fmt(m.get("params_non_embedding"), ".2f", 1e-6),
               _fmt(m.get("size_mb"), ".1f"), metric_cell]
        row += [_fmt(m.get("f1_macro"), ".4f")] if has_f1 else []
        row += [_fmt(latency.get("batch1"), ".2f"), _fmt(latency.get("batch32"), ".2f"),
                _fmt(m.get("retention"), ".1f", 100.0, "%")]
        scored = m.get("eval_data") or []
        for k in range(len(others)):
            d = as_dict(scored[k]) if k < len(scored) else {}
            value = _fmt(d.get(metric_name(m) or ""), ".4f")
            retention = _fmt(d.get("retention"), ".1f", 100.0, "%")
            row.append(value if retention == DASH else f"{value} ({retention})")
        if has_method:
            method = extra(m, stage, "method")
            row.append(str(method) if method is not None else DASH)
        if has_trainable:
            # An exact count, not millions: PEFT methods train from a few thousand parameters
            # up, and "0.00" would hide the difference between prompt tuning and BitFit.
            count, total = num(extra(m, stage, "trainable_params")), num(m.get("params"))
            share = f" ({100 * count / total:.2f}%)" if count is not None and total else ""
            row.append(DASH if count is None else f"{int(count):,}{share}")
        rows.append(row)
    return header, rows


def _data_name(dataset: Any) -> str:
    """A short name for a dataset in a column header: `bbc_news` for `builtin:bbc_news`, a
    path's last part, `a + b` for a mixture."""
    if isinstance(dataset, list):
        return " + ".join(_data_name(d) for d in dataset)
    return str(dataset or DASH).removeprefix("builtin:").rstrip("/").rsplit("/", 1)[-1]


def _stage_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    header = ["Index", "Kind", "Status", "Seconds", "Artifact"]
    rows = []
    for stage in report_stages(report):
        index = stage.get("index")
        rows.append([DASH if index is None else str(index), str(stage.get("kind") or DASH),
                     str(stage.get("status") or DASH), _fmt(stage.get("seconds"), ".1f"),
                     str(stage.get("artifact") or DASH)])
    return header, rows


# ----------------------------------------------------------------------------- rich / markdown
def _rich_table(title: str, header: list[str], rows: list[list[str]]) -> Table:
    # Text, not str: a "[" in a recipe name or path would otherwise be parsed as rich markup.
    table = Table(title=Text(title))
    for name in header:
        table.add_column(name, justify="left" if name in _LEFT else "right",
                         no_wrap=name == "Model")
    for row in rows:
        table.add_row(*(Text(c, style=_STATUS_STYLE.get(c, "") if h == "Status" else "")
                        for h, c in zip(header, row)))
    return table


def models_table(report: dict) -> Table:
    """The models table: the teacher, then each stage that produced a model."""
    return _rich_table(f"Models — {report.get('recipe') or 'run'}", *_model_rows(report))


def stages_table(report: dict) -> Table:
    """The stages table: index, kind, status, seconds, artifact."""
    return _rich_table("Stages", *_stage_rows(report))


def print_report(report: dict, console: Console | None = None) -> None:
    """Print the models and stages tables."""
    console = console or Console()
    console.print(models_table(report))
    console.print(stages_table(report))


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    align = "|" + "|".join(":---" if h in _LEFT else "---:" for h in header) + "|"
    return [line(header), align, *(line(row) for row in rows)]


def render_markdown(report: dict, plots: list[str] | None = None) -> str:
    """The report as markdown: title, models table, stages table and plot links.

    Args:
        report: a report following the DESIGN.md schema.
        plots: file names (relative to report.md) of the plots that exist; only these are
            linked, so a run whose plots were skipped never shows broken images.
    """
    lines = [f"# Distillation report: {report.get('recipe') or 'unnamed recipe'}", ""]
    header, rows = _model_rows(report)
    lines += ["## Models", ""]
    lines += _md_table(header, rows) if rows else ["No model metrics were recorded."]
    header, rows = _stage_rows(report)
    lines += ["", "## Stages", ""]
    lines += _md_table(header, rows) if rows else ["No stages were run."]
    samples = _sample_rows(report)
    if samples:
        lines += ["", "## Greedy samples", "",
                  "Each model continues the same prompts of the evaluation split (greedy, "
                  "batch 1); ↵ marks a line break.", ""]
        lines += _md_table(["Model", "Prompt", "Continuation", "tokens/s"], samples)
    if plots:
        lines += ["", "## Plots", ""]
        for name in plots:
            title = "Metric vs size" if name == "tradeoff.png" else (
                f"Training loss {Path(name).stem.removeprefix('loss_')}")
            lines += [f"![{title}]({name})", ""]
    return "\n".join(lines).rstrip("\n") + "\n"
