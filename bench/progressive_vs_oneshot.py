"""Progressive shrinking, step by step, and against one-shot at the same number of steps.

1. Runs `recipes/minilm-progressive.yaml` (6 -> 4 -> 3 -> 2 layers -> hidden 256, one heal
   epoch per step) from a tuned teacher, unless `--run` already holds a finished run: every
   step's size, accuracy, retention, latency and validation accuracy before/after its heal.
2. Distills the same final shapes from the same teacher in one shot, with as many epochs as
   the progressive path spent to reach them:
     A. 2 layers:             progressive step `2-layers2` (3 heal epochs) vs one cut + 3 epochs
     B. 2 layers, hidden 256: progressive final (4 heal epochs) vs one cut + 4 epochs

Prints a table and writes bench/results/progressive_vs_oneshot.json. The default teacher is
the benchmarks' cached one (`minilm_stages.tuned_teacher`: the default recipe's tuning, which
is this recipe's finetune stage, same seed and settings; that stage then skips itself, the
teacher being tuned for these labels already).

    HF_HUB_OFFLINE=1 nice -n 19 python bench/progressive_vs_oneshot.py [--teacher DIR]
    python bench/progressive_vs_oneshot.py --reuse   # re-read finished runs, train nothing
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from distill import load_recipe, run_recipe
from minilm_stages import tuned_teacher
from provenance import RESULTS, ROOT, write_result

RECIPE = ROOT / "recipes" / "minilm-progressive.yaml"


def progressive_steps(run: Path) -> list[dict]:
    """One row per shrink step of a finished progressive run: the report's model metrics
    plus what the step's metrics say (layers kept, validation before/after the heal)."""
    report = json.loads((run / "report.json").read_text())
    stage = next(s for s in report["stages"] if s["kind"] == "shrink")
    metrics = json.loads((run / "stages" / f"{stage['index']:02d}-shrink" /
                          "metrics.json").read_text())
    details = {s["name"]: s for s in metrics["steps"]}
    rows = []
    for step in stage["steps"]:
        d = details[step["name"]]
        rows.append({"name": step["name"], "target": d["target"],
                     "kept_layers": d["start_layers"], "layers": d["layers"],
                     "hidden_size": d["hidden_size"], "model": step["model"],
                     "validation_before_heal": d["validation_before_heal"],
                     "validation_after_heal": d["best_validation_accuracy"],
                     "heal_epochs": 1, "bf16": d.get("bf16")})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", type=Path,
                    help="a tuned teacher's folder (default: the benchmarks' cached one)")
    ap.add_argument("--run", type=Path, default=ROOT / "runs/minilm-progressive",
                    help="the progressive run (made here unless it has finished already)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs/bench-progressive-vs-oneshot",
                    help="where the one-shot runs go")
    ap.add_argument("--json", type=Path, default=RESULTS / "progressive_vs_oneshot.json")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse one-shot runs of an earlier invocation that finished")
    args = ap.parse_args()
    console = Console()
    teacher_override = [f"teacher.model={args.teacher or tuned_teacher(console)}"]
    if not (args.run / "report.json").is_file():
        run_recipe(load_recipe(RECIPE, teacher_override), output=str(args.run), force=True,
                   console=console)
    progressive = json.loads((args.run / "report.json").read_text())
    steps = progressive_steps(args.run)
    teacher = args.run / "stages/00-finetune/model"
    if not teacher.is_dir():  # the run started from an already tuned teacher
        teacher = Path(load_recipe(args.run / "recipe.yaml").teacher.model)
    cases = [("2 layers", "2-layers2", "[{layers: 2}]", 3),
             ("2 layers, hidden 256", "3-hidden256-heads8",
              "[{layers: 2, hidden: 256, heads: 8}]", 4)]
    rows = []
    for label, step_name, schedule, epochs in cases:
        done = args.out / step_name / "report.json"
        if args.reuse and done.is_file() and json.loads(done.read_text())["final"]:
            report = json.loads(done.read_text())  # finished earlier: reuse, don't rerun
        else:
            report = run_recipe(load_recipe(RECIPE, [
                f"teacher.model={teacher}", f"stages.1.schedule={schedule}",
                f"stages.1.heal.epochs={epochs}", "stages.2.latency=false"]),
                output=str(args.out / step_name), force=True, console=console)
        step = next(s for s in steps if s["name"] == step_name)
        oneshot = json.loads((args.out / step_name / "stages/01-shrink/metrics.json")
                             .read_text())["steps"][0]
        rows.append({"shape": label, "epochs": epochs,
                     "params": report["final"]["params"],
                     "oneshot_kept_layers": oneshot["start_layers"],
                     "progressive_accuracy": step["model"]["metric"]["value"],
                     "progressive_f1_macro": step["model"]["f1_macro"],
                     "progressive_retention": step["model"]["retention"],
                     "progressive_validation": step["validation_after_heal"],
                     "oneshot_accuracy": report["final"]["metric"]["value"],
                     "oneshot_f1_macro": report["final"]["f1_macro"],
                     "oneshot_retention": report["final"]["retention"],
                     "oneshot_validation": oneshot["best_validation_accuracy"],
                     "teacher_accuracy": report["teacher"]["metric"]["value"]})
    table = Table(title="Progressive vs one-shot (Rotten Tomatoes test, 1,280 examples)")
    for col in ("student", "params", "train epochs", "progressive", "one-shot", "difference"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["shape"], f"{r['params'] / 1e6:.2f} M", str(r["epochs"]),
                      f"{r['progressive_accuracy']:.4f} ({r['progressive_retention']:.1%})",
                      f"{r['oneshot_accuracy']:.4f} ({r['oneshot_retention']:.1%})",
                      f"{r['progressive_accuracy'] - r['oneshot_accuracy']:+.4f}")
    console.print(table)
    config = json.loads((teacher / "config.json").read_text())
    out = write_result(args.json, {
        "recipe": str(RECIPE.relative_to(ROOT)), "teacher": progressive["teacher"],
        "teacher_config": {k: config[k] for k in ("num_hidden_layers", "hidden_size",
                                                  "num_attention_heads")},
        "steps": steps, "final": progressive["final"], "oneshot": rows})
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
