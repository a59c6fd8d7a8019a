"""Tables of the language-model benches (SmolLM2): depth selection, the chunked token loss,
the top-k teacher cache, healing choices, the shipped recipe."""

from __future__ import annotations

import re
from typing import Any

from tables.format import cpu, large, layer_ranges, millions, minutes, row


def smollm_depth_selection(data: dict[str, Any]) -> list[str]:
    """bench/smollm_depth_selection.py: which layers to drop, no healing, perplexity."""
    labels = {"full": "full model",
              "importance (loss)": "importance, loss increase",
              "importance (influence)": "importance, block influence `1 − cos(h_in, h_out)`",
              "uniform": "uniform (evenly spaced)", "top": "top (drop the top layers)"}
    rows = {r["strategy"]: r for r in data["rows"]}
    lines = [row("strategy", "layers dropped", "params", "perplexity", "× full model"),
             row("---", "---", "---:", "---:", "---:")]
    for key, label in labels.items():
        r = rows[key]
        lines.append(row(label, layer_ranges(r["dropped"]), f"{r['params'] / 1e6:.1f} M",
                         large(r["ppl"]), large(r["ppl_ratio"])))
    return lines


def token_loss_memory(data: dict[str, Any]) -> list[str]:
    """bench/token_loss_memory.py: the token KD loss on a GPU, chunked vs a plain float32 loss."""
    b, n, v = data["shape"]
    lines = [row(f"KD loss, forward + backward, {b}×{n} positions × {v:,} vocabulary, bf16 "
                 f"logits ({data['device']})", "memory beyond the logits", "ms", "vs plain"),
             row("---", "---:", "---:", "---:")]
    plain = data["plain"]
    for key, label in (("plain", "plain: float32 log-softmax of the whole batch"),
                       ("chunked", f"distill: chunks of {data['chunk']:,} positions"),
                       ("top_k", f"distill, teacher's top-{data['k']} (cached)")):
        r = data[key]
        lines.append(row(label, f"{r['peak_extra_mib']:,.0f} MiB", f"{r['ms']:.1f}",
                         "1×" if key == "plain" else
                         f"{plain['peak_extra_mib'] / r['peak_extra_mib']:.1f}× less memory, "
                         f"{r['ms'] / plain['ms']:.2f}× the time"))
    return lines


def token_loss_speed(data: dict[str, Any]) -> list[str]:
    """bench/token_loss_speed.py: the forward KL's gradient in closed form vs autograd (CPU)."""
    b, n, v = data["shape"]
    lines = [row(f"forward + backward, {b}×{n} positions × {v:,} vocabulary, chunks of "
                 f"{data['chunk']:,}, {data['threads']} threads", "logits", "closed form (ms)",
                 "autograd (ms)", "speed-up", "max gradient difference"),
             row("---", "---", "---:", "---:", "---:", "---:")]
    for dtype, r in data["dtypes"].items():
        for key, label in (("kd_top_k_plus_ce", f"top-{data['k']} KD + CE (cached teacher)"),
                           ("kd_full_plus_ce", "full-vocabulary KD + CE")):
            m = r[key]
            lines.append(row(label, dtype, f"{m['closed_form_ms']:.0f}", f"{m['autograd_ms']:.0f}",
                             f"{m['speedup']:.2f}×", f"{m['grad_max_abs_diff']:.1e}"))
        lines.append(row("CE alone (for scale)", dtype, f"{r['ce_ms']:.0f}", "—", "—", "—"))
    step = data["heal_step_seconds"]
    lines += ["", f"A LoRA heal step of SmolLM2 cut to 20 layers (batch 4 × 128 tokens, top-"
              f"{data['k']} KD + CE): {step['closed_form']:.2f} s with the closed form, "
              f"{step['autograd']:.2f} s with autograd ({step['speedup']:.2f}×); "
              f"CE alone {step['ce_only']:.2f} s, on {cpu(data['provenance'])}."]
    return lines


def teacher_sampling(data: dict[str, Any]) -> list[str]:
    """bench/teacher_sampling.py: `generate`'s own sampler vs the toolkit's, same teacher."""
    base, ours = data["generate_multinomial"], data["toolkit"]
    lines = [row(f"sampling {data['blocks']} blocks of {data['length']} tokens from SmolLM2-135M, "
                 f"bf16 autocast, {data['threads']} threads", "sequences at once", "tokens / s",
                 "speed-up"),
             row("---", "---:", "---:", "---:"),
             row("`generate(do_sample=True)`: `torch.multinomial`, weights cast at every step",
                 str(data["baseline_batch"]), f"{base['tokens_per_s']:.0f}", "1.00×"),
             row("toolkit: inverse-CDF draw, weights cast once per batch",
                 str(data["batch"]), f"{ours['tokens_per_s']:.0f}", f"{data['speedup']:.2f}×")]
    return lines + ["", f"Median of {data['repeats']} alternated runs per arm, on "
                    f"{cpu(data['provenance'])}."]


def topk_cache_precision(data: dict[str, Any]) -> list[str]:
    """bench/topk_cache_precision.py: the top-k cache filled in float32 vs bf16 autocast."""
    lines = [row(f"top-{data['k']} of SmolLM2-135M on {data['blocks']} × {data['length']} "
                 f"training tokens, {data['threads']} threads", "tokens / s", "speed-up"),
             row("---", "---:", "---:"),
             row("float32", f"{data['fp32']['tokens_per_s']:.0f}", "1.00×"),
             row("bf16 autocast", f"{data['bf16']['tokens_per_s']:.0f}",
                 f"{data['speedup']:.2f}×")]
    return lines + ["", f"bf16 against float32: the same most probable token at "
                    f"{100 * data['top1_agreement']:.1f} % of positions, "
                    f"{100 * data['topk_overlap']:.1f} % of the top-{data['k']} tokens shared, "
                    f"their log-probabilities {data['log_prob_mean_abs_diff']:.3f} nats apart "
                    f"on average (the tail's log-mass {data['tail_mean_abs_diff']:.3f}); on "
                    f"{cpu(data['provenance'])}."]


def lm_teacher_cache(data: dict[str, Any]) -> list[str]:
    """bench/lm_teacher_cache.py: the SmolLM2 recipe's heal epoch with and without the top-k
    cache, and the FLOP bound on what the cache can buy."""
    label = {"live": "no cache: the teacher runs every batch",
             "cold": "cache empty: filled first, then used",
             "warm": "cache complete: the teacher is never loaded"}
    heal, live = data["heal"], data["modes"][0]
    precision = "bf16" if live["precision"]["bf16"] else "fp32"
    lines = [row(f"heal epoch, SmolLM2 30 → {data['student_layers']} layers, "
                 f"{heal['method']} r {heal['config']['r']}, {data['blocks']} × "
                 f"{data['block_tokens']} tokens, batch {data['batch']}, "
                 f"top-{heal['loss']['top_k']} KD + CE, {precision}", "s / step",
                 "loop vs no cache", "filling the cache", "teacher loaded", "peak memory (RSS)"),
             row("---", "---:", "---:", "---:", "---", "---:")]
    for m in data["modes"]:
        lines.append(row(label[m["mode"]], f"{m['seconds_per_step']:.2f}",
                         f"{live['train_seconds'] / m['train_seconds']:.2f}×",
                         f"{m['cache_seconds']:.1f} s" if m["mode"] == "cold" else "—",
                         "yes" if m["teacher_loaded"] else "no",
                         f"{m['peak_rss_mib']:,.0f} MiB"))
    lines.append(row("bound: (teacher forward + student step) / student step, matmul FLOPs",
                     "", f"{data['flop_bound']:.2f}×", "", "", ""))
    return lines


def smollm_heal(data: dict[str, Any]) -> list[str]:
    """bench/smollm_heal.py: one 20-layer SmolLM2 cut healed by each choice, same steps."""
    teacher = data["teacher_ppl"]
    lines = [row(f"SmolLM2 → 20 layers, {data['heal_steps']} heal steps of {data['batch']} × "
                 f"{data['block_tokens']} tokens", "held-out mixture ppl", "× teacher",
                 "BBC News ppl (never seen)", "× teacher", "s / step", "trainable",
                 "peak RSS", "bf16"),
             row("---", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---"),
             row("teacher (30 layers)", f"{teacher['mixture_ppl']:.1f}", "1.00×",
                 f"{teacher['bbc_news_ppl']:.1f}", "1.00×", "", "", "", "")]
    for r in data["arms"]:
        lines.append(row(f"`{r['arm']}`: {r['label']}", f"{r['mixture_ppl']:.1f}",
                         f"{r['mixture_vs_teacher']:.2f}×", f"{r['bbc_news_ppl']:.1f}",
                         f"{r['bbc_news_vs_teacher']:.2f}×", f"{r['seconds_per_step']:.2f}",
                         millions(r["trainable_params"]),
                         f"{r['peak_rss_mib'] / 1024:.1f} GiB", "yes" if r["bf16"] else "no"))
    kept: dict[str, list[str]] = {}
    for r in data["arms"]:
        kept.setdefault(", ".join(map(str, r["kept_layers"])), []).append(f"`{r['arm']}`")
    lines += ["", "The teacher's layers each student kept: " + "; ".join(
        f"{' '.join(arms)}: {layers}" for layers, arms in kept.items()) + "."]
    shares: dict[tuple[int, int], list[str]] = {}
    for r in data["arms"]:
        shares.setdefault(healing_blocks(data, r), []).append(f"`{r['arm']}`")
    lines += ["", f"Healing data, blocks of {' + '.join(data['healing_data'])} + blocks sampled "
              "from the teacher: " + "; ".join(f"{' '.join(arms)}: {c} + {s}"
                                               for (c, s), arms in shares.items())
              + f"; {data['eval_blocks']} held-out blocks per corpus; {data['seeds']} seed; "
              f"on {cpu(data['provenance'])}."]
    return lines


def healing_blocks(data: dict[str, Any], arm: dict[str, Any]) -> tuple[int, int]:
    """(corpus blocks, teacher-sampled blocks) one heal-bench arm trained on."""
    if "corpus_blocks" in arm:
        return arm["corpus_blocks"], arm["teacher_samples"]
    # Written before the bench recorded them per arm: half and half, `no_samples` all corpus.
    total = data["heal_steps"] * data["batch"]
    if arm["arm"] == "no_samples":
        return total, 0
    return total - data["teacher_samples"], data["teacher_samples"]


def lm_recipe(data: dict[str, Any]) -> list[str]:
    """bench/smollm2_recipe.py: a shipped language-model recipe run as a new user runs it."""
    lines = [row(f"model ({data['recipe']})", "held-out mixture ppl",
                 "× teacher", "BBC News ppl (never seen)", "× teacher"),
             row("---", "---:", "---:", "---:", "---:")]
    for m in data["models"]:  # the teacher, then each model of the run
        if "adapter" in m:
            continue
        bbc = m["builtin:bbc_news"]
        cut = re.fullmatch(r"\d+-shrink \d+-layers(\d+)", m["name"])
        name = f"shrink → {cut[1]} layers, healed" if cut else m["name"]
        lines.append(row(name, f"{m['perplexity']:.1f}", f"{m['vs_teacher']:.2f}×",
                         f"{bbc['perplexity']:.1f}", f"{bbc['vs_teacher']:.2f}×"))
    stages = ", ".join(f"{s['kind']} {minutes(s['seconds'])}" for s in data["stages"])
    lines += ["", f"`distill run` in a fresh clone: exit {data['exit_code']}, "
              f"{minutes(data['run_seconds'])} ({stages}), on {cpu(data['provenance'])}."]
    samples = data.get("data", {}).get("teacher_samples")
    if samples:  # sampled inside the shrink stage, before its first heal
        lines += ["", f"The shrink stage's time includes sampling {samples['blocks']} blocks "
                  f"({samples['tokens']:,} tokens) from the teacher: "
                  f"{minutes(samples['seconds'])} in {'bf16' if samples['bf16'] else 'fp32'}."]
    for m in data["models"]:
        if "adapter" in m:
            a = m["adapter"]
            lines.append("")
            lines.append(f"The adapter ({a['method']}, {millions(a['trainable_params'])} "
                         f"trainable parameters) scores perplexity {a['perplexity']:.2f} on "
                         f"held-out {a['data']} answers.")
    return lines
