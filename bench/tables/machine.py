"""Tables about the machine and the toolkit's plumbing: storage formats, launch modes,
bf16 speed, the test suite."""

from __future__ import annotations

from typing import Any

from tables.format import cpu, minutes, row


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


def bench_summary(data: dict[str, Any]) -> list[str]:
    """bench/suite.py (`make bench`): each figure, its target and whether it is met."""
    lines = [row("figure", "value", "target", "met", "what it measures"),
             row("---", "---:", "---", "---", "---")]
    for name, f in data["figures"].items():
        value = "not measured yet" if f["value"] is None else f"{f['value']:.3f}"
        met = {True: "yes", False: "**no**", None: "—"}[f["met"]]
        source = f" (`{f['source'].removeprefix('bench/results/')}`)"
        lines.append(row(f"`{name}`", value, f["target"] or "—", met, f["meaning"] + source))
    machines = sorted({f["machine"] for f in data["figures"].values() if "machine" in f})
    lines += ["", f"Measured on {'; '.join(machines)}; each figure is a ratio of two "
                  "things run side by side in one run of its script."]
    seconds = data.get("seconds") or {}
    if seconds:  # each script's time in the suite run that last ran it
        times = ", ".join(f"`{script}.py` {minutes(t)}" for script, t in seconds.items())
        lines += ["", f"Run times (`suite.py`, the run that last measured each script): "
                      f"{times}; {minutes(sum(seconds.values()))} in all."]
    return lines


def compile_step(data: dict[str, Any]) -> list[str]:
    """bench/compile_step.py: a training step eager against `torch.compile`d."""
    names = {"minilm-l6-student": "MiniLM-L6 → 3 layers, batch 32 × ≤ 64 tokens",
             "smollm2-20l-lora": "SmolLM2 → 20 layers, LoRA r 16, batch 4 × 128 tokens"}
    lines = [row("training step", "precision", "eager", "compiled", "compiled / eager",
                 "first steps: eager / compiling", "break-even"),
             row("---", "---", "---:", "---:", "---:", "---:", "---:")]
    for r in data["runs"]:
        even = r["break_even_steps"]
        lines.append(row(names.get(r["model"], r["model"]), r["precision"],
                         f"{r['step_seconds']['eager'] * 1e3:.0f} ms",
                         f"{r['step_seconds']['compiled'] * 1e3:.0f} ms",
                         f"{r['step_ratio']:.2f}×",
                         f"{r['warmup_seconds']['eager']:.0f} s / "
                         f"{r['warmup_seconds']['compiled']:.0f} s",
                         f"{even:,} steps" if even is not None else "never"))
    first = data["runs"][0]
    return lines + ["", f"PyTorch {data['torch']}, each row in a fresh process with an empty "
                        f"inductor cache; {first['warmup_steps']} warm-up steps, then "
                        f"{first['rounds']} alternating rounds; on {cpu(data['provenance'])}."]


def input_pipeline(data: dict[str, Any]) -> list[str]:
    """bench/input_pipeline.py: padding left for packing, and the loader's share of a step."""
    lines = [row("recipe", "stage", "data", "examples", "batch",
                 "real tokens / positions: length-grouped (default)", "random batches"),
             row("---", "---", "---", "---:", "---:", "---:", "---:")]
    for r in data["padding"]:
        dataset = r["dataset"] if isinstance(r["dataset"], str) else " + ".join(r["dataset"])
        lines.append(row(f"`{r['recipe']}`", r["stage"], f"`{dataset}`", r["examples"],
                         r["batch_size"], ", ".join(f"{x:.1%}" for x in r["grouped"]),
                         ", ".join(f"{x:.1%}" for x in r["random"])))
    load = data["loading"]
    return lines + ["", f"Seeds 0, 1, 2; packing could save at most "
                        f"{data['max_packing_saving']:.1%} of a step's positions. Loading a "
                        f"batch of the default recipe's training loader: "
                        f"{load['loader_seconds_per_batch'] * 1e3:.2f} ms against "
                        f"{load['step_seconds'] * 1e3:.0f} ms for the cheapest step on it "
                        f"({load['loader_share']:.2%} of the two); on "
                        f"{cpu(data['provenance'])}."]
