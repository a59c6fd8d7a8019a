"""Safe loading: pickled weights only with `allow_pickle` (then `weights_only=True`), custom
model code only with `trust_remote_code`, for the run and the one-off commands alike. What a
folder loads is what its shard index names, so the index's shards are checked before
transformers opens the folder, on every route (and `torch.load` is never reached).

Uses the broken model folders of tests/bad_input.py (`make_env`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import tiny_recipe
from distill.cli import app
from bad_input import Env, make_env, runner, stage


@pytest.fixture(scope="module")
def env(tiny_bert: Path, tiny_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Env:
    return make_env(tiny_bert, tiny_csv, tmp_path_factory)


def test_pickled_teacher_loads_with_allow_pickle(env: Env, tmp_path: Path) -> None:
    """`teacher.allow_pickle: true` reads the pickled weights (torch.load(weights_only=True))
    and gives the same model as its safetensors twin."""
    import torch

    from conftest import classifier

    recipe = tiny_recipe(env.bert, env.csv, name="pickled")
    recipe["teacher"] = {"model": env["pickled"], "allow_pickle": True}
    recipe["stages"] = [stage("finetune", epochs=0.2, keep_best=False)]
    path = tmp_path / "pickled.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["run", str(path), "--output", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output[-3000:]
    torch.manual_seed(0)
    a, _ = classifier(env["pickled"], ["neg", "pos"], allow_pickle=True)
    torch.manual_seed(0)
    b, _ = classifier(str(env.bert), ["neg", "pos"])
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


# ----------------------------------------------------------------------------- shard indexes
def index_naming_bin(src: Path, dst: Path, payload: object = None) -> Path:
    """A copy of the model folder `src` whose `model.safetensors.index.json` maps every tensor
    to `pytorch_model.bin`, a pickle holding `payload` (default: the model's own weights)."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file

    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    torch.save(state if payload is None else payload, dst / "pytorch_model.bin")
    index = {"metadata": {}, "weight_map": {k: "pytorch_model.bin" for k in state}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


@pytest.fixture(scope="module")
def bin_index(env: Env, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return index_naming_bin(env.bert, tmp_path_factory.mktemp("bin-index") / "model")


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any torch.load, or transformers reading a weight file, fails the test."""
    import torch
    import transformers.modeling_utils

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a weight file was read: {args[:1]}")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(transformers.modeling_utils, "load_state_dict", refuse)


def _recipe_file(env: Env, tmp_path: Path, teacher: str, stages: list[dict],
                 **teacher_keys: object) -> str:
    recipe = tiny_recipe(env.bert, env.csv, name="index")
    recipe["teacher"] = {"model": teacher, **teacher_keys}
    recipe["stages"] = stages
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def _cli_route(route: str, model: Path, env: Env, tmp_path: Path) -> list[str]:
    """The command line that makes `route` load the model folder `model`."""
    out = str(tmp_path / "out")
    finetune = stage("finetune", epochs=0.2, keep_best=False)
    if route == "run":
        return ["run", _recipe_file(env, tmp_path, str(model), [finetune]), "--output", out]
    if route == "adapt":  # an adapt stage's own `model`
        adapt = stage("adapt", model=str(model), config={"target_modules": ["query"]})
        return ["run", _recipe_file(env, tmp_path, str(env.bert), [adapt]), "--output", out]
    if route == "eval":
        return ["eval", str(model), "--data", str(env.csv), "--max-length", "16",
                "--no-latency"]
    if route == "shrink":
        return ["shrink", str(model), "--layers", "2", "--out", out]
    return ["inspect", str(model)]


ROUTES = ["run", "adapt", "eval", "inspect", "shrink"]


@pytest.mark.parametrize("route", ROUTES)
def test_an_index_naming_a_pickle_is_refused_before_loading(
        route: str, bin_index: Path, env: Env, tmp_path: Path, no_unpickling: None) -> None:
    """`model.safetensors.index.json` may name any file as a shard, and transformers reads a
    shard not ending in .safetensors with torch.load: the index's shards are what is checked."""
    result = runner.invoke(app, _cli_route(route, bin_index, env, tmp_path))
    assert result.exit_code == 2, (result.output[-3000:], result.exception)
    assert "model.safetensors.index.json names pickled shards (pytorch_model.bin)" \
        in result.stderr
    allow = {"run": "set `teacher.allow_pickle: true`",
             "adapt": "set `stages.0.allow_pickle: true`"}.get(route, "reads safetensors only")
    assert allow in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_load_classifier_refuses_an_index_naming_a_pickle(bin_index: Path,
                                                          no_unpickling: None) -> None:
    from distill.errors import DistillError
    from conftest import classifier

    with pytest.raises(DistillError, match="names pickled shards"):
        classifier(str(bin_index), ["neg", "pos"])


def test_an_allowed_pickle_shard_loads_with_weights_only(
        bin_index: Path, env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With `allow_pickle` the index's .bin shard loads, through torch.load(weights_only=True),
    into the same model as the safetensors original."""
    import torch

    from conftest import classifier
    from distill.run.preflight import preflight
    from distill.config.loading import load_recipe

    finetune = stage("finetune", epochs=0.2, keep_best=False)
    preflight(load_recipe(_recipe_file(env, tmp_path, str(bin_index), [finetune],
                                       allow_pickle=True)))
    calls: list[dict] = []
    real_load = torch.load

    def recording_load(*args: object, **kwargs: object) -> object:
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    torch.manual_seed(0)
    a, _ = classifier(str(bin_index), ["neg", "pos"], allow_pickle=True)
    monkeypatch.setattr(torch, "load", real_load)
    torch.manual_seed(0)
    b, _ = classifier(str(env.bert), ["neg", "pos"])
    assert calls and all(c.get("weights_only") is True for c in calls), calls
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, msg=name)


def test_an_allowed_pickle_shard_runs_no_code(env: Env, tmp_path: Path) -> None:
    """weights_only=True: a shard that would run code when unpickled is refused, in the
    run's pre-flight (which reads the shard's tensor names) and when loading."""
    from distill.errors import DistillError
    from conftest import classifier

    marker = tmp_path / "exploit-ran"
    evil = index_naming_bin(env.bert, tmp_path / "evil", payload=_Exploit(str(marker)))
    with pytest.raises(DistillError, match="hold more than tensors"):
        classifier(str(evil), ["neg", "pos"], allow_pickle=True)
    distill = stage("distill", student={"layers": [0, 2]})
    result = runner.invoke(app, ["run", _recipe_file(env, tmp_path, str(evil), [distill],
                                                     allow_pickle=True),
                                 "--output", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output[-3000:]
    assert "hold more than tensors" in result.stderr and "Traceback" not in result.output
    assert not marker.exists()


@pytest.mark.parametrize("shard, needle", [
    ("../outside.safetensors", "outside the model folder"),
    ("/etc/passwd", "outside the model folder"),
    ("model-00002-of-00002.safetensors", "which is not in the folder"),
])
def test_an_index_naming_files_elsewhere_is_refused(env: Env, tmp_path: Path, shard: str,
                                                    needle: str, no_unpickling: None) -> None:
    import json

    from distill.errors import DistillError
    from conftest import classifier

    folder = index_naming_bin(env.bert, tmp_path / "model")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"] = dict.fromkeys(index["weight_map"], shard)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(DistillError, match=needle):
        classifier(str(folder), ["neg", "pos"])


# ----------------------------------------------------------------------------- adapters
def test_a_model_folder_holding_an_adapter_is_refused(env: Env, tmp_path: Path,
                                                      no_unpickling: None) -> None:
    """transformers applies an `adapter_config.json` found beside a model's config while
    loading it (reading `adapter_model.bin` with torch.load): not the model that was named."""
    import shutil

    from distill.errors import DistillError
    from conftest import classifier

    folder = tmp_path / "model"
    shutil.copytree(env.bert, folder)
    shutil.copy(Path(env["adapter"]) / "adapter_config.json", folder)
    shutil.copy(Path(env["adapter"]) / "adapter_model.bin", folder)
    with pytest.raises(DistillError, match="holds a PEFT adapter"):
        classifier(str(folder), ["neg", "pos"])
    result = runner.invoke(app, ["inspect", str(folder)])
    assert result.exit_code == 2 and "holds a PEFT adapter" in result.stderr


def test_peft_methods_refuse_a_pickled_adapter_unread(env: Env, tmp_path: Path,
                                                      no_unpickling: None) -> None:
    """`peft_methods.load_adapter` (the adapters' own loader) reads no pickle unless allowed."""
    import json
    import shutil

    from transformers import BertConfig, BertForSequenceClassification

    import peft_methods
    from peft_methods import PeftMethodError

    adapter = tmp_path / "adapter"
    shutil.copytree(env["adapter"], adapter)
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["query"]}))
    base = BertForSequenceClassification(BertConfig.from_pretrained(env.bert))
    with pytest.raises(PeftMethodError, match="pickled checkpoint"):
        peft_methods.load_adapter(base, adapter)


# ----------------------------------------------------------------------------- GGUF cache
@pytest.mark.parametrize("route", ["load_classifier", "inspect", "run"])
def test_an_edited_gguf_cache_folder_is_checked_like_any_folder(
        route: str, env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        no_unpickling: None) -> None:
    """A .gguf file resolves to its cached conversion; a cache entry someone changed to name a
    pickle is refused like a model folder would be."""
    from distill.files import CACHE_ENV
    from distill.models import gguf
    from distill.errors import DistillError
    from conftest import classifier

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF not really")
    entry = gguf.cache_dir_for(source)
    entry.parent.mkdir(parents=True)
    index_naming_bin(env.bert, entry)
    (entry / gguf._DONE_MARKER).write_text(f"{source}\n")
    assert gguf.gguf_to_hf(source) == entry  # taken as a finished conversion
    if route == "load_classifier":
        with pytest.raises(DistillError, match="names pickled shards"):
            classifier(str(source), ["neg", "pos"])
        return
    args = ["inspect", str(source)] if route == "inspect" else ["run", _recipe_file(
        env, tmp_path, str(source), [stage("finetune", epochs=0.2)]), "--output",
        str(tmp_path / "out")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output[-3000:]
    assert "names pickled shards" in result.stderr
