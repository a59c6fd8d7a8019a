"""Our distill step against the floor: a bare PyTorch loop doing the same work, in one run.

The floor is what a user gets from ~60 lines of PyTorch: the teacher run under `no_grad` at
every step, the student's `α·CE + (1−α)·T²·KL`, AdamW with a linear warm-up, gradient
clipping. Both loops train the same 3-layer student (MiniLM-L6's layers 0, 2, 4) from the
same MiniLM-L6 teacher on the same Rotten Tomatoes batches (batch 32, ≤ 64 tokens, the
toolkit's tokenization and shuffle order), for the same number of steps. "Ours" is a real
`distill` stage run by `distill.run_recipe` (fp32, teacher every step: `cache_teacher: false`,
checkpoints at their default interval, no validation) and timed by its own `train_seconds`.

Rounds alternate ours / bare (ABAB…), so drift of the machine's speed hits both; the ratio is
the sum of our times over the sum of the floor's. Also measured here, in the same process:
- the bare loop under bf16 autocast (the floor for `bf16_floor_speedup`, bench/textbrewer_job.py);
- model-FLOPs utilisation: the matmul FLOPs each step does (teacher forward, student forward
  and backward, attention included, counted from the real padded batches) per second, over
  this machine's fp32 matmul peak measured here (a 2048² product on every thread);
- one AdamW step over the student's weights, PyTorch's default multi-tensor form against the
  fused kernel the toolkit uses where it can.

    HF_HUB_OFFLINE=1 python bench/floor.py          # -> bench/results/floor.json (~2.5 min)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from transformers import get_linear_schedule_with_warmup

from distill.compress.depth import keep_layers
from minilm_stages import ALPHA, BATCH, LAYERS, LR, TEMPERATURE, TEACHER, prepare, stage_seconds
from provenance import RESULTS, ROOT, write_result


def distill_stage(steps: int, epoch_steps: int, seed: int) -> str:
    """One fp32 distill stage of `steps` optimizer steps, teacher every step; a checkpoint
    every `steps / 2` steps (one per round: twice the default rate of one per 200 steps)."""
    return (f"{{kind: distill, epochs: {steps / epoch_steps!r}, batch_size: {BATCH}, "
            f"learning_rate: {LR}, bf16: false, cache_teacher: false, keep_best: false, "
            f"checkpoint_every: {max(1, steps // 2)}, seed: {seed}, "
            f"student: {{layers: {LAYERS}}}, "
            f"loss: {{alpha: {ALPHA}, temperature: {TEMPERATURE}}}}}")


def bare(teacher: torch.nn.Module, student: torch.nn.Module, loader, steps: int,
         bf16: bool) -> tuple[float, float]:
    """(seconds, matmul FLOPs) of `steps` steps of the bare loop (see the module docstring) on
    the first batches of a fresh `loader()`: the batches our stage trains on."""
    student = copy.deepcopy(student).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=0.01)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(0.1 * steps), steps)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if bf16
                else contextlib.nullcontext())
    flops, done = 0.0, 0
    layers_t, layers_s = teacher.config.num_hidden_layers, student.config.num_hidden_layers
    start = time.perf_counter()
    while done < steps:
        for batch in loader():
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            with autocast:
                with torch.no_grad():
                    t_logits = teacher(**inputs).logits
                s_logits = student(**inputs).logits
            s, t = s_logits.float(), t_logits.float()
            kl = F.kl_div(F.log_softmax(s / TEMPERATURE, -1), F.log_softmax(t / TEMPERATURE, -1),
                          log_target=True, reduction="batchmean")
            loss = ALPHA * F.cross_entropy(s, batch["labels"]) \
                + (1 - ALPHA) * TEMPERATURE**2 * kl
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            flops += step_flops(teacher.config, layers_t, layers_s, batch["input_ids"])
            done += 1
            if done == steps:
                break
    return time.perf_counter() - start, flops


def step_flops(config, layers_t: int, layers_s: int, batch: torch.Tensor) -> float:
    """Matmul FLOPs of one step on `batch` [B, n]: teacher forward + student forward and
    backward (backward = 2 × forward). Per layer and token: Q, K, V, O (4d²) and the MLP
    (2·d·d_ff) weights, 2 FLOPs per multiply-add; attention scores and mixing 2·2·n·d."""
    b, n = batch.shape
    d, ff = config.hidden_size, config.intermediate_size
    per_layer = 2 * b * n * (4 * d * d + 2 * d * ff) + 2 * 2 * b * n * n * d
    return per_layer * layers_t + 3 * per_layer * layers_s


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` [size²]·[size²] products on every thread."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def optimizer_seconds(student: torch.nn.Module, repeats: int = 20) -> dict[str, float]:
    """Seconds of one AdamW step over the student's weights (random gradients), in PyTorch's
    default multi-tensor form (the bare loop's) and fused (the toolkit's where it can)."""
    params = [p.detach().clone().requires_grad_(True) for p in student.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    out = {}
    for name, options in (("foreach", {"foreach": True}), ("fused", {"fused": True})):
        optimizer = torch.optim.AdamW(params, lr=LR, **options)
        optimizer.step()  # state allocated
        start = time.perf_counter()
        for _ in range(repeats):
            optimizer.step()
        out[name] = (time.perf_counter() - start) / repeats
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of (ours, bare)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "runs/bench-floor")
    ap.add_argument("--json", type=Path, default=RESULTS / "floor.json")
    args = ap.parse_args()
    console = Console()
    setup = prepare(args.out)
    teacher = setup.teacher
    student = keep_layers(teacher, LAYERS)
    epoch_steps = len(setup.loader(args.seed))

    def loader():
        return setup.loader(args.seed)

    times: dict[str, list[float]] = {"ours": [], "bare": [], "bare_bf16": []}
    flops = 0.0
    for r in range(args.rounds):
        metrics = stage_seconds(distill_stage(args.steps, epoch_steps, args.seed),
                                setup.teacher_dir, args.out / "run", console)
        assert metrics["steps"] == args.steps, (metrics["steps"], args.steps)
        times["ours"].append(metrics["train_seconds"])
        seconds, flops = bare(teacher, student, loader, args.steps, bf16=False)
        times["bare"].append(seconds)
        seconds, _ = bare(teacher, student, loader, args.steps, bf16=True)
        times["bare_bf16"].append(seconds)
        speeds = ", ".join(f"{k} {v[-1] / args.steps:.3f} s/step" for k, v in times.items())
        console.print(f"round {r}: {speeds}")
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    adamw = optimizer_seconds(student)
    per_step = {k: sum(v) / (args.rounds * args.steps) for k, v in times.items()}
    result = {
        "setup": {"teacher": TEACHER, "student_layers": LAYERS, "batch": BATCH,
                  "max_length": setup.max_length, "steps_per_round": args.steps,
                  "rounds": args.rounds, "epoch_steps": epoch_steps, "seed": args.seed},
        "seconds": times, "seconds_per_step": per_step,
        "floor_ratio": sum(times["ours"]) / sum(times["bare"]),
        "bare_bf16_over_fp32": sum(times["bare_bf16"]) / sum(times["bare"]),
        "matmul_peak_flops": peak,
        "adamw_step_seconds": adamw,
        "flops_per_round": flops,
        # FLOPs of one round over seconds per round
        "mfu": {"ours_fp32": flops / per_step["ours"] / args.steps / peak["fp32"],
                "bare_fp32": flops / per_step["bare"] / args.steps / peak["fp32"],
                "bare_bf16": flops / per_step["bare_bf16"] / args.steps / peak["bf16"]}}
    console.print_json(json.dumps({k: result[k] for k in
                                   ("seconds_per_step", "floor_ratio", "mfu")}))
    console.print(f"wrote {write_result(args.json, result)}")


if __name__ == "__main__":
    main()
