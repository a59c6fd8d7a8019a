"""Does `torch.compile` pay on this CPU? A training step, eager against compiled, one run.

Two students as the shipped recipes train them:
- the default recipe's: MiniLM-L6's layers 0, 2, 4 with a 2-way head, every weight trained,
  on real Rotten Tomatoes batches from the toolkit's own length-grouped loader (batch 32,
  <= 64 tokens: widths vary from batch to batch, so the compiled graph is dynamic);
- the SmolLM2 recipe's heal: SmolLM2-135M cut to 20 evenly spaced layers, LoRA r 16 on every
  linear layer, batches of 4 blocks of 128 tokens (one fixed shape), next-token loss.

A step is forward (under bf16 autocast or in fp32) + the model's loss + backward + gradient
clipping + fused AdamW. Two copies of the same weights: one eager, one `torch.compile`d
(`dynamic=True` for the varying widths, the default for the fixed blocks). The first
`--warmup` steps of each run alone (the compiled copy compiles there; their seconds are
reported as `warmup_seconds`), then rounds alternate eager / compiled on the same batches, so
drift hits both. `step_ratio` = compiled seconds per step / eager: below 1, compiling pays
after its warm-up.

    HF_HUB_OFFLINE=1 python bench/compile_step.py     # -> bench/results/compile_step.json
"""

from __future__ import annotations

import argparse
import copy
import itertools
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
from minilm_stages import BATCH, LAYERS, train_split
from provenance import RESULTS, write_result


def minilm() -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]], bool]:
    """The default recipe's student and the first training batches, as its stage sees them."""
    _, checked, train = train_split()
    loader = make_loader(train, checked.task.collate(checked.tokenizer), BATCH, shuffle=True,
                         seed=0)
    batches = [{k: b[k] for k in ("input_ids", "attention_mask", "labels")}
               for b in itertools.islice(loader, 60)]
    teacher = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path("builtin:minilm-l6"), num_labels=2)
    return keep_layers(teacher, LAYERS), batches, True


def smollm2() -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]], bool]:
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
    return adapted, batches, False


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


def bench(name: str, bf16: bool, warmup: int, rounds: int, console: Console) -> dict:
    torch.manual_seed(0)
    model, batches, dynamic = MODELS[name]()
    compiled = copy.deepcopy(model)
    compiled.forward = torch.compile(compiled.forward, dynamic=dynamic or None)
    steps = {"eager": stepper(model, bf16), "compiled": stepper(compiled, bf16)}
    head, rest = batches[:warmup], batches[warmup:]
    warm = {who: round(timed(fn, head), 2) for who, fn in steps.items()}
    per_round = len(rest) // rounds
    seconds: dict[str, list[float]] = {"eager": [], "compiled": []}
    for r in range(rounds):
        chunk = rest[r * per_round:(r + 1) * per_round]
        for who, fn in steps.items():
            seconds[who].append(round(timed(fn, chunk), 3))
    ratio = sum(seconds["compiled"]) / sum(seconds["eager"])
    console.print(f"{name} {'bf16' if bf16 else 'fp32'}: warm-up {warm}, eager "
                  f"{sum(seconds['eager']) / (rounds * per_round) * 1e3:.1f} ms/step, compiled "
                  f"{sum(seconds['compiled']) / (rounds * per_round) * 1e3:.1f} ms/step, "
                  f"ratio {ratio:.3f}")
    return {"model": name, "precision": "bf16" if bf16 else "fp32", "dynamic": dynamic,
            "warmup_steps": warmup, "warmup_seconds": warm, "steps_per_round": per_round,
            "rounds": rounds, "seconds": seconds, "step_ratio": round(ratio, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path, default=RESULTS / "compile_step.json")
    args = ap.parse_args()
    console = Console()
    runs = [bench(name, bf16, args.warmup, args.rounds, console)
            for name in args.models for bf16 in (False, True)]
    out = {"torch": torch.__version__, "runs": runs,
           "best_step_ratio": min(r["step_ratio"] for r in runs)}
    console.print(f"wrote {write_result(args.json, out)}")


if __name__ == "__main__":
    main()
