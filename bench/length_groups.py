"""Length-grouped batches against uniformly random ones: a distill epoch's time and accuracy.

Two real one-epoch distill stages per seed, each followed by an evaluate stage (test split),
run by `distill.run_recipe` on the tuned MiniLM-L6 teacher (`minilm_stages.tuned_teacher`),
3-layer student (layers 0, 2, 4), Rotten
Tomatoes (batch 32, ≤ 64 tokens, 321 steps), α = 0.5, T = 2, fp32 (so that both sides time the
same kernels), the teacher's logits from the run's cache; they differ only in
`group_by_length` (true: the default, `distill.data.batching.LengthGroupedBatches`; false:
uniformly random batches). Modes alternate within each seed.

Reported: each run's loop seconds (`train_seconds`) and the student's test accuracy; the share
of padded positions that are real tokens in an epoch of each loader; `speedup` = the random
loop's seconds / the grouped loop's (sums over seeds); the accuracy of each mode as a mean
over the seeds and the paired differences (grouped − random, same seed).

    HF_HUB_OFFLINE=1 python bench/length_groups.py [--seeds 0 1 2]
    # -> bench/results/length_groups.json (~20 min)
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from rich.console import Console

from distill import load_recipe, run_recipe
from distill.data.batching import make_loader
from minilm_stages import (ALPHA, BATCH, LAYERS, LR, RECIPE, TEMPERATURE, train_split,
                           tuned_teacher)
from provenance import RESULTS, ROOT, write_result

MODES = {"grouped": True, "random": False}


def real_token_share(group_by_length: bool, seed: int) -> float:
    """Real tokens / padded positions over one epoch of the training loader."""
    _, checked, train = train_split()
    loader = make_loader(train, checked.task.collate(checked.tokenizer), BATCH, shuffle=True,
                         seed=seed, group_by_length=group_by_length)
    real = padded = 0
    for batch in loader:
        real += int(batch["attention_mask"].sum())
        padded += batch["attention_mask"].numel()
    return real / padded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=ROOT / "runs/bench-length-groups")
    ap.add_argument("--json", type=Path, default=RESULTS / "length_groups.json")
    args = ap.parse_args()
    console = Console()
    teacher = tuned_teacher(console)
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for seed in args.seeds:
        for mode, grouped in MODES.items():
            stage = (f"{{kind: distill, epochs: 1, batch_size: {BATCH}, learning_rate: {LR}, "
                     f"bf16: false, keep_best: false, seed: {seed}, "
                     f"group_by_length: {str(grouped).lower()}, "
                     f"student: {{layers: {LAYERS}}}, "
                     f"loss: {{alpha: {ALPHA}, temperature: {TEMPERATURE}}}}}")
            out = args.out / mode
            recipe = load_recipe(RECIPE, [f"teacher.model={teacher}",
                                          f"stages=[{stage}, {{kind: evaluate, latency: false}}]"])
            report = run_recipe(recipe, output=out, force=True, console=console)
            m = json.loads((out / "stages/00-distill/metrics.json").read_text())
            runs[mode].append({"seed": seed, "train_seconds": m["train_seconds"],
                               "steps": m["steps"], "stage_seconds": report["stages"][0]["seconds"],
                               "test_accuracy": report["final"]["metric"]["value"]})
            console.print(f"seed {seed} {mode}: {m['train_seconds']:.1f} s, test accuracy "
                          f"{runs[mode][-1]['test_accuracy']:.4f}")
    acc = {mode: [r["test_accuracy"] for r in rows] for mode, rows in runs.items()}
    diffs = [g - r for g, r in zip(acc["grouped"], acc["random"])]
    result = {
        "setup": {"teacher": "MiniLM-L6 tuned on Rotten Tomatoes", "student_layers": LAYERS,
                  "batch": BATCH, "epochs": 1, "precision": "fp32", "seeds": args.seeds},
        "real_token_share": {mode: round(real_token_share(g, args.seeds[0]), 4)
                             for mode, g in MODES.items()},
        "runs": runs,
        "speedup": round(sum(r["train_seconds"] for r in runs["random"])
                         / sum(r["train_seconds"] for r in runs["grouped"]), 3),
        "accuracy_mean": {mode: round(statistics.mean(v), 4) for mode, v in acc.items()},
        "accuracy_diff_grouped_minus_random": {
            "per_seed": [round(d, 4) for d in diffs], "mean": round(statistics.mean(diffs), 4),
            "sd": round(statistics.stdev(diffs), 4) if len(diffs) > 1 else None},
    }
    console.print(f"speedup {result['speedup']}, accuracy {result['accuracy_mean']}")
    console.print(f"wrote {write_result(args.json, result)}")


if __name__ == "__main__":
    main()
