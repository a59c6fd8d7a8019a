"""`distill.train.sharding` in a real 2-process gloo group: FSDP2 shards a unit, the sharded kept
model computes what the plain one computes (hidden states and attentions too), and
`unshard_in_place` hands back the original classes with plain, whole, still-tied weights that
can be sharded again (a shrink stage heals several times with the same teacher).
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port
from torch import nn


class Unit(nn.Module):
    """A student, a projection and a frozen teacher held outside the module tree, like a
    distill unit with hidden-state losses."""

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        super().__init__()
        self.student, self._teacher = student, [teacher]
        self.proj = nn.Linear(student.config.hidden_size, teacher.config.hidden_size)

    def frozen_models(self) -> list[nn.Module]:
        return self._teacher

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = self._teacher[0](input_ids=ids, output_hidden_states=True).hidden_states[-1]
        s = self.student(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        return (self.proj(s) - t).pow(2).mean()


class LM(nn.Module):
    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids, labels=ids).loss


def _bert(seed: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def _worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        _checks()
    finally:
        dist.destroy_process_group()


def _checks() -> None:
    from accelerate import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from transformers import (
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForCausalLM,
    )

    from distill.train import sharding

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    student, teacher = _bert(0), _bert(1).requires_grad_(False)
    plain, teacher_state = copy.deepcopy(student), copy.deepcopy(teacher.state_dict())
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(2))
    want = plain(input_ids=ids, output_hidden_states=True, output_attentions=True)
    unit = Unit(student, teacher)
    for _ in range(2):  # shard, use, hand back -- twice, on the same modules
        roots = sharding.shard(unit, student, plugin)
        assert roots == [unit, teacher]
        assert isinstance(student, FSDPModule) and isinstance(teacher, FSDPModule)
        assert sharding.is_fsdp(unit)
        # Through the unit first, as in training: it becomes FSDP's root (a model called
        # directly before that would claim the root itself).
        unit(ids).backward()
        with torch.no_grad():
            got = student(input_ids=ids, output_hidden_states=True, output_attentions=True)
        assert got.hidden_states is not None and got.attentions is not None
        for a, b in zip(want.hidden_states + want.attentions, got.hidden_states + got.attentions):
            torch.testing.assert_close(a, b)
        for root in roots:
            sharding.unshard_in_place(root)
        assert not sharding.is_fsdp(unit) and not sharding.is_fsdp(teacher)
        assert type(student) is type(teacher) is BertForSequenceClassification
        assert all(type(p) is nn.Parameter and not isinstance(p.data, DTensor)
                   for p in [*unit.parameters(), *teacher.parameters()])
        assert not any(p.requires_grad for p in teacher.parameters())
        state = student.state_dict()
        for k, v in plain.state_dict().items():
            assert torch.equal(state[k], v), k
        for k, v in teacher.state_dict().items():
            assert torch.equal(teacher_state[k], v), k
        torch.testing.assert_close(student(input_ids=ids).logits, want.logits)
        student.zero_grad(set_to_none=True)
    # Tied input/output embeddings stay one tensor.
    torch.manual_seed(3)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, tie_word_embeddings=True))
    before = lm(input_ids=ids % 40).logits
    wrapper = LM(lm)
    sharding.shard(wrapper, lm, plugin)
    wrapper(ids % 40).backward()
    sharding.unshard_in_place(wrapper)
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    torch.testing.assert_close(lm(input_ids=ids % 40).logits, before)


def test_shard_then_hand_back_plain_modules() -> None:
    mp.spawn(_worker, args=(free_port(),), nprocs=2, join=True)
