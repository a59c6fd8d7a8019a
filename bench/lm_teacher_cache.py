"""The language-model teacher cache: a heal epoch with and without it, on the real SmolLM2.

The student is SmolLM2-135M cut to 20 of its 30 layers (evenly spaced), saved once; each mode
then runs in a fresh process that loads it and trains one heal epoch with top-k KD (k = 64,
T = 1, alpha = 0: the soft labels alone) through the recipes' own `kd_train`, fp32, on the same
batches of Shakespeare training blocks:

- `live`: no cache; the teacher runs on every batch (its top-k taken from its logits);
- `cold`: the cache is empty: the teacher computes every block's top-k once, then trains;
- `warm`: the cache from `cold` is complete: the teacher is never loaded.

Reported per mode: seconds of the training loop, seconds to fill the cache, peak resident
memory of the process (the teacher's weights are absent from `warm`), whether the teacher was
loaded, the cache's bytes per token, and the last logged loss (the same targets: equal losses).

    python bench/lm_teacher_cache.py [--blocks 64] [--batch 4]
    # -> bench/results/lm_teacher_cache.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from provenance import RESULTS, write_result  # noqa: E402
from smollm_stages import TEACHER, context, prepare  # noqa: E402

LAYERS = 20


def one_mode(mode: str, work: Path, blocks: int, batch: int) -> dict:
    """One heal epoch in this process (see the module docstring)."""
    import torch

    from distill.config.recipe import HealConfig, LossConfig
    from distill.stages.training import frozen_teacher, kd_train

    torch.manual_seed(0)
    ctx = context(work, mode, blocks)
    student, _ = ctx.task.load_model(str(work / "student"), ctx.data)
    for p in student.parameters():
        p.requires_grad_(True)
    args = HealConfig(epochs=1, batch_size=batch, learning_rate=1e-4, bf16=False,
                      keep_best=False, checkpoint_every=None, log_every=1, seed=0)
    loss = LossConfig(alpha=0.0, temperature=1.0, top_k=64)
    teacher = frozen_teacher(ctx)
    cache_dir = work / "cache"
    start = time.perf_counter()
    result, summary = kd_train(ctx, student, teacher, TEACHER, args, loss,
                               cache_teacher=mode != "live", cache_dir=cache_dir,
                               log_path=work / mode / "log.jsonl", desc=mode)
    total = time.perf_counter() - start
    lines = (work / mode / "log.jsonl").read_text().splitlines()
    return {"mode": mode, "steps": result.steps, "train_seconds": round(result.seconds, 2),
            "seconds_per_step": round(result.seconds / result.steps, 3),
            "cache_seconds": round(total - result.seconds, 2),
            "teacher_loaded": teacher.loaded,
            "bytes_per_token": (summary.get("teacher_cache") or {}).get("bytes_per_token"),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "losses": [round(json.loads(x)["loss"], 6) for x in lines]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # a child process's mode
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(one_mode(args.mode, Path(args.work), args.blocks, args.batch)))
        return 0
    work = Path(tempfile.mkdtemp(prefix="lm-cache-bench-"))
    prepare(work, LAYERS)
    rows = []
    for mode in ("live", "cold", "warm"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--work", str(work),
                              "--blocks", str(args.blocks), "--batch", str(args.batch)],
                             check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "losses"}))
    live, cold, warm = rows
    result = {
        "teacher": TEACHER, "student_layers": LAYERS, "blocks": args.blocks,
        "block_tokens": 128, "batch": args.batch, "k": 64, "temperature": 1.0,
        "precision": "fp32", "modes": rows,
        "speedup_train_loop": round(live["train_seconds"] / warm["train_seconds"], 2),
        "peak_rss_saved_mib": round(live["peak_rss_mib"] - warm["peak_rss_mib"], 1),
        "max_loss_difference_live_vs_cached": max(
            abs(a - b) for a, b in zip(live["losses"], warm["losses"])),
    }
    path = write_result(RESULTS / "lm_teacher_cache.json", result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
