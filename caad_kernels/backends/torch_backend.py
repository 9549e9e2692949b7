"""The ``torch`` backend: the reference math of :mod:`caad_kernels.reference`, run in
row chunks so that no ``[N, V]`` fp32 temporary exists (SPEC §5).

It keeps no statistics (``stats`` is ``[N, 0]``): backward recomputes each chunk
from the inputs and writes the analytic gradient into ``out``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..options import KDOptions
from ..reference import compute_dtype, row_loss_grads, row_losses
from ..rows import as_bt, as_btv, num_rows, shares_storage

# Elements per chunk: a few fp32 temporaries of this size (16 MiB each) at most.
CHUNK_ELEMENTS = 1 << 22


def _chunks(s3: torch.Tensor) -> Iterator[tuple[int, int, int]]:
    """(b, t0, t1) slices covering all rows, each at most CHUNK_ELEMENTS entries."""
    b_count, t_count, vocab = s3.shape
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for b in range(b_count):
        for t0 in range(0, t_count, step):
            yield b, t0, min(t0 + step, t_count)


def _views(s, a, t, labels, opts):
    s3 = as_btv(s)
    a3 = as_btv(a) if opts.uses_teacher else None
    t3 = as_btv(t) if opts.uses_text else None
    l2 = as_bt(labels) if labels is not None else None
    return s3, a3, t3, l2


def _pick(x3, b, t0, t1):
    return None if x3 is None else x3[b, t0:t1]


def forward(
    s: torch.Tensor, a: torch.Tensor, t: torch.Tensor | None, labels: torch.Tensor | None, opts: KDOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses ``[N]`` (compute dtype) and empty statistics ``[N, 0]``."""
    s3, a3, t3, l2 = _views(s, a, t, labels, opts)
    n = num_rows(s)
    rows = torch.empty(n, dtype=compute_dtype(s, a, t), device=s.device)
    rows3 = rows.view(s3.shape[0], s3.shape[1])
    for b, t0, t1 in _chunks(s3):
        rows3[b, t0:t1] = row_losses(
            s3[b, t0:t1], _pick(a3, b, t0, t1), _pick(t3, b, t0, t1), _pick(l2, b, t0, t1), opts
        )
    return rows, rows.new_empty(n, 0)


def backward(
    grad_rows: torch.Tensor,
    s: torch.Tensor,
    a: torch.Tensor,
    t: torch.Tensor | None,
    labels: torch.Tensor | None,
    stats: torch.Tensor,
    opts: KDOptions,
    out: torch.Tensor,
) -> None:
    """Write ``grad_rows[n] · ∂ℓ_n/∂s_n`` into ``out`` (shape of ``s``; may be ``s`` itself)."""
    s3, a3, t3, l2 = _views(s, a, t, labels, opts)
    o3 = as_btv(out)
    g2 = grad_rows.reshape(s3.shape[0], s3.shape[1])
    for b, t0, t1 in _chunks(s3):
        grad = row_loss_grads(
            s3[b, t0:t1], _pick(a3, b, t0, t1), _pick(t3, b, t0, t1), _pick(l2, b, t0, t1), opts
        )
        o3[b, t0:t1] = grad * g2[b, t0:t1].to(grad.dtype).unsqueeze(1)
    if not shares_storage(o3, out):
        out.copy_(o3.reshape(out.shape))
