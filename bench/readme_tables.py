"""The README's results tables, generated from the committed JSON under bench/results/.

Every results table in README.md sits between two markers naming its table and its JSON file:

    <!-- table qlora_memory: bench/results/qlora_memory.json (bench/readme_tables.py) -->
    | ... the table, then a line naming its source ... |
    <!-- /table -->

This script renders each table from its JSON file (written by the benchmark script that
measured it) and puts it between the markers, so a table cannot drift from its source. The
renderers live in `bench/tables/`, one module per family of benches.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tables.encoder import (  # noqa: E402
    adapters,
    kd_vs_hard_labels,
    main_results,
    progressive_steps,
    progressive_vs_oneshot,
    serving,
    textbrewer_job,
)
from tables.format import source_line  # noqa: E402
from tables.language_models import (  # noqa: E402
    lm_recipe,
    lm_teacher_cache,
    smollm_depth_selection,
    smollm_heal,
    teacher_sampling,
    token_loss_memory,
    token_loss_speed,
    topk_cache_precision,
)
from tables.machine import (  # noqa: E402
    bench_summary,
    bf16_speed,
    compile_step,
    input_pipeline,
    launch_modes,
    qlora_memory,
    test_suite,
)

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCK = re.compile(r"(<!-- table (?P<name>[\w-]+): (?P<source>\S+) \(bench/readme_tables\.py\) "
                   r"-->\n)(?P<body>.*?)(<!-- /table -->)", re.DOTALL)

# table name -> (JSON file under the repository root, the script that writes it, renderer)
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
    "token_loss_speed": ("bench/results/token_loss_speed.json", "bench/token_loss_speed.py",
                         token_loss_speed),
    "teacher_sampling": ("bench/results/teacher_sampling.json", "bench/teacher_sampling.py",
                         teacher_sampling),
    "topk_cache_precision": ("bench/results/topk_cache_precision.json",
                             "bench/topk_cache_precision.py", topk_cache_precision),
    "lm_teacher_cache": ("bench/results/lm_teacher_cache.json", "bench/lm_teacher_cache.py",
                         lm_teacher_cache),
    "smollm_heal": ("bench/results/smollm_heal.json", "bench/smollm_heal.py", smollm_heal),
    "smollm_heal_long": ("bench/results/smollm_heal_long.json", "bench/smollm_heal.py",
                         smollm_heal),
    "smollm2_recipe": ("bench/results/smollm2_recipe.json", "bench/smollm2_recipe.py",
                       lm_recipe),
    "gemma3_recipe": ("bench/results/gemma3_recipe.json", "bench/smollm2_recipe.py", lm_recipe),
    "serving": ("bench/results/serving.json", "bench/serving.py", serving),
    "textbrewer_job": ("bench/results/textbrewer_job.json", "bench/textbrewer_job.py",
                       textbrewer_job),
    "bench_summary": ("bench/results/summary.json", "bench/suite.py", bench_summary),
    "compile_step": ("bench/results/compile_step.json", "bench/compile_step.py", compile_step),
    "input_pipeline": ("bench/results/input_pipeline.json", "bench/input_pipeline.py",
                       input_pipeline),
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
