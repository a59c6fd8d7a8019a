"""Loss oracles: our losses against hand-written formulas and torch.nn.functional."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from distill.tasks import get_task
from distill.kd.losses import (DistillationLoss, LossWeights, attention_kl_loss, cosine_loss,
                            default_layer_map, hard_ce_loss, hidden_mse_loss, kd_kl_loss)


def hand_kd(zs: torch.Tensor, zt: torch.Tensor, T: float) -> float:
    """T² · mean over rows of Σ_c p_T,c · (log p_T,c − log p_S,c), written out in Python."""
    total = 0.0
    for s_row, t_row in zip(zs.tolist(), zt.tolist()):
        es = [math.exp(v / T) for v in s_row]
        et = [math.exp(v / T) for v in t_row]
        ps = [v / sum(es) for v in es]
        pt = [v / sum(et) for v in et]
        total += sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
    return T * T * total / len(zs)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_kd_matches_hand_formula_and_kl_div(T: float) -> None:
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g) * 3
    ours = kd_kl_loss(zs, zt, T)
    assert ours.item() == pytest.approx(hand_kd(zs, zt, T), rel=1e-5)
    ref = F.kl_div(F.log_softmax(zs / T, -1), F.log_softmax(zt / T, -1), log_target=True,
                   reduction="batchmean") * T * T
    torch.testing.assert_close(ours, ref)


def test_kd_is_zero_for_identical_logits_and_positive_otherwise() -> None:
    z = torch.randn(4, 3)
    assert kd_kl_loss(z, z.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_kl_loss(z, z.flip(-1), 2.0).item() > 0


def test_kd_token_level_masks_ignore_index() -> None:
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(2, 6, 7, generator=g), torch.randn(2, 6, 7, generator=g)
    labels = torch.tensor([[1, 2, -100, 3, -100, 0], [-100, -100, 4, 4, 4, 4]])
    keep = labels.reshape(-1) != -100
    expected = hand_kd(zs.reshape(-1, 7)[keep], zt.reshape(-1, 7)[keep], 2.0)
    assert kd_kl_loss(zs, zt, 2.0, labels).item() == pytest.approx(expected, rel=1e-5)


def test_all_masked_gives_zero_not_nan_and_keeps_graph() -> None:
    zs = torch.randn(2, 3, 5, requires_grad=True)
    labels = torch.full((2, 3), -100)
    for loss in (kd_kl_loss(zs, torch.randn(2, 3, 5), 2.0, labels), hard_ce_loss(zs, labels)):
        assert loss.item() == 0.0 and not torch.isnan(loss)
        loss.backward()
        assert zs.grad is not None and torch.all(zs.grad == 0)


def test_kd_slices_padded_teacher_vocabulary() -> None:
    zs, zt = torch.randn(3, 4), torch.randn(3, 6)
    torch.testing.assert_close(kd_kl_loss(zs, zt, 1.0), kd_kl_loss(zs, zt[:, :4], 1.0))


def test_kd_in_float32_for_bf16_inputs() -> None:
    zs, zt = torch.randn(4, 5), torch.randn(4, 5)
    loss = kd_kl_loss(zs.bfloat16(), zt.bfloat16(), 2.0)
    assert loss.dtype == torch.float32
    ref = kd_kl_loss(zs.bfloat16().float(), zt.bfloat16().float(), 2.0)
    torch.testing.assert_close(loss, ref)


def test_ce_matches_functional() -> None:
    z, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, -100, 1])
    torch.testing.assert_close(hard_ce_loss(z, y), F.cross_entropy(z, y, ignore_index=-100))


def test_hidden_mse_over_real_tokens_with_projection() -> None:
    g = torch.Generator().manual_seed(2)
    hs, ht = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 12, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    proj = torch.nn.Linear(8, 12)
    ours = hidden_mse_loss(hs, ht, mask, proj)
    ref = F.mse_loss(proj(hs)[mask.bool()], ht[mask.bool()])
    torch.testing.assert_close(ours, ref)


def test_attention_kl_matches_formula_and_averages_heads() -> None:
    g = torch.Generator().manual_seed(3)
    a_s = torch.softmax(torch.randn(2, 4, 5, 5, generator=g), -1)
    a_t = torch.softmax(torch.randn(2, 4, 5, 5, generator=g), -1)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    ref = F.kl_div(a_s.log(), a_t, reduction="none").sum(-1)  # [B, h, n]
    ref = ref[mask.bool()[:, None, :].expand_as(ref)].mean()
    torch.testing.assert_close(attention_kl_loss(a_s, a_t, mask), ref, rtol=1e-4, atol=1e-6)
    # different head counts: compare head-averaged maps
    a_t8 = torch.softmax(torch.randn(2, 8, 5, 5, generator=g), -1)
    ref2 = F.kl_div(a_s.mean(1).log(), a_t8.mean(1), reduction="none").sum(-1).mean()
    torch.testing.assert_close(attention_kl_loss(a_s, a_t8), ref2, rtol=1e-4, atol=1e-6)


def test_cosine_matches_cosine_embedding_loss() -> None:
    hs, ht = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    ref = F.cosine_embedding_loss(hs.reshape(-1, 6), ht.reshape(-1, 6), torch.ones(8))
    torch.testing.assert_close(cosine_loss(hs, ht), ref)


def test_default_layer_map() -> None:
    assert default_layer_map(3, 6) == [1, 3, 5]
    assert default_layer_map(2, 6) == [2, 5]
    assert default_layer_map(4, 4) == [0, 1, 2, 3]


def test_combined_loss_is_weighted_sum() -> None:
    g = torch.Generator().manual_seed(4)
    B, n, C = 3, 4, 2
    hid_s = [torch.randn(B, n, 8, generator=g) for _ in range(3)]
    hid_t = [torch.randn(B, n, 8, generator=g) for _ in range(5)]
    s = SimpleNamespace(logits=torch.randn(B, C, generator=g), hidden_states=hid_s)
    t = SimpleNamespace(logits=torch.randn(B, C, generator=g), hidden_states=hid_t)
    y, mask = torch.tensor([0, 1, 1]), torch.ones(B, n)
    w = LossWeights(alpha=0.3, temperature=2.0, hidden_mse=0.5, cosine=0.2)
    loss_fn = DistillationLoss(get_task("sequence-classification"), w, [1, 3], 8, 8)
    batch = {"labels": y, "attention_mask": mask}
    total, parts = loss_fn(s, t, batch)
    expected = (0.3 * F.cross_entropy(s.logits, y)
                + 0.7 * kd_kl_loss(s.logits, t.logits, 2.0)
                + 0.5 * (hidden_mse_loss(hid_s[1], hid_t[2], mask)
                         + hidden_mse_loss(hid_s[2], hid_t[4], mask)) / 2
                + 0.2 * cosine_loss(hid_s[-1], hid_t[-1], mask))
    torch.testing.assert_close(total, expected)
    assert set(parts) == {"loss_ce", "loss_kd", "loss_hidden", "loss_cos"}
    # alpha = 1 is plain fine-tuning: no teacher term at all
    total1, parts1 = DistillationLoss(get_task("sequence-classification"), LossWeights(alpha=1.0),
                                      [0], 8, 8)(s, None, batch)
    torch.testing.assert_close(total1, F.cross_entropy(s.logits, y))
    assert set(parts1) == {"loss_ce"}
