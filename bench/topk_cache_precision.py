"""The language-model teacher cache in float32 vs under bf16 autocast: fill speed and agreement.

A stage that trains under bf16 autocast computes its top-k cache so (as a live teacher would
run). This bench fills the top-64 of the same SmolLM2-135M blocks (packaged corpora, 128
tokens) both ways, alternating the arms, and records tokens per second, how often the two
agree on the most probable token, the overlap of the two top-64 sets, and the mean absolute
difference of the top-64 log-probabilities where both hold a token.

    python bench/topk_cache_precision.py      # -> bench/results/topk_cache_precision.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from distill.kd import topk_cache  # noqa: E402
from distill.models.loading import resolve_model_path  # noqa: E402
from provenance import RESULTS, write_result  # noqa: E402


def corpus_blocks(tokenizer: AutoTokenizer, blocks: int, length: int) -> torch.Tensor:
    """[blocks, length] token ids: the first training blocks of the packaged mixture the
    SmolLM2 recipe heals on (Shakespeare + Rotten Tomatoes), as the toolkit tokenizes it."""
    from distill.data.text import load_lm_text, tokenize_blocks

    text = load_lm_text(["builtin:shakespeare", "builtin:rotten_tomatoes"])
    ids = tokenize_blocks(text.train, tokenizer, length)
    if ids.shape[0] < blocks:
        raise SystemExit(f"only {ids.shape[0]} blocks of {length} tokens")
    return ids[torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(0))[:blocks]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="timed fills per arm (alternated)")
    ap.add_argument("--json", type=Path, default=RESULTS / "topk_cache_precision.json")
    args = ap.parse_args()
    path = resolve_model_path("builtin:smollm2-135m")
    teacher = AutoModelForCausalLM.from_pretrained(path).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)  # as the run's frozen teacher
    ids = corpus_blocks(AutoTokenizer.from_pretrained(path), args.blocks, args.length)
    seconds: dict[str, list[float]] = {"fp32": [], "bf16": []}
    out: dict[str, dict[str, torch.Tensor]] = {}
    for _ in range(args.repeats):
        for name in seconds:
            begin = time.perf_counter()
            out[name] = topk_cache._compute(teacher, ids, None, args.k, 1.0, batch_size=8,
                                            bf16=name == "bf16")
            seconds[name].append(time.perf_counter() - begin)
    full, half = out["fp32"], out["bf16"]
    same_top1 = (full["indices"][..., 0] == half["indices"][..., 0]).double().mean()
    # Per position, the bf16 log-probability of each of float32's top-k tokens it also holds.
    match = full["indices"].unsqueeze(-1) == half["indices"].unsqueeze(-2)  # [B, n, k, k]
    shared = match.any(-1)  # [B, n, k]
    half_at = (match.float() * half["log_probs"].unsqueeze(-2)).sum(-1)  # [B, n, k]
    diff = (full["log_probs"] - half_at).abs()[shared]
    tokens = args.blocks * args.length
    result: dict = {"teacher": "builtin:smollm2-135m", "blocks": args.blocks,
                    "length": args.length, "k": args.k, "threads": torch.get_num_threads(),
                    "repeats": args.repeats,
                    "top1_agreement": round(float(same_top1), 4),
                    "topk_overlap": round(float(shared.double().mean()), 4),
                    "log_prob_mean_abs_diff": round(float(diff.mean()), 4),
                    "tail_mean_abs_diff": round(float((full["tail"] - half["tail"]).abs().mean()),
                                                4)}
    for name, times in seconds.items():
        result[name] = {"seconds": [round(t, 2) for t in times],
                        "tokens_per_s": round(tokens / statistics.median(times), 1)}
    result["speedup"] = round(statistics.median(seconds["fp32"])
                              / statistics.median(seconds["bf16"]), 2)
    write_result(args.json, result)
    print(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
