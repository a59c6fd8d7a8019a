"""Tables of the encoder recipes (MiniLM on Rotten Tomatoes): the student, adapters, KD vs
hard labels, progressive vs one-shot shrinking."""

from __future__ import annotations

from typing import Any

from tables.format import cpu, millions, ms, percent, row


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


def serving(data: dict[str, Any]) -> list[str]:
    """bench/serving.py: the tuned teacher served in float32 PyTorch against the serving
    recipe's student, float32 and exported (trimmed vocabulary, ONNX Runtime int8)."""
    models = data["models"]
    teacher = next(iter(models.values()))
    lines = [row("model, as served", "test accuracy", "vs teacher", "ms / batch of 32",
                 "speed-up"),
             row("---", *["---:"] * 4)]
    for name, m in models.items():
        lines.append(row(
            name, f"{m['accuracy']:.4f}", f"{m['accuracy'] - teacher['accuracy']:+.4f}",
            f"{m['ms_per_batch']:.1f}",
            f"{min(teacher['pass_seconds']) / min(m['pass_seconds']):.2f}×"))
    vocab = data["student"]["vocabulary"]
    lines += ["", f"Vocabulary kept: {vocab['kept_tokens']:,} of {vocab['of']:,} tokens "
                  f"({vocab['params_before'] / 1e6:.1f} M → {vocab['params_after'] / 1e6:.1f} M "
                  f"parameters); {data['examples']:,} test examples, batch {data['batch']}, "
                  f"≤ {data['max_length']} tokens, {data['threads']} threads, fastest of "
                  f"{len(teacher['pass_seconds'])} alternating passes, each in a fresh process "
                  f"(the served student's median pass: "
                  f"{data['served_speedup_median']:.2f}× the teacher's median); "
                  f"{cpu(data['provenance'])}."]
    return lines


def textbrewer_job(data: dict[str, Any]) -> list[str]:
    """bench/textbrewer_job.py: the default distill job against TextBrewer's GeneralDistiller
    and a bare bf16-autocast loop: seconds and test accuracy per seed."""
    runs, setup = data["runs"], data["setup"]
    ours = {r["seed"]: r["seconds"] for r in runs["ours"]}
    labels = {"ours": "`distill` defaults (bf16 auto, teacher cache, length-grouped batches)",
              "textbrewer": f"TextBrewer {setup['textbrewer']} `GeneralDistiller` (fp32)",
              "bare_bf16": "bare PyTorch loop, bf16 autocast"}
    lines = [row("job (3 epochs)", "seconds per seed", "vs ours (same seeds)",
                 "test accuracy per seed", "mean"),
             row("---", "---:", "---:", "---:", "---:")]
    for name, label in labels.items():
        rows = runs[name]
        accuracy = [r["accuracy"] for r in rows if "accuracy" in r]
        lines.append(row(
            label, ", ".join(f"{r['seconds']:.0f}" for r in rows),
            f"{sum(r['seconds'] for r in rows) / sum(ours[r['seed']] for r in rows):.2f}×",
            ", ".join(f"{a:.4f}" for a in accuracy) or "—",
            f"{sum(accuracy) / len(accuracy):.4f}" if accuracy else "—"))
    sd = data["acc_delta_sd"]
    return lines + ["", f"Seeds {', '.join(map(str, setup['seeds']))}: ours − TextBrewer "
                        f"{data['acc_delta']:+.4f} test accuracy on average"
                        + (f" (paired, sd {sd:.4f})" if sd is not None else "")
                        + f"; {setup['train_examples']:,} training examples "
                        f"({setup['steps_per_epoch']} steps of {setup['batch']} an epoch), "
                        f"{setup['test_examples']:,} test examples; {cpu(data['provenance'])}."]
