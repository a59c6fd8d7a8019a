"""Whether bfloat16 autocast pays on this machine: measured, not assumed.

CPUs differ by two orders of magnitude here. With AMX or AVX-512 BF16 bf16 matmuls run
faster than fp32; on a CPU with neither (AVX2 only) torch falls back to a slow path, and
`bench/bf16_speed.py` measured a bf16-autocast matmul 79× and a MiniLM training step 22× slower
than fp32 (bench/results/bf16_speed.json). So `bf16: auto` (every training stage's default)
decides per stage, on the machine it trains on (`decide`):

1. a screen: one small matmul timed both ways on one thread (`bf16_is_faster`); where bf16 is
   not faster there, fp32, without timing the model (a bf16 step could take a minute);
2. a few forward + backward passes of the stage's own model on a real batch in each precision
   (`time_steps`); bf16 only when its step takes at most `STEP_WIN` of fp32's.

`bf16: true` / `false` force the choice. The decision and the two step times go into the
stage's metrics and the run's report (`Precision.record`).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

# bf16 must take at most this fraction of the fp32 time to be chosen: a clear win, so that
# timing noise cannot flip the decision between runs on one machine. The matmul screen's bar is
# the lower one: a bare kernel gains more from bf16 than a whole step (whose softmaxes, norms
# and optimizer stay fp32); MiniLM-L6 on an AVX-512 BF16 EPYC: matmul 0.50x, step 0.68x.
CLEAR_WIN = 0.8
STEP_WIN = 0.9


def matmul_seconds(bf16: bool, repeats: int = 3) -> float:
    """Best of `repeats` timed [128×512]·[512×512] CPU products of fp32 or of bf16 tensors
    (after one warm-up for kernel selection and allocation).

    The bf16 operands are cast before the clock starts: the question is the kernel. Timed
    under autocast instead, the two casts of every call took 60 % of the bf16 time at this
    size, and the ratio to fp32 (0.23 for the kernels on an AMX Xeon) read 0.57-0.73 from one
    process to the next, close enough to `CLEAR_WIN` that a SmolLM2 recipe run chose fp32.
    """
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(128, 512, generator=generator)
    b = torch.randn(512, 512, generator=generator)
    if bf16:
        a, b = a.bfloat16(), b.bfloat16()
    times = []
    with torch.no_grad():
        a @ b
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
    return min(times)


def resolve(setting: bool | str, device_type: str) -> bool:
    """A `bf16` setting decided by the matmul screen alone, for work that is not a training
    step (sampling from a teacher)."""
    return bf16_is_faster(device_type) if setting == "auto" else bool(setting)


@dataclass(frozen=True)
class Precision:
    """A stage's precision: the setting, what it resolved to, and the measurement behind it."""

    setting: bool | str  # the recipe's `bf16`: true, false or "auto"
    bf16: bool  # whether the stage trains under bf16 autocast
    decided_by: str  # "setting", "cuda", "matmul screen" or "step timing"
    fp32_step_s: float | None = None  # the stage's model, forward + backward, best of a few
    bf16_step_s: float | None = None

    def record(self) -> dict:
        """For metrics.json and report.json (`bf16_speedup`: fp32 step time / bf16's)."""
        out = {"setting": self.setting, "bf16": self.bf16, "decided_by": self.decided_by}
        if self.fp32_step_s is not None and self.bf16_step_s is not None:
            out |= {"fp32_step_s": self.fp32_step_s, "bf16_step_s": self.bf16_step_s,
                    "bf16_speedup": round(self.fp32_step_s / self.bf16_step_s, 3)}
        return out

    @classmethod
    def from_record(cls, record: dict) -> Precision:
        return cls(record["setting"], record["bf16"], record["decided_by"],
                   record.get("fp32_step_s"), record.get("bf16_step_s"))


def time_steps(step: Callable[[bool], None], repeats: int = 2) -> tuple[float, float]:
    """(fp32, bf16) seconds of `step(bf16)`: one warm-up each (kernel selection, allocation),
    then `repeats` rounds alternating the two (drift of the machine's speed hits both); the
    best of each."""
    step(False)
    step(True)
    best = {False: float("inf"), True: float("inf")}
    for _ in range(repeats):
        for bf16 in (False, True):
            start = time.perf_counter()
            step(bf16)
            best[bf16] = min(best[bf16], time.perf_counter() - start)
    return best[False], best[True]


def decide(setting: bool | str, device_type: str,
           step: Callable[[bool], None] | None = None) -> Precision:
    """The precision a `bf16` setting gives on this machine (see the module docstring).

    Args:
        setting: true, false or "auto".
        device_type: where the stage trains ("cpu", "cuda", ...).
        step: one forward + backward of the stage's model on a real batch, under bf16 autocast
            when called with True (it must leave no trace: no optimizer step; see
            `distill.stages.training.probe_step`). Without it, the matmul screen decides.
    """
    if setting != "auto":
        return Precision(setting, bool(setting), "setting")
    if device_type == "cuda":  # Ampere and later run bf16 on tensor cores
        return Precision(setting, bf16_is_faster("cuda"), "cuda")
    if not bf16_is_faster(device_type) or step is None:
        return Precision(setting, bf16_is_faster(device_type), "matmul screen")
    fp32, bf16 = time_steps(step)
    return Precision(setting, bf16 <= STEP_WIN * fp32, "step timing", fp32, bf16)


def autocast(bf16: bool, device_type: str) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on `device_type` when `bf16`, else a context that does nothing."""
    return (torch.autocast(device_type, dtype=torch.bfloat16) if bf16
            else contextlib.nullcontext())


@contextlib.contextmanager
def cast_once(model: nn.Module) -> Iterator[None]:
    """Lets autocast cast each weight of a frozen `model` once per autocast context, not at
    every call.

    Autocast keeps the bf16 copies it makes only of leaf tensors that require grad; a frozen
    teacher's weights are otherwise cast again at every forward: when sampling, all 135M of
    SmolLM2's for each new token of a batch. Marked as requiring grad for the while (use it
    under `no_grad`, which records no graph either way; inference mode turns the cache off),
    each is cast once per autocast context: the same bf16 values, so the outputs are bit for
    bit those of the per-call casts, at the cost of a bf16 copy of the weights held meanwhile.
    """
    frozen = [p for p in model.parameters() if p.is_floating_point() and not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


@functools.cache
def bf16_is_faster(device_type: str) -> bool:
    """True if a bf16 matmul beats fp32 on this machine's `device_type`.

    CUDA: whenever the GPU supports bf16 (Ampere and later run it on tensor cores). CPU:
    `matmul_seconds` both ways on one thread (under 1 ms in fp32; on a fallback CPU bf16 takes
    ~50 ms, so the check costs a fraction of a second).
    """
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    # Timed on one thread: the question is whether a core has fast bf16 units. With every
    # thread, another process busy on the cores slows the bf16 kernels' synchronised parallel
    # regions far more than fp32's (measured on a 2-core AMX Xeon while a training run held
    # both cores: bf16 24 ms vs fp32 7.8 ms on all threads, 0.20 vs 0.38 ms on one); a SmolLM2
    # heal that measured so ran in fp32 at 3.28 s per step instead of 2.96 s in bf16.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return matmul_seconds(bf16=True) < CLEAR_WIN * matmul_seconds(bf16=False)
    finally:
        torch.set_num_threads(threads)
