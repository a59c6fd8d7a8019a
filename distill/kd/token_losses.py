"""Token-level distillation losses for language models (METHODS.md §1), memory-bounded.

Five divergences between the teacher's and the student's next-token distributions, each at a
temperature T and scaled by T² (the gradient size stays independent of T):

    forward_kl        KL(p_T ‖ p_S)                       mean-seeking (Hinton)
    reverse_kl        KL(p_S ‖ p_T)                       mode-seeking
    jsd               β·KL(p_T ‖ m) + (1−β)·KL(p_S ‖ m),  m = β·p_T + (1−β)·p_S   (GKD)
    skew_forward_kl   KL(p_T ‖ λ·p_T + (1−λ)·p_S)         (DistiLLM's SKL)
    skew_reverse_kl   KL(p_S ‖ λ·p_S + (1−λ)·p_T)         (DistiLLM's SRKL)

The β of `jsd` follows TRL's `generalized_jsd_loss` (GKD, Agarwal et al. 2024): β = 0 is forward
KL and β = 1 reverse KL (the formula itself vanishes at both ends, so the limits are the two
KLs by definition, as in TRL). The teacher may be given whole (logits [B, n, V]) or as its top-k
(`TopK`: k log-probabilities and indices per position and the log of the remaining mass); the
student is then compared on those k tokens plus one tail bucket, a proper (k+1)-way
distribution, so that k = V is exactly full KD.

Memory: the float32 log-softmax of both models is computed for `chunk_size` positions at a time,
and each chunk's gradient is taken as soon as its value is (`_ChunkedSum`), so float32
[B, n, V] tensors of teacher and student never exist for the whole batch (a 49k-row vocabulary
at 4×512 tokens is 400 MB per float32 copy; 150k+ rows for Llama-3/Qwen users). The forward KL,
the default, takes its gradient in closed form (`_forward_kl_sum`), the others by autograd.
Positions whose next token carries no loss (padding, the prompt of instruction data) are
masked; the loss is the mean over the remaining positions, exactly 0 (still on the graph) when
none remains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl"]
DIVERGENCES: tuple[str, ...] = Divergence.__args__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class TopK:
    """The teacher's k most probable next tokens per position, at the loss's temperature.

    Attributes:
        log_probs: [B, n, k] float32, log p_T of the k tokens (descending).
        indices: [B, n, k] int64, their token ids.
        tail: [B, n] float32, log of the mass of every other token (-inf when k = V).
    """

    log_probs: Tensor
    indices: Tensor
    tail: Tensor

    def flat(self) -> TopK:
        k = self.indices.shape[-1]
        return TopK(self.log_probs.reshape(-1, k), self.indices.reshape(-1, k),
                    self.tail.reshape(-1))

    def rows(self, start: int, end: int) -> TopK:
        return TopK(self.log_probs[start:end], self.indices[start:end], self.tail[start:end])


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a ‖ b) per row of log-probabilities [N, K] -> [N]; 0·log 0 = 0 (a top-k tail with
    k = V has no mass)."""
    terms = log_a.exp() * (log_a - log_b)
    return torch.where(torch.isneginf(log_a), torch.zeros_like(terms), terms).sum(-1)


def _mix(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(w·a + (1−w)·b) for rows of log-probabilities, 0 < w < 1."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def divergence(log_t: Tensor, log_s: Tensor, kind: str = "forward_kl", beta: float = 0.5,
               skew: float = 0.1) -> Tensor:
    """The divergence `kind` between teacher and student rows of log-probabilities.

    Args:
        log_t, log_s: [N, K] float32 log-probabilities over the same K outcomes.
        kind: one of `DIVERGENCES` (see the module docstring).
        beta: the teacher's weight in the `jsd` mixture, 0 ≤ β ≤ 1.
        skew: λ of the skew KLs, 0 ≤ λ < 1 (λ = 0 is the plain KL).
    Returns:
        [N] divergences (no temperature scaling).
    """
    if kind == "forward_kl":
        return _kl(log_t, log_s)
    if kind == "reverse_kl":
        return _kl(log_s, log_t)
    if kind == "jsd":
        if beta == 0:
            return _kl(log_t, log_s)
        if beta == 1:
            return _kl(log_s, log_t)
        m = _mix(log_t, log_s, beta)
        return beta * _kl(log_t, m) + (1 - beta) * _kl(log_s, m)
    if kind == "skew_forward_kl":
        return _kl(log_t, _mix(log_t, log_s, skew) if skew > 0 else log_s)
    if kind == "skew_reverse_kl":
        return _kl(log_s, _mix(log_s, log_t, skew) if skew > 0 else log_t)
    raise ValueError(f"unknown divergence {kind!r}; allowed: {', '.join(DIVERGENCES)}")


def top_k(teacher_logits: Tensor, k: int, temperature: float = 1.0,
          vocab_size: int | None = None) -> TopK:
    """The teacher's top-k at temperature T (what the teacher cache stores).

    Args:
        teacher_logits: [B, n, V].
        vocab_size: the tokenizer's size; padded rows past it are left out.
    """
    if vocab_size is not None:
        teacher_logits = teacher_logits[..., :vocab_size]
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    values, indices = log_p.topk(k, dim=-1)
    return TopK(values, indices, log_p.scatter(-1, indices, -math.inf).logsumexp(-1))


def _student_on_top_k(log_s: Tensor, indices: Tensor) -> Tensor:
    """The student's log-probabilities on the teacher's k tokens plus the tail bucket.

    Args:
        log_s: [N, V]; indices: [N, k]. Returns [N, k+1].
    """
    tail = log_s.scatter(-1, indices, -math.inf).logsumexp(-1, keepdim=True)
    return torch.cat([log_s.gather(-1, indices), tail], dim=-1)


class _ChunkedSum(torch.autograd.Function):
    """Σ over chunks of `fn(logits[rows of the chunk], *args)`, with the gradient of every
    chunk computed as soon as its value is (the Liger-kernel way): the float32 temporaries of
    one chunk exist at a time, nothing is recomputed, and the gradient is written straight into
    one buffer of the logits' shape and dtype (no full-size zeros per chunk to add up). Chunks
    come in order of their rows.

    forward(logits [R, V], fn, chunks: [(start, end, args)], closed_form) -> float32 scalar.
    With `closed_form`, `fn(part, *args, need_grad)` returns (value, gradient or None) itself
    instead of a value that autograd differentiates.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, fn, chunks: list,  # type: ignore[override]
                closed_form: bool = False) -> Tensor:
        need = logits.requires_grad
        # Every chunk writes its rows; only the rows of no chunk (padding only) are zeroed.
        grad = torch.empty_like(logits) if need else None
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        done = 0
        for start, end, args in chunks:
            if need and start > done:
                grad[done:start].zero_()
            done = end
            part = logits[start:end].detach()
            if closed_form:
                value, part_grad = fn(part, *args, need)
                if need:
                    grad[start:end] = part_grad
            elif need:
                part.requires_grad_(True)
                with torch.enable_grad():
                    value = fn(part, *args)
                grad[start:end] = torch.autograd.grad(value, part)[0]
            else:
                value = fn(part, *args)
            total += value.detach()
        if need and done < logits.shape[0]:
            grad[done:].zero_()
        ctx.save_for_backward(grad) if need else None
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        # In place: the buffer serves this one backward pass (no double backward).
        return grad.mul_(grad_out.to(grad.dtype)), None, None, None


def _chunk_sum(student: Tensor, teacher: Tensor | TopK, mask: Tensor, temperature: float,
               kind: str, beta: float, skew: float) -> Tensor:
    """Sum over the masked rows of one chunk: student [N, V], teacher [N, V] or TopK of N rows,
    mask [N] bool. Float32 from here on."""
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    if isinstance(teacher, TopK):
        log_t = torch.cat([teacher.log_probs.float(), teacher.tail.float()[:, None]], dim=-1)
        log_s = _student_on_top_k(log_s, teacher.indices)
    else:
        log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    per_row = divergence(log_t, log_s, kind, beta, skew)
    return torch.where(mask, per_row, torch.zeros_like(per_row)).sum()


def _is_forward_kl(kind: str, beta: float, skew: float) -> bool:
    """Whether `divergence(kind, beta, skew)` is the plain forward KL(p_T ‖ p_S)."""
    return (kind == "forward_kl" or (kind == "jsd" and beta == 0)
            or (kind == "skew_forward_kl" and skew == 0))


def _forward_kl_sum(student: Tensor, teacher: Tensor | TopK, mask: Tensor, temperature: float,
                    need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """`_chunk_sum` for the forward KL, with its gradient in closed form (no autograd graph).

    With z = student / T, q = softmax(z) and the teacher's p:

        ∂KL(p ‖ q)/∂z_j = q_j − p_j                      (whole teacher; top-k: j in the top-k)
                        = q_j · (1 − p_tail / q_tail)    (top-k: j in the tail bucket, whose
                                                          gradient spreads over its tokens as q)

    and ∂/∂student = ∂/∂z / T. One log-softmax, one logsumexp for the tail, one exp: autograd
    through the log-softmax, the tail's scatter and logsumexp and their backward passes takes
    several times as long (`bench/token_loss_speed.py` times both, alone and in a LoRA heal
    step of the 20-layer SmolLM2).

    Args:
        student: [N, V] logits; teacher: [N, V] logits or `TopK` of N rows; mask: [N] bool.
    Returns:
        (float32 summed KL over the masked rows, [N, V] float32 gradient or None).
    """
    z = student.float()
    if temperature != 1.0:
        z = z / temperature
    log_q = F.log_softmax(z, dim=-1)
    del z
    if isinstance(teacher, TopK):
        idx = teacher.indices
        log_p_top, log_p_tail = teacher.log_probs.float(), teacher.tail.float()
        log_q_top = log_q.gather(-1, idx)
        log_q_tail = log_q.scatter(-1, idx, -math.inf).logsumexp(-1)  # [N]
        per_row = _kl(torch.cat([log_p_top, log_p_tail[:, None]], dim=-1),
                      torch.cat([log_q_top, log_q_tail[:, None]], dim=-1))
    else:
        # The whole vocabulary: few passes over [N, V] and few fresh [N, V] buffers. p is
        # computed once for the value and the gradient, log p turns into log p − log q in
        # place, and the row sums are dot products (no [N, V] temporaries for them).
        log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
        p = log_p.exp()
        # 0·log 0 = 0: a token the teacher rules out (logit −inf) adds p·(finite) = 0.
        diff = log_p.clamp_(min=torch.finfo(log_p.dtype).min).sub_(log_q)
        per_row = torch.linalg.vecdot(p, diff)
        del diff, log_p
    value = torch.where(mask, per_row, torch.zeros_like(per_row)).sum()
    if not need_grad:
        return value, None
    grad = log_q.exp_()  # q, in place of log q
    if isinstance(teacher, TopK):
        ratio = torch.where(torch.isneginf(log_p_tail), torch.zeros_like(log_p_tail),
                            torch.exp(log_p_tail - log_q_tail))  # p_tail / q_tail; k = V: 0
        grad.mul_((1.0 - ratio)[:, None])
        grad.scatter_(-1, idx, log_q_top.exp() - log_p_top.exp())
    else:
        grad.sub_(p)
    if temperature != 1.0 or not bool(mask.all()):
        grad.mul_((mask.to(grad.dtype) / temperature)[:, None])
    return value, grad


def token_kd_loss(student_logits: Tensor, teacher: Tensor | TopK, mask: Tensor | None = None,
                  *, temperature: float = 1.0, kind: str = "forward_kl", beta: float = 0.5,
                  skew: float = 0.1, chunk_size: int = 1024, vocab_size: int | None = None
                  ) -> Tensor:
    """`T² · divergence(p_T, p_S)` per position, averaged over the positions of `mask`.

    Args:
        student_logits: [B, n, V_s] (any float dtype).
        teacher: logits [B, n, V_t] (a padded vocabulary of the same family: both are sliced
            to the smaller size, or to `vocab_size`), or the teacher's `TopK` at this
            temperature (computed on logits sliced the same way).
        mask: [B, n] bool, the positions that carry loss (`next_token_mask`); None: all.
        temperature: T > 0. kind, beta, skew: see `divergence`.
        chunk_size: positions per float32 chunk (memory: 2 · chunk_size · V floats, plus
            what the backward pass recomputes for one chunk).
        vocab_size: the tokenizer's size: rows past it (padding of the embedding table, never
            a real token) are left out of both distributions.
    Returns:
        scalar.
    """
    if vocab_size is not None:
        student_logits = student_logits[..., :vocab_size]
    if not isinstance(teacher, TopK):
        vocab = min(student_logits.shape[-1], teacher.shape[-1])
        student_logits, teacher = student_logits[..., :vocab], teacher[..., :vocab]
    rows = student_logits.shape[0] * student_logits.shape[1]
    student = student_logits.reshape(rows, -1)
    teach = teacher.flat() if isinstance(teacher, TopK) else teacher.reshape(rows, -1)
    keep = (torch.ones(rows, dtype=torch.bool, device=student.device) if mask is None
            else mask.reshape(rows).to(torch.bool))
    count = int(keep.sum())
    if count == 0:
        return student_logits.sum() * 0.0
    closed_form = _is_forward_kl(kind, beta, skew)
    chunks = []
    for start in range(0, rows, chunk_size):
        end = min(start + chunk_size, rows)
        if keep[start:end].any():  # a chunk of padding only costs nothing
            part = teach.rows(start, end) if isinstance(teach, TopK) else teach[start:end]
            args = (part, keep[start:end], temperature) + (
                () if closed_form else (kind, beta, skew))
            chunks.append((start, end, args))
    fn = _forward_kl_sum if closed_form else _chunk_sum
    total = _ChunkedSum.apply(student, fn, chunks, closed_form)
    return temperature**2 * total / count


def _chunk_nll(part: Tensor, target: Tensor) -> Tensor:
    """Summed cross-entropy of one chunk of rows [N, V] against targets [N], float32."""
    return F.cross_entropy(part.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")


def token_nll(logits: Tensor, labels: Tensor, chunk_size: int = 1024) -> tuple[Tensor, int]:
    """Summed next-token negative log-likelihood in float32 chunks, and the token count.

    Position t's logits predict `labels[t+1]` (the shift happens here); IGNORE_INDEX labels
    (padding, prompts) are not predicted. A vocabulary padded beyond the tokenizer's is
    harmless: padded rows are never a label.

    Args:
        logits: [B, n, V], any float dtype; labels: [B, n] int64, unshifted (the Hugging Face
            convention).
    Returns:
        (float32 scalar sum of −log p(label), number of predicted tokens).
    """
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    rows = targets.numel()
    flat_logits = logits.reshape(rows, -1)
    flat = targets.reshape(rows).to(flat_logits.device)

    chunks = [(start, start + chunk_size, (flat[start:start + chunk_size],))
              for start in range(0, rows, chunk_size)
              if (flat[start:start + chunk_size] != IGNORE_INDEX).any()]
    total = _ChunkedSum.apply(flat_logits, _chunk_nll, chunks, False)
    return total, int((flat != IGNORE_INDEX).sum())


def token_ce_loss(student_logits: Tensor, labels: Tensor, chunk_size: int = 1024) -> Tensor:
    """Mean next-token cross-entropy over the target tokens (`token_nll`); 0 (on the graph)
    when there is none.

    Args:
        student_logits: [B, n, V]; labels: [B, n], unshifted, IGNORE_INDEX where no loss is
            taken.
    """
    total, count = token_nll(student_logits, labels, chunk_size)
    return total / count if count else student_logits.sum() * 0.0


def next_token_mask(labels: Tensor) -> Tensor:
    """[B, n] bool: the positions whose next token carries loss (the last position never)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def token_distill_loss(student_logits: Tensor, teacher: Tensor | TopK, labels: Tensor, *,
                       alpha: float = 0.5, temperature: float = 1.0, kind: str = "forward_kl",
                       beta: float = 0.5, skew: float = 0.1, chunk_size: int = 1024,
                       vocab_size: int | None = None) -> tuple[Tensor, dict[str, float]]:
    """`α · CE + (1 − α) · T² · divergence` over the target tokens of `labels`.

    Args:
        student_logits: [B, n, V]; teacher: logits [B, n, V'] or `TopK`; labels: [B, n] (HF
            convention, IGNORE_INDEX where no loss is taken).
    Returns:
        (loss, {"ce": ..., "kd": ...}) with the parts as floats for the log.
    """
    mask = next_token_mask(labels)
    kd = token_kd_loss(student_logits, teacher, mask, temperature=temperature, kind=kind,
                       beta=beta, skew=skew, chunk_size=chunk_size,
                       vocab_size=vocab_size) if alpha < 1 else None
    ce = token_ce_loss(student_logits, labels, chunk_size) if alpha > 0 else None
    loss = (alpha * ce if ce is not None else 0.0) + ((1 - alpha) * kd if kd is not None
                                                       else 0.0)
    parts = {name: float(v.detach()) for name, v in (("ce", ce), ("kd", kd)) if v is not None}
    return loss, parts
