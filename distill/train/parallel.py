"""How one training loop spreads over processes: DDP, FSDP2 or DeepSpeed ZeRO.

The loop (`distill.train.loop.train_loop`) is written once; a `Strategy` supplies the few steps
that differ between launch modes: wrapping the unit and building its optimizer, backward,
the optimizer step (with clipping), gathering whole weights and optimizer state for a
checkpoint, and handing plain modules back to the stage when the loop ends.

    launch                                   strategy      weights on a rank  optimizer state
    1 process / --multi_gpu                  Strategy      whole              whole
    --use_fsdp --fsdp_version 2              FullySharded  1/N (FSDP2)        1/N
    --use_deepspeed --zero_stage 0|1|2       DeepSpeedZero whole              1/N (stage >= 1)

accelerate enables FSDP and DeepSpeed only on GPUs and trains such launches on CPU as plain
DDP without a word; both work over gloo, so distill reads the launch's settings itself and
shards on CPU too (that is also how the tests run these paths on a CPU-only machine).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, DistributedType, gather_object
from torch import nn
from torch.utils.data import DataLoader

from distill.data.batching import loader_batch_size
from distill.train import sharding
from distill.errors import DistillError

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


class Strategy:
    """Plain data parallelism through accelerate (also the 1-process case)."""

    name: ClassVar[str] = "data-parallel"
    shards_gradients: ClassVar[bool] = False  # on_step hooks that read whole gradients fail

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.unit: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def setup(self, unit: nn.Module, keep: nn.Module, make_optimizer: OptimizerFactory,
              loader: DataLoader, max_grad_norm: float | None
              ) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
        """Wrap `unit`, build its optimizer, shard the loader; the results the loop uses."""
        optimizer = make_optimizer(unit)
        self.unit, self.optimizer, loader = self.accelerator.prepare(unit, optimizer, loader)
        self.params = [p for p in unit.parameters() if p.requires_grad]
        return self.unit, self.optimizer, loader

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Micro-batches that do not step skip the gradient exchange."""
        return self.accelerator.no_sync(self.unit)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def step(self, max_grad_norm: float | None, on_step: Callable[[], None] | None) -> None:
        """Clip, step, call `on_step` while gradients exist, clear them."""
        if max_grad_norm is not None:
            self.accelerator.clip_grad_norm_(self.params, max_grad_norm)
        self.optimizer.step()
        if on_step is not None:
            on_step()
        self.optimizer.zero_grad(set_to_none=True)

    def weights(self) -> dict[str, torch.Tensor]:
        """The unit's whole weights (every rank calls it)."""
        return self.accelerator.unwrap_model(self.unit).state_dict()

    def kept_weights(self, keep: nn.Module) -> dict[str, torch.Tensor]:
        """A copy of `keep`'s whole weights (every rank calls it)."""
        return {k: v.detach().clone()
                for k, v in self.accelerator.unwrap_model(keep).state_dict().items()}

    def optimizer_state(self) -> Any:
        """The optimizer's state for a checkpoint (every rank calls it)."""
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: Any) -> None:
        self.optimizer.load_state_dict(state)

    def finish(self) -> None:
        """Hand the stage back plain modules with whole weights."""
        self.accelerator.free_memory()


class FullySharded(Strategy):
    """FSDP2 (see `distill.train.sharding`)."""

    name = "fsdp"
    shards_gradients = True

    def __init__(self, accelerator: Accelerator, plugin: Any) -> None:
        super().__init__(accelerator)
        self.plugin = plugin
        self.roots: list[nn.Module] = []

    def setup(self, unit, keep, make_optimizer, loader, max_grad_norm):
        self.roots = sharding.shard(unit, keep, self.plugin)
        self.unit, self.optimizer = unit, make_optimizer(unit)  # on the sharded parameters
        self.params = [p for p in unit.parameters() if p.requires_grad]
        # Only the loader goes through accelerate: the unit is sharded already, and
        # accelerate's own FSDP preparation would wrap it again.
        return unit, self.optimizer, self.accelerator.prepare_data_loader(loader)

    def no_sync(self):
        return sharding.no_sync(self.unit)

    def backward(self, loss):
        loss.backward()

    def step(self, max_grad_norm, on_step):
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm)  # DTensor-aware
        self.optimizer.step()
        if on_step is not None:
            on_step()
        self.optimizer.zero_grad(set_to_none=True)

    def weights(self):
        return sharding.full_state_dict(self.unit)

    def kept_weights(self, keep):
        return sharding.full_state_dict(keep)

    def optimizer_state(self):
        return sharding.optimizer_state(self.unit, self.optimizer)

    def load_optimizer_state(self, state):
        sharding.load_optimizer_state(self.unit, self.optimizer, state)

    def finish(self):
        for root in self.roots:
            sharding.unshard_in_place(root)
        self.accelerator.free_memory()


class DeepSpeedZero(Strategy):
    """DeepSpeed ZeRO stages 0-2: whole weights on every rank, optimizer state (stage 1) and
    gradients (stage 2) partitioned. The engine reduces, clips and steps; the loop still owns
    accumulation (`managed_gradient_accumulation: false`: every `engine.step()` is a
    boundary), the learning-rate schedule and evaluation."""

    name = "deepspeed"
    shards_gradients = True

    def __init__(self, accelerator: Accelerator, plugin: DeepSpeedPlugin) -> None:
        super().__init__(accelerator)
        self.plugin = plugin
        self.engine: Any = None

    def setup(self, unit, keep, make_optimizer, loader, max_grad_norm):
        import deepspeed

        n = self.accelerator.num_processes
        micro = (loader_batch_size(loader) or 1) // n  # split_batches: each rank takes 1/n
        config = {k: v for k, v in self.plugin.deepspeed_config.items()
                  if v != "auto" and k not in ("fp16", "bf16")}
        config |= {"train_micro_batch_size_per_gpu": micro, "train_batch_size": micro * n,
                   "gradient_accumulation_steps": 1,
                   "managed_gradient_accumulation": False,
                   "gradient_clipping": max_grad_norm or 0.0,
                   "steps_per_print": 2 ** 31}
        optimizer = make_optimizer(unit)
        self.engine, _, _, _ = deepspeed.initialize(model=unit, optimizer=optimizer,
                                                    config=config)
        # The schedule drives the client optimizer's groups, which the ZeRO optimizer steps.
        self.unit, self.optimizer = self.engine, optimizer
        return self.engine, optimizer, self.accelerator.prepare_data_loader(loader)

    def no_sync(self):
        return contextlib.nullcontext()  # gradients are reduced when the engine steps

    def backward(self, loss):
        self.engine.backward(loss)

    def step(self, max_grad_norm, on_step):
        self.engine.step()  # reduce, clip, step, zero
        if on_step is not None:
            on_step()

    def weights(self):
        return self.engine.module.state_dict()

    def kept_weights(self, keep):
        return {k: v.detach().clone() for k, v in keep.state_dict().items()}

    def optimizer_state(self):
        """Every rank's partition of the optimizer state, in rank order (resumed with the
        same number of processes)."""
        base = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        return gather_object([base.state_dict()])

    def load_optimizer_state(self, state):
        if len(state) != self.accelerator.num_processes:
            raise DistillError(
                f"the checkpoint holds DeepSpeed optimizer partitions of {len(state)} "
                f"processes; resume it with --num_processes {len(state)}")
        base = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        base.load_state_dict(state[self.accelerator.process_index])

    def finish(self):
        self.engine.destroy()  # its gradient hooks must not outlive the loop
        self.engine = None
        self.accelerator.free_memory()


def name_deepspeed_device() -> None:
    """On a machine without CUDA, tell DeepSpeed up front that its device is the CPU.

    accelerate imports DeepSpeed whenever it is installed (`unwrap_model`, and so every
    `save_pretrained`), in runs that never use it; left to detect the device itself,
    DeepSpeed's import then warns, in every run, that it fell back to the CPU.
    `DS_ACCELERATOR` is its documented override; the choice is the one it would make.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def deepspeed_plugin(accelerator: Accelerator) -> DeepSpeedPlugin | None:
    """The DeepSpeed settings of this launch, or None when it does not use DeepSpeed."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
    elif (accelerator.distributed_type in (DistributedType.MULTI_CPU, DistributedType.NO)
          and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"):
        name_deepspeed_device()  # on CPU: its CPU accelerator, over gloo
        plugin = DeepSpeedPlugin()
    else:
        return None
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise DistillError("this launch uses DeepSpeed, which is not installed: "
                           "`pip install deepspeed`, or launch with --multi_gpu or --use_fsdp"
                           ) from None
    stage = plugin.zero_stage
    if stage not in (0, 1, 2):
        raise DistillError(
            f"DeepSpeed ZeRO stage {stage} is not supported: stages 0-2 keep whole weights on "
            "every process; to shard the weights too, launch with --use_fsdp --fsdp_version 2")
    config = plugin.deepspeed_config
    owned = [k for k in ("optimizer", "scheduler") if k in config]
    if owned:
        raise DistillError(f"DeepSpeed config: remove {' and '.join(owned)}; the recipe sets "
                           "them (AdamW, `learning_rate`, `warmup_ratio`)")
    if config.get("gradient_accumulation_steps", "auto") not in ("auto", 1):
        raise DistillError(
            "DeepSpeed config: gradient_accumulation_steps "
            f"{config['gradient_accumulation_steps']} -- set `grad_accum_steps` in the "
            "recipe's stages instead (the launch's value must be 1)")
    return plugin


def strategy_for(accelerator: Accelerator) -> Strategy:
    """The strategy of this launch (FSDP and DeepSpeed settings checked here)."""
    fsdp = sharding.fsdp_plugin(accelerator)
    if fsdp is not None:
        return FullySharded(accelerator, fsdp)
    ds = deepspeed_plugin(accelerator)
    if ds is not None:
        return DeepSpeedZero(accelerator, ds)
    return Strategy(accelerator)
