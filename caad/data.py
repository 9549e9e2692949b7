"""Dynamic-SUPERB-compatible records: loading, validation and writing back.

A source record is a dict (one JSONL line, one list item, or one Hugging Face dataset row)::

    {"id": "...",                      # optional: the 1-based JSONL line number / 0-based index is used instead
     "audio": "clip.wav"               # a path (relative paths are relative to the JSONL file's folder)
           | {"path": "clip.wav"}      # the same, dict form
           | {"array": [...], "sampling_rate": 16000},   # in memory (HF datasets' decoded Audio too)
           | {"bytes": b"...", "path": ...},             # an encoded file (HF datasets' Audio(decode=False))
     "instruction": "...",             # required, non-empty
     "label": "...",                   # optional
     "metadata": {...},                # optional dict of audio-derived facts
     "pseudo_gt": "...",               # optional Stage-1 target
     ...}                              # any other field is kept (Record.extra) and written back

A JSONL file may start with a UTF-8 byte-order mark. Every per-record failure (invalid JSON or UTF-8, a field of
the wrong type, an unreadable or over-long audio file ...) is a bad record: a :class:`RecordError` naming it, or
skipped and counted with ``skip_bad=True``.

Optional packages, imported only when needed: ``soundfile`` (audio given as a path, and writing in-memory audio
as .wav), ``soxr`` (resampling), ``datasets`` (a `datasets.Dataset` source).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class RecordError(ValueError):
    """A record that cannot be used; the message names the record id and the problem."""


class MissingDependencyError(ImportError):
    """An optional package needed for this input is not installed; the message says what to install."""


@dataclass
class Record:
    """One validated example.

    Attributes:
        id: unique record id (string).
        audio: float32 mono waveform ``[T]``, ``T >= 1``, finite, at ``sampling_rate``; None when the records
            were loaded with ``decode_audio=False`` (then ``sampling_rate`` is 0).
        sampling_rate: samples per second of ``audio``.
        instruction: the non-empty question or task prompt.
        label: the reference answer, or None.
        metadata: audio-derived facts (label, transcript, counts, ...) that Stage 1 renders into a target.
        pseudo_gt: the Stage-1 target, or None before Stage 1.
        audio_path: absolute path of the source audio file when the audio came from a file (kept by
            :func:`save_jsonl`), else None.
        audio_source: the record's ``audio`` field as given (a relative path made absolute), kept for writing
            back a record loaded with ``decode_audio=False``.
        extra: the record's other fields (e.g. Dynamic-SUPERB extras), written back by :func:`save_jsonl`.
    """

    id: str
    audio: np.ndarray | None
    sampling_rate: int
    instruction: str
    label: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    pseudo_gt: str | None = None
    audio_path: str | None = None
    audio_source: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def duration(self) -> float:
        """Audio length in seconds (NaN when the audio was not decoded)."""
        if self.audio is None:
            return float("nan")
        return len(self.audio) / self.sampling_rate


def _require(module: str, package: str, why: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(f"{why} needs the optional package '{package}': pip install {package}") from exc


def _resample(audio: np.ndarray, sr: int, target: int | None, rid: str) -> tuple[np.ndarray, int]:
    if target is None or sr == target:
        return audio, sr
    soxr = _require("soxr", "soxr", f"record {rid!r}: resampling audio from {sr} Hz to {target} Hz")
    return np.asarray(soxr.resample(audio, sr, target), dtype=np.float32), target


def _to_mono(array: Any, rid: str) -> np.ndarray:
    try:
        audio = np.asarray(array, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise RecordError(f"record {rid!r}: audio array is not numeric ({exc})") from exc
    if audio.ndim == 2:
        # soundfile gives [T, C]; datasets/torch give [C, T]: the shorter axis is the channel axis.
        audio = audio.mean(axis=0 if audio.shape[0] < audio.shape[1] else 1, dtype=np.float32)
    if audio.ndim != 1:
        raise RecordError(f"record {rid!r}: audio must be 1-D (mono) or 2-D (channels), got shape {audio.shape}")
    return np.ascontiguousarray(audio)


_KNOWN_FIELDS = ("id", "audio", "instruction", "label", "metadata", "pseudo_gt")


def _sampling_rate(value: Any, rid: str) -> int:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value != int(value) or value <= 0):
        raise RecordError(f"record {rid!r}: sampling_rate must be a positive whole number of Hz, got {value!r}")
    return int(value)


def _check_duration(frames: int, sr: int, rid: str, max_audio_seconds: float | None, where: str) -> None:
    if max_audio_seconds is not None and frames / sr > max_audio_seconds:
        raise RecordError(f"record {rid!r}: audio{where} is {frames / sr:.2f} s long, more than "
                          f"max_audio_seconds={max_audio_seconds}")


def _read_file(path: str, rid: str, max_audio_seconds: float | None = None) -> tuple[np.ndarray, int]:
    if not os.path.isfile(path):
        raise RecordError(f"record {rid!r}: audio file not found: {path}")
    sf = _require("soundfile", "soundfile", f"record {rid!r}: reading audio file {path}")
    try:
        if max_audio_seconds is not None:  # the header gives the length: an over-long file is never decoded
            info = sf.info(path)
            _check_duration(info.frames, info.samplerate, rid, max_audio_seconds, f" file {path}")
        data, sr = sf.read(path, dtype="float32", always_2d=False)
    except RecordError:
        raise
    except Exception as exc:  # soundfile raises LibsndfileError/RuntimeError for unreadable or corrupt files
        raise RecordError(f"record {rid!r}: cannot read audio file {path}: {exc}") from exc
    return data, int(sr)


def _audio_path(audio: dict[str, Any], base_dir: str | None) -> str:
    path = os.fspath(audio["path"])
    if base_dir is not None and not os.path.isabs(path):
        path = os.path.join(base_dir, path)
    return os.path.abspath(path)


def _check_audio_field(audio: Any, rid: str, base_dir: str | None) -> tuple[Any, str | None]:
    """Check the audio field's form without decoding it; return (field with an absolute path, path or None)."""
    if audio is None:
        raise RecordError(f"record {rid!r}: no audio")
    if isinstance(audio, (str, os.PathLike)):
        path = _audio_path({"path": audio}, base_dir)
        if not os.path.isfile(path):
            raise RecordError(f"record {rid!r}: audio file not found: {path}")
        return path, path
    if isinstance(audio, dict):
        if audio.get("array") is not None:
            if audio.get("sampling_rate") is None:
                raise RecordError(f"record {rid!r}: audio array given without sampling_rate")
            _sampling_rate(audio["sampling_rate"], rid)
            return audio, None
        if audio.get("bytes"):
            return audio, None
        if isinstance(audio.get("path"), str) and audio["path"]:
            path = _audio_path(audio, base_dir)
            if not os.path.isfile(path):
                raise RecordError(f"record {rid!r}: audio file not found: {path}")
            return {**audio, "path": path}, path
    if hasattr(audio, "get_all_samples"):
        return audio, None
    raise RecordError(f"record {rid!r}: audio must be a path or a dict with array+sampling_rate or path")


def _decode_audio(audio: Any, rid: str, base_dir: str | None,
                  max_audio_seconds: float | None = None) -> tuple[np.ndarray, int, str | None]:
    """Return (raw array, sampling rate, absolute path or None) for any supported audio form.

    Files and encoded bytes longer than ``max_audio_seconds`` are refused from their header, before decoding.
    """
    if audio is None:
        raise RecordError(f"record {rid!r}: no audio")
    if isinstance(audio, (str, os.PathLike)):
        audio = {"path": os.fspath(audio)}
    if hasattr(audio, "get_all_samples"):  # datasets >= 4 decodes Audio columns to a torchcodec AudioDecoder
        samples = audio.get_all_samples()
        return np.asarray(samples.data, dtype=np.float32), int(samples.sample_rate), None
    if not isinstance(audio, dict):
        raise RecordError(f"record {rid!r}: audio must be a path or a dict with array+sampling_rate or path")
    if audio.get("array") is not None:
        if audio.get("sampling_rate") is None:
            raise RecordError(f"record {rid!r}: audio array given without sampling_rate")
        return audio["array"], _sampling_rate(audio["sampling_rate"], rid), None
    if audio.get("bytes"):  # datasets' Audio(decode=False) rows hold the encoded file's bytes
        sf = _require("soundfile", "soundfile", f"record {rid!r}: decoding audio bytes")
        try:
            if max_audio_seconds is not None:
                info = sf.info(io.BytesIO(audio["bytes"]))
                _check_duration(info.frames, info.samplerate, rid, max_audio_seconds, " (bytes)")
            data, sr = sf.read(io.BytesIO(audio["bytes"]), dtype="float32", always_2d=False)
        except RecordError:
            raise
        except Exception as exc:  # soundfile raises LibsndfileError/RuntimeError for undecodable data
            raise RecordError(f"record {rid!r}: cannot decode audio bytes: {exc}") from exc
        return data, int(sr), None
    if audio.get("path"):
        path = _audio_path(audio, base_dir)
        array, sr = _read_file(path, rid, max_audio_seconds)
        return array, sr, path
    raise RecordError(f"record {rid!r}: audio must be a path or a dict with array+sampling_rate or path")


def _make_record(
    raw: Any, default_id: str, base_dir: str | None, target_sampling_rate: int | None, max_audio_seconds: float | None,
    decode_audio: bool = True,
) -> Record:
    if not isinstance(raw, dict):
        raise RecordError(f"record {default_id!r}: expected a JSON object / dict, got {type(raw).__name__}")
    rid = raw.get("id")
    rid = default_id if rid is None or str(rid) == "" else str(rid)
    instruction = raw.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise RecordError(f"record {rid!r}: empty or missing instruction")
    metadata = raw.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise RecordError(f"record {rid!r}: metadata must be a dict, got {type(metadata).__name__}")
    label, pseudo_gt = raw.get("label"), raw.get("pseudo_gt")
    extra = {k: v for k, v in raw.items() if k not in _KNOWN_FIELDS}
    source, path = _check_audio_field(raw.get("audio"), rid, base_dir)
    if not decode_audio:
        return Record(id=rid, audio=None, sampling_rate=0, instruction=instruction,
                      label=None if label is None else str(label), metadata=dict(metadata),
                      pseudo_gt=None if pseudo_gt is None else str(pseudo_gt), audio_path=path, audio_source=source,
                      extra=extra)
    array, sr, path = _decode_audio(raw.get("audio"), rid, base_dir, max_audio_seconds)
    if sr <= 0:
        raise RecordError(f"record {rid!r}: sampling_rate must be positive, got {sr}")
    audio = _to_mono(array, rid)
    if audio.size == 0:
        raise RecordError(f"record {rid!r}: audio is empty")
    if not np.isfinite(audio).all():
        raise RecordError(f"record {rid!r}: audio contains NaN or inf")
    # The duration check uses the source rate, before resampling, so an over-long clip is not resampled for nothing.
    if max_audio_seconds is not None and audio.size / sr > max_audio_seconds:
        raise RecordError(
            f"record {rid!r}: audio is {audio.size / sr:.2f} s long, more than max_audio_seconds={max_audio_seconds}"
        )
    audio, sr = _resample(audio, sr, target_sampling_rate, rid)
    return Record(
        id=rid,
        audio=audio,
        sampling_rate=sr,
        instruction=instruction,
        label=None if label is None else str(label),
        metadata=dict(metadata),
        pseudo_gt=None if pseudo_gt is None else str(pseudo_gt),
        audio_path=path,
        audio_source=source,
        extra=extra,
    )


def _iter_jsonl(path: str) -> Iterator[tuple[str, Any]]:
    # Bytes, decoded line by line: one non-UTF-8 line is one bad record, not a failed file.
    with open(path, "rb") as f:
        for lineno, data in enumerate(f, start=1):
            if lineno == 1 and data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (Windows editors)
                data = data[3:]
            where = f"record {str(lineno)!r} (line {lineno} of {path})"
            try:
                line = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield str(lineno), RecordError(f"{where}: not UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            if not line.strip():
                continue
            try:
                yield str(lineno), json.loads(line)
            except json.JSONDecodeError as exc:
                # yielded as an error so that skip_bad can count it like any other bad record
                yield str(lineno), RecordError(f"{where}: invalid JSON: {exc}")


def _iter_source(source: Any) -> tuple[Iterable[tuple[str, Any]], str | None]:
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"records file not found: {path}")
        return _iter_jsonl(path), os.path.dirname(os.path.abspath(path))
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        return ((str(i), item) for i, item in enumerate(source)), None
    if type(source).__module__.startswith("datasets"):
        _require("datasets", "datasets", "loading a Hugging Face dataset")  # present, since we hold one of its objects
        if not hasattr(source, "__len__") or not hasattr(source, "__getitem__"):
            raise TypeError("only map-style datasets.Dataset sources are supported (not IterableDataset/DatasetDict)")
        return ((str(i), source[i]) for i in range(len(source))), None
    raise TypeError(f"source must be a JSONL path, a list of dicts or a datasets.Dataset, got {type(source).__name__}")


def load_records(
    source: str | os.PathLike | Sequence[dict[str, Any]] | Any,
    *,
    skip_bad: bool = False,
    target_sampling_rate: int | None = 16000,
    max_audio_seconds: float | None = None,
    decode_audio: bool = True,
) -> tuple[list[Record], int]:
    """Load and validate records; return ``(records, number of bad records skipped)``.

    ``source`` is a JSONL path, a list of dicts, or a Hugging Face ``datasets.Dataset`` (map-style). Audio is
    converted to float32 mono and resampled to ``target_sampling_rate`` (None keeps each record's own rate).
    A record without an id gets its 1-based JSONL line number, or its 0-based list/dataset index, as id.

    Bad records — invalid JSON, missing/unreadable audio file, NaN/inf or empty audio, empty instruction,
    non-dict metadata, audio longer than ``max_audio_seconds`` (measured before resampling), a duplicate id —
    raise :class:`RecordError` naming the record id and the problem, or with ``skip_bad=True`` are skipped and
    counted. Any other failure while making one record is a bad record too. A missing optional package
    (soundfile, soxr) raises :class:`MissingDependencyError` either way, since skipping every record for an
    installation problem would hide it. Audio files longer than ``max_audio_seconds`` are refused from their
    header, before decoding.

    ``decode_audio=False`` checks the audio field's form (and that a file exists) without reading it: the records
    have ``audio=None`` (what Stage 1, which never looks at the audio, needs).
    """
    items, base_dir = _iter_source(source)
    records: list[Record] = []
    seen: set[str] = set()
    n_bad = 0
    for default_id, raw in items:
        try:
            if isinstance(raw, RecordError):
                raise raw
            try:
                rec = _make_record(raw, default_id, base_dir, target_sampling_rate, max_audio_seconds, decode_audio)
            except (RecordError, MissingDependencyError):
                raise
            except Exception as exc:  # whatever one record's content makes fail is that record's problem
                raise RecordError(f"record {default_id!r}: {type(exc).__name__}: {exc}") from exc
            if rec.id in seen:
                raise RecordError(f"record {rec.id!r}: duplicate id")
        except RecordError:
            if not skip_bad:
                raise
            n_bad += 1
            continue
        seen.add(rec.id)
        records.append(rec)
    return records, n_bad


def _safe_name(rid: str) -> str:
    # ids may hold any characters; the hash keeps distinct ids distinct after sanitising
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", rid)[:64]
    return f"{stem}-{hashlib.sha1(rid.encode('utf-8')).hexdigest()[:8]}"


def record_to_dict(record: Record, out_dir: str) -> dict[str, Any]:
    """The JSON-ready dict :func:`save_jsonl` writes for ``record`` into a JSONL file in ``out_dir``.

    Audio from a file stays a path (relative to ``out_dir`` when the file lies under it, else absolute).
    In-memory audio is written as float32 ``<out_dir>/audio/<id>-<hash>.wav`` with soundfile when it is
    installed, else inlined as ``{"array": [...], "sampling_rate": sr}`` (larger, but needs no package).
    """
    out_dir = os.path.abspath(out_dir)
    if record.audio_path is not None:
        rel = os.path.relpath(record.audio_path, out_dir)
        audio: Any = record.audio_path if rel.startswith(os.pardir) else rel
        if isinstance(record.audio_source, dict):  # keep the dict form and its other keys
            audio = {**record.audio_source, "path": audio}
    elif record.audio is None:  # not decoded: written back as given
        audio = record.audio_source
    else:
        try:
            import soundfile as sf
        except ImportError:
            audio = {"array": record.audio.astype(np.float32).tolist(), "sampling_rate": record.sampling_rate}
        else:
            rel = os.path.join("audio", _safe_name(record.id) + ".wav")
            os.makedirs(os.path.join(out_dir, "audio"), exist_ok=True)
            # FLOAT subtype: a round trip returns exactly the same float32 samples (PCM_16 would quantise them)
            sf.write(os.path.join(out_dir, rel), record.audio, record.sampling_rate, subtype="FLOAT")
            audio = rel
    out: dict[str, Any] = {
        **record.extra,
        "id": record.id,
        "audio": audio,
        "instruction": record.instruction,
        "label": record.label,
        "metadata": record.metadata,
    }
    if record.pseudo_gt is not None:
        out["pseudo_gt"] = record.pseudo_gt
    return out


def save_jsonl(records: Iterable[Record], path: str | os.PathLike, *, append: bool = False) -> None:
    """Write ``records`` as JSONL to ``path`` (``append=True`` adds to an existing file); see :func:`record_to_dict`.

    The output loads back with :func:`load_records` to equal records (same ids, float32 audio, texts, metadata).
    """
    path = os.fspath(path)
    out_dir = os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(record_to_dict(rec, out_dir), ensure_ascii=False) + "\n")
        f.flush()
