"""The ``triton`` backend of the sparse-target loss: launchers for
``caad_kernels/triton_kernels/sparse_forward.py`` and ``sparse_backward.py``.

Bytes per vocabulary entry for forward + backward: one read of ``s`` in the forward, one read of
``s`` and one write of ``grad_s`` in the backward — 6 for bf16 logits (the dense op reads
``a, t, s`` twice and writes ``grad_s``: 14). The ``K`` gathers add O(K) per row.
"""

from __future__ import annotations

import os

import torch

from ..options import KDOptions
from ..rows import as_btv, num_rows, shares_storage
from .triton_backend import _block_v, _num_warps, _on_device

NUM_STATS = 6


def _block_k(k: int) -> int:
    return max(16, 1 << (max(k, 1) - 1).bit_length())


def _operands(s, ids, logprobs, tail, labels):
    n, k = num_rows(s), ids.shape[-1]
    s3 = as_btv(s)
    ids2 = ids.reshape(n, k).to(torch.int64).contiguous()
    lp2 = logprobs.reshape(n, k).to(torch.float32).contiguous()
    tail1 = tail.reshape(n).to(torch.float32).contiguous() if tail is not None else lp2
    y1 = labels.reshape(n).to(torch.int64).contiguous() if labels is not None else ids2
    return s3, ids2, lp2, tail1, y1


def _flags(opts: KDOptions, labels) -> dict:
    return dict(HAS_LABELS=labels is not None, SOFT=opts.uses_teacher, HARD=opts.uses_labels_as_targets,
                TAU_ONE=opts.temperature == 1.0)


def forward(s, ids, logprobs, tail, labels, opts: KDOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row fp32 losses ``[N]`` and statistics ``[N, 6]``."""
    from ..triton_kernels.sparse_forward import sparse_kd_fwd_kernel

    n, vocab, k = num_rows(s), s.shape[-1], ids.shape[-1]
    loss = torch.empty(n, dtype=torch.float32, device=s.device)
    stats = torch.empty(n, NUM_STATS, dtype=torch.float32, device=s.device)
    if n == 0:
        return loss, stats
    s3, ids2, lp2, tail1, y1 = _operands(s, ids, logprobs, tail, labels)
    block_v = _block_v(vocab, s.device)
    with _on_device(s.device):
        sparse_kd_fwd_kernel[(n,)](
            s3, ids2, lp2, tail1, y1, loss, stats,
            vocab, k, s3.shape[1], s3.stride(0), s3.stride(1),
            1.0 / opts.temperature, opts.soft_weight, opts.hard_weight, opts.ignore_index,
            HAS_TAIL=tail is not None, BLOCK_V=block_v, BLOCK_K=_block_k(k), num_warps=_num_warps(block_v),
            **_flags(opts, labels),
        )
    return loss, stats


def backward(grad_rows, s, ids, logprobs, tail, labels, stats, opts: KDOptions, out: torch.Tensor) -> None:
    """Write ``grad_rows[n]·∂ℓ_n/∂s_n`` into ``out`` (shape of ``s``, may be ``s`` itself)."""
    from ..triton_kernels.sparse_backward import sparse_kd_bwd_kernel

    n, vocab, k = num_rows(s), s.shape[-1], ids.shape[-1]
    if n == 0:
        return
    s3, ids2, lp2, _, y1 = _operands(s, ids, logprobs, tail, labels)
    o3 = as_btv(out)
    grad_rows = grad_rows.reshape(n).to(torch.float32).contiguous()
    block_v = _block_v(vocab, s.device)
    with _on_device(s.device):
        sparse_kd_bwd_kernel[(n,)](
            grad_rows, s3, ids2, lp2, y1, stats.contiguous(), o3,
            vocab, k, s3.shape[1], s3.stride(0), s3.stride(1), o3.stride(0), o3.stride(1),
            1.0 / opts.temperature, opts.soft_weight, opts.hard_weight, opts.ignore_index,
            BLOCK_V=block_v, BLOCK_K=_block_k(k), num_warps=_num_warps(block_v),
            SOFTWARE_BF16_RNE=os.environ.get("TRITON_INTERPRET") == "1", **_flags(opts, labels),
        )
    if not shares_storage(o3, out):
        out.copy_(o3.reshape(out.shape))
