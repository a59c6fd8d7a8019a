"""The language-model teacher cache: the SmolLM2 recipe's heal with and without it.

The student is SmolLM2-135M cut to 20 of its 30 layers (evenly spaced), saved once; each mode
then runs in a fresh process that loads it and trains one heal epoch exactly as
recipes/smollm2-shakespeare.yaml heals (its stage 0's `heal`, read from the file: LoRA r 16
on every linear layer, `0.5·CE + 0.5·KD` on the teacher's top-64 at T = 1, batch 4,
`bf16: auto`) through the recipes' own `kd_train`, on the same batches of Shakespeare
training blocks:

- `live`: no cache; the teacher runs on every batch (its top-k taken from its logits);
- `cold`: the cache is empty: the teacher computes every block's top-k once, then trains;
- `warm`: the cache from `cold` is complete: the teacher is never loaded.

`bf16: auto` is decided once, by the first mode's probe, and kept for the other two (the
stage's own `precision.json`, as a resumed stage keeps it), so the modes train in one
precision. Reported per mode: seconds of the training loop, seconds to fill the cache, peak
resident memory of the process (the teacher's weights are absent from `warm`), whether the
teacher was loaded, the cache's bytes per token, and the last logged loss (the same targets:
equal losses). `speedup_train_loop` = live / warm.

What bounds it: the cache removes the teacher's forward pass and nothing else; the student
still runs its forward and backward passes, its full-vocabulary log-softmax included (the CE
term and the KL's normaliser need every logit). `flop_bound` counts the matmul FLOPs of a
teacher forward and of a student LoRA step (forward, plus a backward that computes input
gradients through the frozen weights and weight gradients only for the adapters) and gives
(teacher forward + student step) / student step: what the cache could buy if nothing but
matmuls took time.

    python bench/lm_teacher_cache.py [--blocks 64] [--batch 4]
    # -> bench/results/lm_teacher_cache.json (~3 min)
"""

from __future__ import annotations

import argparse
import dataclasses
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
from transformers import AutoConfig  # noqa: E402

from distill.models.loading import resolve_model_path  # noqa: E402

LAYERS = 20
BLOCK_TOKENS = 128  # smollm_stages.context's default
RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "smollm2-shakespeare.yaml"


def recipe_heal():
    """The SmolLM2 recipe's heal (its first stage's `heal`), for one epoch, no checkpoints,
    no best-epoch selection, a loss logged every step."""
    from distill import load_recipe

    heal = load_recipe(RECIPE).stages[0].heal
    if heal.method != "lora":  # flop_bound counts a LoRA step
        raise SystemExit(f"{RECIPE.name}: the heal's method is {heal.method}; this bench "
                         "counts a LoRA step's FLOPs")
    return dataclasses.replace(heal, epochs=1, keep_best=False, checkpoint_every=None,
                               log_every=1, seed=0)


def one_mode(mode: str, work: Path, blocks: int, batch: int) -> dict:
    """One heal epoch in this process (see the module docstring)."""
    import torch

    from distill.stages.training import frozen_teacher, kd_train, stage_precision, with_method

    torch.manual_seed(0)
    ctx = context(work, mode, blocks)
    student, _ = ctx.task.load_model(str(work / "student"), ctx.data)
    heal = dataclasses.replace(recipe_heal(), batch_size=batch)
    healing = with_method(ctx, student, heal)
    # Decided by the first mode, read back by the others (work/precision.json).
    precision = stage_precision(ctx, healing, heal, work, mode)
    teacher = frozen_teacher(ctx)
    cache_dir = work / "cache"
    start = time.perf_counter()
    result, summary = kd_train(ctx, healing, teacher, TEACHER, heal, heal.loss,
                               cache_teacher=mode != "live", cache_dir=cache_dir,
                               log_path=work / mode / "log.jsonl", desc=mode,
                               precision=precision)
    total = time.perf_counter() - start
    lines = (work / mode / "log.jsonl").read_text().splitlines()
    return {"mode": mode, "steps": result.steps, "train_seconds": round(result.seconds, 2),
            "seconds_per_step": round(result.seconds / result.steps, 3),
            "cache_seconds": round(total - result.seconds, 2),
            "precision": precision.record(),
            "teacher_loaded": teacher.loaded,
            "bytes_per_token": (summary.get("teacher_cache") or {}).get("bytes_per_token"),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "losses": [round(json.loads(x)["loss"], 6) for x in lines]}


def forward_flops(config, n: int) -> tuple[float, float, float]:
    """Matmul FLOPs per token of a Llama-style decoder's forward on sequences of `n` tokens:
    (its linear layers, its attention products QK^T and AV over all n positions, its output
    projection over the vocabulary)."""
    d, ff = config.hidden_size, config.intermediate_size
    kv = d * config.num_key_value_heads // config.num_attention_heads
    layers = config.num_hidden_layers
    linear = 2 * layers * (2 * d * d + 2 * d * kv + 3 * d * ff)
    attention = 2 * layers * 2 * n * d
    return linear, attention, 2 * d * config.vocab_size


def flop_bound(teacher_cfg, student_cfg, n: int, r: int) -> dict:
    """(teacher forward + student LoRA step) / student LoRA step, in matmul FLOPs per token.

    The student's step: its forward; a backward that computes the input gradients through
    every frozen matrix (as many FLOPs as the forward's products; the attention's backward
    twice its forward: four products against two) and no weight gradients but the adapters';
    the adapters' own products (rank r on each of a layer's 7 matrices: forward, input and
    weight gradients)."""
    t_linear, t_attention, t_head = forward_flops(teacher_cfg, n)
    s_linear, s_attention, s_head = forward_flops(student_cfg, n)
    d, ff = student_cfg.hidden_size, student_cfg.intermediate_size
    kv = d * student_cfg.num_key_value_heads // student_cfg.num_attention_heads
    sides = 2 * (d + d) + 2 * (d + kv) + 3 * (d + ff)  # in + out of q, o, k, v, gate, up, down
    adapters = 3 * 2 * r * sides * student_cfg.num_hidden_layers
    teacher = t_linear + t_attention + t_head
    student = 2 * (s_linear + s_head) + 3 * s_attention + adapters
    return {"teacher_forward_flops_per_token": teacher,
            "student_step_flops_per_token": student,
            "flop_bound": round((teacher + student) / student, 3)}


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
    heal = recipe_heal()
    with tempfile.TemporaryDirectory(prefix="lm-cache-bench-") as folder:
        work = Path(folder)
        prepare(work, LAYERS)
        rows = []
        for mode in ("live", "cold", "warm"):
            out = subprocess.run([sys.executable, __file__, "--mode", mode, "--work", str(work),
                                  "--blocks", str(args.blocks), "--batch", str(args.batch)],
                                 check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "losses"}))
        bound = flop_bound(AutoConfig.from_pretrained(resolve_model_path(TEACHER)),
                           AutoConfig.from_pretrained(work / "student"), BLOCK_TOKENS,
                           heal.config["r"])
    live, cold, warm = rows
    result = {
        "teacher": TEACHER, "student_layers": LAYERS, "blocks": args.blocks,
        "block_tokens": BLOCK_TOKENS, "batch": args.batch,
        "heal": {"recipe": f"recipes/{RECIPE.name}", "method": heal.method,
                 "config": dict(heal.config), "loss": dataclasses.asdict(heal.loss),
                 "learning_rate": heal.learning_rate, "bf16": heal.bf16},
        "modes": rows,
        "speedup_train_loop": round(live["train_seconds"] / warm["train_seconds"], 2),
        **bound,
        "peak_rss_saved_mib": round(live["peak_rss_mib"] - warm["peak_rss_mib"], 1),
        "max_loss_difference_live_vs_cached": max(
            abs(a - b) for a, b in zip(live["losses"], warm["losses"])),
    }
    path = write_result(RESULTS / "lm_teacher_cache.json", result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
