"""Row views: how every backend sees ``[..., V]`` logits without copying them.

The common Hugging Face pattern ``logits[:, :-1, :]`` is not viewable as
``[N, V]`` (its rows are not uniformly strided), so backends address rows
through a 3-D view ``[B, T, V]`` with independent batch and time strides:
row ``n`` lives at ``(n // T)·stride_b + (n % T)·stride_t``. A copy is made
only when the vocabulary dimension is not unit-stride or the leading dims
cannot be folded into two.
"""

from __future__ import annotations

import math

import torch


def lead_shape_bt(lead: tuple[int, ...] | torch.Size) -> tuple[int, int]:
    """(B, T) such that B·T = prod(lead) and T = lead[-1] (1 for a single row)."""
    if len(lead) == 0:
        return 1, 1
    return math.prod(lead[:-1]), lead[-1]


def as_btv(x: torch.Tensor) -> torch.Tensor:
    """``[..., V]`` → ``[B, T, V]`` with ``stride(-1) == 1``, a view whenever possible."""
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        x = x.contiguous()
    b, t = lead_shape_bt(x.shape[:-1])
    try:
        return x.view(b, t, x.shape[-1])
    except RuntimeError:
        return x.reshape(b, t, x.shape[-1])


def as_bt(labels: torch.Tensor) -> torch.Tensor:
    """``[...]`` labels → ``[B, T]`` (a view whenever possible)."""
    b, t = lead_shape_bt(labels.shape)
    try:
        return labels.view(b, t)
    except RuntimeError:
        return labels.reshape(b, t)


def num_rows(x: torch.Tensor) -> int:
    return math.prod(x.shape[:-1])


def shares_storage(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether writes through ``x`` land in ``y``'s memory (false after a copy)."""
    return x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
