"""Progressive shrinking vs one-shot, same teacher, same number of training steps.

Reads a finished run of `recipes/minilm-progressive.yaml` (6 -> 4 -> 3 -> 2 layers -> hidden
256, one heal epoch per step), then distills the same final shapes from the same tuned teacher
in one shot, with as many epochs as the progressive path spent to reach them:

  A. 2 layers:             progressive step `2-layers2` (3 heal epochs) vs one cut + 3 epochs
  B. 2 layers, hidden 256: progressive final (4 heal epochs) vs one cut + 4 epochs

Prints a table and writes JSON. Report whichever wins.

    python bench/progressive_vs_oneshot.py --run runs/minilm-progressive
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from distill import load_recipe, run_recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "minilm-progressive.yaml"


def step_row(report: dict, name: str) -> dict:
    for stage in report["stages"]:
        for step in stage.get("steps") or []:
            if step["name"] == name:
                return step["model"]
    raise SystemExit(f"step {name} not found in the progressive run")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=ROOT / "runs/minilm-progressive")
    ap.add_argument("--out", type=Path, default=ROOT / "runs/bench-progressive-vs-oneshot")
    args = ap.parse_args()
    console = Console()
    progressive = json.loads((args.run / "report.json").read_text())
    teacher = args.run / "stages/00-finetune/model"
    if not teacher.is_dir():  # the run started from an already tuned teacher
        teacher = Path(load_recipe(args.run / "recipe.yaml").teacher.model)
    cases = [("2 layers", "2-layers2", "[{layers: 2}]", 3),
             ("2 layers, hidden 256", "3-hidden256-heads8",
              "[{layers: 2, hidden: 256, heads: 8}]", 4)]
    rows = []
    for label, step_name, schedule, epochs in cases:
        report = run_recipe(load_recipe(RECIPE, [
            f"teacher.model={teacher}", f"stages.1.schedule={schedule}",
            f"stages.1.heal.epochs={epochs}", "stages.2.latency=false"]),
            output=args.out / step_name, force=True, console=console)
        prog = step_row(progressive, step_name)
        rows.append({"shape": label, "epochs": epochs,
                     "params": report["final"]["params"],
                     "progressive_accuracy": prog["metric"]["value"],
                     "progressive_retention": prog["retention"],
                     "oneshot_accuracy": report["final"]["metric"]["value"],
                     "oneshot_retention": report["final"]["retention"],
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
    out = args.out / "progressive_vs_oneshot.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"progressive_run": str(args.run), "rows": rows}, indent=2))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
