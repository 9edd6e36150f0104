"""Recovery losses, computed chunk by chunk over supervised positions through the LM head.

Never materialise full-vocabulary float32 logits for a whole batch: for each chunk of positions the
student's (and teacher's) logits are formed, reduced to a loss sum, and dropped; the chunk is
recomputed in backward (activation checkpointing), so peak memory is one chunk's [chunk, V] logits.

All KL-family values are true divergences (zero when student == teacher), scaled by tau^2 as usual
for distillation so gradients keep their size across temperatures.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOSSES = ("ce", "kl", "reverse_kl", "jsd", "mixed")


@dataclass(frozen=True)
class LossSpec:
    kind: str = "kl"  # ce | kl (forward KL(p_t||p_s)) | reverse_kl | jsd | mixed (alpha*CE + (1-alpha)*KL)
    temperature: float = 1.0
    jsd_beta: float = 0.5
    alpha: float = 0.5

    @property
    def needs_teacher(self) -> bool:
        return self.kind != "ce"

    @property
    def needs_labels(self) -> bool:
        return self.kind in ("ce", "mixed")


def _up(x: torch.Tensor) -> torch.Tensor:
    """Loss math in float32 at least (bf16 logits upcast; float64 kept for reference checks)."""
    return x if x.dtype == torch.float64 else x.float()


def divergence_sum(s_logits: torch.Tensor, t_logits: torch.Tensor, kind: str, tau: float, beta: float) -> torch.Tensor:
    """Sum over rows of the divergence between teacher and student distributions at temperature tau."""
    log_ps = torch.log_softmax(_up(s_logits) / tau, dim=-1)
    log_pt = torch.log_softmax(_up(t_logits) / tau, dim=-1)
    if kind == "kl":
        d = F.kl_div(log_ps, log_pt, log_target=True, reduction="sum")  # sum p_t (log p_t - log p_s)
    elif kind == "reverse_kl":
        d = F.kl_div(log_pt, log_ps, log_target=True, reduction="sum")
    elif kind == "jsd":
        log_m = torch.logsumexp(torch.stack([log_pt + math.log(beta), log_ps + math.log(1 - beta)]), dim=0)
        d = beta * F.kl_div(log_m, log_pt, log_target=True, reduction="sum") \
            + (1 - beta) * F.kl_div(log_m, log_ps, log_target=True, reduction="sum")
    else:
        raise ValueError(f"unknown divergence {kind!r}")
    return d * tau * tau


def cached_kl_sum(s_logits: torch.Tensor, t_logprobs: torch.Tensor, t_ids: torch.Tensor, t_log_tail: torch.Tensor,
                  tau: float) -> torch.Tensor:
    """Forward KL from a top-k teacher cache: the teacher is k tokens plus one tail bucket holding the rest
    of its mass; the student's tail is 1 - its mass on the teacher's top-k ids. Exact when k = V.

    t_logprobs [N, k] are the teacher's log-probabilities at temperature tau, t_ids [N, k], t_log_tail [N].
    """
    log_ps = torch.log_softmax(_up(s_logits) / tau, dim=-1)
    log_ps_k = log_ps.gather(1, t_ids.long())
    # log of the student's remaining mass, computed stably from the tokens outside the top-k
    outside = log_ps.scatter(1, t_ids.long(), float("-inf"))
    log_ps_tail = torch.logsumexp(outside, dim=-1)
    t_k, t_tail = _up(t_logprobs), _up(t_log_tail)
    kl_k = (t_k.exp() * (t_k - log_ps_k)).sum()
    q_tail = t_tail.exp()
    # 0 * log 0 = 0: no tail when the cache holds the whole vocabulary
    kl_tail = torch.where(q_tail > 0, q_tail * (t_tail - log_ps_tail), torch.zeros_like(q_tail)).sum()
    return (kl_k + kl_tail) * tau * tau


def loss_sum_from_logits(s_logits, t_logits, labels, spec: LossSpec) -> torch.Tensor:
    if spec.kind == "ce":
        return F.cross_entropy(_up(s_logits), labels, reduction="sum")
    if spec.kind == "mixed":
        ce = F.cross_entropy(_up(s_logits), labels, reduction="sum")
        return spec.alpha * ce + (1 - spec.alpha) * divergence_sum(s_logits, t_logits, "kl", spec.temperature, 0.5)
    return divergence_sum(s_logits, t_logits, spec.kind, spec.temperature, spec.jsd_beta)


def chunked_loss(student_hidden: torch.Tensor, student_head: Callable[[torch.Tensor], torch.Tensor],
                 spec: LossSpec, labels: torch.Tensor | None = None,
                 teacher_hidden: torch.Tensor | None = None,
                 teacher_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 chunk_size: int = 1024, teacher_cache: tuple | None = None) -> torch.Tensor:
    """Mean loss over the N supervised positions; hidden states are [N, H] at those positions.

    The teacher is either live (its hidden states + LM head) or a top-k cache
    (`teacher_cache` = (logprobs [N, k], ids [N, k], log_tail [N]), forward KL only).
    """
    n = student_hidden.shape[0]
    if teacher_cache is not None:
        if spec.kind != "kl":
            raise ValueError(f"a top-k teacher cache supports train.loss=kl only, not '{spec.kind}'")
        if labels is not None:
            raise ValueError("loss 'kl' must not see labels (self-distillation is label-free)")

        def cached_chunk(h_s, lp, ids, tail):
            return cached_kl_sum(student_head(h_s), lp, ids, tail, spec.temperature)

        total = _up(student_hidden.new_zeros(()))
        for i in range(0, n, chunk_size):
            args = (student_hidden[i: i + chunk_size], *(t[i: i + chunk_size] for t in teacher_cache))
            if torch.is_grad_enabled() and student_hidden.requires_grad:
                total = total + checkpoint(cached_chunk, *args, use_reentrant=False)
            else:
                total = total + cached_chunk(*args)
        return total / max(n, 1)
    if spec.needs_labels and labels is None:
        raise ValueError(f"loss '{spec.kind}' needs labels")
    if not spec.needs_labels and labels is not None:
        raise ValueError(f"loss '{spec.kind}' must not see labels (self-distillation is label-free)")
    if spec.needs_teacher and (teacher_hidden is None or teacher_head is None):
        raise ValueError(f"loss '{spec.kind}' needs the teacher")

    def chunk(h_s, h_t, y):
        s_logits = student_head(h_s)
        t_logits = None
        if h_t is not None:
            with torch.no_grad():
                t_logits = teacher_head(h_t)
        return loss_sum_from_logits(s_logits, t_logits, y, spec)

    total = _up(student_hidden.new_zeros(()))
    for i in range(0, n, chunk_size):
        h_s = student_hidden[i: i + chunk_size]
        h_t = teacher_hidden[i: i + chunk_size] if spec.needs_teacher else None
        y = labels[i: i + chunk_size] if labels is not None else None
        if torch.is_grad_enabled() and h_s.requires_grad:
            total = total + checkpoint(chunk, h_s, h_t, y, use_reentrant=False)
        else:
            total = total + chunk(h_s, h_t, y)
    return total / max(n, 1)


def naive_loss(s_logits: torch.Tensor, t_logits: torch.Tensor | None, labels, spec: LossSpec) -> torch.Tensor:
    """Reference: whole [N, V] logits at once (tests and the memory benchmark)."""
    return loss_sum_from_logits(s_logits, t_logits, labels, spec) / s_logits.shape[0]
