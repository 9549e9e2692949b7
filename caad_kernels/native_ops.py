"""Python-side registrations of the native ops defined in ``csrc/ops.cpp``: fake
kernels (for torch.compile and opcheck) and autograd of the forward op.

Called by :func:`caad_kernels.jit.load` once the library is loaded (the ops
must exist before anything can be registered on them).
"""

from __future__ import annotations

import torch

from .options import NUM_STATS
from .reference import compute_dtype

_registered = False


def _fake_forward(s, a, t, labels, alpha, plausibility_beta, temperature, divergence, jsd_beta, soft_weight,
                  hard_weight, ignore_index):
    rows = s.shape[0] * s.shape[1]
    dtype = compute_dtype(s, a, t)
    return s.new_empty(rows, dtype=dtype), s.new_empty(rows, NUM_STATS, dtype=dtype)


def _fake_backward(*args):
    return None


def _fake_forward_backward(grad_rows, s, a, t, labels, *args):
    return _fake_forward(s, a, t, labels, *args[:-1])


def _setup_context(ctx, inputs, output):
    s, a, t, labels, *scalars = inputs
    ctx.save_for_backward(s, a, t, labels, output[1])
    ctx.scalars = scalars


def _backward(ctx, grad_rows, grad_stats):
    s, a, t, labels, stats = ctx.saved_tensors
    grad_s = torch.empty_like(s, memory_format=torch.contiguous_format)
    if grad_rows is None:
        grad_rows = torch.zeros(stats.shape[0], dtype=stats.dtype, device=s.device)
    torch.ops.caad.native_kd_backward(grad_rows, s, a, t, labels, stats, *ctx.scalars, grad_s)
    return (grad_s,) + (None,) * 11


def register() -> None:
    global _registered
    if _registered:
        return
    torch.library.register_fake("caad::native_kd_forward", _fake_forward)
    torch.library.register_fake("caad::native_kd_backward", _fake_backward)
    torch.library.register_fake("caad::native_kd_forward_backward", _fake_forward_backward)
    torch.library.register_autograd("caad::native_kd_forward", _backward, setup_context=_setup_context)
    _registered = True
