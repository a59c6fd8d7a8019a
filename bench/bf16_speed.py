"""Is bf16 autocast faster than fp32 on this CPU? The evidence behind `bf16: auto`.

Times, side by side in one process: one [128×512]·[512×512] matmul of fp32 and of bf16 tensors
(`distill.train.precision.matmul_seconds`, what `bf16_is_faster` compares) and one training step of
the real MiniLM-L6 classifier (batch 32 × 64 tokens, forward + backward + AdamW), each in fp32
and under bf16 autocast, best of a few repeats; and records what `bf16: auto` decides here.
CPUs differ by two orders of magnitude (AMX, AVX-512 BF16, or neither), so only the ratio
means anything. The JSON keeps one entry per kind of CPU it has run on (a rerun on the same
kind replaces that kind's entry), so the README shows the machines side by side.

    HF_HUB_OFFLINE=1 python bench/bf16_speed.py    # -> bench/results/bf16_speed.json (~2 min)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from distill.models.loading import resolve_model_path
from distill.train.precision import bf16_is_faster, matmul_seconds
from provenance import RESULTS, provenance, write_result


def best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=RESULTS / "bf16_speed.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path("builtin:minilm-l6"), num_labels=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(1000, 20000, (32, 64))
    labels = torch.randint(0, 2, (32,))
    results = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        def autocast():
            return (torch.autocast("cpu", dtype=torch.bfloat16) if bf16
                    else contextlib.nullcontext())

        def step():
            with autocast():
                loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        results[name] = {"matmul_ms": 1e3 * matmul_seconds(bf16, repeats=5),
                         "train_step_s": best_seconds(step, args.repeats)}
        print(name, results[name])
    entry = {
        "model": "builtin:minilm-l6", "batch": [32, 64], "threads": args.threads,
        "fp32": results["fp32"], "bf16": results["bf16"],
        "matmul_bf16_over_fp32": results["bf16"]["matmul_ms"] / results["fp32"]["matmul_ms"],
        "step_bf16_over_fp32": results["bf16"]["train_step_s"]
        / results["fp32"]["train_step_s"],
        "auto_chooses_bf16": bf16_is_faster("cpu"), "provenance": provenance()}
    kind = (entry["provenance"]["cpu"], entry["provenance"]["cpu_capability"])
    machines = json.loads(args.json.read_text())["machines"] if args.json.is_file() else []
    machines = [m for m in machines
                if (m["provenance"]["cpu"], m["provenance"]["cpu_capability"]) != kind]
    print(f"wrote {write_result(args.json, {'machines': [*machines, entry]})}")


if __name__ == "__main__":
    main()
