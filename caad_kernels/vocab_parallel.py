"""Contrastive KD with the vocabulary sharded across ranks (Megatron-style tensor parallelism).

Each rank holds a contiguous slice ``[..., V_r]`` of the three logit tensors (rank r owns
the columns after those of ranks < r; slices may differ in size). Every per-row quantity
of SPEC §2 that spans the vocabulary is a max or a sum, so a few small all-reduces of
``[N, k]`` fp32 tensors make each rank's loss equal to the unsharded loss:

  1. MAX of the row maxima (of ``a`` for plausibility; of ``z/τ``, ``s/τ``, ``s``);
  2. SUM of ``Σ exp(x − max)`` per row, plus the non-finite check, plus ``s_y`` from the
     rank that owns label ``y``;
  3. SUM of the divergence's per-row partial sums (and ``KL(q‖m)`` for JSD).
Backward needs no communication: each rank writes the gradient of its own student slice
from the global statistics saved in forward. The per-rank math is the reference formula
of :mod:`caad_kernels.reference` on the local slice (``[N, V_r]`` temporaries; the slice
is already 1/world of the vocabulary).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from .loss import _check_labels, _check_logits, _check_teacher, check_num_items
from .options import FORWARD_KL, REDUCTIONS, REVERSE_KL, KDOptions
from .reference import contrasted_logits, reduce_rows


def _all_reduce(x: Tensor, op, group) -> Tensor:
    dist.all_reduce(x, op=op, group=group)
    return x


def _vocab_offset(local_vocab: int, device: torch.device, group) -> Tensor:
    """First global column of this rank's slice (slices may be uneven), as a 0-dim device tensor (no host sync)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes = torch.zeros(world, dtype=torch.int64, device=device)
    sizes[rank] = local_vocab
    _all_reduce(sizes, dist.ReduceOp.SUM, group)
    return sizes[:rank].sum()


def _masked_where(cond: Tensor, x: Tensor) -> Tensor:
    return torch.where(cond, x, torch.zeros_like(x))


def _soft_grad(log_q: Tensor, log_p: Tensor, div_aux: Tensor, opts: KDOptions) -> Tensor:
    """∂D/∂u of the local slice (reference.py's formulas), before the argmax compensation."""
    q = log_q.exp()
    code = opts.divergence_code
    if code == FORWARD_KL:
        return q - log_p.exp()
    if code == REVERSE_KL:
        return _masked_where(q > 0, q * (log_q - log_p - div_aux.unsqueeze(1)))
    beta = opts.jsd_beta
    log_m = torch.logaddexp(log_q + math.log1p(-beta), log_p + math.log(beta))
    return (1 - beta) * _masked_where(q > 0, q * (log_q - log_m - div_aux.unsqueeze(1)))


class _VocabParallelKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, a, t, labels, opts: KDOptions, group):
        n, v_local = s.shape
        device = s.device
        dt = torch.float64 if s.dtype == torch.float64 else torch.float32
        in_dtype = s.dtype
        s = s.to(dt)
        offset = None  # only the hard term and the argmax compensation need where this slice starts
        valid = labels != opts.ignore_index if labels is not None else torch.ones(n, dtype=torch.bool, device=device)
        neg_inf = torch.tensor(-math.inf, dtype=dt, device=device)
        tau = opts.temperature

        # Non-finite rules of SPEC §3, checked locally and combined below.
        bad = torch.isnan(s) | (s == math.inf)
        if opts.uses_teacher:
            a = a.to(dt)
            t = t.to(dt) if opts.uses_text else None
            bad = bad | torch.isnan(a) | (a == math.inf)
            if opts.uses_text:
                bad = bad | ((a != -math.inf) & ~torch.isfinite(t))
            z = contrasted_logits(a, t, opts.alpha, 0.0)
            if opts.plausibility_beta > 0.0:  # the mask needs the max over the whole vocabulary
                max_a = _all_reduce(a.amax(dim=1), dist.ReduceOp.MAX, group)
                z = torch.where(a < (max_a + math.log(opts.plausibility_beta)).unsqueeze(1), neg_inf, z)
            zt = z / tau
        st = s / tau

        # 1. global maxima (safe: 0 where a row is all −inf, so sums stay 0 instead of NaN)
        local_max = [st.amax(dim=1)]
        if opts.uses_teacher:
            local_max.append(zt.amax(dim=1))
        if opts.uses_labels_as_targets and tau != 1.0:
            local_max.append(s.amax(dim=1))
        maxima = _all_reduce(torch.stack(local_max, 1), dist.ReduceOp.MAX, group)
        maxima = torch.where(torch.isinf(maxima) & (maxima < 0), torch.zeros_like(maxima), maxima)

        # 2. global sums of exp, the non-finite check and the label logit
        m_s = maxima[:, 0:1]
        sums = [torch.exp(st - m_s).sum(1), _masked_where(bad, torch.ones_like(st)).sum(1)]
        if opts.uses_teacher:
            m_z = maxima[:, 1:2]
            sums.append(torch.exp(zt - m_z).sum(1))
        if opts.uses_labels_as_targets:
            m_h = maxima[:, -1:] if tau != 1.0 else m_s * tau
            if tau != 1.0:
                sums.append(torch.exp(s - m_h).sum(1))
            offset = _vocab_offset(v_local, device, group)
            y = labels.long() - offset
            mine = (y >= 0) & (y < v_local) & valid
            s_y = s.gather(1, y.clamp(0, v_local - 1).unsqueeze(1)).squeeze(1)
            sums.append(_masked_where(mine, s_y))
            sums.append(mine.to(dt))  # how many ranks own the label: 1, or 0 when out of range
        totals = _all_reduce(torch.stack(sums, 1), dist.ReduceOp.SUM, group)
        log_q = (st - m_s) - torch.log(totals[:, 0:1])
        row_bad = totals[:, 1] > 0

        loss = torch.zeros(n, dtype=dt, device=device)
        div_aux = torch.zeros(n, dtype=dt, device=device)
        log_p = None
        if opts.uses_teacher:
            log_p = (zt - m_z) - torch.log(totals[:, 2:3])
            p, q = log_p.exp(), log_q.exp()
            code = opts.divergence_code
            # 3. global divergence sums
            if code == FORWARD_KL:
                part = torch.stack([_masked_where(p > 0, p * (log_p - log_q)).sum(1)], 1)
            elif code == REVERSE_KL:
                part = torch.stack([_masked_where(q > 0, q * (log_q - log_p)).sum(1)], 1)
            else:
                beta = opts.jsd_beta
                log_m = torch.logaddexp(log_q + math.log1p(-beta), log_p + math.log(beta))
                part = torch.stack([_masked_where(p > 0, p * (log_p - log_m)).sum(1),
                                    _masked_where(q > 0, q * (log_q - log_m)).sum(1)], 1)
            part = _all_reduce(part, dist.ReduceOp.SUM, group)
            if code == FORWARD_KL:
                div = part[:, 0]
            elif code == REVERSE_KL:
                div = div_aux = part[:, 0]
            else:
                div = opts.jsd_beta * part[:, 0] + (1 - opts.jsd_beta) * part[:, 1]
                div_aux = part[:, 1]
            loss = loss + opts.soft_weight * div
            # SPEC §3: no distribution (no possible teacher token, or no possible student token) is NaN.
            row_bad = row_bad | (totals[:, 2] == 0) | (totals[:, 0] == 0)
            if code != FORWARD_KL:
                # The gradient's entry at the (first, global) student argmax is written in backward as
                # minus the sum of all the others (reference._compensate_argmax): q·(r − D) cancels there.
                # Its index and the row sum of the soft gradient need two small all-reduces, here.
                d_u = _soft_grad(log_q, log_p, div_aux, opts)
                if offset is None:
                    offset = _vocab_offset(v_local, device, group)
                is_max = st == m_s
                none = torch.iinfo(torch.int64).max
                first = torch.where(is_max.any(1), is_max.to(torch.uint8).argmax(1) + offset,
                                    torch.full((n,), none, dtype=torch.int64, device=device))
                ctx.arg = _all_reduce(first, dist.ReduceOp.MIN, group) - offset
                ctx.soft_sum = _all_reduce(d_u.sum(1), dist.ReduceOp.SUM, group)
        log_sum_h = None
        if opts.uses_labels_as_targets:
            k = 3 if opts.uses_teacher else 2
            if tau != 1.0:
                log_sum_h = torch.log(totals[:, k])
                k += 1
            else:
                log_sum_h = torch.log(totals[:, 0])
            s_y, owned = totals[:, k], totals[:, k + 1]
            ce = (m_h.squeeze(1) - s_y) + log_sum_h
            ce = torch.where(owned > 0, ce, torch.full_like(ce, math.nan))
            loss = loss + opts.hard_weight * ce
            ctx.m_h = m_h
        loss = torch.where(row_bad, torch.full_like(loss, math.nan), loss)
        loss = torch.where(valid, loss, torch.zeros_like(loss))

        ctx.save_for_backward(log_q, log_p if log_p is not None else torch.empty(0), div_aux, valid,
                              labels if labels is not None else torch.empty(0, dtype=torch.long), s)
        ctx.opts, ctx.offset, ctx.log_sum_h, ctx.in_dtype = opts, offset, log_sum_h, in_dtype
        return loss

    @staticmethod
    def backward(ctx, grad_rows):
        log_q, log_p, div_aux, valid, labels, s = ctx.saved_tensors
        opts = ctx.opts
        tau = opts.temperature
        q = log_q.exp()
        grad = torch.zeros_like(q)
        if opts.uses_teacher:
            d_u = _soft_grad(log_q, log_p, div_aux, opts)
            if opts.divergence_code != FORWARD_KL:
                mine = (ctx.arg >= 0) & (ctx.arg < d_u.shape[1])
                rows = mine.nonzero().squeeze(1)
                cols = ctx.arg[rows]
                d_u[rows, cols] = d_u[rows, cols] - ctx.soft_sum[rows]  # own − (own + others) = −others
            grad = grad + (opts.soft_weight / tau) * d_u
        if opts.uses_labels_as_targets:
            q_h = ((s - ctx.m_h) - ctx.log_sum_h.unsqueeze(1)).exp()
            y = labels.long() - ctx.offset
            onehot = torch.zeros_like(q_h)
            mine = (y >= 0) & (y < q_h.shape[1])
            onehot[mine.nonzero().squeeze(1), y[mine]] = 1.0
            grad = grad + opts.hard_weight * (q_h - onehot)
        grad = torch.where(valid.unsqueeze(1), grad, torch.zeros_like(grad)) * grad_rows.to(grad.dtype).unsqueeze(1)
        return grad.to(ctx.in_dtype), None, None, None, None, None


def vocab_parallel_contrastive_kd_loss(
    student_logits_shard: Tensor,
    teacher_audio_logits_shard: Tensor,
    teacher_text_logits_shard: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    alpha: float = 1.0,
    plausibility_beta: float = 0.0,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    jsd_beta: float = 0.5,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
) -> Tensor:
    """The contrastive KD loss of SPEC §2 over a vocabulary sharded across the ranks of ``group``.

    Args:
        student_logits_shard, teacher_audio_logits_shard, teacher_text_logits_shard: ``[..., V_r]``
            this rank's contiguous vocabulary slice (rank r holds the columns after ranks < r).
        labels: ``[...]`` *global* vocabulary ids (the same on every rank).
        group: process group over which the vocabulary is sharded (None: the default group).
        Other keywords: as :func:`caad_kernels.contrastive_kd_loss`.

    Returns:
        The unsharded loss, identical on every rank; backward gives each rank the gradient of its
        own student slice.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("vocab_parallel_contrastive_kd_loss needs an initialised torch.distributed process group")
    opts = KDOptions(alpha=alpha, plausibility_beta=plausibility_beta, temperature=temperature, divergence=divergence,
                     jsd_beta=jsd_beta, soft_weight=soft_weight, hard_weight=hard_weight, ignore_index=ignore_index)
    s = _check_logits("student_logits_shard", student_logits_shard)
    a = _check_teacher("teacher_audio_logits_shard", teacher_audio_logits_shard, s, False)
    t = None
    if opts.uses_text:
        if teacher_text_logits_shard is None:
            raise ValueError(f"teacher_text_logits_shard is required with alpha={opts.alpha} > 0")
        t = _check_teacher("teacher_text_logits_shard", teacher_text_logits_shard, s, False)
    if labels is not None:
        # Labels are global ids: range-check them against the global vocabulary only in the kernel.
        labels = _check_labels(labels, s, KDOptions(ignore_index=ignore_index))
    elif opts.hard_weight > 0:
        raise ValueError(f"hard_weight={opts.hard_weight} > 0 needs labels, got None")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    num_items_in_batch = check_num_items(num_items_in_batch, reduction, s.device)
    vocab = s.shape[-1]
    flat_labels = labels.reshape(-1) if labels is not None else None
    rows = _VocabParallelKD.apply(s.reshape(-1, vocab), a.reshape(-1, vocab),
                                  t.reshape(-1, vocab) if t is not None else None, flat_labels, opts, group)
    return reduce_rows(rows, flat_labels, reduction, ignore_index, num_items_in_batch)
