"""The run's plots, matplotlib PNGs beside report.json: one loss plot per training stage, metric
vs size (`tradeoff.png`), adapters' metric vs trainable size (`adapters.png`).

A run writes its report at every stage end; a plot is drawn again only when what it draws
changed (each PNG carries a digest of its inputs), so a run of n stages draws each stage's loss
plot once instead of n times.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any

from distill.files import atomic_write, json_lines
from distill.run.report_data import (as_dict, extra, metric_name, metric_names, num,
                                     report_models, report_stages, stage_label)

# Stage folders are `<NN>-<kind>`; anything else under stages/ is not ours to plot.
_STAGE_DIR = re.compile(r"^\d{2,}-[\w-]+$")


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
        if not isinstance(entry, dict) or (step := num(entry.get("step"))) is None:
            continue
        if entry.get("type") == "train":
            for key, value in entry.items():
                # "loss" and its components ("loss_ce", "loss_kd", ...); lr, epoch, grad_norm
                # and the like are not losses and would squash the scale.
                if (key == "loss" or key.startswith("loss_")) and num(value) is not None:
                    train.setdefault(key, []).append((step, float(value)))
        elif entry.get("type") == "eval" and num(entry.get("metric")) is not None:
            name = str(entry.get("metric_name") or "metric")
            evals.setdefault(name, []).append((step, float(entry["metric"])))
    return train, evals


def _stage_dirs(run_dir: Path, report: dict) -> list[str]:
    """Stage folder names from the report plus any on disk (a crashed run may lack entries)."""
    names = {stage_label(s) for s in report_stages(report)}
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
    models = report_models(report)
    names = metric_names(models)
    if not names:
        return None
    # Only models scored with the same metric share a y-axis; accuracy next to perplexity on
    # one scale would mislead. The first named one (the teacher's, when known) wins.
    # Adapters solve their own task (adapters.png); they are not points on this trade-off.
    points = [(label, num(m.get("params")), num(as_dict(m.get("metric")).get("value")))
              for label, m, stage in models
              if metric_name(m) == names[0] and not extra(m, stage, "method")]
    points = [(label, x / 1e6, y) for label, x, y in points if x is not None and y is not None]
    if not points:
        return None
    title = f"{report.get('recipe') or 'run'} — {names[0]} vs size"
    base = num(as_dict(as_dict(report.get("teacher")).get("metric")).get("value"))
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
    for label, m, stage in report_models(report):
        method = extra(m, stage, "method")
        x = num(extra(m, stage, "trainable_params"))
        y = num(as_dict(m.get("metric")).get("value"))
        if method and x and y is not None:
            points.append((str(method), x, y))
            metric = metric_name(m) or metric
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
