"""Cells and lines shared by the README's results tables."""

from __future__ import annotations

from typing import Any


def row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def source_line(data: dict[str, Any], json_path: str, script: str) -> str:
    """The visible line under a table: which script wrote which file (at which commit, where
    the file records it: bench/provenance.py)."""
    commit = data.get("provenance", {}).get("commit")
    at = f" at commit {commit[:7]}" if commit else ""
    return f"*Generated from `{json_path}`, written by `{script}`{at}.*"


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


def minutes(seconds: float) -> str:
    """"3 min 60 s" never: whole seconds first (239.7 s is 4 min 00 s)."""
    whole = round(seconds)
    return f"{whole // 60} min {whole % 60:02d} s"


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
