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
    """bench/bf16_speed.py: fp32 vs bf16 autocast on the machine that ran it."""
    machine = data["provenance"]
    fp32, bf16 = data["fp32"], data["bf16"]
    batch, length = data["batch"]
    return [
        row(f"{machine['cpu']} ({machine['cpu_capability']}), {data['threads']} threads",
            "fp32", "bf16 autocast", "bf16 / fp32"),
        row("---", "---:", "---:", "---:"),
        row("matmul [128×512]·[512×512]", f"{fp32['matmul_ms']:.2f} ms",
            f"{bf16['matmul_ms']:.2f} ms", f"{data['matmul_bf16_over_fp32']:.2f}×"),
        row(f"MiniLM-L6 training step, {batch} × {length} tokens",
            f"{fp32['train_step_s']:.2f} s", f"{bf16['train_step_s']:.2f} s",
            f"{data['step_bf16_over_fp32']:.2f}×"),
        row("`bf16: auto` chooses", "", "", "bf16" if data["auto_chooses_bf16"] else "fp32"),
    ]


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
                 "skipped", "xfailed", "set-up", "tests", "commit"),
             row("---", "---", "---", "---", "---", "---", *["---:"] * 5, "---")]
    for key, label in labels.items():
        if key not in data:
            continue
        r, v, c = data[key], data[key]["versions"], data[key]["counts"]
        lines.append(row(label, v["torch"], v["transformers"], v["accelerate"], v["datasets"],
                         v["peft"], f"{c.get('passed', 0):,}", c.get("skipped", 0),
                         c.get("xfailed", 0),
                         minutes(r["setup_seconds"]) if r["setup_seconds"] else "(in tests)",
                         minutes(r["test_seconds"]), r["provenance"]["commit"][:7]))
    return lines


# table name -> (JSON file under the repository root, the script that writes it, renderer)
TABLES: dict[str, tuple[str, str, Callable[[dict[str, Any]], list[str]]]] = {
    "qlora_memory": ("bench/results/qlora_memory.json", "bench/qlora_memory.py", qlora_memory),
    "launch_modes": ("bench/results/launch_modes.json", "bench/launch_modes.py", launch_modes),
    "bf16_speed": ("bench/results/bf16_speed.json", "bench/bf16_speed.py", bf16_speed),
    "test_suite": ("bench/results/test_suite.json", "bench/test_suite.py", test_suite),
    "smollm_depth_selection": ("bench/results/smollm_depth_selection.json",
                               "bench/smollm_depth_selection.py", smollm_depth_selection),
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
