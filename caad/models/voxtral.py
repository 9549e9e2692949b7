"""Voxtral (``VoxtralForConditionalGeneration``, ``VoxtralProcessor``): Mistral's speech LM, a Whisper encoder on
30 s windows, a projector and a Llama decoder (Voxtral Mini 3B, Voxtral Small 24B).

How audio enters the model (transformers' ``modeling_voxtral``): every window of ``2 * max_source_positions`` mel
frames (3000 for the real checkpoints) is one row of ``input_features [W, M, F]``; the encoder's stride-2 conv
halves it to ``max_source_positions`` frames (1500) of ``d_model``; ``get_audio_features`` reshapes the encoder
output to rows of ``audio_config.intermediate_size = 4 * d_model``, i.e. it concatenates 4 consecutive frames, and
projects each to one embedding. One window therefore becomes ``F / 8`` audio embeddings (375 for 30 s), matched in
order to the ``[AUDIO]`` tokens of the whole batch. The forward takes ``input_features`` only: there is no feature
mask (a short clip is padded with silence to a whole window, and the model sees the padding), and the logits are
exactly ``lm_head(model.model(...).last_hidden_state)``.

Two processors drive the family:

- the real ``VoxtralProcessor`` (:func:`build_real_processor`, or any checkpoint's through ``AutoProcessor``). Its
  tokenizer is Mistral's Tekken tokenizer through ``MistralCommonBackend`` (package ``mistral_common``, in caad's
  ``test`` extra). Two things differ from the processors caad renders prompts for: ``VoxtralProcessor.__call__`` is
  text-only and refuses text holding ``[AUDIO]`` (audio enters only through ``apply_chat_template``, where
  ``mistral_common`` pads each clip to whole windows and inserts ``[BEGIN_AUDIO]`` and ``F / 8`` ``[AUDIO]`` tokens
  per window), and the tokenizer does not parse special-token strings (``"<s>[INST]"`` in text becomes bytes). The
  family's ``chat_encoder`` hook (:class:`MistralChatEncoder`) therefore encodes whole user turns for the collator,
  the generation prompts and Stage 1, and the target is the text's Tekken ids plus ``</s>``, which is how
  ``mistral_common`` encodes an assistant turn (tested against its own ``encode_chat_completion``). The window
  (``chunk_length`` of the feature extractor, 30 s for the released checkpoints) is passed to the processor as its
  ``pad_to_multiple_of`` / ``max_source_positions`` audio kwargs, so the tiny 2 s window works like the real one;
  the Tekken file's ``audio.chunk_length_s`` must agree (checked). For tests, :func:`write_tekken` writes a tiny
  valid Tekken file offline (256 byte tokens after 32 special slots, ``[AUDIO]`` at id 24 as the processor
  hard-codes, version ``v7``, the tiny window in its audio section);
- :class:`VoxtralAudioProcessor`, a stand-in with caad's ``__call__(text=, audio=, sampling_rate=)`` interface,
  kept for the tests that need no ``mistral_common``. It reproduces the real processor's audio path and token
  layout and nothing else:

  - features as ``VoxtralProcessor._retrieve_input_features`` makes them: each clip is padded with zeros to a whole
    number of windows (``pad_to_multiple_of`` the window's samples, never truncated), its log-mel spectrogram is
    computed once over the padded clip by a ``WhisperFeatureExtractor``, then cut into windows, each window one row
    of ``input_features``; a clip longer than a window takes several rows;
  - the token layout Mistral's instruct tokenizer gives a user turn with audio, ``<s>[INST][BEGIN_AUDIO]`` followed
    by ``F / 8`` ``[AUDIO]`` tokens per window of the clip, then the text and ``[/INST]``; the assistant turn ends
    with ``</s>``. Each ``[AUDIO]`` of a rendered prompt (one per clip, after ``[BEGIN_AUDIO]``) is expanded into the
    clip's audio tokens at the id level;
  - what differs: the tokenizer is the offline byte-level BPE of :func:`caad.tiny_models.build_tokenizer` with
    Voxtral's special tokens added (other ids than Tekken's, e.g. ``[AUDIO]`` is not id 24) and a Jinja chat template
    rendering the same layout, and :meth:`VoxtralAudioProcessor.from_pretrained` loads only folders it saved itself.
    The real processor's ids and features equal the stand-in's token for token (as strings) and bit for bit
    (``tests/test_caad_voxtral.py``).

Both use a tiny ``chunk_length`` (2 s, 200 frames, 25 audio tokens) instead of 30 s in :func:`build_tiny`, with the
tiny encoder's ``max_source_positions`` set to match; 128 mel bins as the real model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import AudioFamily, StandInProcessor

AUDIO = "[AUDIO]"
BEGIN_AUDIO = "[BEGIN_AUDIO]"
INST, END_INST = "[INST]", "[/INST]"
BOS, EOS = "<s>", "</s>"
#: Voxtral's special tokens that the stand-in tokenizer adds to caad's offline tokenizer.
SPECIAL_TOKENS = (BOS, EOS, INST, END_INST, BEGIN_AUDIO, AUDIO)

#: Mel bins of Voxtral's feature extractor.
NUM_MEL_BINS = 128
#: Encoder frames the projector concatenates into one audio embedding (``intermediate_size // d_model``).
PROJECTOR_GROUP = 4
#: Mel frames per audio token: the encoder's conv2 stride (2) times :data:`PROJECTOR_GROUP`.
MEL_FRAMES_PER_TOKEN = 2 * PROJECTOR_GROUP

# Mistral's instruct layout: <s>[INST]user[/INST]assistant</s>..., an audio content item rendered as the
# placeholder the processor expands. add_generation_prompt adds nothing: [/INST] already opens the answer.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST]"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'audio' %}[BEGIN_AUDIO][AUDIO]{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "[/INST]"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)


class VoxtralAudioProcessor(StandInProcessor):
    """Voxtral's processor, audio and text only, with caad's ``__call__(text=, audio=, sampling_rate=)`` interface
    (see the module docstring for what it reproduces and what differs).

    ``__call__`` returns ``input_ids`` and ``attention_mask`` (lists, one per prompt, unpadded) and, with audio,
    ``input_features [W, M, F]`` float32: ``W`` windows in all (one per started window of each clip, clips in order),
    ``M`` mel bins, ``F`` the window's mel frames. Each prompt's ``[AUDIO]`` (one per clip) becomes
    ``n_windows * F / 8`` ``[AUDIO]`` tokens.

    Args:
        feature_extractor: a ``WhisperFeatureExtractor``; its ``chunk_length`` is the window (``F`` must be a
            multiple of 8 frames, and the model's ``audio_config.max_source_positions`` must be ``F / 2``).
        tokenizer: a tokenizer holding ``[AUDIO]`` (and, for the chat layout, Voxtral's other special tokens).
    """

    audio_token = AUDIO

    def __init__(self, feature_extractor: Any, tokenizer: Any) -> None:
        frames = int(feature_extractor.nb_max_frames)
        if frames % MEL_FRAMES_PER_TOKEN:
            raise ValueError(f"the feature window has {frames} mel frames; Voxtral needs a multiple of "
                             f"{MEL_FRAMES_PER_TOKEN} (conv stride 2, then {PROJECTOR_GROUP} frames per audio token)")
        if AUDIO not in tokenizer.get_vocab():
            raise ValueError(f"tokenizer has no {AUDIO} token")
        super().__init__(feature_extractor, tokenizer)
        self.audio_token_id = int(tokenizer.convert_tokens_to_ids(AUDIO))

    @property
    def window_frames(self) -> int:
        """``F``: mel frames of one window (``2 * max_source_positions`` of the matching encoder)."""
        return int(self.feature_extractor.nb_max_frames)

    @property
    def tokens_per_window(self) -> int:
        """Audio tokens one window becomes (375 for the real 30 s window)."""
        return self.window_frames // MEL_FRAMES_PER_TOKEN

    def features(self, audio: Sequence[np.ndarray]) -> tuple[np.ndarray, list[int]]:
        """Log-mel windows of ``audio`` (1-D float waveforms at the extractor's rate).

        Returns:
            ``(input_features [W, M, F] float32, windows per clip)``, ``W = sum(windows)``.
        """
        fe, frames = self.feature_extractor, self.window_frames
        rows, windows = [], []
        for i, clip in enumerate(audio):
            clip = np.asarray(clip, dtype=np.float32)
            if clip.ndim != 1 or clip.size == 0:
                raise ValueError(f"audio {i}: expected a non-empty 1-D waveform, got shape {clip.shape}")
            mel = fe(clip, sampling_rate=fe.sampling_rate, padding="longest", pad_to_multiple_of=fe.n_samples,
                     truncation=False, return_tensors="np")["input_features"][0]  # [M, n * F]
            n = mel.shape[-1] // frames
            if mel.shape[-1] != n * frames:
                raise AssertionError(f"{mel.shape[-1]} mel frames is not a whole number of {frames}-frame windows")
            rows.append(mel.reshape(mel.shape[0], n, frames).transpose(1, 0, 2))  # [n, M, F]
            windows.append(n)
        return np.concatenate(rows).astype(np.float32, copy=False), windows

    def __call__(self, text: str | list[str], audio: Sequence[np.ndarray] | None = None,
                 sampling_rate: int | None = None, add_special_tokens: bool = True) -> dict[str, Any]:
        """Tokenize ``text`` (prompts already rendered, one ``[AUDIO]`` per clip) and extract ``audio``'s features.

        Args:
            text: one prompt or a list of ``B`` prompts.
            audio: the clips, in the order of the ``[AUDIO]`` tokens over all prompts; ``None``: text only.
            sampling_rate: the clips' rate; must be the feature extractor's.
            add_special_tokens: passed to the tokenizer.

        Returns:
            ``{"input_ids": B lists, "attention_mask": B lists}`` plus ``"input_features" [W, M, F]`` with audio.
        """
        texts = [text] if isinstance(text, str) else list(text)
        encoded = self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
        found = sum(list(ids).count(self.audio_token_id) for ids in encoded)
        if audio is None:
            if found:
                raise ValueError(f"the text holds {found} {AUDIO} tokens but no audio was given")
            return {"input_ids": [list(ids) for ids in encoded], "attention_mask": [[1] * len(ids) for ids in encoded]}
        rate = int(self.feature_extractor.sampling_rate)
        if sampling_rate is not None and int(sampling_rate) != rate:
            raise ValueError(f"audio at {sampling_rate} Hz, but the feature extractor expects {rate} Hz")
        if found != len(audio):
            raise ValueError(f"{len(audio)} audio clips for {found} {AUDIO} tokens in the text")
        features, windows = self.features(audio)
        counts = iter(n * self.tokens_per_window for n in windows)
        input_ids = []
        for ids in encoded:
            row: list[int] = []
            for token in ids:
                row.extend([token] * next(counts) if token == self.audio_token_id else [token])
            input_ids.append(row)
        return {"input_ids": input_ids, "attention_mask": [[1] * len(ids) for ids in input_ids],
                "input_features": features}



# ----------------------------------------------------------------------------------------------------------------------
# The real processor: VoxtralProcessor over Mistral's Tekken tokenizer (mistral_common)
# ----------------------------------------------------------------------------------------------------------------------

#: The file name ``MistralCommonBackend`` loads and saves (``AutoTokenizer`` looks for it).
TEKKEN_FILE = "tekken.json"
#: Audio tokens per second of Mistral's audio encoder config (one token per 1280 samples at 16 kHz, i.e. 8 frames).
FRAME_RATE = 12.5
#: ``VoxtralProcessor.audio_token_id``: the processor hard-codes ``[AUDIO]`` at this id.
REAL_AUDIO_TOKEN_ID = 24
#: Special tokens of the tiny Tekken file, by rank: Mistral's control tokens in ``mistral_common``'s order, fillers
#: up to :data:`REAL_AUDIO_TOKEN_ID`, then the audio tokens (only the ranks the processor relies on are Voxtral's).
_TEKKEN_SPECIALS = (
    "<unk>", BOS, EOS, INST, END_INST, "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
    "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]", "[ARGS]", "[CALL_ID]", "<SPECIAL_22>",
    "<SPECIAL_23>", AUDIO, BEGIN_AUDIO, "[TRANSCRIBE]",
)
#: Special-token slots of the tiny Tekken file (the ones not named above are ``<SPECIAL_i>`` fillers).
TEKKEN_NUM_SPECIAL = 32
#: Pre-tokenization regex of the tiny Tekken file: letters, digits one by one, punctuation runs, whitespace.
_TEKKEN_PATTERN = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def write_tekken(folder: str | Path, *, chunk_length: int = 2) -> Path:
    """Write a tiny valid Tekken tokenizer file, ``folder / "tekken.json"``, for ``mistral_common`` 1.13.

    Vocabulary: the 256 single bytes (ranks 0-255, no merges), after :data:`TEKKEN_NUM_SPECIAL` special tokens
    (:data:`_TEKKEN_SPECIALS`, ``[AUDIO]`` at id 24 as the real file), so ``len(tokenizer) == 288`` and a text
    byte ``b`` has id ``32 + b``. Tokenizer version ``v7`` (Voxtral's). Audio section: 16 kHz, 12.5 audio tokens per
    second, 128 mel bins, hop 160, FFT window 400, clips padded to multiples of ``chunk_length`` seconds (30 for the
    real checkpoints), which must be the feature extractor's ``chunk_length``.

    Returns:
        the path of the file.
    """
    import base64
    import json

    from ..tiny_models import HOP_LENGTH, SAMPLING_RATE

    if chunk_length <= 0:
        raise ValueError(f"chunk_length must be a positive number of seconds, got {chunk_length}")
    specials = [{"rank": i, "token_str": t, "is_control": True} for i, t in enumerate(_TEKKEN_SPECIALS)]
    vocab = [{"rank": b, "token_bytes": base64.b64encode(bytes([b])).decode("ascii"), "token_str": None}
             for b in range(256)]
    data = {
        "config": {"pattern": _TEKKEN_PATTERN, "num_vocab_tokens": len(vocab),
                   "default_vocab_size": len(vocab) + TEKKEN_NUM_SPECIAL,
                   "default_num_special_tokens": TEKKEN_NUM_SPECIAL, "version": "v7"},
        "vocab": vocab,
        "special_tokens": specials,
        "version": 1,
        "type": "Tekken",
        "audio": {"sampling_rate": SAMPLING_RATE, "frame_rate": FRAME_RATE, "chunk_length_s": float(chunk_length),
                  "audio_encoding_config": {"num_mel_bins": NUM_MEL_BINS, "hop_length": HOP_LENGTH,
                                            "window_size": 400}},
    }
    path = Path(folder) / TEKKEN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def build_real_processor(folder: str | Path, *, chunk_length: int = 2) -> Any:
    """transformers' own ``VoxtralProcessor``: a ``WhisperFeatureExtractor`` on ``chunk_length``-second windows
    (128 bins, 16 kHz, hop 160) and ``MistralCommonBackend`` over the tiny Tekken file written to ``folder`` by
    :func:`write_tekken` (needs ``mistral_common``; ``folder`` must not be where the processor is later saved)."""
    from transformers import MistralCommonBackend, VoxtralProcessor, WhisperFeatureExtractor

    from ..tiny_models import HOP_LENGTH, SAMPLING_RATE

    tokenizer = MistralCommonBackend(write_tekken(folder, chunk_length=chunk_length))
    extractor = WhisperFeatureExtractor(feature_size=NUM_MEL_BINS, sampling_rate=SAMPLING_RATE, hop_length=HOP_LENGTH,
                                        chunk_length=chunk_length)
    return VoxtralProcessor(feature_extractor=extractor, tokenizer=tokenizer)


def _wav_base64(audio: np.ndarray, sampling_rate: int) -> str:
    """``audio`` as a base64 32-bit float WAV file (lossless for float32 samples)."""
    import base64
    import io

    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, audio, sampling_rate, format="WAV", subtype="FLOAT")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class MistralChatEncoder:
    """caad's prompts and targets through ``mistral_common`` (the :class:`~caad.models.ChatEncoder` of a real
    ``VoxtralProcessor``, or of its bare ``MistralCommonBackend`` for text-only prompts).

    - prompts: each example is the conversation ``[{"role": "user", "content": [{"type": "audio", "base64": wav},
      {"type": "text", "text": instruction}]}]`` (no audio item for text only; no text item for an empty
      instruction), encoded by ``apply_chat_template(tokenize=True, return_dict=True)``: Mistral's instruct tokenizer
      gives ``<s>[INST][BEGIN_AUDIO][AUDIO]*n instruction[/INST]`` (``[/INST]`` opens the answer: there is no
      separate generation prompt) and, with audio, the processor's ``input_features [W, M, F]``. The audio is
      padded to whole windows by ``mistral_common`` (``chunk_length_s`` of the Tekken file) and cut into windows of
      the feature extractor's ``nb_max_frames`` frames (passed as the processor's ``max_source_positions``
      audio kwarg, so a tiny window works as the 30 s one);
    - targets: the text's Tekken ids (no bos) then ``</s>``, which is how ``mistral_common`` encodes an assistant
      turn after ``[/INST]``.

    Args:
        processor: a ``VoxtralProcessor`` (audio and text) or a ``MistralCommonBackend`` (text-only prompts).
    """

    def __init__(self, processor: Any) -> None:
        self.tokenizer = getattr(processor, "tokenizer", processor)
        fe = getattr(processor, "feature_extractor", None)
        self.processor = processor if fe is not None else None
        self.eos_token_id = int(self.tokenizer.eos_token_id)
        if fe is None:
            return
        audio = self.tokenizer.tokenizer.instruct_tokenizer.audio_encoder
        if audio is None:
            raise ValueError("the processor's Tekken tokenizer has no audio section: it cannot encode audio")
        config = audio.audio_config
        settings = {"sampling rate": (config.sampling_rate, fe.sampling_rate),
                    "mel bins": (config.encoding_config.num_mel_bins, fe.feature_size),
                    "hop length": (config.encoding_config.hop_length, fe.hop_length),
                    "window samples (chunk_length)": (int((config.chunk_length_s or 0) * config.sampling_rate),
                                                      fe.n_samples)}
        for what, (tekken, extractor) in settings.items():
            if int(tekken) != int(extractor):
                raise ValueError(f"the Tekken tokenizer's audio {what} is {tekken} but the feature extractor's is "
                                 f"{extractor}: the audio tokens would not match the feature windows")
        self.sampling_rate = int(fe.sampling_rate)
        self.audio_kwargs = {"pad_to_multiple_of": int(fe.n_samples), "max_source_positions": int(fe.nb_max_frames)}

    def _conversation(self, instruction: str, audio: np.ndarray | None) -> list[dict[str, Any]]:
        content: list[dict[str, Any]] = []
        if audio is not None:
            content.append({"type": "audio", "base64": _wav_base64(audio, self.sampling_rate)})
        if instruction:
            content.append({"type": "text", "text": instruction})
        return [{"role": "user", "content": content}]

    def prompts(self, instructions: Sequence[str], audios: Sequence[np.ndarray] | None) -> dict[str, Any]:
        """See :meth:`caad.models.ChatEncoder.prompts`; ``input_features [W, M, F]`` float32 with audio."""
        from ..teacher import token_rows

        if audios is None:
            conversations = [self._conversation(text, None) for text in instructions]
            encoded = self.tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True)
            return {"input_ids": token_rows(encoded)}
        if self.processor is None:
            raise ValueError("audio prompts need the VoxtralProcessor (its feature extractor), not a bare tokenizer")
        if len(audios) != len(instructions):
            raise ValueError(f"{len(audios)} audio clips for {len(instructions)} instructions")
        conversations = [self._conversation(text, np.asarray(clip, dtype=np.float32))
                         for text, clip in zip(instructions, audios, strict=True)]
        encoded = self.processor.apply_chat_template(conversations, tokenize=True, return_dict=True,
                                                     processor_kwargs={"audio_kwargs": self.audio_kwargs})
        return {"input_ids": token_rows(encoded), "input_features": encoded["input_features"].float()}

    def targets(self, texts: Sequence[str]) -> list[list[int]]:
        """See :meth:`caad.models.ChatEncoder.targets`. Trailing spaces are dropped, as mistral_common drops them
        from an assistant turn's content."""
        encoded = self.tokenizer([text.rstrip(" ") for text in texts], add_special_tokens=False)["input_ids"]
        return [[int(i) for i in ids] + [self.eos_token_id] for ids in encoded]


def chat_encoder(obj: Any) -> MistralChatEncoder | None:
    """:class:`MistralChatEncoder` for a processor or tokenizer over ``MistralCommonBackend``; ``None`` otherwise
    (e.g. :class:`VoxtralAudioProcessor`, which takes rendered prompts)."""
    tokenizer = getattr(obj, "tokenizer", obj)
    if type(tokenizer).__name__ != "MistralCommonBackend":
        return None
    return MistralChatEncoder(obj)


def build_tokenizer() -> Any:
    """caad's offline byte-level tokenizer with Voxtral's special tokens, ``<s>``/``</s>`` as bos/eos (pad stays
    ``<|endoftext|>``) and :data:`CHAT_TEMPLATE`."""
    from ..tiny_models import build_tokenizer as base_tokenizer

    tokenizer = base_tokenizer()
    tokenizer.add_special_tokens({"bos_token": BOS, "eos_token": EOS})
    tokenizer.add_tokens([INST, END_INST, BEGIN_AUDIO, AUDIO], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny(*, hidden: int = 64, layers: int = 2, seed: int = 0, chunk_length: int = 2,
               tokenizer_dir: str | Path | None = None) -> tuple[Any, Any]:
    """A random tiny Voxtral and :class:`VoxtralAudioProcessor` over the offline tokenizer or, with
    ``tokenizer_dir``, the real ``VoxtralProcessor`` over a tiny Tekken file written there
    (:func:`build_real_processor`; the vocabulary is then Tekken's 288 ids).

    The decoder is a Llama of width ``hidden`` and depth ``layers`` (2 heads, 1 key/value head); the encoder a
    Whisper encoder of the same width and depth (2 heads, FFN ``4 * hidden``, which is also the projector's input:
    4 frames per audio token) on windows of ``chunk_length`` seconds (``100 * chunk_length`` mel frames, 128 bins,
    ``12.5 * chunk_length`` audio tokens per window, so ``chunk_length`` must be even).
    """
    from transformers import VoxtralConfig, VoxtralForConditionalGeneration, WhisperFeatureExtractor

    from ..tiny_models import HOP_LENGTH, SAMPLING_RATE, seeded_model

    if hidden <= 0 or hidden % 4:
        raise ValueError(f"hidden must be a positive multiple of 4 (2 heads of even width), got {hidden}")
    if layers <= 0:
        raise ValueError(f"layers must be positive, got {layers}")
    extractor = WhisperFeatureExtractor(feature_size=NUM_MEL_BINS, sampling_rate=SAMPLING_RATE, hop_length=HOP_LENGTH,
                                        chunk_length=chunk_length)
    stand_in = VoxtralAudioProcessor(extractor, build_tokenizer())  # checks the window is a multiple of 8 frames
    processor = stand_in if tokenizer_dir is None else build_real_processor(tokenizer_dir, chunk_length=chunk_length)
    tokenizer = processor.tokenizer
    ids = tokenizer.convert_tokens_to_ids
    config = VoxtralConfig(
        audio_config={"model_type": "voxtral_encoder", "num_mel_bins": NUM_MEL_BINS, "hidden_size": hidden,
                      "intermediate_size": PROJECTOR_GROUP * hidden, "num_hidden_layers": layers,
                      "num_attention_heads": 2, "max_source_positions": stand_in.window_frames // 2},
        text_config={"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": hidden,
                     "intermediate_size": 2 * hidden, "num_hidden_layers": layers, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "head_dim": hidden // 2, "max_position_embeddings": 512,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e8}, "tie_word_embeddings": False,
                     "pad_token_id": tokenizer.pad_token_id, "bos_token_id": ids(BOS), "eos_token_id": ids(EOS)},
        audio_token_id=ids(AUDIO),
    )
    return seeded_model(VoxtralForConditionalGeneration, config, tokenizer, seed), processor


FAMILY = AudioFamily(
    name="Voxtral",
    model_types=("voxtral",),
    processor_classes=("VoxtralProcessor", "VoxtralAudioProcessor"),
    audio_placeholder=BEGIN_AUDIO + AUDIO,
    audio_token=AUDIO,
    feature_keys=("input_features",),  # no feature mask: the model takes none
    chat_audio_item=True,  # the chat template places the audio item: [INST][BEGIN_AUDIO][AUDIO...]text[/INST]
    head_on_targets=True,  # logits = lm_head(model.model(...).last_hidden_state)
    build_tiny=build_tiny,
    stand_in_processor=VoxtralAudioProcessor,
    chat_encoder=chat_encoder,  # the real VoxtralProcessor takes audio only through apply_chat_template
)
