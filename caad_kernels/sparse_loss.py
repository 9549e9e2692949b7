"""Public API of the sparse-target loss: ``sparse_contrastive_kd_loss`` (SPEC §9).

Errors are raised here, once, with the argument's name and the expected value; backends
assume validated inputs. Data checks that need the values (ids in range, no duplicate ids,
cached mass ≤ 1 + 1e-3) run on CPU eager calls only: on GPU they would cost a host sync,
so there the cache is trusted (documented in ``docs/sparse_targets.md``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import sparse_ops
from .dispatch import BACKEND_NAMES, resolve_backend
from .loss import _check_labels, _check_logits, _check_num_items
from .options import REDUCTIONS, KDOptions
from .reference import reduce_rows
from .sparse_reference import sparse_options

_ID_DTYPES = (torch.int64, torch.int32, torch.int16)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
MASS_TOLERANCE = 1e-3  # cached mass may exceed 1 by this much (fp16 log-probabilities round)
TRITON_MAX_K = 4096  # ids per row the Triton kernels take (held in registers)


def _check_divergence(divergence: object) -> None:
    if divergence in ("reverse_kl", "jsd"):
        raise ValueError(
            f"divergence={divergence!r} is not available with sparse teacher targets: the cached p is 0 off "
            "the support, so reverse KL is infinite and JSD needs p on every token; use divergence='forward_kl'"
        )
    if divergence != "forward_kl":
        raise ValueError(f"divergence must be 'forward_kl' for sparse teacher targets, got {divergence!r}")


def _check_targets(s: Tensor, ids: object, logprobs: object, tail: object) -> tuple[Tensor, Tensor, Tensor | None]:
    lead = tuple(s.shape[:-1])
    if not isinstance(ids, Tensor):
        raise TypeError(f"teacher_ids must be an integer torch.Tensor, got {type(ids).__name__}")
    if ids.dtype not in _ID_DTYPES:
        raise TypeError(f"teacher_ids must be int64, int32 or int16 (−1 pads), got {ids.dtype}")
    if ids.dim() != s.dim() or tuple(ids.shape[:-1]) != lead or ids.shape[-1] < 1:
        raise ValueError(f"teacher_ids must have shape {lead + ('K',)} with K >= 1 (student_logits' leading "
                         f"shape), got {tuple(ids.shape)}")
    if not isinstance(logprobs, Tensor):
        raise TypeError(f"teacher_logprobs must be a float torch.Tensor, got {type(logprobs).__name__}")
    if logprobs.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"teacher_logprobs must be float32, float16, bfloat16 or float64, got {logprobs.dtype}")
    if logprobs.shape != ids.shape:
        raise ValueError(f"teacher_logprobs must have teacher_ids' shape {tuple(ids.shape)}, got "
                         f"{tuple(logprobs.shape)}")
    if tail is not None:
        if not isinstance(tail, Tensor):
            raise TypeError(f"tail_logmass must be a float torch.Tensor or None, got {type(tail).__name__}")
        if tail.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"tail_logmass must be float32, float16, bfloat16 or float64, got {tail.dtype}")
        if tuple(tail.shape) != lead:
            raise ValueError(f"tail_logmass must have shape {lead} (student_logits[..., 0]), got {tuple(tail.shape)}")
    for name, x in (("teacher_ids", ids), ("teacher_logprobs", logprobs), ("tail_logmass", tail)):
        if x is not None and x.device != s.device:
            raise ValueError(f"{name} must be on the student's device {s.device}, got {x.device}")
    return ids, logprobs, tail


def _check_target_values(vocab: int, ids: Tensor, logprobs: Tensor, tail: Tensor | None, labels: Tensor | None,
                         ignore_index: int) -> None:
    """SPEC §9's value checks on the rows that count (CPU eager only: no host sync elsewhere)."""
    k = ids.shape[-1]
    ids2 = ids.reshape(-1, k)
    lp2 = logprobs.reshape(-1, k)
    tail1 = tail.reshape(-1) if tail is not None else None
    if labels is not None:
        valid = labels.reshape(-1) != ignore_index
        ids2, lp2 = ids2[valid], lp2[valid]
        tail1 = tail1[valid] if tail1 is not None else None
    if ids2.numel() == 0:
        return
    bad = (ids2 < -1) | (ids2 >= vocab)
    if bool(bad.any()):
        row = int(bad.any(-1).nonzero()[0])
        raise ValueError(f"teacher_ids must be in [-1, {vocab}) (−1 pads), got {int(ids2[bad][0])} "
                         f"(in counted row {row})")
    ordered = ids2.sort(dim=-1).values
    dup = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if bool(dup.any()):
        row = int(dup.any(-1).nonzero()[0])
        raise ValueError(f"teacher_ids must not repeat an id within a row, got id {int(ordered[:, 1:][dup][0])} "
                         f"twice (in counted row {row})")
    mass = torch.where(ids2 >= 0, lp2.double().exp(), torch.zeros((), dtype=torch.float64)).sum(-1)
    if tail1 is not None:
        mass = mass + tail1.double().exp()
    over = mass > 1.0 + MASS_TOLERANCE
    if bool(over.any()):
        row = int(over.nonzero()[0])
        raise ValueError(f"teacher_logprobs (plus tail_logmass) must sum to at most 1 + {MASS_TOLERANCE} in "
                         f"probability, got {float(mass[row]):.6g} (in counted row {row}): are they log p, "
                         f"not logits?")


def resolve_sparse_backend(requested: str, device: torch.device, float64: bool) -> str:
    """``backend=`` of the sparse loss to a usable backend name (``dispatch.resolve_backend``'s rules,
    except that no CUDA C++ kernel exists: ``"cuda"`` is refused, and ``CAAD_BACKEND=cuda`` under
    ``"auto"`` means the ``triton`` kernel)."""
    if requested == "cuda":
        raise ValueError("backend='cuda' has no sparse-target kernel (only the dense loss has CUDA C++ "
                         "kernels); use backend='triton' or 'auto' on CUDA tensors")
    name = resolve_backend(requested, device, float64=float64)
    if name == "cuda":  # from CAAD_BACKEND
        name = resolve_backend("auto", device, float64=float64) if requested != "auto" else "triton"
        if name == "cuda":
            name = "triton"
    if name not in sparse_ops.IMPLEMENTED:
        if requested == name:
            raise ValueError(f"backend={name!r} has no sparse-target kernel yet")
        name = "torch"
    return name


def _sparse_kd(s, ids, logprobs, tail, labels, opts: KDOptions, reduction, num_items_in_batch, backend,
               inplace_backward) -> Tensor:
    s = _check_logits("student_logits", s)
    ids, logprobs, tail = _check_targets(s, ids, logprobs, tail)
    labels = _check_labels(labels, s, opts)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    num_items_in_batch = _check_num_items(num_items_in_batch, reduction)
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {type(inplace_backward).__name__}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend not in ("auto", *BACKEND_NAMES):
        raise ValueError(f"backend must be one of {('auto', *BACKEND_NAMES)}, got {backend!r}")
    if opts.uses_teacher and s.device.type == "cpu" and not torch.compiler.is_compiling():
        _check_target_values(s.shape[-1], ids, logprobs, tail, labels, opts.ignore_index)
    float64 = any(x is not None and x.dtype == torch.float64 for x in (s, logprobs, tail))
    name = resolve_sparse_backend(backend, s.device, float64)
    if name == "triton" and ids.shape[-1] > TRITON_MAX_K:
        # The Triton kernels hold a row's K ids in registers; a cache this wide is not what they are for.
        if backend == "triton":
            raise ValueError(f"backend='triton' takes at most {TRITON_MAX_K} ids per row (teacher_ids' last "
                             f"dimension), got {ids.shape[-1]}: use backend='torch' or a smaller k_max")
        name = "torch"
    rows, _ = torch.ops.caad.sparse_kd_fwd(s, ids, logprobs, tail, labels, opts.temperature, opts.soft_weight,
                                           opts.hard_weight, opts.ignore_index, name, inplace_backward)
    flat_labels = labels.reshape(-1) if labels is not None else None
    return reduce_rows(rows, flat_labels, reduction, opts.ignore_index, num_items_in_batch)


def sparse_contrastive_kd_loss(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    tail_logmass: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
    backend: str = "auto",
    inplace_backward: bool = False,
) -> Tensor:
    """KD loss of a student against cached sparse teacher targets (SPEC §9).

    ``ℓ = w_soft·D + w_hard·CE(s, y)`` with ``D = Σ_{v∈S} p_v (log p_v − log q_v)`` (+ the tail term
    ``P_T (log P_T − log Q_T)`` when ``tail_logmass`` is given), ``log q = log_softmax(s/τ)`` over all V.
    With exact supports it equals :func:`contrastive_kd_loss` (forward KL) on the teacher the targets
    came from (see :func:`sparse_teacher_targets`).

    Args:
        student_logits: ``[..., V]`` fp32/bf16/fp16 (float64 on ``torch``/``cpu``), any strides; the only
            tensor that receives a gradient (in its own dtype).
        teacher_ids: ``[..., K]`` int64/int32/int16 support ids in ``[0, V)``, −1 pads a shorter support.
        teacher_logprobs: ``[..., K]`` float ``log p_v`` of the ids (any value where the id is −1).
        tail_logmass: ``[...]`` float log of the teacher mass outside the ids, or None (−inf) when exact.
            The tail's gradient is spread over the tokens outside the ids in proportion to q.
        labels: ``[...]`` integer Pseudo-GT ids; rows equal to ``ignore_index`` count 0.
        temperature: ``τ > 0`` of the student softmax (the cached p is already at temperature τ).
        divergence: only ``"forward_kl"``; ``"reverse_kl"``/``"jsd"`` are refused (p is 0 off the support).
        soft_weight, hard_weight, ignore_index, reduction, num_items_in_batch: as :func:`contrastive_kd_loss`.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cpu"`` (``"cuda"`` has no sparse kernel).
        inplace_backward: write the gradient into ``student_logits``' storage (destroys it).

    Returns:
        fp32 loss: a scalar, or ``[N]`` for ``reduction="none"`` (float64 for float64 inputs).
    """
    _check_divergence(divergence)
    opts = sparse_options(temperature, soft_weight, hard_weight, ignore_index)
    return _sparse_kd(student_logits, teacher_ids, teacher_logprobs, tail_logmass, labels, opts, reduction,
                      num_items_in_batch, backend, inplace_backward)


class SparseContrastiveKDLoss(nn.Module):
    """Module form of :func:`sparse_contrastive_kd_loss`; keywords fixed (and validated) at construction."""

    def __init__(self, *, temperature: float = 1.0, divergence: str = "forward_kl", soft_weight: float = 1.0,
                 hard_weight: float = 0.0, ignore_index: int = -100, reduction: str = "mean",
                 backend: str = "auto", inplace_backward: bool = False) -> None:
        super().__init__()
        _check_divergence(divergence)
        self.options = sparse_options(temperature, soft_weight, hard_weight, ignore_index)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if backend not in ("auto", *BACKEND_NAMES):
            raise ValueError(f"backend must be one of {('auto', *BACKEND_NAMES)}, got {backend!r}")
        self.reduction, self.backend, self.inplace_backward = reduction, backend, inplace_backward

    def forward(self, student_logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor,
                tail_logmass: Tensor | None = None, labels: Tensor | None = None,
                num_items_in_batch: int | Tensor | None = None) -> Tensor:
        """Shapes as :func:`sparse_contrastive_kd_loss`."""
        return _sparse_kd(student_logits, teacher_ids, teacher_logprobs, tail_logmass, labels, self.options,
                          self.reduction, num_items_in_batch, self.backend, self.inplace_backward)

