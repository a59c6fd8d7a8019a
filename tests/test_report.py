"""Tests of distill.run.report (report.json/report.md, rich tables) and distill.run.plots (loss,
trade-off and adapter plots)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from rich.console import Console

from distill.errors import DistillError
from distill.run.plots import plot_losses, plot_tradeoff
from distill.run.report import (
    load_report,
    models_table,
    print_report,
    render_markdown,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _model(params: int, metric: float | None, **extra: object) -> dict:
    model: dict = {"params": params, "params_non_embedding": params // 2, "size_mb": params * 4e-6,
                   "latency_ms": {"batch1": 5.1, "batch32": 80.25}}
    if metric is not None:
        model["metric"] = {"name": "accuracy", "value": metric, "split": "test"}
    model.update(extra)
    return model


@pytest.fixture
def report() -> dict:
    return {
        "recipe": "minilm-rotten-tomatoes",
        "teacher": _model(22713216, 0.85, f1_macro=0.8412),
        "stages": [
            {"index": 0, "kind": "finetune", "status": "skipped", "seconds": 0.0},
            {"index": 1, "kind": "distill", "status": "done", "seconds": 12.34,
             "model": _model(11356608, 0.8475, retention=0.99706),
             "artifact": "stages/01-distill/model"},
            {"index": 2, "kind": "adapt", "status": "done", "seconds": 30.0,
             "model": _model(11356608, 0.80, method="lora", trainable_params=147456,
                             retention=0.941),
             "artifact": "stages/02-adapt/adapter"},
            {"index": 3, "kind": "evaluate", "status": "failed", "seconds": 1.5},
        ],
        "final": _model(11356608, 0.80),
    }


def _write_log(run_dir: Path, stage: str, lines: list[object]) -> None:
    folder = run_dir / "stages" / stage
    folder.mkdir(parents=True, exist_ok=True)
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    (folder / "log.jsonl").write_text(text + "\n")


def _distill_log(run_dir: Path) -> None:
    lines: list[object] = []
    for step in range(1, 41):
        lines.append({"type": "train", "step": step, "loss": 2.0 / step ** 0.5,
                      "loss_ce": 1.2 / step ** 0.5, "loss_kd": 0.8 / step ** 0.5, "lr": 1e-4})
        if step % 10 == 0:
            lines.append({"type": "eval", "step": step, "metric": 0.7 + step / 400,
                          "metric_name": "accuracy"})
    lines.append('{"type": "train", "step": 41, "loss": 0.3')  # truncated by a crash
    lines.append({"type": "train", "step": 42, "loss": float("nan")})
    _write_log(run_dir, "01-distill", lines)


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def _row(markdown: str, label: str) -> list[str]:
    line = next(ln for ln in markdown.splitlines() if ln.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")]


# ----------------------------------------------------------------------------- report files
def test_write_report_round_trips_json(tmp_path: Path, report: dict) -> None:
    write_report(tmp_path, report)
    assert load_report(tmp_path) == report
    text = (tmp_path / "report.json").read_text()
    assert text.startswith('{\n  "recipe"')  # indent 2
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp files left


def test_load_report_rejects_empty_and_garbled_folders(tmp_path: Path) -> None:
    with pytest.raises(DistillError, match="is not a run directory: no report.json"):
        load_report(tmp_path)
    (tmp_path / "report.json").write_text('{"recipe": ')
    with pytest.raises(DistillError, match="is not a run directory: no report.json"):
        load_report(tmp_path)
    (tmp_path / "report.json").write_text("[1, 2]")
    with pytest.raises(DistillError, match="is not a run directory"):
        load_report(tmp_path)


def test_markdown_rows_and_formats(report: dict) -> None:
    md = render_markdown(report)
    assert md.startswith("# Distillation report: minilm-rotten-tomatoes")
    header = _row(md, "Model")
    assert header == ["Model", "Params (M)", "Non-emb params (M)", "Size (MB)", "accuracy",
                      "F1 macro", "Latency b1 (ms)", "Latency b32 (ms)", "Retention", "Method",
                      "Trainable"]
    teacher = dict(zip(header, _row(md, "teacher")))
    assert teacher["Params (M)"] == "22.71"
    assert teacher["Non-emb params (M)"] == "11.36"
    assert teacher["Size (MB)"] == "90.9"
    assert teacher["accuracy"] == "0.8500"
    assert teacher["F1 macro"] == "0.8412"
    assert teacher["Latency b1 (ms)"] == "5.10" and teacher["Latency b32 (ms)"] == "80.25"
    assert teacher["Retention"] == teacher["Method"] == teacher["Trainable"] == "—"
    distill = dict(zip(header, _row(md, "01-distill")))
    assert distill["accuracy"] == "0.8475" and distill["Retention"] == "99.7%"
    adapt = dict(zip(header, _row(md, "02-adapt")))
    assert adapt["Method"] == "lora" and adapt["Trainable"] == "147,456 (1.30%)"
    # Stages without a model get no model row but do appear in the stages table.
    assert "| 00-finetune |" not in md
    assert _row(md, "0") == ["0", "finetune", "skipped", "0.0", "—"]
    assert _row(md, "1") == ["1", "distill", "done", "12.3", "stages/01-distill/model"]
    assert _row(md, "3") == ["3", "evaluate", "failed", "1.5", "—"]
    assert "![" not in md  # no plots given, none linked


def test_optional_columns_absent_when_unused(report: dict) -> None:
    del report["teacher"]["f1_macro"]
    del report["stages"][2]
    header = _row(render_markdown(report), "Model")
    assert "F1 macro" not in header and "Method" not in header and "Trainable" not in header


def test_missing_keys_render_as_dash() -> None:
    report = {"recipe": "partial", "teacher": {"params": 1_000_000},
              "stages": [{"index": 1, "kind": "distill", "status": "failed",
                          "model": {"metric": {"name": "accuracy"}, "latency_ms": None}}]}
    md = render_markdown(report)
    assert _row(md, "teacher") == ["teacher", "1.00"] + ["—"] * 6
    assert _row(md, "01-distill") == ["01-distill"] + ["—"] * 7
    assert _row(md, "1") == ["1", "distill", "failed", "—", "—"]


@pytest.mark.parametrize("report", [{}, {"recipe": "x", "stages": None, "teacher": None},
                                    {"stages": ["junk", {"status": "failed"}]}])
def test_empty_or_broken_reports_still_render(tmp_path: Path, report: dict) -> None:
    md = render_markdown(report)
    assert md.startswith("# Distillation report")
    console = Console(record=True, width=200)
    print_report(report, console)
    write_report(tmp_path, report)
    assert (tmp_path / "report.md").read_text() == md
    assert list(tmp_path.glob("*.png")) == []


# ----------------------------------------------------------------------------- rich
def test_rich_tables_render(report: dict) -> None:
    console = Console(record=True, width=200)
    print_report(report, console)
    text = console.export_text()
    for expected in ("Models", "Stages", "teacher", "01-distill", "02-adapt", "22.71", "0.8475",
                     "99.7%", "94.1%", "lora", "147,456", "Latency b1 (ms)", "accuracy",
                     "failed", "stages/01-distill/model"):
        assert expected in text, expected
    teacher_line = next(ln for ln in text.splitlines() if "teacher" in ln)
    assert "—" in teacher_line
    assert models_table(report).row_count == 3


# ----------------------------------------------------------------------------- plots
def test_loss_plots_written_for_stages_with_logs(tmp_path: Path, report: dict) -> None:
    _distill_log(tmp_path)
    _write_log(tmp_path, "02-adapt", [{"type": "train", "step": s, "loss": 1.0 / s}
                                      for s in range(1, 6)])
    (tmp_path / "stages" / "03-evaluate").mkdir()  # folder without a log: skipped
    _write_log(tmp_path, "00-finetune", ["not json", '{"type": "train"}'])  # nothing usable
    paths = plot_losses(tmp_path, report)
    assert [p.name for p in paths] == ["loss_01-distill.png", "loss_02-adapt.png"]
    assert all(_is_png(p) for p in paths)


def test_tradeoff_plot(tmp_path: Path, report: dict) -> None:
    path = plot_tradeoff(tmp_path, report)
    assert path == tmp_path / "tradeoff.png" and _is_png(path)
    assert plot_tradeoff(tmp_path / "x", {"teacher": {"params": 5}, "stages": []}) is None
    assert plot_tradeoff(tmp_path / "x", {}) is None


def test_a_plot_is_drawn_again_only_when_what_it_draws_changed(
        tmp_path: Path, report: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline writes the report at every stage end: unchanged plots are kept (a run of
    n stages would otherwise draw its first stage's loss plot n times)."""
    import distill.run.plots as module

    drawn: list[str] = []
    save = module._save
    monkeypatch.setattr(module, "_save", lambda fig, path, digest: drawn.append(path.name)
                        or save(fig, path, digest))
    _distill_log(tmp_path)
    _write_log(tmp_path, "02-adapt", [{"type": "train", "step": 1, "loss": 1.0}])
    write_report(tmp_path, report)
    every = ["loss_01-distill.png", "loss_02-adapt.png", "tradeoff.png", "adapters.png"]
    assert drawn == every
    drawn.clear()
    write_report(tmp_path, report)
    assert drawn == []
    # One stage logs more: only its plot; a model's metric moves: the plots that show it.
    with (tmp_path / "stages/02-adapt/log.jsonl").open("a") as log:
        log.write(json.dumps({"type": "train", "step": 2, "loss": 0.5}) + "\n")
    write_report(tmp_path, report)
    assert drawn == ["loss_02-adapt.png"]
    drawn.clear()
    report["stages"][1]["model"]["metric"]["value"] = 0.85
    write_report(tmp_path, report)
    assert drawn == ["tradeoff.png"]
    drawn.clear()
    report["stages"][2]["model"]["metric"]["value"] = 0.81  # an adapter: not on the trade-off
    write_report(tmp_path, report)
    assert drawn == ["adapters.png"]
    drawn.clear()
    report["recipe"] = "renamed"  # every title
    write_report(tmp_path, report)
    assert drawn == every
    drawn.clear()
    # A plot overwritten by something else, or deleted, is drawn again; `redraw` draws all.
    (tmp_path / "tradeoff.png").write_bytes(b"not a png")
    (tmp_path / "loss_01-distill.png").unlink()
    write_report(tmp_path, report)
    assert drawn == ["loss_01-distill.png", "tradeoff.png"]
    drawn.clear()
    write_report(tmp_path, report, redraw=True)
    assert drawn == every
    assert all(_is_png(tmp_path / name) for name in every)


def test_report_md_links_only_existing_plots(tmp_path: Path, report: dict) -> None:
    _distill_log(tmp_path)
    write_report(tmp_path, report)
    md = (tmp_path / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert links == ["loss_01-distill.png", "tradeoff.png", "adapters.png"]
    assert all(_is_png(tmp_path / link) for link in links)
    assert "loss_02-adapt.png" not in md


def test_non_finite_values_and_paths_are_written_as_valid_json(tmp_path: Path) -> None:
    report = {"recipe": "diverged", "teacher": {"metric": {"name": "perplexity",
                                                           "value": float("inf")}},
              "stages": [{"index": 1, "kind": "distill", "artifact": tmp_path / "m",
                          "model": {"retention": float("nan")}}]}
    write_report(tmp_path, report)
    text = (tmp_path / "report.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    loaded = load_report(tmp_path)
    assert loaded["teacher"]["metric"]["value"] is None
    assert loaded["stages"][0]["artifact"] == str(tmp_path / "m")


def test_mixed_and_unnamed_metrics(tmp_path: Path) -> None:
    report = {"teacher": {"params": 2e6, "metric": {"value": 0.9}},
              "stages": [{"index": 1, "kind": "adapt",
                          "model": {"params": 1e6, "metric": {"name": "f1", "value": 0.7}}}]}
    md = render_markdown(report)
    header = _row(md, "Model")
    assert header[4] == "Metric"
    assert _row(md, "teacher")[4] == "0.9000 (metric)"
    assert _row(md, "01-adapt")[4] == "0.7000 (f1)"
    assert _is_png(plot_tradeoff(tmp_path, report))  # the unnamed metric still gets a plot


def test_rich_cells_are_not_parsed_as_markup() -> None:
    report = {"recipe": "odd[bold]name", "stages": [{"index": 0, "kind": "distill",
                                                      "status": "done", "artifact": "a/[red]b"}]}
    console = Console(record=True, width=200)
    print_report(report, console)
    text = console.export_text()
    assert "odd[bold]name" in text and "a/[red]b" in text


def test_failed_run_with_empty_teacher_has_no_model_rows(tmp_path: Path) -> None:
    # What the pipeline writes when a stage raises before model metrics are filled in.
    report = {"recipe": "crashed", "teacher": {}, "final": {},
              "stages": [{"index": 0, "kind": "distill", "status": "failed", "seconds": 3.21}]}
    _write_log(tmp_path, "00-distill", [{"type": "train", "step": 1, "loss": 1.0},
                                        {"type": "train", "step": 2, "loss": 0.5}])
    write_report(tmp_path, report)
    md = (tmp_path / "report.md").read_text()
    assert "No model metrics were recorded." in md and "| teacher |" not in md
    assert _row(md, "0") == ["0", "distill", "failed", "3.2", "—"]
    assert "![Training loss 00-distill](loss_00-distill.png)" in md
    assert "tradeoff.png" not in md and not (tmp_path / "tradeoff.png").exists()


def test_finetune_stage_model_is_the_teacher_row() -> None:
    teacher = _model(22_713_986, 0.82)
    data = {"recipe": "r", "teacher": teacher, "final": teacher,
            "stages": [{"index": 0, "kind": "finetune", "status": "done", "seconds": 1.0,
                        "model": dict(teacher), "artifact": "stages/00-finetune/model"}]}
    markdown = render_markdown(data)
    assert _row(markdown, "teacher (00-finetune)")
    assert "| 00-finetune |" not in markdown


def test_shrink_steps_get_one_row_each() -> None:
    teacher = _model(22_000_000, 0.82)
    step_models = [_model(18_000_000, 0.81), _model(15_000_000, 0.79)]
    data = {"recipe": "r", "teacher": teacher, "final": step_models[-1],
            "stages": [{"index": 0, "kind": "shrink", "status": "done", "seconds": 1.0,
                        "model": step_models[-1], "artifact": "stages/00-shrink/steps/1/model",
                        "steps": [{"index": k, "name": f"{k}-layers{4 - k}", "model": m}
                                  for k, m in enumerate(step_models)]}]}
    markdown = render_markdown(data)
    assert _row(markdown, "00-shrink/0-layers4") and _row(markdown, "00-shrink/1-layers3")
    assert "| 00-shrink |" not in markdown
