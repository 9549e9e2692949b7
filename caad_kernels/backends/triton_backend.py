"""The ``triton`` backend: launchers for the fused kernels in ``caad_kernels/triton_kernels``.

Design: two passes over the vocabulary in total for forward + backward
(forward keeps 8 fp32 scalars per row, backward recomputes ``p``/``q`` and
writes ``grad_s``): 14 bytes per entry for bf16 inputs against the 8-byte
roofline. Recomputing in backward keeps the forward memory at O(N) (SPEC §5)
and makes evaluation-only calls cost one read of the inputs.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

from ..options import FORWARD_KL, JSD, NUM_STATS, REVERSE_KL, KDOptions
from ..rows import as_bt, as_btv, num_rows, shares_storage

_DIV_CODES = {FORWARD_KL: 0, REVERSE_KL: 1, JSD: 2}


def _block_v(vocab: int, device: torch.device) -> int:
    # On GPU 4096 fp32 lanes per block keep 8 warps busy with 16 values per thread;
    # the CPU interpreter is faster with smaller blocks.
    cap = 4096 if device.type == "cuda" else 1024
    return min(cap, max(16, 1 << (max(vocab, 1) - 1).bit_length()))


def _num_warps(block_v: int) -> int:
    return 8 if block_v >= 2048 else 4


def _flags(opts: KDOptions, labels: torch.Tensor | None) -> dict:
    return dict(
        HAS_LABELS=labels is not None,
        SOFT=opts.uses_teacher,
        USE_TEXT=opts.uses_text,
        PLAUS=opts.uses_teacher and opts.plausibility_beta > 0.0,
        DIV=_DIV_CODES[opts.divergence_code],
        HARD=opts.uses_labels_as_targets,
        TAU_ONE=opts.temperature == 1.0,
    )


def _operands(s, a, t, labels, opts):
    """3-D row views and their strides; absent tensors alias ``s`` (never read)."""
    s3 = as_btv(s)
    a3 = as_btv(a) if opts.uses_teacher else s3
    t3 = as_btv(t) if opts.uses_text else s3
    l2 = as_bt(labels) if labels is not None else s3[:, :, 0]
    return s3, a3, t3, l2


def _on_device(device: torch.device):
    # Triton launches on the current CUDA device: make it the tensors' device.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _log_beta_p(opts: KDOptions) -> float:
    return math.log(opts.plausibility_beta) if opts.plausibility_beta > 0.0 else 0.0


def forward(
    s: torch.Tensor, a: torch.Tensor, t: torch.Tensor | None, labels: torch.Tensor | None, opts: KDOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row fp32 losses ``[N]`` and statistics ``[N, 8]`` (``options.STAT_NAMES``)."""
    from ..triton_kernels.forward import contrastive_kd_fwd_kernel

    n, vocab = num_rows(s), s.shape[-1]
    loss = torch.empty(n, dtype=torch.float32, device=s.device)
    stats = torch.empty(n, NUM_STATS, dtype=torch.float32, device=s.device)
    if n == 0:
        return loss, stats
    s3, a3, t3, l2 = _operands(s, a, t, labels, opts)
    block_v = _block_v(vocab, s.device)
    with _on_device(s.device):
        contrastive_kd_fwd_kernel[(n,)](
            s3, a3, t3, l2, loss, stats,
            vocab, s3.shape[1],
            s3.stride(0), s3.stride(1), a3.stride(0), a3.stride(1), t3.stride(0), t3.stride(1),
            l2.stride(0), l2.stride(1),
            opts.alpha, _log_beta_p(opts), 1.0 / opts.temperature, opts.jsd_beta,
            opts.soft_weight, opts.hard_weight, opts.ignore_index,
            BLOCK_V=block_v, num_warps=_num_warps(block_v), **_flags(opts, labels),
        )
    return loss, stats


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
    """Write ``grad_rows[n]·∂ℓ_n/∂s_n`` into ``out`` (shape of ``s``, may be ``s`` itself)."""
    from ..triton_kernels.backward import contrastive_kd_bwd_kernel

    n, vocab = num_rows(s), s.shape[-1]
    if n == 0:
        return
    s3, a3, t3, l2 = _operands(s, a, t, labels, opts)
    o3 = as_btv(out)
    grad_rows = grad_rows.reshape(n)
    block_v = _block_v(vocab, s.device)
    with _on_device(s.device):
        contrastive_kd_bwd_kernel[(n,)](
            grad_rows, s3, a3, t3, l2, stats, o3,
            vocab, s3.shape[1], grad_rows.stride(0),
            s3.stride(0), s3.stride(1), a3.stride(0), a3.stride(1), t3.stride(0), t3.stride(1),
            l2.stride(0), l2.stride(1), o3.stride(0), o3.stride(1),
            opts.alpha, 1.0 / opts.temperature, opts.jsd_beta, _log_beta_p(opts),
            opts.soft_weight, opts.hard_weight, opts.ignore_index,
            BLOCK_V=block_v, num_warps=_num_warps(block_v), **_flags(opts, labels),
            SOFTWARE_BF16_RNE=os.environ.get("TRITON_INTERPRET") == "1",
        )
    if not shares_storage(o3, out):
        out.copy_(o3.reshape(out.shape))
