"""Stage 1 — unified Pseudo-GT: one target response per record, built from its audio-derived metadata.

Two modes:

- ``template``: a Python format string over the record's ``label``, ``id``, ``instruction`` and metadata keys,
  e.g. ``"{label}"`` or ``"There are {count} beeps."``.
- ``teacher``: a seed description is rendered from the metadata (``"[sound] {description}"``) and the teacher's
  **text-only path** (no audio features) answers the instruction given that description, with greedy decoding.
  The target is therefore written in the teacher's own words but grounded in facts about the audio.

:func:`run_pseudo_gt` does either over a JSONL file, appending finished batches to the output so that an
interrupted run resumes where it stopped. Neither mode looks at the audio, so it is not decoded. The output
keeps each record's other fields, and a manifest beside it (``<out>.manifest.json``) records what produced it
(the input's hash, the mode, the template, the teacher): a resume with anything else is refused
(:class:`StageOutputMismatch`) or, with ``overwrite=True``, redone from scratch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .atomic import write_text_atomically
from .data import Record, RecordError, load_records, save_jsonl

logger = logging.getLogger(__name__)

DEFAULT_SEED_TEMPLATE = "[sound] {description}"
MANIFEST_VERSION = 1


class StageOutputMismatch(ValueError):
    """The existing Stage-1 output was produced from another input, mode, template or teacher."""


def describe_metadata(metadata: dict[str, Any]) -> str:
    """A one-line description of the metadata: its ``description`` entry if any, else ``"key: value, ..."``."""
    if metadata.get("description") not in (None, ""):
        return str(metadata["description"])
    return ", ".join(f"{k}: {v}" for k, v in metadata.items())


def _fields(record: Record) -> dict[str, Any]:
    # metadata first so that the record's own id/label/instruction win over same-named metadata keys
    fields: dict[str, Any] = dict(record.metadata)
    fields.setdefault("description", describe_metadata(record.metadata))
    fields.update(id=record.id, instruction=record.instruction)
    if record.label is not None:
        fields["label"] = record.label
    return fields


def render_template(record: Record, template: str = "{label}") -> str:
    """Format ``template`` with the record's fields.

    Fields: metadata keys, ``description`` (see :func:`describe_metadata`, unless metadata has its own),
    ``id``, ``instruction`` and ``label`` (when the record has one). A field the record lacks, or a malformed
    template, raises :class:`~caad.data.RecordError` naming the record id and the field.
    """
    fields = _fields(record)
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise RecordError(f"record {record.id!r}: malformed template {template!r}: {exc}") from exc
    for name in names:
        # "{}" / "{0}" would silently need positional arguments; "{a.b}" / "{a[0]}" index into field "a"
        key = name.split(".", 1)[0].split("[", 1)[0]
        if key == "" or key.isdigit():
            raise RecordError(f"record {record.id!r}: template {template!r} uses a positional field; name it")
        if key not in fields:
            raise RecordError(
                f"record {record.id!r}: template {template!r} needs field {key!r}, which the record lacks "
                f"(available: {sorted(fields)})"
            )
    try:
        return template.format_map(fields)
    except (KeyError, IndexError, AttributeError, ValueError) as exc:
        raise RecordError(f"record {record.id!r}: cannot render template {template!r}: {exc!r}") from exc


def _tokenizer_of(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def teacher_turn(seed: str, instruction: str) -> str:
    """The text of the teacher's user turn: the seed description stands where the audio would be."""
    return f"{seed}\n{instruction}"


def teacher_prompt(tokenizer: Any, seed: str, instruction: str) -> str:
    """The text-only prompt the teacher answers: the seed description stands where the audio would be."""
    content = teacher_turn(seed, instruction)
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "text", "text": content}]}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return content + "\n"


def pseudo_gt_with_teacher(
    records: Sequence[Record],
    model: Any,
    processor: Any,
    *,
    seed_template: str = DEFAULT_SEED_TEMPLATE,
    max_new_tokens: int = 16,
    batch_size: int = 8,
) -> list[str]:
    """Teacher-mode targets, one per record, in order.

    For each record the seed ``render_template(record, seed_template)`` (e.g. ``"[sound] 3 beeps, high pitch,
    loud"``) and the instruction form a chat prompt; the teacher generates greedily from ``input_ids`` and
    ``attention_mask`` only — no ``input_features``, i.e. its text-only path — at most ``max_new_tokens``
    tokens (for a processor that takes audio only through its chat template, the prompt is its family's
    :class:`~caad.models.ChatEncoder` encoding of that user turn). Prompts are left-padded in batches of
    ``batch_size``; the result is decoded without special tokens
    and stripped. ``processor`` is a processor with a ``.tokenizer`` or a tokenizer. Empty outputs are kept
    (and counted in a warning): they are what the teacher wrote.
    """
    import torch

    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    from .decoding import left_padded
    from .models import chat_encoder_of

    tokenizer = _tokenizer_of(processor)
    # A processor that takes audio only through its chat template (the real VoxtralProcessor) encodes the turn
    # itself: its tokenizer does not parse the special tokens of a rendered prompt.
    chat = chat_encoder_of(processor)
    seeds = [render_template(r, seed_template) for r in records]
    if chat is None:
        prompts = [teacher_prompt(tokenizer, seed, r.instruction) for seed, r in zip(seeds, records, strict=True)]
    else:  # the user turn's text (as teacher_prompt renders it), which chat.prompts encodes as a whole turn
        prompts = [teacher_turn(seed, r.instruction) for seed, r in zip(seeds, records, strict=True)]
    device = next(model.parameters()).device
    was_training, old_side = model.training, tokenizer.padding_side
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs: list[str] = []
    model.eval()
    # Left padding keeps every prompt's last token at the same position, which batched generation needs.
    tokenizer.padding_side = "left"
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                if chat is None:
                    enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
                else:
                    enc = left_padded(chat.prompts(prompts[start : start + batch_size], None)["input_ids"], pad_id)
                gen = model.generate(
                    input_ids=enc["input_ids"].to(device),
                    attention_mask=enc["attention_mask"].to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=pad_id,
                )
                new = gen[:, enc["input_ids"].shape[1] :]
                outputs.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    n_empty = sum(1 for o in outputs if not o)
    if n_empty:
        logger.warning("teacher wrote an empty pseudo-GT for %d of %d records", n_empty, len(outputs))
    return outputs


def _done_ids(out_path: str) -> set[str]:
    """Ids already written to ``out_path``; a torn last line (an interrupted write) is cut off the file."""
    if not os.path.isfile(out_path):
        return set()
    with open(out_path, encoding="utf-8") as f:
        lines = f.readlines()
    done: set[str] = set()
    good: list[str] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not line.endswith("\n"):
                raise ValueError("unterminated line")
        except ValueError as exc:
            if i == len(lines) - 1:  # only the final line can be torn by a crash mid-write
                logger.warning("dropping the incomplete last line of %s (an interrupted run)", out_path)
                with open(out_path, "w", encoding="utf-8") as f:
                    f.writelines(good)
                break
            raise RecordError(f"{out_path}, line {i + 1}: cannot resume from a corrupt output line: {exc}") from exc
        if "id" not in obj or "pseudo_gt" not in obj:
            raise RecordError(f"{out_path}, line {i + 1}: not a pseudo-GT output line (needs 'id' and 'pseudo_gt')")
        done.add(str(obj["id"]))
        good.append(line)
    return done


def _sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def teacher_fingerprint(model: Any, path: str | os.PathLike | None = None) -> str:
    """A cheap identity of a teacher: its config, the first 64 values of every parameter, and (for a local
    folder) its files' names and sizes.

    The weights are sampled, not hashed whole (gigabytes for a real teacher): a different teacher, or the same
    one trained further, changes the samples of practically every parameter.
    """
    import torch

    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    digest.update((config.to_json_string() if hasattr(config, "to_json_string") else repr(config)).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            sample = p.detach().reshape(-1)[:64].to(device="cpu", dtype=torch.float32)
            digest.update(name.encode() + sample.numpy().tobytes())
    if path is not None and Path(path).is_dir():
        for f in sorted(Path(path).iterdir()):
            if f.suffix in (".safetensors", ".bin", ".pt", ".json"):
                digest.update(f"{f.name}:{f.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def manifest_path(out_path: str | os.PathLike) -> str:
    """Where :func:`run_pseudo_gt` records what produced ``out_path``."""
    return os.fspath(out_path) + ".manifest.json"


def _producer(in_path: str, mode: str, template: str, seed_template: str, max_new_tokens: int, model: Any,
              teacher_path: str | None) -> dict[str, Any]:
    producer: dict[str, Any] = {"version": MANIFEST_VERSION, "input_sha256": _sha256_file(in_path), "mode": mode}
    if mode == "template":
        producer["template"] = template
    else:
        producer.update(seed_template=seed_template, max_new_tokens=max_new_tokens,
                        teacher=teacher_fingerprint(model, teacher_path))
    return producer


def _check_resume(in_path: str, out_path: str, producer: dict[str, Any], overwrite: bool) -> None:
    """Refuse (or with ``overwrite``, clear) an output that another input/mode/template/teacher produced."""
    has_output = os.path.isfile(out_path) and os.path.getsize(out_path) > 0
    mpath = manifest_path(out_path)
    if has_output and not overwrite:
        try:
            with open(mpath, encoding="utf-8") as f:
                recorded = json.load(f)
        except FileNotFoundError:
            raise StageOutputMismatch(f"{out_path} exists but has no {os.path.basename(mpath)}: it was not written "
                                      "by this caad pseudo-gt, so resuming it could keep stale targets") from None
        except ValueError as exc:
            raise StageOutputMismatch(f"{mpath} is corrupt ({exc})") from exc
        recorded = {k: v for k, v in recorded.items() if k != "input"}
        if recorded != producer:
            differ = sorted(k for k in set(recorded) | set(producer) if recorded.get(k) != producer.get(k))
            what = ", ".join(f"{k} {recorded.get(k)!r} -> {producer.get(k)!r}" if k != "input_sha256"
                             else "the input file's content" for k in differ)
            raise StageOutputMismatch(f"{out_path} was produced differently ({what})")
        return
    if has_output:
        logger.warning("overwriting %s: it is redone from scratch", out_path)
        os.remove(out_path)
    # written before the first output line: an output never exists without the record of what produced it
    write_text_atomically(mpath, json.dumps({**producer, "input": os.path.abspath(in_path)}, indent=2))


def run_pseudo_gt(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    mode: str = "template",
    template: str = "{label}",
    model: Any = None,
    processor: Any = None,
    seed_template: str = DEFAULT_SEED_TEMPLATE,
    max_new_tokens: int = 16,
    batch_size: int = 8,
    skip_bad: bool = False,
    target_sampling_rate: int | None = 16000,
    max_audio_seconds: float | None = None,
    progress: bool = True,
    overwrite: bool = False,
    teacher_path: str | os.PathLike | None = None,
) -> dict[str, int]:
    """Stage 1 over a JSONL file: write every record of ``in_path`` with a ``pseudo_gt`` field to ``out_path``.

    ``mode="template"`` renders ``template`` (:func:`render_template`); ``mode="teacher"`` needs ``model`` and
    ``processor`` (:func:`pseudo_gt_with_teacher`). Records are validated by :func:`~caad.data.load_records`
    (``skip_bad`` etc. as there; the audio is not decoded, so ``target_sampling_rate`` and ``max_audio_seconds``
    are not used and kept only for compatibility). Every field of an input record is kept in its output line.

    Resumable: records whose id is already in ``out_path`` are not recomputed, and each batch is appended and
    flushed as soon as it is done. ``<out_path>.manifest.json`` records the input file's SHA-256, the mode, the
    template (or seed template, ``max_new_tokens`` and :func:`teacher_fingerprint` of the teacher, read from
    ``teacher_path`` when given): resuming an output that another input, mode, template or teacher produced
    raises :class:`StageOutputMismatch`, unless ``overwrite=True``, which redoes it from scratch. A tqdm
    progress bar is shown when tqdm is installed and ``progress`` is true.

    Returns counts: ``{"total", "done_before", "written", "skipped_bad"}``.
    """
    if mode not in ("template", "teacher"):
        raise ValueError(f"mode must be 'template' or 'teacher', got {mode!r}")
    if mode == "teacher" and (model is None or processor is None):
        raise ValueError("mode='teacher' needs both model and processor")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    in_path, out_path = os.fspath(in_path), os.fspath(out_path)
    if os.path.abspath(in_path) == os.path.abspath(out_path):
        raise ValueError(f"out_path must differ from in_path ({in_path}); the input is read while output is written")
    del target_sampling_rate, max_audio_seconds  # neither mode decodes the audio
    producer = _producer(in_path, mode, template, seed_template, max_new_tokens, model,
                         None if teacher_path is None else os.fspath(teacher_path))
    records, n_bad = load_records(in_path, skip_bad=skip_bad, decode_audio=False)
    if n_bad:
        logger.warning("skipped %d bad record(s) of %s", n_bad, in_path)
    _check_resume(in_path, out_path, producer, overwrite)
    done = _done_ids(out_path)
    todo = [r for r in records if r.id not in done]
    if mode == "template":
        # render everything before writing anything: a template error then leaves the output untouched
        for r in todo:
            r.pseudo_gt = render_template(r, template)
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            pass
        else:
            bar = tqdm(total=len(records), initial=len(records) - len(todo), desc=f"pseudo-gt ({mode})", unit="rec")
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            if mode == "teacher":
                targets = pseudo_gt_with_teacher(
                    batch,
                    model,
                    processor,
                    seed_template=seed_template,
                    max_new_tokens=max_new_tokens,
                    batch_size=batch_size,
                )
                for r, t in zip(batch, targets, strict=True):
                    r.pseudo_gt = t
            save_jsonl(batch, out_path, append=True)
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    return {"total": len(records), "done_before": len(records) - len(todo), "written": len(todo), "skipped_bad": n_bad}
