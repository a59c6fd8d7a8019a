"""`torch.compile` for a stage's training steps (`compile: true`), eager everywhere else.

While the loop runs its training steps, the trained model's `forward` is replaced by its
compiled form (an instance attribute shadowing the class's method, so the module, its
parameters, its state dict and any wrapper around it stay what they were); validation,
checkpoints and everything after the stage see the eager model: a model in eval mode or under
`inference_mode` would compile a second graph, which costs as much as the first.

What it buys is the machine's and the model's (bench/results/compile_step.json, 2 CPU cores): a
LoRA step of SmolLM2 cut to 20 layers under bf16 took 0.78x the eager step after ~90 s of
compiling (earned back after ~300 steps); the MiniLM-L6 3-layer student's 0.98x (bf16) and
1.08x (fp32), after ~50 s. The first step compiles; a batch of a new shape compiles once more
(PyTorch's automatic dynamic shapes), then the graph takes any width.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class CompiledForward:
    """`module.forward`, compiled once, installed by `active()` for the training steps and
    taken out again by `paused()` (validation) and at the end of `active()`."""

    def __init__(self, module: nn.Module, enabled: bool) -> None:
        self.module = module
        self.compiled = torch.compile(module.forward) if enabled else None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The compiled forward within the block; the class's own forward after it."""
        if self.compiled is None:
            yield
            return
        self.module.forward = self.compiled
        try:
            yield
        finally:
            del self.module.forward

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The class's own (eager) forward within the block, inside `active()`."""
        if self.compiled is None:
            yield
            return
        del self.module.forward
        try:
            yield
        finally:
            self.module.forward = self.compiled
