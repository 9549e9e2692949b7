"""Backward kernel of the contrastive KD loss: one program per row, one pass.

Reads ``a, t, s`` once more (``a`` and ``t`` only when the soft term is on),
rebuilds ``log p = (z/τ − max_z) − log Σ_z`` and ``log q`` likewise from the forward
statistics and writes ``grad_s = g_row · (w_soft·∂D/∂u / τ + w_hard·∂ce/∂s)``
in the gradient buffer's dtype (the formulas are derived in
``caad_kernels/reference.py``). ``g_row`` is the upstream gradient of the row
loss, read on device, so reductions and ``grad_output`` cost no host sync.
The gradient buffer may be the student buffer itself (in-place backward):
each block is read before it is overwritten, by the same program.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import contrast_block, log_add_exp, store_rounded
from .forward import NUM_STATS


@triton.jit
def contrastive_kd_bwd_kernel(
    grad_rows_ptr, s_ptr, a_ptr, t_ptr, labels_ptr, stats_ptr, g_ptr,
    V, rows_per_batch, grad_rows_stride,
    s_sb, s_st, a_sb, a_st, t_sb, t_st, l_sb, l_st, g_sb, g_st,
    alpha, inv_tau, jsd_beta, log_beta_p, w_soft, w_hard, ignore_index,
    HAS_LABELS: tl.constexpr, SOFT: tl.constexpr, USE_TEXT: tl.constexpr, PLAUS: tl.constexpr,
    DIV: tl.constexpr, HARD: tl.constexpr, TAU_ONE: tl.constexpr, BLOCK_V: tl.constexpr,
    SOFTWARE_BF16_RNE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    bi = row // rows_per_batch
    ti = row - bi * rows_per_batch
    s_row = s_ptr + bi * s_sb + ti * s_st
    a_row = a_ptr + bi * a_sb + ti * a_st
    t_row = t_ptr + bi * t_sb + ti * t_st
    g_row = g_ptr + bi * g_sb + ti * g_st
    offs = tl.arange(0, BLOCK_V)
    NEG_INF: tl.constexpr = float("-inf")

    if HAS_LABELS:
        y = tl.load(labels_ptr + bi * l_sb + ti * l_st).to(tl.int64)
        valid = y != ignore_index
    else:
        y = 0
        valid = True

    if valid:
        upstream = tl.load(grad_rows_ptr + row * grad_rows_stride).to(tl.float32)
        stats_row = stats_ptr + row * NUM_STATS
        max_z = tl.load(stats_row + 0)
        log_sum_z = tl.load(stats_row + 1)
        max_s = tl.load(stats_row + 2)
        log_sum_s = tl.load(stats_row + 3)
        max_h = tl.load(stats_row + 4)
        log_sum_h = tl.load(stats_row + 5)
        threshold = tl.load(stats_row + 6) + log_beta_p
        div_aux = tl.load(stats_row + 7)
        c_soft = upstream * w_soft * inv_tau
        c_hard = upstream * w_hard
        if DIV == 2:
            log_1m_beta = tl.log(1.0 - jsd_beta)
            log_beta = tl.log(jsd_beta)
        # Reverse KL / JSD: q·(r − D) cancels at a saturated student's argmax; the soft gradient sums to
        # 0, so that entry (the first with s/τ = max_s) is withheld from the pass and written at the end
        # as minus the sum of the others (see reference._compensate_argmax). Withheld, not overwritten:
        # two stores to one address from different threads of a program would be unordered.
        # Two scalars through the loop, the entry itself recomputed after it: the jsd+plausibility+hard
        # variants are at the register limit (sm_90), more live state spilled.
        arg = V * 0 - 1
        soft_sum = tl.zeros([], dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            mask = cols < V
            s = tl.load(s_row + cols, mask=mask, other=NEG_INF).to(tl.float32)
            log_q = (s * inv_tau - max_s) - log_sum_s
            q = tl.exp(log_q)
            grad = tl.zeros([BLOCK_V], dtype=tl.float32)
            store_mask = mask
            if SOFT:
                a = tl.load(a_row + cols, mask=mask, other=NEG_INF).to(tl.float32)
                if USE_TEXT:
                    t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
                else:
                    t = a
                log_p = (contrast_block(a, t, alpha, threshold, USE_TEXT, PLAUS) * inv_tau - max_z) - log_sum_z
                if DIV == 0:
                    d_u = q - tl.exp(log_p)
                elif DIV == 1:
                    d_u = tl.where(q > 0.0, q * (log_q - log_p - div_aux), 0.0)
                else:
                    log_m = log_add_exp(log_q + log_1m_beta, log_p + log_beta)
                    d_u = (1.0 - jsd_beta) * tl.where(q > 0.0, q * (log_q - log_m - div_aux), 0.0)
                grad += c_soft * d_u
            if HARD:
                if TAU_ONE:
                    q_h = q
                else:
                    q_h = tl.exp((s - max_h) - log_sum_h)
                grad += c_hard * (q_h - tl.where(cols == y, 1.0, 0.0))
            if SOFT and DIV != 0:
                soft_sum += tl.sum(tl.where(mask, c_soft * d_u, 0.0), axis=0)
                first = tl.min(tl.where(mask & (s * inv_tau == max_s), cols, V), axis=0)
                take = (arg < 0) & (first < V)
                # mask & ~(cols == first & take), the scalars broadcast first (the interpreter mistypes
                # block | scalar)
                store_mask = mask & ((cols != first) | (arg + cols * 0 >= 0) | (first + cols * 0 >= V))
                arg = tl.where(take, first, arg)
            store_rounded(g_row + cols, grad, store_mask, SOFTWARE_BF16_RNE)
        if SOFT and DIV != 0:
            # The withheld entry, recomputed (its s is intact even in place: it was never overwritten) in
            # lane 0: its own soft part minus the row's whole soft sum, plus its hard part.
            lane0 = (offs == 0) & (arg + offs * 0 >= 0)
            at = tl.where(lane0, arg, 0) + offs * 0
            s = tl.load(s_row + at, mask=lane0, other=0.0).to(tl.float32)
            a = tl.load(a_row + at, mask=lane0, other=0.0).to(tl.float32)
            if USE_TEXT:
                t = tl.load(t_row + at, mask=lane0, other=0.0).to(tl.float32)
            else:
                t = a
            log_q = (s * inv_tau - max_s) - log_sum_s
            q = tl.exp(log_q)
            log_p = (contrast_block(a, t, alpha, threshold, USE_TEXT, PLAUS) * inv_tau - max_z) - log_sum_z
            if DIV == 1:
                d_u = tl.where(q > 0.0, q * (log_q - log_p - div_aux), 0.0)
            else:
                log_m = log_add_exp(log_q + log_1m_beta, log_p + log_beta)
                d_u = (1.0 - jsd_beta) * tl.where(q > 0.0, q * (log_q - log_m - div_aux), 0.0)
            fixed = c_soft * d_u - soft_sum  # = −Σ_{others} soft
            if HARD:
                if TAU_ONE:
                    q_h = q
                else:
                    q_h = tl.exp((s - max_h) - log_sum_h)
                fixed += c_hard * (q_h - tl.where(at == y, 1.0, 0.0))
            store_rounded(g_row + at, fixed, lane0, SOFTWARE_BF16_RNE)
    else:
        # Ignored rows get an exact zero gradient (the buffer may be uninitialised or hold s).
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            tl.store(g_row + cols, tl.zeros([BLOCK_V], dtype=g_ptr.dtype.element_ty), mask=cols < V)
