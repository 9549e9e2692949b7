"""Qwen2-Audio (``Qwen2AudioForConditionalGeneration``, ``Qwen2AudioProcessor``)."""

from __future__ import annotations

from typing import Any

from . import AudioFamily


def build_tiny(*, hidden: int = 64, layers: int = 2, seed: int = 0) -> tuple[Any, Any]:
    from ..tiny_models import build_processor, build_tokenizer, tiny_qwen2_audio

    tokenizer = build_tokenizer()
    return tiny_qwen2_audio(tokenizer, hidden=hidden, layers=layers, seed=seed), build_processor(tokenizer)


FAMILY = AudioFamily(
    name="Qwen2-Audio",
    model_types=("qwen2_audio",),
    processor_classes=("Qwen2AudioProcessor",),
    audio_placeholder="<|audio_bos|><|AUDIO|><|audio_eos|>",
    audio_token="<|AUDIO|>",
    feature_keys=("input_features", "feature_attention_mask"),
    chat_audio_item=False,  # the placeholder in the user string, as Qwen2-Audio's examples write it
    head_on_targets=True,  # logits = lm_head(model.model(...).last_hidden_state)
    build_tiny=build_tiny,
)
