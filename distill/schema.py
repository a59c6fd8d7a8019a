"""Plain YAML data -> dataclasses, with every problem collected (used by `distill.recipe`).

The dataclasses are the schema: field types (int, float, bool, str, Literal, `X | None`,
`X | Y` (the first that fits), `list[X]`, nested dataclasses), defaults, and field metadata
for numeric ranges (`value_range`) and lists of tagged records (`{"kinds": {"finetune": FinetuneStage, ...}}`).
A dataclass may define `check(path) -> list[str]` for rules that span several fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union


def value_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False) -> dict[str, Any]:
    """Field metadata: the allowed numeric range (checked by the loader)."""
    return {"range": (lo, hi, lo_open, hi_open)}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


class Converter:
    """Turns plain YAML data into dataclasses, collecting every problem on the way."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def fail(self, path: str, msg: str) -> None:
        self.problems.append(f"{path}: {msg}" if path else msg)

    def convert(self, value: Any, tp: Any, path: str) -> Any:
        origin = typing.get_origin(tp)
        if origin in (Union, types.UnionType):
            args = typing.get_args(tp)
            if value is None and type(None) in args:
                return None
            non_null = [a for a in args if a is not type(None)]
            if len(non_null) == 1:
                return self.convert(value, non_null[0], path)
            for alternative in non_null:  # e.g. `bool | Literal["auto"]`: the first that fits
                trial = Converter()
                converted = trial.convert(value, alternative, path)
                if not trial.problems:
                    return converted
            self.fail(path, f"{value!r} should be {_type_name(tp)}")
            return None
        if origin is Literal:
            allowed = typing.get_args(tp)
            if value not in allowed:
                self.fail(path, f"{value!r} is not allowed; allowed: "
                          + ", ".join(repr(a) for a in allowed))
            return value
        if origin is list:
            if not isinstance(value, list):
                self.fail(path, f"{value!r} should be {_type_name(tp)}")
                return None
            (item_tp,) = typing.get_args(tp)
            return [self.convert(v, item_tp, f"{path}.{i}") for i, v in enumerate(value)]
        if origin is dict:
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                self.fail(path, f"{value!r} should be a mapping of names to values")
                return None
            _, value_tp = typing.get_args(tp)
            return {k: self.convert(v, value_tp, f"{path}.{k}") for k, v in value.items()}
        if dataclasses.is_dataclass(tp):
            return self.dataclass(value, tp, path)
        if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if tp is float and isinstance(value, str):
            # PyYAML (YAML 1.1) reads `2e-5` as a string; accept it as the number it means.
            try:
                return float(value)
            except ValueError:
                pass
        if tp is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if tp in (bool, str) and isinstance(value, tp):
            return value
        if tp is Any:
            return value
        self.fail(path, f"{value!r} should be {_type_name(tp)}")
        return None

    def dataclass(self, value: Any, cls: type, path: str) -> Any:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.fail(path, f"{value!r} should be a mapping of keys to values")
            return None
        start = len(self.problems)
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, raw in value.items():
            key_path = f"{path}.{key}" if path else str(key)
            if key not in fields:
                close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
                hint = f"did you mean `{close[0]}`? " if close else ""
                self.fail(key_path, f"unknown key; {hint}allowed: {', '.join(fields)}")
                continue
            kinds = fields[key].metadata.get("kinds")
            if kinds is not None:  # a list of tagged records, dispatched on `kind`
                kwargs[key] = self.tagged_list(raw, kinds, key_path)
                continue
            before = len(self.problems)
            converted = self.convert(raw, hints[key], key_path)
            if len(self.problems) == before:
                self.check_range(converted, fields[key], key_path)
                kwargs[key] = converted
        obj = cls(**kwargs)
        check = getattr(obj, "check", None)
        # Cross-field rules only run on fields that converted cleanly: a field with an error
        # falls back to its default, and checking that default would report a second,
        # misleading problem.
        if check is not None and len(self.problems) == start:
            self.problems.extend(check(path or "recipe"))
        return obj

    def check_range(self, value: Any, f: dataclasses.Field, path: str) -> None:
        rng = f.metadata.get("range")
        if rng is None or value is None:
            return
        values = value if isinstance(value, list) else [value]
        lo, hi, lo_open, hi_open = rng
        for v in values:
            bad = (lo is not None and (v <= lo if lo_open else v < lo)) or (
                hi is not None and (v >= hi if hi_open else v > hi))
            if bad:
                lo_s = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
                hi_s = "" if hi is None else f"{'<' if hi_open else '<='} {hi}"
                self.fail(path, f"{v!r} is out of range; allowed: "
                          + " and ".join(s for s in (lo_s, hi_s) if s))
                return

    def tagged_list(self, raw: Any, kinds: dict[str, type], path: str) -> list[Any]:
        """A list of mappings whose `kind` picks their dataclass (e.g. recipe stages)."""
        if not isinstance(raw, list):
            self.fail(path, "should be a list of stages, each a mapping with a `kind`")
            return []
        out = []
        for i, st in enumerate(raw):
            st_path = f"{path}.{i}"
            if not isinstance(st, dict) or "kind" not in st:
                self.fail(st_path, "each stage needs a `kind`; allowed: " + ", ".join(kinds))
                continue
            kind = st["kind"]
            if kind not in kinds:
                close = difflib.get_close_matches(str(kind), list(kinds), n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                self.fail(f"{st_path}.kind", f"unknown stage kind {kind!r}; {hint}allowed: "
                          + ", ".join(kinds))
                continue
            out.append(self.dataclass(st, kinds[kind], st_path))
        return out
