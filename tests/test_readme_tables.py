"""README.md's results tables are exactly what bench/readme_tables.py renders from the JSON
files under bench/results/ (written by the benchmark scripts), so no table drifts from its
source."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "bench/readme_tables.py")
readme_tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(readme_tables)


def test_readme_tables_are_their_json_byte_for_byte() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    new, changed = readme_tables.regenerate(text)
    assert not changed, f"run python bench/readme_tables.py: {changed} differ from their JSON"
    assert new == text


@pytest.mark.parametrize("name", list(readme_tables.TABLES))
def test_each_table_names_its_json_and_script(name: str) -> None:
    json_path, script, _ = readme_tables.TABLES[name]
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"<!-- table {name}: {json_path} (bench/readme_tables.py) -->" in text
    assert f"*Generated from `{json_path}`, written by `{script}`" in text  # visible
    assert (ROOT / json_path).is_file() and (ROOT / script).is_file()


def test_a_changed_result_changes_its_table(tmp_path: Path) -> None:
    """The check can fail: results moved in a copy of the JSON show up in the README."""
    name = next(iter(readme_tables.TABLES))
    json_path = readme_tables.TABLES[name][0]
    shutil.copytree(ROOT / "bench/results", tmp_path / "bench/results")
    data = json.loads((ROOT / json_path).read_text())

    def bump(node):  # every measured float, moved
        for key, value in (node.items() if isinstance(node, dict) else enumerate(node)):
            if isinstance(value, float):
                node[key] = value * 1.5 + 1
            elif isinstance(value, (dict, list)):
                bump(value)

    bump(data)
    (tmp_path / json_path).write_text(json.dumps(data))
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    _, changed = readme_tables.regenerate(text, root=tmp_path)
    assert changed == [name]


def test_unknown_or_missing_tables_are_errors() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    bogus = "<!-- table nope: bench/results/nope.json (bench/readme_tables.py) -->\nx\n" \
            "<!-- /table -->\n"
    with pytest.raises(SystemExit, match="unknown table 'nope'"):
        readme_tables.regenerate(text + bogus)
    start = text.index("<!-- table ")
    end = text.index("<!-- /table -->", start) + len("<!-- /table -->")
    with pytest.raises(SystemExit, match="no marked block"):
        readme_tables.regenerate(text[:start] + text[end:])
