"""The ``cpu`` backend of the sparse-target loss: the C++ kernel of ``csrc/cpu/sparse_kd_cpu.cpp``
(built with the other native ops by :mod:`caad_kernels.jit`), called through ``caad::native_sparse_kd_*``.

The student rows travel as a ``[B, T, V]`` view (no copy for ``logits[:, :-1]``); the small
per-row tensors (ids ``[N, K]`` as int64, log-probabilities and tail in the accumulation dtype,
labels as int64) are made contiguous here, which costs O(N·K), not O(N·V).
"""

from __future__ import annotations

import torch

from ..options import KDOptions
from ..reference import compute_dtype
from ..rows import as_btv, num_rows, shares_storage

NUM_STATS = 6  # max_u, log_sum_u, max_h, log_sum_h, target mass P_S + P_T, tail ratio P_T / Q_T
_registered = False


def _fake_forward(s, ids, logprobs, tail, labels, temperature, soft_weight, hard_weight, ignore_index):
    rows = s.shape[0] * s.shape[1]
    return logprobs.new_empty(rows), logprobs.new_empty(rows, NUM_STATS)


def _register_fakes() -> None:
    global _registered
    if not _registered:
        torch.library.register_fake("caad::native_sparse_kd_forward", _fake_forward)
        torch.library.register_fake("caad::native_sparse_kd_backward", lambda *args: None)
        _registered = True


def _operands(s, ids, logprobs, tail, labels):
    _register_fakes()
    n, k = num_rows(s), ids.shape[-1]
    acc = compute_dtype(s, logprobs, tail)
    return (as_btv(s), ids.reshape(n, k).to(torch.int64).contiguous(), logprobs.reshape(n, k).to(acc).contiguous(),
            tail.reshape(n).to(acc).contiguous() if tail is not None else None,
            labels.reshape(n).to(torch.int64).contiguous() if labels is not None else None)


def _scalars(opts: KDOptions) -> tuple:
    return opts.temperature, opts.soft_weight, opts.hard_weight, opts.ignore_index


def forward(s, ids, logprobs, tail, labels, opts: KDOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses ``[N]`` (fp32, fp64 for float64 inputs) and statistics ``[N, 6]``."""
    return torch.ops.caad.native_sparse_kd_forward(*_operands(s, ids, logprobs, tail, labels), *_scalars(opts))


def backward(grad_rows, s, ids, logprobs, tail, labels, stats, opts: KDOptions, out: torch.Tensor) -> None:
    """Write ``grad_rows[n]·∂ℓ_n/∂s_n`` into ``out`` (shape of ``s``, may be ``s`` itself)."""
    s3, ids2, lp2, tail1, y1 = _operands(s, ids, logprobs, tail, labels)
    o3 = as_btv(out)
    torch.ops.caad.native_sparse_kd_backward(grad_rows.reshape(-1), s3, ids2, lp2, tail1, y1, stats.contiguous(),
                                             *_scalars(opts), o3)
    if not shares_storage(o3, out):
        out.copy_(o3.reshape(out.shape))
