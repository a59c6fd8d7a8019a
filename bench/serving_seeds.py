"""The served student's test accuracy over student seeds: is `served_acc_delta` one lucky run?

bench/serving.py measures one seed, the recipe's. This runs the serving recipe's student
stages (recipes/minilm-serving.yaml after its teacher tuning: the 3-layer distill stage, the
MLP narrowing with its KD heal, the export to ONNX int8 with a trimmed vocabulary) once per
seed in `--seeds`, each from the same cached teacher (`minilm_stages.tuned_teacher`), and
scores the teacher, each float32 student and each served artifact as serving.py does: the
whole test split in batches of 32, each model loaded the way a server loads it, one pass each.
Nothing is timed. Not part of `make bench` (about 6 minutes a seed).

    HF_HUB_OFFLINE=1 python bench/serving_seeds.py
    # -> bench/results/serving_seeds.json (~20 min)
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from rich.console import Console

from minilm_stages import tuned_teacher
from provenance import RESULTS, ROOT, write_result
from serving import (BATCH, SERVED, SERVING, STUDENT, TEACHER, make_student, serve_pass,
                     served_stages)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=ROOT / "runs/bench-serving-seeds")
    ap.add_argument("--json", type=Path, default=RESULTS / "serving_seeds.json")
    args = ap.parse_args()
    console = Console()
    teacher_dir = tuned_teacher(console)
    teacher = serve_pass(TEACHER, teacher_dir, warm_up=False)["accuracy"]
    rows = []
    for seed in args.seeds:
        run = make_student(teacher_dir, args.out / f"seed{seed}", console, seed=seed)
        student = serve_pass(STUDENT, run.student, warm_up=False)["accuracy"]
        served = serve_pass(SERVED, run.served, warm_up=False)["accuracy"]
        rows.append({"seed": seed, "student_accuracy": round(student, 4),
                     "served_accuracy": round(served, 4),
                     "served_acc_delta": round(served - teacher, 4)})
        console.print(f"seed {seed}: student {student:.4f}, served {served:.4f}, "
                      f"served - teacher {served - teacher:+.4f}")
    deltas = [r["served_acc_delta"] for r in rows]
    served = [r["served_accuracy"] for r in rows]
    result = {
        "teacher": "MiniLM-L6 tuned on Rotten Tomatoes (recipes/minilm-rotten-tomatoes.yaml "
                   "stage 0, seed 0)",
        "teacher_accuracy": round(teacher, 4),
        "student": {"recipe": str(SERVING.relative_to(ROOT)), "stages": served_stages()[:-1]},
        "split": "test", "batch": BATCH, "seeds": rows,
        "served_accuracy_mean": round(statistics.mean(served), 4),
        "served_accuracy_sd": round(statistics.stdev(served), 4) if len(rows) > 1 else None,
        "served_acc_delta_mean": round(statistics.mean(deltas), 4),
        "served_acc_delta_min": min(deltas),
    }
    path = write_result(args.json, result)
    console.print(f"served_acc_delta mean {result['served_acc_delta_mean']:+.4f}, "
                  f"min {result['served_acc_delta_min']:+.4f} -> {path}")


if __name__ == "__main__":
    main()
