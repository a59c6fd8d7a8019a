"""A loss that turns non-finite on one process only stops every process with the same clear
error, rather than leaving the others waiting in their next gradient exchange (2 processes,
gloo, the real `make_accelerator` and `train_loop`)."""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port
from torch import nn
from torch.utils.data import DataLoader


class Unit(nn.Module):
    """A linear model whose loss is NaN on rank 1 from its third micro-batch on."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.lin, self.rank, self.calls = nn.Linear(2, 1), rank, 0

    def forward(self, batch):
        self.calls += 1
        loss = self.lin(batch["x"]).pow(2).mean()
        if self.rank == 1 and self.calls >= 3:
            loss = loss * float("nan")
        return loss, {}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    # A short timeout: without one verdict, rank 0 would wait here instead of failing.
    dist.init_process_group("gloo", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    from distill import DistillError
    from distill.config.recipe import TrainArgs
    from distill.train.loop import make_accelerator, train_loop

    accelerator = make_accelerator()
    assert accelerator.num_processes == 2
    torch.manual_seed(0)
    unit = Unit(rank)
    data = [{"x": torch.full((2,), float(i))} for i in range(16)]
    loader = DataLoader(data, batch_size=4)
    try:
        train_loop(unit, loader, TrainArgs(epochs=2, learning_rate=1e-3), accelerator=accelerator,
                   keep=unit)
        message = "no error"
    except DistillError as exc:
        message = str(exc)
    with open(f"{out}.{rank}", "w", encoding="utf-8") as fh:
        fh.write(message)
    # Both ranks leave together, and without Python's or C++'s teardown: the verdict is on
    # disk. Tearing gloo down -- with `destroy_process_group`, after a barrier -- still aborted
    # a rank now and then ("terminate called without an active exception", 2 runs in ~20; not
    # traced -- both ranks leave training mid-step, before the backward DDP prepared for).
    # What this test checks is the error above, not how gloo shuts down.
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_a_loss_non_finite_on_one_rank_stops_all_ranks(tmp_path) -> None:
    out = str(tmp_path / "message")
    mp.spawn(_worker, args=(free_port(), out), nprocs=2, join=True)
    messages = [open(f"{out}.{r}", encoding="utf-8").read() for r in range(2)]
    for message in messages:
        assert message.startswith("train: the loss became [")
        assert "nan" in message and "at step 3;" in message
    assert messages[0] == messages[1]
