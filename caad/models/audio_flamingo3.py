"""Audio Flamingo 3 (``AudioFlamingo3ForConditionalGeneration``, ``AudioFlamingo3Processor``): a Whisper-style
encoder, a projector and a Qwen2 decoder. The processor cuts audio into ``chunk_length``-second windows (one
feature row per window) and expands ``<sound>`` into one token per pooled encoder frame of the clip."""

from __future__ import annotations

from typing import Any

from . import AudioFamily

SOUND = "<sound>"

# Qwen-style chat layout whose audio content items render as the processor's <sound> placeholder.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'audio' %}<sound>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny(*, hidden: int = 64, layers: int = 2, seed: int = 0, chunk_length: int = 2,
               tokenizer: Any = None) -> tuple[Any, Any]:
    """A random tiny AF3 (Qwen2 decoder of ``hidden`` width and ``layers`` layers) and its real processor over an
    offline byte-level tokenizer that has ``<sound>`` and Qwen's chat tokens (a copy of ``tokenizer`` if given,
    which must already hold ``<sound>``, e.g. to pair the model with another family's on one vocabulary)."""
    import copy

    from transformers import (
        AudioFlamingo3Config,
        AudioFlamingo3ForConditionalGeneration,
        AudioFlamingo3Processor,
        WhisperFeatureExtractor,
    )

    from ..tiny_models import HOP_LENGTH, IM_START, SAMPLING_RATE, build_tokenizer, seeded_model

    mels = 80
    if tokenizer is None:
        tokenizer = build_tokenizer()
        tokenizer.add_tokens([SOUND], special_tokens=True)
    else:
        tokenizer = copy.deepcopy(tokenizer)
        if SOUND not in tokenizer.get_vocab():
            raise ValueError(f"tokenizer has no {SOUND} token")
    tokenizer.chat_template = CHAT_TEMPLATE
    extractor = WhisperFeatureExtractor(feature_size=mels, sampling_rate=SAMPLING_RATE, hop_length=HOP_LENGTH,
                                        chunk_length=chunk_length)
    processor = AudioFlamingo3Processor(feature_extractor=extractor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                                        max_audio_len=4 * chunk_length)
    frames = chunk_length * SAMPLING_RATE // HOP_LENGTH
    config = AudioFlamingo3Config(
        audio_config={"num_mel_bins": mels, "num_hidden_layers": layers, "num_attention_heads": 4,
                      "intermediate_size": 2 * hidden, "hidden_size": hidden, "max_source_positions": frames // 2},
        text_config={"model_type": "qwen2", "vocab_size": len(tokenizer), "hidden_size": hidden,
                     "intermediate_size": 2 * hidden, "num_hidden_layers": layers, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "max_position_embeddings": 512, "tie_word_embeddings": False,
                     "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "bos_token_id": tokenizer.convert_tokens_to_ids(IM_START)},
        audio_token_id=tokenizer.convert_tokens_to_ids(SOUND),
    )
    return seeded_model(AudioFlamingo3ForConditionalGeneration, config, tokenizer, seed), processor


FAMILY = AudioFamily(
    name="Audio Flamingo 3",
    model_types=("audioflamingo3",),
    processor_classes=("AudioFlamingo3Processor",),
    audio_placeholder=SOUND,
    audio_token=SOUND,
    feature_keys=("input_features", "input_features_mask"),
    chat_audio_item=True,
    head_on_targets=True,  # logits = lm_head(model.model(...).last_hidden_state)
    build_tiny=build_tiny,
)
