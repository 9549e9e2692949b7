"""The contrastive KD loss in plain PyTorch: the readable statement of SPEC §2–§3.

Everything here works on a 2-D block of rows ``[n, V]`` in a *compute dtype*
(float32, or float64 when any input is float64) and is the documentation of
the math that the fused kernels implement:

    z   = (1 + α)·a − α·t                  (z_v = −∞ wherever a_v = −∞)
    z_v = −∞  if a_v < max(a) + log β_p    (adaptive plausibility, β_p > 0)
    log p = log_softmax(z / τ),  log q = log_softmax(s / τ)
    ℓ   = w_soft · D(p, q) + w_hard · (−log softmax(s)_y)

Gradients of one row's loss with respect to the student logits ``s``
(``u = s/τ``; every divergence depends on ``s`` only through ``q``):

* forward KL, ``D = Σ p (log p − log q)``: ``∂D/∂u_k = q_k − p_k``.
* reverse KL, ``D = Σ q (log q − log p)``: with ``r = log q − log p``,
  ``∂D/∂q_k = r_k + 1`` and the softmax Jacobian ``∂q_v/∂u_k = q_v(δ_vk − q_k)``
  give ``∂D/∂u_k = q_k (r_k − D)``.
* generalized JSD, ``m = (1−β) q + β p``, ``D = β KL(p‖m) + (1−β) KL(q‖m)``:
  ``∂D/∂q_k = (1−β) log(q_k/m_k)`` (the ``+1`` and ``−(βp+(1−β)q)/m`` terms
  cancel), so ``∂D/∂u_k = (1−β) q_k (log(q_k/m_k) − KL(q‖m))``.
* hard term, ``ce = lse(s) − s_y``: ``∂ce/∂s_k = softmax(s)_k − [k = y]``.

and ``∂ℓ/∂s = (w_soft ∂D/∂u) / τ + w_hard ∂ce/∂s``. These analytic forms are
what :func:`row_loss_grads` returns; the tests check them with
``torch.autograd.gradcheck`` in float64 and against an independent formula.
"""

from __future__ import annotations

import math

import torch

from .options import FORWARD_KL, REVERSE_KL, KDOptions

__all__ = [
    "compute_dtype",
    "contrasted_logits",
    "row_losses",
    "row_loss_grads",
    "reduce_rows",
    "contrastive_kd_reference",
]


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any given tensor is float64, else float32 (accumulation type)."""
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in tensors) else torch.float32


def contrasted_logits(
    a: torch.Tensor, t: torch.Tensor | None, alpha: float, plausibility_beta: float
) -> torch.Tensor:
    """Contrasted, plausibility-masked teacher logits ``z`` (before temperature).

    a, t: ``[n, V]`` in the compute dtype; ``t`` is ignored when ``alpha == 0``.
    """
    neg_inf = torch.tensor(-math.inf, dtype=a.dtype, device=a.device)
    impossible = a == -math.inf
    if alpha != 0.0:
        # −∞ in a wins whatever t is: never evaluate −∞ + ∞.
        t_safe = torch.where(impossible, torch.zeros_like(t), t)
        z = torch.where(impossible, neg_inf, (1.0 + alpha) * a - alpha * t_safe)
    else:
        z = a
    if plausibility_beta > 0.0:
        threshold = a.amax(dim=-1, keepdim=True) + math.log(plausibility_beta)
        z = torch.where(a < threshold, neg_inf, z)
    return z


def _undefined_rows(
    s: torch.Tensor, a: torch.Tensor | None, t: torch.Tensor | None, opts: KDOptions
) -> torch.Tensor:
    """Rows whose loss is NaN by SPEC §3 (NaN/+inf data, −inf in t under a finite a, and for the soft
    term a row with no distribution: no possible teacher token, or no possible student token)."""
    bad = torch.isnan(s) | (s == math.inf)
    if opts.uses_teacher:
        bad = bad | torch.isnan(a) | (a == math.inf)
        if opts.uses_text:
            bad = bad | ((a != -math.inf) & ~torch.isfinite(t))
        no_distribution = (a == -math.inf).all(dim=-1) | (s == -math.inf).all(dim=-1)
    else:
        no_distribution = torch.zeros(s.shape[0], dtype=torch.bool, device=s.device)
    return bad.any(dim=-1) | no_distribution


def _xlogy_diff(w: torch.Tensor, log_w: torch.Tensor, log_other: torch.Tensor) -> torch.Tensor:
    """Σ_v w_v (log w_v − log other_v) with 0·log 0 = 0, safe for autograd.

    The support is decided on ``log w > −inf``, not on the rounded ``w``: a token in the
    support where ``other`` is impossible makes the divergence +inf even if its ``w``
    underflows (SPEC §3: −inf in s where p > 0 gives +inf).
    """
    support = log_w > -math.inf
    impossible = support & (log_other == -math.inf)
    live = support & ~impossible
    zero = torch.zeros_like(log_w)
    diff = torch.where(live, log_w, zero) - torch.where(live, log_other, zero)
    finite = torch.where(live, w * diff, zero).sum(dim=-1)
    return torch.where(impossible.any(dim=-1), torch.full_like(finite, math.inf), finite)


def _log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """log m for m = (1 − β) q + β p."""
    return torch.logaddexp(log_q + math.log1p(-beta), log_p + math.log(beta))


def _prepare(s, a, t, opts):
    dt = compute_dtype(s, a, t)
    s = s.to(dt)
    a = a.to(dt) if opts.uses_teacher else None
    t = t.to(dt) if opts.uses_text else None
    return s, a, t


def _valid_rows(labels: torch.Tensor | None, n: int, opts: KDOptions, device) -> torch.Tensor:
    if labels is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    return labels != opts.ignore_index


def row_losses(
    s: torch.Tensor, a: torch.Tensor | None, t: torch.Tensor | None, labels: torch.Tensor | None, opts: KDOptions
) -> torch.Tensor:
    """Per-row loss ``ℓ`` (SPEC §2), differentiable in ``s`` by autograd.

    s, a, t: ``[n, V]`` logits of any float dtype; labels: ``[n]`` integers or None.
    Returns ``[n]`` in the compute dtype, exactly 0 on ignored rows, NaN on
    rows that SPEC §3 declares undefined.
    """
    s, a, t = _prepare(s, a, t, opts)
    n, vocab = s.shape
    valid = _valid_rows(labels, n, opts, s.device)
    tau = opts.temperature
    loss = torch.zeros(n, dtype=s.dtype, device=s.device)
    if opts.uses_teacher:
        log_p = torch.log_softmax(contrasted_logits(a, t, opts.alpha, opts.plausibility_beta) / tau, dim=-1)
        log_q = torch.log_softmax(s / tau, dim=-1)
        p, q = log_p.exp(), log_q.exp()
        code = opts.divergence_code
        if code == FORWARD_KL:
            div = _xlogy_diff(p, log_p, log_q)
        elif code == REVERSE_KL:
            div = _xlogy_diff(q, log_q, log_p)
        else:
            beta = opts.jsd_beta
            log_m = _log_mixture(log_p, log_q, beta)
            div = beta * _xlogy_diff(p, log_p, log_m) + (1.0 - beta) * _xlogy_diff(q, log_q, log_m)
        loss = loss + opts.soft_weight * div
    if opts.uses_labels_as_targets:
        y = labels.long()
        in_range = (y >= 0) & (y < vocab)
        s_y = s.gather(1, y.clamp(0, vocab - 1).unsqueeze(1)).squeeze(1)
        ce = torch.logsumexp(s, dim=-1) - s_y
        ce = torch.where(in_range | ~valid, ce, torch.full_like(ce, math.nan))
        loss = loss + opts.hard_weight * ce
    nan = torch.full_like(loss, math.nan)
    loss = torch.where(_undefined_rows(s, a, t, opts), nan, loss)
    return torch.where(valid, loss, torch.zeros_like(loss))


def row_loss_grads(
    s: torch.Tensor, a: torch.Tensor | None, t: torch.Tensor | None, labels: torch.Tensor | None, opts: KDOptions
) -> torch.Tensor:
    """Analytic ``∂ℓ_i/∂s_i`` for each row (see the module docstring).

    Returns ``[n, V]`` in the compute dtype, exactly 0 on ignored rows.
    """
    s, a, t = _prepare(s, a, t, opts)
    n, vocab = s.shape
    valid = _valid_rows(labels, n, opts, s.device)
    tau = opts.temperature
    grad = torch.zeros_like(s)
    if opts.uses_teacher:
        log_p = torch.log_softmax(contrasted_logits(a, t, opts.alpha, opts.plausibility_beta) / tau, dim=-1)
        log_q = torch.log_softmax(s / tau, dim=-1)
        p, q = log_p.exp(), log_q.exp()
        live_q = q > 0
        code = opts.divergence_code
        if code == FORWARD_KL:
            d_u = q - p
        elif code == REVERSE_KL:
            div = _xlogy_diff(q, log_q, log_p).unsqueeze(1)
            d_u = torch.where(live_q, q * (log_q - log_p - div), torch.zeros_like(q))
        else:
            beta = opts.jsd_beta
            log_m = _log_mixture(log_p, log_q, beta)
            kl_qm = _xlogy_diff(q, log_q, log_m).unsqueeze(1)
            d_u = (1.0 - beta) * torch.where(live_q, q * (log_q - log_m - kl_qm), torch.zeros_like(q))
        if code != FORWARD_KL:
            d_u = _compensate_argmax(d_u, s)
        grad = grad + (opts.soft_weight / tau) * d_u
    if opts.uses_labels_as_targets:
        y = labels.long().clamp(0, vocab - 1)
        d_ce = torch.softmax(s, dim=-1)
        d_ce = d_ce - torch.nn.functional.one_hot(y, vocab).to(d_ce.dtype)
        grad = grad + opts.hard_weight * d_ce
    return torch.where(valid.unsqueeze(1), grad, torch.zeros_like(grad))


def _compensate_argmax(d_u: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Replace ``d_u`` at each row's (first) student argmax by minus the sum of the row's other entries.

    The reverse-KL and JSD gradients ``q·(r − D)`` sum to 0 over a row, and at a saturated student's argmax
    (q ≈ 1) ``r − D`` is a difference of two numbers ~|x| that agree to all but the last digits: in fp32 at
    |x| = 1e3 the computed entry was off by 5e-4 where the true gradient is 3e-4. The other entries carry
    their own small q as a factor, so their sum is accurate.
    """
    arg = s.argmax(dim=-1, keepdim=True)
    is_arg = torch.zeros_like(d_u, dtype=torch.bool).scatter(-1, arg, True)
    others = d_u.masked_fill(is_arg, 0.0).sum(dim=-1, keepdim=True)
    return torch.where(is_arg, -others, d_u)


def reduction_divisor(
    labels: torch.Tensor | None,
    n_rows: int,
    reduction: str,
    ignore_index: int,
    num_items_in_batch: int | torch.Tensor | None,
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """SPEC §2's divisor of a reduced loss as a 0-dim ``dtype`` tensor (device ops only, no host sync):
    1 for ``sum``; for ``mean`` ``num_items_in_batch`` when given, else the valid-row count (at least 1)."""
    if reduction == "sum":
        return torch.ones((), dtype=dtype, device=device)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            return num_items_in_batch.to(device=device, dtype=dtype)
        # A fill on the device: as_tensor(int, device=cuda) would be a blocking host-to-device copy.
        return torch.full((), float(num_items_in_batch), dtype=dtype, device=device)
    if labels is None:
        return torch.full((), max(n_rows, 1), dtype=dtype, device=device)
    return (labels != ignore_index).sum().clamp_min(1).to(dtype)


def reduce_rows(
    rows: torch.Tensor,
    labels: torch.Tensor | None,
    reduction: str,
    ignore_index: int,
    num_items_in_batch: int | torch.Tensor | None,
) -> torch.Tensor:
    """Apply SPEC §2's reduction to per-row losses ``[N]`` (device ops only, no host sync)."""
    if reduction == "none":
        return rows
    return rows.sum() / reduction_divisor(labels, rows.numel(), reduction, ignore_index, num_items_in_batch,
                                          dtype=rows.dtype, device=rows.device)


def contrastive_kd_reference(
    student_logits: torch.Tensor,
    teacher_audio_logits: torch.Tensor,
    teacher_text_logits: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    **options,
) -> torch.Tensor:
    """Eager, fully materialised contrastive KD loss, differentiable by autograd.

    This is what a user would write by hand (and what the benchmarks call
    "eager PyTorch"): it allocates several ``[N, V]`` temporaries. Shapes:
    logits ``[..., V]``, labels ``[...]``. Options as :class:`KDOptions`.
    """
    opts = KDOptions(**options)
    vocab = student_logits.shape[-1]
    s = student_logits.reshape(-1, vocab)
    a = teacher_audio_logits.reshape(-1, vocab)
    t = teacher_text_logits.reshape(-1, vocab) if teacher_text_logits is not None else None
    flat_labels = labels.reshape(-1) if labels is not None else None
    rows = row_losses(s, a, t, flat_labels, opts)
    return reduce_rows(rows, flat_labels, reduction, opts.ignore_index, num_items_in_batch)
