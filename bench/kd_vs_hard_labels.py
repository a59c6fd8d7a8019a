"""Soft-label KD vs hard labels alone, same 3-layer student, same budget, 3 seeds.

Runs the distill and evaluate stages of `recipes/minilm-rotten-tomatoes.yaml` from one tuned
teacher, for alpha = 0.5 (KD) and alpha = 1.0 (hard labels only), seeds 0, 1, 2; prints a
table and writes bench/results/kd_vs_hard_labels.json. One seed's difference is within noise
on 1,280 test examples, so the means over seeds are what to compare. The default teacher is
the benchmarks' cached one (`minilm_stages.tuned_teacher`: the recipe's own finetune stage,
settings and seed, on the whole data).

    HF_HUB_OFFLINE=1 nice -n 19 python bench/kd_vs_hard_labels.py [--teacher DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

from distill import load_recipe, run_recipe
from minilm_stages import tuned_teacher
from provenance import RESULTS, ROOT, write_result

RECIPE = ROOT / "recipes" / "minilm-rotten-tomatoes.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", type=Path,
                    help="a tuned teacher's folder (default: the benchmarks' cached one)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.5, 1.0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs/bench-kd-vs-hard",
                    help="where the runs go")
    ap.add_argument("--json", type=Path, default=RESULTS / "kd_vs_hard_labels.json")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="extra recipe overrides, e.g. data.max_train_examples=2000")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse runs of an earlier invocation that finished")
    args = ap.parse_args()
    console = Console()

    args.teacher = args.teacher or tuned_teacher(console)

    rows = []
    for alpha in args.alphas:
        for seed in args.seeds:
            name = f"alpha{alpha:g}-seed{seed}"
            recipe = load_recipe(RECIPE, [
                f"teacher.model={args.teacher}", f"stages.1.seed={seed}",
                f"stages.1.loss.alpha={alpha}", "stages.2.latency=false", *args.overrides])
            done = args.out / name / "report.json"
            if args.reuse and done.is_file() and json.loads(done.read_text())["final"]:
                report = json.loads(done.read_text())  # finished earlier: reuse, don't rerun
            else:
                report = run_recipe(recipe, output=args.out / name, force=True,
                                    console=console)
            rows.append({"alpha": alpha, "seed": seed,
                         "temperature": recipe.stages[1].loss.temperature,
                         "epochs": recipe.stages[1].epochs,
                         "student_layers": recipe.stages[1].student.layers,
                         "teacher_accuracy": report["teacher"]["metric"]["value"],
                         "student_accuracy": report["final"]["metric"]["value"],
                         "retention": report["final"]["retention"],
                         "train_seconds": report["stages"][1]["seconds"]})

    table = Table(title="3-layer student on Rotten Tomatoes test (1,280 examples)")
    for col in ("alpha", "seeds", "student accuracy (mean ± sd)", "per seed", "retention",
                "teacher"):
        table.add_column(col)
    summary = []
    for alpha in args.alphas:
        sel = [r for r in rows if r["alpha"] == alpha]
        accs = [r["student_accuracy"] for r in sel]
        mean, sd = statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0
        ret = statistics.mean(r["retention"] for r in sel)
        summary.append({"alpha": alpha, "mean_accuracy": mean, "sd": sd,
                        "mean_retention": ret, "per_seed": accs})
        table.add_row(f"{alpha:g}", str(len(sel)), f"{mean:.4f} ± {sd:.4f}",
                      ", ".join(f"{a:.4f}" for a in accs), f"{ret:.2%}",
                      f"{sel[0]['teacher_accuracy']:.4f}")
    console.print(table)
    out = write_result(args.json, {"recipe": str(RECIPE.relative_to(ROOT)),
                                   "teacher": str(args.teacher), "overrides": args.overrides,
                                   "runs": rows, "summary": summary})
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
