"""Build sparse teacher targets (SPEC §9) from dense teacher logits: what a teacher cache stores.

For each row: ``z = (1+α)·a − α·t``, the plausibility mask of SPEC §2,
``log p = log_softmax(z/τ)``; the support is the tokens with ``p > 0``, cut to the
``k_max`` most probable. ``tail_logmass`` is the log of the mass left out (−inf when
the kept support is exact, e.g. under plausibility masking with ``k_max`` ≥ the
support size). Rows are processed in chunks, so at most one chunk of ``[n, V]``
fp32 (or float64) temporaries exists at a time.

Ties (deterministic): among tokens of equal ``log p`` at the cut, the lower token id
is kept; kept entries are ordered by decreasing ``log p``, equal values by increasing id.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .options import KDOptions
from .reference import _undefined_rows, compute_dtype, contrasted_logits

__all__ = ["sparse_teacher_targets"]

# Elements per chunk of the [n, V] temporaries (16 MiB of fp32 each).
CHUNK_ELEMENTS = 1 << 22


def _check(name: str, x: object, vocab: int | None = None) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"{name} must be a float tensor (float32, bfloat16, float16 or float64), got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name} must have shape [..., V] with V >= 1, got {tuple(x.shape)}")
    return x


def _top_support(log_p: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` most probable tokens with ``p > 0`` per row: (ids ``[n, k]`` int64, −1 pads; keep mask ``[n, V]``)."""
    n, vocab = log_p.shape
    kth = log_p.topk(k, dim=-1).values[:, -1:]  # the k-th largest value (ties included)
    above = log_p > kth
    tie = (log_p == kth) & (kth > -math.inf)
    need = k - above.sum(-1, keepdim=True)
    keep = above | (tie & (tie.cumsum(-1) <= need))  # lowest ids win the ties at the cut
    position = torch.arange(vocab, device=log_p.device).expand(n, vocab)
    ids = torch.where(keep, position, vocab).topk(k, dim=-1, largest=False).values  # kept ids ascending, V pads
    return ids, keep


def sparse_teacher_targets(
    teacher_audio_logits: Tensor,
    teacher_text_logits: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    alpha: float = 1.0,
    plausibility_beta: float = 0.0,
    temperature: float = 1.0,
    k_max: int = 32,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sparse contrasted teacher targets from dense teacher logits.

    Args:
        teacher_audio_logits: ``[..., V]`` float logits with the audio (``a``).
        teacher_text_logits: ``[..., V]`` logits without the audio (``t``); required when ``alpha > 0``.
        labels: optional ``[...]`` integer targets; rows equal to ``ignore_index`` get an empty
            support (all ids −1, log-probabilities −inf, tail −inf) and cost nothing.
        alpha, plausibility_beta, temperature: as :func:`caad_kernels.contrastive_kd_loss`.
        k_max: the most support entries kept per row (``K = min(k_max, V)``).
        chunk_rows: rows per chunk (default: about 4M elements of ``[n, V]`` per chunk).

    Returns:
        ``(teacher_ids [..., K] int64`` (−1 pads), ``teacher_logprobs [..., K] float32`` (``log p``,
        −inf at pads), ``tail_logmass [...] float32`` (log of the mass outside the kept ids, −inf
        when exact)). float64 inputs give float64 log-probabilities. A row whose teacher
        distribution is undefined by SPEC §3 (NaN/+inf in ``a``, −inf in ``t`` under a finite ``a``,
        all of ``a`` −inf) gets an empty support and a NaN tail, so its loss is NaN.
    """
    a = _check("teacher_audio_logits", teacher_audio_logits)
    # Validate the options as the loss does (alpha ≥ 0, 0 ≤ β_p < 1, τ > 0).
    opts = KDOptions(alpha=alpha, plausibility_beta=plausibility_beta, temperature=temperature,
                     ignore_index=ignore_index)
    t = None
    if opts.uses_text:
        if teacher_text_logits is None:
            raise ValueError(f"teacher_text_logits is required with alpha={alpha} > 0 (pass alpha=0 for plain KD)")
        t = _check("teacher_text_logits", teacher_text_logits)
        if t.shape != a.shape or t.device != a.device:
            raise ValueError(f"teacher_text_logits must match teacher_audio_logits' shape {tuple(a.shape)} and "
                             f"device {a.device}, got {tuple(t.shape)} on {t.device}")
    if isinstance(k_max, bool) or not isinstance(k_max, int) or k_max < 1:
        raise ValueError(f"k_max must be an int >= 1, got {k_max!r}")
    if labels is not None:
        if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer torch.Tensor, got {getattr(labels, 'dtype', type(labels))}")
        if labels.shape != a.shape[:-1]:
            raise ValueError(f"labels must have shape {tuple(a.shape[:-1])}, got {tuple(labels.shape)}")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be an int >= 1, got {chunk_rows!r}")

    lead, vocab = a.shape[:-1], a.shape[-1]
    k = min(k_max, vocab)
    a2 = a.reshape(-1, vocab)
    t2 = t.reshape(-1, vocab) if t is not None else None
    y = labels.reshape(-1) if labels is not None else None
    n = a2.shape[0]
    dt = compute_dtype(a, t)
    ids = torch.full((n, k), -1, dtype=torch.int64, device=a.device)
    logprobs = torch.full((n, k), -math.inf, dtype=dt, device=a.device)
    tail = torch.full((n,), -math.inf, dtype=dt, device=a.device)
    step = chunk_rows or max(1, CHUNK_ELEMENTS // vocab)
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        ac = a2[r0:r1].to(dt)
        tc = t2[r0:r1].to(dt) if t2 is not None else None
        log_p = torch.log_softmax(contrasted_logits(ac, tc, opts.alpha, opts.plausibility_beta) / opts.temperature,
                                  dim=-1)
        undefined = _undefined_rows(ac, ac, tc, opts)
        if y is not None:
            undefined = undefined & (y[r0:r1] != ignore_index)
        log_p = torch.where(undefined.unsqueeze(1), torch.full_like(log_p, -math.inf), log_p)
        chunk_ids, keep = _top_support(log_p, k)
        padded = chunk_ids >= vocab
        chunk_lp = log_p.gather(1, chunk_ids.clamp_max(vocab - 1))
        chunk_lp = torch.where(padded, torch.full_like(chunk_lp, -math.inf), chunk_lp)
        # Order by decreasing log p; the stable sort keeps ascending ids among equal values.
        chunk_lp, order = chunk_lp.sort(dim=-1, descending=True, stable=True)
        chunk_ids = torch.where(padded, torch.full_like(chunk_ids, -1), chunk_ids).gather(1, order)
        # Exact tail: a log-sum-exp over the dropped tokens, not log(1 − Σ kept) (no cancellation).
        chunk_tail = torch.where(keep, torch.full_like(log_p, -math.inf), log_p).logsumexp(dim=-1)
        chunk_tail = torch.where(undefined, torch.full_like(chunk_tail, math.nan), chunk_tail)
        if y is not None:
            ignored = (y[r0:r1] == ignore_index).unsqueeze(1)
            chunk_ids = torch.where(ignored, torch.full_like(chunk_ids, -1), chunk_ids)
            chunk_lp = torch.where(ignored, torch.full_like(chunk_lp, -math.inf), chunk_lp)
            chunk_tail = torch.where(ignored.squeeze(1), torch.full_like(chunk_tail, -math.inf), chunk_tail)
        ids[r0:r1], logprobs[r0:r1], tail[r0:r1] = chunk_ids, chunk_lp, chunk_tail
    out_dt = torch.float64 if dt == torch.float64 else torch.float32
    return ids.reshape(*lead, k), logprobs.to(out_dt).reshape(*lead, k), tail.to(out_dt).reshape(*lead)
