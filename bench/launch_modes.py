"""The same real recipe under 1 process, DDP, FSDP2 and DeepSpeed ZeRO-2 (2 CPU processes).

Teacher all-MiniLM-L6-v2 (`builtin:minilm-l6`) on Rotten Tomatoes, a subset so that four runs
fit in minutes: finetune the teacher (2 epochs), then distill a 3-layer student (1 epoch) with
logit KD *and* hidden-state MSE (so the teacher runs inside the loop and FSDP shards it too),
then evaluate.
Every mode trains on the same global batches; the script reports per mode the wall time of
each training stage, the ratio to the DDP run, the test accuracy of teacher and student, and
the largest weight difference of the student against DDP.

    HF_HUB_OFFLINE=1 nice -n 19 python bench/launch_modes.py
    # -> bench/results/launch_modes.json (~12 min on 2 CPU cores)

On 2 CPU cores the 2-process runs share the cores one process would use alone, so the
times compare the launch modes' overhead (gathering and resharding weights, partitioned
optimizer steps), not the speed-up of adding hardware.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file

from provenance import RESULTS, ROOT, write_result

MODES = {"1 process": None, "DDP": ["--multi_gpu"],
         "FSDP2": ["--use_fsdp", "--fsdp_version", "2"],
         "DeepSpeed ZeRO-2": ["--use_deepspeed", "--zero_stage", "2"]}


def recipe(train: int, evaluate: int) -> dict:
    spec = yaml.safe_load((ROOT / "recipes/minilm-rotten-tomatoes.yaml").read_text())
    spec["data"] |= {"max_train_examples": train, "max_eval_examples": evaluate}
    finetune, distill, last = spec["stages"]
    finetune |= {"epochs": 2}
    distill |= {"epochs": 1}
    distill["loss"] |= {"hidden_mse": 1.0}
    last |= {"latency": False}
    spec["stages"] = [finetune, distill, last]
    return spec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(path: Path, out: Path, mode: list[str] | None) -> None:
    env = os.environ | {"ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1",
                        "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "distill", "run", str(path), "--output", str(out)]
    if mode is not None:
        env["OMP_NUM_THREADS"] = "1"  # one core per process
        command[1:3] = ["-m", "accelerate.commands.launch", *mode, "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no",
                        "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                        "-m", "distill"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def summary(out: Path) -> dict:
    report = json.loads((out / "report.json").read_text())
    stages = {s["kind"]: s for s in report["stages"]}
    return {"finetune_seconds": stages["finetune"]["seconds"],
            "distill_seconds": stages["distill"]["seconds"],
            "teacher_accuracy": report["teacher"]["metric"]["value"],
            "student_accuracy": stages["distill"]["model"]["metric"]["value"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=2048)
    parser.add_argument("--eval", type=int, default=512)
    parser.add_argument("--json", type=Path, default=RESULTS / "launch_modes.json")
    args = parser.parse_args()
    console = Console(width=130)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe(args.train, args.eval)))
        students = {}
        for name, mode in MODES.items():
            console.print(f"running {name} ...")
            out = Path(tmp) / name.replace(" ", "_")
            run(path, out, mode)
            results[name] = summary(out)
            students[name] = load_file(str(out / "stages/01-distill/model/model.safetensors"))
        base = students["DDP"]
        for name, weights in students.items():
            results[name]["student_max_abs_diff_vs_ddp"] = max(
                float((weights[k].float() - base[k].float()).abs().max()) for k in base)
    for r in results.values():
        for key in ("finetune", "distill"):
            r[f"{key}_time_vs_ddp"] = round(r[f"{key}_seconds"]
                                             / results["DDP"][f"{key}_seconds"], 2)
    table = Table(title=f"Launch modes: MiniLM-L6 on Rotten Tomatoes ({args.train} train, "
                        f"{args.eval} test examples; 2 CPU cores)")
    for col in ("mode", "finetune s", "× DDP", "distill s (KD+hidden)", "× DDP",
                "teacher acc", "student acc", "student max |Δw| vs DDP"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for name, r in results.items():
        table.add_row(name, f"{r['finetune_seconds']:.1f}", f"{r['finetune_time_vs_ddp']:.2f}",
                      f"{r['distill_seconds']:.1f}", f"{r['distill_time_vs_ddp']:.2f}",
                      f"{r['teacher_accuracy']:.4f}", f"{r['student_accuracy']:.4f}",
                      f"{r['student_max_abs_diff_vs_ddp']:.1e}")
    console.print(table)
    out = write_result(args.json, {"train_examples": args.train, "eval_examples": args.eval,
                                   "results": results})
    console.print(f"-> {out}")


if __name__ == "__main__":
    main()
