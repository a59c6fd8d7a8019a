"""YAML text -> plain data -> dataclasses, with every problem collected (used by
`distill.config.recipe`).

`load_yaml` reads the YAML a user wrote with a strict safe loader: no tags, no duplicate keys,
no recursive aliases, bounded nesting and size.

The dataclasses are the schema: field types (int, float, bool, str, Literal, `X | None`,
`X | Y` (the first that fits), `list[X]`, nested dataclasses), defaults, and field metadata
for numeric ranges (`value_range`, `seed_range`) and lists of tagged records
(`{"kinds": {"finetune": FinetuneStage, ...}}`). Every float must be finite (NaN and ±inf are
refused whatever the range). A dataclass may define `check(path) -> list[str]` for rules that
span several fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import types
import typing
from typing import Any, Literal, Union

import yaml

from distill.errors import DistillError

# numpy's legacy seeding (np.random.seed, which accelerate's set_seed calls) takes 0 <= seed <
# 2**32; torch takes more, so 2**32 is the range every seed of a run can go to.
SEED_LIMIT = 2**32
# Nesting levels (mappings and lists) a YAML document may have. Recipes need about 8; the cap
# keeps the composer's and the validator's recursion far from Python's limit.
MAX_YAML_DEPTH = 32
# Values (scalars, lists, mappings) a document may expand to once aliases are followed: a few
# aliases of aliases ("billion laughs") otherwise expand to billions of values to validate.
MAX_YAML_VALUES = 100_000


def value_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                hi_open: bool = False) -> dict[str, Any]:
    """Field metadata: the allowed numeric range (checked by the loader)."""
    return {"range": (lo, hi, lo_open, hi_open)}


def seed_range() -> dict[str, Any]:
    """Field metadata of a random seed: 0 <= seed < 2**32 (what numpy and torch accept)."""
    return value_range(0, SEED_LIMIT, hi_open=True)


def check_seed(seed: Any, key: str) -> None:
    """For callers that bypass the recipe loader: raise `DistillError` unless 0 <= seed < 2**32.

    numpy's own error for a negative seed names no key, and bools are no seeds.
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) \
            or not 0 <= seed < SEED_LIMIT:
        raise DistillError(f"{key}: {seed!r} is out of range; allowed: an integer >= 0 and "
                           f"< {_number(SEED_LIMIT)}")


def _number(x: float) -> str:
    # 4294967296 means little to a reader; 2**32 says why it is the limit.
    if isinstance(x, int) and x >= 2**16 and x & (x - 1) == 0:
        return f"2**{x.bit_length() - 1}"
    return f"{x}"


def describe_range(rng: tuple[float | None, float | None, bool, bool] | None) -> str:
    """`(0, 1, False, True)` -> `>= 0 and < 1`; empty for no range."""
    if rng is None:
        return ""
    lo, hi, lo_open, hi_open = rng
    lo_s = "" if lo is None else f"{'>' if lo_open else '>='} {_number(lo)}"
    hi_s = "" if hi is None else f"{'<' if hi_open else '<='} {_number(hi)}"
    return " and ".join(s for s in (lo_s, hi_s) if s)


# ----------------------------------------------------------------------------- YAML
class YAMLInputError(yaml.MarkedYAMLError):
    """YAML that parses but that a recipe may not use (duplicate keys, tags, recursive aliases,
    too deep or too large); `problem` says what, `problem_mark` where."""


def _show_tag(tag: str) -> str:
    prefix = "tag:yaml.org,2002:"
    return "!!" + tag[len(prefix):] if tag.startswith(prefix) else tag


class StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that also refuses what a hand-written recipe never needs.

    - explicit tags (`!!python/...`, `!!binary`, `!!str`, `!foo`): a recipe is plain data;
    - a key repeated in one mapping (PyYAML keeps the last silently, so an edit to the first
      would do nothing); keys merged in with `<<: *anchor` may still be overridden;
    - an alias inside the value it refers to (`a: &x [*x]`): a cycle no recipe can mean;
    - nesting deeper than `MAX_YAML_DEPTH` or, through aliases, more than `MAX_YAML_VALUES`
      values: the validator walks every value, so both bound its time and recursion.

    Plain anchors and aliases stay allowed: the shipped recipes share stage settings with
    `<<: *adapt`.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0  # collections open around the node being composed
        self._open_anchors: set[str] = set()  # anchors of those collections
        # id(node) -> (values it expands to, nesting levels in it), aliases followed.
        self._shape: dict[int, tuple[int, int]] = {}

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open_anchors:
                raise YAMLInputError(None, None, f"recursive alias *{event.anchor}: it is used "
                                     f"inside the value it refers to (&{event.anchor})",
                                     event.start_mark)
            node = super().compose_node(parent, index)
            via = f" through the alias *{event.anchor}"
        else:
            if event.tag is not None:
                raise YAMLInputError(None, None, "YAML tags are not allowed (a recipe is plain "
                                     f"data): found {_show_tag(event.tag)}", event.start_mark)
            collection = isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent))
            if collection:
                if self._depth >= MAX_YAML_DEPTH:
                    raise YAMLInputError(None, None, "nested more than "
                                         f"{MAX_YAML_DEPTH} levels deep; a recipe needs far "
                                         "fewer", event.start_mark)
                self._depth += 1
                if event.anchor is not None:
                    self._open_anchors.add(event.anchor)
            try:
                node = super().compose_node(parent, index)
            finally:
                if collection:
                    self._depth -= 1
                    self._open_anchors.discard(event.anchor)
            self._shape[id(node)] = self._measure(node)
            via = ""
        size, height = self._shape[id(node)]
        if self._depth + height > MAX_YAML_DEPTH:  # only an alias can get here
            raise YAMLInputError(None, None, f"nested more than {MAX_YAML_DEPTH} levels "
                                 f"deep{via}; a recipe needs far fewer", event.start_mark)
        if size > MAX_YAML_VALUES:
            raise YAMLInputError(None, None, f"holds more than {MAX_YAML_VALUES:,} values{via} "
                                 "(an alias counts its whole value each time); a recipe needs "
                                 "far fewer", event.start_mark)
        return node

    def _measure(self, node: yaml.Node) -> tuple[int, int]:
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            return 1, 0
        shapes = [self._shape[id(c)] for c in children]
        return 1 + sum(s for s, _ in shapes), 1 + max((h for _, h in shapes), default=0)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                # `<<` merges and `=` value keys are YAML syntax, not keys of this mapping.
                if key_node.tag in ("tag:yaml.org,2002:merge", "tag:yaml.org,2002:value"):
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: SafeConstructor reports it
                    continue
                if first is not None:
                    raise YAMLInputError(None, None, f"duplicate key {key!r} (first at line "
                                         f"{first.start_mark.line + 1}); a key may appear once "
                                         "in a mapping", key_node.start_mark)
                seen[key] = key_node
        return super().construct_mapping(node, deep=deep)

    def construct_strict_int(self, node: yaml.ScalarNode) -> int:
        try:
            return self.construct_yaml_int(node)
        except ValueError:  # Python refuses to convert integers of more than 4,300 digits
            raise YAMLInputError(None, None, f"the integer has {len(node.value):,} digits; "
                                 "far more than any setting takes", node.start_mark) from None


StrictLoader.add_constructor("tag:yaml.org,2002:int", StrictLoader.construct_strict_int)
# `name: 2024-05-01` means the text; YAML 1.1 would make it a date (and `2024-13-45` a crash).
StrictLoader.add_constructor("tag:yaml.org,2002:timestamp", StrictLoader.construct_yaml_str)


def load_yaml(text: str) -> Any:
    """One YAML document as plain data, read with `StrictLoader`.

    Raises:
        yaml.YAMLError: bad syntax; `YAMLInputError` for what `StrictLoader` refuses.
    """
    loader = StrictLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


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
        """Check a converted field (a number, or a list of numbers) against its range.

        Floats must also be finite, range or not: NaN fails no comparison, so a range alone
        would let `.nan` through, and `.inf` passes every lower bound.
        """
        if value is None:
            return
        rng = f.metadata.get("range")
        values = value if isinstance(value, list) else [value]
        allowed = describe_range(rng)
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                self.fail(path, f"{v!r} is not a finite number; allowed: a finite number"
                          + (f" {allowed}" if allowed else ""))
                return
            if rng is None or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            lo, hi, lo_open, hi_open = rng
            bad = (lo is not None and (v <= lo if lo_open else v < lo)) or (
                hi is not None and (v >= hi if hi_open else v > hi))
            if bad:
                self.fail(path, f"{v!r} is out of range; allowed: {allowed}")
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
