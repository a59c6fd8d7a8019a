"""QLoRA's frozen base on a real model: weight memory and error of NF4 vs fp32 and bf16.

Loads SmolLM2-135M-Instruct and, for every linear layer QLoRA quantizes (all but the output
layer, which SmolLM2 ties to the embeddings), measures:

- the bytes of the stored weight tensors: fp32, bf16, NF4 (4-bit codes + an fp32 absmax per
  64 weights + the 16-value code book) and NF4 with double quantization (8-bit absmax codes,
  an fp32 scale per 256 of them, one offset);
- the weight error of each format: mean |w − ŵ| and ‖w − ŵ‖_F / ‖w‖_F over all those layers;
- the effect on the model: perplexity on held-out Shakespeare blocks, mean |Δ logit| and the
  mean per-token KL(p_fp32 ‖ p_format) against the fp32 model. NF4 models are built with
  `peft_methods.apply(model, "qlora")` (LoRA B = 0, so they compute the quantized base).

METHODS.md §3 requires NF4 to cut the base's weight memory ~4× vs bf16; the script checks
NF4 ≤ 1/3.5 of bf16 and exits with code 1 otherwise. Note: the packaged checkpoint is a
dequantized Q4_1 GGUF, so its weights already sit on a (different) 4-bit grid.

    HF_HUB_OFFLINE=1 nice -n 19 python bench/qlora_memory.py
    # -> bench/results/qlora_memory.json (~80 s on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

import peft_methods as pm
from distill.data.text import (
    SHAKESPEARE,
    lm_batches,
    load_lm_text,
    sample_blocks,
    tokenize_blocks,
)
from distill.models.loading import resolve_model_path
from distill.tasks.perplexity import next_token_labels
from distill.kd.token_losses import token_nll
from peft_methods.base import find_targets
from peft_methods.qlora import NF4Linear, quantized_layers
from provenance import RESULTS, write_result

MODEL = "builtin:smollm2-135m"
REQUIRED_RATIO = 3.5  # bf16 bytes / NF4 bytes, at least


def weight_stats(model: torch.nn.Module, paths: list[str]) -> dict[str, dict[str, float]]:
    """Bytes and weight error of each storage format over the linear layers `paths`."""
    out = {k: {"bytes": 0, "abs_err_sum": 0.0, "sq_err": 0.0} for k in
           ("fp32", "bf16", "nf4", "nf4_dq")}
    numel, sq_norm = 0, 0.0
    for path in paths:
        layer = model.get_submodule(path)
        w = layer.weight.detach().float()
        numel += w.numel()
        sq_norm += float(w.double().pow(2).sum())
        approx = {"fp32": w, "bf16": w.bfloat16().float()}
        out["fp32"]["bytes"] += w.numel() * 4
        out["bf16"]["bytes"] += w.numel() * 2
        for key, dq in (("nf4", False), ("nf4_dq", True)):
            q = NF4Linear(layer, double_quant=dq)
            out[key]["bytes"] += q.quantized_bytes()
            approx[key] = q.dequantize(torch.float32)
        for key, wq in approx.items():
            diff = (wq - w).double()
            out[key]["abs_err_sum"] += float(diff.abs().sum())
            out[key]["sq_err"] += float(diff.pow(2).sum())
    for key, s in out.items():
        s["mean_abs_err"] = s.pop("abs_err_sum") / numel
        s["rel_err"] = (s.pop("sq_err") / sq_norm) ** 0.5
        s["bits_per_weight"] = 8 * s["bytes"] / numel
        s["bf16_over_this"] = out["bf16"]["bytes"] / s["bytes"] if s["bytes"] else None
    out["bf16"]["bf16_over_this"] = 1.0
    return out


@torch.no_grad()
def model_stats(reference: torch.nn.Module, variants: dict[str, torch.nn.Module],
                batches: list[dict[str, torch.Tensor]]) -> dict[str, dict[str, float]]:
    """Perplexity of the reference and each variant, and each variant's mean |Δ logit| and
    mean per-token KL(p_ref ‖ p_variant) (float32 softmax) on the same tokens."""
    names = ["fp32", *variants]
    nll = dict.fromkeys(names, 0.0)
    dlogit = dict.fromkeys(variants, 0.0)
    kl = dict.fromkeys(variants, 0.0)
    tokens = positions = 0
    for batch in batches:
        labels = next_token_labels(batch)
        ref = reference(input_ids=batch["input_ids"], use_cache=False).logits.float()
        loss, n = token_nll(ref, labels)
        nll["fp32"] += float(loss)
        tokens += n
        positions += ref.shape[0] * ref.shape[1]
        ref_logp = torch.log_softmax(ref, dim=-1)
        for name, model in variants.items():
            out = model(input_ids=batch["input_ids"], use_cache=False).logits.float()
            nll[name] += float(token_nll(out, labels)[0])
            dlogit[name] += float((out - ref).abs().mean(dim=-1).sum())
            logp = torch.log_softmax(out, dim=-1)
            kl[name] += float((ref_logp.exp() * (ref_logp - logp)).sum(dim=-1).sum())
    stats = {n: {"ppl": float(torch.tensor(nll[n] / tokens).exp())} for n in names}
    for n in variants:
        stats[n]["mean_abs_dlogit"] = dlogit[n] / positions
        stats[n]["mean_kl"] = kl[n] / positions
    return stats


def render(report: dict) -> Table:
    table = Table(title=f"QLoRA base weights: {report['model']} "
                        f"({report['linear_layers']} linear layers, "
                        f"{report['linear_params'] / 1e6:.1f} M weights)")
    for col in ("format", "MB", "bits/weight", "bf16 / format", "mean |Δw|", "‖Δw‖/‖w‖",
                "ppl", "mean |Δlogit|", "KL vs fp32"):
        table.add_column(col, justify="left" if col == "format" else "right")
    for key, label in (("fp32", "fp32"), ("bf16", "bf16"), ("nf4", "NF4"),
                       ("nf4_dq", "NF4 + double quant")):
        w, m = report["weights"][key], report["model_effect"][key]
        table.add_row(label, f"{w['bytes'] / 2**20:.1f}", f"{w['bits_per_weight']:.3f}",
                      f"{w['bf16_over_this']:.2f}×", f"{w['mean_abs_err']:.2e}",
                      f"{w['rel_err']:.4f}", f"{m['ppl']:.3f}",
                      f"{m.get('mean_abs_dlogit', 0):.4f}", f"{m.get('mean_kl', 0):.5f}")
    return table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--eval-blocks", type=int, default=8, help="held-out blocks scored")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "qlora_memory.json")
    args = ap.parse_args()
    console = Console(width=160)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    path = resolve_model_path(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True,
                                                 dtype=torch.float32).eval()
    paths = find_targets(model, "all-linear", method="qlora")
    weights = weight_stats(model, paths)

    text = load_lm_text(SHAKESPEARE)
    blocks = sample_blocks(tokenize_blocks(text.test, tokenizer, args.block_size),
                           args.eval_blocks, seed=args.seed)
    batches = list(lm_batches(blocks, args.batch_size))
    variants = {"bf16": copy.deepcopy(model).to(torch.bfloat16)}
    for key, dq in (("nf4", False), ("nf4_dq", True)):
        adapted = pm.apply(copy.deepcopy(model), "qlora", double_quant=dq).eval()
        assert len(quantized_layers(adapted.model)) == len(paths)
        variants[key] = adapted
    effect = model_stats(model, variants, batches)

    ratio = weights["nf4"]["bf16_over_this"]
    report = {
        "model": MODEL, "linear_layers": len(paths),
        "linear_params": sum(model.get_submodule(p).weight.numel() for p in paths),
        "block_size": 64, "double_quant_block_size": 256,
        "weights": weights, "model_effect": effect,
        "data": {"source": SHAKESPEARE, "split": "test", "blocks": int(blocks.shape[0]),
                 "block_size": args.block_size, "seed": args.seed},
        "required_bf16_over_nf4": REQUIRED_RATIO, "pass": ratio >= REQUIRED_RATIO,
        "seconds": round(time.perf_counter() - start, 1), "threads": args.threads,
        "torch": torch.__version__,
    }
    console.print(render(report))
    console.print(f"NF4 is {ratio:.2f}× smaller than bf16 (required ≥ {REQUIRED_RATIO}×), "
                  f"{weights['nf4_dq']['bf16_over_this']:.2f}× with double quantization; "
                  f"{report['seconds']} s")
    console.print(f"wrote {write_result(args.out, report)}")
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
