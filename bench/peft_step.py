"""Our LoRA training step against Hugging Face PEFT's, same model, same batch, one process.

Two real models: the MiniLM-L6 classifier (LoRA r 8 on query and value, batch 32 × 64 tokens)
and SmolLM2-135M (LoRA r 16 on every linear layer, batch 8 × 128 tokens, next-token loss).
For each, two copies of the same weights are wrapped, one by `peft_methods.apply`, one by
`peft.get_peft_model`, with the same settings; a step is forward + loss + backward + AdamW on
the adapter's weights. Rounds alternate ours / PEFT (drift hits both); the ratio is the sum
of our times over the sum of PEFT's. Also timed, in eval mode at the training batch: a forward
of the unmerged adapted model (ours, PEFT's) and of ours merged into the weights
(`merge_and_unload`: what a distill stage hands on), to show what merging buys at serving:
the three alternate too, fastest round each.

    HF_HUB_OFFLINE=1 python bench/peft_step.py      # -> bench/results/peft_step.json (~4 min)
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import peft_methods
from distill.models.loading import resolve_model_path
from provenance import RESULTS, write_result

MODELS = {
    # steps: per round and implementation (a SmolLM2 step takes ~5 s here, a MiniLM one
    # ~0.75 s; SmolLM2's 4 steps a round, 5 until 69d3900, keep make bench near 30 minutes)
    "minilm-l6": {"source": "builtin:minilm-l6", "batch": (32, 64), "r": 8, "steps": 10,
                  "targets": ["query", "value"]},
    "smollm2-135m": {"source": "builtin:smollm2-135m", "batch": (8, 128), "r": 16, "steps": 4,
                     "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                 "up_proj", "down_proj"]},
}


def load(name: str) -> torch.nn.Module:
    spec = MODELS[name]
    path = resolve_model_path(spec["source"])
    if name == "smollm2-135m":
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


def batch_for(name: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    b, n = MODELS[name]["batch"]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size - 100, (b, n), generator=generator)
    labels = ids if name == "smollm2-135m" else torch.randint(0, 2, (b,), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def stepper(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """One training step (forward, loss, backward, AdamW on the trainable weights)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step() -> None:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - start


def forward_seconds(models: dict[str, torch.nn.Module], batch: dict[str, torch.Tensor], n: int,
                    rounds: int) -> dict[str, float]:
    """Seconds of one eval forward of each model at the batch: the fastest of `rounds`
    alternating rounds of `n` forwards (drift of the machine's speed hits every model)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    best = dict.fromkeys(models, float("inf"))
    with torch.inference_mode():
        for model in models.values():
            model.eval()(**inputs)  # warm-up
        for _ in range(rounds):
            for name, model in models.items():
                best[name] = min(best[name], timed(lambda: model(**inputs), n) / n)
    return best


def bench(name: str, steps: int | None, rounds: int, console: Console) -> dict:
    spec = MODELS[name]
    steps = steps or spec["steps"]
    torch.manual_seed(0)
    base = load(name)
    batch = batch_for(name, base)
    ours = peft_methods.apply(copy.deepcopy(base), "lora", r=spec["r"], lora_alpha=2 * spec["r"],
                              target_modules=spec["targets"])
    task = "CAUSAL_LM" if name == "smollm2-135m" else "SEQ_CLS"
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=spec["r"], lora_alpha=2 * spec["r"], target_modules=spec["targets"],
        lora_dropout=0.0, task_type=task))
    if task == "SEQ_CLS":  # PEFT trains the new head too (modules_to_save): so do ours
        for param, p in ours.named_parameters():
            p.requires_grad_("lora_" in param or ".classifier." in f".{param}")
    trainable = {"ours": sum(p.numel() for p in ours.parameters() if p.requires_grad),
                 "peft": sum(p.numel() for p in theirs.parameters() if p.requires_grad)}
    assert trainable["ours"] == trainable["peft"], trainable  # the same work
    steps_of = {"ours": stepper(ours, batch), "peft": stepper(theirs, batch)}
    for fn in steps_of.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {"ours": [], "peft": []}
    for r in range(rounds):
        for who, fn in steps_of.items():
            times[who].append(timed(fn, steps))
        console.print(f"{name} round {r}: " + ", ".join(
            f"{k} {v[-1] / steps:.3f} s/step" for k, v in times.items()))
    merged = peft_methods.merge_and_unload(copy.deepcopy(ours))
    forwards = max(1, steps // 2)
    latency = forward_seconds({"ours_unmerged": ours, "peft_unmerged": theirs,
                               "ours_merged": merged}, batch, forwards, rounds)
    return {"source": spec["source"], "batch": list(spec["batch"]), "r": spec["r"],
            "target_modules": spec["targets"], "trainable_params": trainable,
            "steps_per_round": steps, "rounds": rounds, "seconds": times,
            "step_ratio": sum(times["ours"]) / sum(times["peft"]),
            "forward_seconds": latency, "forwards_per_round": forwards,
            "merged_over_unmerged": latency["ours_merged"] / latency["ours_unmerged"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int,
                    help="steps per round and implementation (default: the model's, MODELS)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--json", type=Path, default=RESULTS / "peft_step.json")
    args = ap.parse_args()
    console = Console()
    results = {name: bench(name, args.steps, args.rounds, console) for name in args.models}
    # The suite's figure: the worse of the two models' ratios.
    out = {"models": results, "peft_step_ratio": max(r["step_ratio"] for r in results.values())}
    for name, r in results.items():
        console.print(f"{name}: step ours/peft {r['step_ratio']:.3f}, merged/unmerged forward "
                      f"{r['merged_over_unmerged']:.3f}")
    console.print(f"wrote {write_result(args.json, out)}")


if __name__ == "__main__":
    main()
