"""Training from an offline teacher cache (``CAADTrainer(teacher_cache=DIR)``): no teacher model in memory.

:class:`CachedTargetsCollator` pairs every target token of a batch with its cached row — by record id and
position within the record's target — and checks that the cached target id equals the batch's label there,
so a cache built from other Pseudo-GT targets, another tokenizer or another data file is refused instead of
silently misaligned. :func:`cached_kd_loss` is the loss of one step: the student's target rows against the
cached sparse targets through :func:`caad_kernels.sparse_contrastive_kd_loss` (forward KL, SPEC §9), divided
by the Trainer's ``num_items_in_batch`` exactly like the live-teacher loss.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from caad_kernels.options import FORWARD_KL, KDOptions

from .teacher import gather_targets
from .teacher_cache_store import TeacherCache, TeacherCacheError, check_manifest, pad_rows

__all__ = ["CachedTargetsCollator", "cached_kd_loss", "open_for_training"]


def open_for_training(folder: str | os.PathLike | TeacherCache, options: KDOptions, text_only_view: str, *,
                      fused_linear: bool = False, grad_in_forward: bool = False,
                      expected: Mapping[str, Any] | None = None) -> TeacherCache:
    """Open ``folder`` for a training run with these options; refuse what the cache cannot serve.

    Raises:
        ValueError: a divergence other than forward KL, ``fused_linear`` or ``grad_in_forward`` (not supported).
        TeacherCacheError: the manifest's alpha, plausibility_beta, temperature or text_only_view (or a field
            of ``expected``, e.g. the data file's hash) differs from the run's — the message names the field.
    """
    if options.soft_weight > 0 and options.divergence_code != FORWARD_KL:
        raise ValueError(f"a teacher cache supports divergence='forward_kl' only, got divergence="
                         f"{options.divergence!r} (jsd_beta={options.jsd_beta}): the cached p is 0 off its support, "
                         "where reverse KL and JSD need p everywhere (SPEC §9); train with the live teacher instead")
    if fused_linear:
        # The sparse loss takes [N, V] student logits; a cache already removes the teacher's logits and model,
        # and a chunked sparse fused-linear loss is not built yet.
        raise ValueError("fused_linear=True is not supported with a teacher cache: the sparse-target loss takes the "
                         "student's logits; set fused_linear=False (the cache already removes the teacher entirely)")
    if grad_in_forward:
        raise ValueError("kd_grad_in_forward=True is not supported with a teacher cache (the sparse-target loss has "
                         "no grad_in_forward mode); set it to False")
    want: dict[str, Any] = {"alpha": options.alpha, "plausibility_beta": options.plausibility_beta,
                            "temperature": options.temperature}
    if options.alpha != 0.0:  # with alpha = 0 the text-only view never enters the targets
        want["text_only_view"] = text_only_view
    want.update(expected or {})
    if isinstance(folder, TeacherCache):
        check_manifest(folder.manifest, want, f"teacher cache {folder.folder}",
                       "train with the options the cache was built with, or rebuild it with caad teacher-cache")
        return folder
    return TeacherCache(folder, want)


class CachedTargetsCollator:
    """Collate examples and attach their cached sparse teacher targets.

    Each example needs an ``id`` (the record id the cache was built with). Output: the inner collator's batch
    without the text-only view (no teacher runs), plus::

        "teacher_targets": {"ids": [N_tgt, K] int64 (-1 pads), "logprobs": [N_tgt, K] (cache dtype),
                            "tail_logmass": [N_tgt] float32, or None when every row's support is exact}

    rows in :func:`caad.teacher.gather_targets` order (example-major, position-minor), K the batch's largest
    support. A record missing from the cache, or whose cached target ids differ from the batch's, raises
    TeacherCacheError naming the record and the position.

    Args:
        inner: a :class:`caad.teacher.DualViewCollator` (or anything returning its ``target_ids``/``target_lengths``).
        cache: the opened :class:`caad.teacher_cache_store.TeacherCache`.
    """

    def __init__(self, inner: Any, cache: TeacherCache) -> None:
        self.inner = inner
        self.cache = cache

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        record_ids = []
        for i, ex in enumerate(examples):
            rid = ex.get("id") if isinstance(ex, Mapping) else None
            if rid is None:
                raise ValueError(f"example {i} has no 'id': training from a teacher cache pairs each example with "
                                 "its cached rows by record id")
            record_ids.append(str(rid))
        batch = self.inner(examples)
        batch.pop("text_view", None)  # the teacher does not run
        lengths = [int(n) for n in batch["target_lengths"]]
        records = [self.cache.record(rid) for rid in record_ids]
        for rid, rec, n in zip(record_ids, records, lengths, strict=True):
            if n > rec.target_ids.numel():
                raise TeacherCacheError(f"record {rid!r}: the batch has {n} target tokens but the teacher cache "
                                        f"holds {rec.target_ids.numel()}; the cache was built from other targets: "
                                        "rebuild it from this data")
        ids, logprobs, tail, cached_targets = pad_rows(records, lengths)
        batch_targets = batch["target_ids"]
        if not torch.equal(cached_targets, batch_targets):
            k = int((cached_targets != batch_targets).nonzero()[0, 0])
            b, start = 0, 0
            while start + lengths[b] <= k:
                start += lengths[b]
                b += 1
            raise TeacherCacheError(
                f"record {record_ids[b]!r}, target position {k - start}: the teacher cache has token "
                f"{int(cached_targets[k])} but the batch's label is {int(batch_targets[k])}; the cache was built "
                "from other Pseudo-GT targets or another tokenizer: rebuild it from this data and processor")
        exact = not bool(torch.isfinite(tail).any())
        batch["teacher_targets"] = {"ids": ids, "logprobs": logprobs, "tail_logmass": None if exact else tail}
        return batch


def cached_kd_loss(model: nn.Module, audio_view: Mapping[str, Any], labels: Tensor,
                   teacher_targets: Mapping[str, Any], options: KDOptions, *, vocab_size: int,
                   num_items_in_batch: Tensor | int | None, backend: str) -> tuple[Tensor, Any, Tensor, Tensor]:
    """One step's loss from cached targets: ``(loss, model outputs, detached student rows [N_tgt, V],
    target_ids [N_tgt])``; raises TeacherCacheError when the student's vocabulary is not the cache's."""
    from caad_kernels import sparse_contrastive_kd_loss

    outputs = model(**audio_view)
    student_rows, target_ids = gather_targets(outputs.logits, labels)
    if student_rows.shape[-1] != vocab_size:
        raise TeacherCacheError(f"the student's vocabulary is {student_rows.shape[-1]} but the teacher cache's "
                                f"vocab_size is {vocab_size}; rebuild the cache with --vocab-size "
                                f"{student_rows.shape[-1]}")
    device = student_rows.device
    tail = teacher_targets.get("tail_logmass")
    loss = sparse_contrastive_kd_loss(
        student_rows, teacher_targets["ids"].to(device), teacher_targets["logprobs"].to(device),
        None if tail is None else tail.to(device), target_ids, temperature=options.temperature,
        soft_weight=options.soft_weight, hard_weight=options.hard_weight, ignore_index=options.ignore_index,
        reduction="mean", num_items_in_batch=num_items_in_batch,
        # the dense loss's CUDA C++ kernels have no sparse variant; "auto" picks the Triton one on CUDA
        backend="auto" if backend == "cuda" else backend)
    return loss, outputs, student_rows.detach(), target_ids
