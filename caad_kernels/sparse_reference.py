"""The sparse-target KD loss in plain PyTorch: the readable statement of SPEC §9.

A cached teacher row is a support ``S`` (``ids [n, K]``, −1 pads a shorter
support), the teacher's log-probabilities on it (``log p_v``, any value where
the id is −1) and optionally the log of the mass outside it,
``tail = log P_T`` (−inf or absent when ``S`` is the exact support). With
``u = s/τ``, ``log q = log_softmax(u)`` over all ``V`` and ``P_S = Σ_{v∈S} p_v``:

    D = Σ_{v∈S} p_v (log p_v − log q_v)  +  P_T (log P_T − log Q_T),
    Q_T = Σ_{v∉S} q_v                        (the student's mass off S)

The second term is 0 without a tail (0·log 0 = 0). It is what spreading the
tail over the tokens outside ``S`` *in proportion to q* means (SPEC §9): with
``p̃_v = p_v`` on ``S`` and ``p̃_v = P_T·q_v/Q_T`` off it, ``D = KL(p̃ ‖ q)``
exactly, because ``log(p̃_v/q_v) = log(P_T/Q_T)`` for every ``v ∉ S``.

Gradient of one row (``∂q_v/∂u_k = q_v(δ_vk − q_k)``, ``∂Q_T/∂u_k = q_k([k∉S] − Q_T)``):

    ∂/∂u_k [−Σ_{v∈S} p_v log q_v] = P_S q_k − p_k [k∈S]
    ∂/∂u_k [−P_T log Q_T]         = P_T q_k − P_T q_k [k∉S] / Q_T
    ⇒ ∂D/∂u_k = (P_S + P_T)·q_k − p̃_k

which is SPEC §9's ``q − p̃`` whenever the cached mass sums to 1
(``P_S + P_T = 1``, up to the rounding of fp16 log-probabilities; the exact
factor is kept so that the gradient is the derivative of the loss). The hard
term ``ce = lse(s) − s_y`` adds ``softmax(s)_k − [k = y]`` as in SPEC §2, and
``∂ℓ/∂s = w_soft·∂D/∂u / τ + w_hard·∂ce/∂s``.

Non-finite data (SPEC §3 carried over): NaN or +inf in ``s``, or in a listed
log-probability or the tail, gives a NaN row; so does a row with no target
distribution (no listed id with ``p > 0`` and no tail mass) and a row whose
student logits are all −inf. ``p_v > 0`` where ``q_v = 0`` (−inf in ``s``)
gives +inf, as does tail mass where ``Q_T = 0``.

Here ``log Q_T`` is a masked log-sum-exp (exact); the fused kernels compute
``Q_T = 1 − Σ_{v∈S} q_v`` from their one pass (absolute error ~1e-7 on ``Q_T``).
"""

from __future__ import annotations

import math

import torch

from .options import KDOptions
from .reference import compute_dtype

__all__ = ["sparse_row_losses", "sparse_row_loss_grads", "sparse_contrastive_kd_reference", "sparse_options"]


def sparse_options(temperature: float = 1.0, soft_weight: float = 1.0, hard_weight: float = 0.0,
                   ignore_index: int = -100) -> KDOptions:
    """The :class:`KDOptions` of a sparse-target loss: forward KL, no contrast (the cache holds ``p``)."""
    return KDOptions(alpha=0.0, plausibility_beta=0.0, temperature=temperature, divergence="forward_kl",
                     soft_weight=soft_weight, hard_weight=hard_weight, ignore_index=ignore_index)


def _prepare(s, ids, logprobs, tail):
    dt = compute_dtype(s, logprobs, tail)
    live = ids >= 0
    idx = ids.long().clamp_min(0)
    lp = torch.where(live, logprobs.to(dt), torch.full((), -math.inf, dtype=dt, device=s.device))
    return s.to(dt), live, idx, lp, (tail.to(dt) if tail is not None else None)


def _log_q_off_support(log_q: torch.Tensor, idx: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """log Q_T = log Σ_{v∉S} q_v, a masked log-sum-exp over ``[n, V]``."""
    member = torch.zeros(log_q.shape, dtype=torch.int32, device=log_q.device)
    member.scatter_add_(1, idx, live.to(torch.int32))
    return torch.where(member > 0, torch.full_like(log_q, -math.inf), log_q).logsumexp(dim=-1), member > 0


def _undefined(s, live, lp, tail) -> torch.Tensor:
    bad = (torch.isnan(s) | (s == math.inf)).any(-1) | (s == -math.inf).all(-1)
    bad = bad | (live & (torch.isnan(lp) | (lp == math.inf))).any(-1)
    has_target = (lp > -math.inf).any(-1)
    if tail is not None:
        bad = bad | torch.isnan(tail) | (tail == math.inf)
        has_target = has_target | (tail > -math.inf)
    return bad | ~has_target


def sparse_row_losses(
    s: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    tail: torch.Tensor | None,
    labels: torch.Tensor | None,
    opts: KDOptions,
) -> torch.Tensor:
    """Per-row loss ``ℓ`` (module docstring), differentiable in ``s`` by autograd.

    s: ``[n, V]`` student logits; ids: ``[n, K]`` int (−1 pads); logprobs: ``[n, K]`` float;
    tail: ``[n]`` float or None; labels: ``[n]`` int or None. Returns ``[n]`` in the compute
    dtype (float64 if any float input is float64, else float32), exactly 0 on ignored rows.
    """
    s, live, idx, lp, tail = _prepare(s, ids, logprobs, tail)
    n, vocab = s.shape
    valid = torch.ones(n, dtype=torch.bool, device=s.device) if labels is None else labels != opts.ignore_index
    loss = torch.zeros(n, dtype=s.dtype, device=s.device)
    bad = (torch.isnan(s) | (s == math.inf)).any(-1) | (s == -math.inf).all(-1)
    if opts.uses_teacher:
        log_q_all = torch.log_softmax(s / opts.temperature, dim=-1)
        log_q = log_q_all.gather(1, idx)
        support = lp > -math.inf
        impossible = support & (log_q == -math.inf)
        ok = support & ~impossible
        zero = torch.zeros_like(lp)
        # Differences zeroed before the product: autograd never sees 0·(−∞ − (−∞)).
        diff = torch.where(ok, lp, zero) - torch.where(ok, log_q, zero)
        div = torch.where(ok, lp.exp() * diff, zero).sum(-1)
        inf_row = impossible.any(-1)
        if tail is not None:
            log_qt, _ = _log_q_off_support(log_q_all, idx, live)
            has_tail = tail > -math.inf
            tail_ok = has_tail & (log_qt > -math.inf)
            z1 = torch.zeros_like(tail)
            tdiff = torch.where(tail_ok, tail, z1) - torch.where(tail_ok, log_qt, z1)
            div = div + torch.where(tail_ok, tail.exp() * tdiff, z1)
            inf_row = inf_row | (has_tail & (log_qt == -math.inf))
        div = torch.where(inf_row, torch.full_like(div, math.inf), div)
        loss = loss + opts.soft_weight * div
        bad = bad | _undefined(s, live, lp, tail)
    if opts.uses_labels_as_targets:
        y = labels.long()
        in_range = (y >= 0) & (y < vocab)
        s_y = s.gather(1, y.clamp(0, vocab - 1).unsqueeze(1)).squeeze(1)
        ce = torch.logsumexp(s, dim=-1) - s_y
        loss = loss + opts.hard_weight * torch.where(in_range | ~valid, ce, torch.full_like(ce, math.nan))
    loss = torch.where(bad, torch.full_like(loss, math.nan), loss)
    return torch.where(valid, loss, torch.zeros_like(loss))


def sparse_row_loss_grads(
    s: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    tail: torch.Tensor | None,
    labels: torch.Tensor | None,
    opts: KDOptions,
) -> torch.Tensor:
    """Analytic ``∂ℓ_i/∂s_i`` per row (module docstring): ``[n, V]`` in the compute dtype, 0 on ignored rows."""
    s, live, idx, lp, tail = _prepare(s, ids, logprobs, tail)
    n, vocab = s.shape
    valid = torch.ones(n, dtype=torch.bool, device=s.device) if labels is None else labels != opts.ignore_index
    grad = torch.zeros_like(s)
    if opts.uses_teacher:
        log_q_all = torch.log_softmax(s / opts.temperature, dim=-1)
        q = log_q_all.exp()
        p = torch.where(lp > -math.inf, lp.exp(), torch.zeros_like(lp))
        mass = p.sum(-1, keepdim=True)  # P_S
        p_tilde = torch.zeros_like(s).scatter_add_(1, idx, p)  # duplicates are refused, pads add 0
        if tail is not None:
            log_qt, member = _log_q_off_support(log_q_all, idx, live)
            p_t = tail.exp().unsqueeze(1)
            mass = mass + p_t
            ratio = torch.where(p_t > 0, p_t / log_qt.exp().unsqueeze(1), torch.zeros_like(p_t))  # P_T / Q_T
            p_tilde = torch.where(member, p_tilde, ratio * q)
        grad = grad + (opts.soft_weight / opts.temperature) * (mass * q - p_tilde)
    if opts.uses_labels_as_targets:
        y = labels.long().clamp(0, vocab - 1)
        d_ce = torch.softmax(s, dim=-1) - torch.nn.functional.one_hot(y, vocab).to(s.dtype)
        grad = grad + opts.hard_weight * d_ce
    return torch.where(valid.unsqueeze(1), grad, torch.zeros_like(grad))


def sparse_contrastive_kd_reference(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    tail_logmass: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Eager, fully materialised sparse-target loss, differentiable by autograd (no input checks).

    Shapes: student ``[..., V]``, ids/logprobs ``[..., K]``, tail and labels ``[...]``.
    """
    from .reference import reduce_rows

    opts = sparse_options(temperature, soft_weight, hard_weight, ignore_index)
    vocab, k = student_logits.shape[-1], teacher_ids.shape[-1]
    flat_labels = labels.reshape(-1) if labels is not None else None
    rows = sparse_row_losses(student_logits.reshape(-1, vocab), teacher_ids.reshape(-1, k),
                             teacher_logprobs.reshape(-1, k),
                             tail_logmass.reshape(-1) if tail_logmass is not None else None, flat_labels, opts)
    return reduce_rows(rows, flat_labels, reduction, ignore_index, num_items_in_batch)
