"""Stage 2: ``CAADConfig`` and ``CAADTrainer``, a ``transformers.Trainer`` that distils a student with the
contrastive KD loss of :mod:`caad_kernels` (SPEC §8).

Each step: the student runs on the audio view; the frozen teacher runs both views in one batched forward
(:func:`caad.teacher.teacher_forward_both_views`); the three ``[N_tgt, V]`` row sets go to
:func:`caad_kernels.contrastive_kd_loss` with the Trainer's ``num_items_in_batch`` as the divisor, so
gradient accumulation (and DDP token averaging) gives the gradient of one big batch. ``alpha=0`` is the
standard-KD baseline; ``soft_weight=0, hard_weight=1`` is plain fine-tuning on the Pseudo-GT.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, Trainer, TrainingArguments

from caad_kernels import contrastive_kd_loss, fused_linear_contrastive_kd_loss
from caad_kernels.fused_linear import lm_head_parameters
from caad_kernels.options import KDOptions

from .cached_teacher import CachedTargetsCollator, cached_kd_loss, open_for_training
from .peft_student import is_lora_layer
from .peft_student import unwrap as unwrap_peft
from .teacher import (
    DualViewCollator,
    PairedViewCollator,
    fused_linear_refusal,
    gather_targets,
    needs_own_views,
    teacher_forward_both_views,
    teacher_hidden_both_views,
)
from .vocabulary import check_shared_vocabulary

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class CAADConfig(TrainingArguments):
    """``TrainingArguments`` plus the CAAD loss and teacher options (SPEC §2, §8)."""

    alpha: float = field(default=1.0, metadata={"help": "contrast strength; 0 = standard KD"})
    plausibility_beta: float = field(default=0.0, metadata={"help": "adaptive plausibility β_p in [0, 1)"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature τ of the soft term"})
    divergence: str = field(default="forward_kl", metadata={"help": "forward_kl | reverse_kl | jsd"})
    jsd_beta: float = field(default=0.5, metadata={"help": "β of the generalized JSD (TRL convention)"})
    soft_weight: float = field(default=1.0, metadata={"help": "weight of the contrastive KD term"})
    hard_weight: float = field(default=0.0, metadata={"help": "weight of the CE term on the Pseudo-GT"})
    text_only_view: str = field(default="drop", metadata={"help": "drop | silence: the teacher's text-only view"})
    kd_backend: str = field(default="auto", metadata={"help": "auto | torch | triton | cpu | cuda"})
    teacher_model_name_or_path: str | None = field(default=None, metadata={"help": "teacher checkpoint"})
    teacher_dtype: str | None = field(default=None, metadata={"help": "float32 | bfloat16 | float16"})
    teacher_device: str | None = field(default=None, metadata={"help": "teacher device (default: the student's)"})
    kd_grad_in_forward: bool = field(default=False, metadata={
        "help": "compute the KD loss's logits gradient in its forward (caad_kernels grad_in_forward): one read "
                "of the logits on sm_90's cuda backend; holds the gradient until the backward"})
    fused_linear: bool = field(default=False, metadata={
        "help": "take final hidden states and LM heads instead of logits (caad_kernels.fused_linear): no [N, V] "
                "logits from the student or the teacher"})

    def __post_init__(self) -> None:
        # The collated batch is nested (two views): the model-signature column filter must not touch it.
        self.remove_unused_columns = False
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
            # Under torchrun/accelerate launch without a GPU, accelerate sets up DDP (gloo) only when told to use
            # the CPU; otherwise every rank silently trains alone on the whole data set.
            self.use_cpu = True
        if self.fused_linear and self.ddp_find_unused_parameters is None:
            # The student's head weight enters the loss outside the model's forward (fused_linear), so DDP's
            # unused-parameter search would count it unused, then see its gradient arrive: every parameter is used.
            self.ddp_find_unused_parameters = False
        super().__post_init__()
        self.kd_options()  # validate the loss options up front, with SPEC §3's messages
        if self.text_only_view not in ("drop", "silence"):
            raise ValueError(f"text_only_view must be 'drop' or 'silence', got {self.text_only_view!r}")
        if self.teacher_dtype is not None and self.teacher_dtype not in _DTYPES:
            raise ValueError(f"teacher_dtype must be one of {tuple(_DTYPES)}, got {self.teacher_dtype!r}")

    def kd_options(self) -> KDOptions:
        return KDOptions(alpha=self.alpha, plausibility_beta=self.plausibility_beta, temperature=self.temperature,
                         divergence=self.divergence, jsd_beta=self.jsd_beta, soft_weight=self.soft_weight,
                         hard_weight=self.hard_weight)


def _identity(x: Tensor) -> Tensor:
    return x


class _CountingCollator:
    """Adds the audio view's labels at the top level, so the Trainer counts target tokens
    (``num_items_in_batch``) across gradient-accumulation steps and devices."""

    def __init__(self, inner: DualViewCollator) -> None:
        self.inner = inner

    def __call__(self, examples):
        batch = self.inner(examples)
        batch["labels"] = batch["audio_view"]["labels"]
        return batch


class CAADTrainer(Trainer):
    """``Trainer`` whose loss is the contrastive KD loss against a frozen dual-path teacher.

    Args:
        model: the student (any HF audio-text model whose forward takes ``input_ids`` and audio features).
        teacher_model: the teacher; frozen, put in eval mode, moved to ``args.teacher_device``/``teacher_dtype``.
            It is run only for the terms the loss reads: not at all with ``soft_weight=0`` (it may then be None),
            its text-only view not with ``alpha=0``.
        args: a :class:`CAADConfig`.
        processor: the student's processor; builds the default :class:`DualViewCollator`.
        teacher_processor: the teacher's processor or tokenizer, if it has its own: refused unless it maps every
            token to the same id as ``processor`` (:func:`caad.vocabulary.check_shared_vocabulary`).
        teacher_cache: instead of ``teacher_model``, a folder written by ``caad teacher-cache`` (or an opened
            :class:`caad.teacher_cache_store.TeacherCache`): no teacher is loaded, the loss is the sparse-target
            forward KL (:mod:`caad.cached_teacher`); examples need their record ``id``.
        Other arguments as ``transformers.Trainer``.
    """

    def __init__(self, model: nn.Module, teacher_model: nn.Module | None = None, args: CAADConfig | None = None,
                 processor: Any = None, data_collator: Any = None, teacher_processor: Any = None,
                 teacher_cache: Any = None, **kwargs: Any) -> None:
        if not isinstance(args, CAADConfig):
            raise TypeError(f"args must be a CAADConfig, got {type(args).__name__}")
        if teacher_model is not None and teacher_cache is not None:
            raise ValueError("CAADTrainer takes teacher_model or teacher_cache (a caad teacher-cache folder), not both")
        if teacher_model is None and teacher_cache is None and args.soft_weight != 0:
            raise ValueError(f"soft_weight={args.soft_weight} > 0 needs a teacher: give teacher_model or teacher_cache "
                             "(a caad teacher-cache folder)")
        cache = None if teacher_cache is None else open_for_training(
            teacher_cache, args.kd_options(), args.text_only_view, fused_linear=args.fused_linear,
            grad_in_forward=args.kd_grad_in_forward)
        if teacher_processor is not None:
            if processor is None:
                raise ValueError("teacher_processor needs processor (the student's) to compare vocabularies with")
            check_shared_vocabulary(teacher_processor, processor)
        if data_collator is None:
            if processor is None:
                raise ValueError("CAADTrainer needs a processor (or a data_collator) to build the dual views")
            data_collator = DualViewCollator(processor, text_only_view=args.text_only_view)
            if teacher_processor is not None and needs_own_views(processor, teacher_processor):
                # e.g. a teacher of another family: its own prompts and features, the same target tokens
                data_collator = PairedViewCollator(
                    data_collator, DualViewCollator(teacher_processor, text_only_view=args.text_only_view))
        if cache is not None:
            data_collator = CachedTargetsCollator(data_collator, cache)
        super().__init__(model=model, args=args, data_collator=_CountingCollator(data_collator), **kwargs)
        # Our loss is normalised by num_items_in_batch: let the Trainer count target tokens and not rescale.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self.teacher_cache = cache
        if args.fused_linear:  # refused up front rather than at the first step
            for role, which in (("the student", model), ("the teacher", teacher_model)):
                if which is not None and (refusal := fused_linear_refusal(unwrap_peft(which), role)) is not None:
                    raise ValueError(refusal)
        # The teacher is an attribute, not the Trainer's model: checkpoints hold the student only.
        self.teacher = (self._prepare_teacher(teacher_model, args, default_device=self.args.device)
                        if teacher_model is not None else None)
        self._kd = args.kd_options()
        self._metrics = self._empty_metrics()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Resume the student's weights with ``from_pretrained``'s key mapping.

        ``save_pretrained`` writes some models (Qwen2-Audio in transformers 5) under their original checkpoint
        key names; the Trainer's own loader then matches no key and, with only a logged warning, resumes from
        the initial weights. Loading through ``from_pretrained`` maps the names back; the copy is strict.
        """
        model = self.model if model is None else model
        if not isinstance(model, PreTrainedModel) or self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        saved = type(model).from_pretrained(resume_from_checkpoint)  # load_state_dict casts to the live dtype
        model.load_state_dict(saved.state_dict(), strict=True)
        del saved

    @staticmethod
    def _empty_metrics() -> dict[str, Any]:
        return {"kd": 0.0, "ce": 0.0, "part_tokens": 0, "tokens": 0, "seconds": 0.0}

    @staticmethod
    def _prepare_teacher(teacher: nn.Module, args: CAADConfig, default_device: torch.device) -> nn.Module:
        teacher.requires_grad_(False)
        teacher.eval()
        if args.teacher_dtype is not None:
            teacher = teacher.to(_DTYPES[args.teacher_dtype])
        # By default the teacher sits beside the student (each DDP rank's own device); it is not wrapped in DDP.
        return teacher.to(args.teacher_device if args.teacher_device is not None else default_device)

    @staticmethod
    def _to(obj: Any, device: torch.device) -> Any:
        if isinstance(obj, Tensor):
            return obj.to(device)
        if isinstance(obj, dict):
            return {k: CAADTrainer._to(v, device) for k, v in obj.items()}
        return obj

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Tensor | int | None = None):
        start = time.perf_counter()
        audio_view = {k: v for k, v in inputs["audio_view"].items() if k != "labels"}
        labels = inputs["audio_view"]["labels"]
        o = self._kd
        if self.teacher_cache is not None:  # no teacher: the cached sparse targets came with the batch
            loss, outputs, rows, target_ids = cached_kd_loss(
                model, audio_view, labels, inputs["teacher_targets"], o, vocab_size=self.teacher_cache.vocab_size,
                num_items_in_batch=num_items_in_batch, backend=self.args.kd_backend)
            self._record(target_ids, loss, num_items_in_batch, time.perf_counter() - start,
                         lambda: contrastive_kd_loss(rows, rows, None, target_ids, alpha=0.0, soft_weight=0.0,
                                                     hard_weight=1.0, reduction="sum", backend=self.args.kd_backend))
            return self._finish(loss, outputs, num_items_in_batch, return_outputs)
        teacher_batch = None
        if o.uses_teacher:
            teacher_device = next(self.teacher.parameters()).device
            views = inputs.get("teacher", inputs)  # a teacher with its own processor has its own views
            teacher_batch = self._to({"audio_view": views["audio_view"], "text_view": views["text_view"]},
                                     teacher_device)
        options = dict(alpha=o.alpha, plausibility_beta=o.plausibility_beta, temperature=o.temperature,
                       divergence=o.divergence, jsd_beta=o.jsd_beta, soft_weight=o.soft_weight,
                       hard_weight=o.hard_weight, num_items_in_batch=num_items_in_batch, backend=self.args.kd_backend)
        # Student and teacher target rows both come from the same labels (the collator makes the two views'
        # targets identical and teacher_forward_both_views checks them), so they are aligned by construction.
        if self.args.fused_linear:
            loss, outputs, target_ids, ce_sum = self._fused_linear_loss(model, audio_view, labels, teacher_batch,
                                                                        options)
        else:
            outputs = model(**audio_view)
            student_rows, target_ids = gather_targets(outputs.logits, labels)
            if o.uses_teacher:
                teacher_audio, teacher_text, _ = teacher_forward_both_views(self.teacher, teacher_batch,
                                                                            with_text=o.uses_text)
            else:  # soft_weight=0: the soft term is not read; the student's rows stand in for the teacher's
                teacher_audio, teacher_text = student_rows.detach(), None
            device = student_rows.device
            loss = contrastive_kd_loss(
                student_rows, teacher_audio.to(device), teacher_text.to(device) if o.uses_text else None,
                target_ids, **options, grad_in_forward=self.args.kd_grad_in_forward,
                # A teacher with a padded head (e.g. Qwen's) is sliced to the student's vocabulary, explicitly.
                teacher_vocab_slice=teacher_audio.shape[-1] > student_rows.shape[-1],
            )
            rows = student_rows.detach()

            def ce_sum() -> Tensor:  # the hard term alone, through the same memory-lean kernels
                return contrastive_kd_loss(rows, rows, None, target_ids, alpha=0.0, soft_weight=0.0,
                                           hard_weight=1.0, reduction="sum", backend=self.args.kd_backend)

        self._record(target_ids, loss, num_items_in_batch, time.perf_counter() - start, ce_sum)
        return self._finish(loss, outputs, num_items_in_batch, return_outputs)

    def _finish(self, loss: Tensor, outputs: Any, num_items_in_batch: Any, return_outputs: bool):
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts the target tokens of every rank, and DDP averages the ranks' gradients:
            # scaled by the world size, the sum of the ranks' losses is the global-batch loss (as Trainer does).
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def _fused_linear_loss(self, model, audio_view, labels, teacher_batch, options):
        """The loss from final hidden states and LM heads: logits exist one chunk of tokens at a time."""
        # The model inside the DDP/FSDP and PEFT wrappers (a LoRA student's adapters live in its own modules).
        core = unwrap_peft(self.accelerator.unwrap_model(model))
        head = core.get_output_embeddings() if callable(getattr(core, "get_output_embeddings", None)) else None
        if head is None:
            raise ValueError(f"fused_linear=True needs the student's output head; {type(core).__name__} has none")
        if is_lora_layer(head):
            raise ValueError("fused_linear=True reads the student's LM head weight, but it carries LoRA adapters: "
                             "leave the head out of the LoRA target modules (e.g. target 'all-linear')")
        if (refusal := fused_linear_refusal(core, "the student")) is not None:
            raise ValueError(refusal)
        # Through the wrappers (DDP must see the forward to synchronise gradients), with the head made the
        # identity for this call: the "logits" are the head's inputs, and no [B, L, V] logits are computed.
        head.forward = _identity
        try:
            outputs = model(**audio_view, use_cache=False)
        finally:
            del head.forward
        student_hidden, target_ids = gather_targets(outputs.logits, labels)
        student_weight, student_bias = lm_head_parameters(core)
        if self._kd.uses_teacher:
            teacher_audio, teacher_text, _ = teacher_hidden_both_views(self.teacher, teacher_batch,
                                                                       with_text=self._kd.uses_text)
            teacher_weight, teacher_bias = lm_head_parameters(self.teacher)
        else:  # soft_weight=0: the soft term is not read; the student stands in for the teacher
            teacher_audio, teacher_text = student_hidden.detach(), None
            teacher_weight, teacher_bias = student_weight.detach(), None
        device = student_hidden.device
        loss = fused_linear_contrastive_kd_loss(
            student_hidden, student_weight, teacher_audio.to(device),
            teacher_text.to(device) if self._kd.uses_text else None, teacher_weight.to(device), target_ids,
            student_bias=student_bias, teacher_bias=teacher_bias.to(device) if teacher_bias is not None else None,
            teacher_vocab_slice=teacher_weight.shape[0] > student_weight.shape[0], **options)
        h, w = student_hidden.detach(), student_weight.detach()
        b = student_bias.detach() if student_bias is not None else None

        def ce_sum() -> Tensor:  # the hard term alone, chunked too: no [N, V] student logits for the logs either
            return fused_linear_contrastive_kd_loss(h, w, h, None, w, target_ids, student_bias=b, alpha=0.0,
                                                    soft_weight=0.0, hard_weight=1.0, reduction="sum",
                                                    backend=self.args.kd_backend)

        return loss, outputs, target_ids, ce_sum

    def _parts_due(self) -> bool:
        """Whether this micro-step's optimizer step will be logged: the KD/CE split costs an extra pass over the
        target rows, so it is computed only for the steps whose logs report it."""
        if self.args.logging_strategy != "steps":
            return True
        every = self.state.logging_steps or self.args.logging_steps
        next_step = self.state.global_step + 1
        return (self.args.logging_first_step and next_step == 1) or next_step % max(int(every), 1) == 0

    @torch.no_grad()
    def _record(self, target_ids: Tensor, loss: Tensor, num_items, seconds: float, ce_sum) -> None:
        """Running KD and CE parts (per target token, on logged steps) and target tokens/s, for the logs."""
        n = target_ids.numel()
        if n == 0:
            return
        m = self._metrics
        m["tokens"] += n
        m["seconds"] += seconds
        if not self._parts_due():
            return
        # Kept as device tensors: no host sync until the Trainer logs.
        ce = ce_sum()
        total = loss.detach().float() * (num_items if num_items is not None else n)
        o = self._kd
        kd = (total - o.hard_weight * ce) / o.soft_weight if o.soft_weight > 0 else torch.zeros_like(ce)
        m["kd"] = m["kd"] + kd
        m["ce"] = m["ce"] + ce
        m["part_tokens"] += n

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        m = self._metrics
        if m["tokens"] > 0 and "loss" in logs:
            if m["part_tokens"] > 0:
                logs["kd_loss"] = round(float(m["kd"]) / m["part_tokens"], 6)
                logs["ce_loss"] = round(float(m["ce"]) / m["part_tokens"], 6)
            logs["target_tokens_per_s"] = round(m["tokens"] / max(m["seconds"], 1e-9), 1)
            self._metrics = self._empty_metrics()
        super().log(logs, *args, **kwargs)
