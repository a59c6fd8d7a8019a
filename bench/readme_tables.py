"""The README's results tables, generated from the committed JSON under bench/results/.

Every results table in README.md sits between two markers naming its table and its JSON file:

    <!-- table qlora_memory: bench/results/qlora_memory.json (bench/readme_tables.py) -->
    | ... the table, then a line naming its source ... |
    <!-- /table -->

This script renders each table from its JSON file (written by the benchmark script that
measured it) and puts it between the markers, so a table cannot drift from its source.
`tests/test_readme_tables.py` checks that README.md equals this script's output byte for byte.

    python bench/readme_tables.py           # rewrite README.md's tables from the JSON
    python bench/readme_tables.py --check   # exit 1 (and name the tables) if any differs
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCK = re.compile(r"(<!-- table (?P<name>[\w-]+): (?P<source>\S+) \(bench/readme_tables\.py\) "
                   r"-->\n)(?P<body>.*?)(<!-- /table -->)", re.DOTALL)


def row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def source_line(data: dict[str, Any], json_path: str, script: str) -> str:
    """The visible line under a table: which script wrote which file (at which commit, where
    the file records it: bench/provenance.py)."""
    commit = data.get("provenance", {}).get("commit")
    at = f" at commit {commit[:7]}" if commit else ""
    return f"*Generated from `{json_path}`, written by `{script}`{at}.*"


# ---------------------------------------------------------------------------------- tables
def qlora_memory(data: dict[str, Any]) -> list[str]:
    """bench/qlora_memory.py: weight bytes and error per storage format, and the model effect."""
    labels = {"fp32": "fp32", "bf16": "bf16", "nf4": "NF4, block 64",
              "nf4_dq": "NF4 + double quantization"}
    lines = [row("base weights", "MB", "bits / weight", "vs bf16", "‖w − ŵ‖ / ‖w‖",
                 "perplexity", "KL to fp32 per token"),
             row(*["---"] * 7)]
    for key, label in labels.items():
        w, effect = data["weights"][key], data["model_effect"][key]
        bits = w["bits_per_weight"]
        ratio = w["bf16_over_this"]
        lines.append(row(
            label, f"{w['bytes'] / 1e6:.1f}",
            f"{bits:.0f}" if bits == int(bits) else f"{bits:.2f}",
            f"**{ratio:.2f}× smaller**" if ratio > 1 else f"{ratio:g}×",
            f"{w['rel_err']:.2g}", f"{effect['ppl']:.2f}",
            f"{effect['mean_kl']:.2g}" if "mean_kl" in effect else "—"))
    return lines


def launch_modes(data: dict[str, Any]) -> list[str]:
    """bench/launch_modes.py: the real recipe under 1 process, DDP, FSDP2, DeepSpeed ZeRO-2."""
    names = {"1 process": "1 process", "DDP": "DDP, 2 processes",
             "FSDP2": "FSDP2, 2 processes", "DeepSpeed ZeRO-2": "DeepSpeed ZeRO-2, 2 processes"}
    lines = [row("launch", "finetune s", "× DDP", "distill s", "× DDP", "teacher acc",
                 "student acc", "student max \\|Δw\\| vs DDP"),
             row("---", *["---:"] * 7)]
    for key, label in names.items():
        r = data["results"][key]
        diff = r["student_max_abs_diff_vs_ddp"]
        lines.append(row(
            label, f"{r['finetune_seconds']:.1f}", f"{r['finetune_time_vs_ddp']:.2f}",
            f"{r['distill_seconds']:.1f}", f"{r['distill_time_vs_ddp']:.2f}",
            f"{r['teacher_accuracy']:.4f}", f"{r['student_accuracy']:.4f}",
            "0" if diff == 0 else f"{diff:.1e}".replace("e-0", "e-")))
    return lines


def bf16_speed(data: dict[str, Any]) -> list[str]:
    """bench/bf16_speed.py: fp32 vs bf16 autocast, one row per kind of CPU it has run on."""
    lines = [row("CPU (PyTorch's kernels), threads", "matmul fp32", "bf16", "bf16 / fp32",
                 "MiniLM-L6 step fp32", "bf16", "bf16 / fp32", "`bf16: auto` chooses",
                 "commit"),
             row("---", *["---:"] * 6, "---", "---")]
    for m in data["machines"]:
        machine, fp32, bf16 = m["provenance"], m["fp32"], m["bf16"]
        units = machine.get("cpu_bf16") or ["no bf16 units"]
        lines.append(row(
            f"{machine['cpu']} ({', '.join([machine['cpu_capability'], *units])}), "
            f"{m['threads']}",
            f"{fp32['matmul_ms']:.2f} ms", f"{bf16['matmul_ms']:.2f} ms",
            f"{m['matmul_bf16_over_fp32']:.2f}×", f"{fp32['train_step_s']:.2f} s",
            f"{bf16['train_step_s']:.2f} s", f"{m['step_bf16_over_fp32']:.2f}×",
            "bf16" if m["auto_chooses_bf16"] else "fp32", machine["commit"][:7]))
    batch, length = data["machines"][0]["batch"]
    return lines + ["", f"Matmul: one [128×512]·[512×512] product; step: one training step "
                        f"(forward, backward, AdamW) of the MiniLM-L6 classifier on "
                        f"{batch} × {length} tokens; best of a few repeats."]


def layer_ranges(layers: list[int]) -> str:
    """[2, 3, 5, 7, 8, 9] -> "2-3, 5, 7-9"; "—" for none."""
    parts: list[str] = []
    for i in layers:
        if parts and parts[-1][1] == i - 1:
            parts[-1][1] = i
        else:
            parts.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in parts) or "—"


def large(x: float) -> str:
    """A perplexity or ratio that can reach 10⁸: plain below 10⁶, else "4.4 × 10⁸"."""
    if x < 1e6:
        return f"{x:,.1f}" if x < 1e4 else f"{x:,.0f}"
    exponent = len(str(int(x))) - 1
    superscript = str(exponent).translate(str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹"))
    return f"{x / 10 ** exponent:.1f} × 10{superscript}"


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


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(round(seconds % 60)):02d} s"


def test_suite(data: dict[str, Any]) -> list[str]:
    """bench/test_suite.py: the suite in a fresh clone and venv, locked and newest versions."""
    labels = {"lock": "`make test` (requirements.lock)",
              "ci": "`CI=true make test`: every test (requirements.lock)",
              "latest": "`make test-latest` (newest allowed)"}
    lines = [row("run", "torch", "transformers", "accelerate", "datasets", "peft", "passed",
                 "skipped", "xfailed", "set-up", "tests", "CPU", "commit"),
             row("---", "---", "---", "---", "---", "---", *["---:"] * 5, "---", "---")]
    for key, label in labels.items():
        if key not in data:
            continue
        r, v, c = data[key], data[key]["versions"], data[key]["counts"]
        lines.append(row(label, v["torch"], v["transformers"], v["accelerate"], v["datasets"],
                         v["peft"], f"{c.get('passed', 0):,}", c.get("skipped", 0),
                         c.get("xfailed", 0),
                         minutes(r["setup_seconds"]) if r["setup_seconds"] else "(in tests)",
                         minutes(r["test_seconds"]), cpu(r["provenance"]),
                         r["provenance"]["commit"][:7]))
    return lines


def cpu(machine: dict[str, Any]) -> str:
    """"AMD EPYC (AVX512, avx512_bf16)": the CPU and the units that decide its speed."""
    units = [machine.get("cpu_capability"), *(machine.get("cpu_bf16") or [])]
    return f"{machine['cpu']} ({', '.join(u for u in units if u)})"


def millions(n: float) -> str:
    return f"{n / 1e6:.2f} M"


def ms(x: float) -> str:
    """Latency: one decimal below 100 ms, whole milliseconds above."""
    return f"{x:.1f} ms" if x < 100 else f"{x:.0f} ms"


def percent(x: float) -> str:
    """A retention: "100 %" for exactly 1, else one decimal."""
    return "100 %" if x == 1 else f"{100 * x:.1f} %"


def stage(data: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(s for s in data["stages"] if s["kind"] == kind)


def main_results(data: dict[str, Any]) -> list[str]:
    """bench/attach_adapters.py, stages 0-1 (recipes/minilm-rotten-tomatoes.yaml): the tuned
    teacher and the KD student on the sentiment test split."""
    teacher, student = stage(data, "finetune"), stage(data, "distill")
    loss = student["settings"]["loss"]
    lines = [row("model", "layers", "params", "non-emb params", "size", "test accuracy",
                 "macro-F1", "latency b1", "latency b32", "retention"),
             row("---", *["---:"] * 9)]
    labels = {
        f"teacher: `{data['teacher_model']}` tuned ({teacher['settings']['epochs']:g} epochs)":
            teacher,
        f"student: layers {student['metrics']['layers']}, KD α={loss['alpha']:g} "
        f"T={loss['temperature']:g} ({student['settings']['epochs']:g} epochs)": student}
    for label, s in labels.items():
        m = s["model"]
        lines.append(row(label, s["num_hidden_layers"], millions(m["params"]),
                         millions(m["params_non_embedding"]), f"{m['size_mb']:.1f} MB",
                         f"{m['metric']['value']:.4f}", f"{m['f1_macro']:.4f}",
                         ms(m["latency_ms"]["batch1"]), ms(m["latency_ms"]["batch32"]),
                         percent(m["retention"])))
    precision = {True: "bf16 autocast", False: "fp32"}
    trained = ", ".join(f"{s['kind']} {precision[s['metrics']['bf16']]} "
                        f"({s['metrics']['steps']} steps, {s['metrics']['train_seconds']:.0f} s)"
                        for s in (teacher, student))
    return lines + ["", f"Trained: {trained}; `bf16: auto` chose on this machine, "
                        f"{cpu(data['provenance'])}."]


def adapters(data: dict[str, Any]) -> list[str]:
    """bench/attach_adapters.py, the adapt stages: every PEFT method on the KD student."""
    stages = [s for s in data["stages"] if s["kind"] == "adapt"]
    full = next(s for s in stages if s["model"]["method"] == "full")["model"]["metric"]["value"]
    lines = [row("method", "trainable params", "% of the model", "test accuracy",
                 "vs full fine-tune", "s / step", "adapter size"),
             row("---", *["---:"] * 6)]
    for s in stages:
        m = s["model"]
        lines.append(row(f"`{m['method']}`", f"{m['trainable_params']:,}",
                         f"{m['trainable_percent']:.2f} %", f"{m['metric']['value']:.4f}",
                         percent(m["metric"]["value"] / full) if m["method"] != "full"
                         else "100.0 %", f"{m['seconds_per_step']:.3f}",
                         f"{m['size_mb']:.2f} MB"))
    first = stages[0]
    data_settings = first["settings"]["data"]
    precision = sorted({"bf16 autocast" if s["metrics"]["bf16"] else "fp32" for s in stages})
    wall = data.get("wall_seconds")
    return lines + ["", f"Data: `{data_settings['dataset']}`, {data_settings['max_length']} "
                        f"tokens; each method {first['settings']['epochs']:g} epochs "
                        f"({first['metrics']['steps']} steps of "
                        f"{first['settings']['batch_size']}), {' and '.join(precision)}"
                        + (f"; the whole recipe took {wall / 60:.0f} min" if wall else "")
                        + "."]


def kd_vs_hard_labels(data: dict[str, Any]) -> list[str]:
    """bench/kd_vs_hard_labels.py: soft-label KD vs hard labels alone, several seeds."""
    runs = data["runs"]
    best = max(s["mean_accuracy"] for s in data["summary"])
    lines = [row("student loss", "test accuracy per seed", "mean ± sd", "retention"),
             row("---", "---", "---:", "---:")]
    for s in data["summary"]:
        alpha = s["alpha"]
        temperature = next(r["temperature"] for r in runs if r["alpha"] == alpha)
        label = ("hard labels only (α = 1)" if alpha == 1 else
                 f"KD: {alpha:g}·CE + {1 - alpha:g}·T²·KL, T = {temperature:g}")
        bold = "**" if s["mean_accuracy"] == best else ""
        lines.append(row(label, ", ".join(f"{a:.4f}" for a in s["per_seed"]),
                         f"{bold}{s['mean_accuracy']:.4f} ± {s['sd']:.4f}{bold}",
                         f"{bold}{percent(s['mean_retention'])}{bold}"))
    kd = [r["student_accuracy"] for r in runs if r["alpha"] != 1]
    hard = [r["student_accuracy"] for r in runs if r["alpha"] == 1]
    teacher = runs[0]["teacher_accuracy"]
    lines += ["", f"Teacher {teacher:.4f}; students: layers {runs[0]['student_layers']}, "
                  f"{runs[0]['epochs']:g} epochs, seeds "
                  f"{', '.join(str(r['seed']) for r in runs if r['alpha'] == 1)}."]
    if kd and hard:
        means = {s["alpha"]: s["mean_accuracy"] for s in data["summary"]}
        gap = 100 * (means[min(means)] - means[1.0])
        wins = sum(k > h for k in kd for h in hard)
        lines[-1] += (f" KD minus hard labels: {gap:+.2f} points on average; KD is ahead in "
                      f"{wins} of {len(kd) * len(hard)} seed pairs.")
    return lines


def progressive_steps(data: dict[str, Any]) -> list[str]:
    """bench/progressive_vs_oneshot.py, part 1: every step of the progressive recipe."""
    teacher, config = data["teacher"], data["teacher_config"]
    n = config["num_hidden_layers"]
    lines = [row("step", f"layers kept (of the teacher's 0-{n - 1})", "params",
                 "non-emb params", "size", "test accuracy", "retention", "latency b1",
                 "latency b32"),
             row("---", "---", *["---:"] * 7)]

    def cells(m: dict[str, Any]) -> list[str]:
        return [millions(m["params"]), millions(m["params_non_embedding"]),
                f"{m['size_mb']:.1f} MB", f"{m['metric']['value']:.4f}", percent(m["retention"]),
                ms(m["latency_ms"]["batch1"]), ms(m["latency_ms"]["batch32"])]

    lines.append(row("teacher", f"0-{n - 1}", *cells(teacher)))
    layers, hidden, heads = n, config["hidden_size"], config["num_attention_heads"]
    for step in data["steps"]:
        target, parts = step["target"], []
        if "layers" in target:
            parts.append(f"{layers} → {target['layers']} layers")
        if "hidden" in target:
            parts.append(f"hidden {hidden} → {target['hidden']}")
        if "heads" in target:
            parts.append(f"{heads} → {target['heads']} heads")
        layers, hidden = step["layers"], step["hidden_size"]
        heads = target.get("heads", heads)
        lines.append(row(", ".join(parts), ", ".join(map(str, step["kept_layers"])),
                         *cells(step["model"])))
    heal = "; ".join(f"{s['validation_before_heal']:.3f} → {s['validation_after_heal']:.3f}"
                     for s in data["steps"])
    return lines + ["", f"Validation accuracy right after each cut → after its heal epoch: "
                        f"{heal}."]


def progressive_vs_oneshot(data: dict[str, Any]) -> list[str]:
    """bench/progressive_vs_oneshot.py, part 2: progressive vs one cut, same training steps."""
    lines = [row("student", "params", "KD epochs", "path", "layers kept", "test accuracy",
                 "retention", "macro-F1", "validation accuracy"),
             row("---", "---:", "---:", "---", "---", "---:", "---:", "---:", "---:")]
    for r in data["oneshot"]:
        kept = {"progressive": next(s["kept_layers"] for s in data["steps"]
                                    if s["layers"] == len(r["oneshot_kept_layers"])),
                "one shot": r["oneshot_kept_layers"]}
        for path, key in (("progressive", "progressive"), ("one shot", "oneshot")):
            lines.append(row(
                r["shape"] if path == "progressive" else "", millions(r["params"])
                if path == "progressive" else "", r["epochs"] if path == "progressive" else "",
                path, ", ".join(map(str, kept[path])), f"{r[key + '_accuracy']:.4f}",
                percent(r[key + "_retention"]), f"{r[key + '_f1_macro']:.4f}",
                f"{r[key + '_validation']:.4f}"))

    def gaps(metric: str) -> str:
        return ", ".join(f"{100 * (r[f'progressive_{metric}'] - r[f'oneshot_{metric}']):+.1f}"
                         for r in data["oneshot"])
    return lines + ["", f"Progressive minus one shot, in points: test accuracy {gaps('accuracy')}; "
                        f"validation accuracy {gaps('validation')} (rows in order)."]


# table name -> (JSON file under the repository root, the script that writes it, renderer)
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


def lm_teacher_cache(data: dict[str, Any]) -> list[str]:
    """bench/lm_teacher_cache.py: a SmolLM2 heal epoch with and without the top-k cache."""
    label = {"live": "no cache: the teacher runs every batch",
             "cold": "cache empty: filled first, then used",
             "warm": "cache complete: the teacher is never loaded"}
    lines = [row(f"heal epoch, SmolLM2 30 → {data['student_layers']} layers, "
                 f"{data['blocks']} × {data['block_tokens']} tokens, batch {data['batch']}, "
                 f"top-{data['k']} KD, {data['precision']}", "s / step", "loop vs no cache",
                 "filling the cache", "teacher loaded", "peak memory (RSS)"),
             row("---", "---:", "---:", "---:", "---", "---:")]
    live = data["modes"][0]
    for m in data["modes"]:
        lines.append(row(label[m["mode"]], f"{m['seconds_per_step']:.2f}",
                         f"{live['train_seconds'] / m['train_seconds']:.2f}×",
                         f"{m['cache_seconds']:.1f} s" if m["mode"] == "cold" else "—",
                         "yes" if m["teacher_loaded"] else "no",
                         f"{m['peak_rss_mib']:,.0f} MiB"))
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
    lines += ["", f"Healing data: {data['heal_steps'] * data['batch'] - data['teacher_samples']}"
              f" blocks of {' + '.join(data['healing_data'])} and {data['teacher_samples']} "
              f"blocks sampled from the teacher (`no_samples`: "
              f"{data['heal_steps'] * data['batch']} corpus blocks); "
              f"{data['eval_blocks']} held-out blocks per corpus; {data['seeds']} seed."]
    return lines


def smollm2_recipe(data: dict[str, Any]) -> list[str]:
    """bench/smollm2_recipe.py: the shipped SmolLM2 recipe run as a new user runs it."""
    lines = [row("model (recipes/smollm2-shakespeare.yaml)", "held-out mixture ppl",
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


TABLES: dict[str, tuple[str, str, Callable[[dict[str, Any]], list[str]]]] = {
    "qlora_memory": ("bench/results/qlora_memory.json", "bench/qlora_memory.py", qlora_memory),
    "launch_modes": ("bench/results/launch_modes.json", "bench/launch_modes.py", launch_modes),
    "bf16_speed": ("bench/results/bf16_speed.json", "bench/bf16_speed.py", bf16_speed),
    "test_suite": ("bench/results/test_suite.json", "bench/test_suite.py", test_suite),
    "smollm_depth_selection": ("bench/results/smollm_depth_selection.json",
                               "bench/smollm_depth_selection.py", smollm_depth_selection),
    "main_results": ("bench/results/attach_adapters.json", "bench/attach_adapters.py",
                     main_results),
    "adapters": ("bench/results/attach_adapters.json", "bench/attach_adapters.py", adapters),
    "kd_vs_hard_labels": ("bench/results/kd_vs_hard_labels.json", "bench/kd_vs_hard_labels.py",
                          kd_vs_hard_labels),
    "progressive_steps": ("bench/results/progressive_vs_oneshot.json",
                          "bench/progressive_vs_oneshot.py", progressive_steps),
    "progressive_vs_oneshot": ("bench/results/progressive_vs_oneshot.json",
                               "bench/progressive_vs_oneshot.py", progressive_vs_oneshot),
    "token_loss_memory": ("bench/results/token_loss_memory.json",
                          "bench/token_loss_memory.py", token_loss_memory),
    "lm_teacher_cache": ("bench/results/lm_teacher_cache.json", "bench/lm_teacher_cache.py",
                         lm_teacher_cache),
    "smollm_heal": ("bench/results/smollm_heal.json", "bench/smollm_heal.py", smollm_heal),
    "smollm2_recipe": ("bench/results/smollm2_recipe.json", "bench/smollm2_recipe.py",
                       smollm2_recipe),
}


# ---------------------------------------------------------------------------------- README
def render(name: str, root: Path = ROOT) -> str:
    """The body of table `name`: the markdown table, a blank line, its source line."""
    json_path, script, renderer = TABLES[name]
    data = json.loads((root / json_path).read_text(encoding="utf-8"))
    return "\n".join(renderer(data) + ["", source_line(data, json_path, script)]) + "\n"


def regenerate(text: str, root: Path = ROOT) -> tuple[str, list[str]]:
    """README text with every marked table rendered afresh, and the names of those that
    changed. A marker naming an unknown table, or a JSON file other than the table's, is an
    error; so is a known table missing from the README."""
    changed: list[str] = []
    seen: set[str] = set()

    def replace(match: re.Match) -> str:
        name, source = match["name"], match["source"]
        if name not in TABLES:
            raise SystemExit(f"README.md: unknown table {name!r}; known: {', '.join(TABLES)}")
        if source != TABLES[name][0]:
            raise SystemExit(f"README.md: table {name} names {source}, but it is generated "
                             f"from {TABLES[name][0]}")
        seen.add(name)
        body = render(name, root)
        if body != match["body"]:
            changed.append(name)
        return match.group(1) + body + match.group(5)

    new = BLOCK.sub(replace, text)
    missing = sorted(set(TABLES) - seen)
    if missing:
        raise SystemExit(f"README.md: no marked block for table(s) {', '.join(missing)}")
    return new, changed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if a table differs from its JSON")
    args = parser.parse_args()
    text = README.read_text(encoding="utf-8")
    new, changed = regenerate(text)
    if args.check:
        if changed:
            print(f"README.md tables out of date: {', '.join(changed)} "
                  f"(run python bench/readme_tables.py)", file=sys.stderr)
            return 1
        return 0
    if new != text:
        README.write_text(new, encoding="utf-8")
    print(f"README.md: {len(TABLES)} tables, rewritten: {', '.join(changed) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
