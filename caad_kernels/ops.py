"""``torch.library`` custom ops of the contrastive KD loss, their fake kernels and autograd.

Ops (namespace ``caad``):
  * ``contrastive_kd_fwd(s, a, t?, labels?, <options>, backend, inplace_backward)
    -> (loss_rows [N], stats [N, K])``
  * ``contrastive_kd_bwd(grad_rows, s, a, t?, labels?, stats, <options>, backend) -> grad_s``
  * ``contrastive_kd_bwd_(grad_rows, s!, ...)``: same, overwriting ``s`` with its gradient.
  * ``contrastive_kd_fwd_grad(s, a, t?, labels?, divisor, <options>, backend) -> (loss [], grad_s)``:
    the reduced loss ``Σ ℓ / divisor`` and its gradient, both from the forward
    (``grad_in_forward=True``); its autograd only scales ``grad_s`` by the upstream scalar
    through ``scale_grad_(grad_s!, g)``, which leaves it untouched when ``g`` is exactly 1.

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

from .dispatch import HAS_TRITON, backend_module
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


# ---------------------------------------------------------------------------------
# grad_in_forward: the gradient computed with the loss.
#
# The backward of a scalar loss only needs one upstream number, so the forward can
# produce ∂loss/∂s itself — assuming that number is 1 — and the backward rescales it
# in place when it is not. That lets one kernel read s, a and t once for both the loss
# and the gradient (the sm_90 cluster kernel of the ``cuda`` backend keeps the row on
# chip; every other backend runs its forward and backward kernels back to back), at the
# price of holding grad_s from the forward to the backward.


def _fwd_grad_impl(s, a, t, labels, divisor, opts: KDOptions, backend: str) -> tuple[Tensor, Tensor]:
    module = backend_module(backend)
    n = math.prod(s.shape[:-1])
    grad = torch.empty_like(s, memory_format=torch.contiguous_format)
    # One upstream weight per row, 1/divisor, on device: no host sync.
    scale = divisor.reciprocal().reshape(1).expand(n).contiguous()
    fused = getattr(module, "forward_backward", None)
    if fused is not None:
        rows = fused(s, a, t, labels, scale, opts, grad)
    else:
        rows, stats = module.forward(s, a, t, labels, opts)
        module.backward(scale, s, a, t, labels, stats, opts, grad)
    return rows.sum() / divisor, grad


@torch.library.custom_op("caad::contrastive_kd_fwd_grad", mutates_args=())
def contrastive_kd_fwd_grad(
    s: Tensor,
    a: Tensor,
    t: Tensor | None,
    labels: Tensor | None,
    divisor: Tensor,
    alpha: float,
    plausibility_beta: float,
    temperature: float,
    divergence: str,
    jsd_beta: float,
    soft_weight: float,
    hard_weight: float,
    ignore_index: int,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """``(Σ_n ℓ_n / divisor, ∂(Σ_n ℓ_n / divisor)/∂s)``: a 0-dim loss in the compute dtype (fp32; fp64 for
    float64 inputs) and a contiguous gradient shaped and typed like ``s``. ``divisor`` is a 0-dim tensor of
    the compute dtype on ``s``'s device (1 for ``sum``, the valid-row count or ``num_items_in_batch``)."""
    opts = _options(alpha, plausibility_beta, temperature, divergence, jsd_beta, soft_weight, hard_weight,
                    ignore_index)
    return _fwd_grad_impl(s, a, t, labels, divisor, opts, backend)


@contrastive_kd_fwd_grad.register_fake
def _(s, a, t, labels, divisor, *args):
    return s.new_empty((), dtype=compute_dtype(s, a, t)), torch.empty_like(s, memory_format=torch.contiguous_format)


@torch.library.custom_op("caad::scale_grad_", mutates_args=("grad",))
def scale_grad_(grad: Tensor, scale: Tensor) -> None:
    """``grad *= scale`` in place (``scale`` 0-dim), skipped when ``scale`` is exactly 1 — the usual upstream
    gradient of a loss — so that case reads and writes nothing. On CUDA the test runs on the device (no
    host sync)."""
    if grad.numel() == 0:
        return
    if grad.device.type == "cuda" and grad.is_contiguous() and HAS_TRITON:
        from .triton_kernels.scale import scale_unless_one

        scale_unless_one(grad, scale)
    elif grad.device.type != "cpu":
        grad.mul_(scale)  # no host sync: always multiply
    elif scale.item() != 1.0:
        grad.mul_(scale)


@scale_grad_.register_fake
def _(grad, scale):
    return None


def _setup_fwd_grad(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    # Without this autograd hands the backward a zero-filled N×V gradient for the non-differentiable
    # output[1] — a second grad_s-sized buffer and a full write pass, which doubled peak memory.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1])


def _backward_fwd_grad(ctx, grad_loss, grad_grad):
    try:
        (grad_s,) = ctx.saved_tensors
    except RuntimeError as e:  # a first backward already handed this buffer out (and maybe rescaled it)
        raise RuntimeError(
            "contrastive_kd_loss(grad_in_forward=True) supports one backward per forward: the gradient it "
            "stored was already used; pass grad_in_forward=False to backward twice (retain_graph=True)"
        ) from e
    if not ctx.needs_input_grad[0]:
        return (None,) * 14
    if grad_loss is None:
        grad_s = torch.zeros_like(grad_s)
    else:
        scale_grad_(grad_s, grad_loss.to(grad_s.dtype if grad_s.dtype == torch.float64 else torch.float32))
    return (grad_s,) + (None,) * 13


contrastive_kd_fwd_grad.register_autograd(_backward_fwd_grad, setup_context=_setup_fwd_grad)
