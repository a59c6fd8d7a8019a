"""Run reports: report.json, report.md, rich tables and matplotlib plots.

The run directory layout and the `report.json` schema are fixed (DESIGN.md). Everything here
tolerates a partially filled report -- a failed run still gets one: missing keys show as "—".

    write_report(Path("runs/demo"), report)   # report.json, report.md, loss_*.png, tradeoff.png
    print_report(load_report(Path("runs/demo")))

A run writes its report at every stage end; a plot is drawn again only when what it draws
changed (each PNG carries a digest of its inputs), so a run of n stages draws each stage's loss
plot once instead of n times.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from distill.errors import DistillError
from distill.files import atomic_write, json_lines

DASH = "—"
_STATUS_STYLE = {"done": "green", "skipped": "yellow", "failed": "bold red"}
# Text columns are left-aligned; numbers right-aligned so their decimal points line up.
_LEFT = {"Model", "Method", "Kind", "Status", "Artifact", "Prompt", "Continuation"}
# Stage folders are `<NN>-<kind>`; anything else under stages/ is not ours to plot.
_STAGE_DIR = re.compile(r"^\d{2,}-[\w-]+$")


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
def _num(value: Any) -> float | None:
    """A finite number, or None (bools, strings, NaN and missing values are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _fmt(value: Any, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    number = _num(value)
    return DASH if number is None else f"{number * scale:{spec}}{suffix}"


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _stages(report: dict) -> list[dict]:
    stages = report.get("stages")
    return [s for s in stages if isinstance(s, dict)] if isinstance(stages, list) else []


def _stage_label(stage: dict) -> str:
    index, kind = stage.get("index"), stage.get("kind", "stage")
    return f"{index:02d}-{kind}" if isinstance(index, int) else str(kind)


def _models(report: dict) -> list[tuple[str, dict, dict]]:
    """(label, model metrics, stage) for the teacher and each stage with a model entry.

    Empty entries are skipped: the pipeline starts with `"teacher": {}` and fills it at the
    end, so a run that failed midway would otherwise show a teacher row of dashes only.
    """
    rows = []
    teacher = _dict(report.get("teacher"))
    if teacher:
        rows.append(("teacher", report["teacher"], {}))
    for stage in _stages(report):
        model = _dict(stage.get("model"))
        if not model:
            continue
        if model == teacher:
            # A finetune stage's model *is* the teacher: one row, labelled as both.
            rows[0] = (f"teacher ({_stage_label(stage)})", report["teacher"], stage)
            continue
        steps = [st for st in stage.get("steps") or [] if _dict(st.get("model"))]
        if steps:
            # A shrink stage: one row per step; the stage's own model is its last step's.
            for st in steps:
                rows.append((f"{_stage_label(stage)}/{st.get('name', st.get('index'))}",
                             st["model"], stage))
            continue
        rows.append((_stage_label(stage), stage["model"], stage))
    return rows


def _cell(text: Any, limit: int = 160) -> str:
    """One table cell of free text: line breaks shown as ↵, pipes escaped, cut to `limit`."""
    text = str(text).replace("\r", "").replace("\n", "↵ ").replace("|", "\\|").strip()
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _sample_rows(report: dict) -> list[list[str]]:
    """(model, prompt, continuation, tokens/s) for every model that recorded samples."""
    rows = []
    for label, model, _ in _models(report):
        speed = _dict(model.get("generation")).get("tokens_per_s")
        for k, sample in enumerate(model.get("samples") or []):
            if isinstance(sample, dict):
                rows.append([label if k == 0 else "", _cell(sample.get("prompt", "")),
                             _cell(sample.get("completion", "")),
                             _fmt(speed, ".1f") if k == 0 else ""])
    return rows


def _metric_name(model: dict) -> str | None:
    metric = _dict(model.get("metric"))
    return str(metric.get("name") or "metric") if metric else None


def _metric_names(models: list[tuple[str, dict, dict]]) -> list[str]:
    """Distinct metric names in table order (a metric without a name is just "metric")."""
    return list(dict.fromkeys(n for _, m, _ in models if (n := _metric_name(m))))


def _extra(model: dict, stage: dict, key: str) -> Any:
    # DESIGN.md puts method/trainable_params in the model metrics of adapter stages; accept them
    # on the stage itself too, so a pipeline that records them there still shows up.
    return model.get(key, stage.get(key))


def _model_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of the models table, shared by rich and markdown output."""
    models = _models(report)
    names = _metric_names(models)
    # One metric name -> it is the header; mixed names (unusual) -> name each cell instead.
    metric_header = names[0] if len(names) == 1 else "Metric"
    has_f1 = any(_num(m.get("f1_macro")) is not None for _, m, _ in models)
    has_method = any(_extra(m, s, "method") is not None for _, m, s in models)
    has_trainable = any(_extra(m, s, "trainable_params") is not None for _, m, s in models)

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
        metric, latency = _dict(m.get("metric")), _dict(m.get("latency_ms"))
        metric_cell = _fmt(metric.get("value"), ".4f")
        if len(names) > 1 and metric_cell != DASH:
            metric_cell += f" ({_metric_name(m)})"
        row = [label, _fmt(m.get("params"), ".2f", 1e-6),
               _fmt(m.get("params_non_embedding"), ".2f", 1e-6),
               _fmt(m.get("size_mb"), ".1f"), metric_cell]
        row += [_fmt(m.get("f1_macro"), ".4f")] if has_f1 else []
        row += [_fmt(latency.get("batch1"), ".2f"), _fmt(latency.get("batch32"), ".2f"),
                _fmt(m.get("retention"), ".1f", 100.0, "%")]
        scored = m.get("eval_data") or []
        for k in range(len(others)):
            d = _dict(scored[k]) if k < len(scored) else {}
            value = _fmt(d.get(_metric_name(m) or ""), ".4f")
            retention = _fmt(d.get("retention"), ".1f", 100.0, "%")
            row.append(value if retention == DASH else f"{value} ({retention})")
        if has_method:
            method = _extra(m, stage, "method")
            row.append(str(method) if method is not None else DASH)
        if has_trainable:
            # An exact count, not millions: PEFT methods train from a few thousand parameters
            # up, and "0.00" would hide the difference between prompt tuning and BitFit.
            count, total = _num(_extra(m, stage, "trainable_params")), _num(m.get("params"))
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
    for stage in _stages(report):
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


# ----------------------------------------------------------------------------- plots
def _new_figure(size: tuple[float, float]) -> Any:
    """A figure drawn by the Agg canvas, headless.

    matplotlib's Figure API instead of pyplot: no global figure registry to leak into, and no
    process-wide backend switch that would surprise a notebook importing this library. The
    import is local because matplotlib costs ~0.6 s and most CLI commands never plot.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


# Bump when the drawing code changes: plots drawn by an older version are then drawn again.
_PLOT_VERSION = "1"
_DIGEST_KEY = "distill-inputs"  # the PNG text chunk holding a plot's input digest


def _digest(*inputs: Any) -> str:
    """sha256 of what a plot draws (JSON-able values or bytes) and of the drawing code's version."""
    h = hashlib.sha256(_PLOT_VERSION.encode())
    for item in inputs:
        if not isinstance(item, bytes):
            item = json.dumps(item, sort_keys=True, default=str).encode()
        h.update(len(item).to_bytes(8, "little") + item)
    return h.hexdigest()


def _drawn(path: Path, digest: str) -> bool:
    """Whether `path` is a PNG this module drew from inputs with this digest."""
    from PIL import Image  # matplotlib's own dependency; it writes the PNGs

    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.text.get(_DIGEST_KEY) == digest
    except (OSError, SyntaxError, ValueError):  # missing, or not a PNG Pillow can read
        return False


def _save(fig: Any, path: Path, digest: str) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={_DIGEST_KEY: digest})
    atomic_write(path, buffer.getvalue())
    return path


def _read_log(data: bytes) -> tuple[dict[str, list], dict[str, list]]:
    """Train series {name: [(step, value)]} and eval series {metric_name: [(step, value)]}.

    Lines that are not JSON objects, lack a step, or hold non-finite values are skipped: a
    crashed run can leave a truncated last line, and a diverged one NaN losses.
    """
    train: dict[str, list] = {}
    evals: dict[str, list] = {}
    for _, line in json_lines(data.decode("utf-8", errors="replace")):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(entry, dict) or (step := _num(entry.get("step"))) is None:
            continue
        if entry.get("type") == "train":
            for key, value in entry.items():
                # "loss" and its components ("loss_ce", "loss_kd", ...); lr, epoch, grad_norm
                # and the like are not losses and would squash the scale.
                if (key == "loss" or key.startswith("loss_")) and _num(value) is not None:
                    train.setdefault(key, []).append((step, float(value)))
        elif entry.get("type") == "eval" and _num(entry.get("metric")) is not None:
            name = str(entry.get("metric_name") or "metric")
            evals.setdefault(name, []).append((step, float(entry["metric"])))
    return train, evals


def _stage_dirs(run_dir: Path, report: dict) -> list[str]:
    """Stage folder names from the report plus any on disk (a crashed run may lack entries)."""
    names = {_stage_label(s) for s in _stages(report)}
    stages_dir = run_dir / "stages"
    if stages_dir.is_dir():
        names |= {p.name for p in stages_dir.iterdir() if p.is_dir()}
    # By number, not text: "100-adapt" comes after "99-shrink".
    return sorted((n for n in names if _STAGE_DIR.match(n)),
                  key=lambda n: (int(n.split("-", 1)[0]), n))


def plot_losses(run_dir: Path, report: dict, redraw: bool = False) -> list[Path]:
    """One PNG per stage with a log.jsonl: train loss (+ components) and eval metric vs step.

    A stage's PNG drawn from the same log and title is kept unless `redraw`.

    Returns:
        The written files, run_dir/loss_<NN>-<kind>.png, in stage order.
    """
    run_dir = Path(run_dir)
    written = []
    for name in _stage_dirs(run_dir, report):
        log = run_dir / "stages" / name / "log.jsonl"
        if not log.is_file():
            continue
        data = log.read_bytes()
        train, evals = _read_log(data)
        if not train and not evals:
            continue
        title = f"{report.get('recipe') or 'run'} — stage {name} training"
        path, digest = run_dir / f"loss_{name}.png", _digest(title, data)
        if not redraw and _drawn(path, digest):
            written.append(path)
            continue
        fig = _new_figure((8, 4.5))
        ax = fig.add_subplot()
        handles = []
        # The total loss first and thick; components thinner so they read as its parts.
        for i, key in enumerate(sorted(train, key=lambda k: (k != "loss", k))):
            steps, values = zip(*train[key])
            width, color = (1.8, "C0") if key == "loss" else (0.9, f"C{i + 1}")
            handles += ax.plot(steps, values, lw=width, color=color, label=key,
                               alpha=1.0 if key == "loss" else 0.8)
        values = [v for series in train.values() for _, v in series]
        # KD losses (CE ~1, hidden MSE ~1e-3) can differ by orders of magnitude: a log scale
        # keeps the small ones visible.
        if values and min(values) > 0 and max(values) / min(values) > 100:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        if evals:
            twin = ax.twinx()
            for j, (metric, points) in enumerate(evals.items()):
                steps, values = zip(*points)
                handles += twin.plot(steps, values, color="black" if j == 0 else f"C{6 + j}",
                                     marker="o", ms=4, lw=1.2, ls="--", label=f"eval {metric}")
            twin.set_ylabel("eval " + ", ".join(evals))
        # Below the axes: inside, any spot hides a curve (loss falls while the metric rises).
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5),
                   fontsize="small", frameon=False)
        ax.set_title(title)
        written.append(_save(fig, path, digest))
    return written


def plot_tradeoff(run_dir: Path, report: dict, redraw: bool = False) -> Path | None:
    """Scatter of metric (y) vs params in millions (x), one labelled point per model.

    A PNG drawn from the same points is kept unless `redraw`.

    Returns:
        run_dir/tradeoff.png, or None when no model has both a metric and a parameter count.
    """
    models = _models(report)
    names = _metric_names(models)
    if not names:
        return None
    # Only models scored with the same metric share a y-axis; accuracy next to perplexity on
    # one scale would mislead. The first named one (the teacher's, when known) wins.
    # Adapters solve their own task (adapters.png); they are not points on this trade-off.
    points = [(label, _num(m.get("params")), _num(_dict(m.get("metric")).get("value")))
              for label, m, stage in models
              if _metric_name(m) == names[0] and not _extra(m, stage, "method")]
    points = [(label, x / 1e6, y) for label, x, y in points if x is not None and y is not None]
    if not points:
        return None
    title = f"{report.get('recipe') or 'run'} — {names[0]} vs size"
    base = _num(_dict(_dict(report.get("teacher")).get("metric")).get("value"))
    path, digest = Path(run_dir) / "tradeoff.png", _digest(title, points, base)
    if not redraw and _drawn(path, digest):
        return path
    fig = _new_figure((7, 4.5))
    ax = fig.add_subplot()
    # A faint line in pipeline order shows the path the compression took.
    ax.plot([p[1] for p in points], [p[2] for p in points], color="0.75", lw=1, ls=":", zorder=1)
    for label, x, y in points:
        teacher = label.startswith("teacher")
        ax.scatter([x], [y], s=90 if teacher else 50, marker="*" if teacher else "o",
                   color="C3" if teacher else "C0", zorder=2)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 6), fontsize="small")
    ax.margins(0.15)
    ax.set_xlabel("parameters (millions)")
    better = "lower" if names[0].lower() in ("perplexity", "ppl", "loss") else "higher"
    ax.set_ylabel(f"{names[0]} ({better} is better)")
    ax.set_title(title)
    if base and better == "higher":
        # Retention (metric / teacher's metric) is the same picture on a second scale.
        ret = ax.secondary_yaxis("right", functions=(lambda y: 100 * y / base,
                                                     lambda r: r * base / 100))
        ret.set_ylabel("retention vs teacher (%)")
    ax.grid(alpha=0.3)
    return _save(fig, path, digest)


def plot_adapters(run_dir: Path, report: dict, redraw: bool = False) -> Path | None:
    """Task metric (y) vs trainable parameters (x, log scale) of each adapter stage.

    A PNG drawn from the same points is kept unless `redraw`.

    Returns:
        run_dir/adapters.png, or None when the run has no adapter stage with both numbers.
    """
    points, metric = [], "metric"
    for label, m, stage in _models(report):
        method = _extra(m, stage, "method")
        x = _num(_extra(m, stage, "trainable_params"))
        y = _num(_dict(m.get("metric")).get("value"))
        if method and x and y is not None:
            points.append((str(method), x, y))
            metric = _metric_name(m) or metric
    if not points:
        return None
    title = f"{report.get('recipe') or 'run'} — adapters: quality vs trainable size"
    path, digest = Path(run_dir) / "adapters.png", _digest(title, points, metric)
    if not redraw and _drawn(path, digest):
        return path
    fig = _new_figure((7, 4.5))
    ax = fig.add_subplot()
    for label, x, y in points:
        ax.scatter([x], [y], s=50, color="C2" if label == "full" else "C0", zorder=2)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize="small")
    ax.set_xscale("log")
    ax.margins(0.12)
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(f"{metric} on the adapter task")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path, digest)
