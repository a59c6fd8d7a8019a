"""Students from teacher layers: weights copied, config consistent, reloadable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from distill.errors import DistillError
from conftest import classifier
from distill.models.loading import count_params, save_model
from distill.compress.depth import evenly_spaced, keep_layers


@pytest.fixture()
def teacher(tiny_bert: Path):
    model, tuned = classifier(str(tiny_bert), ["neg", "pos"])
    assert tuned is False  # a fresh head
    return model


def test_evenly_spaced() -> None:
    assert evenly_spaced(3, 6) == [0, 2, 4]
    assert evenly_spaced(2, 6) == [0, 3]
    assert evenly_spaced(6, 6) == list(range(6))
    with pytest.raises(DistillError, match="allowed: 1..6"):
        evenly_spaced(7, 6)


def test_keeping_every_layer_reproduces_the_teacher(teacher) -> None:
    student = keep_layers(teacher, [0, 1, 2, 3]).eval()
    x = torch.randint(5, 40, (3, 9))
    torch.testing.assert_close(student(input_ids=x).logits, teacher(input_ids=x).logits,
                               rtol=0, atol=0)


def test_student_copies_chosen_layers(teacher) -> None:
    student = keep_layers(teacher, [0, 2])
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    t_layers, s_layers = teacher.bert.encoder.layer, student.bert.encoder.layer
    for s_idx, t_idx in enumerate([0, 2]):
        for (name, p_s), (_, p_t) in zip(s_layers[s_idx].named_parameters(),
                                         t_layers[t_idx].named_parameters()):
            assert torch.equal(p_s, p_t), name
            assert p_s.data_ptr() != p_t.data_ptr()  # a copy, not shared storage
    per_layer = sum(p.numel() for p in t_layers[0].parameters())
    assert count_params(teacher)[0] - count_params(student)[0] == 2 * per_layer


def test_out_of_range_layer_is_a_clear_error(teacher) -> None:
    with pytest.raises(DistillError, match=r"\[7\] out of range; the teacher has 4 layers"):
        keep_layers(teacher, [0, 7])


def test_student_reloads_with_plain_transformers(teacher, tmp_path: Path) -> None:
    student = keep_layers(teacher, [1, 3]).eval()
    save_model(student, None, tmp_path / "student")
    assert (tmp_path / "student" / "model.safetensors").is_file()
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "student").eval()
    x = torch.randint(5, 40, (2, 7))
    torch.testing.assert_close(again(input_ids=x).logits, student(input_ids=x).logits)
    assert again.config.id2label == {0: "neg", 1: "pos"}


def test_head_for_same_labels_counts_as_tuned(teacher, tmp_path: Path) -> None:
    save_model(teacher, None, tmp_path / "t")
    _, tuned = classifier(str(tmp_path / "t"), ["neg", "pos"])
    assert tuned is True
    model, tuned_other = classifier(str(tmp_path / "t"), ["a", "b", "c"])
    assert tuned_other is False and model.config.num_labels == 3
