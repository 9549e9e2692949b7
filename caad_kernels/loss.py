"""Public API: ``contrastive_kd_loss`` and the ``ContrastiveKDLoss`` module (SPEC §7).

Errors are raised here, once, with the argument's name and the expected value;
backends assume validated inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .dispatch import BACKEND_NAMES, resolve_backend
from .options import REDUCTIONS, KDOptions
from .reference import reduce_rows, reduction_divisor

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_logits(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16 (float64 on backends 'torch' and 'cpu'), "
                        f"got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name} must have shape [..., V] with V >= 1, got {tuple(x.shape)}")
    return x


def _check_teacher(name: str, x: object, s: Tensor, vocab_slice: bool) -> Tensor:
    x = _check_logits(name, x)
    if x.device != s.device:
        raise ValueError(f"{name} must be on the student's device {s.device}, got {x.device}")
    v_s, v_t = s.shape[-1], x.shape[-1]
    if x.shape[:-1] != s.shape[:-1]:
        raise ValueError(
            f"{name} must have the leading shape of student_logits {tuple(s.shape[:-1])}, got {tuple(x.shape[:-1])}"
        )
    if v_t > v_s:
        if not vocab_slice:
            raise ValueError(
                f"{name} has a vocabulary of {v_t} but student_logits has {v_s} (a padded teacher head?): "
                f"pass teacher_vocab_slice=True to keep the first {v_s} columns, or slice it yourself "
                f"with {name}[..., :{v_s}]"
            )
        x = x[..., :v_s]
    elif v_t < v_s:
        raise ValueError(f"{name} has a vocabulary of {v_t}, smaller than student_logits' {v_s}")
    return x


def check_labels(labels: object, lead: tuple[int, ...], vocab: int, device: torch.device, opts: KDOptions,
                 shape_hint: str = "student_logits[..., 0]") -> Tensor | None:
    """The one label check of every public entry point: integer dtype, the logits' leading shape and device,
    and (with ``hard_weight > 0``, where a label is read) each label in ``[0, V)`` or ``ignore_index``."""
    if labels is None:
        if opts.hard_weight > 0:
            raise ValueError(f"hard_weight={opts.hard_weight} > 0 needs labels (the Pseudo-GT token ids), got None")
        return None
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be an integer torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in _INT_DTYPES:
        raise TypeError(f"labels must be an integer tensor (e.g. torch.int64), got {labels.dtype}")
    if tuple(labels.shape) != tuple(lead):
        raise ValueError(f"labels must have shape {tuple(lead)} ({shape_hint}), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels must be on the student's device {device}, got {labels.device}")
    if (opts.hard_weight > 0 and labels.device.type == "cpu" and labels.numel() > 0
            and not torch.compiler.is_compiling()):
        # A cheap check on eager CPU; on GPU (or traced) an out-of-range label gives a NaN row
        # instead of a host sync.
        bad = (labels != opts.ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            raise ValueError(f"labels must be in [0, {vocab}) or ignore_index={opts.ignore_index}, got "
                             f"{labels[bad][0].item()}")
    return labels


def _check_labels(labels: object, s: Tensor, opts: KDOptions) -> Tensor | None:
    return check_labels(labels, tuple(s.shape[:-1]), s.shape[-1], s.device, opts)


def check_num_items(num_items_in_batch: object, reduction: str, device: torch.device) -> int | Tensor | None:
    """``num_items_in_batch``: None, an int > 0, or a 0-dim real tensor on the CPU or on ``device`` (the
    student's). A CPU tensor is checked to be > 0 (no host sync); one on an accelerator is trusted: checking
    it would stall the device (≤ 0 there gives an inf or negative loss)."""
    if num_items_in_batch is None:
        return None
    if reduction != "mean":
        raise ValueError(f"num_items_in_batch replaces the divisor of reduction='mean'; got reduction={reduction!r}")
    if isinstance(num_items_in_batch, Tensor):
        if num_items_in_batch.dim() != 0:
            raise ValueError(f"num_items_in_batch must be an int or a 0-dim tensor, got shape "
                             f"{tuple(num_items_in_batch.shape)}")
        if num_items_in_batch.dtype == torch.bool or num_items_in_batch.is_complex():
            raise TypeError(f"num_items_in_batch must be an integer or real tensor, got {num_items_in_batch.dtype}")
        if num_items_in_batch.device.type != "cpu" and num_items_in_batch.device != device:
            raise ValueError(f"num_items_in_batch must be on the CPU or on the student's device {device}, got "
                             f"{num_items_in_batch.device}")
        if num_items_in_batch.device.type == "cpu" and not torch.compiler.is_compiling():
            if not bool(num_items_in_batch > 0):
                raise ValueError(f"num_items_in_batch must be > 0, got {num_items_in_batch.item()}")
        return num_items_in_batch
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, int):
        raise TypeError(f"num_items_in_batch must be an int or a 0-dim tensor, got {type(num_items_in_batch).__name__}")
    if num_items_in_batch <= 0:
        raise ValueError(f"num_items_in_batch must be > 0, got {num_items_in_batch}")
    return num_items_in_batch


def _may_overlap(x: Tensor) -> bool:
    """Whether two indices of ``x`` may address one element (an ``expand``, ``as_strided`` views): sufficient
    test on the strides sorted ascending, each must step over everything the smaller ones span."""
    span = 0
    for size, stride in sorted(((n, st) for n, st in zip(x.shape, x.stride(), strict=True) if n > 1),
                               key=lambda d: d[1]):
        if stride <= span:
            return True
        span += stride * (size - 1)
    return False


def _check_inplace(inplace_backward: object, s: Tensor) -> None:
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {type(inplace_backward).__name__}")
    if inplace_backward and _may_overlap(s):
        # Each gradient entry would be written over others that the backward still reads.
        raise ValueError(
            f"inplace_backward=True writes the gradient into student_logits, whose elements overlap (shape "
            f"{tuple(s.shape)}, strides {s.stride()}, e.g. from expand()); pass inplace_backward=False or "
            f"student_logits.contiguous()")


def _check_grad_in_forward(grad_in_forward: object, reduction: str, inplace_backward: bool) -> None:
    if not isinstance(grad_in_forward, bool):
        raise TypeError(f"grad_in_forward must be a bool, got {type(grad_in_forward).__name__}")
    if not grad_in_forward:
        return
    if reduction == "none":
        raise ValueError("grad_in_forward=True needs a scalar loss (reduction='mean' or 'sum'): with "
                         "reduction='none' the per-row upstream gradients are only known in the backward")
    if inplace_backward:
        raise ValueError("grad_in_forward=True cannot be combined with inplace_backward=True: the gradient "
                         "would overwrite student_logits during the forward, before anything else reads them")


def _contrastive_kd(
    student_logits: Tensor,
    teacher_audio_logits: Tensor,
    teacher_text_logits: Tensor | None,
    labels: Tensor | None,
    opts: KDOptions,
    reduction: str,
    num_items_in_batch: int | Tensor | None,
    backend: str,
    inplace_backward: bool,
    teacher_vocab_slice: bool,
    grad_in_forward: bool = False,
) -> Tensor:
    s = _check_logits("student_logits", student_logits)
    a = _check_teacher("teacher_audio_logits", teacher_audio_logits, s, teacher_vocab_slice)
    t = None
    if opts.uses_text:
        if teacher_text_logits is None:
            raise ValueError(
                f"teacher_text_logits is required with alpha={opts.alpha} > 0 (pass alpha=0 for plain KD)"
            )
        t = _check_teacher("teacher_text_logits", teacher_text_logits, s, teacher_vocab_slice)
    labels = _check_labels(labels, s, opts)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    num_items_in_batch = check_num_items(num_items_in_batch, reduction, s.device)
    _check_inplace(inplace_backward, s)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    _check_grad_in_forward(grad_in_forward, reduction, inplace_backward)
    used = [s] + ([a] if opts.uses_teacher else []) + ([t] if t is not None else [])
    name = resolve_backend(backend, s.device, float64=any(x.dtype == torch.float64 for x in used))

    if grad_in_forward and torch.is_grad_enabled() and s.requires_grad:
        dtype = torch.float64 if any(x.dtype == torch.float64 for x in used) else torch.float32
        divisor = reduction_divisor(labels, s.numel() // s.shape[-1], reduction, opts.ignore_index,
                                    num_items_in_batch, dtype=dtype, device=s.device)
        loss, _ = torch.ops.caad.contrastive_kd_fwd_grad(
            s, a, t, labels, divisor,
            opts.alpha, opts.plausibility_beta, opts.temperature, opts.divergence, opts.jsd_beta,
            opts.soft_weight, opts.hard_weight, opts.ignore_index, name,
        )
        return loss
    rows, _ = torch.ops.caad.contrastive_kd_fwd(
        s, a, t, labels,
        opts.alpha, opts.plausibility_beta, opts.temperature, opts.divergence, opts.jsd_beta,
        opts.soft_weight, opts.hard_weight, opts.ignore_index, name, inplace_backward,
    )
    flat_labels = labels.reshape(-1) if labels is not None else None
    return reduce_rows(rows, flat_labels, reduction, opts.ignore_index, num_items_in_batch)


def contrastive_kd_loss(
    student_logits: Tensor,
    teacher_audio_logits: Tensor,
    teacher_text_logits: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    alpha: float = 1.0,
    plausibility_beta: float = 0.0,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    jsd_beta: float = 0.5,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
    backend: str = "auto",
    inplace_backward: bool = False,
    teacher_vocab_slice: bool = False,
    grad_in_forward: bool = False,
) -> Tensor:
    """Contrastive audio-aware KD loss of a student against a dual-path teacher (SPEC §2).

    Args:
        student_logits: ``[..., V]`` fp32/bf16/fp16 (float64 on the ``torch``/``cpu`` backends), any strides;
            the only tensor that receives a gradient (in its own dtype).
        teacher_audio_logits: ``[..., V_t]`` teacher logits with the audio; ``V_t > V`` needs
            ``teacher_vocab_slice=True``.
        teacher_text_logits: ``[..., V_t]`` teacher logits without the audio; required when
            ``alpha > 0``, not read when ``alpha == 0``.
        labels: ``[...]`` integer Pseudo-GT token ids; rows equal to ``ignore_index`` count 0.
        alpha: contrast strength, ``z = (1+α)·a − α·t``; 0 is standard KD.
        plausibility_beta: ``β_p ∈ [0, 1)``; tokens with ``softmax(a) < β_p·max softmax(a)`` get
            probability 0; 0 disables the mask.
        temperature: ``τ > 0`` for both softmaxes of the soft term.
        divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"`` (TRL's β convention).
        jsd_beta: ``β_j ∈ [0, 1]`` of the generalized JSD; 0 is forward KL, 1 reverse KL.
        soft_weight, hard_weight: ``ℓ = w_soft·D + w_hard·CE(s, y)`` (CE at temperature 1).
        reduction: ``"mean"`` over valid rows, ``"sum"``, or ``"none"`` (``[N]`` fp32, 0 on ignored rows).
        num_items_in_batch: divisor replacing the valid-row count of ``"mean"`` (Trainer's
            gradient-accumulation convention); int or 0-dim tensor.
        backend: ``"auto"``, ``"torch"``, ``"triton"``, ``"cpu"`` or ``"cuda"``;
            ``CAAD_BACKEND`` overrides ``"auto"``.
        inplace_backward: write the gradient into ``student_logits``' storage (destroys it).
        teacher_vocab_slice: keep the first ``V`` columns of a larger teacher vocabulary.
        grad_in_forward: when autograd will need the student's gradient, compute it during the forward
            (``reduction`` ``"mean"`` or ``"sum"``); the backward only scales it by the upstream scalar, in
            place and only when that scalar is not exactly 1. Lets one kernel read the logits once for both
            (the ``cuda`` backend's sm_90 cluster kernel); costs holding ``grad_s`` (``[N, V]``, ``s.dtype``)
            from the forward to the backward. Not combinable with ``inplace_backward``; a second backward
            through the same graph after a non-1 upstream raises.

    Returns:
        fp32 loss: a scalar, or ``[N]`` for ``reduction="none"`` (float64 for float64 inputs).
    """
    opts = KDOptions(alpha=alpha, plausibility_beta=plausibility_beta, temperature=temperature,
                     divergence=divergence, jsd_beta=jsd_beta, soft_weight=soft_weight, hard_weight=hard_weight,
                     ignore_index=ignore_index)
    return _contrastive_kd(student_logits, teacher_audio_logits, teacher_text_logits, labels, opts, reduction,
                           num_items_in_batch, backend, inplace_backward, teacher_vocab_slice, grad_in_forward)


class ContrastiveKDLoss(nn.Module):
    """Module form of :func:`contrastive_kd_loss`; the keywords are fixed at construction
    (and validated there), the tensors and ``num_items_in_batch`` are given per call."""

    def __init__(
        self,
        *,
        alpha: float = 1.0,
        plausibility_beta: float = 0.0,
        temperature: float = 1.0,
        divergence: str = "forward_kl",
        jsd_beta: float = 0.5,
        soft_weight: float = 1.0,
        hard_weight: float = 0.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        backend: str = "auto",
        inplace_backward: bool = False,
        teacher_vocab_slice: bool = False,
        grad_in_forward: bool = False,
    ) -> None:
        super().__init__()
        self.options = KDOptions(alpha=alpha, plausibility_beta=plausibility_beta, temperature=temperature,
                                 divergence=divergence, jsd_beta=jsd_beta, soft_weight=soft_weight,
                                 hard_weight=hard_weight, ignore_index=ignore_index)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if backend not in ("auto", *BACKEND_NAMES):
            raise ValueError(f"backend must be one of {('auto', *BACKEND_NAMES)}, got {backend!r}")
        _check_grad_in_forward(grad_in_forward, reduction, inplace_backward)
        self.reduction = reduction
        self.backend = backend
        self.grad_in_forward = grad_in_forward
        self.inplace_backward = inplace_backward
        self.teacher_vocab_slice = teacher_vocab_slice

    def forward(
        self,
        student_logits: Tensor,
        teacher_audio_logits: Tensor,
        teacher_text_logits: Tensor | None = None,
        labels: Tensor | None = None,
        num_items_in_batch: int | Tensor | None = None,
    ) -> Tensor:
        """Shapes as :func:`contrastive_kd_loss`."""
        return _contrastive_kd(student_logits, teacher_audio_logits, teacher_text_logits, labels, self.options,
                               self.reduction, num_items_in_batch, self.backend, self.inplace_backward,
                               self.teacher_vocab_slice, self.grad_in_forward)

    def extra_repr(self) -> str:
        o = self.options
        return (f"alpha={o.alpha}, plausibility_beta={o.plausibility_beta}, temperature={o.temperature}, "
                f"divergence={o.divergence!r}, reduction={self.reduction!r}, backend={self.backend!r}")
