"""CPU time of a language model's KD loss per training step: the forward KL's gradient in closed
form vs the same loss through autograd.

A heal step of the SmolLM2 recipe computes `0.5 · CE + 0.5 · KL(p_T ‖ p_S)` against the
teacher's cached top-64 on [4, 128, 49152] student logits (`token_distill_loss`).
`distill.kd.token_losses` takes the forward KL's gradient in closed form (`_forward_kl_sum`);
the autograd route is the one every other divergence takes (`_chunk_sum`: log-softmax, the
tail bucket's scatter and logsumexp, and their backward passes), run here on the same logits
for the same loss, plus the same CE. Each figure is the median of `--repeats` forward+backward
passes after one warm-up; CE alone is the floor. Then the same three losses in a whole LoRA
heal step of SmolLM2-135M cut to its first 20 layers (r = 16 on every linear layer, bf16
autocast, AdamW; random ids and a random top-64 target: the cost does not depend on them),
interleaved in two rounds so that drift hits every route alike.

    python bench/token_loss_speed.py            # -> bench/results/token_loss_speed.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from distill.kd.token_losses import (_chunk_sum, _ChunkedSum, next_token_mask,  # noqa: E402
                                     token_ce_loss, token_distill_loss, top_k)
from distill.compress.depth import keep_layers  # noqa: E402
from distill.models.loading import resolve_model_path  # noqa: E402
from provenance import RESULTS, write_result  # noqa: E402


def autograd_kd(student: torch.Tensor, teacher, mask: torch.Tensor, chunk: int) -> torch.Tensor:
    """The forward KL (T = 1) through autograd: what `token_kd_loss` computed before the
    closed form, and still computes for every other divergence."""
    rows = mask.numel()
    flat = student.reshape(rows, -1)
    teach = teacher.flat() if hasattr(teacher, "flat") else teacher.reshape(rows, -1)
    keep = mask.reshape(rows)
    chunks = [(s, min(s + chunk, rows),
               (teach.rows(s, min(s + chunk, rows)) if hasattr(teach, "rows")
                else teach[s:s + chunk], keep[s:s + chunk], 1.0, "forward_kl", 0.5, 0.1))
              for s in range(0, rows, chunk)]
    return _ChunkedSum.apply(flat, _chunk_sum, chunks, False) / int(keep.sum())


def median_ms(fn: Callable[[], torch.Tensor], student: torch.Tensor, repeats: int
              ) -> tuple[float, torch.Tensor, float]:
    """(median ms per forward+backward, the gradient, the loss)."""
    times = []
    for i in range(repeats + 1):
        student.grad = None
        start = time.perf_counter()
        loss = fn()
        loss.backward()
        if i:  # the first pass warms up
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), student.grad.clone(), float(loss.detach())


def heal_step_seconds(repeats: int) -> dict[str, float]:
    """Median seconds per LoRA heal step of the 20-layer SmolLM2 with each loss route."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:smollm2-135m"))
    model = get_peft_model(keep_layers(model, list(range(20))),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(100, 40000, (4, 128))
    target = top_k(torch.randn(4, 128, model.config.vocab_size) * 3, 64)
    mask = next_token_mask(ids)
    losses = {
        "closed_form": lambda z: token_distill_loss(z, target, ids, alpha=0.5)[0],
        "autograd": lambda z: (0.5 * token_ce_loss(z, ids)
                               + 0.5 * autograd_kd(z, target, mask, 1024)),
        "ce_only": lambda z: token_ce_loss(z, ids)}
    times: dict[str, list[float]] = {name: [] for name in losses}
    for _ in range(2):
        for name, loss_fn in losses.items():
            for i in range(repeats + 1):
                start = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    logits = model(input_ids=ids).logits
                loss_fn(logits).backward()
                optimizer.step()
                optimizer.zero_grad()
                if i:
                    times[name].append(time.perf_counter() - start)
    return {name: round(statistics.median(t), 3) for name, t in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", type=Path, default=RESULTS / "token_loss_speed.json")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.length, args.vocab)
    teacher = torch.randn(shape, generator=g) * 3
    cache = top_k(teacher, args.k)
    labels = torch.randint(0, args.vocab, shape[:2], generator=g)
    mask = next_token_mask(labels)
    result: dict = {"shape": list(shape), "k": args.k, "chunk": args.chunk,
                    "threads": torch.get_num_threads(), "repeats": args.repeats, "dtypes": {}}
    for dtype in (torch.bfloat16, torch.float32):
        student = (torch.randn(shape, generator=g) * 3).to(dtype).requires_grad_(True)
        row: dict = {}
        for name, target in (("top_k", cache), ("full", teacher)):
            closed = median_ms(lambda: token_distill_loss(student, target, labels, alpha=0.5,
                                                          chunk_size=args.chunk)[0],
                               student, args.repeats)
            auto = median_ms(lambda: 0.5 * token_ce_loss(student, labels, args.chunk)
                             + 0.5 * autograd_kd(student, target, mask, args.chunk),
                             student, args.repeats)
            row[f"kd_{name}_plus_ce"] = {
                "closed_form_ms": round(closed[0], 1), "autograd_ms": round(auto[0], 1),
                "speedup": round(auto[0] / closed[0], 2),
                "loss_abs_diff": abs(closed[2] - auto[2]),
                "grad_max_abs_diff": float((closed[1].float() - auto[1].float()).abs().max())}
        ce = median_ms(lambda: token_ce_loss(student, labels, args.chunk), student, args.repeats)
        row["ce_ms"] = round(ce[0], 1)
        result["dtypes"][str(dtype).removeprefix("torch.")] = row
    step = heal_step_seconds(3)
    result["heal_step_seconds"] = step | {
        "speedup": round(step["autograd"] / step["closed_form"], 2)}
    write_result(args.json, result)
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
