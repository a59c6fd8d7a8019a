"""What distilling from the teacher cache costs over plain fine-tuning of the same student.

Two real stages on the same 3-layer student (MiniLM-L6's layers 0, 2, 4), the same Rotten
Tomatoes batches (batch 32, ≤ 64 tokens, 3,200 training examples: an epoch of 100 steps) and
the same precision (fp32), run by `distill.run_recipe`, one epoch each:

- `distill`: soft-label KD (`α·CE + (1−α)·T²·KL`) reading the teacher's logits from the
  run's cache (`cache_teacher: true`, the default): the teacher runs once over the training
  split before the loop, never inside it;
- `finetune`: the student on the hard labels alone (what the student would cost without KD).

Rounds alternate the two. `cache_overhead` = the distill loop's seconds / the fine-tune
loop's (the epochs a cache serves); `stage_ratio` adds what each stage does around its loop
(the teacher's pass that fills the cache, loading, saving), i.e. a one-epoch job; over the
recipes' 3 epochs that pass is paid once.

    HF_HUB_OFFLINE=1 python bench/cache_overhead.py
    # -> bench/results/cache_overhead.json (~5 min)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from distill.compress.depth import keep_layers
from minilm_stages import ALPHA, BATCH, LAYERS, LR, TEMPERATURE, TEACHER, prepare, stage_seconds
from provenance import RESULTS, ROOT, write_result

EXAMPLES = 3200


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "runs/bench-cache-overhead")
    ap.add_argument("--json", type=Path, default=RESULTS / "cache_overhead.json")
    args = ap.parse_args()
    console = Console()
    data = [f"data.max_train_examples={EXAMPLES}"]
    setup = prepare(args.out, data)
    student_dir = args.out / "student"  # the cut student with the teacher's head, as saved
    keep_layers(setup.teacher, LAYERS).save_pretrained(student_dir)
    setup.tokenizer.save_pretrained(student_dir)
    common = (f"epochs: 1, batch_size: {BATCH}, learning_rate: {LR}, bf16: false, "
              f"keep_best: false, seed: {args.seed}")
    stages = {
        "distill": (f"{{kind: distill, {common}, cache_teacher: true, "
                    f"student: {{layers: {LAYERS}}}, "
                    f"loss: {{alpha: {ALPHA}, temperature: {TEMPERATURE}}}}}",
                    setup.teacher_dir),
        "finetune": (f"{{kind: finetune, {common}, skip_if_tuned: false}}", student_dir)}
    runs: dict[str, list[dict]] = {name: [] for name in stages}
    for r in range(args.rounds):
        for name, (stage, teacher) in stages.items():
            m = stage_seconds(stage, teacher, args.out / name, console, data)
            runs[name].append({"train_seconds": m["train_seconds"], "steps": m["steps"],
                               "stage_seconds": m["stage_seconds"]})
        console.print(f"round {r}: " + ", ".join(
            f"{k} loop {v[-1]['train_seconds']:.1f} s, stage {v[-1]['stage_seconds']:.1f} s"
            for k, v in runs.items()))

    def total(name: str, key: str) -> float:
        return sum(x[key] for x in runs[name])

    result = {"setup": {"teacher": TEACHER, "student_layers": LAYERS, "batch": BATCH,
                        "train_examples": EXAMPLES, "precision": "fp32", "rounds": args.rounds,
                        "seed": args.seed},
              "runs": runs,
              "cache_overhead": total("distill", "train_seconds")
              / total("finetune", "train_seconds"),
              "stage_ratio": total("distill", "stage_seconds")
              / total("finetune", "stage_seconds")}
    console.print(f"cache_overhead {result['cache_overhead']:.3f}, "
                  f"stage_ratio {result['stage_ratio']:.3f}")
    console.print(f"wrote {write_result(args.json, result)}")


if __name__ == "__main__":
    main()
