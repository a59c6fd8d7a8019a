"""Does `torch.compile` pay on this CPU? A training step, eager against compiled, one run.

Two students as the shipped recipes train them:
- the default recipe's: MiniLM-L6's layers 0, 2, 4 with a 2-way head, every weight trained,
  on real Rotten Tomatoes batches from the toolkit's own length-grouped loader (batch 32,
  <= 64 tokens: widths vary from batch to batch; a second width compiles the graph once more,
  for any width);
- the SmolLM2 recipe's heal: SmolLM2-135M cut to 20 evenly spaced layers, LoRA r 16 on every
  linear layer, batches of 4 blocks of 128 tokens (one fixed shape), next-token loss.

A step is forward (under bf16 autocast or in fp32) + the model's loss + backward + gradient
clipping + fused AdamW. Two copies of the same weights: one eager, one whose `forward` is
`torch.compile`d as a stage's `compile: true` does it (`distill.train.compiling`, PyTorch's
default dynamic-shape handling). Each (model, precision) runs in a fresh process with an
empty inductor cache: the compile time is a first run's on this machine. The first `--warmup`
steps of each copy run alone (the compiled copy compiles there: `warmup_seconds`), then
rounds alternate eager / compiled on the same batches, so drift hits both.

`step_ratio` = compiled seconds per step / eager; `break_even_steps` = the extra warm-up
seconds / the seconds a compiled step saves: a stage shorter than that loses time by
compiling.

    HF_HUB_OFFLINE=1 python bench/compile_step.py     # -> bench/results/compile_step.json
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import peft_methods
from distill.compress.depth import evenly_spaced, keep_layers
from distill.data.batching import make_loader
from distill.models.loading import resolve_model_path
from distill.train.compiling import CompiledForward
from minilm_stages import BATCH, LAYERS, train_split
from provenance import RESULTS, write_result


def minilm() -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    """The default recipe's student and the first training batches, as its stage sees them."""
    _, checked, train = train_split()
    loader = make_loader(train, checked.task.collate(checked.tokenizer), BATCH, shuffle=True,
                         seed=0)
    batches = [{k: b[k] for k in ("input_ids", "attention_mask", "labels")}
               for b in itertools.islice(loader, 60)]
    teacher = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path("builtin:minilm-l6"), num_labels=2)
    return keep_layers(teacher, LAYERS), batches


def smollm2() -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    """The SmolLM2 recipe's heal: a 20-layer student with LoRA, batches of 4 x 128 tokens."""
    teacher = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:smollm2-135m"),
                                                   dtype=torch.float32)
    student = keep_layers(teacher, evenly_spaced(20, teacher.config.num_hidden_layers))
    adapted = peft_methods.apply(student, "lora", r=16, lora_alpha=32,
                                 target_modules="all-linear")
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(20):
        ids = torch.randint(100, student.config.vocab_size - 100, (4, 128), generator=generator)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                        "labels": ids})
    return adapted, batches


MODELS: dict[str, Callable] = {"minilm-l6-student": minilm, "smollm2-20l-lora": smollm2}


def stepper(model: torch.nn.Module, bf16: bool):
    """One training step on a batch: forward, loss, backward, clipping, fused AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    model.train()

    def step(batch: dict[str, torch.Tensor]) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(step, batches: list[dict[str, torch.Tensor]]) -> float:
    start = time.perf_counter()
    for batch in batches:
        step(batch)
    return time.perf_counter() - start


def bench(name: str, bf16: bool, warmup: int, rounds: int) -> dict:
    """One (model, precision) in this process (see the module docstring)."""
    torch.manual_seed(0)
    model, batches = MODELS[name]()
    twin = copy.deepcopy(model)
    steps = {"eager": stepper(model, bf16), "compiled": stepper(twin, bf16)}
    head, rest = batches[:warmup], batches[warmup:]
    warm = {"eager": round(timed(steps["eager"], head), 2)}
    with CompiledForward(twin, enabled=True).active():
        warm["compiled"] = round(timed(steps["compiled"], head), 2)
        per_round = len(rest) // rounds
        seconds: dict[str, list[float]] = {"eager": [], "compiled": []}
        for r in range(rounds):
            chunk = rest[r * per_round:(r + 1) * per_round]
            for who, fn in steps.items():
                seconds[who].append(round(timed(fn, chunk), 3))
    n = rounds * per_round
    eager, compiled = sum(seconds["eager"]) / n, sum(seconds["compiled"]) / n
    saved = eager - compiled
    return {"model": name, "precision": "bf16" if bf16 else "fp32",
            "warmup_steps": warmup, "warmup_seconds": warm, "steps_per_round": per_round,
            "rounds": rounds, "seconds": seconds,
            "step_seconds": {"eager": round(eager, 4), "compiled": round(compiled, 4)},
            "step_ratio": round(compiled / eager, 3),
            "break_even_steps": (round((warm["compiled"] - warm["eager"]) / saved)
                                 if saved > 0 else None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path, default=RESULTS / "compile_step.json")
    ap.add_argument("--run", nargs=2, help=argparse.SUPPRESS)  # a child's (model, precision)
    args = ap.parse_args()
    if args.run:
        name, precision = args.run
        print(json.dumps(bench(name, precision == "bf16", args.warmup, args.rounds)))
        return
    console = Console()
    runs = []
    for name in args.models:
        for precision in ("fp32", "bf16"):
            with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
                out = subprocess.run(
                    [sys.executable, __file__, "--run", name, precision, "--warmup",
                     str(args.warmup), "--rounds", str(args.rounds)],
                    env=os.environ | {"TORCHINDUCTOR_CACHE_DIR": cache}, check=True,
                    capture_output=True, text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
            r = runs[-1]
            console.print(f"{name} {precision}: warm-up {r['warmup_seconds']}, step eager "
                          f"{r['step_seconds']['eager'] * 1e3:.1f} ms, compiled "
                          f"{r['step_seconds']['compiled'] * 1e3:.1f} ms, ratio "
                          f"{r['step_ratio']:.3f}, break-even {r['break_even_steps']} steps")
    out = {"torch": torch.__version__, "runs": runs,
           "best_step_ratio": min(r["step_ratio"] for r in runs)}
    console.print(f"wrote {write_result(args.json, out)}")


if __name__ == "__main__":
    main()
