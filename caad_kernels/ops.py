"""``torch.library`` custom ops of the contrastive KD loss, their fake kernels and autograd.

Ops (namespace ``caad``):
  * ``contrastive_kd_fwd(s, a, t?, labels?, <options>, backend, inplace_backward)
    -> (loss_rows [N], stats [N, K])``
  * ``contrastive_kd_bwd(grad_rows, s, a, t?, labels?, stats, <options>, backend) -> grad_s``
  * ``contrastive_kd_bwd_(grad_rows, s!, ...)``: same, overwriting ``s`` with its gradient.

Registering them as custom ops (instead of calling kernels from an
``autograd.Function``) lets ``torch.compile`` trace a model that calls the loss
without graph breaks, with the fake kernels giving output shapes, and lets
``torch.library.opcheck`` test the registrations. The options are plain
scalars at this boundary because op schemas take no Python objects; they are
rebuilt into a :class:`KDOptions` on the other side.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .dispatch import backend_module
from .options import NUM_STATS, KDOptions
from .reference import compute_dtype

# Statistics columns per backend ("torch" recomputes everything and keeps none).
_NUM_STATS = {"torch": 0, "triton": NUM_STATS, "cpu": NUM_STATS, "cuda": NUM_STATS}


def _options(alpha, plausibility_beta, temperature, divergence, jsd_beta, soft_weight, hard_weight, ignore_index):
    return KDOptions(
        alpha=alpha, plausibility_beta=plausibility_beta, temperature=temperature, divergence=divergence,
        jsd_beta=jsd_beta, soft_weight=soft_weight, hard_weight=hard_weight, ignore_index=ignore_index,
    )


@torch.library.custom_op("caad::contrastive_kd_fwd", mutates_args=())
def contrastive_kd_fwd(
    s: Tensor,
    a: Tensor,
    t: Tensor | None,
    labels: Tensor | None,
    alpha: float,
    plausibility_beta: float,
    temperature: float,
    divergence: str,
    jsd_beta: float,
    soft_weight: float,
    hard_weight: float,
    ignore_index: int,
    backend: str,
    inplace_backward: bool,
) -> tuple[Tensor, Tensor]:
    """Per-row losses ``[N]`` (fp32; fp64 for float64 inputs) and per-row statistics ``[N, K]``."""
    opts = _options(alpha, plausibility_beta, temperature, divergence, jsd_beta, soft_weight, hard_weight,
                    ignore_index)
    return backend_module(backend).forward(s, a, t, labels, opts)


@contrastive_kd_fwd.register_fake
def _(s, a, t, labels, alpha, plausibility_beta, temperature, divergence, jsd_beta, soft_weight, hard_weight,
      ignore_index, backend, inplace_backward):
    n = math.prod(s.shape[:-1])
    loss_dtype = compute_dtype(s, a, t)
    return s.new_empty(n, dtype=loss_dtype), s.new_empty(n, _NUM_STATS[backend], dtype=loss_dtype)


def _backward_impl(grad_rows, s, a, t, labels, stats, out, alpha, plausibility_beta, temperature, divergence,
                   jsd_beta, soft_weight, hard_weight, ignore_index, backend):
    opts = _options(alpha, plausibility_beta, temperature, divergence, jsd_beta, soft_weight, hard_weight,
                    ignore_index)
    backend_module(backend).backward(grad_rows, s, a, t, labels, stats, opts, out)


@torch.library.custom_op("caad::contrastive_kd_bwd", mutates_args=())
def contrastive_kd_bwd(
    grad_rows: Tensor,
    s: Tensor,
    a: Tensor,
    t: Tensor | None,
    labels: Tensor | None,
    stats: Tensor,
    alpha: float,
    plausibility_beta: float,
    temperature: float,
    divergence: str,
    jsd_beta: float,
    soft_weight: float,
    hard_weight: float,
    ignore_index: int,
    backend: str,
) -> Tensor:
    """``grad_s[n] = grad_rows[n] · ∂ℓ_n/∂s_n``, a new tensor shaped and typed like ``s``."""
    out = torch.empty_like(s, memory_format=torch.contiguous_format)
    _backward_impl(grad_rows, s, a, t, labels, stats, out, alpha, plausibility_beta, temperature, divergence,
                   jsd_beta, soft_weight, hard_weight, ignore_index, backend)
    return out


@contrastive_kd_bwd.register_fake
def _(grad_rows, s, *args):
    return torch.empty_like(s, memory_format=torch.contiguous_format)


@torch.library.custom_op("caad::contrastive_kd_bwd_", mutates_args=("s",))
def contrastive_kd_bwd_(
    grad_rows: Tensor,
    s: Tensor,
    a: Tensor,
    t: Tensor | None,
    labels: Tensor | None,
    stats: Tensor,
    alpha: float,
    plausibility_beta: float,
    temperature: float,
    divergence: str,
    jsd_beta: float,
    soft_weight: float,
    hard_weight: float,
    ignore_index: int,
    backend: str,
) -> None:
    """In-place variant: overwrites the student logits ``s`` with their gradient."""
    _backward_impl(grad_rows, s, a, t, labels, stats, s, alpha, plausibility_beta, temperature, divergence,
                   jsd_beta, soft_weight, hard_weight, ignore_index, backend)


@contrastive_kd_bwd_.register_fake
def _(*args):
    return None


def _setup_context(ctx, inputs, output):
    s, a, t, labels, *scalars, backend, inplace_backward = inputs
    ctx.save_for_backward(s, a, t, labels, output[1])
    ctx.scalars = tuple(scalars)
    ctx.backend = backend
    ctx.inplace_backward = inplace_backward


def _backward(ctx, grad_rows, grad_stats):
    s, a, t, labels, stats = ctx.saved_tensors
    grad_s = None
    if ctx.needs_input_grad[0]:
        if grad_rows is None:
            grad_rows = torch.zeros(stats.shape[0], dtype=stats.dtype, device=s.device)
        if ctx.inplace_backward:
            contrastive_kd_bwd_(grad_rows, s, a, t, labels, stats, *ctx.scalars, ctx.backend)
            grad_s = s
        else:
            grad_s = contrastive_kd_bwd(grad_rows, s, a, t, labels, stats, *ctx.scalars, ctx.backend)
    return (grad_s,) + (None,) * 13


contrastive_kd_fwd.register_autograd(_backward, setup_context=_setup_context)
