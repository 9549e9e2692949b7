"""A student for a teacher that has no smaller sibling: keep K of the teacher's decoder layers.

The layer-selection recipe of DistilBERT and Minitron's depth pruning: the student is the teacher's own
architecture with ``K`` decoder layers, each copied from a chosen teacher layer; every other weight (embeddings,
audio encoder and projector, final norm, LM head) is copied unchanged, so the student starts from the teacher's
representations and shares its tokenizer and processor. Width is the teacher's: copying weights requires it.

By default the kept layers are spread evenly over the depth, first and last included (Minitron found the last
layers the least removable and DistilBERT kept every other layer); ``layer_ids`` chooses them explicitly.

Per-layer state outside the layers follows them too: the text config's per-layer lists (:data:`PER_LAYER_CONFIG`),
the blocks of weights that stack one block per layer (a family's ``per_layer_weights``: Gemma-3n's per-layer
embedding table and projection), and Gemma-3n's KV sharing (:func:`_kept_kv_sharing`).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .models import family_or_none, text_config

#: Text-config lists with one entry per decoder layer (Gemma-3n has all three), cut to the kept layers.
PER_LAYER_CONFIG = ("layer_types", "activation_sparsity_pattern", "intermediate_size")


def evenly_spaced_layers(num_layers: int, keep: int) -> list[int]:
    """``keep`` indices in ``[0, num_layers)``, evenly spaced, first and last included (``keep=1``: the last)."""
    if not 1 <= keep <= num_layers:
        raise ValueError(f"layers must be in [1, {num_layers}] (the teacher's decoder depth), got {keep}")
    if keep == 1:
        return [num_layers - 1]
    # round((n-1)·i/(k-1)) is strictly increasing for k ≤ n, so the indices are distinct
    return [round((num_layers - 1) * i / (keep - 1)) for i in range(keep)]


def chosen_layers(depth: int, *, layers: int | None = None, layer_ids: Sequence[int] | None = None) -> list[int]:
    """The teacher layers to keep, from a count (evenly spaced) or explicit ids, validated against ``depth``."""
    if (layers is None) == (layer_ids is None):
        raise ValueError("give exactly one of layers (a count) or layer_ids (which layers)")
    if layer_ids is None:
        return evenly_spaced_layers(depth, int(layers))
    kept = [int(i) for i in layer_ids]
    increasing = all(b > a for a, b in zip(kept, kept[1:], strict=False))
    if not kept or not increasing or kept[0] < 0 or kept[-1] >= depth:
        raise ValueError(f"layer_ids must be strictly increasing indices in [0, {depth}), got {list(layer_ids)}")
    return kept


def text_depth(config: Any) -> int:
    """The decoder depth a config declares (``num_hidden_layers`` of its text config)."""
    return int(text_config(config).num_hidden_layers)


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The dotted name and the ``ModuleList`` of the text decoder's layers (found through ``get_decoder()``)."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: get_decoder() has no .layers ModuleList; cannot select layers")
    for name, module in model.named_modules():
        if module is layers:
            return name, layers
    raise ValueError(f"{type(model).__name__}: the decoder's layers are not a submodule of the model")


def _construct(cls: type, config: Any) -> nn.Module:
    """``cls(config)`` without the random initialisation that the copied weights overwrite anyway."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5 kept it here
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        return cls(config)


def _kept_blocks(weight: Tensor, axis: int, kept: list[int], depth: int) -> Tensor | None:
    """The kept layers' blocks of a weight that stacks one equal block per decoder layer along ``axis``
    (layer-major), or ``None`` if its size there is not a multiple of ``depth``."""
    if weight.shape[axis] % depth:
        return None
    blocks = weight.unflatten(axis, (depth, -1))  # [..., depth, width, ...]
    return blocks.index_select(axis, torch.tensor(kept, device=weight.device)).flatten(axis, axis + 1)


def _kept_kv_sharing(text: Any, kept: list[int], depth: int, teacher_types: list[str]) -> dict[int, int]:
    """Set the student's ``num_kv_shared_layers`` (Gemma-3n: the last N decoder layers have no key/value
    projections and reuse those of the last earlier layer of their attention type) for the ``kept`` layers.

    Kept sharing layers keep sharing when the student keeps a non-sharing layer of each attention type they read
    (they then read the student's last such layer). Otherwise the student shares nothing and each kept sharing
    layer computes its own keys and values with the projections of the teacher layer it read them from.

    Returns:
        ``{student layer: teacher layer}`` whose key/value weights that student layer takes (empty when the
        sharing is kept or there is none).
    """
    shared = int(getattr(text, "num_kv_shared_layers", 0) or 0)
    if shared <= 0:
        return {}
    first = depth - shared  # the teacher's first sharing layer
    n = sum(i >= first for i in kept)
    student_types = getattr(text, "layer_types", None) or []
    producers = set(student_types[: len(kept) - n])
    if n == 0 or set(student_types[len(kept) - n:]) <= producers:
        text.num_kv_shared_layers = n
        return {}
    text.num_kv_shared_layers = 0
    source: dict[int, int] = {}
    for j, layer in enumerate(kept):
        if layer >= first:
            kind = teacher_types[layer]
            source[j] = max(i for i in range(first) if teacher_types[i] == kind)
    return source


def select_layers(teacher: nn.Module, *, layers: int | None = None,
                  layer_ids: Sequence[int] | None = None) -> tuple[nn.Module, list[int]]:
    """Build a student from ``teacher`` keeping only some decoder layers.

    Args:
        teacher: a Hugging Face model whose ``get_decoder()`` returns the text decoder (with ``.layers``) and whose
            config (or ``config.get_text_config()``) has ``num_hidden_layers``.
        layers: how many layers to keep, evenly spaced (:func:`evenly_spaced_layers`).
        layer_ids: or exactly which teacher layers to keep, strictly increasing.

    Returns:
        ``(student, kept_ids)``: a new model of the teacher's class and dtype, in eval mode, on the CPU, with
        ``len(kept_ids)`` decoder layers; student layer ``i`` holds a copy of teacher layer ``kept_ids[i]`` (and its
        blocks of the per-layer weights; a Gemma-3n KV-sharing layer whose attention type no kept non-sharing
        layer has also takes the key/value projections of the teacher layer it read them from).
    """
    prefix, teacher_layers = _decoder_layers(teacher)
    depth = len(teacher_layers)
    kept = chosen_layers(depth, layers=layers, layer_ids=layer_ids)

    config = copy.deepcopy(teacher.config)
    text = text_config(config)
    if getattr(text, "num_hidden_layers", None) != depth:
        raise ValueError(f"{type(teacher).__name__}: config num_hidden_layers "
                         f"({getattr(text, 'num_hidden_layers', None)}) does not match the decoder's {depth} layers")
    teacher_types = list(getattr(text, "layer_types", None) or [])
    text.num_hidden_layers = len(kept)
    # Per-layer settings (full vs sliding attention, Gemma-3n's sparsity and widths, ...) follow their layers.
    for key in PER_LAYER_CONFIG:
        values = getattr(text, key, None)
        if isinstance(values, list) and len(values) == depth:
            setattr(text, key, [values[i] for i in kept])
    kv_source = _kept_kv_sharing(text, kept, depth, teacher_types)

    student = _construct(type(teacher), config).to(teacher.dtype)
    state = teacher.state_dict()
    family = family_or_none(teacher)
    blocks = dict(family.per_layer_weights) if family is not None else {}
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    mapped = {}
    for key, value in student.state_dict().items():
        match = pattern.match(key)
        source = f"{prefix}.{kept[int(match.group(1))]}.{match.group(2)}" if match else key
        if match and source not in state and int(match.group(1)) in kv_source:
            # a KV-sharing layer that computes its own keys and values in the student: its source layer's weights
            source = f"{prefix}.{kv_source[int(match.group(1))]}.{match.group(2)}"
        if source not in state:
            raise ValueError(f"the student's {key} has no counterpart {source} in the teacher")
        weight = state[source]
        if weight.shape != value.shape:
            axis = next((a for suffix, a in blocks.items() if key.endswith(suffix)), None)
            weight = _kept_blocks(weight, axis, kept, depth) if axis is not None else None
            if weight is None or weight.shape != value.shape:
                raise ValueError(f"{type(teacher).__name__}: the student's {key} has shape {tuple(value.shape)} but "
                                 f"the teacher's {source} has {tuple(state[source].shape)}; layer selection cannot "
                                 "copy it (a weight with one block per layer is declared in its family's "
                                 "per_layer_weights, caad/models/)")
        mapped[key] = weight
    student.load_state_dict(mapped, strict=True)
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.eval(), kept
