"""Where a benchmark's numbers come from: recorded in every JSON file under bench/results/.

The commit (and whether the tree had uncommitted changes), the date, the versions of the
stack and the machine, so that a number in the README can be traced to the code and the
hardware that produced it (machines of one kind differ: compare ratios measured in one run).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PACKAGES = ("torch", "transformers", "accelerate", "datasets", "peft")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                             timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _bf16_units() -> list[str]:
    """The CPU's bf16 instruction sets (Linux flags), which decide whether bf16 pays here."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted({"avx512_bf16", "amx_bf16", "amx_tile"} & set(line.split()))
    except OSError:
        pass
    return []


def provenance() -> dict[str, Any]:
    """{"commit", "dirty", "date", "python", "packages", "cpu", "cpus", "torch_threads",
    "cpu_capability", "cpu_bf16"}."""
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    # Dirty = uncommitted changes to what ran: results and prose do not change a measurement.
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".",
                  ":(exclude)bench/results", ":(exclude)*.md")
    return {"commit": _git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None
            else None, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"), "python": platform.python_version(),
            "packages": versions, "cpu": _cpu(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_bf16": _bf16_units()}


def write_result(path: Path, data: dict[str, Any]) -> Path:
    """Write `data` plus its provenance as indented JSON (ending in a newline)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**data, "provenance": provenance()}, indent=2) + "\n",
                    encoding="utf-8")
    return path
