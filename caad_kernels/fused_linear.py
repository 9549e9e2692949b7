"""Fused-linear contrastive KD: the loss from hidden states and LM heads, never holding
``[N, V]`` logits for more than one chunk of tokens (SPEC §5, §7).

Per chunk of tokens:
  1. teacher logits: with ``β_p = 0`` the contrast is exact in hidden space,
     ``(1+α)(W h_a + b) − α(W h_t + b) = W((1+α) h_a − α h_t) + b``, so the teacher runs
     **one** GEMM; with plausibility masking (which needs the raw audio logits) two;
  2. student logits ``s = h_s W_sᵀ + b_s``;
  3. the logits-level kernels of the chosen backend: forward, then backward written
     **in place** into the student-logit chunk (no second ``[chunk, V]`` buffer);
  4. ``grad_h = g W_s`` for the chunk's rows and ``grad_W += gᵀ h_s`` (and ``grad_b``),
     accumulated in fp32 across chunks (each chunk's product accumulates in fp32 before
     any rounding).
Gradients are computed in the forward with the reduction's divisor already applied, so
backward only scales them by ``grad_output``: one teacher GEMM and one student
forward/dgrad/wgrad in total. ``reduction="none"`` has a per-row ``grad_output``
that cannot scale an accumulated ``grad_W``; it recomputes the chunks in backward.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .dispatch import BACKEND_NAMES, backend_module, resolve_backend
from .loss import check_labels, check_num_items
from .options import REDUCTIONS, KDOptions
from .reference import reduction_divisor

# Bytes of logits (student + teacher chunk) a chunk may hold when chunk_size is not given.
CHUNK_BUDGET_BYTES = {"cuda": 768 << 20, "cpu": 128 << 20}
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _mm_fp32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` accumulated and returned in fp32 (float64 stays float64)."""
    if a.dtype in (torch.float32, torch.float64):
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)  # fp32 output straight from the bf16 GEMM
        except (RuntimeError, TypeError):
            pass
    return a.float() @ b.float()


def _check_matrix(name: str, x: object, ndim: int | None = None) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float tensor (fp32, bf16, fp16 or float64), got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if ndim is None and x.dim() < 1:
        raise ValueError(f"{name} must have shape [..., H], got a scalar")
    return x


def _check_inputs(hs, ws, ha, ht, wt, labels, bs, bt, opts: KDOptions, teacher_vocab_slice: bool, chunk_size):
    hs = _check_matrix("student_hidden", hs)
    ws = _check_matrix("student_weight", ws, 2)
    if ws.shape[1] != hs.shape[-1]:
        raise ValueError(f"student_weight must be [V, {hs.shape[-1]}] (student_hidden's size), got {tuple(ws.shape)}")
    if ws.dtype != hs.dtype:
        raise TypeError(f"student_weight must have student_hidden's dtype {hs.dtype}, got {ws.dtype}")
    vocab, lead = ws.shape[0], hs.shape[:-1]
    if bs is not None:
        bs = _check_matrix("student_bias", bs, 1)
        if bs.shape[0] != vocab:
            raise ValueError(f"student_bias must have length V={vocab}, got {bs.shape[0]}")
    ha = _check_matrix("teacher_audio_hidden", ha)
    wt = _check_matrix("teacher_weight", wt, 2)
    if wt.shape[1] != ha.shape[-1]:
        raise ValueError(f"teacher_weight must be [V_t, {ha.shape[-1]}] (teacher_audio_hidden's size), got "
                         f"{tuple(wt.shape)}")
    if ha.shape[:-1] != lead:
        raise ValueError(f"teacher_audio_hidden must have student_hidden's leading shape {tuple(lead)}, got "
                         f"{tuple(ha.shape[:-1])}")
    if opts.uses_text:
        if ht is None:
            raise ValueError(f"teacher_text_hidden is required with alpha={opts.alpha} > 0 (pass alpha=0 for plain KD)")
        ht = _check_matrix("teacher_text_hidden", ht)
        if ht.shape != ha.shape:
            raise ValueError(f"teacher_text_hidden must have teacher_audio_hidden's shape {tuple(ha.shape)}, got "
                             f"{tuple(ht.shape)}")
    else:
        ht = None
    if bt is not None:
        bt = _check_matrix("teacher_bias", bt, 1)
        if bt.shape[0] != wt.shape[0]:
            raise ValueError(f"teacher_bias must have teacher_weight's length {wt.shape[0]}, got {bt.shape[0]}")
    if wt.shape[0] > vocab:
        if not teacher_vocab_slice:
            raise ValueError(
                f"teacher_weight has a vocabulary of {wt.shape[0]} but student_weight has {vocab} (a padded teacher "
                f"head?): pass teacher_vocab_slice=True to keep the first {vocab} rows, or slice it yourself")
        wt = wt[:vocab]
        bt = bt[:vocab] if bt is not None else None
    elif wt.shape[0] < vocab:
        raise ValueError(f"teacher_weight has a vocabulary of {wt.shape[0]}, smaller than student_weight's {vocab}")
    devices = {x.device for x in (hs, ws, ha, wt, ht, bs, bt, labels) if x is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    labels = check_labels(labels, tuple(lead), vocab, hs.device, opts, "student_hidden[..., 0]")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return hs, ws, ha, ht, wt, labels, bs, bt


def _default_chunk(n: int, vocab: int, logit_bytes_per_entry: int, device: torch.device) -> int:
    budget = CHUNK_BUDGET_BYTES.get(device.type, CHUNK_BUDGET_BYTES["cpu"])
    return max(1, min(n, budget // max(1, vocab * logit_bytes_per_entry)))


class _Plan:
    """Everything a chunk pass needs, flattened to rows."""

    def __init__(self, hs, ws, bs, ha, ht, wt, bt, labels, opts, backend, chunk):
        self.hs, self.ws, self.bs = hs, ws, bs
        self.wt, self.bt = wt, bt
        self.labels, self.opts, self.backend, self.chunk = labels, opts, backend, chunk
        # Exact hidden-space contrast (one teacher GEMM) whenever no mask needs the raw audio logits.
        self.hidden_contrast = opts.uses_text and opts.plausibility_beta == 0.0
        if self.hidden_contrast:
            # Combine in fp32 (at least), round once to the head's dtype for the GEMM.
            wide = torch.promote_types(ha.dtype, torch.float32)
            self.ha = ((1.0 + opts.alpha) * ha.to(wide) - opts.alpha * ht.to(wide)).to(wt.dtype)
            self.ht = None
            self.kernel_opts = KDOptions(**{**opts.__dict__, "alpha": 0.0})
        else:
            self.ha, self.ht, self.kernel_opts = ha, ht, opts

    def teacher_logits(self, i0: int, i1: int) -> tuple[Tensor | None, Tensor | None]:
        if not self.opts.uses_teacher:
            return None, None

        def head(h):
            return torch.nn.functional.linear(h[i0:i1], self.wt, self.bt)

        return head(self.ha), (head(self.ht) if self.ht is not None else None)


def _chunk_pass(plan: _Plan, upstream: Tensor | None, need: tuple[bool, bool, bool]):
    """One pass over the token chunks.

    upstream: per-row scale of the row losses' gradients ``[N]`` (None: no gradients).
    Returns per-row losses ``[N]`` and (grad_hidden, grad_weight, grad_bias) or Nones.
    """
    hs, ws, bs, opts = plan.hs, plan.ws, plan.bs, plan.kernel_opts
    n, vocab = hs.shape[0], ws.shape[0]
    backend = backend_module(plan.backend)
    acc = torch.float64 if hs.dtype == torch.float64 else torch.float32
    rows = torch.empty(n, dtype=acc, device=hs.device)
    grad_h = torch.empty_like(hs) if upstream is not None and need[0] else None
    grad_w = torch.zeros(ws.shape, dtype=acc, device=ws.device) if upstream is not None and need[1] else None
    grad_b = torch.zeros(vocab, dtype=acc, device=ws.device) if upstream is not None and need[2] else None
    dummy_teacher = None
    for i0 in range(0, n, plan.chunk):
        i1 = min(i0 + plan.chunk, n)
        s = torch.nn.functional.linear(hs[i0:i1], ws, bs)
        a, t = plan.teacher_logits(i0, i1)
        if a is None:  # soft_weight = 0: the kernels read no teacher; hand them the student chunk
            dummy_teacher = a = s
        labels = plan.labels[i0:i1] if plan.labels is not None else None
        chunk_rows, stats = backend.forward(s, a, t, labels, opts)
        rows[i0:i1] = chunk_rows
        if upstream is None:
            continue
        backend.backward(upstream[i0:i1], s, a, t, labels, stats, opts, s)  # s now holds d loss / d s
        g = s
        if grad_h is not None:
            grad_h[i0:i1] = g @ ws
        if grad_w is not None:
            grad_w += _mm_fp32(g.t(), hs[i0:i1])
        if grad_b is not None:
            grad_b += g.sum(dim=0, dtype=acc)
    del dummy_teacher
    return rows, (grad_h, grad_w, grad_b)


def _row_scale(labels: Tensor | None, n: int, reduction: str, ignore_index: int, num_items, device, dtype) -> Tensor:
    """d(reduced loss)/d(row loss) for mean/sum, on device (no host sync)."""
    divisor = reduction_divisor(labels, n, reduction, ignore_index, num_items, dtype=dtype, device=device)
    return torch.ones(n, dtype=dtype, device=device) / divisor


class _FusedLinearContrastiveKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, bs, ha, ht, wt, bt, labels, opts, reduction, num_items, backend, chunk):
        n = hs.shape[0]
        plan = _Plan(hs, ws, bs, ha, ht, wt, bt, labels, opts, backend, chunk)
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bs is not None and ctx.needs_input_grad[2])
        wants_grad = any(need)
        acc = torch.float64 if hs.dtype == torch.float64 else torch.float32
        ctx.reduction = reduction
        if reduction == "none":
            rows, _ = _chunk_pass(plan, None, need)
            ctx.plan, ctx.need = plan, need
            return rows
        scale = _row_scale(labels, n, reduction, opts.ignore_index, num_items, hs.device, acc)
        rows, grads = _chunk_pass(plan, scale if wants_grad else None, need)
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in grads))
        ctx.has_grad = tuple(g is not None for g in grads)
        ctx.dtypes = (hs.dtype, ws.dtype, bs.dtype if bs is not None else None)
        return (rows * scale).sum()

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.reduction == "none":
            with torch.autocast(ctx.plan.hs.device.type, enabled=False):  # as in forward: fp32 accumulation
                _, grads = _chunk_pass(ctx.plan, grad_out.to(torch.float64 if ctx.plan.hs.dtype == torch.float64
                                                            else torch.float32), ctx.need)
            dtypes = (ctx.plan.hs.dtype, ctx.plan.ws.dtype, ctx.plan.bs.dtype if ctx.plan.bs is not None else None)
            out = [g.to(d) if g is not None else None for g, d in zip(grads, dtypes, strict=True)]
        else:
            saved = ctx.saved_tensors
            out = [(g * grad_out).to(d) if has else None
                   for g, has, d in zip(saved, ctx.has_grad, ctx.dtypes, strict=True)]
        return out[0], out[1], out[2], None, None, None, None, None, None, None, None, None, None


def _autocast(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Under ``torch.autocast`` (``Trainer(bf16=True)``), the dtype the GEMMs of autocast would compute in:
    fp32/fp16/bf16 tensors cast to it (float64 stays, as autocast leaves it), so a bf16 hidden state meets an
    fp32 head as it would in ``nn.Linear``; the cast is differentiable, so fp32 parameters get fp32 grads."""
    device = next(x.device for x in tensors if isinstance(x, Tensor))
    if not torch.is_autocast_enabled(device.type):
        return tensors
    dtype = torch.get_autocast_dtype(device.type)
    return tuple(x.to(dtype) if isinstance(x, Tensor) and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
                 else x for x in tensors)


def _fused_linear(hs, ws, ha, ht, wt, labels, bs, bt, opts: KDOptions, reduction, num_items, backend, chunk_size,
                  teacher_vocab_slice) -> Tensor:
    if any(isinstance(x, Tensor) for x in (hs, ws)):
        hs, ws, ha, ht, wt, bs, bt = _autocast(hs, ws, ha, ht, wt, bs, bt)
    hs, ws, ha, ht, wt, labels, bs, bt = _check_inputs(hs, ws, ha, ht, wt, labels, bs, bt, opts,
                                                       teacher_vocab_slice, chunk_size)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    num_items = check_num_items(num_items, reduction, hs.device)
    if not isinstance(backend, str) or backend not in ("auto", *BACKEND_NAMES):
        raise ValueError(f"backend must be one of {('auto', *BACKEND_NAMES)}, got {backend!r}")
    float64 = any(x is not None and x.dtype == torch.float64 for x in (hs, ha, ht))
    name = resolve_backend(backend, hs.device, float64=float64)
    h_s, h_t = hs.shape[-1], ha.shape[-1]
    n = math.prod(hs.shape[:-1])
    flat = hs.reshape(n, h_s)
    ha2 = ha.reshape(n, h_t)
    ht2 = ht.reshape(n, h_t) if ht is not None else None
    labels2 = labels.reshape(n) if labels is not None else None
    if chunk_size is None:
        per_entry = flat.element_size() + (wt.element_size() * (1 if ht is None or opts.plausibility_beta == 0
                                                                else 2) if opts.uses_teacher else 0)
        chunk_size = _default_chunk(n, ws.shape[0], per_entry, hs.device)
    # The inputs are in their compute dtype now; inside, fp32 accumulation must not be autocast back down.
    with torch.autocast(hs.device.type, enabled=False):
        return _FusedLinearContrastiveKD.apply(flat, ws, bs, ha2, ht2, wt, bt, labels2, opts, reduction, num_items,
                                               name, chunk_size)


def fused_linear_contrastive_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_audio_hidden: Tensor,
    teacher_text_hidden: Tensor | None,
    teacher_weight: Tensor,
    labels: Tensor | None = None,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    chunk_size: int | None = None,
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
    teacher_vocab_slice: bool = False,
) -> Tensor:
    """Contrastive KD loss from hidden states and LM heads, without materialising ``[N, V]`` logits.

    Args:
        student_hidden: ``[..., Hs]`` final hidden states of the student (fp32/bf16/fp16; float64 for gradcheck).
        student_weight: ``[V, Hs]`` student LM head, ``student_hidden``'s dtype.
        teacher_audio_hidden, teacher_text_hidden: ``[..., Ht]`` teacher hidden states of the two paths
            (``teacher_text_hidden`` may be None when ``alpha == 0``); no gradient.
        teacher_weight: ``[V_t, Ht]`` the teacher head shared by both paths (``V_t > V`` needs
            ``teacher_vocab_slice=True``).
        labels: ``[...]`` integer Pseudo-GT ids (``ignore_index`` rows count 0).
        student_bias, teacher_bias: ``[V]`` / ``[V_t]`` optional biases.
        chunk_size: tokens per chunk (default: from a memory budget of ``CHUNK_BUDGET_BYTES``).
        Other keywords: as :func:`caad_kernels.contrastive_kd_loss`.

    Returns:
        fp32 loss (scalar, or ``[N]`` for ``reduction="none"``); gradients reach ``student_hidden``,
        ``student_weight`` and ``student_bias``.
    """
    opts = KDOptions(alpha=alpha, plausibility_beta=plausibility_beta, temperature=temperature, divergence=divergence,
                     jsd_beta=jsd_beta, soft_weight=soft_weight, hard_weight=hard_weight, ignore_index=ignore_index)
    return _fused_linear(student_hidden, student_weight, teacher_audio_hidden, teacher_text_hidden, teacher_weight,
                         labels, student_bias, teacher_bias, opts, reduction, num_items_in_batch, backend, chunk_size,
                         teacher_vocab_slice)


class FusedLinearContrastiveKDLoss(nn.Module):
    """Module form of :func:`fused_linear_contrastive_kd_loss` (keywords fixed at construction)."""

    def __init__(self, *, chunk_size: int | None = None, alpha: float = 1.0, plausibility_beta: float = 0.0,
                 temperature: float = 1.0, divergence: str = "forward_kl", jsd_beta: float = 0.5,
                 soft_weight: float = 1.0, hard_weight: float = 0.0, ignore_index: int = -100,
                 reduction: str = "mean", backend: str = "auto", teacher_vocab_slice: bool = False) -> None:
        super().__init__()
        self.options = KDOptions(alpha=alpha, plausibility_beta=plausibility_beta, temperature=temperature,
                                 divergence=divergence, jsd_beta=jsd_beta, soft_weight=soft_weight,
                                 hard_weight=hard_weight, ignore_index=ignore_index)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.chunk_size, self.reduction, self.backend = chunk_size, reduction, backend
        self.teacher_vocab_slice = teacher_vocab_slice

    def forward(self, student_hidden: Tensor, student_weight: Tensor, teacher_audio_hidden: Tensor,
                teacher_text_hidden: Tensor | None, teacher_weight: Tensor, labels: Tensor | None = None,
                student_bias: Tensor | None = None, teacher_bias: Tensor | None = None,
                num_items_in_batch: int | Tensor | None = None) -> Tensor:
        """Shapes as :func:`fused_linear_contrastive_kd_loss`."""
        return _fused_linear(student_hidden, student_weight, teacher_audio_hidden, teacher_text_hidden,
                             teacher_weight, labels, student_bias, teacher_bias, self.options, self.reduction,
                             num_items_in_batch, self.backend, self.chunk_size, self.teacher_vocab_slice)


def lm_head_parameters(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``(weight [V, H], bias [V] or None)`` of a Hugging Face model's output head.

    The hook a trainer uses to switch to the fused-linear loss: run the models with
    ``output_hidden_states=True``, take ``hidden_states[-1]`` at the target positions, and pass
    them with these parameters to :func:`fused_linear_contrastive_kd_loss` instead of logits.
    Works for any model exposing ``get_output_embeddings()`` (tied embeddings included).
    """
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None or not isinstance(getattr(head, "weight", None), Tensor):
        raise ValueError(f"{type(model).__name__} has no output embedding (get_output_embeddings() returned {head!r})")
    return head.weight, getattr(head, "bias", None)
