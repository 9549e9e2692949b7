"""Granite-Speech (``GraniteSpeechForConditionalGeneration``, ``GraniteSpeechProcessor``): a Conformer CTC encoder
over stacked log-mel frames, a windowed Q-Former projector and a Granite decoder.

Audio path, as transformers (5.25) implements it:

- features: 80-bin log10-mel spectrogram (``n_fft`` 512, 400-sample Hann window, hop 160, power 2, centred
  reflect-padded STFT), floored at ``max - 8`` per clip and mapped by ``x / 4 + 1``; an odd last frame is dropped
  and consecutive frame pairs are concatenated, so ``input_features`` is ``[B, T // 2, 160]``;
- ``<|audio|>`` expands into ``ceil((S // hop + 1) // 2 / window) * (window // downsample)`` tokens for a clip of
  ``S`` samples (``window`` 15 encoder frames per Q-Former block, ``downsample`` 5: 3 queries per block), and
  ``input_features_mask [B, N]`` (bool) marks each clip's first ``n_b`` of the ``N`` projector outputs of the
  batch's longest clip; the model keeps ``audio_embeds[input_features_mask]``;
- logits: ``lm_head(model(...).last_hidden_state)``, the Granite decoder's hidden states and nothing after them.
  Unlike ``GraniteForCausalLM``, transformers 5.x's Granite-Speech does **not** divide by
  ``text_config.logits_scaling`` (its 4.x version ran a ``GraniteForCausalLM`` and did), so the head may be applied
  to the target rows only (``head_on_targets``). The tiny model sets ``logits_scaling = 4`` so that the dual-view
  tests, which compare that path with ``model(...).logits``, fail on a version that divides again.

Why a stand-in processor: ``GraniteSpeechFeatureExtractor`` computes its mel spectrogram with torchaudio (its
constructor requires it), and no torchaudio wheel matches this project's torch (2.13), so the real processor
cannot be built on the test machine. :class:`GraniteAudioProcessor` over :class:`GraniteLogMel` reproduces the
audio path above with torch alone (``torch.stft`` and the HTK mel filter bank of
``transformers.audio_utils.mel_filter_bank``, the same triangles torchaudio builds). Differences from the real
processor:

- text is tokenized unpadded (lists of ids), the way the collator and decoding expect prompts; the real one pads
  the batch (``padding=True`` by default) and returns tensors;
- the features come back as float32 on the CPU (no ``device=`` argument), the filter bank's float32 rounding may
  differ from torchaudio's in the last bits, and ``audio_embed_sizes`` is returned as a list like the real one's;
- the tokenizer is caad's offline byte-level BPE with Granite's chat tokens, under a minimal Granite 3.x chat
  template (default system turn "You are a helpful assistant.", no date or knowledge-cutoff lines);
- it saves ``preprocessor_config.json`` in the real extractor's field names and marks the folder as a stand-in
  (:data:`caad.models.STAND_IN_MARKER`), so caad loads it back through this class, never as a bare tokenizer.

As in the real model, the Conformer has no padding mask: in a batch of clips of different lengths, a short clip's
encoding sees the padded frames of its last attention block (batched and separate forwards agree only for the
same padding). Real checkpoints also carry a LoRA adapter that ``generate`` enables only when audio is given;
caad's batched dual-view forward runs both views through the model as loaded (adapter as it is), so with such a
checkpoint the text-only view is not the adapter-off path that Granite's own text-only generation takes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import AudioFamily, StandInProcessor

AUDIO = "<|audio|>"
START_OF_ROLE = "<|start_of_role|>"
END_OF_ROLE = "<|end_of_role|>"
END_OF_TEXT = "<|end_of_text|>"

#: Q-Former window (encoder frames per block) and downsampling (window // downsample queries per block), the real
#: checkpoints' values; the feature extractor and the model config must agree on both.
PROJECTOR_WINDOW = 15
PROJECTOR_DOWNSAMPLE = 5

# Granite 3.x chat layout (role markers, <|end_of_text|> closing each turn), minimal: a default system turn and the
# user's string content as is, where the audio placeholder sits (Granite-Speech's examples put "<|audio|>" there).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|start_of_role|>system<|end_of_role|>You are a helpful assistant.<|end_of_text|>\n"
    "{% endif %}"
    "<|start_of_role|>{{ message['role'] }}<|end_of_role|>{{ message['content'] }}<|end_of_text|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_of_role|>assistant<|end_of_role|>{% endif %}"
)


def audio_token_counts(lengths: Sequence[int], *, hop_length: int = 160, window: int = PROJECTOR_WINDOW,
                       downsample: int = PROJECTOR_DOWNSAMPLE) -> list[int]:
    """Audio tokens per clip of ``lengths[b]`` samples: mel frames ``S // hop + 1``, halved by the frame-pair
    stacking, cut into Q-Former blocks of ``window`` encoder frames (the last one padded), ``window // downsample``
    tokens per block."""
    counts = []
    for samples in lengths:
        encoder_frames = (int(samples) // hop_length + 1) // 2
        counts.append(math.ceil(encoder_frames / window) * (window // downsample))
    return counts


class GraniteLogMel:
    """Granite-Speech's feature extractor in torch alone (see the module docstring).

    ``extractor(audios)`` takes a list of 1-D float waveforms (``B`` clips, ``S_b`` samples, zero-padded to the
    longest ``S``) and returns ``{"input_features": [B, T // 2, 2 * n_mels] float32 Tensor,
    "audio_embed_sizes": list of B ints, "input_features_mask": [B, max(audio_embed_sizes)] bool Tensor}`` with
    ``T = S // hop_length + 1`` mel frames (an odd last one dropped).
    """

    #: Saved under this name, with the real extractor's constructor fields.
    real_class = "GraniteSpeechFeatureExtractor"

    def __init__(self, sampling_rate: int = 16000, n_fft: int = 512, win_length: int = 400, hop_length: int = 160,
                 n_mels: int = 80, projector_window_size: int = PROJECTOR_WINDOW,
                 projector_downsample_rate: int = PROJECTOR_DOWNSAMPLE, padding_value: float = 0.0) -> None:
        if win_length > n_fft:
            raise ValueError(f"win_length ({win_length}) must not exceed n_fft ({n_fft})")
        self.sampling_rate, self.n_fft, self.win_length = int(sampling_rate), int(n_fft), int(win_length)
        self.hop_length, self.n_mels = int(hop_length), int(n_mels)
        self.projector_window_size, self.projector_downsample_rate = projector_window_size, projector_downsample_rate
        self.padding_value = float(padding_value)
        self._filters: Any = None

    def to_dict(self) -> dict[str, Any]:
        """The constructor fields (what :meth:`save_pretrained` writes, and what two extractors compare on)."""
        return {"sampling_rate": self.sampling_rate, "n_fft": self.n_fft, "win_length": self.win_length,
                "hop_length": self.hop_length, "n_mels": self.n_mels,
                "projector_window_size": self.projector_window_size,
                "projector_downsample_rate": self.projector_downsample_rate, "padding_value": self.padding_value}

    def mel_filters(self) -> Any:
        """The HTK-scale triangular filter bank, ``[n_fft // 2 + 1, n_mels]`` float32 (no area normalisation)."""
        if self._filters is None:
            import torch
            from transformers.audio_utils import mel_filter_bank

            bank = mel_filter_bank(num_frequency_bins=self.n_fft // 2 + 1, num_mel_filters=self.n_mels,
                                   min_frequency=0.0, max_frequency=float(self.sampling_rate // 2),
                                   sampling_rate=self.sampling_rate, norm=None, mel_scale="htk")
            self._filters = torch.as_tensor(bank, dtype=torch.float32)
        return self._filters

    def log_mel(self, audio: Any) -> Any:
        """``[B, S]`` float waveforms -> ``[B, T // 2, 2 * n_mels]`` stacked, normalised log-mel frames."""
        import torch

        audio = torch.as_tensor(audio, dtype=torch.float32)
        window = torch.hann_window(self.win_length, periodic=True, dtype=torch.float32)
        stft = torch.stft(audio, n_fft=self.n_fft, hop_length=self.hop_length, win_length=self.win_length,
                          window=window, center=True, pad_mode="reflect", normalized=False, onesided=True,
                          return_complex=True)  # [B, n_fft // 2 + 1, T]
        power = stft.abs().pow(2)
        mel = torch.matmul(power.transpose(-1, -2), self.mel_filters())  # [B, T, n_mels]
        log_mel = mel.clamp(min=1e-10).log10()
        peak = log_mel.amax(dim=(-2, -1), keepdim=True)  # per clip of the padded batch
        log_mel = torch.maximum(log_mel, peak - 8.0) / 4 + 1
        frames = log_mel.shape[1] - log_mel.shape[1] % 2
        return log_mel[:, :frames].reshape(audio.shape[0], frames // 2, 2 * self.n_mels)

    def __call__(self, audios: Sequence[Any], **_: Any) -> dict[str, Any]:
        import torch

        clips = [torch.as_tensor(np.asarray(a), dtype=torch.float32).reshape(-1) for a in audios]
        if not clips:
            raise ValueError("no audio clips")
        lengths = [int(c.numel()) for c in clips]
        batch = torch.nn.utils.rnn.pad_sequence(clips, batch_first=True, padding_value=self.padding_value)
        counts = audio_token_counts(lengths, hop_length=self.hop_length, window=self.projector_window_size,
                                    downsample=self.projector_downsample_rate)
        mask = torch.arange(max(counts)).view(1, -1) < torch.tensor(counts).view(-1, 1)
        return {"input_features": self.log_mel(batch), "audio_embed_sizes": counts, "input_features_mask": mask}

    def save_pretrained(self, folder: Any) -> None:
        """Write ``preprocessor_config.json`` (the real extractor's type and constructor fields)."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        config = {"feature_extractor_type": self.real_class, **self.to_dict()}
        (Path(folder) / "preprocessor_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_pretrained(cls, folder: Any) -> GraniteLogMel:
        """Load what :meth:`save_pretrained` wrote (fields the constructor does not take are ignored)."""
        config = json.loads((Path(folder) / "preprocessor_config.json").read_text(encoding="utf-8"))
        names = cls().to_dict().keys()
        return cls(**{k: v for k, v in config.items() if k in names})


class GraniteAudioProcessor(StandInProcessor):
    """Granite-Speech's processor, audio and text (see the module docstring): ``__call__(text=, audio=,
    sampling_rate=)`` returns ``input_ids`` and ``attention_mask`` (unpadded lists), and with audio
    ``input_features [B, T // 2, 160]``, ``input_features_mask [B, N]`` (bool) and ``audio_embed_sizes``, the
    ``k``-th ``<|audio|>`` of the batch (in reading order) repeated once per audio token of clip ``k``."""

    audio_token = AUDIO

    def __call__(self, text: str | list[str], audio: Sequence[np.ndarray] | None = None,
                 sampling_rate: int | None = None, **kwargs: Any) -> dict[str, Any]:
        text = [text] if isinstance(text, str) else list(text)
        placeholders = sum(t.count(AUDIO) for t in text)
        out: dict[str, Any] = {}
        if audio is not None:
            if sampling_rate is not None and int(sampling_rate) != self.feature_extractor.sampling_rate:
                raise ValueError(f"audio at {sampling_rate} Hz, but Granite-Speech's features are computed at "
                                 f"{self.feature_extractor.sampling_rate} Hz; resample first")
            audio = [audio] if isinstance(audio, np.ndarray) and audio.ndim == 1 else list(audio)
            if placeholders != len(audio):
                raise ValueError(f"{len(audio)} audio clips for {placeholders} {AUDIO} placeholders")
            out = self.feature_extractor(audio)
            counts = iter(out["audio_embed_sizes"])
            expanded = []
            for t in text:
                parts = t.split(AUDIO)
                expanded.append(parts[0] + "".join(AUDIO * next(counts) + part for part in parts[1:]))
            text = expanded
        elif placeholders:
            raise ValueError(f"{placeholders} {AUDIO} placeholders but no audio")
        encoded = self.tokenizer(text, add_special_tokens=kwargs.get("add_special_tokens", True))
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], **out}

    @staticmethod
    def load_feature_extractor(folder: Any) -> GraniteLogMel:
        """The torch-only extractor's fields as :meth:`save_pretrained` wrote them."""
        return GraniteLogMel.from_pretrained(folder)


def build_tokenizer() -> Any:
    """caad's offline tokenizer (:func:`caad.tiny_models.build_tokenizer`) plus ``<|audio|>`` and Granite's chat
    tokens, ``<|end_of_text|>`` as eos (generation stops at the end of the assistant turn) and Granite's template."""
    from ..tiny_models import build_tokenizer as base_tokenizer

    tokenizer = base_tokenizer()
    tokenizer.add_tokens([AUDIO, START_OF_ROLE, END_OF_ROLE, END_OF_TEXT], special_tokens=True)
    tokenizer.eos_token = END_OF_TEXT
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny(*, hidden: int = 64, layers: int = 2, seed: int = 0) -> tuple[Any, Any]:
    """A random tiny Granite-Speech and :class:`GraniteAudioProcessor`: a Conformer encoder (``layers`` blocks,
    ``hidden`` wide, 2 heads, attention blocks of 32 frames), a 1-layer Q-Former (``hidden`` wide, 3 queries per
    15-frame window) and a Granite decoder (``hidden`` wide, ``layers`` deep, 4 heads / 2 key-value heads, untied
    head, ``logits_scaling`` 4: see the module docstring), all without dropout and without a LoRA adapter."""
    from transformers import GraniteSpeechConfig, GraniteSpeechForConditionalGeneration

    from ..tiny_models import SAMPLING_RATE, seeded_model

    if hidden <= 0 or hidden % 4:
        raise ValueError(f"hidden must be a positive multiple of 4 (4 attention heads), got {hidden}")
    if layers <= 0:
        raise ValueError(f"layers must be positive, got {layers}")
    tokenizer = build_tokenizer()
    extractor = GraniteLogMel(sampling_rate=SAMPLING_RATE)
    config = GraniteSpeechConfig(
        encoder_config={"input_dim": 2 * extractor.n_mels, "num_layers": layers, "hidden_dim": hidden,
                        "feedforward_mult": 2, "num_heads": 2, "output_dim": 8, "context_size": 32,
                        "max_pos_emb": 32, "dropout": 0.0, "conv_kernel_size": 5, "conv_expansion_factor": 2},
        projector_config={"model_type": "blip_2_qformer", "hidden_size": hidden, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "intermediate_size": 2 * hidden, "encoder_hidden_size": hidden,
                          "cross_attention_frequency": 1, "hidden_dropout_prob": 0.0,
                          "attention_probs_dropout_prob": 0.0, "max_position_embeddings": 64, "vocab_size": 2},
        text_config={"model_type": "granite", "vocab_size": len(tokenizer), "hidden_size": hidden,
                     "intermediate_size": 2 * hidden, "num_hidden_layers": layers, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "max_position_embeddings": 512, "tie_word_embeddings": False,
                     "logits_scaling": 4.0, "pad_token_id": tokenizer.pad_token_id,
                     "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.eos_token_id},
        audio_token_index=tokenizer.convert_tokens_to_ids(AUDIO),
        window_size=extractor.projector_window_size, downsample_rate=extractor.projector_downsample_rate,
        has_lora_adapter=False, tie_word_embeddings=False,
    )
    model = seeded_model(GraniteSpeechForConditionalGeneration, config, tokenizer, seed)
    return model, GraniteAudioProcessor(extractor, tokenizer)


FAMILY = AudioFamily(
    name="Granite-Speech",
    model_types=("granite_speech",),
    processor_classes=("GraniteSpeechProcessor", "GraniteAudioProcessor"),
    audio_placeholder=AUDIO,
    audio_token=AUDIO,
    feature_keys=("input_features", "input_features_mask"),
    chat_audio_item=False,  # "<|audio|>" in the user string, as Granite-Speech's examples write it
    head_on_targets=True,  # logits = lm_head(model.model(...).last_hidden_state), no logits_scaling (module doc)
    build_tiny=build_tiny,
    stand_in_processor=GraniteAudioProcessor,
)
