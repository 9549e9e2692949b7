"""``torch.library`` custom ops of the sparse-target loss (SPEC §9), their fake kernels and autograd.

Ops (namespace ``caad``), mirroring the dense ops of :mod:`caad_kernels.ops`:
  * ``sparse_kd_fwd(s, ids, logprobs, tail?, labels?, temperature, soft_weight, hard_weight,
    ignore_index, backend, inplace_backward) -> (loss_rows [N], stats [N, M])``
  * ``sparse_kd_bwd(grad_rows, s, ids, logprobs, tail?, labels?, stats, <options>, backend) -> grad_s``
  * ``sparse_kd_bwd_(grad_rows, s!, ...)``: same, overwriting ``s`` with its gradient.

``s`` is ``[..., V]``, ``ids``/``logprobs`` ``[..., K]``, ``tail``/``labels`` ``[...]``; inputs are
validated by :func:`caad_kernels.sparse_contrastive_kd_loss` before they get here.
"""

from __future__ import annotations

import importlib
import math

import torch
from torch import Tensor

from .reference import compute_dtype
from .sparse_reference import sparse_options

SPARSE_BACKENDS = ("torch", "triton", "cpu")
IMPLEMENTED = ("torch", "triton", "cpu")  # backends whose sparse kernels exist
_MODULES = {
    "torch": "caad_kernels.backends.sparse_torch_backend",
    "triton": "caad_kernels.backends.sparse_triton_backend",
    "cpu": "caad_kernels.backends.sparse_native_backend",
}
# Statistics columns per backend ("torch" recomputes everything and keeps none).
SPARSE_NUM_STATS = 6
_NUM_STATS = {"torch": 0, "triton": SPARSE_NUM_STATS, "cpu": SPARSE_NUM_STATS}


def sparse_backend_module(name: str):
    return importlib.import_module(_MODULES[name])


def _loss_dtype(s, logprobs, tail):
    return compute_dtype(s, logprobs, tail)


@torch.library.custom_op("caad::sparse_kd_fwd", mutates_args=())
def sparse_kd_fwd(
    s: Tensor,
    ids: Tensor,
    logprobs: Tensor,
    tail: Tensor | None,
    labels: Tensor | None,
    temperature: float,
    soft_weight: float,
    hard_weight: float,
    ignore_index: int,
    backend: str,
    inplace_backward: bool,
) -> tuple[Tensor, Tensor]:
    """Per-row losses ``[N]`` (fp32; fp64 for float64 inputs) and per-row statistics ``[N, M]``."""
    opts = sparse_options(temperature, soft_weight, hard_weight, ignore_index)
    return sparse_backend_module(backend).forward(s, ids, logprobs, tail, labels, opts)


@sparse_kd_fwd.register_fake
def _(s, ids, logprobs, tail, labels, temperature, soft_weight, hard_weight, ignore_index, backend,
      inplace_backward):
    n = math.prod(s.shape[:-1])
    dt = _loss_dtype(s, logprobs, tail)
    return s.new_empty(n, dtype=dt), s.new_empty(n, _NUM_STATS[backend], dtype=dt)


def _backward_impl(grad_rows, s, ids, logprobs, tail, labels, stats, out, temperature, soft_weight, hard_weight,
                   ignore_index, backend):
    opts = sparse_options(temperature, soft_weight, hard_weight, ignore_index)
    sparse_backend_module(backend).backward(grad_rows, s, ids, logprobs, tail, labels, stats, opts, out)


@torch.library.custom_op("caad::sparse_kd_bwd", mutates_args=())
def sparse_kd_bwd(
    grad_rows: Tensor,
    s: Tensor,
    ids: Tensor,
    logprobs: Tensor,
    tail: Tensor | None,
    labels: Tensor | None,
    stats: Tensor,
    temperature: float,
    soft_weight: float,
    hard_weight: float,
    ignore_index: int,
    backend: str,
) -> Tensor:
    """``grad_s[n] = grad_rows[n] · ∂ℓ_n/∂s_n``, a new contiguous tensor shaped and typed like ``s``."""
    out = torch.empty_like(s, memory_format=torch.contiguous_format)
    _backward_impl(grad_rows, s, ids, logprobs, tail, labels, stats, out, temperature, soft_weight, hard_weight,
                   ignore_index, backend)
    return out


@sparse_kd_bwd.register_fake
def _(grad_rows, s, *args):
    return torch.empty_like(s, memory_format=torch.contiguous_format)


@torch.library.custom_op("caad::sparse_kd_bwd_", mutates_args=("s",))
def sparse_kd_bwd_(
    grad_rows: Tensor,
    s: Tensor,
    ids: Tensor,
    logprobs: Tensor,
    tail: Tensor | None,
    labels: Tensor | None,
    stats: Tensor,
    temperature: float,
    soft_weight: float,
    hard_weight: float,
    ignore_index: int,
    backend: str,
) -> None:
    """In-place variant: overwrites the student logits ``s`` with their gradient."""
    _backward_impl(grad_rows, s, ids, logprobs, tail, labels, stats, s, temperature, soft_weight, hard_weight,
                   ignore_index, backend)


@sparse_kd_bwd_.register_fake
def _(*args):
    return None


def _setup_context(ctx, inputs, output):
    s, ids, logprobs, tail, labels, *scalars, backend, inplace_backward = inputs
    ctx.save_for_backward(s, ids, logprobs, tail, labels, output[1])
    ctx.scalars = tuple(scalars)
    ctx.backend = backend
    ctx.inplace_backward = inplace_backward


def _backward(ctx, grad_rows, grad_stats):
    s, ids, logprobs, tail, labels, stats = ctx.saved_tensors
    grad_s = None
    if ctx.needs_input_grad[0]:
        if grad_rows is None:
            grad_rows = torch.zeros(stats.shape[0], dtype=stats.dtype, device=s.device)
        if ctx.inplace_backward:
            sparse_kd_bwd_(grad_rows, s, ids, logprobs, tail, labels, stats, *ctx.scalars, ctx.backend)
            grad_s = s
        else:
            grad_s = sparse_kd_bwd(grad_rows, s, ids, logprobs, tail, labels, stats, *ctx.scalars, ctx.backend)
    return (grad_s,) + (None,) * 10


sparse_kd_fwd.register_autograd(_backward, setup_context=_setup_context)
