"""Views and synchronized teacher forcing (SPEC §1, Stage 2).

Every example carries one Pseudo-GT target. :class:`DualViewCollator` turns a list of examples into two
*views* of the same target:

- the **audio view**: audio + instruction + Pseudo-GT (what the student sees and the teacher's audio-aware path);
- the **text-only view**: instruction + Pseudo-GT, with the audio either dropped (``"drop"``: no audio tokens, no
  features) or replaced by silence of the same length (``"silence"``: same prompt, all-zero waveform).

:func:`teacher_forward_both_views` runs both teacher paths in **one** batched forward and gathers the logits at
the Pseudo-GT positions, and :func:`gather_targets` is the same gather for the student's logits, so the three
``[N_tgt, V]`` tensors handed to :func:`caad_kernels.contrastive_kd_loss` have aligned rows.

Conventions (tested in ``tests/test_caad_teacher.py``):

- **Labels** follow the Hugging Face causal-LM convention: ``labels[b, i] == input_ids[b, i]`` on target tokens and
  ``-100`` elsewhere (prompt, audio tokens, padding). The logits at position ``i`` predict ``labels[b, i + 1]``;
  :func:`gather_targets` does the shift. Passing ``labels`` to a HF model therefore gives the usual CE on the target.
- **Padding is on the right**, for both views, and both views are padded to one common length. Qwen2 (and most HF
  decoders) derive ``position_ids`` from ``arange(seq_len)`` rather than from the attention mask, so left padding
  would shift the absolute positions of real tokens with the amount of padding (harmless up to rounding for RoPE,
  wrong for absolute position embeddings); right padding keeps every real token at the same position whatever the
  batch, so the batched dual-view forward equals separate forwards for any decoder. A target token's position is
  ``len(prompt) + j`` in its own view; the two views' prompts differ in length ("drop"), which is fine because the
  gather is done per view with that view's labels, and both gathers return rows in the same target order.
- **Row order** of gathered tensors is example-major, position-minor (boolean-mask order), identical for the
  student's audio view and both teacher views, because the target token ids are identical in both views.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from .models import chat_encoder_of, family_of, family_or_none, text_config

__all__ = [
    "AUDIO_PLACEHOLDER",
    "DualViewCollator",
    "PairedViewCollator",
    "build_prompts",
    "feature_tensor",
    "fused_linear_refusal",
    "gather_targets",
    "head_on_targets_refusal",
    "teacher_forward_both_views",
    "teacher_hidden_both_views",
]

#: Qwen2-Audio's audio placeholder (each family has its own: ``caad.models.family_of(...).audio_placeholder``).
AUDIO_PLACEHOLDER = "<|audio_bos|><|AUDIO|><|audio_eos|>"

IGNORE_INDEX = -100

#: Keys padded along the sequence dimension when the two views are concatenated (value used for padding).
_SEQ_KEYS = {"input_ids": None, "attention_mask": 0, "token_type_ids": 0}


def feature_tensor(value: Any) -> Tensor:
    """A processor's audio output as a model input: float32 for features, bool kept bool (a boolean mask such as
    Granite-Speech's ``input_features_mask`` selects rows, as int64 it would index them; Gemma-3n's is inverted
    with ``~``), other integers int64."""
    array = np.asarray(value)
    if array.dtype.kind == "f":
        return torch.as_tensor(array, dtype=torch.float32)
    return torch.as_tensor(array, dtype=torch.bool if array.dtype.kind == "b" else torch.long)


def token_rows(encoded: Mapping[str, Any]) -> list[list[int]]:
    """A processor's ``input_ids`` as unpadded rows: positions its ``attention_mask`` marks 0 are dropped, so a
    processor that pads text by default (Audio Flamingo 3 pads on the left) adds no pad tokens to a prompt."""
    mask = encoded.get("attention_mask")
    if mask is None:
        return [list(map(int, ids)) for ids in encoded["input_ids"]]
    return [[int(i) for i, m in zip(ids, keep, strict=True) if m]
            for ids, keep in zip(encoded["input_ids"], mask, strict=True)]


# ----------------------------------------------------------------------------------------------------------------------
# Prompt building
# ----------------------------------------------------------------------------------------------------------------------


def build_prompts(
    tokenizer: Any, instruction: str, pseudo_gt: str, *, with_audio: bool, use_chat_template: bool | None = None,
    family: Any = None,
) -> tuple[str, str]:
    """Render ``(prompt_text, target_text)`` for one view of one example.

    The prompt ends where the target starts, so that the target can be tokenized on its own and appended: its token
    ids are then identical in every view, whatever the prompt.

    - Chat format (``use_chat_template=True``, or ``None`` and the tokenizer has a ``chat_template``): one user turn
      whose content is ``placeholder + "\\n" + instruction`` (placeholder only when ``with_audio``) or, for families
      whose chat template places the audio, ``[{"type": "audio"}, {"type": "text", "text": instruction}]``; the prompt
      is rendered with ``add_generation_prompt=True``, and the target is what the template appends for an assistant
      turn holding ``pseudo_gt`` (e.g. ``"pseudo_gt<|im_end|>"``), trailing newlines removed. If the template does not
      render the prompt as a prefix of the full conversation, the target falls back to ``pseudo_gt + eos_token``.
    - Plain format: prompt ``[placeholder] + instruction + "\\n"`` (prefixed with ``bos_token`` when the
      tokenizer has one), target ``pseudo_gt + eos_token`` (``eos_token`` only when the tokenizer has one).

    Args:
        tokenizer: a Hugging Face tokenizer.
        instruction: the task instruction (may be empty).
        pseudo_gt: the Stage-1 target.
        with_audio: put the audio placeholder in the prompt.
        use_chat_template: force (True) / forbid (False) the chat template; ``None`` = use it when present.
        family: the model family (:mod:`caad.models`) whose audio placeholder is used; default Qwen2-Audio.

    Returns:
        ``(prompt, target)`` strings, to be tokenized with ``add_special_tokens=False``.
    """
    family = family_of(family if family is not None else "qwen2_audio")
    eos = getattr(tokenizer, "eos_token", None) or ""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if use_chat_template is None:
        use_chat_template = has_template
    if use_chat_template:
        if not has_template:
            raise ValueError("use_chat_template=True but the tokenizer has no chat_template")
        if not with_audio:
            content: Any = instruction
        elif family.chat_audio_item:
            content = [{"type": "audio"}, {"type": "text", "text": instruction}]
        else:
            content = f"{family.audio_placeholder}\n{instruction}"
        user = [{"role": "user", "content": content}]
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            user + [{"role": "assistant", "content": pseudo_gt}], tokenize=False, add_generation_prompt=False
        )
        if full.startswith(prompt) and len(full) > len(prompt):
            # The trailing newline after the end-of-turn marker is template layout, not something to distil.
            return prompt, full[len(prompt) :].rstrip("\n")
        return prompt, pseudo_gt + eos
    bos = getattr(tokenizer, "bos_token", None) or ""
    prompt = f"{bos}{family.audio_placeholder if with_audio else ''}{instruction}\n"
    return prompt, pseudo_gt + eos


# ----------------------------------------------------------------------------------------------------------------------
# Collator
# ----------------------------------------------------------------------------------------------------------------------


class DualViewCollator:
    """Collate examples into an audio view and a text-only view of the same Pseudo-GT target.

    Each example is a mapping with ``audio`` (1-D float ``np.ndarray`` at the processor's sampling rate, or a
    Hugging Face ``{"array", "sampling_rate"}`` dict), ``instruction`` (str) and ``pseudo_gt`` (non-empty str).

    Output of ``collator(examples)`` (B examples, L = common padded length, F = mel frames, M = mel bins)::

        {
          "audio_view": {input_ids [B, L] int64, attention_mask [B, L] int64,
                         input_features [B, M, F] float32, feature_attention_mask [B, F] int64, labels [B, L] int64},
          "text_view":  {input_ids, attention_mask, labels  (+ input_features, feature_attention_mask for "silence")},
          "target_ids": [N_tgt] int64  (all examples' target tokens, example-major),
          "target_lengths": [B] int64,
        }

    Both views are right-padded to the same ``L`` (see the module docstring). ``labels`` hold the input id on target
    tokens and ``-100`` elsewhere; the logits at ``i`` predict ``labels[:, i + 1]``. The student trains on
    ``batch["audio_view"]``.

    Args:
        processor: the model family's processor (``Qwen2AudioProcessor``, ``AudioFlamingo3Processor``, ...: one
            taking ``text=``, ``audio=``, ``sampling_rate=`` that expands the family's audio token and returns its
            ``feature_keys``; see :mod:`caad.models`), or one that takes audio only through its chat template (the
            real ``VoxtralProcessor``): its family's :class:`~caad.models.ChatEncoder` then encodes the user turns
            and targets, with the same layout and invariants.
        text_only_view: ``"drop"`` (no audio at all) or ``"silence"`` (zeros of the audio's length).
        max_length: if set, the target is truncated from the right so that every row fits in ``max_length`` tokens
            (the same number of target tokens is kept in both views); a prompt that alone fills ``max_length`` is
            an error, because cutting the prompt would cut audio tokens.
        use_chat_template: see :func:`build_prompts`.
        family: the model family; default: the processor's (an unsupported processor is refused, naming the
            supported families).
    """

    def __init__(
        self,
        processor: Any,
        *,
        text_only_view: Literal["drop", "silence"] = "drop",
        max_length: int | None = None,
        use_chat_template: bool | None = None,
        family: Any = None,
    ) -> None:
        if text_only_view not in ("drop", "silence"):
            raise ValueError(f"text_only_view must be 'drop' or 'silence', got {text_only_view!r}")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be >= 2 (one prompt token and one target token), got {max_length}")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.text_only_view = text_only_view
        self.max_length = max_length
        self.use_chat_template = use_chat_template
        self.sampling_rate = int(processor.feature_extractor.sampling_rate)
        self.family = family_of(family if family is not None else processor)
        # A processor that takes audio only through its chat template (the real VoxtralProcessor) encodes whole
        # turns itself; every other one takes prompts rendered by build_prompts.
        self.chat_encoder = chat_encoder_of(processor)
        if self.chat_encoder is not None and use_chat_template is False:
            raise ValueError(f"use_chat_template=False, but the {type(processor).__name__} takes audio only through "
                             "its chat template")
        self.audio_token_id = self.tokenizer.convert_tokens_to_ids(self.family.audio_token)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        if pad is None or pad == self.audio_token_id:
            # Padding is masked out, but it must never be counted as an audio token by the model's merge.
            pad = 0 if self.audio_token_id != 0 else 1
        self.pad_token_id = int(pad)

    # -- input checks ---------------------------------------------------------------------------------------------

    def _check_example(self, idx: int, ex: Any) -> tuple[np.ndarray, str, str]:
        if not isinstance(ex, Mapping):
            raise TypeError(f"example {idx}: expected a dict with 'audio', 'instruction', 'pseudo_gt', got {type(ex)}")
        pseudo_gt = ex.get("pseudo_gt")
        if pseudo_gt is None:
            raise ValueError(
                f"example {idx} has no 'pseudo_gt': CAAD needs a target for every example; "
                "run Stage 1 (`caad pseudo-gt`) first"
            )
        if not isinstance(pseudo_gt, str) or not pseudo_gt.strip():
            raise ValueError(f"example {idx}: 'pseudo_gt' must be a non-empty str, got {pseudo_gt!r}")
        instruction = ex.get("instruction", "")
        if not isinstance(instruction, str):
            raise TypeError(f"example {idx}: 'instruction' must be a str, got {type(instruction)}")
        if "audio" not in ex or ex["audio"] is None:
            raise ValueError(f"example {idx} has no 'audio'")
        audio = ex["audio"]
        if isinstance(audio, Mapping):
            sr = audio.get("sampling_rate", self.sampling_rate)
            if int(sr) != self.sampling_rate:
                raise ValueError(
                    f"example {idx}: audio sampling_rate {sr} != processor sampling rate {self.sampling_rate}"
                )
            audio = audio.get("array")
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1 or audio.size == 0:
            raise ValueError(f"example {idx}: 'audio' must be a non-empty 1-D (mono) array, got shape {audio.shape}")
        return audio, instruction, pseudo_gt

    # -- building -------------------------------------------------------------------------------------------------

    def _encode_prompts(self, prompts: list[str], audios: list[np.ndarray] | None) -> dict[str, Any]:
        """Token ids (lists, unpadded) for rendered prompts, plus features when ``audios`` is given."""
        if audios is None:
            enc = self.tokenizer(prompts, add_special_tokens=False)
            return {"input_ids": [list(x) for x in enc["input_ids"]]}
        enc = self.processor(text=prompts, audio=audios, sampling_rate=self.sampling_rate, add_special_tokens=False)
        return self._with_features(enc)

    def _encode_turns(self, instructions: list[str], audios: list[np.ndarray] | None) -> dict[str, Any]:
        """The same for a processor that takes audio only through its chat template: whole user turns through the
        family's chat encoder."""
        enc = self.chat_encoder.prompts(instructions, audios)
        return self._with_features(enc) if audios is not None else {"input_ids": token_rows(enc)}

    def _with_features(self, enc: Mapping[str, Any]) -> dict[str, Any]:
        """Unpadded ids and the family's feature tensors of an audio encoding; every prompt must hold audio."""
        out: dict[str, Any] = {"input_ids": token_rows(enc)}
        for key in self.family.feature_keys:
            out[key] = feature_tensor(enc[key])
        for i, ids in enumerate(out["input_ids"]):
            if self.audio_token_id not in ids:
                raise ValueError(f"example {i}: the processor did not insert any audio token in the prompt")
        return out

    def _render(self, checked: list[tuple[np.ndarray, str, str]]) -> tuple[list[str], list[str], list[str]]:
        """``(audio-view prompts, text-view prompts, targets)`` rendered by :func:`build_prompts`."""
        a_prompts, t_prompts, targets = [], [], []
        for _, instruction, pseudo_gt in checked:
            ap, tgt = build_prompts(
                self.tokenizer, instruction, pseudo_gt, with_audio=True, use_chat_template=self.use_chat_template,
                family=self.family,
            )
            # "silence" keeps the audio prompt (placeholder + zeros); "drop" removes the placeholder entirely.
            tp, tgt_t = build_prompts(
                self.tokenizer,
                instruction,
                pseudo_gt,
                with_audio=self.text_only_view == "silence",
                use_chat_template=self.use_chat_template,
                family=self.family,
            )
            assert tgt == tgt_t  # the target text never depends on the prompt
            a_prompts.append(ap)
            t_prompts.append(tp)
            targets.append(tgt)
        return a_prompts, t_prompts, targets

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Collate ``examples``; see the class docstring for the output layout."""
        if len(examples) == 0:
            raise ValueError("DualViewCollator got an empty list of examples")
        checked = [self._check_example(i, ex) for i, ex in enumerate(examples)]
        audios = [a for a, _, _ in checked]

        silence = [np.zeros_like(a) for a in audios] if self.text_only_view == "silence" else None
        if self.chat_encoder is None:
            a_prompts, t_prompts, targets = self._render(checked)
            a_enc, t_enc = self._encode_prompts(a_prompts, audios), self._encode_prompts(t_prompts, silence)
            # The target is tokenized once and appended to both prompts: identical ids in both views.
            tgt_ids = [list(x) for x in self.tokenizer(targets, add_special_tokens=False)["input_ids"]]
        else:  # the chat encoder encodes the user turns and the targets itself
            instructions = [instruction for _, instruction, _ in checked]
            a_enc, t_enc = self._encode_turns(instructions, audios), self._encode_turns(instructions, silence)
            tgt_ids = self.chat_encoder.targets([pseudo_gt for _, _, pseudo_gt in checked])

        for i, (pa, pt, tg) in enumerate(zip(a_enc["input_ids"], t_enc["input_ids"], tgt_ids, strict=True)):
            if len(tg) == 0:
                raise ValueError(f"example {i}: 'pseudo_gt' tokenizes to no tokens")
            if self.max_length is not None:
                room = self.max_length - max(len(pa), len(pt))
                if room < 1:
                    raise ValueError(
                        f"example {i}: the prompt is {max(len(pa), len(pt))} tokens (audio tokens included), "
                        f"which leaves no room for the target within max_length={self.max_length}"
                    )
                tgt_ids[i] = tg[:room]

        rows_a = [(p, t) for p, t in zip(a_enc["input_ids"], tgt_ids, strict=True)]
        rows_t = [(p, t) for p, t in zip(t_enc["input_ids"], tgt_ids, strict=True)]
        length = max(len(p) + len(t) for p, t in rows_a + rows_t)
        audio_view = self._pad_rows(rows_a, length)
        audio_view.update({k: a_enc[k] for k in self.family.feature_keys})
        text_view = self._pad_rows(rows_t, length)
        if self.text_only_view == "silence":
            text_view.update({k: t_enc[k] for k in self.family.feature_keys})
        return {
            "audio_view": audio_view,
            "text_view": text_view,
            "target_ids": torch.tensor([t for tg in tgt_ids for t in tg], dtype=torch.long),
            "target_lengths": torch.tensor([len(tg) for tg in tgt_ids], dtype=torch.long),
        }

    def _pad_rows(self, rows: list[tuple[list[int], list[int]]], length: int) -> dict[str, Tensor]:
        """Right-pad ``prompt + target`` rows to ``length``; labels are -100 except on the target tokens."""
        n = len(rows)
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, length), dtype=torch.long)
        labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
        for b, (prompt, target) in enumerate(rows):
            p, t = len(prompt), len(target)
            input_ids[b, :p] = torch.tensor(prompt, dtype=torch.long)
            input_ids[b, p : p + t] = torch.tensor(target, dtype=torch.long)
            attention_mask[b, : p + t] = 1
            labels[b, p : p + t] = torch.tensor(target, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class PairedViewCollator:
    """The student's views and, under ``"teacher"``, the teacher's own views of the same examples, for a teacher
    whose processor renders inputs differently (another family, feature extractor or chat template) but shares the
    student's tokenizer: the target tokens, and so the gathered rows, are then the same in both (checked).

    Output: ``student(examples)`` plus ``"teacher": {"audio_view": ..., "text_view": ...}`` from ``teacher``.
    """

    def __init__(self, student: DualViewCollator, teacher: DualViewCollator) -> None:
        self.student, self.teacher = student, teacher

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        batch = self.student(examples)
        theirs = self.teacher(examples)
        if not torch.equal(batch["target_ids"], theirs["target_ids"]):
            raise ValueError(
                f"the teacher's processor ({self.teacher.family.name}) renders other target tokens than the "
                f"student's ({self.student.family.name}): {theirs['target_ids'].numel()} vs "
                f"{batch['target_ids'].numel()} tokens; their chat templates must close an assistant turn alike")
        batch["teacher"] = {"audio_view": theirs["audio_view"], "text_view": theirs["text_view"]}
        return batch


def _settings_text(feature_extractor: Any) -> str:
    """A feature extractor's settings as canonical JSON: a dict holding arrays (Gemma-3n's per-bin normalisation,
    Whisper's mel filters) cannot be compared with ``==``; stand-ins (Granite's) only have ``to_dict``."""
    import json

    return json.dumps(feature_extractor.to_dict(), sort_keys=True, default=lambda x: np.asarray(x).tolist())


def needs_own_views(student_processor: Any, teacher_processor: Any) -> bool:
    """Whether a teacher's processor would render other model inputs than the student's."""
    if family_of(student_processor) is not family_of(teacher_processor):
        return True
    s_fe, t_fe = student_processor.feature_extractor, teacher_processor.feature_extractor
    same_audio = type(s_fe) is type(t_fe) and _settings_text(s_fe) == _settings_text(t_fe)
    same_chat = (getattr(student_processor.tokenizer, "chat_template", None)
                 == getattr(teacher_processor.tokenizer, "chat_template", None))
    return not (same_audio and same_chat)


# ----------------------------------------------------------------------------------------------------------------------
# Gather and teacher forward
# ----------------------------------------------------------------------------------------------------------------------


def _labels_of(labels: Tensor | Mapping[str, Any]) -> Tensor:
    """Accept a label tensor, a view dict (``{"labels": ...}``) or a collated batch (uses the audio view)."""
    if isinstance(labels, Tensor):
        return labels
    if isinstance(labels, Mapping):
        if "labels" in labels:
            return labels["labels"]
        if "audio_view" in labels:
            return labels["audio_view"]["labels"]
    raise TypeError(f"labels must be a Tensor, a view dict or a DualViewCollator batch, got {type(labels)}")


def gather_targets(
    logits: Tensor, labels: Tensor | Mapping[str, Any], *, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor]:
    """Shifted gather of the rows that predict target tokens.

    Row ``k`` of the output is ``logits[b, i]`` for the k-th (example-major, position-minor) pair with
    ``labels[b, i + 1] != ignore_index``, and the returned ids are those ``labels[b, i + 1]``.

    Args:
        logits: ``[B, L, V]`` (any float dtype; also works on hidden states ``[B, L, H]``).
        labels: ``[B, L]`` int64 with ``ignore_index`` off-target, or a view dict / collated batch (audio view).
        ignore_index: the label value of non-target positions.

    Returns:
        ``(rows [N_tgt, V] in logits.dtype, target_ids [N_tgt] int64)``.
    """
    labels = _labels_of(labels)
    if logits.dim() != 3 or labels.dim() != 2 or tuple(logits.shape[:2]) != tuple(labels.shape):
        raise ValueError(
            f"gather_targets expects logits [B, L, V] and labels [B, L]; got logits {tuple(logits.shape)} "
            f"and labels {tuple(labels.shape)}"
        )
    shifted = labels[:, 1:].to(logits.device)
    mask = shifted != ignore_index
    return logits[:, :-1][mask], shifted[mask]


def _pad_seq(x: Tensor, length: int, value: int) -> Tensor:
    if x.shape[1] == length:
        return x
    pad = x.new_full((x.shape[0], length - x.shape[1], *x.shape[2:]), value)
    return torch.cat([x, pad], dim=1)  # right padding: real tokens keep their positions


def _concat_views(audio_view: Mapping[str, Any], text_view: Mapping[str, Any], pad_id: int) -> dict[str, Any]:
    """Stack audio-view rows then text-view rows into one model input (labels excluded).

    Sequence tensors are right-padded to a common length. Other tensors (audio features) present in both views are
    concatenated along the batch dim; present only in the audio view ("drop"), they are passed as they are: the
    model then has features for the audio-view rows only, which is exactly how Qwen2-Audio consumes them (its
    ``input_features`` are matched, in order, to the ``<|AUDIO|>`` tokens of the whole batch, and the text rows
    have none).
    """
    length = max(audio_view["input_ids"].shape[1], text_view["input_ids"].shape[1])
    inputs: dict[str, Any] = {}
    for key, val in audio_view.items():
        if key == "labels" or not isinstance(val, Tensor):
            continue
        other = text_view.get(key)
        if key in _SEQ_KEYS:
            if other is None:
                raise ValueError(f"text_view lacks {key!r}, which audio_view has")
            fill = pad_id if _SEQ_KEYS[key] is None else _SEQ_KEYS[key]
            inputs[key] = torch.cat([_pad_seq(val, length, fill), _pad_seq(other.to(val.device), length, fill)])
        elif other is None:
            inputs[key] = val
        else:
            if tuple(val.shape[1:]) != tuple(other.shape[1:]):
                raise ValueError(
                    f"{key!r} has shape {tuple(val.shape)} in audio_view but {tuple(other.shape)} in text_view; "
                    "the two views must share the feature layout to be batched"
                )
            inputs[key] = torch.cat([val, other.to(val.device)])
    for key in text_view:
        if key != "labels" and key not in audio_view and isinstance(text_view[key], Tensor):
            raise ValueError(f"text_view has {key!r} but audio_view does not; cannot batch the two views")
    return inputs


def _default_pad_id(model: Any) -> int:
    cfg = getattr(model, "config", None)
    pad = getattr(cfg, "pad_token_id", None)
    if pad is None:
        pad = getattr(getattr(cfg, "text_config", None), "pad_token_id", None)
    audio_id = getattr(cfg, "audio_token_id", None)
    if pad is None or pad == audio_id:
        pad = 0 if audio_id != 0 else 1
    return int(pad)


def _supports_head_on_targets(model: Any) -> bool:
    # Only for families whose forward is known to be exactly `head(base_model(...).last_hidden_state)`, so that
    # applying the head to the gathered hidden states is identical (no soft-capping or scaling in between).
    family = family_or_none(model)
    return family is not None and family.head_on_targets


def head_on_targets_refusal(model: Any) -> str | None:
    """Why the LM head of ``model`` cannot be applied to gathered hidden states in place of its logits (what the
    fused-linear loss and ``head_on_targets_only`` do), or ``None`` when nothing is known against it.

    Refused: a model whose text config soft-caps the logits (``final_logit_softcapping``, e.g. Gemma-3n), and a
    model of a family (:mod:`caad.models`) declared with ``head_on_targets=False``; the reason names the family
    and the class. A model of no known family without soft-capping is not refused here.
    """
    family = family_or_none(model)
    config = getattr(model, "config", None)
    cap = getattr(text_config(config), "final_logit_softcapping", None)
    if not cap and (family is None or family.head_on_targets):
        return None
    who = f"{family.name} ({type(model).__name__})" if family is not None else type(model).__name__
    if cap:
        return (f"{who} soft-caps its logits after the LM head (logits = {cap:g} * tanh(lm_head(h) / {cap:g}), "
                f"final_logit_softcapping={cap:g}), so they are not lm_head(hidden states)")
    return (f"{who} transforms its logits after the LM head (caad.models: head_on_targets=False), so they are not "
            "lm_head(hidden states)")


def fused_linear_refusal(model: Any, role: str) -> str | None:
    """The error message for ``fused_linear=True`` with ``model`` as ``role`` ("the student", "the teacher"), or
    ``None`` if :func:`head_on_targets_refusal` has nothing against it."""
    reason = head_on_targets_refusal(model)
    if reason is None:
        return None
    return (f"fused_linear=True: {role}, {reason}; the fused-linear loss applies the LM head to the gathered hidden "
            "states and cannot reproduce that: use the logits path (fused_linear=False, the default)")


def _base_and_head(model: Any) -> tuple[Any, Any]:
    """The model that maps inputs (audio included) to final hidden states, and the LM head."""
    return model.base_model, model.get_output_embeddings()


def _stacked_inputs(model: Any, batch: Mapping[str, Any]) -> tuple[dict[str, Any], Tensor, int]:
    """Both views stacked into one model input (audio rows first), their labels, and B."""
    audio_view, text_view = batch["audio_view"], batch["text_view"]
    a_labels, t_labels = audio_view["labels"], text_view["labels"]
    n = a_labels.shape[0]
    if t_labels.shape[0] != n:
        raise ValueError(f"audio_view has {n} rows but text_view has {t_labels.shape[0]}")
    inputs = _concat_views(audio_view, text_view, _default_pad_id(model))
    length = inputs["input_ids"].shape[1]
    device = getattr(model, "device", None)
    if device is not None:
        inputs = {k: v.to(device) for k, v in inputs.items()}
    labels = torch.cat([_pad_seq(a_labels, length, IGNORE_INDEX), _pad_seq(t_labels, length, IGNORE_INDEX)])

    return inputs, labels, n


def _check_same_targets(a_ids: Tensor, t_ids: Tensor) -> None:
    if not torch.equal(a_ids, t_ids):
        raise ValueError(
            "the audio view and the text-only view do not have the same target tokens "
            f"({a_ids.numel()} vs {t_ids.numel()} tokens); build the batch with DualViewCollator"
        )


def _audio_view_inputs(model: Any, batch: Mapping[str, Any]) -> tuple[dict[str, Any], Tensor, int]:
    """The audio view alone as a model input (for ``with_text=False``), its labels, and B."""
    audio_view = batch["audio_view"]
    inputs = {k: v for k, v in audio_view.items() if k != "labels" and isinstance(v, Tensor)}
    device = getattr(model, "device", None)
    if device is not None:
        inputs = {k: v.to(device) for k, v in inputs.items()}
    return inputs, audio_view["labels"], audio_view["labels"].shape[0]


@torch.no_grad()
def teacher_hidden_both_views(model: Any, batch: Mapping[str, Any], *,
                              with_text: bool = True) -> tuple[Tensor, Tensor | None, Tensor]:
    """Like :func:`teacher_forward_both_views`, but returns the teacher's final hidden states at the target
    positions instead of logits, for the fused-linear loss (no ``[N, V]`` teacher logits at all).

    Returns:
        ``(audio_hidden [N_tgt, H], text_hidden [N_tgt, H], target_ids [N_tgt])``; the head is ``model.lm_head``.
    """
    refusal = fused_linear_refusal(model, "the teacher")
    if refusal is not None:
        raise ValueError(refusal)
    if not _supports_head_on_targets(model):
        raise ValueError(
            f"{type(model).__name__}: the fused-linear path needs a family whose logits are head(base_model(...)) "
            "(caad.models: head_on_targets); use the logits path")
    inputs, labels, n = _stacked_inputs(model, batch) if with_text else _audio_view_inputs(model, batch)
    base, _ = _base_and_head(model)
    hidden = base(**inputs, use_cache=False).last_hidden_state  # [2B, L, H] ([B, L, H] audio only)
    a_rows, a_ids = gather_targets(hidden[:n], labels[:n])
    if not with_text:
        return a_rows, None, a_ids
    t_rows, t_ids = gather_targets(hidden[n:], labels[n:])
    _check_same_targets(a_ids, t_ids)
    return a_rows, t_rows, a_ids


@torch.no_grad()
def teacher_forward_both_views(
    model: Any, batch: Mapping[str, Any], *, head_on_targets_only: bool | None = None, with_text: bool = True
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Teacher-force both views of ``batch`` in ONE batched forward and gather the target rows.

    The audio-view rows ``[0, B)`` and text-view rows ``[B, 2B)`` are stacked (right-padded to a common length; the
    collator already pads both views to one length). In "drop" mode only the audio-view rows have features, and
    only those are passed: the model's audio encoder then runs on B audios, not 2B. Put the teacher in ``eval()``
    mode first (dropout would otherwise make the two paths noisy).

    Args:
        model: the teacher (e.g. ``Qwen2AudioForConditionalGeneration``).
        batch: the output of :class:`DualViewCollator` (``audio_view`` and ``text_view`` with ``labels``).
        head_on_targets_only: compute hidden states for the whole batch but apply the LM head only to the gathered
            target rows, so the ``[2B, L, V]`` logits never exist (saves memory for large V). ``None`` = use it for
            families where it is exact (:mod:`caad.models`, ``head_on_targets``); ``True`` requires
            ``model.base_model`` and ``model.get_output_embeddings()``, and is refused for a model whose logits are
            not the head's output (:func:`head_on_targets_refusal`: e.g. Gemma-3n's soft-capped logits).
        with_text: ``False`` runs the audio view only (B rows, not 2B) and returns None for the text logits: what
            a loss with ``alpha=0`` needs.

    Returns:
        ``(teacher_audio_logits [N_tgt, V], teacher_text_logits [N_tgt, V], target_ids [N_tgt] int64)``, the logits in
        the model's dtype; rows in the same order as ``gather_targets(student_logits, batch["audio_view"]["labels"])``.
    """
    inputs, labels, n = _stacked_inputs(model, batch) if with_text else _audio_view_inputs(model, batch)

    if head_on_targets_only is None:
        head_on_targets_only = _supports_head_on_targets(model)
    elif head_on_targets_only and (reason := head_on_targets_refusal(model)) is not None:
        raise ValueError(f"head_on_targets_only=True: {reason}; leave head_on_targets_only=None (the default)")
    if head_on_targets_only:
        base, head = _base_and_head(model)
        hidden = base(**inputs, use_cache=False).last_hidden_state  # [2B, L, H]
        a_rows, a_ids = gather_targets(hidden[:n], labels[:n])
        if not with_text:
            return head(a_rows), None, a_ids
        t_rows, t_ids = gather_targets(hidden[n:], labels[n:])
        a_logits, t_logits = head(a_rows), head(t_rows)
    else:
        logits = model(**inputs, use_cache=False).logits  # [2B, L, V]
        a_logits, a_ids = gather_targets(logits[:n], labels[:n])
        if not with_text:
            return a_logits, None, a_ids
        t_logits, t_ids = gather_targets(logits[n:], labels[n:])
    _check_same_targets(a_ids, t_ids)
    return a_logits, t_logits, a_ids
