"""Forward kernel of the sparse-target loss (SPEC §9): one program per row.

One pass over the student row (online log-sum-exp of ``s/τ``, and of ``s`` at τ = 1 for a hard
term with τ ≠ 1), then one gather of the ``K`` cached ids. Keeps six fp32 statistics per row
(``max_u, log_sum_u, max_h, log_sum_h``, the target mass ``c = P_S + P_T`` and the tail ratio
``r = P_T/Q_T``) for the one-pass backward; the math is in ``caad_kernels/sparse_reference.py``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import nonfinite_check

NUM_SPARSE_STATS = tl.constexpr(6)


@triton.jit
def sparse_kd_fwd_kernel(
    s_ptr, ids_ptr, lp_ptr, tail_ptr, labels_ptr, loss_ptr, stats_ptr,
    V, K, rows_per_batch, s_sb, s_st,
    inv_tau, w_soft, w_hard, ignore_index,
    HAS_TAIL: tl.constexpr, HAS_LABELS: tl.constexpr, SOFT: tl.constexpr, HARD: tl.constexpr,
    TAU_ONE: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    bi = row // rows_per_batch
    ti = row - bi * rows_per_batch
    s_row = s_ptr + bi * s_sb + ti * s_st
    offs = tl.arange(0, BLOCK_V)
    NEG_INF: tl.constexpr = float("-inf")
    INF: tl.constexpr = float("inf")
    if HAS_LABELS:
        y = tl.load(labels_ptr + row)
        valid = y != ignore_index
    else:
        y = -1
        valid = True
    stats_row = stats_ptr + row * NUM_SPARSE_STATS
    if valid:
        zero = tl.zeros([], dtype=tl.float32)
        m_u = zero + NEG_INF  # running max of s/τ, and its safe value (0 while −inf)
        mu = zero
        sum_u = zero
        m_h = zero + NEG_INF
        mh = zero
        sum_h = zero
        chk = zero  # stays 0 unless s holds NaN or +inf
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            x = tl.load(s_row + cols, mask=cols < V, other=NEG_INF).to(tl.float32)
            u = x * inv_tau
            chk += tl.sum(nonfinite_check(x), axis=0)
            m_new = tl.maximum(m_u, tl.max(u, axis=0))
            mu_new = tl.where(m_new == NEG_INF, 0.0, m_new)
            sum_u = sum_u * tl.exp(m_u - mu_new) + tl.sum(tl.exp(u - mu_new), axis=0)
            m_u = m_new
            mu = mu_new
            if HARD:
                if not TAU_ONE:
                    mh_raw = tl.maximum(m_h, tl.max(x, axis=0))
                    mh_new = tl.where(mh_raw == NEG_INF, 0.0, mh_raw)
                    sum_h = sum_h * tl.exp(m_h - mh_new) + tl.sum(tl.exp(x - mh_new), axis=0)
                    m_h = mh_raw
                    mh = mh_new
        log_sum_u = tl.log(sum_u)
        if TAU_ONE:
            mh = mu
            log_sum_h = log_sum_u
        else:
            log_sum_h = tl.log(sum_h)
        loss = chk + tl.where(sum_u == 0.0, float("nan"), 0.0)  # all of s −inf: no distribution
        mass = zero
        ratio = zero
        if SOFT:
            kk = tl.arange(0, BLOCK_K)
            ids = tl.load(ids_ptr + row * K + kk, mask=kk < K, other=-1)
            lp = tl.load(lp_ptr + row * K + kk, mask=kk < K, other=NEG_INF).to(tl.float32)
            listed = ids >= 0
            bad = tl.sum(tl.where(listed & ((lp != lp) | (lp == INF)), 1.0, 0.0), axis=0)
            support = listed & (lp > NEG_INF)
            x = tl.load(s_row + tl.where(listed, ids, 0), mask=listed, other=NEG_INF).to(tl.float32)
            log_q = (x * inv_tau - mu) - log_sum_u
            p = tl.exp(tl.where(support, lp, NEG_INF))
            p_s = tl.sum(p, axis=0)
            q_s = tl.sum(tl.where(listed, tl.exp(log_q), 0.0), axis=0)
            q_zero = log_q == NEG_INF
            d = tl.sum(tl.where(support & ~q_zero, p * (lp - log_q), 0.0), axis=0)
            infinite = tl.sum(tl.where(support & q_zero, 1.0, 0.0), axis=0)
            has_target = tl.sum(tl.where(support, 1.0, 0.0), axis=0)
            mass = p_s
            if HAS_TAIL:
                lt = tl.load(tail_ptr + row).to(tl.float32)
                bad += tl.where((lt != lt) | (lt == INF), 1.0, 0.0)
                has_tail = lt > NEG_INF
                p_t = tl.where(has_tail, tl.exp(lt), 0.0)
                q_t = 1.0 - q_s  # Q_T from the one pass (absolute error ~1e-7)
                tail_ok = has_tail & (q_t > 0.0)
                q_t_safe = tl.where(tail_ok, q_t, 1.0)
                d += tl.where(tail_ok, p_t * (lt - tl.log(q_t_safe)), 0.0)
                infinite += tl.where(has_tail & (q_t <= 0.0), 1.0, 0.0)
                ratio = tl.where(tail_ok, p_t / q_t_safe, 0.0)
                mass += p_t
                has_target += tl.where(has_tail, 1.0, 0.0)
            d = tl.where(infinite > 0, INF, d)
            d = tl.where((bad > 0) | (has_target == 0), float("nan"), d)
            loss += w_soft * d
        if HARD:
            in_range = (y >= 0) & (y < V)
            s_y = tl.load(s_row + tl.where(in_range, y, 0)).to(tl.float32)
            loss += w_hard * tl.where(in_range, (mh - s_y) + log_sum_h, float("nan"))
        tl.store(loss_ptr + row, loss)
        tl.store(stats_row + 0, mu)
        tl.store(stats_row + 1, log_sum_u)
        tl.store(stats_row + 2, mh)
        tl.store(stats_row + 3, log_sum_h)
        tl.store(stats_row + 4, mass)
        tl.store(stats_row + 5, ratio)
    else:
        tl.store(loss_ptr + row, 0.0)
        for k in tl.static_range(NUM_SPARSE_STATS):
            tl.store(stats_row + k, 0.0)
