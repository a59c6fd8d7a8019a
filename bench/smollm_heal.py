"""Healing a cut SmolLM2: KD vs cross-entropy, top-k vs full-vocabulary KD, LoRA vs full
weights, progressive vs one-shot -- each arm through the recipes, at the same heal steps.

SmolLM2-135M (30 layers) is cut to 20 layers by loss-increase importance (the same calibration
batch for every arm) and healed on general text as the recipe heals -- half blocks of its
mixture of Shakespeare's plays and Rotten Tomatoes critic snippets, half blocks sampled from the
teacher (`data.teacher_samples`, sampled once and read from the toolkit's cache by every arm) --
for the same number of optimizer steps (batch 4 x 128 tokens, the same blocks in the same
order). Arms:

- `kd_topk`: top-64 KD (from the run's teacher cache) + cross-entropy, alpha 0.5, every weight;
- `kd_only`: top-64 KD alone (alpha 0);
- `ce`: cross-entropy alone (alpha 1);
- `kd_full`: KD on the whole 49,152-token vocabulary (the teacher runs every batch) + CE;
- `lora_kd`: as `kd_topk` with LoRA r = 16 on every linear layer (merged into the student at
  the end), at a LoRA learning rate (10x);
- `progressive`: as `kd_topk`, cutting 30 -> 24 -> 20 with half the heal steps after each cut;
- `no_samples`: as `kd_topk`, on mixture blocks only (what the teacher samples buy);
- `samples_3q`, `samples_all`: as `kd_topk` with three quarters / all of the blocks sampled
  from the teacher (what a larger share of general text buys, and what it costs the mixture).

Every model is scored on held-out text of the mixture (documents no heal saw) and on BBC News
articles (a corpus no heal saw). Each arm runs in a fresh process, so its peak memory is its own.

    python bench/smollm_heal.py [--steps 60] [--eval-blocks 64] [--arms kd_topk,ce,...]
    # -> bench/results/smollm_heal.json
    # LoRA vs every weight over a longer heal (the README's second healing table):
    python bench/smollm_heal.py --steps 120 --arms lora_kd,kd_topk \
        --out bench/results/smollm_heal_long.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from provenance import RESULTS, write_result  # noqa: E402

MIXTURE = ["builtin:shakespeare", "builtin:rotten_tomatoes"]
BATCH = 4
LR = 2e-4
ARMS = {  # name -> (label, schedule, heal overrides)
    "kd_topk": ("top-64 KD + CE, full weights", [20], {}),
    "kd_only": ("top-64 KD alone (alpha 0)", [20], {"loss": {"alpha": 0.0}}),
    "ce": ("CE only (alpha 1)", [20], {"loss": {"alpha": 1.0}}),
    "kd_full": ("full-vocabulary KD + CE", [20], {"loss": {"top_k": None}}),
    "lora_kd": ("LoRA r=16 (all-linear), top-64 KD + CE", [20],
                {"method": "lora", "config": {"r": 16, "lora_alpha": 32,
                                              "target_modules": "all-linear"},
                 "learning_rate": 10 * LR}),
    "progressive": ("progressive 30 -> 24 -> 20, top-64 KD + CE", [24, 20], {}),
    "no_samples": ("top-64 KD + CE, corpus blocks only (no teacher samples)", [20],
                   {"share": 0.0}),
    "samples_3q": ("top-64 KD + CE, 3/4 of the blocks teacher samples", [20], {"share": 0.75}),
    "samples_all": ("top-64 KD + CE, teacher samples only", [20], {"share": 1.0}),
}


def recipe(arm: str, steps: int, eval_blocks: int) -> dict:
    _, schedule, overrides = ARMS[arm]
    loss = {"alpha": 0.5, "temperature": 1.0, "top_k": 64} | overrides.get("loss", {})
    heal = {"epochs": 1 / len(schedule), "batch_size": BATCH, "eval_batch_size": 8,
            "learning_rate": LR, "bf16": "auto", "log_every": 10, "keep_best": False,
            "checkpoint_every": None} | {k: v for k, v in overrides.items()
                                         if k not in ("loss", "share")}
    heal["loss"] = loss
    # The same number of blocks for every arm; `share` of them sampled from the teacher.
    # (At least one corpus block: the mixture is still the data whose held-out text is scored.)
    corpus = max(steps * BATCH - round(steps * BATCH * overrides.get("share", 0.5)), 1)
    sampled = steps * BATCH - corpus
    data = {"dataset": MIXTURE, "max_length": 128, "max_train_examples": corpus,
            "teacher_samples": sampled or None, "max_eval_examples": eval_blocks}
    return {
        "name": f"heal-{arm}", "seed": 0,
        "teacher": {"model": "builtin:smollm2-135m"},
        "data": data,
        "stages": [
            {"kind": "shrink", "start": "teacher", "calibration_examples": 16,
             "schedule": [{"layers": n} for n in schedule], "heal": heal},
            {"kind": "evaluate", "batch_size": 8, "latency": False,
             "eval_data": [{"dataset": "builtin:bbc_news", "max_length": 128,
                            "max_eval_examples": eval_blocks}]},
        ],
    }


def one_arm(arm: str, work: Path, steps: int, eval_blocks: int) -> dict:
    """Run one arm in this process; its numbers and this process's peak memory."""
    from distill.config.loading import recipe_from_dict
    from distill.run.pipeline import run_recipe

    out = work / arm
    spec = recipe(arm, steps, eval_blocks)
    report = run_recipe(recipe_from_dict(spec), output=out)
    records = [json.loads(p.read_text()) for p in
               sorted((out / "stages" / "00-shrink" / "steps").glob("*/step.json"))]
    model = report["stages"][0]["steps"][-1]["model"]
    train_seconds = sum(r["train_seconds"] for r in records)
    heal_steps = sum(r["steps"] for r in records)
    return {"arm": arm, "label": ARMS[arm][0], "layers": [r["layers"] for r in records],
            "kept_layers": records[-1]["start_layers"],  # the teacher's layers kept
            "corpus_blocks": spec["data"]["max_train_examples"],
            "teacher_samples": spec["data"]["teacher_samples"] or 0,
            "heal_steps": heal_steps, "train_seconds": round(train_seconds, 1),
            "seconds_per_step": round(train_seconds / heal_steps, 3),
            "stage_seconds": report["stages"][0]["seconds"],
            "trainable_params": records[-1]["trainable_params"],
            "bf16": records[-1]["bf16"],
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "mixture_ppl": model["metric"]["value"],
            "bbc_news_ppl": model["eval_data"][0]["perplexity"],
            "teacher_mixture_ppl": report["teacher"]["metric"]["value"],
            "teacher_bbc_news_ppl": report["teacher"]["eval_data"][0]["perplexity"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-blocks", type=int, default=64)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--out", default=str(RESULTS / "smollm_heal.json"),
                        help="where the JSON goes (an exploratory run need not replace it)")
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # a child process's arm
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(one_arm(args.arm, Path(args.work), args.steps, args.eval_blocks)))
        return 0
    # The work folder (each arm's models and run) is this script's own: gone at exit.
    with tempfile.TemporaryDirectory(prefix="smollm-heal-") as tmp:
        work = Path(tmp)
        rows = []
        for arm in args.arms.split(","):
            out = subprocess.run([sys.executable, __file__, "--arm", arm, "--work", str(work),
                                  "--steps", str(args.steps), "--eval-blocks",
                                  str(args.eval_blocks)],
                                 check=True, stdout=subprocess.PIPE, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    teacher = {"mixture_ppl": rows[0]["teacher_mixture_ppl"],
               "bbc_news_ppl": rows[0]["teacher_bbc_news_ppl"]}
    for row in rows:
        row["mixture_vs_teacher"] = row["mixture_ppl"] / teacher["mixture_ppl"]
        row["bbc_news_vs_teacher"] = row["bbc_news_ppl"] / teacher["bbc_news_ppl"]
    result = {"teacher": "builtin:smollm2-135m", "layers": 20, "healing_data": MIXTURE,
              # Blocks sampled from the teacher by the arms of the recipe's half-and-half share.
              "teacher_samples": args.steps * BATCH - args.steps * BATCH // 2,
              "never_seen": "builtin:bbc_news", "heal_steps": args.steps, "batch": BATCH,
              "block_tokens": 128, "learning_rate": LR, "eval_blocks": args.eval_blocks,
              "seeds": 1, "teacher_ppl": teacher, "arms": rows}
    path = write_result(Path(args.out), result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
