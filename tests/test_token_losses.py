"""Token-level distillation losses (distill/kd/token_losses.py) against references no one here
wrote: hand-written float64 formulas, `torch.nn.functional`, TRL's `generalized_jsd_loss`, and
the loss a Hugging Face causal LM computes itself."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from distill.kd.losses import kd_kl_loss
from distill.kd.token_losses import (
    DIVERGENCES,
    IGNORE_INDEX,
    next_token_mask,
    token_ce_loss,
    token_distill_loss,
    token_kd_loss,
    top_k,
)

B, N, V = 3, 7, 11


def logits(seed: int, *shape: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


@pytest.fixture
def pair() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student and teacher logits [B, N, V] and a mask [B, N] with a few positions off."""
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, -2:] = False  # padding
    mask[2, :3] = False  # a prompt
    return logits(0, B, N, V), logits(1, B, N, V), mask


# ----------------------------------------------------------------------------- hand-written
def kl64(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def softmax64(z: torch.Tensor, t: float) -> list[float]:
    e = [math.exp(float(x) / t) for x in z]
    s = sum(e)
    return [x / s for x in e]


def by_hand(kind: str, zs: torch.Tensor, zt: torch.Tensor, t: float, beta: float,
            skew: float) -> float:
    """One position's divergence, in float64 Python, from the definitions of METHODS.md §1."""
    ps, pt = softmax64(zs, t), softmax64(zt, t)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        return kl64(pt, ps)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return kl64(ps, pt)
    if kind == "jsd":
        m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps)]
        return beta * kl64(pt, m) + (1 - beta) * kl64(ps, m)
    if kind == "skew_forward_kl":
        return kl64(pt, [skew * a + (1 - skew) * b for a, b in zip(pt, ps)])
    return kl64(ps, [skew * b + (1 - skew) * a for a, b in zip(pt, ps)])  # skew_reverse_kl


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("t", [1.0, 2.5])
def test_every_divergence_matches_its_formula(pair, kind: str, t: float) -> None:
    s, te, mask = pair
    beta, skew = 0.3, 0.2
    expected = [by_hand(kind, s[b, i], te[b, i], t, beta, skew)
                for b in range(B) for i in range(N) if mask[b, i]]
    got = token_kd_loss(s, te, mask, temperature=t, kind=kind, beta=beta, skew=skew)
    assert got.item() == pytest.approx(t * t * sum(expected) / len(expected), rel=1e-5)


@pytest.mark.parametrize("kind", ["jsd"])
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_limits_are_the_two_kls(pair, kind: str, beta: float) -> None:
    s, te, mask = pair
    other = "forward_kl" if beta == 0 else "reverse_kl"
    assert torch.equal(token_kd_loss(s, te, mask, kind=kind, beta=beta),
                       token_kd_loss(s, te, mask, kind=other))


def test_skew_zero_is_the_plain_kl(pair) -> None:
    s, te, mask = pair
    for skewed, plain in (("skew_forward_kl", "forward_kl"), ("skew_reverse_kl", "reverse_kl")):
        assert torch.allclose(token_kd_loss(s, te, mask, kind=skewed, skew=0.0),
                              token_kd_loss(s, te, mask, kind=plain))


def test_forward_kl_is_the_classification_kd_loss(pair) -> None:
    """One KL, two entry points: the encoder path's `kd_kl_loss` on [B, N, V] with a label
    mask and the token loss with the same mask agree."""
    s, te, mask = pair
    labels = torch.where(mask, 0, IGNORE_INDEX)
    assert torch.allclose(kd_kl_loss(s, te, 2.0, labels),
                          token_kd_loss(s, te, mask, temperature=2.0), atol=1e-6)


# ----------------------------------------------------------------------------- TRL
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("t", [1.0, 2.0])
def test_jsd_equals_trl_generalized_jsd_loss(pair, beta: float, t: float) -> None:
    """TRL's GKD loss (per token, mean over `labels != -100`, no T²) on the same logits."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental import gkd  # a dev dependency: the oracle runs, never skips

    s, te, mask = pair
    labels = torch.where(mask, 1, IGNORE_INDEX)
    theirs = gkd.GKDTrainer.generalized_jsd_loss(s, te, labels=labels, beta=beta,
                                                 temperature=t)
    ours = token_kd_loss(s, te, mask, temperature=t, kind="jsd", beta=beta)
    assert ours.item() == pytest.approx(t * t * theirs.item(), rel=1e-5, abs=1e-7)


# ----------------------------------------------------------------------------- top-k
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_top_k_with_k_equal_to_the_vocabulary_is_full_kd(pair, kind: str) -> None:
    s, te, mask = pair
    full = token_kd_loss(s, te, mask, temperature=2.0, kind=kind, beta=0.4, skew=0.1)
    cached = token_kd_loss(s, top_k(te, V, 2.0), mask, temperature=2.0, kind=kind, beta=0.4,
                           skew=0.1)
    assert cached.item() == pytest.approx(full.item(), abs=1e-6)


def test_top_k_compares_k_tokens_and_one_tail_bucket(pair) -> None:
    s, te, mask = pair
    k, t = 3, 1.5
    got = token_kd_loss(s, top_k(te, k, t), mask, temperature=t)
    expected = []
    for b in range(B):
        for i in range(N):
            if not mask[b, i]:
                continue
            pt, ps = softmax64(te[b, i], t), softmax64(s[b, i], t)
            top = sorted(range(V), key=lambda j: -pt[j])[:k]
            bucket_t = [pt[j] for j in top] + [sum(pt[j] for j in range(V) if j not in top)]
            bucket_s = [ps[j] for j in top] + [sum(ps[j] for j in range(V) if j not in top)]
            expected.append(kl64(bucket_t, bucket_s))
    assert got.item() == pytest.approx(t * t * sum(expected) / len(expected), rel=1e-5)
    cache = top_k(te, k, t)  # what a cache stores: k log-probs, ids, the tail's log-mass
    assert cache.log_probs.shape == (B, N, k) and cache.tail.shape == (B, N)
    total = cache.log_probs.exp().sum(-1) + cache.tail.exp()
    assert torch.allclose(total, torch.ones(B, N), atol=1e-6)


def forward_kl64(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, t: float,
                 k: int | None) -> torch.Tensor:
    """T² · mean forward KL over the masked positions in float64 autograd ops: the whole
    distributions, or the teacher's top-k tokens plus one tail bucket on both sides."""
    log_q = torch.log_softmax(student.double() / t, dim=-1)
    log_p = torch.log_softmax(teacher.double() / t, dim=-1)
    if k is not None:
        top = log_p.topk(k, dim=-1).indices
        in_top = torch.zeros_like(log_p, dtype=torch.bool).scatter(-1, top, True)

        def buckets(lp: torch.Tensor) -> torch.Tensor:
            tail = lp.masked_fill(in_top, -math.inf).logsumexp(-1, keepdim=True)
            return torch.cat([lp.gather(-1, top), tail], dim=-1)
        log_p, log_q = buckets(log_p), buckets(log_q)
    per_row = (log_p.exp() * (log_p - log_q)).nan_to_num(0.0).sum(-1)
    return t * t * per_row[mask].mean()


@pytest.mark.parametrize("k", [None, 3, V], ids=["whole", "top3", "topV"])
@pytest.mark.parametrize("t", [1.0, 2.5])
@pytest.mark.parametrize("kind", ["forward_kl", "jsd", "skew_forward_kl"])
def test_the_forward_kl_gradient_in_closed_form_is_autograds(pair, k: int | None, t: float,
                                                             kind: str) -> None:
    """The forward KL (and the jsd / skew settings that are it) takes its gradient in closed
    form: it must be what float64 autograd gives on the formula, bucket and mask included."""
    s, te, mask = pair
    student = s.clone().requires_grad_(True)
    teacher = te if k is None else top_k(te, k, t)
    loss = token_kd_loss(student, teacher, mask, temperature=t, kind=kind, beta=0.0, skew=0.0,
                         chunk_size=4)
    loss.backward()
    oracle = s.double().clone().requires_grad_(True)
    expected = forward_kl64(oracle, te, mask, t, k)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert (student.grad.double() - oracle.grad).abs().max().item() <= 1e-7
    assert student.grad[~mask].abs().max() == 0


# ----------------------------------------------------------------------------- chunks, masks
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_chunked_equals_unchunked_in_value_and_gradient(pair, kind: str) -> None:
    s, te, mask = pair
    results = []
    for chunk in (2, 5, 10_000):
        student = s.clone().requires_grad_(True)
        loss = token_kd_loss(student, te, mask, temperature=2.0, kind=kind, chunk_size=chunk)
        loss.backward()
        results.append((loss.detach(), student.grad))
    for loss, grad in results[:-1]:
        assert (loss - results[-1][0]).abs().item() <= 1e-6
        assert (grad - results[-1][1]).abs().max().item() <= 1e-6


def test_masked_positions_change_nothing_and_get_no_gradient(pair) -> None:
    s, te, mask = pair
    student = s.clone().requires_grad_(True)
    loss = token_kd_loss(student, te, mask, chunk_size=4)
    loss.backward()
    assert student.grad[~mask].abs().max() == 0 and student.grad[mask].abs().max() > 0
    noisy = s.clone()
    noisy[~mask] = logits(5, int((~mask).sum()), V)
    assert torch.equal(token_kd_loss(noisy, te, mask, chunk_size=4), loss.detach())


def test_a_chunk_of_padding_only_gets_a_zero_gradient(pair) -> None:
    """A chunk whose positions are all masked is skipped; its rows of the gradient are zeros
    (the buffer is not zero-filled up front), the rest as with one chunk."""
    s, te, mask = pair
    mask = mask.clone()
    mask[1] = False  # rows 7..13: exactly the second chunk of 7
    grads = []
    for chunk in (N, 10_000):
        student = s.clone().requires_grad_(True)
        token_kd_loss(student, te, mask, chunk_size=chunk).backward()
        grads.append(student.grad)
    assert torch.equal(grads[0][1], torch.zeros(N, V))
    assert (grads[0] - grads[1]).abs().max().item() <= 1e-6


def test_a_token_the_teacher_rules_out_adds_nothing(pair) -> None:
    """A teacher logit of −inf (p = 0): 0·log 0 = 0, so the loss is finite and matches the
    float64 formula; the gradient is finite too."""
    s, te, mask = pair
    te = te.clone()
    te[0, 1, 4] = -math.inf
    student = s.clone().requires_grad_(True)
    loss = token_kd_loss(student, te, mask, temperature=2.0)
    loss.backward()
    rows = [(b, n) for b in range(B) for n in range(N) if mask[b, n]]
    expected = 4.0 * sum(kl64(softmax64(te[b, n], 2.0), softmax64(s[b, n], 2.0))
                         for b, n in rows) / len(rows)
    assert abs(loss.item() - expected) <= 1e-5 * expected
    assert torch.isfinite(student.grad).all()


def test_nothing_to_learn_from_is_zero_not_nan(pair) -> None:
    s, te, _ = pair
    student = s.clone().requires_grad_(True)
    none = torch.zeros(B, N, dtype=torch.bool)
    loss = token_kd_loss(student, te, none) + token_ce_loss(student, torch.full(
        (B, N), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(student.grad, torch.zeros_like(s))


def test_a_padded_teacher_vocabulary_is_sliced(pair) -> None:
    s, te, mask = pair
    padded = torch.cat([te, torch.full((B, N, 5), 9.0)], dim=-1)  # rows of the padding
    assert torch.equal(token_kd_loss(s, padded, mask), token_kd_loss(s, te, mask))


def test_padded_rows_of_both_models_are_left_out_with_the_tokenizers_size(pair) -> None:
    """Both models padded past the tokenizer (SmolLM2's table has rows no token uses): with
    `vocab_size` their padding gets no probability; without it, it would."""
    s, te, mask = pair
    pad = torch.full((B, N, 4), 6.0)
    s_pad, t_pad = torch.cat([s, pad], -1), torch.cat([te, -pad], -1)
    exact = token_kd_loss(s, te, mask)
    assert torch.equal(token_kd_loss(s_pad, t_pad, mask, vocab_size=V), exact)
    assert not torch.allclose(token_kd_loss(s_pad, t_pad, mask), exact)
    cached = top_k(t_pad, V, vocab_size=V)
    assert cached.indices.max() < V
    assert token_kd_loss(s_pad, cached, mask, vocab_size=V).item() == pytest.approx(
        exact.item(), abs=1e-6)


def test_float32_copies_exist_for_one_chunk_at_a_time() -> None:
    """What the forward pass leaves alive for backward: no float32 copy of the logits at all
    (each chunk's float32 log-softmaxes are gone once its gradient is taken), only the gradient
    buffer in the logits' own dtype. A plain float32 loss keeps the batch's log-softmaxes."""
    import gc
    import weakref

    from distill.kd.token_losses import divergence

    s = logits(0, 4, 64, 50).to(torch.bfloat16).requires_grad_(True)
    te = logits(1, 4, 64, 50).to(torch.bfloat16)

    def alive_after(forward) -> list[tuple[torch.dtype, int]]:
        refs = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            refs.append(weakref.ref(t))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = forward()
        gc.collect()
        alive = [(r().dtype, r().numel()) for r in refs if r() is not None]
        loss.backward()
        return alive

    ours = alive_after(lambda: token_kd_loss(s, te, None, temperature=2.0, chunk_size=16))
    assert not [a for a in ours if a[0] == torch.float32], ours
    assert s.grad is not None and s.grad.abs().sum() > 0
    plain = alive_after(lambda: divergence(
        F.log_softmax(te.float().reshape(-1, 50), -1),
        F.log_softmax(s.float().reshape(-1, 50), -1)).mean())
    assert sum(n for dtype, n in plain if dtype == torch.float32) >= s.numel()


# ----------------------------------------------------------------------------- CE and the mix
def test_token_ce_is_the_loss_a_causal_lm_computes_itself() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, V, (B, N), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, -2:] = IGNORE_INDEX
    labels[2, :3] = IGNORE_INDEX
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    assert token_ce_loss(out.logits, labels, chunk_size=4).item() == pytest.approx(
        out.loss.item(), rel=1e-5)


def test_the_mix_is_alpha_ce_plus_one_minus_alpha_kd(pair) -> None:
    s, te, _ = pair
    labels = logits(9, B, N).abs().long() % V
    labels[1, 4:] = IGNORE_INDEX
    mask = next_token_mask(labels)
    assert not mask[:, -1].any() and not mask[1, 3:].any() and mask[1, :3].all()
    loss, parts = token_distill_loss(s, te, labels, alpha=0.3, temperature=2.0, kind="jsd")
    kd = token_kd_loss(s, te, mask, temperature=2.0, kind="jsd")
    shifted = labels[:, 1:].reshape(-1)
    ce = F.cross_entropy(s[:, :-1].reshape(-1, V), shifted, ignore_index=IGNORE_INDEX)
    assert loss.item() == pytest.approx(0.3 * ce.item() + 0.7 * kd.item(), rel=1e-6)
    assert parts == pytest.approx({"ce": ce.item(), "kd": kd.item()}, rel=1e-6)
    assert set(token_distill_loss(s, te, labels, alpha=1.0)[1]) == {"ce"}
    assert set(token_distill_loss(s, te, labels, alpha=0.0)[1]) == {"kd"}


def test_an_unknown_divergence_names_the_allowed_ones(pair) -> None:
    s, te, mask = pair
    with pytest.raises(ValueError, match="allowed: forward_kl, reverse_kl, jsd"):
        token_kd_loss(s, te, mask, kind="kl")
