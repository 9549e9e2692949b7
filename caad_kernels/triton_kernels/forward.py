"""Forward kernel of the contrastive KD loss: one program per row.

Passes over the vocabulary (each reads only what the options need):
  * plausibility (β_p > 0): one extra read of ``a`` alone for ``max(a)``;
  * always: one streaming pass over ``a, t, s`` with online log-sum-exp of
    ``z/τ`` and ``s/τ`` (and of ``s`` when the hard term has τ ≠ 1), plus the
    running weighted sum that gives forward or reverse KL in the same pass;
  * generalized JSD (0 < β_j < 1) only: a second pass, because ``log m`` needs
    both normalisers first.
Nothing but per-row scalars is kept; everything accumulates in fp32. Writes the
row loss and five fp32 statistics per row (see ``STATS``) that let the backward
kernel recompute ``p`` and ``q`` in one pass.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import contrast_block, log_add_exp, nonfinite_check

# Columns of the per-row statistics tensor.
STATS = ("lse_z", "lse_s", "lse_s_hard", "max_a", "div_aux")


@triton.jit
def contrastive_kd_fwd_kernel(
    s_ptr, a_ptr, t_ptr, labels_ptr, loss_ptr, stats_ptr,
    V, rows_per_batch,
    s_sb, s_st, a_sb, a_st, t_sb, t_st, l_sb, l_st,
    alpha, log_beta_p, inv_tau, jsd_beta, w_soft, w_hard, ignore_index,
    HAS_LABELS: tl.constexpr, SOFT: tl.constexpr, USE_TEXT: tl.constexpr, PLAUS: tl.constexpr,
    DIV: tl.constexpr, HARD: tl.constexpr, TAU_ONE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    bi = row // rows_per_batch
    ti = row - bi * rows_per_batch
    s_row = s_ptr + bi * s_sb + ti * s_st
    a_row = a_ptr + bi * a_sb + ti * a_st
    t_row = t_ptr + bi * t_sb + ti * t_st
    offs = tl.arange(0, BLOCK_V)
    NEG_INF: tl.constexpr = float("-inf")

    if HAS_LABELS:
        y = tl.load(labels_ptr + bi * l_sb + ti * l_st).to(tl.int64)
        valid = y != ignore_index
    else:
        y = 0
        valid = True

    if valid:
        zero = tl.zeros([], dtype=tl.float32)
        max_a = zero + NEG_INF
        if PLAUS:
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                a = tl.load(a_row + cols, mask=cols < V, other=NEG_INF).to(tl.float32)
                max_a = tl.maximum(max_a, tl.max(a, axis=0))
        threshold = max_a + log_beta_p

        m_z = zero + NEG_INF  # running max of z/τ
        sum_z = zero          # Σ exp(z/τ − m_z)
        acc_z = zero          # Σ exp(z/τ − m_z)·(z − s)/τ      (forward KL)
        m_s = zero + NEG_INF
        sum_s = zero
        acc_s = zero          # Σ exp(s/τ − m_s)·(s − z)/τ      (reverse KL)
        m_h = zero + NEG_INF  # log-sum-exp of s at τ = 1 for the hard term
        sum_h = zero
        chk = zero            # stays 0 unless a NaN/+inf rule of SPEC §3 fires
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            mask = cols < V
            s = tl.load(s_row + cols, mask=mask, other=NEG_INF).to(tl.float32)
            st = s * inv_tau
            chk += tl.sum(nonfinite_check(s), axis=0)
            zt = st  # placeholder type when SOFT is off
            if SOFT:
                a = tl.load(a_row + cols, mask=mask, other=NEG_INF).to(tl.float32)
                chk += tl.sum(nonfinite_check(a), axis=0)
                if USE_TEXT:
                    t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
                    # Any non-finite t under a finite a makes the contrast undefined.
                    chk += tl.sum(tl.where(a == NEG_INF, 0.0, t * 0.0), axis=0)
                else:
                    t = a
                z = contrast_block(a, t, alpha, threshold, USE_TEXT, PLAUS)
                zt = z * inv_tau
                m_new = tl.maximum(m_z, tl.max(zt, axis=0))
                m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
                corr = tl.exp(m_z - m_safe)
                e_z = tl.exp(zt - m_safe)
                sum_z = sum_z * corr + tl.sum(e_z, axis=0)
                if DIV == 0:
                    acc_z = acc_z * corr + tl.sum(tl.where(e_z > 0.0, e_z * (zt - st), 0.0), axis=0)
                m_z = m_new
            m_new_s = tl.maximum(m_s, tl.max(st, axis=0))
            ms_safe = tl.where(m_new_s == NEG_INF, 0.0, m_new_s)
            corr_s = tl.exp(m_s - ms_safe)
            e_s = tl.exp(st - ms_safe)
            sum_s = sum_s * corr_s + tl.sum(e_s, axis=0)
            if SOFT:
                if DIV == 1:
                    acc_s = acc_s * corr_s + tl.sum(tl.where(e_s > 0.0, e_s * (st - zt), 0.0), axis=0)
            m_s = m_new_s
            if HARD:
                if not TAU_ONE:
                    m_new_h = tl.maximum(m_h, tl.max(s, axis=0))
                    mh_safe = tl.where(m_new_h == NEG_INF, 0.0, m_new_h)
                    sum_h = sum_h * tl.exp(m_h - mh_safe) + tl.sum(tl.exp(s - mh_safe), axis=0)
                    m_h = m_new_h

        log_sum_z = tl.log(sum_z)
        log_sum_s = tl.log(sum_s)
        lse_z = m_z + log_sum_z
        lse_s = m_s + log_sum_s
        loss = chk
        div_aux = zero
        if SOFT:
            if DIV == 0:
                # Σ p (log p − log q) = Σ p (z − s)/τ − (lse_z − lse_s), the lse gap taken
                # as (max gap) + (log-sum gap) so large logits do not cancel.
                div = acc_z / sum_z - (m_z - m_s) - (log_sum_z - log_sum_s)
            elif DIV == 1:
                div = acc_s / sum_s - (m_s - m_z) - (log_sum_s - log_sum_z)
                div_aux = div
            else:
                log_1m_beta = tl.log(1.0 - jsd_beta)
                log_beta = tl.log(jsd_beta)
                kl_pm = zero
                kl_qm = zero
                for start in range(0, V, BLOCK_V):
                    cols = start + offs
                    mask = cols < V
                    s = tl.load(s_row + cols, mask=mask, other=NEG_INF).to(tl.float32)
                    a = tl.load(a_row + cols, mask=mask, other=NEG_INF).to(tl.float32)
                    if USE_TEXT:
                        t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
                    else:
                        t = a
                    z = contrast_block(a, t, alpha, threshold, USE_TEXT, PLAUS)
                    log_p = z * inv_tau - lse_z
                    log_q = s * inv_tau - lse_s
                    log_m = log_add_exp(log_q + log_1m_beta, log_p + log_beta)
                    p = tl.exp(log_p)
                    q = tl.exp(log_q)
                    kl_pm += tl.sum(tl.where(p > 0.0, p * (log_p - log_m), 0.0), axis=0)
                    kl_qm += tl.sum(tl.where(q > 0.0, q * (log_q - log_m), 0.0), axis=0)
                div = jsd_beta * kl_pm + (1.0 - jsd_beta) * kl_qm
                div_aux = kl_qm
            loss += w_soft * div
        lse_h = lse_s
        if HARD:
            if not TAU_ONE:
                lse_h = m_h + tl.log(sum_h)
            in_range = (y >= 0) & (y < V)
            s_y = tl.load(s_row + tl.where(in_range, y, 0)).to(tl.float32)
            ce = tl.where(in_range, lse_h - s_y, float("nan"))
            loss += w_hard * ce
        tl.store(loss_ptr + row, loss)
        stats_row = stats_ptr + row * 5
        tl.store(stats_row + 0, lse_z)
        tl.store(stats_row + 1, lse_s)
        tl.store(stats_row + 2, lse_h)
        tl.store(stats_row + 3, max_a)
        tl.store(stats_row + 4, div_aux)
    else:
        tl.store(loss_ptr + row, 0.0)
        stats_row = stats_ptr + row * 5
        for k in tl.static_range(5):
            tl.store(stats_row + k, 0.0)
