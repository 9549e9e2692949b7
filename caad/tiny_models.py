"""Tiny, offline, randomly initialised Qwen2-Audio models, tokenizer and processor.

Nothing here touches the Hugging Face Hub: the tokenizer is a byte-level BPE trained in a few milliseconds on a
fixed word list (so every byte string is encodable and the task's words are single tokens), the processor wraps a
`WhisperFeatureExtractor` with a short window, and the model is built from a config.

The Qwen2-Audio encoder insists on mel inputs of exactly ``2 * max_source_positions`` frames, and the processor
always pads to the feature extractor's window (``chunk_length`` seconds, 100 frames per second). The model and
the processor therefore have to agree on ``chunk_length``: pass the same value to :func:`build_processor` and
:func:`tiny_qwen2_audio` (both default to :data:`DEFAULT_CHUNK_SECONDS`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # heavy imports stay lazy: importing caad must not import transformers
    from transformers import PreTrainedTokenizerFast, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor

AUDIO_BOS = "<|audio_bos|>"
AUDIO_TOKEN = "<|AUDIO|>"
AUDIO_EOS = "<|audio_eos|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END, AUDIO_BOS, AUDIO_TOKEN, AUDIO_EOS]

#: Feature window in seconds shared by the tiny processor and the tiny model (2 s -> 200 mel frames -> at most
#: 50 audio tokens), small so that CPU forwards stay fast.
DEFAULT_CHUNK_SECONDS = 2
SAMPLING_RATE = 16000
NUM_MEL_BINS = 80
HOP_LENGTH = 160

#: Words the tiny tokenizer knows as whole tokens: chat scaffolding, the synthetic beeps task, seed descriptions.
DEFAULT_WORDS: tuple[str, ...] = (
    *"system user assistant You are a helpful . Audio : , ? ! [ ] sound description".split(),
    *"How many beeps beep are there Is the pitch high or low it loud quiet".split(),
    *"one two three four five 0 1 2 3 4 5 6 7 8 9 yes no answer The is".split(),
)

# Qwen2-Audio's own chat layout (system turn, "Audio N: <|audio_bos|><|AUDIO|><|audio_eos|>" per audio item), kept
# minimal so that the tiny tokenizer and processor render prompts exactly like the real model's processor does.
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)


def build_tokenizer(extra_words: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE tokenizer with Qwen2-Audio's special tokens and a minimal chat template.

    Every word of :data:`DEFAULT_WORDS` and ``extra_words`` becomes a single token both at the start of a text and
    after a space (``"three"`` and ``" three"``); anything else still encodes losslessly as bytes.
    Special tokens: pad ``<|endoftext|>``, eos ``<|im_end|>`` (generation stops at the end of a turn), and
    ``<|im_start|>``, ``<|audio_bos|>``, ``<|AUDIO|>``, ``<|audio_eos|>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = list(dict.fromkeys([*DEFAULT_WORDS, *(w for w in extra_words if w and not w.isspace())]))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,  # an upper bound only: training stops once every corpus word is one token
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # "w w" teaches both the line-initial form and the space-prefixed ("Ġw") form of each word.
    tok.train_from_iterator([f"{w} {w}" for w in words], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        additional_special_tokens=[IM_START, AUDIO_BOS, AUDIO_TOKEN, AUDIO_EOS],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(
    tokenizer: PreTrainedTokenizerFast, *, chunk_length: int = DEFAULT_CHUNK_SECONDS
) -> Qwen2AudioProcessor:
    """A `Qwen2AudioProcessor` over ``tokenizer`` with a 16 kHz, 80-mel `WhisperFeatureExtractor`.

    ``chunk_length`` (seconds) is the feature window: ``input_features`` come out as float32
    ``[batch, 80, 100 * chunk_length]`` (longer audio is truncated). Use the same value for
    :func:`tiny_qwen2_audio`.
    """
    from transformers import Qwen2AudioProcessor, WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(
        feature_size=NUM_MEL_BINS, sampling_rate=SAMPLING_RATE, hop_length=HOP_LENGTH, chunk_length=chunk_length
    )
    return Qwen2AudioProcessor(feature_extractor=fe, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def tiny_qwen2_audio(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
    chunk_length: int = DEFAULT_CHUNK_SECONDS,
) -> Qwen2AudioForConditionalGeneration:
    """A random tiny `Qwen2AudioForConditionalGeneration` matching ``tokenizer`` (in eval mode, fp32, CPU).

    ``vocab_size == len(tokenizer)``, ``audio_token_index`` is the tokenizer's ``<|AUDIO|>`` id, and the encoder
    accepts the ``[batch, 80, 100 * chunk_length]`` features of :func:`build_processor` with the same
    ``chunk_length``. ``hidden`` must be divisible by 4 (4 attention heads, 2 key/value heads). The weights depend
    only on ``seed``; the global torch RNG state is left untouched.
    """
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    if hidden <= 0 or hidden % 4:
        raise ValueError(f"hidden must be a positive multiple of 4 (4 attention heads), got {hidden}")
    if layers <= 0:
        raise ValueError(f"layers must be positive, got {layers}")
    audio_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    if audio_id is None or audio_id == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no {AUDIO_TOKEN} token; build it with caad.tiny_models.build_tokenizer")
    frames = chunk_length * SAMPLING_RATE // HOP_LENGTH
    config = Qwen2AudioConfig(
        audio_config={
            "num_mel_bins": NUM_MEL_BINS,
            "encoder_layers": layers,
            "encoder_attention_heads": 4,
            "encoder_ffn_dim": 2 * hidden,
            "d_model": hidden,
            # the encoder requires exactly 2 * max_source_positions mel frames (conv2 has stride 2)
            "max_source_positions": frames // 2,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "tie_word_embeddings": False,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.convert_tokens_to_ids(IM_START),
        },
        audio_token_index=audio_id,
    )
    return seeded_model(Qwen2AudioForConditionalGeneration, config, tokenizer, seed)


def seeded_model(cls: type, config: Any, tokenizer: Any, seed: int) -> Any:
    """``cls(config)`` with weights that depend only on ``seed`` (the global RNG state is left untouched), set up
    for greedy generation with ``tokenizer``'s pad and eos tokens, in eval mode."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.do_sample = False
    return model.eval()
