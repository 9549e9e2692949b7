"""Inference-time decoding: plain greedy answers and the audio-aware contrastive-decoding baseline.

CAAD distils the contrast ``z = (1+α)·a − α·t`` into the student so that, at inference, one forward per token
suffices (SPEC §1). The baseline it replaces is **audio-aware contrastive decoding** of the teacher: every
generation step runs two paths and contrasts them,

- the **audio path** — the main ``generate`` sequence (instruction + audio), whose next-token scores ``a`` are
  handed to the logits processor;
- the **text-only path** — the same instruction without the audio ("drop") or with a silent waveform
  ("silence"), extended with the same generated tokens, run by :class:`AudioContrastiveLogitsProcessor` itself
  with its own KV cache, so each step costs one extra single-token forward.

The processed scores are ``contrasted_logits(a, t, α, β_p)`` of :mod:`caad_kernels.reference`: the same α and
adaptive-plausibility mask (tokens with ``a_v < max(a) + log β_p`` get −inf) as the distillation loss (SPEC §2).

:func:`greedy_generate` is the plain single-path answer (what the student does at inference, and what ``caad
eval`` calls for both student and teacher); :func:`contrastive_generate` is the two-path baseline. Both use the
prompt of :func:`caad.teacher.build_prompts` (the prompt part, without a target), left-padded in a batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from caad.models import chat_encoder_of, family_of
from caad.teacher import build_prompts, feature_tensor, token_rows
from caad_kernels.reference import contrasted_logits

__all__ = [
    "AudioContrastiveLogitsProcessor",
    "build_generation_inputs",
    "contrastive_generate",
    "greedy_generate",
]


# ----------------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------------


def _cache_kwarg(model: Any) -> str:
    """Name of the forward's KV-cache argument: ``cache`` (transformers >= 5.x) or ``past_key_values`` (older)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(output: Any) -> Any:
    """The KV cache of a model output, whichever name the transformers version gives it."""
    for key in ("cache", "past_key_values"):
        value = output.get(key, None) if isinstance(output, Mapping) else getattr(output, key, None)
        if value is not None:
            return value
    raise ValueError("the model returned no KV cache; it must support use_cache=True")


def _positions(attention_mask: Tensor) -> Tensor:
    """``position_ids`` from a (left-padded) mask: real tokens count from 0 whatever the padding.

    Args:
        attention_mask: ``[B, L]`` int/bool, 1 on real tokens.

    Returns:
        ``[B, L]`` int64; padding positions get 1 (they are masked anyway, and this matches HF's convention).
    """
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def _audio_of(idx: int, ex: Mapping[str, Any], sampling_rate: int) -> np.ndarray:
    audio = ex.get("audio")
    if audio is None:
        raise ValueError(f"example {idx} has no 'audio'")
    if isinstance(audio, Mapping):
        sr = int(audio.get("sampling_rate", sampling_rate))
        if sr != sampling_rate:
            raise ValueError(f"example {idx}: audio sampling_rate {sr} != processor sampling rate {sampling_rate}")
        audio = audio.get("array")
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1 or audio.size == 0:
        raise ValueError(f"example {idx}: 'audio' must be a non-empty 1-D (mono) array, got shape {audio.shape}")
    return audio


def build_generation_inputs(
    processor: Any,
    examples: Sequence[Mapping[str, Any]],
    *,
    with_audio: bool = True,
    silence: bool = False,
    use_chat_template: bool | None = None,
) -> dict[str, Tensor]:
    """Left-padded generation prompts (no target) for a batch of examples.

    The prompt is the prompt half of :func:`caad.teacher.build_prompts` (for a processor that takes audio only
    through its chat template, the prompts of its family's :class:`~caad.models.ChatEncoder`, as in
    :class:`~caad.teacher.DualViewCollator`), so generation continues exactly where the Pseudo-GT starts in training.
    Left padding keeps every row's last prompt token in the last column, which batched ``generate`` needs.

    Args:
        processor: a supported family's processor (``.tokenizer``, ``.feature_extractor``; :mod:`caad.models`).
        examples: dicts with ``audio`` (float32 1-D array at the processor's rate, or ``{"array", "sampling_rate"}``)
            and ``instruction`` (str).
        with_audio: put the audio placeholder in the prompt and return the audio features.
        silence: with ``with_audio``, replace each waveform by zeros of the same length (the "silence" text view).
        use_chat_template: see :func:`caad.teacher.build_prompts`.

    Returns:
        ``input_ids [B, P] int64``, ``attention_mask [B, P] int64`` and, with audio, the family's feature keys
        (Qwen2-Audio: ``input_features [B, M, F]`` float32 and ``feature_attention_mask [B, F]`` int64).
    """
    if len(examples) == 0:
        raise ValueError("no examples to generate for")
    family = family_of(processor)
    tokenizer = processor.tokenizer
    sampling_rate = int(processor.feature_extractor.sampling_rate)
    instructions = []
    for i, ex in enumerate(examples):
        instruction = ex.get("instruction", "")
        if not isinstance(instruction, str):
            raise TypeError(f"example {i}: 'instruction' must be a str, got {type(instruction)}")
        instructions.append(instruction)
    audios = [_audio_of(i, ex, sampling_rate) for i, ex in enumerate(examples)] if with_audio else None
    if audios is not None and silence:
        audios = [np.zeros_like(a) for a in audios]
    chat = chat_encoder_of(processor)
    if chat is not None:  # a processor that takes audio only through its chat template encodes whole turns
        if use_chat_template is False:
            raise ValueError(f"use_chat_template=False, but the {type(processor).__name__} takes audio only "
                             "through its chat template")
        enc = chat.prompts(instructions, audios)
        rows = enc["input_ids"]
    else:
        # The target text is irrelevant here; "x" only keeps build_prompts' prefix check meaningful.
        prompts = [build_prompts(tokenizer, instruction, "x", with_audio=with_audio,
                                 use_chat_template=use_chat_template, family=family)[0]
                   for instruction in instructions]
        if audios is None:
            enc, rows = {}, tokenizer(prompts, add_special_tokens=False)["input_ids"]
        else:
            # Unpadded text, padded here: a processor's `padding=True` also reaches its feature extractor, which
            # would then pad the audio to the longest clip instead of the encoder's fixed window (Audio Flamingo
            # 3's encoder needs the window).
            enc = processor(text=prompts, audio=audios, sampling_rate=sampling_rate, add_special_tokens=False)
            rows = token_rows(enc)
    out = left_padded(rows, _pad_id(tokenizer))
    for key in family.feature_keys if audios is not None else ():
        out[key] = feature_tensor(enc[key])
    return out


def left_padded(rows: Sequence[Sequence[int]], pad_id: int) -> dict[str, Tensor]:
    """``input_ids`` and ``attention_mask`` ``[B, max len]`` int64, each row's tokens at its right end."""
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, row in enumerate(rows):
        if len(row):
            input_ids[b, length - len(row):] = torch.as_tensor(list(row), dtype=torch.long)
            attention_mask[b, length - len(row):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad if pad is not None else 0)


# ----------------------------------------------------------------------------------------------------------------------
# The contrastive logits processor
# ----------------------------------------------------------------------------------------------------------------------


class AudioContrastiveLogitsProcessor:
    """Audio-aware contrastive decoding as a Hugging Face ``LogitsProcessor``.

    ``generate`` runs the audio path (the main sequence) and calls ``processor(input_ids, scores)`` with its
    next-token scores ``a``; this object runs the text-only path on its own prompt plus the tokens generated so far,
    incrementally with its own KV cache, and returns ``contrasted_logits(a, t, alpha, plausibility_beta)``.

    The plausibility mask is defined on the raw audio-path logits, so keep the generation config free of other
    score-changing processors (``generate`` applies its config-derived ones, e.g. ``min_new_tokens`` or
    ``repetition_penalty``, *before* user-supplied ones; an eos forced to −inf there is then −inf here too).
    Use one instance per ``generate`` call (it keeps the text path's cache); :meth:`reset` makes it reusable.
    Greedy and sampling both work; beam search does not (beams reorder the batch, which the text cache would not
    follow).

    Args:
        model: the teacher (e.g. ``Qwen2AudioForConditionalGeneration``), in eval mode.
        text_only_inputs: the text-only prompts, left-padded like the audio prompts: ``input_ids [B, P_t]``,
            ``attention_mask [B, P_t]`` and, for the "silence" view, the family's audio feature keys.
            Row ``b`` must be the text-only view of the audio sequence in row ``b`` of ``generate``.
        alpha: contrast strength ``α ≥ 0``; ``α = 0`` returns the audio scores unchanged (when ``β_p = 0``) and skips
            the text path entirely.
        plausibility_beta: ``β_p ∈ [0, 1)``; ``0`` disables the mask.

    Attributes:
        last_text_scores: the text-only path's ``[B, V]`` fp32 next-token logits of the last call (None before).
        last_audio_scores: the ``[B, V]`` scores received from ``generate`` in the last call.
    """

    def __init__(
        self, model: Any, text_only_inputs: Mapping[str, Tensor], *, alpha: float = 1.0, plausibility_beta: float = 0.1
    ) -> None:
        if not alpha >= 0.0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if not 0.0 <= plausibility_beta < 1.0:
            raise ValueError(f"plausibility_beta must be in [0, 1), got {plausibility_beta}")
        for key in ("input_ids", "attention_mask"):
            if key not in text_only_inputs:
                raise ValueError(f"text_only_inputs lacks {key!r}")
        self.model = model
        self.text_only_inputs = dict(text_only_inputs)
        self.alpha = float(alpha)
        self.plausibility_beta = float(plausibility_beta)
        self._cache_key = _cache_kwarg(model)
        self.reset()

    def reset(self) -> None:
        """Forget the text path's state, so the next call starts a new generation."""
        self._cache: Any = None
        self._mask: Tensor | None = None
        self._prompt_len: int | None = None  # audio prompt length: columns of input_ids before the generated ones
        self._fed = 0  # generated tokens already fed to the text path
        self.last_text_scores: Tensor | None = None
        self.last_audio_scores: Tensor | None = None

    @torch.no_grad()
    def _text_scores(self, input_ids: Tensor) -> Tensor:
        """The text-only path's next-token logits ``[B, V]`` after the generated tokens of ``input_ids``.

        First call: prefill the text prompt (the generated part is empty). Later calls: feed exactly the generated
        tokens not yet fed (one per step under ``generate``), with the cache, the extended mask and the positions
        that continue each row's real-token count.
        """
        device = input_ids.device
        if self._prompt_len is None:
            self._prompt_len = input_ids.shape[1]
            inputs = {k: v.to(device) for k, v in self.text_only_inputs.items()}
            self._mask = inputs["attention_mask"].long()
            if input_ids.shape[0] != self._mask.shape[0]:
                raise ValueError(
                    f"generate runs {input_ids.shape[0]} sequences but text_only_inputs has {self._mask.shape[0]} "
                    "rows (num_beams / num_return_sequences > 1 are not supported)"
                )
            inputs["position_ids"] = _positions(self._mask)
            out = self.model(**inputs, use_cache=True)
            self._cache = _cache_of(out)
            logits = out.logits[:, -1, :]
        else:
            generated = input_ids[:, self._prompt_len :]
            new = generated[:, self._fed :]
            if new.shape[1] == 0:
                raise ValueError("the processor was called twice without a new token; call reset() between runs")
            assert self._mask is not None
            self._mask = torch.cat([self._mask, self._mask.new_ones(new.shape)], dim=1)
            positions = _positions(self._mask)[:, -new.shape[1] :]
            out = self.model(
                input_ids=new,
                attention_mask=self._mask,
                position_ids=positions,
                use_cache=True,
                **{self._cache_key: self._cache},
            )
            self._cache = _cache_of(out)
            logits = out.logits[:, -1, :]
        self._fed = input_ids.shape[1] - self._prompt_len
        return logits.float()

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        """Contrast one step.

        Args:
            input_ids: ``[B, P_a + k]`` the audio-path sequences (prompt + k generated tokens).
            scores: ``[B, V]`` the audio path's next-token logits ``a``.

        Returns:
            ``[B, V]`` in ``scores.dtype``: ``(1+α)·a − α·t``, −inf where ``a_v < max(a) + log β_p``.
        """
        self.last_audio_scores = scores
        if self.alpha == 0.0:
            # Standard decoding of the audio path: the text path would not change anything, so it is not run.
            t = None
        else:
            t = self._text_scores(input_ids)
            self.last_text_scores = t
            vocab = scores.shape[-1]
            if t.shape[-1] < vocab:
                raise ValueError(f"text path has {t.shape[-1]} logits but the audio path {vocab}")
            t = t[:, :vocab].to(scores.dtype)
        return contrasted_logits(scores, t, self.alpha, self.plausibility_beta)


# ----------------------------------------------------------------------------------------------------------------------
# Convenience generation
# ----------------------------------------------------------------------------------------------------------------------


def _device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _generate(
    model: Any, processor: Any, inputs: Mapping[str, Tensor], max_new_tokens: int, logits_processor: list | None
) -> list[str]:
    tokenizer = processor.tokenizer
    device = _device_of(model)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    kwargs: dict[str, Any] = {}
    if logits_processor:
        from transformers import LogitsProcessorList

        kwargs["logits_processor"] = LogitsProcessorList(logits_processor)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=_pad_id(tokenizer),
            **kwargs,
        )
    finally:
        model.train(was_training)
    new = out[:, inputs["input_ids"].shape[1] :]
    return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]


def greedy_generate(
    model: Any,
    processor: Any,
    examples: Sequence[Mapping[str, Any]],
    *,
    max_new_tokens: int = 16,
    use_chat_template: bool | None = None,
) -> list[str]:
    """Plain single-path greedy answers (audio + instruction), one per example, special tokens stripped.

    This is the student's inference, and the teacher's without contrast. Examples are dicts with ``audio``
    (float32 ``np.ndarray`` at 16 kHz) and ``instruction``; all of them go in one left-padded batch.
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    inputs = build_generation_inputs(processor, examples, with_audio=True, use_chat_template=use_chat_template)
    return _generate(model, processor, inputs, max_new_tokens, None)


def contrastive_generate(
    model: Any,
    processor: Any,
    examples: Sequence[Mapping[str, Any]],
    *,
    alpha: float = 1.0,
    plausibility_beta: float = 0.1,
    max_new_tokens: int = 16,
    text_only_view: Literal["drop", "silence"] = "drop",
    use_chat_template: bool | None = None,
) -> list[str]:
    """Greedy audio-aware contrastive decoding of ``model``: the two-path inference baseline of CAAD.

    The audio prompt is the one of :func:`greedy_generate`; the text-only prompt drops the audio placeholder
    (``"drop"``) or keeps it over a silent waveform of the same length (``"silence"``). Each step costs the audio
    path's forward plus one single-token forward of the text path (see :class:`AudioContrastiveLogitsProcessor`).

    Returns:
        One decoded answer per example (special tokens stripped, whitespace trimmed).
    """
    if text_only_view not in ("drop", "silence"):
        raise ValueError(f"text_only_view must be 'drop' or 'silence', got {text_only_view!r}")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    audio_inputs = build_generation_inputs(processor, examples, with_audio=True, use_chat_template=use_chat_template)
    silence = text_only_view == "silence"
    text_inputs = build_generation_inputs(
        processor, examples, with_audio=silence, silence=silence, use_chat_template=use_chat_template
    )
    lp = AudioContrastiveLogitsProcessor(model, text_inputs, alpha=alpha, plausibility_beta=plausibility_beta)
    return _generate(model, processor, audio_inputs, max_new_tokens, [lp])
