"""Fully sharded data parallel training (torch FSDP2) for the training loop.

Under `accelerate launch --use_fsdp` the loop shards its unit for the duration of a loop and
hands back ordinary modules afterwards: every stage evaluates, saves and passes on plain
`nn.Module`s, exactly as with one process, and only the loop knows weights were sharded.

How the unit is cut into FSDP groups (one all-gather each): every transformer block (the
`_no_split_modules` classes of the models inside the unit), the input embeddings, every
outermost model (student, teacher) and the kept module itself, then the unit. The kept module
being its own group is what lets `evaluate()` call it directly, outside the unit's forward.

Handing modules back (`unshard_in_place`) undoes `fully_shard` by hand (class, hooks,
composable-API registrations, parameters): torch has no public inverse. Its private names
are pinned by torch==2.13 and checked by tests/test_sharding.py.

accelerate turns FSDP on only on accelerators; torch's FSDP2 also runs on CPU over gloo, so a
`--use_fsdp` launch on CPU shards too (`fsdp_plugin`) rather than silently training
data-parallel. That is also how the tests run this path on a CPU-only machine.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.utils import DistributedType
from torch import nn
from torch.distributed._composable.contract import REGISTRY_KEY, STATE_KEY
from torch.distributed._composable_state import _module_state_mapping
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import (
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel

from distill.errors import DistillError


def fsdp_plugin(accelerator: Accelerator) -> FullyShardedDataParallelPlugin | None:
    """The FSDP settings of this launch, or None when it does not shard.

    accelerate turns FSDP on only on accelerators and trains a CPU `--use_fsdp` launch
    data-parallel without a word; torch's FSDP2 works over gloo, so such a launch shards too,
    with the settings accelerate's plugin reads from the launch (`FSDP_*` variables)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
    elif (accelerator.distributed_type == DistributedType.MULTI_CPU
          and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"):
        plugin = FullyShardedDataParallelPlugin()
    else:
        return None
    # Every process needs whole models outside the loops (cutting layers, evaluating, saving),
    # so none loads an empty one waiting for rank 0's weights (transformers reads this).
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    plugin.cpu_ram_efficient_loading = False
    if plugin.fsdp_version != 2:
        # FSDP1's flat parameters cannot be handed back as plain modules.
        raise DistillError(
            f"FSDP version {plugin.fsdp_version} is not supported: set `fsdp_version: 2` in "
            "the accelerate config (or launch with --fsdp_version 2)")
    return plugin


def is_fsdp(module: nn.Module) -> bool:
    """Whether any part of `module` is currently sharded by FSDP2."""
    return any(isinstance(m, FSDPModule) for m in module.modules())


def _shard_kwargs(plugin: FullyShardedDataParallelPlugin) -> dict:
    offload = plugin.cpu_offload if isinstance(plugin.cpu_offload, OffloadPolicy) else None
    return {"reshard_after_forward": plugin.reshard_after_forward,
            "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
            "offload_policy": offload or OffloadPolicy()}


def _block_classes(unit: nn.Module) -> set[str]:
    """Class names of the transformer blocks of every model inside `unit`."""
    names: set[str] = set()
    for m in unit.modules():
        if isinstance(m, PreTrainedModel):
            names.update(m._no_split_modules or [])
    return names


def shard(unit: nn.Module, keep: nn.Module, plugin: FullyShardedDataParallelPlugin
          ) -> list[nn.Module]:
    """Shard `unit` in place over the processes (FSDP2), bottom-up: blocks, models, `keep`,
    then the unit; and, as roots of their own, the frozen models the unit calls without
    holding them (`unit.frozen_models()`: a distill unit's teacher). Every rank must call it,
    with identical modules.

    Returns:
        The sharded roots, for `unshard_in_place` when the loop ends.
    """
    kwargs = _shard_kwargs(plugin)
    _shard_tree(unit, keep, kwargs)
    frozen = list(unit.frozen_models()) if hasattr(unit, "frozen_models") else []
    for model in frozen:
        _shard_tree(model, model, kwargs)
    return [unit, *frozen]


def _shard_tree(root: nn.Module, keep: nn.Module, kwargs: dict) -> None:
    blocks = _block_classes(root)
    models = [m for m in root.modules() if isinstance(m, PreTrainedModel)]
    # Outermost models only: a base model inside its task model (`bert` in
    # BertForSequenceClassification) may share tied embeddings with the task model's head,
    # and a shared parameter must live in one group.
    outer = {id(m) for m in models
             if not any(o is not m and any(x is m for x in o.modules()) for o in models)}
    for m in models:
        if id(m) in outer:
            _shard_embeddings(m, kwargs)
    # A model inside the kept module (an adapter's base model) stays in the kept module's
    # group: PEFT methods run its parts one by one (backbone, then head), and a group is
    # gathered only when its own module runs.
    inside_keep = {id(x) for x in keep.modules() if x is not keep}
    for m in reversed(list(root.modules())):  # children before parents
        if m is root or isinstance(m, FSDPModule):
            continue
        outermost = id(m) in outer and id(m) not in inside_keep
        wanted = m is keep or outermost or type(m).__name__ in blocks
        if wanted and next(m.parameters(), None) is not None:
            original = type(m)
            fully_shard(m, **kwargs)
            _keep_output_recording(original, type(m))
    original = type(root)
    fully_shard(root, **kwargs)
    _keep_output_recording(original, type(root))


def _shard_embeddings(model: PreTrainedModel, kwargs: dict) -> None:
    """The input embeddings as a group of their own (with a tied output layer, one group for
    both): prompt methods embed the ids themselves before calling the model, which needs the
    embedding table gathered outside the model's forward."""
    emb = model.get_input_embeddings()
    if emb is None or isinstance(emb, FSDPModule) or next(emb.parameters(), None) is None:
        return
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = out is not None and getattr(out, "weight", None) is emb.weight
    fully_shard([emb, out] if tied else emb, **kwargs)


def _keep_output_recording(original: type, wrapped: type) -> None:
    """transformers finds which layers to hook for `output_hidden_states`/`output_attentions`
    by the model's class name; give `FSDP<Cls>` the entry of `Cls`, or hidden-state and
    attention losses would get None."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # pragma: no cover - older transformers pass the flags through
        return
    entry = dict.get(_CAN_RECORD_REGISTRY, str(original))
    if entry is not None:
        dict.__setitem__(_CAN_RECORD_REGISTRY, str(wrapped), entry)


def full_state_dict(module: nn.Module, cpu: bool = True) -> dict[str, torch.Tensor]:
    """`module.state_dict()` with every sharded tensor gathered whole (a collective: every rank
    must call it, in the same order); on the CPU unless `cpu=False`."""
    out = {}
    for k, v in module.state_dict().items():
        if isinstance(v, DTensor):
            v = v.full_tensor()
        out[k] = v.detach().to("cpu") if cpu else v.detach()
    return out


def _fsdp_modules(root: nn.Module) -> Iterator[nn.Module]:
    return (m for m in root.modules() if isinstance(m, FSDPModule))


def unshard_in_place(root: nn.Module) -> None:
    """Turn every FSDP2 group under `root` back into its plain module holding whole weights.

    A collective (each rank gathers the weights). Afterwards `root` is what it was before
    `shard`: original classes, no FSDP hooks, plain `nn.Parameter`s (tied ones still tied),
    and the modules can be sharded again by a later loop.
    """
    full = full_state_dict(root, cpu=False)
    for m in list(_fsdp_modules(root)):
        state = m._get_fsdp_state()
        handles = {state._pre_forward_hook_handle, state._post_forward_hook_handle}
        for group in state._fsdp_param_groups:
            handles.update(group._module_to_pre_save_state_dict_hook_handle.values())
            handles.update(group._module_to_pre_load_state_dict_hook_handle.values())
            handles.update(p._post_load_hook_handle for p in group.fsdp_params)
        for h in handles:
            h.remove()
        m.__dict__.pop(STATE_KEY, None)
        m.__dict__.pop(REGISTRY_KEY, None)
        _module_state_mapping.pop(m, None)
        # fully_shard made the class `FSDP<Cls>(FSDPModule, Cls)`.
        m.__class__ = next(c for c in type(m).__mro__[1:] if not issubclass(c, FSDPModule))
    # One new parameter per shared (tied) parameter, set on every module that holds it.
    owners: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, p in root.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
        params[id(p)] = p
    for key, names in owners.items():
        old = params[key]
        value = full[names[0]]
        new = nn.Parameter(value.to_local() if isinstance(value, DTensor) else value,
                           requires_grad=old.requires_grad)
        for name in names:
            owner_name, _, leaf = name.rpartition(".")
            owner = root.get_submodule(owner_name) if owner_name else root
            owner._parameters[leaf] = new


@contextlib.contextmanager
def no_sync(unit: nn.Module) -> Iterator[None]:
    """Accumulate gradients without reduce-scattering them (micro-batches that do not step)."""
    unit.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        unit.set_requires_gradient_sync(True)


def _raw(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch one


def optimizer_state(unit: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The sharded optimizer's state for a checkpoint, gathered whole and keyed by parameter
    name (a collective)."""
    return get_optimizer_state_dict(unit, _raw(optimizer), options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))


def load_optimizer_state(unit: nn.Module, optimizer: torch.optim.Optimizer,
                         state: dict) -> None:
    """Restore what `optimizer_state` saved (each rank keeps its shard)."""
    set_optimizer_state_dict(unit, _raw(optimizer), state,
                             options=StateDictOptions(full_state_dict=True))
