"""An independent float64 oracle for the sparse-target loss (SPEC §9) and for the sparse targets
themselves (SPEC §2 + §9), written from the specification row by row; it does not import caad_kernels.

Loss of one valid row, u = s/τ, log q = u − logsumexp(u):
    D = Σ_{listed v, p_v > 0} p_v (log p_v − log q_v)  [+ P_T (log P_T − log Σ_{v unlisted} q_v)]
    ℓ = w_soft·D + w_hard·(logsumexp(s) − s_y)
The bracket is the tail spread over the unlisted tokens in proportion to q (SPEC §9: p̃ then sums
to 1, and D = KL(p̃‖q)). The gradient is by autograd on this formula.
"""
from __future__ import annotations

import math

import torch

INF = float("inf")


def _row_loss(s, ids, lp, tail, y, tau, w_soft, w_hard):
    """One valid row; s [V] float64 leaf, ids/lp [K], tail scalar or None, y int or None."""
    vocab = s.shape[0]
    if torch.isnan(s).any() or (s == INF).any() or (s == -INF).all():
        return s.new_tensor(math.nan)
    loss = s.new_zeros(())
    if w_soft != 0:
        log_q = s / tau - torch.logsumexp(s / tau, 0)
        listed = [(int(i), float(v)) for i, v in zip(ids.tolist(), lp.tolist(), strict=True) if i >= 0]
        if any(math.isnan(v) or v == INF for _, v in listed):
            return s.new_tensor(math.nan)
        if tail is not None and (math.isnan(tail) or tail == INF):
            return s.new_tensor(math.nan)
        support = [(i, v) for i, v in listed if v > -INF]
        has_tail = tail is not None and tail > -INF
        if not support and not has_tail:
            return s.new_tensor(math.nan)
        d = s.new_zeros(())
        for i, v in support:
            if log_q[i] == -INF:
                return s.new_tensor(INF)
            d = d + math.exp(v) * (v - log_q[i])
        if has_tail:
            off = torch.ones(vocab, dtype=torch.bool)
            for i, _ in listed:
                off[i] = False
            if not off.any():
                return s.new_tensor(INF)
            log_qt = torch.logsumexp(log_q[off], 0)
            if log_qt == -INF:
                return s.new_tensor(INF)
            d = d + math.exp(tail) * (tail - log_qt)
        loss = loss + w_soft * d
    if w_hard != 0:
        loss = loss + w_hard * (torch.logsumexp(s, 0) - s[y])
    return loss


def sparse_oracle(s, ids, lp, tail=None, labels=None, *, temperature=1.0, soft_weight=1.0, hard_weight=0.0,
                  ignore_index=-100, reduction="mean", num_items_in_batch=None, grad_output=None):
    """(per_row [N], reduced loss, grad of the reduced loss (× grad_output) w.r.t. s), float64."""
    vocab, k = s.shape[-1], ids.shape[-1]
    s2 = s.detach().reshape(-1, vocab).double().cpu().requires_grad_(True)
    ids2, lp2 = ids.reshape(-1, k).cpu(), lp.reshape(-1, k).double().cpu()
    tail1 = tail.reshape(-1).double().cpu() if tail is not None else None
    y = labels.reshape(-1).cpu() if labels is not None else None
    rows = []
    for n in range(s2.shape[0]):
        if y is not None and int(y[n]) == ignore_index:
            rows.append(s2.new_zeros(()))
            continue
        rows.append(_row_loss(s2[n], ids2[n], lp2[n], None if tail1 is None else float(tail1[n]),
                              None if y is None else int(y[n]), temperature, soft_weight, hard_weight))
    per_row = torch.stack(rows) if rows else s2.new_zeros(0)
    n_valid = s2.shape[0] if y is None else int((y != ignore_index).sum())
    if reduction == "none":
        reduced = per_row
        w = torch.ones_like(per_row) if grad_output is None else grad_output.double().cpu()
        objective = (per_row * w).sum()
    else:
        reduced = per_row.sum()
        if reduction == "mean":
            reduced = reduced / (float(num_items_in_batch) if num_items_in_batch is not None else max(n_valid, 1))
        objective = reduced * (1.0 if grad_output is None else float(grad_output))
    grad = torch.autograd.grad(objective, s2, allow_unused=True)[0] if objective.requires_grad else None
    if grad is None:
        grad = torch.zeros_like(s2)
    return per_row.detach(), reduced.detach(), grad.reshape(s.shape)


def contrasted_log_probs(a, t, *, alpha, plausibility_beta, temperature):
    """log p = log_softmax(z/τ) of SPEC §2 in float64 for rows [N, V] (finite inputs)."""
    a, t = a.double(), (t.double() if t is not None else None)
    z = a if alpha == 0 else (1 + alpha) * a - alpha * t
    z = torch.where(a == -INF, torch.full_like(z, -INF), z)
    if plausibility_beta > 0:
        z = torch.where(a < a.max(-1, keepdim=True).values + math.log(plausibility_beta),
                        torch.full_like(z, -INF), z)
    return z / temperature - torch.logsumexp(z / temperature, -1, keepdim=True)
