"""The ``torch`` backend of the sparse-target loss: :mod:`caad_kernels.sparse_reference` run in
row chunks, so that no ``[N, V]`` fp32 temporary exists (SPEC §5).

It keeps no statistics (``stats`` is ``[N, 0]``): backward recomputes each chunk from the
inputs and writes the analytic gradient into ``out``.
"""

from __future__ import annotations

import torch

from ..options import KDOptions
from ..reference import compute_dtype
from ..rows import as_btv, num_rows, shares_storage
from ..sparse_reference import sparse_row_loss_grads, sparse_row_losses
from .torch_backend import _chunks


def _views(s, ids, logprobs, tail, labels):
    s3 = as_btv(s)
    b, t, k = s3.shape[0], s3.shape[1], ids.shape[-1]
    return (s3, ids.reshape(b, t, k), logprobs.reshape(b, t, k),
            tail.reshape(b, t) if tail is not None else None, labels.reshape(b, t) if labels is not None else None)


def _pick(x, b, t0, t1):
    return None if x is None else x[b, t0:t1]


def forward(s, ids, logprobs, tail, labels, opts: KDOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses ``[N]`` (compute dtype) and empty statistics ``[N, 0]``."""
    s3, i3, l3, t2, y2 = _views(s, ids, logprobs, tail, labels)
    n = num_rows(s)
    rows = torch.empty(n, dtype=compute_dtype(s, logprobs, tail), device=s.device)
    rows3 = rows.view(s3.shape[0], s3.shape[1])
    for b, t0, t1 in _chunks(s3):
        rows3[b, t0:t1] = sparse_row_losses(s3[b, t0:t1], i3[b, t0:t1], l3[b, t0:t1], _pick(t2, b, t0, t1),
                                            _pick(y2, b, t0, t1), opts)
    return rows, rows.new_empty(n, 0)


def backward(grad_rows, s, ids, logprobs, tail, labels, stats, opts: KDOptions, out: torch.Tensor) -> None:
    """Write ``grad_rows[n] · ∂ℓ_n/∂s_n`` into ``out`` (shape of ``s``; may be ``s`` itself)."""
    s3, i3, l3, t2, y2 = _views(s, ids, logprobs, tail, labels)
    o3 = as_btv(out)
    g2 = grad_rows.reshape(s3.shape[0], s3.shape[1])
    for b, t0, t1 in _chunks(s3):
        grad = sparse_row_loss_grads(s3[b, t0:t1], i3[b, t0:t1], l3[b, t0:t1], _pick(t2, b, t0, t1),
                                     _pick(y2, b, t0, t1), opts)
        o3[b, t0:t1] = grad * g2[b, t0:t1].to(grad.dtype).unsqueeze(1)
    if not shares_storage(o3, out):
        out.copy_(o3.reshape(out.shape))
