"""Which layers to drop? Depth-selection strategies on SmolLM2-135M, before any healing.

Drops a third of SmolLM2-135M-Instruct's 30 layers (keeps 20) by each strategy of
`distill.compress.importance.select_layers` and measures perplexity on held-out Shakespeare:

- importance / influence: keep the 20 blocks with the largest `1 − cos(h_in, h_out)`;
- importance / loss: keep the 20 blocks whose skipping raises the calibration loss most;
- uniform: evenly spaced (`floor(i · 30 / 20)`);
- top: drop the top 10 blocks (keep 0..19).

Importance is scored on calibration blocks from the TRAIN plays only; perplexity is measured
on blocks of the TEST plays (`distill.data.text`: whole plays held out, split_seed 0). Blocks are
short (128 tokens) and sampled with a fixed seed, so the run takes a few minutes on 2 cores.

    HF_HUB_OFFLINE=1 nice -n 19 python bench/smollm_depth_selection.py
    # -> bench/results/smollm_depth_selection.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.compress.importance import depth_importance, most_important, select_layers
from distill.data.text import (
    SHAKESPEARE,
    lm_batches,
    load_lm_text,
    sample_blocks,
    tokenize_blocks,
)
from distill.models.loading import count_params, resolve_model_path
from distill.tasks.perplexity import perplexity
from distill.compress.depth import keep_layers
from provenance import RESULTS, write_result

MODEL = "builtin:smollm2-135m"


def ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8"."""
    parts: list[str] = []
    start = prev = None
    for i in [*layers, None]:
        if start is not None and (i is None or i != prev + 1):
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if i is not None and start is None:
            start = i
        prev = i
    return ",".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=int, default=20, help="layers kept (of 30)")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--eval-blocks", type=int, default=48, help="held-out blocks scored")
    ap.add_argument("--calib-blocks", type=int, default=16, help="train blocks for importance")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0, help="block sampling seed")
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "smollm_depth_selection.json")
    ap.add_argument("--render", action="store_true",
                    help="only print the table of an existing --out file (no computation)")
    args = ap.parse_args()
    # Wide enough for the layer lists even when the output is a log file (rich assumes 80).
    console = Console(width=180)
    if args.render:
        console.print(render_table(json.loads(args.out.read_text())))
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    path = resolve_model_path(MODEL)  # converts the packaged GGUF once, then cached
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    total_layers = model.config.num_hidden_layers

    text = load_lm_text(SHAKESPEARE, split_seed=args.split_seed)
    test_all = tokenize_blocks(text.test, tokenizer, args.block_size)
    train_all = tokenize_blocks(text.train, tokenizer, args.block_size)
    test = sample_blocks(test_all, args.eval_blocks, seed=args.seed)
    calib = sample_blocks(train_all, args.calib_blocks, seed=args.seed)
    calib_batches = list(lm_batches(calib, args.batch_size))
    console.print(f"held-out plays: {', '.join(text.names['test'])}; "
                  f"{test.shape[0]} of {test_all.shape[0]} test blocks, {calib.shape[0]} of "
                  f"{train_all.shape[0]} train blocks for calibration, {args.block_size} tokens")

    def ppl(m: torch.nn.Module) -> float:
        return perplexity(m, lm_batches(test, args.batch_size))

    timings: dict[str, float] = {}
    t = time.perf_counter()
    full_ppl = ppl(model)
    timings["eval_full"] = time.perf_counter() - t
    console.print(f"full model: ppl {full_ppl:.3f} ({timings['eval_full']:.1f} s)")

    scores: dict[str, list[float]] = {}
    for method in ("influence", "loss"):
        t = time.perf_counter()
        scores[method] = depth_importance(model, calib_batches, method=method)
        timings[f"score_{method}"] = time.perf_counter() - t
        console.print(f"{method} scores in {timings[f'score_{method}']:.1f} s: "
                      + " ".join(f"{s:.3g}" for s in scores[method]))

    selections = {
        "importance (influence)": most_important(scores["influence"], args.keep),
        "importance (loss)": most_important(scores["loss"], args.keep),
        "uniform": select_layers(model, args.keep, "uniform"),
        "top": select_layers(model, args.keep, "top"),
    }
    full_params = count_params(model)[0]
    rows = [{"strategy": "full", "layers": list(range(total_layers)), "dropped": [],
             "params": full_params, "ppl": full_ppl, "ppl_ratio": 1.0}]
    for name, layers in selections.items():
        t = time.perf_counter()
        student = keep_layers(model, layers).eval()
        value = ppl(student)
        timings[f"eval_{name}"] = time.perf_counter() - t
        rows.append({"strategy": name, "layers": layers,
                     "dropped": [i for i in range(total_layers) if i not in layers],
                     "params": count_params(student)[0], "ppl": value,
                     "ppl_ratio": value / full_ppl})
        console.print(f"{name}: ppl {value:.3f} ({timings[f'eval_{name}']:.1f} s)")
        del student

    timings["total"] = time.perf_counter() - t_start
    report = {
        "model": MODEL, "num_layers": total_layers, "keep": args.keep,
        "data": {"source": SHAKESPEARE, "split_seed": args.split_seed,
                 "held_out_plays": text.names["test"], "block_size": args.block_size,
                 "eval_blocks": int(test.shape[0]), "calib_blocks": int(calib.shape[0]),
                 "calib_split": "train", "eval_split": "test", "sample_seed": args.seed,
                 "eval_tokens_predicted": int(test.shape[0]) * (args.block_size - 1)},
        "scores": scores, "rows": rows,
        "seconds": {k: round(v, 2) for k, v in timings.items()},
        "threads": args.threads,
    }
    console.print(render_table(report))
    console.print(f"wrote {write_result(args.out, report)}")


def render_table(report: dict) -> Table:
    """The results table of a report (as written to the JSON file)."""
    data = report["data"]
    table = Table(title=f"SmolLM2-135M, keep {report['keep']} of {report['num_layers']} "
                        f"layers, no healing: perplexity on {data['eval_blocks']}×"
                        f"{data['block_size']} held-out tokens")
    for col, justify in (("strategy", "left"), ("kept layers", "left"),
                         ("dropped", "left"), ("params", "right"), ("ppl", "right"),
                         ("ppl / full", "right")):
        table.add_column(col, justify=justify, no_wrap=True)  # type: ignore
    for r in report["rows"]:
        table.add_row(r["strategy"], ranges(r["layers"]), ranges(r["dropped"]) or "-",
                      f"{r['params']:,}", f"{r['ppl']:,.3f}", f"{r['ppl_ratio']:,.3f}")
    return table


if __name__ == "__main__":
    main()
