"""Gemma-3n (``Gemma3nForConditionalGeneration``, ``Gemma3nProcessor``): a USM-style conformer audio encoder, a
MobileNet-v5 vision tower and a Gemma decoder with per-layer embeddings, AltUp and LAuReL blocks.

What CAAD has to know about it:

- **Audio in a prompt.** The chat template renders an audio item as ``<audio_soft_token>``; the processor expands
  each one into ``"\\n\\n<start_of_audio>" + audio_seq_length x <audio_soft_token> + "<end_of_audio>\\n\\n"``. The
  number of soft tokens per clip is fixed (``audio_seq_length`` = ``config.audio_soft_tokens_per_image``, 188 in
  the released checkpoints): the encoder yields at most that many frames for the feature extractor's 30-second
  window and the model pads the rest with one learned embedding. The features are ``input_features [B, T, M]``
  float32 and ``input_features_mask [B, T]`` **bool** (True on real frames), padded to the batch's longest clip.
- **Token layout.** Ids at or above ``vision_config.vocab_offset`` are embedded by the vision embedder and ids at or
  above ``audio_config.vocab_offset`` by the audio embedder, and the text vocabulary ends where the audio one does
  (the model pads audio features with the embedding of id ``vocab_size - 1``): the image tokens and then the
  audio tokens sit at the end of the vocabulary, as :func:`build_tiny` lays out its tokenizer.
- **Logits are soft-capped:** ``logits = c * tanh(lm_head(h) / c)`` with ``c = final_logit_softcapping`` (30), so
  the LM head cannot be applied to gathered hidden states (``head_on_targets=False``) and the fused-linear loss
  is refused for this family (:func:`caad.teacher.fused_linear_refusal`).
- **Layer selection** must also cut the per-layer embedding table and projection (one block of
  ``hidden_size_per_layer_input`` per decoder layer), the per-layer config lists and the KV-sharing tail
  (:attr:`FAMILY.per_layer_weights`, :func:`caad.make_student.select_layers`).

**The stand-in vision tower.** Gemma-3n's vision tower is a ``TimmWrapperModel``, which needs ``timm`` (and so
torchvision): the project's CPU test machine has neither (torchvision fails to import beside its torch). The
audio tasks never run the vision tower, so :func:`build_tiny` gives the tiny model :class:`VisionTowerStandIn`, a
module without weights, named in the config by ``vision_config.architecture = "caad-vision-stand-in"``. It is put
in place by :func:`install_vision_stand_in`, which makes Gemma-3n's construction build the stand-in for a config
carrying that name, and only for it: real checkpoints (``mobilenetv5_300m_enc``) still build their timm tower.
:func:`build_tiny` calls it, and caad's model loader calls it (``FAMILY.load_hook``) before ``from_pretrained`` of
any Gemma-3n folder, so a tiny checkpoint loads back with or without timm. Loading a tiny checkpoint outside caad
(plain ``from_pretrained``) needs ``install_vision_stand_in()`` first. The processor is the real
``Gemma3nProcessor``: its image processor falls back to ``SiglipImageProcessorPil`` without torchvision.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor, nn

from . import AudioFamily

AUDIO = "<audio_soft_token>"
BOA, EOA = "<start_of_audio>", "<end_of_audio>"
IMAGE = "<image_soft_token>"
BOI, EOI = "<start_of_image>", "<end_of_image>"
BOS = "<bos>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"

#: ``vision_config.architecture`` of a model whose vision tower is :class:`VisionTowerStandIn`.
VISION_STAND_IN = "caad-vision-stand-in"

#: The feature extractor's window: ``Gemma3nAudioFeatureExtractor.__call__`` truncates clips to ``max_length``
#: samples (480 000 = 30 s at 16 kHz), which the processor leaves at its default.
MAX_AUDIO_SAMPLES = 480_000

# Gemma's turn layout (a system message folds into the first user turn; the assistant's role is "model"), with
# audio and image items rendered as the soft tokens that the processor expands.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(prefix='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.prefix = message['content'] ~ '\n\n' %}"
    "{% else %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n{{ ns.prefix }}"
    "{% set ns.prefix = '' %}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'audio' %}<audio_soft_token>{% elif item['type'] == 'image' %}<image_soft_token>"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<end_of_turn>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


class VisionTowerStandIn(nn.Module):
    """Gemma-3n's vision tower in caad's tiny models: no weights, no timm; it cannot encode images (see the module
    docstring). ``config`` is the model's ``Gemma3nVisionConfig``."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config

    def forward(self, pixel_values: Tensor | None = None, **kwargs: Any) -> Any:
        raise NotImplementedError(
            "this Gemma-3n has caad's stand-in vision tower (vision_config.architecture "
            f"{VISION_STAND_IN!r}, a tiny test model): it cannot encode images; caad's audio tasks never call it")


class _AutoModelWithStandIn:
    """``transformers.AutoModel`` as Gemma-3n's modeling module sees it, except that a config naming
    :data:`VISION_STAND_IN` gets :class:`VisionTowerStandIn`; everything else is delegated unchanged."""

    def __init__(self, auto_model: Any) -> None:
        self._auto_model = auto_model

    def from_config(self, config: Any, **kwargs: Any) -> nn.Module:
        if getattr(config, "architecture", None) == VISION_STAND_IN:
            return VisionTowerStandIn(config)
        return self._auto_model.from_config(config, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._auto_model, name)


def install_vision_stand_in() -> None:
    """Let Gemma-3n configs whose ``vision_config.architecture`` is :data:`VISION_STAND_IN` build (and load) without
    timm. Idempotent; configs naming a real (timm) architecture are unaffected."""
    from transformers.models.gemma3n import modeling_gemma3n

    if not isinstance(modeling_gemma3n.AutoModel, _AutoModelWithStandIn):
        modeling_gemma3n.AutoModel = _AutoModelWithStandIn(modeling_gemma3n.AutoModel)


def audio_soft_tokens(audio_config: Any, samples: int = MAX_AUDIO_SAMPLES, *, frame_length: int = 512,
                      hop_length: int = 160) -> int:
    """How many frames the audio encoder yields for a clip of ``samples`` samples: the feature extractor's frames
    (windows of ``frame_length + 1`` samples every ``hop_length``), the two sub-sampling convolutions' time strides
    (each ``ceil(T / stride)``), then every ``conf_reduction_factor``-th frame. For the window
    (:data:`MAX_AUDIO_SAMPLES`) this is the number of soft tokens per clip (188 for the released config)."""
    frames = (samples - (frame_length + 1)) // hop_length + 1
    for stride_time, _ in audio_config.sscp_conv_stride_size:
        frames = -(-frames // stride_time)
    return -(-frames // audio_config.conf_reduction_factor)


def build_tokenizer() -> Any:
    """The offline tiny tokenizer (:func:`caad.tiny_models.build_tokenizer`) plus Gemma's chat tokens (``<bos>``,
    ``<start_of_turn>``, eos ``<end_of_turn>``) and, at the end of the vocabulary as Gemma-3n's embedders need,
    ``<end_of_image>`` ``<image_soft_token>`` (the vision range) and ``<end_of_audio>`` ``<audio_soft_token>`` (the
    audio range). The processor's token attributes (``tokenizer.audio_token``, ``boa_token``, ...) are set."""
    from transformers import PreTrainedTokenizerFast

    from ..tiny_models import build_tokenizer as build_base

    base = build_base()
    # Text-range tokens first; the vision range then starts at <end_of_image>, the audio range at <end_of_audio>.
    base.add_tokens([BOS, START_OF_TURN, END_OF_TURN, BOI, BOA, EOI, IMAGE, EOA, AUDIO], special_tokens=True)
    named = {"boi_token": BOI, "eoi_token": EOI, "image_token": IMAGE,
             "boa_token": BOA, "eoa_token": EOA, "audio_token": AUDIO}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=copy.deepcopy(base.backend_tokenizer), bos_token=BOS, eos_token=END_OF_TURN,
        pad_token=base.pad_token, extra_special_tokens=named, clean_up_tokenization_spaces=False)
    tokenizer.extra_special_tokens = [START_OF_TURN, *base.extra_special_tokens]
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny(*, hidden: int = 64, layers: int = 2, seed: int = 0, mel_bins: int = 32, reduction: int = 25,
               kv_shared_layers: int = 0) -> tuple[Any, Any]:
    """A random tiny Gemma-3n and its real ``Gemma3nProcessor`` over :func:`build_tokenizer`'s tokenizer.

    The decoder is ``hidden`` wide (2 heads of ``hidden // 2``, one KV head) and ``layers`` deep, sliding and full
    attention alternating from a sliding layer 0, activation sparsity on the first half of the layers, the last
    ``kv_shared_layers`` layers reusing the keys and values of the last earlier layer of their attention type (so
    an earlier layer of each type they use is needed), logits soft-capped at 30 as in the released models. The
    audio encoder has ``layers`` conformer blocks on ``mel_bins`` mel bins and keeps every ``reduction``-th
    sub-sampled frame, so a 30-second window gives ``audio_soft_tokens(...)`` soft tokens
    (30 for the default 25; the released models keep every 4th: 188). The vision tower is
    :class:`VisionTowerStandIn` (see the module docstring).

    Returns:
        ``(model, processor)``: the model in eval mode, fp32, on the CPU, ``vocab_size == len(processor.tokenizer)``.
    """
    from transformers import (
        Gemma3nAudioConfig,
        Gemma3nAudioFeatureExtractor,
        Gemma3nConfig,
        Gemma3nForConditionalGeneration,
        Gemma3nProcessor,
        SiglipImageProcessorPil,
    )

    from ..tiny_models import seeded_model

    if hidden <= 0 or hidden % 4:
        raise ValueError(f"hidden must be a positive multiple of 4 (2 heads of even size), got {hidden}")
    if layers <= 0 or not 0 <= kv_shared_layers < layers:
        raise ValueError(f"need layers >= 1 and 0 <= kv_shared_layers < layers, got {layers} and {kv_shared_layers}")
    install_vision_stand_in()
    tokenizer = build_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    vision_offset, audio_offset = ids(EOI), ids(EOA)
    audio_config = {
        "input_feat_size": mel_bins, "hidden_size": hidden, "conf_num_attention_heads": 2,
        "conf_num_hidden_layers": layers, "conf_attention_chunk_size": 4, "conf_attention_context_left": 5,
        "conf_attention_context_right": 0, "conf_conv_kernel_size": 3, "conf_reduction_factor": reduction,
        "sscp_conv_channel_size": [8, 8], "vocab_size": len(tokenizer) - audio_offset, "vocab_offset": audio_offset,
    }
    soft_tokens = audio_soft_tokens(Gemma3nAudioConfig(**audio_config))
    image_tokens = 4  # no image ever reaches the stand-in tower; the processor still needs a count
    config = Gemma3nConfig(
        text_config={
            "vocab_size": len(tokenizer), "vocab_size_per_layer_input": vision_offset, "hidden_size": hidden,
            "intermediate_size": 2 * hidden, "num_hidden_layers": layers, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": hidden // 2, "hidden_size_per_layer_input": 8,
            "altup_num_inputs": 2, "laurel_rank": 4, "num_kv_shared_layers": kv_shared_layers,
            "layer_types": ["full_attention" if i % 2 else "sliding_attention" for i in range(layers)],
            "activation_sparsity_pattern": [0.95 if i < layers // 2 else 0.0 for i in range(layers)],
            "sliding_window": 16, "max_position_embeddings": 512, "final_logit_softcapping": 30.0,
            "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
        },
        audio_config=audio_config,
        vision_config={"architecture": VISION_STAND_IN, "hidden_size": 16, "vocab_size": audio_offset - vision_offset,
                       "vocab_offset": vision_offset, "num_labels": 1},
        audio_soft_tokens_per_image=soft_tokens, vision_soft_tokens_per_image=image_tokens,
        boi_token_id=ids(BOI), eoi_token_id=vision_offset, image_token_id=ids(IMAGE),
        boa_token_id=ids(BOA), eoa_token_id=audio_offset, audio_token_id=ids(AUDIO),
    )
    extractor = Gemma3nAudioFeatureExtractor(feature_size=mel_bins)
    images = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    processor = Gemma3nProcessor(feature_extractor=extractor, image_processor=images, tokenizer=tokenizer,
                                 chat_template=CHAT_TEMPLATE, audio_seq_length=soft_tokens,
                                 image_seq_length=image_tokens)
    model = seeded_model(Gemma3nForConditionalGeneration, config, tokenizer, seed)
    return model, processor


FAMILY = AudioFamily(
    name="Gemma-3n",
    model_types=("gemma3n",),
    processor_classes=("Gemma3nProcessor",),
    audio_placeholder=AUDIO,
    audio_token=AUDIO,
    feature_keys=("input_features", "input_features_mask"),
    chat_audio_item=True,
    head_on_targets=False,  # logits = c * tanh(lm_head(h) / c), c = final_logit_softcapping
    build_tiny=build_tiny,
    load_hook=install_vision_stand_in,
    # One block of hidden_size_per_layer_input per decoder layer, layer-major, along this axis of the weight.
    per_layer_weights=(("embed_tokens_per_layer.weight", 1), ("per_layer_model_projection.weight", 0)),
)
