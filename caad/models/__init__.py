"""Model families: what CAAD needs to know about an audio-language architecture, one module per family.

The method layer (collator, synchronized teacher forcing, Stage 1, evaluation, contrastive decoding) is written
once against :class:`AudioFamily`; a family says how a user turn with audio is rendered, which processor
outputs carry the audio (dropped for the text-only view, or fed as silence), whether the LM head can be applied
to the gathered target rows only (exact when the forward is ``lm_head(base_model(...).last_hidden_state)``), and
how to build a tiny random instance for tests. A processor that takes audio only through its chat template (the
real ``VoxtralProcessor``) is driven through its family's ``chat_encoder`` (:class:`ChatEncoder`), which encodes
whole user turns where the other processors get rendered prompt strings.

Adding a family is one file here: define ``FAMILY = AudioFamily(...)`` and list the module in ``_MODULES``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np

#: The family modules, imported on first lookup (each imports transformers lazily too).
_MODULES = ("qwen2_audio", "qwen2_5_omni", "audio_flamingo3", "voxtral", "granite_speech", "gemma3n")


@dataclass(frozen=True)
class AudioFamily:
    """One audio-language architecture, as the method layer sees it.

    Attributes:
        name: a display name (``"Qwen2-Audio"``).
        model_types: the ``config.model_type`` values of its checkpoints.
        processor_classes: class names of its processors (how a collator built from a processor finds its family).
        audio_placeholder: the text of one audio clip in a prompt, which the processor expands into audio tokens.
        audio_token: the token the processor repeats and the model replaces by audio embeddings.
        feature_keys: the processor outputs that carry the audio (all absent in the "drop" text-only view).
        chat_audio_item: render a chat user turn as ``[{"type": "audio"}, {"type": "text", ...}]`` (the family's
            chat template places the audio); ``False``: as one string, ``placeholder + "\\n" + instruction``.
        head_on_targets: the model's logits are exactly ``get_output_embeddings()(base_model(...).last_hidden_state)``
            (no scaling or soft-capping in between), so the head may be applied to the gathered target rows only.
        build_tiny: ``build_tiny(hidden=, layers=, seed=) -> (model, processor)``: a random tiny instance with an
            offline tokenizer carrying the family's special tokens (for tests and the demo).
        stand_in_processor: a class standing in for the family's real processor where that one cannot be built
            offline (its image/video parts need packages the test machine lacks). Its ``save_pretrained(folder)``
            writes :data:`STAND_IN_MARKER` naming the class, and ``from_pretrained(folder)`` loads it back, so a
            folder it saved is never half-loaded by ``AutoProcessor`` (which would return a bare tokenizer).
        load_hook: called (no arguments) before caad loads a checkpoint of this family with ``from_pretrained``,
            e.g. to let a tiny test model's stand-in part load where a package the real part needs is missing
            (Gemma-3n's vision tower); ``None``: nothing to prepare.
        per_layer_weights: ``(name suffix, axis)`` of weights outside the decoder layers that stack one block per
            decoder layer along ``axis``, layer-major (Gemma-3n's per-layer embeddings): layer selection keeps the
            blocks of the kept layers (:func:`caad.make_student.select_layers`).
        chat_encoder: ``chat_encoder(processor_or_tokenizer) -> ChatEncoder | None``: for a processor that takes audio
            only through its chat template (the real ``VoxtralProcessor`` refuses rendered prompts holding audio
            tokens, and its tokenizer does not parse special-token strings), a :class:`ChatEncoder` that the
            collator, the generation prompts and Stage 1 use instead of rendering prompt strings; ``None`` for any
            other object (e.g. the family's stand-in). :func:`chat_encoder_of` asks every family.
        container_model_types: ``config.model_type`` of released checkpoints that hold this family's model inside a
            larger one (the full Qwen2.5-Omni: thinker, talker and vocoder); caad loads them as
            :attr:`model_class` (transformers maps the weight names; the other parts are skipped), see
            :func:`container_family`.
        model_class: the transformers class of this family's model (required with ``container_model_types``).
    """

    name: str
    model_types: tuple[str, ...]
    processor_classes: tuple[str, ...]
    audio_placeholder: str
    audio_token: str
    feature_keys: tuple[str, ...]
    chat_audio_item: bool = False
    head_on_targets: bool = False
    build_tiny: Callable[..., tuple[Any, Any]] | None = field(default=None, compare=False, repr=False)
    stand_in_processor: type | None = field(default=None, compare=False, repr=False)
    load_hook: Callable[[], None] | None = field(default=None, compare=False, repr=False)
    per_layer_weights: tuple[tuple[str, int], ...] = ()
    chat_encoder: Callable[[Any], ChatEncoder | None] | None = field(default=None, compare=False, repr=False)
    container_model_types: tuple[str, ...] = ()
    model_class: str | None = None

    def __post_init__(self) -> None:
        if self.container_model_types and not self.model_class:
            raise ValueError(f"family {self.name}: container_model_types needs model_class (the class to load)")


class ChatEncoder(Protocol):
    """Token ids of caad's prompts and targets for a processor that takes audio only through its chat template.

    The prompt of one example is one user turn, the audio clip (if any) then the instruction, encoded with the
    generation prompt; the target is what an assistant turn holding the text adds after it. ``prompt + target`` is
    therefore the chat template's encoding of the whole conversation, and the target ids do not depend on the prompt.
    """

    def prompts(self, instructions: Sequence[str], audios: Sequence[np.ndarray] | None) -> dict[str, Any]:
        """Encode ``B`` user turns.

        Args:
            instructions: ``B`` instructions (text after the audio).
            audios: ``B`` 1-D float32 waveforms at the feature extractor's rate, one per turn; ``None``: text only.

        Returns:
            ``{"input_ids": B unpadded lists of ids}`` plus, with audio, the family's ``feature_keys`` (tensors).
        """
        ...

    def targets(self, texts: Sequence[str]) -> list[list[int]]:
        """The ids an assistant turn holding each of ``texts`` adds after the prompt (its end-of-turn included)."""
        ...


def chat_encoder_of(obj: Any) -> ChatEncoder | None:
    """The :class:`ChatEncoder` of a processor (or tokenizer) that takes audio only through its chat template, or
    ``None`` for a processor that takes rendered prompts (``processor(text=, audio=, sampling_rate=)``)."""
    for family in families().values():
        if family.chat_encoder is not None and (encoder := family.chat_encoder(obj)) is not None:
            return encoder
    return None


#: The file a stand-in processor's ``save_pretrained`` writes: ``{"processor_class": <class name>}``.
STAND_IN_MARKER = "caad_processor.json"


_registry: dict[str, AudioFamily] = {}


def families() -> dict[str, AudioFamily]:
    """Every supported family, by name."""
    if not _registry:
        for module in _MODULES:
            family = importlib.import_module(f"{__name__}.{module}").FAMILY
            _registry[family.name] = family
    return dict(_registry)


def _unsupported(what: str) -> ValueError:
    supported = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in families().values())
    return ValueError(
        f"{what} is not a supported audio-language model family; supported: {supported}. A family needs its "
        "audio placeholder and token, the processor outputs that carry audio, and whether its logits are "
        "lm_head(base_model(...)): add one module to caad/models/ (see caad/models/__init__.py)")


def family_of(obj: Any) -> AudioFamily:
    """The family of a model, a config, a processor, a ``model_type`` string, or a family (returned as is)."""
    if isinstance(obj, AudioFamily):
        return obj
    if isinstance(obj, str):
        model_type = obj
    else:
        config = obj if hasattr(obj, "model_type") and not hasattr(obj, "config") else getattr(obj, "config", None)
        model_type = getattr(config, "model_type", None)
    if model_type is not None:
        for family in families().values():
            if model_type in family.model_types:
                return family
        raise _unsupported(f"model_type {model_type!r}")
    cls = type(obj).__name__
    for family in families().values():
        if cls in family.processor_classes:
            return family
    raise _unsupported(f"a {cls}")


def text_config(config: Any) -> Any:
    """The language model's config of a (possibly composite) model config: ``config.get_text_config()`` where the
    config has one, else the config itself."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def container_family(model_type: str) -> AudioFamily | None:
    """The family whose model a checkpoint of ``model_type`` holds inside a larger one (``"qwen2_5_omni"``: the
    Qwen2.5-Omni thinker, beside its talker), or ``None``. Such a checkpoint is loaded as the family's
    ``model_class``, not as its own ``architectures`` entry."""
    for family in families().values():
        if model_type in family.container_model_types:
            return family
    return None


def family_or_none(obj: Any) -> AudioFamily | None:
    """Like :func:`family_of`, but ``None`` for an architecture no family describes."""
    try:
        return family_of(obj)
    except ValueError:
        return None


def write_stand_in_marker(folder: Any, processor: Any) -> None:
    """Record in ``folder`` that it holds a stand-in processor of class ``type(processor)``."""
    import json
    from pathlib import Path

    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / STAND_IN_MARKER).write_text(json.dumps({"processor_class": type(processor).__name__}) + "\n",
                                                encoding="utf-8")


class StandInProcessor:
    """Base of the stand-in processors: a feature extractor and a tokenizer, saved side by side with
    :data:`STAND_IN_MARKER`. A subclass implements ``__call__`` (the family's audio path) and names how its
    feature extractor loads back (:meth:`load_feature_extractor`)."""

    def __init__(self, feature_extractor: Any, tokenizer: Any) -> None:
        self.feature_extractor, self.tokenizer = feature_extractor, tokenizer

    @staticmethod
    def load_feature_extractor(folder: Any) -> Any:
        """The feature extractor :meth:`save_pretrained` wrote to ``folder`` (a Whisper one unless overridden)."""
        from transformers import WhisperFeatureExtractor

        return WhisperFeatureExtractor.from_pretrained(folder)

    def save_pretrained(self, folder: Any) -> None:
        """Write the feature extractor, the tokenizer and the stand-in marker to ``folder``."""
        self.feature_extractor.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        write_stand_in_marker(folder, self)

    @classmethod
    def from_pretrained(cls, folder: Any) -> Any:
        """Load what :meth:`save_pretrained` wrote."""
        from transformers import AutoTokenizer

        return cls(cls.load_feature_extractor(folder), AutoTokenizer.from_pretrained(folder))


def load_processor(folder: Any) -> Any:
    """The processor saved in ``folder``: a family's stand-in where the folder's marker names one, otherwise
    ``transformers.AutoProcessor.from_pretrained(folder)``."""
    import json
    from pathlib import Path

    marker = Path(folder) / STAND_IN_MARKER
    if marker.is_file():
        name = json.loads(marker.read_text(encoding="utf-8")).get("processor_class")
        for family in families().values():
            if family.stand_in_processor is not None and family.stand_in_processor.__name__ == name:
                return family.stand_in_processor.from_pretrained(folder)
        raise ValueError(f"{marker} names processor class {name!r}, which no family of caad/models/ stands in for")
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(folder)
