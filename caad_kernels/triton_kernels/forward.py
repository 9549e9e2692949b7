"""Forward kernel of the contrastive KD loss: one program per row.

Passes over the vocabulary (each reads only what the options need):
  * plausibility (β_p > 0): one extra read of ``a`` alone for ``max(a)``;
  * always: one streaming pass over ``a, t, s`` with online log-sum-exp of
    ``z/τ`` and ``s/τ`` (and of ``s`` when the hard term has τ ≠ 1), plus the
    running weighted sum that gives forward or reverse KL in the same pass;
  * generalized JSD (0 < β_j < 1) only: a second pass, because ``log m`` needs
    both normalisers first.
Nothing but per-row scalars is kept; everything accumulates in fp32. Writes the
row loss and eight fp32 statistics per row (see ``STATS``) that let the backward
kernel recompute ``p`` and ``q`` in one pass.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..options import NUM_STATS as _NUM_STATS
from .common import contrast_block, log_add_exp, nonfinite_check

# Columns of the per-row statistics tensor: caad_kernels.options.STAT_NAMES, in that order.
NUM_STATS = tl.constexpr(_NUM_STATS)


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

        # Online log-sum-exps. Each running sum is relative to a "safe" running max
        # (the max, or 0 while it is still −inf). The KL accumulators hold Σ e·(x − max_x)
        # with x's own max, never Σ e·(z − s): at |logits| ~ 1e4 the latter would cancel
        # against the max gap and lose the loss to fp32 rounding.
        m_z = zero + NEG_INF  # running max of z/τ
        mz = zero             # its safe value
        sum_z = zero          # Σ exp(z/τ − mz)
        m_s = zero + NEG_INF  # running max of s/τ
        ms = zero
        sum_s = zero          # Σ exp(s/τ − ms)
        acc_zz = zero         # Σ e_z·(z/τ − mz)   } forward KL = (acc_zz − acc_zs)/sum_z
        acc_zs = zero         # Σ e_z·(s/τ − ms)   }              − log sum_z + log sum_s
        acc_ss = zero         # Σ e_s·(s/τ − ms)   } reverse KL, mirrored
        acc_sz = zero         # Σ e_s·(z/τ − mz)   }
        m_h = zero + NEG_INF  # log-sum-exp of s at τ = 1 for the hard term (τ ≠ 1 only)
        mh = zero
        sum_h = zero
        chk = zero            # stays 0 unless a NaN/+inf rule of SPEC §3 fires
        # Entries in the weighting distribution's support where the other side is −inf make KL
        # +inf whatever their rounded weight: counted here and kept out of the running sums (a −inf
        # inside them would become 0·(−inf) = NaN once a later max makes its weight underflow).
        infinite = zero
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            mask = cols < V
            s = tl.load(s_row + cols, mask=mask, other=NEG_INF).to(tl.float32)
            st = s * inv_tau
            chk += tl.sum(nonfinite_check(s), axis=0)
            m_s_new = tl.maximum(m_s, tl.max(st, axis=0))
            ms_new = tl.where(m_s_new == NEG_INF, 0.0, m_s_new)
            c_s = tl.exp(m_s - ms_new)
            shift_s = ms_new - ms
            e_s = tl.exp(st - ms_new)
            if SOFT:
                a = tl.load(a_row + cols, mask=mask, other=NEG_INF).to(tl.float32)
                chk += tl.sum(nonfinite_check(a), axis=0)
                if USE_TEXT:
                    t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
                    # Any non-finite t under a finite a makes the contrast undefined.
                    chk += tl.sum(tl.where(a == NEG_INF, 0.0, t * 0.0), axis=0)
                else:
                    t = a
                zt = contrast_block(a, t, alpha, threshold, USE_TEXT, PLAUS) * inv_tau
                m_z_new = tl.maximum(m_z, tl.max(zt, axis=0))
                mz_new = tl.where(m_z_new == NEG_INF, 0.0, m_z_new)
                c_z = tl.exp(m_z - mz_new)
                shift_z = mz_new - mz
                e_z = tl.exp(zt - mz_new)
                if DIV == 0:
                    live = e_z > 0.0
                    s_impossible = st == NEG_INF
                    acc_zz = c_z * (acc_zz - shift_z * sum_z) + tl.sum(tl.where(live, e_z * (zt - mz_new), 0.0), axis=0)
                    acc_zs = c_z * (acc_zs - shift_s * sum_z) + tl.sum(tl.where(live & ~s_impossible, e_z * (st - ms_new), 0.0), axis=0)
                    infinite += tl.sum(tl.where((zt != NEG_INF) & s_impossible, 1.0, 0.0), axis=0)
                if DIV == 1:
                    live_s = e_s > 0.0
                    z_impossible = zt == NEG_INF
                    acc_ss = c_s * (acc_ss - shift_s * sum_s) + tl.sum(tl.where(live_s, e_s * (st - ms_new), 0.0), axis=0)
                    acc_sz = c_s * (acc_sz - shift_z * sum_s) + tl.sum(tl.where(live_s & ~z_impossible, e_s * (zt - mz_new), 0.0), axis=0)
                    infinite += tl.sum(tl.where((st != NEG_INF) & z_impossible, 1.0, 0.0), axis=0)
                sum_z = sum_z * c_z + tl.sum(e_z, axis=0)
                m_z = m_z_new
                mz = mz_new
            sum_s = sum_s * c_s + tl.sum(e_s, axis=0)
            m_s = m_s_new
            ms = ms_new
            if HARD:
                if not TAU_ONE:
                    m_h_new = tl.maximum(m_h, tl.max(s, axis=0))
                    mh_new = tl.where(m_h_new == NEG_INF, 0.0, m_h_new)
                    sum_h = sum_h * tl.exp(m_h - mh_new) + tl.sum(tl.exp(s - mh_new), axis=0)
                    m_h = m_h_new
                    mh = mh_new

        log_sum_z = tl.log(sum_z)
        log_sum_s = tl.log(sum_s)
        loss = chk
        div_aux = zero
        if SOFT:
            if DIV == 0:
                div = tl.where(infinite > 0, float("inf"), (acc_zz - acc_zs) / sum_z - (log_sum_z - log_sum_s))
            elif DIV == 1:
                div = tl.where(infinite > 0, float("inf"), (acc_ss - acc_sz) / sum_s - (log_sum_s - log_sum_z))
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
                    # log p = (z/τ − max) − log Σ: exact near the max even at |z| ~ 1e4
                    log_p = (contrast_block(a, t, alpha, threshold, USE_TEXT, PLAUS) * inv_tau - mz) - log_sum_z
                    log_q = (s * inv_tau - ms) - log_sum_s
                    log_m = log_add_exp(log_q + log_1m_beta, log_p + log_beta)
                    p = tl.exp(log_p)
                    q = tl.exp(log_q)
                    kl_pm += tl.sum(tl.where(p > 0.0, p * (log_p - log_m), 0.0), axis=0)
                    kl_qm += tl.sum(tl.where(q > 0.0, q * (log_q - log_m), 0.0), axis=0)
                div = jsd_beta * kl_pm + (1.0 - jsd_beta) * kl_qm
                div_aux = kl_qm
            # SPEC §3: a row with no distribution (all of s/τ, or all of z/τ, −inf) has no divergence.
            div = tl.where((sum_s == 0.0) | (sum_z == 0.0), float("nan"), div)
            loss += w_soft * div
        if TAU_ONE:
            mh = ms
            log_sum_h = log_sum_s
        else:
            log_sum_h = tl.log(sum_h)
        if HARD:
            in_range = (y >= 0) & (y < V)
            s_y = tl.load(s_row + tl.where(in_range, y, 0)).to(tl.float32)
            ce = tl.where(in_range, (mh - s_y) + log_sum_h, float("nan"))
            loss += w_hard * ce
        tl.store(loss_ptr + row, loss)
        stats_row = stats_ptr + row * NUM_STATS
        tl.store(stats_row + 0, mz)
        tl.store(stats_row + 1, log_sum_z)
        tl.store(stats_row + 2, ms)
        tl.store(stats_row + 3, log_sum_s)
        tl.store(stats_row + 4, mh)
        tl.store(stats_row + 5, log_sum_h)
        tl.store(stats_row + 6, max_a)
        tl.store(stats_row + 7, div_aux)
    else:
        tl.store(loss_ptr + row, 0.0)
        stats_row = stats_ptr + row * NUM_STATS
        for k in tl.static_range(NUM_STATS):
            tl.store(stats_row + k, 0.0)
