"""Safe loading: pickled weights only with `allow_pickle` (then `weights_only=True`), custom
model code only with `trust_remote_code`, for the run and the one-off commands alike.

Uses the broken model folders of `test_bad_input.py` (its `env` fixture).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import tiny_recipe
from distill.cli import app
from test_bad_input import Env, make_env, runner, stage


@pytest.fixture(scope="module")
def env(tiny_bert: Path, tiny_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Env:
    return make_env(tiny_bert, tiny_csv, tmp_path_factory)


def test_pickled_teacher_loads_with_allow_pickle(env: Env, tmp_path: Path) -> None:
    """`teacher.allow_pickle: true` reads the pickled weights (torch.load(weights_only=True))
    and gives the same model as its safetensors twin."""
    import torch

    from distill.models import load_classifier

    recipe = tiny_recipe(env.bert, env.csv, name="pickled")
    recipe["teacher"] = {"model": env["pickled"], "allow_pickle": True}
    recipe["stages"] = [stage("finetune", epochs=0.2, keep_best=False)]
    path = tmp_path / "pickled.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["run", str(path), "--output", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output[-3000:]
    torch.manual_seed(0)
    a, _ = load_classifier(env["pickled"], ["neg", "pos"], allow_pickle=True)
    torch.manual_seed(0)
    b, _ = load_classifier(str(env.bert), ["neg", "pos"])
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, msg=name)


def test_pickled_adapter_weights_refused_unless_allowed(env: Env, tmp_path: Path) -> None:
    """No command loads adapter files, so this is the library call: a pickled adapter is
    refused by default, and read with weights_only=True (no arbitrary objects) when allowed."""
    import pickle

    from peft_methods import PeftMethodError
    from peft_methods.ops import read_adapter_weights

    with pytest.raises(PeftMethodError, match="pickled checkpoint"):
        read_adapter_weights(env["adapter"])
    assert set(read_adapter_weights(env["adapter"], allow_pickle=True)) == {"w"}
    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "exploit-ran"
    with open(evil / "adapter_model.bin", "wb") as fh:
        pickle.dump(_Exploit(str(marker)), fh, protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        read_adapter_weights(evil, allow_pickle=True)
    assert not marker.exists()


class _Exploit:
    """Unpickling this would create a file; weights_only=True must refuse it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


@pytest.mark.parametrize("command", [["inspect"], ["shrink", "--layers", "2", "--out"]])
def test_one_off_commands_refuse_remote_code_cleanly(env: Env, tmp_path: Path,
                                                     command: list[str]) -> None:
    """`distill inspect` / `distill shrink` read configs through the same checked loader."""
    args = [command[0], env["remote"], *command[1:]]
    if command[0] == "shrink":
        args.append(str(tmp_path / "out"))
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "trust_remote_code" in result.output and "Traceback" not in result.output
    assert not Path(env["remote_marker"]).exists()
    assert not (tmp_path / "out").exists()
