"""Backward kernel of the sparse-target loss (SPEC §9): one program per row, one pass.

First gathers the ``K`` cached ids (and the label) and computes their exact gradient
``c·q − p`` (+ the hard term) — before anything is written, so the gradient buffer may be the
student buffer (in-place backward). Then one pass over the row writes ``(c − r)·q`` (+ the hard
term) everywhere, and a barrier later the gathered entries are overwritten with their values
(``c = P_S + P_T``, ``r = P_T/Q_T``: the tail spread in proportion to q, see
``caad_kernels/sparse_reference.py``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import store_rounded
from .sparse_forward import NUM_SPARSE_STATS


@triton.jit
def sparse_kd_bwd_kernel(
    grad_rows_ptr, s_ptr, ids_ptr, lp_ptr, labels_ptr, stats_ptr, g_ptr,
    V, K, rows_per_batch, s_sb, s_st, g_sb, g_st,
    inv_tau, w_soft, w_hard, ignore_index,
    HAS_LABELS: tl.constexpr, SOFT: tl.constexpr, HARD: tl.constexpr, TAU_ONE: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, SOFTWARE_BF16_RNE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    bi = row // rows_per_batch
    ti = row - bi * rows_per_batch
    s_row = s_ptr + bi * s_sb + ti * s_st
    g_row = g_ptr + bi * g_sb + ti * g_st
    offs = tl.arange(0, BLOCK_V)
    NEG_INF: tl.constexpr = float("-inf")
    if HAS_LABELS:
        y = tl.load(labels_ptr + row)
        valid = y != ignore_index
    else:
        y = -1
        valid = True
    if valid:
        upstream = tl.load(grad_rows_ptr + row).to(tl.float32)
        stats_row = stats_ptr + row * NUM_SPARSE_STATS
        max_u = tl.load(stats_row + 0)
        log_sum_u = tl.load(stats_row + 1)
        max_h = tl.load(stats_row + 2)
        log_sum_h = tl.load(stats_row + 3)
        mass = tl.load(stats_row + 4)
        ratio = tl.load(stats_row + 5)
        c_soft = upstream * w_soft * inv_tau
        c_hard = upstream * w_hard
        a_soft = c_soft * (mass - ratio)
        # The support entries and the label, read before the pass may overwrite them.
        kk = tl.arange(0, BLOCK_K)
        ids = tl.load(ids_ptr + row * K + kk, mask=kk < K, other=-1)
        listed = ids >= 0
        if SOFT:
            lp = tl.load(lp_ptr + row * K + kk, mask=kk < K, other=NEG_INF).to(tl.float32)
            xs = tl.load(s_row + tl.where(listed, ids, 0), mask=listed, other=0.0).to(tl.float32)
            q_s = tl.exp((xs * inv_tau - max_u) - log_sum_u)
            p = tl.exp(tl.where(listed & (lp > NEG_INF), lp, NEG_INF))
            fix = c_soft * (mass * q_s - p)
            if HARD:
                if TAU_ONE:
                    qh_s = q_s
                else:
                    qh_s = tl.exp((xs - max_h) - log_sum_h)
                fix += c_hard * (qh_s - tl.where(ids == y, 1.0, 0.0))
        if HARD:
            label_ok = (y >= 0) & (y < V)
            if SOFT:
                label_ok = label_ok & (tl.sum(tl.where(listed & (ids == y), 1, 0), axis=0) == 0)
            xy = tl.load(s_row + tl.where(label_ok, y, 0)).to(tl.float32)
            if TAU_ONE:
                qh_y = tl.exp((xy * inv_tau - max_u) - log_sum_u)
            else:
                qh_y = tl.exp((xy - max_h) - log_sum_h)
            fix_y = a_soft * tl.exp((xy * inv_tau - max_u) - log_sum_u) + c_hard * (qh_y - 1.0)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            mask = cols < V
            x = tl.load(s_row + cols, mask=mask, other=NEG_INF).to(tl.float32)
            q = tl.exp((x * inv_tau - max_u) - log_sum_u)
            grad = a_soft * q
            if HARD:
                if TAU_ONE:
                    grad += c_hard * q
                else:
                    grad += c_hard * tl.exp((x - max_h) - log_sum_h)
            store_rounded(g_row + cols, grad, mask, SOFTWARE_BF16_RNE)
        tl.debug_barrier()  # the pass's stores land before the entries below overwrite some of them
        if SOFT:
            store_rounded(g_row + tl.where(listed, ids, 0), fix, listed, SOFTWARE_BF16_RNE)
        if HARD:
            store_rounded(g_row + tl.where(label_ok, y, 0), fix_y, label_ok, SOFTWARE_BF16_RNE)
    else:
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            tl.store(g_row + cols, tl.zeros([BLOCK_V], dtype=g_ptr.dtype.element_ty), mask=cols < V)
