"""A shipped language-model recipe as a new user runs it: a fresh clone, `make setup`, `distill run`.

Clones the committed HEAD into a temporary folder, sets it up with a fresh venv and an empty
toolkit cache (so the GGUF conversion and the tokenization are part of the run, as on a new
machine), runs `distill run recipes/smollm2-shakespeare.yaml`, and records the wall time of the
run, each stage's seconds, every model's perplexity on held-out mixture text and on BBC News
(never seen by any stage) with its ratio to the teacher's, and the table the command printed,
in bench/results/smollm2_recipe.json (or --out).

    python bench/smollm2_recipe.py [--recipe recipes/smollm2-shakespeare.yaml]
    python bench/smollm2_recipe.py --recipe recipes/gemma3-shakespeare.yaml \
        --out gemma3_recipe.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from provenance import RESULTS, ROOT, provenance


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/smollm2-shakespeare.yaml")
    ap.add_argument("--keep", type=Path, help="copy the run directory here")
    ap.add_argument("--out", default="smollm2_recipe.json", help="file under bench/results")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="distill-recipe-") as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, check=True,
                                capture_output=True, text=True).stdout.strip()
        env = {k: v for k, v in os.environ.items() if k not in ("CI", "VIRTUAL_ENV")}
        env |= {"DISTILL_CACHE": str(Path(tmp) / "cache"), "COLUMNS": "120"}
        start = time.perf_counter()
        subprocess.run(["make", "setup"], cwd=clone, env=env, check=True,
                       stdout=subprocess.DEVNULL)
        setup_seconds = time.perf_counter() - start
        run_dir = Path(tmp) / "run"
        start = time.perf_counter()
        done = subprocess.run([str(clone / ".venv" / "bin" / "distill"), "run", args.recipe,
                               "--output", str(run_dir)], cwd=clone, env=env,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            print(done.stdout[-4000:], done.stderr[-4000:], file=sys.stderr)
            return done.returncode
        report = json.loads((run_dir / "report.json").read_text())
        recipe = yaml.safe_load((clone / args.recipe).read_text())
        if args.keep:
            subprocess.run(["cp", "-r", str(run_dir), str(args.keep)], check=True)
    teacher = report["teacher"]
    models = [{"name": "teacher", **_scores(teacher, teacher)}]
    for stage in report["stages"]:
        for step in stage.get("steps") or []:
            if step.get("model"):
                models.append({"name": f"{stage['index']:02d}-{stage['kind']} {step['name']}",
                               **_scores(step["model"], teacher)})
        if stage.get("model") and stage.get("kind") == "adapt":  # scored on its own data
            m = stage["model"]
            models.append({"name": f"{stage['index']:02d}-adapt", "adapter": {
                "method": m.get("method"), "trainable_params": m.get("trainable_params"),
                "perplexity": m["metric"]["value"], "data": _adapt_data(recipe, stage)}})
        elif stage.get("model") and not stage.get("steps"):
            models.append({"name": f"{stage['index']:02d}-{stage['kind']}",
                           **_scores(stage["model"], teacher)})
    printed = done.stdout[done.stdout.rfind("stage "):] if "stage " in done.stdout else ""
    machine = provenance() | {"commit": commit, "dirty": False}
    result = {"recipe": args.recipe, "exit_code": done.returncode,
              "setup_seconds": round(setup_seconds, 1), "run_seconds": round(seconds, 1),
              "stages": [{"index": s["index"], "kind": s.get("kind"), "seconds": s.get("seconds")}
                         for s in report["stages"]],
              "data": report["data"], "models": models, "printed_tail": printed[-3000:], "provenance": machine}
    path = RESULTS / args.out
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k != "printed_tail"}, indent=1))
    return 0


def _adapt_data(recipe: dict, stage: dict) -> str:
    """The dataset an adapt stage trained and was scored on (its own `data`, else the run's)."""
    own = recipe["stages"][stage["index"]].get("data") or {}
    return str(own.get("dataset") or recipe["data"]["dataset"])


def _scores(model: dict, teacher: dict) -> dict:
    """Perplexity on the recipe's held-out text and on each eval_data corpus, with ratios."""
    out = {"perplexity": model["metric"]["value"],
           "vs_teacher": model["metric"]["value"] / teacher["metric"]["value"]}
    for mine, theirs in zip(model.get("eval_data") or [], teacher.get("eval_data") or []):
        out[mine["dataset"]] = {"perplexity": mine["perplexity"],
                                "vs_teacher": mine["perplexity"] / theirs["perplexity"]}
    return out


if __name__ == "__main__":
    sys.exit(main())
