"""`make bench`: the benchmark suite, each script in its own process, then one summary.

Every script compares side by side in one run and writes its JSON under bench/results/; this
one runs them in order (a fresh process each, nothing else on the cores meanwhile) and
gathers the figures the project holds itself to into bench/results/summary.json, with each
figure's target and whether it is met, and the same as a markdown table (summary.md; the
README's performance table is rendered from summary.json by bench/readme_tables.py with the
same renderer). A figure whose script is not written yet is listed as not measured, never
guessed.

    HF_HUB_OFFLINE=1 python bench/suite.py [--only floor peft_step] [--summary-only]
"""

from __future__ import annotations

import argparse
import json
import operator
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from provenance import RESULTS, ROOT, write_result
from tables.machine import bench_summary

BENCH = ROOT / "bench"


@dataclass(frozen=True)
class Figure:
    """One number of the summary: where it comes from and what it must be."""

    name: str
    script: str  # bench/<script>.py writes bench/results/<script>.json
    read: Callable[[dict], float]  # the figure from that JSON
    op: str | None  # "<=" or ">="; None: context, no target
    target: float | None
    meaning: str


FIGURES = [
    Figure("floor_ratio", "floor", lambda d: d["floor_ratio"], "<=", 1.05,
           "our distill step / a bare PyTorch loop doing the same work (fp32, teacher every "
           "step)"),
    Figure("mfu_fp32", "floor", lambda d: d["mfu"]["ours_fp32"], None, None,
           "model-FLOPs utilisation of our fp32 distill step against this machine's fp32 "
           "matmul peak, measured in the same run"),
    Figure("peft_step_ratio", "peft_step", lambda d: d["peft_step_ratio"], "<=", 1.0,
           "our LoRA step / PEFT's, same model and batch (the worse of MiniLM-L6 and "
           "SmolLM2-135M)"),
    Figure("cache_overhead", "cache_overhead", lambda d: d["cache_overhead"], "<=", 1.10,
           "cached KD epoch / plain fine-tune epoch of the student (loops, fp32)"),
    Figure("textbrewer_speedup", "textbrewer_job", lambda d: d["speedup"], ">=", 2.0,
           "TextBrewer's distill job / ours (3 epochs, our defaults)"),
    Figure("textbrewer_acc_delta", "textbrewer_job", lambda d: d["acc_delta"], ">=", -0.005,
           "our test accuracy - TextBrewer's (3-seed means)"),
    Figure("bf16_floor_speedup", "textbrewer_job", lambda d: d["bf16_floor_speedup"], ">=", 1.25,
           "a bare bf16-autocast loop's epoch / our default job's"),
    Figure("lm_cache_speedup", "lm_teacher_cache", lambda d: d["speedup_train_loop"], ">=", 2.0,
           "the SmolLM2 recipe's heal loop without / with the top-k cache (20-layer student, "
           "LoRA, bf16 auto); bounded by FLOPs (flop_bound in its JSON)"),
    Figure("trl_step_ratio", "trl_step", lambda d: d["step_ratio"], "<=", 1.0,
           "our LM distillation step / TRL's, same teacher, student, batch and loss (median "
           "of the rounds' ratios)"),
    Figure("served_speedup", "serving", lambda d: d["served_speedup"], ">=", 4.0,
           "fp32 PyTorch teacher latency / the best exported student's, batch 32"),
    Figure("served_acc_delta", "serving", lambda d: d["served_acc_delta"], ">=", -0.01,
           "the served student's test accuracy - the teacher's"),
]
OPS = {"<=": operator.le, ">=": operator.ge}


def scripts() -> list[str]:
    """The suite's scripts, in order, that exist (one per JSON the figures read)."""
    return [s for s in dict.fromkeys(f.script for f in FIGURES) if (BENCH / f"{s}.py").is_file()]


def summarize() -> dict:
    """summary.json's content from the JSON files under bench/results/."""
    figures = {}
    for f in FIGURES:
        path = RESULTS / f"{f.script}.json"
        entry: dict = {"target": None if f.op is None else f"{f.op} {f.target:g}",
                       "meaning": f.meaning,
                       "source": f"bench/results/{path.name}"}
        if not path.is_file():
            figures[f.name] = entry | {"value": None, "met": None, "note": "not measured yet"}
            continue
        data = json.loads(path.read_text())
        value = f.read(data)
        met = None if f.op is None else bool(OPS[f.op](value, f.target))
        figures[f.name] = entry | {"value": value, "met": met,
                                   "commit": data["provenance"]["commit"],
                                   "machine": machine(data["provenance"])}
    return {"figures": figures}


def machine(prov: dict) -> str:
    """The machine a JSON's numbers come from, in words."""
    units = ", ".join(prov.get("cpu_bf16") or []) or "no bf16 units"
    return f"{prov['cpu']} ({prov['cpu_capability']}, {units}), {prov['cpus']} cores"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", help="run these scripts only (default: all)")
    ap.add_argument("--summary-only", action="store_true",
                    help="run nothing; rebuild the summary from the JSON files")
    args = ap.parse_args()
    seconds = {}
    if not args.summary_only:
        for script in args.only or scripts():
            start = time.perf_counter()
            print(f"== bench/{script}.py", flush=True)
            subprocess.run([sys.executable, str(BENCH / f"{script}.py")], cwd=BENCH, check=True)
            seconds[script] = round(time.perf_counter() - start, 1)
    if (args.summary_only or args.only) and (RESULTS / "summary.json").is_file():
        # The scripts that did not run keep the times of the run that last measured them.
        last = json.loads((RESULTS / "summary.json").read_text()).get("seconds", {})
        seconds = {s: seconds.get(s, last.get(s)) for s in scripts()
                   if s in seconds or s in last}
    summary = summarize() | {"seconds": seconds}
    write_result(RESULTS / "summary.json", summary)
    text = "\n".join(bench_summary(summary)) + "\n"
    (RESULTS / "summary.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
