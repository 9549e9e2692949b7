"""The ``cpu`` and ``cuda`` backends: the C++/CUDA kernels of ``csrc/`` (built by
:mod:`caad_kernels.jit`), called through the ``caad::native_kd_*`` ops."""

from __future__ import annotations

import torch

from ..options import KDOptions
from ..rows import as_bt, as_btv, shares_storage


def _operands(s, a, t, labels, opts):
    s3 = as_btv(s)
    a3 = as_btv(a) if opts.uses_teacher else s3
    t3 = as_btv(t) if opts.uses_text else None
    l2 = as_bt(labels) if labels is not None else None
    return s3, a3, t3, l2


def _scalars(opts: KDOptions) -> tuple:
    return (opts.alpha, opts.plausibility_beta, opts.temperature, opts.divergence_code, opts.jsd_beta,
            opts.soft_weight, opts.hard_weight, opts.ignore_index)


def forward(s, a, t, labels, opts: KDOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row fp32 losses ``[N]`` and statistics ``[N, 8]``."""
    s3, a3, t3, l2 = _operands(s, a, t, labels, opts)
    return torch.ops.caad.native_kd_forward(s3, a3, t3, l2, *_scalars(opts))


def backward(grad_rows, s, a, t, labels, stats, opts: KDOptions, out: torch.Tensor) -> None:
    """Write ``grad_rows[n]·∂ℓ_n/∂s_n`` into ``out`` (shape of ``s``, may be ``s`` itself)."""
    s3, a3, t3, l2 = _operands(s, a, t, labels, opts)
    o3 = as_btv(out)
    torch.ops.caad.native_kd_backward(grad_rows.reshape(-1), s3, a3, t3, l2, stats.contiguous(), *_scalars(opts),
                                      o3)
    if not shares_storage(o3, out):
        out.copy_(o3.reshape(out.shape))


def forward_backward(s, a, t, labels, grad_rows, opts: KDOptions, out: torch.Tensor) -> torch.Tensor:
    """Per-row losses ``[N]``, with ``grad_rows[n]·∂ℓ_n/∂s_n`` written into ``out`` (a fresh contiguous tensor
    shaped like ``s``) by the same call: one kernel on sm_90, the two kernels elsewhere."""
    s3, a3, t3, l2 = _operands(s, a, t, labels, opts)
    rows, _ = torch.ops.caad.native_kd_forward_backward(grad_rows.reshape(-1), s3, a3, t3, l2, *_scalars(opts),
                                                        as_btv(out))
    return rows
