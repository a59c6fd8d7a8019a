"""The public operations on a model: apply a method, report, merge, save and load adapters.

On disk (METHODS.md §4) an adapter is a folder with `adapter_config.json` and
`adapter_model.safetensors`, the layout and tensor names of Hugging Face PEFT (see base.py).
Both files are written into a temporary sibling folder renamed into place, so a crash never
leaves half an adapter; pickled weights are refused unless the caller allows them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from peft_methods.base import (
    AdaptedModel,
    Layout,
    Method,
    MethodConfig,
    PeftMethodError,
    WrapsBaseLayer,
    get_method,
    infer_task_type,
    load_named,
    make_config,
    method_for_peft_type,
    replace_module,
    resolve_modules_to_save,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"


def apply(model: nn.Module, method: str, *, layout: Layout | None = None,
          **options: Any) -> AdaptedModel:
    """Freeze `model`, add `method` with `options` (its config fields) and return the wrapped
    model. `model` is changed in place (layers wrapped), as PEFT does. `layout` says where the
    model's sub-layers are, for the method's default targets (see `Layout`); without it every
    target must be given."""
    if isinstance(model, AdaptedModel):
        raise PeftMethodError("the model already has a PEFT method applied; apply() takes the "
                              "base Hugging Face model")
    m = get_method(method)
    config = make_config(m.config_cls, options, method)
    return _apply(model, m, config, layout)


def _apply(model: nn.Module, m: Method, config: MethodConfig,
           layout: Layout | None = None) -> AdaptedModel:
    task_type = config.task_type or infer_task_type(model)
    m.check_model(model, config, layout)
    to_save = resolve_modules_to_save(model, config, task_type)
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = AdaptedModel(model, m, config, task_type, to_save, layout)
    m.inject(adapted)
    for name in to_save:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    return adapted


def trainable_report(model: nn.Module) -> dict[str, Any]:
    """Trainable and total parameter counts (elements; a quantized weight counts its logical
    elements), the trainable share in percent, and the method name."""
    total = trainable = 0
    for p in model.parameters():
        n = getattr(p, "logical_numel", None) or p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    for b in model.buffers():  # quantized frozen weights live in buffers
        n = getattr(b, "logical_numel", None)
        if n:
            total += n
    return {"method": model.method.name if isinstance(model, AdaptedModel) else "none",
            "trainable_params": trainable, "total_params": total,
            "trainable_percent": 100.0 * trainable / max(total, 1)}


def merge(model: AdaptedModel) -> AdaptedModel:
    """Fold the method into the base weights (outputs unchanged); `unmerge` undoes it."""
    _require_adapted(model)
    if not model.merged:
        model.method.merge(model)
        model.merged = True
    return model


def unmerge(model: AdaptedModel) -> AdaptedModel:
    _require_adapted(model)
    if model.merged:
        model.method.unmerge(model)
        model.merged = False
    return model


def merge_and_unload(model: AdaptedModel) -> nn.Module:
    """Fold a mergeable method into the base weights and return the plain base model, every
    wrapped layer replaced by the layer it wraps (PEFT's `merge_and_unload`): it saves and
    loads as the original architecture, with no trace of the method.

    Raises:
        PeftMethodError: the method cannot be merged, or it keeps modules outside the base
            model (prompt encoders) that merging cannot fold in.
    """
    _require_adapted(model)
    if len(model.extra):
        raise PeftMethodError(f"{model.method.name} keeps modules outside the model "
                              f"({', '.join(model.extra)}); it cannot be unloaded")
    merge(model)
    base = model.get_base_model()
    for name, module in list(base.named_modules()):
        if isinstance(module, WrapsBaseLayer):
            replace_module(base, name, module.base_layer)
    return base


def _require_adapted(model: nn.Module) -> None:
    if not isinstance(model, AdaptedModel):
        raise PeftMethodError("expected a model returned by peft_methods.apply()")


def adapter_state_dict(model: AdaptedModel) -> dict[str, torch.Tensor]:
    """Everything `save_adapter` writes: the method's tensors and the modules_to_save, under
    PEFT's names."""
    _require_adapted(model)
    m = model.method
    state = m.adapter_state_dict(model)
    prefix = m.key_prefix()
    for name in model.modules_to_save:
        for n, t in model.model.get_submodule(name).state_dict().items():
            state[f"{prefix}{name}.{n}"] = t
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_adapter(model: AdaptedModel, directory: str | os.PathLike) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` to `directory` atomically
    (a temporary sibling folder renamed into place, so a crash never leaves half a folder)."""
    _require_adapted(model)
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    config = model.method.peft_config_dict(model)
    state = adapter_state_dict(model)
    # tied tensors (the same storage under two names) must be saved as separate copies
    state = {k: v.clone() for k, v in state.items()}
    # `.tmp-*`: the name every writer of the toolkit gives its temporaries (a resume removes
    # what a kill left); mkdtemp makes it private, the saved adapter gets the user's umask.
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    mask = os.umask(0o022)
    os.umask(mask)
    old = tmp.with_name(tmp.name + "-old")
    try:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True,
                                                  default=_json_default) + "\n")
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        for path in (tmp / CONFIG_NAME, tmp / WEIGHTS_NAME):  # save_file writes 0600
            path.chmod(0o666 & ~mask)
        tmp.chmod(0o777 & ~mask)  # mkdtemp's 0700
        if target.exists():  # aside first: a kill at any instant leaves old or new in place
            os.replace(target, old)
        os.replace(tmp, target)
    finally:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
    return target


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to adapter_config.json")


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise PeftMethodError(f"{directory}: not an adapter folder (no {CONFIG_NAME})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PeftMethodError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if "peft_type" not in data:
        raise PeftMethodError(f"{path}: no `peft_type`; not a PEFT adapter config")
    return data


def read_adapter_weights(directory: str | os.PathLike, allow_pickle: bool = False
                         ) -> dict[str, torch.Tensor]:
    """The adapter's tensors. Pickled `adapter_model.bin` is refused unless `allow_pickle`,
    because unpickling can run arbitrary code."""
    d = Path(directory)
    if (d / WEIGHTS_NAME).is_file():
        return load_file(str(d / WEIGHTS_NAME))
    if (d / PICKLE_NAME).is_file():
        if not allow_pickle:
            raise PeftMethodError(f"{d / PICKLE_NAME} is a pickled checkpoint; loading it can "
                                  f"run arbitrary code. Convert it to safetensors, or pass "
                                  f"allow_pickle=True if you trust its source")
        return torch.load(d / PICKLE_NAME, map_location="cpu", weights_only=True)
    raise PeftMethodError(f"{d}: no {WEIGHTS_NAME}")


def load_adapter(base_model: nn.Module, directory: str | os.PathLike, *,
                 allow_pickle: bool = False, layout: Layout | None = None) -> AdaptedModel:
    """Apply the adapter saved in `directory` (by us or by PEFT) to `base_model` (changed in
    place) and return the wrapped model, frozen except for what the method trains. Saved
    files name their modules; `layout` is needed only for a file that leaves one to the
    default (an adapter saved before its method recorded the modules it used)."""
    data = read_adapter_config(directory)
    m = method_for_peft_type(data["peft_type"], data)
    config = m.config_from_peft(data)
    state = read_adapter_weights(directory, allow_pickle=allow_pickle)
    adapted = _apply(base_model, m, config, layout)
    m.load_adapter_state_dict(adapted, state)
    prefix = m.key_prefix()
    for name in adapted.modules_to_save:
        module = adapted.model.get_submodule(name)
        own = {f"{name}.{n}": t for n, t in module.state_dict().items()}
        load_named(own, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                   | _peft_modules_to_save_aliases(state, prefix), what="modules_to_save")
    return adapted


def _peft_modules_to_save_aliases(state: dict[str, torch.Tensor], prefix: str
                                  ) -> dict[str, torch.Tensor]:
    """Older PEFT files name saved modules `<path>.modules_to_save.<tensor>`; map them back."""
    out = {}
    for k, v in state.items():
        if k.startswith(prefix) and ".modules_to_save." in k:
            out[k[len(prefix):].replace(".modules_to_save.", ".", 1)] = v
    return out
