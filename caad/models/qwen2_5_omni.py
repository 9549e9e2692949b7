"""Qwen2.5-Omni's thinker (``Qwen2_5OmniThinkerForConditionalGeneration``, ``Qwen2_5OmniProcessor``): the
audio-language part of Qwen2.5-Omni (7B -> 3B share one tokenizer). Audio enters as Qwen2-Audio's placeholder;
positions are 3-D (multimodal RoPE), computed by the model from the token ids and the audio lengths.

``Qwen2_5OmniProcessor`` also carries an image and a video processor, and the video one needs torchvision,
which this project's CPU test machine cannot install beside its torch: the tests build the tiny model with
:class:`OmniAudioProcessor`, which reproduces the real processor's audio path (Whisper features padded to the
window, ``feature_attention_mask``, ``<|AUDIO|>`` expanded to the encoder's output length) and nothing else.

A released checkpoint folder (Qwen2.5-Omni-7B, -3B) holds the whole model, thinker and talker
(``model_type`` ``"qwen2_5_omni"``); caad loads only the thinker from it (``container_model_types``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import AudioFamily, StandInProcessor

AUDIO = "<|AUDIO|>"


def _audio_tokens(frames: np.ndarray) -> np.ndarray:
    """Audio tokens per clip from its mel frames (two stride-2 stages: conv, then pooling), as the real processor."""
    after_conv = (frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


class OmniAudioProcessor(StandInProcessor):
    """Qwen2.5-Omni's processor, audio and text only (see the module docstring): ``__call__(text=, audio=,
    sampling_rate=)`` returns ``input_ids``, ``attention_mask``, ``input_features [B, M, F]`` and
    ``feature_attention_mask [B, F]``, each prompt's ``<|AUDIO|>`` repeated once per audio token."""

    audio_token = AUDIO

    def __call__(self, text: list[str], audio: list[np.ndarray] | None = None, sampling_rate: int | None = None,
                 **kwargs: Any) -> dict[str, Any]:
        text = [text] if isinstance(text, str) else list(text)
        out: dict[str, Any] = {}
        if audio is not None:
            features = self.feature_extractor(audio, sampling_rate=sampling_rate, padding="max_length",
                                              return_attention_mask=True, return_tensors="np")
            mask = features["attention_mask"]
            out = {"input_features": features["input_features"], "feature_attention_mask": mask}
            counts = _audio_tokens(mask.sum(-1))
            if sum(t.count(AUDIO) for t in text) != len(audio):
                raise ValueError(f"{len(audio)} audio clips for {sum(t.count(AUDIO) for t in text)} {AUDIO} tokens")
            clips = iter(counts.tolist())
            text = ["".join(part + (AUDIO * next(clips) if i < t.count(AUDIO) else "")
                            for i, part in enumerate(t.split(AUDIO))) for t in text]
        encoded = self.tokenizer(text, add_special_tokens=kwargs.get("add_special_tokens", True))
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], **out}



def build_tiny(*, hidden: int = 64, layers: int = 2, seed: int = 0, chunk_length: int = 2) -> tuple[Any, Any]:
    """A random tiny thinker (Qwen2 decoder with 3-D RoPE, ``hidden`` wide, ``layers`` deep; a 1-block vision
    tower that the audio tasks never run) and :class:`OmniAudioProcessor` over the offline Qwen-style tokenizer."""
    from transformers import (
        Qwen2_5OmniThinkerConfig,
        Qwen2_5OmniThinkerForConditionalGeneration,
        WhisperFeatureExtractor,
    )

    from ..tiny_models import (
        AUDIO_BOS,
        AUDIO_EOS,
        HOP_LENGTH,
        IM_START,
        NUM_MEL_BINS,
        SAMPLING_RATE,
        build_tokenizer,
        seeded_model,
    )

    if hidden <= 0 or hidden % 16:
        raise ValueError(f"hidden must be a positive multiple of 16 (2 heads, 3-D RoPE sections), got {hidden}")
    tokenizer = build_tokenizer()
    vision = ["<|IMAGE|>", "<|VIDEO|>", "<|vision_bos|>", "<|vision_eos|>"]
    tokenizer.add_tokens(vision, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids
    extractor = WhisperFeatureExtractor(feature_size=NUM_MEL_BINS, sampling_rate=SAMPLING_RATE, hop_length=HOP_LENGTH,
                                        chunk_length=chunk_length)
    frames = chunk_length * SAMPLING_RATE // HOP_LENGTH
    head_dim = hidden // 2
    half = head_dim // 2  # 3-D RoPE: temporal, height, width sections of the rotary half
    config = Qwen2_5OmniThinkerConfig(
        audio_config={"num_mel_bins": NUM_MEL_BINS, "encoder_layers": layers, "encoder_attention_heads": 4,
                      "encoder_ffn_dim": 2 * hidden, "d_model": hidden, "max_source_positions": frames // 2,
                      "n_window": frames // 2, "output_dim": hidden},
        vision_config={"depth": 1, "hidden_size": 32, "intermediate_size": 32, "num_heads": 2,
                       "out_hidden_size": hidden, "fullatt_block_indexes": [0]},
        text_config={"vocab_size": len(tokenizer), "hidden_size": hidden, "intermediate_size": 2 * hidden,
                     "num_hidden_layers": layers, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "max_position_embeddings": 512, "tie_word_embeddings": False,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                         "mrope_section": [half - 2 * (half // 3), half // 3, half // 3]},
                     "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "bos_token_id": ids(IM_START)},
        audio_token_index=ids(AUDIO), image_token_index=ids("<|IMAGE|>"), video_token_index=ids("<|VIDEO|>"),
        audio_start_token_id=ids(AUDIO_BOS), audio_end_token_id=ids(AUDIO_EOS),
        vision_start_token_id=ids("<|vision_bos|>"), vision_end_token_id=ids("<|vision_eos|>"),
    )
    model = seeded_model(Qwen2_5OmniThinkerForConditionalGeneration, config, tokenizer, seed)
    return model, OmniAudioProcessor(extractor, tokenizer)


FAMILY = AudioFamily(
    name="Qwen2.5-Omni thinker",
    model_types=("qwen2_5_omni_thinker",),
    processor_classes=("Qwen2_5OmniProcessor", "OmniAudioProcessor"),
    audio_placeholder="<|audio_bos|><|AUDIO|><|audio_eos|>",
    audio_token=AUDIO,
    feature_keys=("input_features", "feature_attention_mask"),
    chat_audio_item=False,
    head_on_targets=True,  # logits = lm_head(model.model(...).last_hidden_state)
    build_tiny=build_tiny,
    stand_in_processor=OmniAudioProcessor,
    # The released Qwen2.5-Omni-7B/3B folders hold the whole model (model_type "qwen2_5_omni"): caad distils the
    # thinker, which transformers loads from them (it strips "thinker." and maps the names; talker skipped).
    container_model_types=("qwen2_5_omni",),
    model_class="Qwen2_5OmniThinkerForConditionalGeneration",
)
