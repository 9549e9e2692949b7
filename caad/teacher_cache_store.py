"""The on-disk offline teacher cache (SPEC §9): manifest, shards, and reading rows back.

A cache is one folder::

    manifest.json               the options that define the content, the shards done so far, ``complete``
    shard-00000.safetensors     one shard per block of ``records_per_shard`` consecutive records
    ...

A shard holds the sparse contrastive targets of its records' target tokens in CSR layout (R records,
N target tokens, E support entries in all)::

    record_offsets    int64 [R + 1]  rows of record r: [record_offsets[r], record_offsets[r + 1]), position-major
    row_offsets       int64 [N + 1]  support entries of row i: [row_offsets[i], row_offsets[i + 1])
    support_ids       int32 [E]      token ids of the support S (no -1 pads: rows have their own length)
    support_logprobs  fp16|fp32 [E]  log p_v of the contrasted distribution p = softmax(z / tau), v in S
    tail_logmass      fp32  [N]      log of p's mass outside S; -inf when S is the exact support
    target_ids        int32 [N]      the Pseudo-GT token of the row (checked against the batch's labels)

and, in the safetensors metadata, the record ids (JSON) and the fingerprint of the manifest fields that
define the content. Why safetensors CSR and not Parquet/Arrow (``benchmarks/bench_teacher_cache.py``,
``test_storage_format``, k = 32 rows of the demo teacher, V = 399): uncompressed Arrow IPC takes 1.07x our bytes,
Parquet (zstd) 0.40x (int32 ids of a 399-token vocabulary compress well; less so at V = 152k), and both read a
whole table faster (6.5x, 13x) once it is decoded into memory. The trainer, though, reads records in random
order: a Parquet record means decoding its row group, or holding the decoded cache in RAM, where a memory-mapped
safetensors shard gives any record as a slice of the page cache (10.6k rows/s per-record random access, with
padding), keeps exact dtypes and needs no pyarrow to train.

Writes are atomic (a temporary name, then ``os.replace``), so a killed run never leaves a half-written file
under a final name; :mod:`caad.teacher_cache` records a shard in the manifest only after its rename.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

FORMAT = "caad-teacher-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOGPROB_DTYPES = {"float16": torch.float16, "float32": torch.float32}

#: Manifest fields that define a cache's content: a resumed pass must match all of them, and
#: :func:`check_manifest` names the first that differs. ``shards``, ``complete`` and ``stats`` are progress.
CONTENT_FIELDS = ("format", "format_version", "caad_version", "teacher", "alpha", "plausibility_beta",
                  "temperature", "k_max", "logprob_dtype", "text_only_view", "vocab_size", "max_length", "data",
                  "records_per_shard", "batch_size", "num_shards")


class TeacherCacheError(ValueError):
    """A cache that cannot be used as asked (mismatched options, incomplete, corrupt, wrong records);
    the message names the field or record and says what to do."""


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def config_sha256(config: Any) -> str:
    """SHA-256 of a model config's canonical JSON, without the fields that name where or how it was loaded
    (so the same teacher loaded from another folder, or saved by another transformers version, hashes equal)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    volatile = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash",
                "_attn_implementation_autoset", "_attn_implementation"}

    def clean(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: clean(v) for k, v in sorted(x.items()) if k not in volatile}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return hashlib.sha256(json.dumps(clean(d), sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(manifest: Mapping[str, Any]) -> str:
    """A short hash of the content-defining fields; stamped into every shard so that a stray shard from
    another cache is never taken for one of this cache's."""
    head = {k: manifest.get(k) for k in CONTENT_FIELDS}
    return hashlib.sha256(json.dumps(head, sort_keys=True).encode()).hexdigest()[:16]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary name in the same folder, then rename (atomic)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(folder: Path, manifest: Mapping[str, Any]) -> None:
    atomic_write_bytes(folder / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the cache in ``folder``; TeacherCacheError when there is none or it is not one."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise TeacherCacheError(f"{folder} is not a teacher cache (no {MANIFEST}); build one with caad teacher-cache")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise TeacherCacheError(f"{path}: not valid JSON ({exc}); rebuild the cache") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise TeacherCacheError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise TeacherCacheError(f"{path}: format_version {manifest.get('format_version')} is not the supported "
                                f"{FORMAT_VERSION}; rebuild the cache with this version of caad")
    return manifest


def _same(want: Any, got: Any) -> bool:
    if isinstance(want, float) or isinstance(got, float):
        return isinstance(got, (int, float)) and isinstance(want, (int, float)) and float(want) == float(got)
    return want == got


def check_manifest(manifest: Mapping[str, Any], expected: Mapping[str, Any], where: str, fix: str) -> None:
    """Raise TeacherCacheError naming the first field of ``expected`` (dotted for nested dicts, e.g.
    ``teacher.config_sha256``) whose value differs from ``manifest``'s."""
    for key, want in expected.items():
        got = manifest.get(key)
        if isinstance(want, Mapping) and isinstance(got, Mapping):
            for sub, w in want.items():
                if not _same(w, got.get(sub)):
                    raise TeacherCacheError(f"{where}: manifest field {key}.{sub} is {got.get(sub)!r}, "
                                            f"expected {w!r}; {fix}")
        elif not _same(want, got):
            raise TeacherCacheError(f"{where}: manifest field {key} is {got!r}, expected {want!r}; {fix}")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


@dataclass
class RecordTargets:
    """The cached rows of one record, position-major (row j predicts the record's j-th target token).

    Attributes:
        target_ids: ``[T]`` int64.
        row_lengths: ``[T]`` int64, support size of each row.
        support_ids: ``[E]`` int64, the rows' supports concatenated.
        support_logprobs: ``[E]`` (the cache's logprob dtype).
        tail_logmass: ``[T]`` float32 (-inf where the support is exact).
    """

    target_ids: Tensor
    row_lengths: Tensor
    support_ids: Tensor
    support_logprobs: Tensor
    tail_logmass: Tensor


def encode_shard(record_ids: Sequence[str], records: Sequence[RecordTargets], fp: str,
                 logprob_dtype: torch.dtype) -> bytes:
    """Serialise the records' rows into one safetensors shard (see the module docstring)."""
    from safetensors.torch import save

    lengths = [int(r.target_ids.numel()) for r in records]
    row_lengths = torch.cat([r.row_lengths for r in records]) if records else torch.zeros(0, dtype=torch.long)
    record_offsets = torch.zeros(len(records) + 1, dtype=torch.long)
    record_offsets[1:] = torch.tensor(lengths, dtype=torch.long).cumsum(0)
    row_offsets = torch.zeros(row_lengths.numel() + 1, dtype=torch.long)
    row_offsets[1:] = row_lengths.cumsum(0)
    tensors = {
        "record_offsets": record_offsets,
        "row_offsets": row_offsets,
        "support_ids": torch.cat([r.support_ids for r in records]).to(torch.int32),
        "support_logprobs": torch.cat([r.support_logprobs for r in records]).to(logprob_dtype),
        "tail_logmass": torch.cat([r.tail_logmass for r in records]).to(torch.float32),
        "target_ids": torch.cat([r.target_ids for r in records]).to(torch.int32),
    }
    return save({k: v.contiguous() for k, v in tensors.items()},
                metadata={"record_ids": json.dumps(list(record_ids)), "fingerprint": fp})


def sparse_rows_to_records(ids: Tensor, logprobs: Tensor, tail: Tensor, target_ids: Tensor,
                           lengths: Sequence[int]) -> list[RecordTargets]:
    """Split padded sparse rows (``ids [N, K]`` with -1 pads, ``logprobs [N, K]``, ``tail [N]``,
    ``target_ids [N]``; records' rows consecutive, ``lengths`` rows each) into per-record CSR pieces."""
    ids, logprobs, tail, target_ids = ids.cpu(), logprobs.cpu(), tail.cpu(), target_ids.cpu()
    valid = ids >= 0
    out, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        v = valid[sl]
        out.append(RecordTargets(target_ids=target_ids[sl].long(), row_lengths=v.sum(1).long(),
                                 support_ids=ids[sl][v].long(), support_logprobs=logprobs[sl][v],
                                 tail_logmass=tail[sl].float()))
        start += n
    return out


class TeacherCache:
    """A complete cache opened for reading: rows by record id, memory-mapped (shards opened lazily).

    Args:
        folder: the cache folder.
        expected: manifest fields the caller's options must match (see :func:`check_manifest`), e.g.
            ``{"alpha": 1.0, "temperature": 2.0}``; a mismatch raises TeacherCacheError naming the field.
    """

    def __init__(self, folder: str | os.PathLike, expected: Mapping[str, Any] | None = None) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        check_manifest(self.manifest, expected or {}, f"teacher cache {self.folder}",
                       "train with the options the cache was built with, or rebuild it with caad teacher-cache")
        done, total = len(self.manifest.get("shards", {})), self.manifest.get("num_shards")
        if not self.manifest.get("complete"):
            raise TeacherCacheError(f"teacher cache {self.folder} is incomplete ({done} of {total} shards): rerun "
                                    "caad teacher-cache with the same options to finish it")
        self.logprob_dtype = LOGPROB_DTYPES[self.manifest["logprob_dtype"]]
        self.vocab_size = int(self.manifest["vocab_size"])
        self._fp = fingerprint(self.manifest)
        self._where: dict[str, tuple[int, int]] = {}
        for index, entry in self.manifest["shards"].items():
            for pos, rid in enumerate(entry["record_ids"]):
                self._where[rid] = (int(index), pos)
        self._handles: dict[int, Any] = {}

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers (spawn) get a copy without open mmaps
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def __contains__(self, record_id: str) -> bool:
        return record_id in self._where

    def __len__(self) -> int:
        return len(self._where)

    def _shard(self, index: int) -> dict[str, Any]:
        arrays = self._handles.get(index)
        if arrays is None:
            path = self.folder / self.manifest["shards"][str(index)]["file"]
            if not path.is_file():
                raise TeacherCacheError(f"teacher cache {self.folder}: {path.name} is missing; rebuild the cache")
            arrays, metadata = map_safetensors(path)
            if metadata.get("fingerprint") != self._fp:
                raise TeacherCacheError(f"teacher cache {self.folder}: {path.name} belongs to another cache "
                                        "(fingerprint mismatch); rebuild the cache")
            self._handles[index] = arrays
        return arrays

    def record(self, record_id: str) -> RecordTargets:
        """The cached rows of ``record_id``; TeacherCacheError when the cache does not hold it."""
        where = self._where.get(record_id)
        if where is None:
            raise TeacherCacheError(f"record {record_id!r} is not in the teacher cache {self.folder}; build the cache "
                                    "from the same data file as the training run")
        shard = self._shard(where[0])
        r0, r1 = (int(x) for x in shard["record_offsets"][where[1]:where[1] + 2])
        offsets = shard["row_offsets"][r0:r1 + 1].astype(np.int64)
        e0, e1 = int(offsets[0]), int(offsets[-1])

        def take(name: str, lo: int, hi: int) -> Tensor:  # copies only the slice out of the memory map
            return torch.from_numpy(np.array(shard[name][lo:hi]))

        return RecordTargets(
            target_ids=take("target_ids", r0, r1).long(), row_lengths=torch.from_numpy(np.diff(offsets)),
            support_ids=take("support_ids", e0, e1).long(), support_logprobs=take("support_logprobs", e0, e1),
            tail_logmass=take("tail_logmass", r0, r1))


_NUMPY_DTYPES = {"I64": np.int64, "I32": np.int32, "F16": np.float16, "F32": np.float32}


def map_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Memory-map a safetensors file: ``({name: read-only numpy view}, metadata)``.

    The format (8-byte little-endian header length, a JSON header of dtypes, shapes and byte ranges, then the
    data) is simple enough to map directly: a record's rows are then a slice of the page cache, where the
    library's per-call ``get_slice`` costs ~100 µs each, a dozen times per training example.
    """
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    metadata = header.pop("__metadata__", None) or {}
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size) if path.stat().st_size > 8 + size else None
    arrays = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dtype = _NUMPY_DTYPES[info["dtype"]]
        raw = data[begin:end] if data is not None else np.zeros(0, np.uint8)
        arrays[name] = raw.view(dtype).reshape(info["shape"])
    return arrays, metadata


def pad_rows(records: Sequence[RecordTargets], lengths: Sequence[int] | None = None
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Stack records' rows (the first ``lengths[b]`` of record b, all when None) into the padded layout of
    ``sparse_contrastive_kd_loss``: ``(ids [N, K] int64 with -1 pads, logprobs [N, K] (0 at pads),
    tail [N] float32, target_ids [N] int64)`` with K the longest support among the rows."""
    parts_len, parts_ids, parts_lp, parts_tail, parts_tgt = [], [], [], [], []
    for b, r in enumerate(records):
        t = int(r.target_ids.numel()) if lengths is None else int(lengths[b])
        n_entries = int(r.row_lengths[:t].sum())
        parts_len.append(r.row_lengths[:t])
        parts_ids.append(r.support_ids[:n_entries])
        parts_lp.append(r.support_logprobs[:n_entries])
        parts_tail.append(r.tail_logmass[:t])
        parts_tgt.append(r.target_ids[:t])
    # numpy, not torch: these are small host arrays, where torch's per-op dispatch (and its thread pool on a
    # busy machine) costs more than the work
    row_len = torch.cat(parts_len).numpy()
    n = row_len.size
    k = max(int(row_len.max()) if n else 0, 1)
    # Entry e of the flat support goes to row `row_of[e]`, column `e - row_start[row_of[e]]`.
    row_of = np.repeat(np.arange(n), row_len)
    starts = np.zeros(n, dtype=np.int64)
    starts[1:] = np.cumsum(row_len)[:-1]
    col = np.arange(row_of.size) - starts[row_of]
    flat_lp = torch.cat(parts_lp)
    ids = np.full((n, k), -1, dtype=np.int64)
    logprobs = np.zeros((n, k), dtype=flat_lp.numpy().dtype)
    ids[row_of, col] = torch.cat(parts_ids).numpy()
    logprobs[row_of, col] = flat_lp.numpy()
    return (torch.from_numpy(ids), torch.from_numpy(logprobs), torch.cat(parts_tail).float(),
            torch.cat(parts_tgt).long())


def stats_of(records: Sequence[RecordTargets]) -> dict[str, float]:
    """Token count, support entries and rows with a tail, for the manifest's ``stats``."""
    tokens = sum(int(r.target_ids.numel()) for r in records)
    entries = sum(int(r.row_lengths.sum()) for r in records)
    tails = sum(int(torch.isfinite(r.tail_logmass).sum()) for r in records)
    return {"tokens": tokens, "support_entries": entries, "rows_with_tail": tails}


def mean_support(stats: Mapping[str, float]) -> float:
    return stats["support_entries"] / stats["tokens"] if stats.get("tokens") else math.nan
