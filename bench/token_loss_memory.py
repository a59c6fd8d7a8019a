"""Memory and time of the token-level KD loss on a GPU: chunked (distill) vs the plain loss.

The plain loss is what a 10-line loop writes: float32 log-softmax of the whole batch for the
student and the teacher, the forward KL, the mean over tokens. `distill.kd.token_losses` computes
the same value in chunks of positions under activation checkpointing. Both run forward and
backward on the same bf16 logits [B, n, V] (SmolLM2's vocabulary by default); the script reports
the peak CUDA memory each adds on top of the logits, the milliseconds per forward+backward, and
the largest difference of loss and gradient between them.

    python bench/token_loss_memory.py            # needs a CUDA device
    # -> bench/results/token_loss_memory.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from distill.kd.token_losses import token_kd_loss, top_k  # noqa: E402
from provenance import RESULTS, write_result  # noqa: E402


def plain_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(p_T ‖ p_S) per token, mean over all tokens, float32 over the whole batch."""
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    return temperature**2 * (log_t.exp() * (log_t - log_s)).sum(-1).mean()


def measure(fn, student: torch.Tensor, repeats: int) -> dict:
    """Peak extra CUDA memory (MiB above what exists before) and ms per forward+backward."""
    for _ in range(2):  # warm-up
        student.grad = None
        fn().backward()
    torch.cuda.synchronize()
    student.grad = None
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = fn()
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    grad = student.grad.clone()
    start = time.perf_counter()
    for _ in range(repeats):
        student.grad = None
        fn().backward()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - start) / repeats * 1e3
    return {"peak_extra_mib": round(peak / 2**20, 1), "ms": round(ms, 2),
            "loss": float(loss), "grad": grad}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", type=Path, default=RESULTS / "token_loss_memory.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("token_loss_memory: needs a CUDA device", file=sys.stderr)
        return 2
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (args.batch, args.length, args.vocab)
    student = (torch.randn(shape, device="cuda", generator=g) * 3).to(torch.bfloat16)
    student.requires_grad_(True)
    teacher = (torch.randn(shape, device="cuda", generator=g) * 3).to(torch.bfloat16)
    t = 2.0
    plain = measure(lambda: plain_kd(student, teacher, t), student, args.repeats)
    chunked = measure(lambda: token_kd_loss(student, teacher, temperature=t,
                                            chunk_size=args.chunk), student, args.repeats)
    cache = top_k(teacher, args.k, t)
    cached = measure(lambda: token_kd_loss(student, cache, temperature=t,
                                           chunk_size=args.chunk), student, args.repeats)
    logits_mib = student.numel() * student.element_size() / 2**20
    result = {
        "shape": list(shape), "dtype": "bfloat16", "temperature": t, "chunk": args.chunk,
        "k": args.k, "logits_mib": round(logits_mib, 1),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "plain": {k: v for k, v in plain.items() if k != "grad"},
        "chunked": {k: v for k, v in chunked.items() if k != "grad"},
        "top_k": {k: v for k, v in cached.items() if k != "grad"},
        "chunked_vs_plain": {
            "loss_abs_diff": abs(plain["loss"] - chunked["loss"]),
            "grad_max_abs_diff": float((plain["grad"].float() - chunked["grad"].float())
                                       .abs().max()),
            "memory_ratio": round(plain["peak_extra_mib"] / chunked["peak_extra_mib"], 2),
            "time_ratio": round(chunked["ms"] / plain["ms"], 2)},
    }
    write_result(args.json, result)
    print({k: v for k, v in result.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
