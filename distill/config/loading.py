"""Recipe files: YAML in, validated `Recipe` out (and back), with `--set` overrides.

    recipe = load_recipe("recipes/minilm-rotten-tomatoes.yaml", overrides=["stages.1.loss.alpha=1"])

Loading reports *all* problems at once, each naming the dotted key, the bad value and what is
allowed, with a "did you mean" for unknown keys (`distill.config.schema.Converter`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from distill.config.recipe import Recipe
from distill.config.schema import Converter, YAMLInputError, load_yaml
from distill.errors import DistillError, RecipeError
from distill.files import atomic_write


def parse_override(text: str) -> tuple[list[str], Any]:
    """`"stages.1.loss.alpha=0.7"` -> (["stages", "1", "loss", "alpha"], 0.7).

    The value is read as YAML (with the recipe file's strict loader), so `4` is an int,
    `[0, 2]` a list and `null` None; text that is not YAML stays a string.
    """
    if "=" not in text:
        raise RecipeError([f"--set {text!r}: expected KEY=VALUE, e.g. stages.1.loss.alpha=0.7"])
    key, _, raw = text.partition("=")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except YAMLInputError as exc:  # a tag, duplicate key, ...: refused as in a recipe file
        raise RecipeError([f"--set {text}: {exc.problem}"]) from None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _tree_copy(value: Any) -> Any:
    """A copy of plain YAML data in which no mapping or list is shared.

    A YAML alias (`stages: [*s, *s]`) makes two places hold one object; `copy.deepcopy` would
    keep that sharing, and `--set stages.0.epochs=2` would then change stage 1 as well.
    StrictLoader refuses cycles and caps the size, so this recursion ends and stays small.
    """
    if isinstance(value, dict):
        return {k: _tree_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_tree_copy(v) for v in value]
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted `KEY=VALUE` overrides to raw recipe data (a copy is returned)."""
    data = _tree_copy(data)
    problems = []
    for text in overrides:
        keys, value = parse_override(text)
        node: Any = data
        for depth, key in enumerate(keys):
            last = depth == len(keys) - 1
            where = ".".join(keys[: depth + 1])
            if isinstance(node, list):
                if not key.lstrip("-").isdigit() or not -len(node) <= int(key) < len(node):
                    problems.append(f"--set {text}: {where}: no such list index; "
                                    f"the list has {len(node)} items")
                    break
                if last:
                    node[int(key)] = value
                else:
                    node = node[int(key)]
            elif isinstance(node, dict):
                if last:
                    node[key] = value
                else:
                    node = node.setdefault(key, {})
            else:
                problems.append(f"--set {text}: {where}: cannot set a key inside {node!r}")
                break
    if problems:
        raise RecipeError(problems)
    return data


def recipe_from_dict(data: Any, source: str | None = None, command: str | None = None
                     ) -> Recipe:
    """Validate raw recipe data; raise `RecipeError` listing every problem (naming `source`,
    the file, or `command`, the CLI command whose options built the data)."""
    conv = Converter()
    recipe = conv.dataclass(data, Recipe, "")
    if conv.problems:
        raise RecipeError(conv.problems, source, command)
    return recipe


def read_yaml(path: str | Path) -> Any:
    """Read a YAML file the user wrote with `schema.StrictLoader` (no tags, no code, no
    duplicate keys, no recursive aliases, bounded nesting), with a clear error on bad syntax."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"recipe file not found: {path}")
    try:
        return load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise DistillError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save "
                           "it as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        # Tags (`!!python/...`: code), duplicate keys, recursive aliases and the like are
        # `YAMLInputError`s of StrictLoader, whose `problem` says so.
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise DistillError(f"{path}: malformed YAML{where}: {problem}") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load, override and validate a recipe file.

    Args:
        path: the YAML file.
        overrides: dotted `KEY=VALUE` strings, applied before validation.
    """
    data = read_yaml(path)
    if data is None:
        raise RecipeError(["the recipe file is empty; a recipe is a mapping with `name`, "
                           "`teacher`, `data`, `stages`"], str(path))
    if not isinstance(data, dict):
        found = {list: "a list", str: "a string"}.get(type(data), type(data).__name__)
        raise RecipeError([f"the recipe should be a mapping with `name`, `teacher`, `data`, "
                           f"`stages`; found {found}"], str(path))
    data = apply_overrides(data, overrides or [])
    return recipe_from_dict(data, str(path))


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe (defaults filled in) as plain data, ready for YAML."""
    return dataclasses.asdict(recipe)


def dump_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved recipe as YAML (keys in dataclass order), atomically."""
    atomic_write(Path(path), yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
