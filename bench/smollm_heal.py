"""Healing a cut SmolLM2 with KD vs with cross-entropy alone, through the recipes.

SmolLM2-135M (30 layers) is cut to 20 layers by loss-increase importance (the same cut for
both arms: the calibration batch is fixed), then healed for one epoch of Shakespeare training
blocks (batch 4 × 128 tokens) either with top-64 KD plus cross-entropy (alpha 0.5, T = 1, the
teacher's top-k from the run's cache) or with cross-entropy alone (alpha 1), at the same
learning rate and steps. Every model is scored on held-out Shakespeare (plays the heal never
saw, the healing corpus's own kind of text) and on BBC News articles (a corpus it never saw).

    python bench/smollm_heal.py [--blocks 160] [--eval-blocks 32]
    # -> bench/results/smollm_heal.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from provenance import RESULTS, write_result  # noqa: E402


def recipe(name: str, alpha: float, blocks: int, eval_blocks: int, layers: int) -> dict:
    heal = {"epochs": 1, "batch_size": 4, "eval_batch_size": 8, "learning_rate": 1e-4,
            "bf16": "auto", "log_every": 4, "keep_best": False, "checkpoint_every": None,
            "loss": {"alpha": alpha, "temperature": 1.0, "top_k": 64}}
    return {
        "name": name, "seed": 0,
        "teacher": {"model": "builtin:smollm2-135m"},
        "data": {"dataset": "builtin:shakespeare", "max_length": 128,
                 "max_train_examples": blocks, "max_eval_examples": eval_blocks},
        "stages": [
            {"kind": "shrink", "start": "teacher", "calibration_examples": 16,
             "schedule": [{"layers": layers}], "heal": heal},
            {"kind": "evaluate", "batch_size": 8, "latency": False,
             "eval_data": [{"dataset": "builtin:bbc_news", "max_length": 128,
                            "max_eval_examples": eval_blocks}]},
        ],
    }


def main() -> int:
    from distill.config.recipe import recipe_from_dict
    from distill.run.pipeline import run_recipe

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=160)
    parser.add_argument("--eval-blocks", type=int, default=32)
    parser.add_argument("--layers", type=int, default=20)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="smollm-heal-"))
    arms = {}
    for name, alpha in (("kd", 0.5), ("ce", 1.0)):
        report = run_recipe(recipe_from_dict(recipe(name, alpha, args.blocks, args.eval_blocks,
                                                    args.layers)), output=work / name)
        stage = report["stages"][0]
        step = stage["steps"][0]
        model = step["model"]
        arms[name] = {
            "alpha": alpha, "seconds": stage["seconds"],
            "shakespeare_ppl": model["metric"]["value"],
            "bbc_news_ppl": model["eval_data"][0]["perplexity"],
            "teacher": report["teacher"],
        }
    teacher = arms["kd"]["teacher"]
    t_shakespeare = teacher["metric"]["value"]
    t_bbc = teacher["eval_data"][0]["perplexity"]
    rows = [{"arm": "teacher (30 layers)", "shakespeare_ppl": t_shakespeare, "bbc_news_ppl": t_bbc}]
    for name, label in (("kd", "KD + CE (alpha 0.5)"), ("ce", "CE only (alpha 1)")):
        arm = arms[name]
        rows.append({"arm": f"{args.layers} layers, healed with {label}",
                     "shakespeare_ppl": arm["shakespeare_ppl"], "bbc_news_ppl": arm["bbc_news_ppl"],
                     "shakespeare_vs_teacher": arm["shakespeare_ppl"] / t_shakespeare,
                     "bbc_news_vs_teacher": arm["bbc_news_ppl"] / t_bbc,
                     "stage_seconds": arm["seconds"]})
    result = {"teacher": "builtin:smollm2-135m", "layers": args.layers,
              "train_blocks": args.blocks, "eval_blocks": args.eval_blocks, "block_tokens": 128,
              "heal_steps": args.blocks // 4, "batch": 4, "learning_rate": 1e-4, "k": 64,
              "seeds": 1, "rows": rows}
    for row in rows:
        print(row)
    path = write_result(RESULTS / "smollm_heal.json", result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
