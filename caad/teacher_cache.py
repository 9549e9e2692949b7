"""Stage 2a, ``caad teacher-cache``: run the teacher once, store its sparse contrastive targets (SPEC §9).

Both teacher views of every Pseudo-GT example are teacher-forced in one batched forward, with the same
:class:`~caad.teacher.DualViewCollator` and :func:`~caad.teacher.teacher_forward_both_views` the trainer uses;
the contrasted distribution ``p = softmax(z / tau)`` of each target token is reduced to its support (exact
under plausibility masking when ``k_max`` >= the support, else the top ``k_max`` of ``z / tau`` plus the tail
mass) by :func:`caad_kernels.sparse_targets.sparse_teacher_targets` and written to the shards of
:mod:`caad.teacher_cache_store`. Training from the cache (``CAADTrainer(teacher_cache=DIR)``) then needs no
teacher in memory.

Resumable: records are cut into shards of ``records_per_shard`` consecutive records; a shard is written under
a temporary name and renamed, and only then recorded in the manifest, so a rerun recomputes exactly the shards
the manifest lacks (a shard renamed just before a kill is overwritten, never duplicated).

Multi-process (``torchrun`` / ``accelerate launch``): the shards not yet done are dealt to the ranks in a
deterministic order (``todo[rank::world]``), each rank writes its own shards, and rank 0 alone writes the
manifest after each round (the ranks' new shards are gathered over a gloo group). A shard's content depends
only on its records and the options, so the shards of any number of processes equal the single-process cache.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["build_teacher_cache", "examples_sha256", "teacher_identity"]

#: Test hook: the process exits hard (as if killed) after committing this many shards, before the manifest
#: records the last of them.
EXIT_AFTER_ENV = "CAAD_TEACHER_CACHE_EXIT_AFTER_SHARDS"


def examples_sha256(examples: Sequence[Mapping[str, Any]]) -> str:
    """SHA-256 over the examples' ids, instructions, targets and audio samples (the data's identity when no
    file is given)."""
    h = hashlib.sha256()
    for ex in examples:
        audio = ex.get("audio")
        if isinstance(audio, Mapping):
            h.update(str(audio.get("sampling_rate")).encode())
            audio = audio.get("array")
        for part in (ex.get("id"), ex.get("instruction"), ex.get("pseudo_gt")):
            h.update(repr(part).encode() + b"\0")
        h.update(np.ascontiguousarray(np.asarray(audio, dtype=np.float32)).tobytes())
    return h.hexdigest()


def teacher_identity(teacher: Any, path: str | os.PathLike | None = None) -> dict[str, Any]:
    """``{"path", "config_sha256", "dtype"}`` of a teacher model (path: where it was loaded from)."""
    import torch

    from .teacher_cache_store import config_sha256

    dtype = next(teacher.parameters()).dtype
    name = path if path is not None else getattr(teacher, "name_or_path", None) or None
    return {"path": None if name is None else str(name), "config_sha256": config_sha256(teacher.config),
            "dtype": str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else str(dtype)}


def _teacher_vocab(teacher: Any) -> int:
    head = teacher.get_output_embeddings() if hasattr(teacher, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    cfg = teacher.config
    return int(getattr(cfg, "vocab_size", None) or cfg.text_config.vocab_size)


class _Ranks:
    """This process's rank and world size, and the few collectives the pass needs (no-ops alone)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist, self.owned, self.group = dist, False, None
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        else:
            self.world = int(os.environ.get("WORLD_SIZE", "1"))
            self.rank = int(os.environ.get("RANK", "0"))
            if self.world > 1:  # torchrun / accelerate launch set the env:// rendezvous variables
                dist.init_process_group("gloo")
                self.owned = True
        if self.world > 1 and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")  # object collectives on CPU, whatever the main group

    def broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        self.dist.all_gather_object(out, obj, group=self.group)
        return out

    def close(self) -> None:
        if self.owned:
            self.dist.destroy_process_group()


def _check_examples(examples: Sequence[Mapping[str, Any]]) -> list[str]:
    ids, seen = [], set()
    for i, ex in enumerate(examples):
        rid = ex.get("id") if isinstance(ex, Mapping) else None
        if rid is None or str(rid) == "":
            raise ValueError(f"example {i} has no 'id': the cache pairs rows with records by id")
        rid = str(rid)
        if rid in seen:
            raise ValueError(f"example {i}: duplicate id {rid!r}")
        seen.add(rid)
        ids.append(rid)
    return ids


def _check_options(alpha: float, plausibility_beta: float, temperature: float, k_max: int, batch_size: int,
                   records_per_shard: int, logprob_dtype: str) -> None:
    from caad_kernels.options import KDOptions

    from .teacher_cache_store import LOGPROB_DTYPES

    KDOptions(alpha=alpha, plausibility_beta=plausibility_beta, temperature=temperature)  # SPEC §3 messages
    for name, value in (("k_max", k_max), ("batch_size", batch_size), ("records_per_shard", records_per_shard)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if logprob_dtype not in LOGPROB_DTYPES:
        raise ValueError(f"logprob_dtype must be one of {tuple(LOGPROB_DTYPES)}, got {logprob_dtype!r}")


def _prepare_output(folder: Path, header: dict[str, Any], ranks: _Ranks) -> str | None:
    """Rank 0: create the manifest, or check that an existing one was made with the same options. Returns an
    error message (broadcast, so that every rank stops) or None."""
    from .teacher_cache_store import MANIFEST, TeacherCacheError, check_manifest, read_manifest, write_manifest

    try:
        if (folder / MANIFEST).exists():
            existing = read_manifest(folder)
            check_manifest(existing, header, f"cannot resume the teacher cache {folder}",
                           "use the options it was built with, or another --out folder")
        else:
            if folder.exists() and any(p for p in folder.iterdir() if not p.name.startswith(".")):
                raise TeacherCacheError(f"{folder} is not empty and holds no teacher cache; choose an empty --out "
                                        "folder")
            folder.mkdir(parents=True, exist_ok=True)
            write_manifest(folder, {**header, "shards": {}, "complete": False,
                                    "stats": {"tokens": 0, "support_entries": 0, "rows_with_tail": 0}})
        for stale in folder.glob(".*.tmp-*"):  # temporary files of a killed run; no writer is active yet
            stale.unlink()
    except TeacherCacheError as exc:
        return str(exc)
    return None


def build_teacher_cache(
    examples: Sequence[Mapping[str, Any]],
    teacher: Any,
    processor: Any,
    out_dir: str | os.PathLike,
    *,
    alpha: float = 1.0,
    plausibility_beta: float = 0.0,
    temperature: float = 1.0,
    k_max: int = 32,
    logprob_dtype: str = "float16",
    text_only_view: str = "drop",
    batch_size: int = 8,
    records_per_shard: int = 256,
    vocab_size: int | None = None,
    max_length: int | None = None,
    data_path: str | os.PathLike | None = None,
    data_sha256: str | None = None,
    teacher_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write (or finish) the offline teacher cache of ``examples`` in ``out_dir``.

    Args:
        examples: dicts with ``id`` (unique), ``audio``, ``instruction``, ``pseudo_gt`` (as the trainer's).
        teacher: the teacher model (put in eval mode here; on the device and in the dtype it should run in).
        processor: the processor of the training run (its tokenizer makes the target ids).
        out_dir: the cache folder: created, or resumed when it holds a manifest with the same options.
        alpha, plausibility_beta, temperature: the contrast (SPEC §2), as in training.
        k_max: the largest support stored per token (under plausibility the support is exact when it is no
            larger; otherwise the top ``k_max`` of ``z / tau`` plus the tail mass).
        logprob_dtype: ``"float16"`` (6 bytes per support entry with the int32 id) or ``"float32"`` (8).
        text_only_view: ``"drop"`` or ``"silence"`` (SPEC §8), as in training.
        batch_size: examples per teacher forward (batches never cross shards).
        records_per_shard: consecutive records per shard (the unit of resumption and of parallelism).
        vocab_size: keep the first ``vocab_size`` teacher columns (a padded teacher head, like the trainer's
            ``teacher_vocab_slice``); default the teacher head's size. Training checks it against the student's.
        max_length: the collator's ``max_length`` (targets truncated as in training); None = no truncation.
        data_path, data_sha256: the data file and its hash, for the manifest; by default the hash is
            :func:`examples_sha256` of ``examples``.
        teacher_path: where the teacher was loaded from, for the manifest.
        progress: show a tqdm progress bar with target tokens/s (rank 0).

    Returns:
        ``{"out_dir", "records", "shards", "shards_written", "shards_done_before", "tokens_written",
        "tokens_per_s", "mean_support", "complete"}`` (tokens over all ranks).
    """

    import caad_kernels

    from .teacher import DualViewCollator
    from .teacher_cache_store import (
        LOGPROB_DTYPES,
        atomic_write_bytes,
        encode_shard,
        fingerprint,
        mean_support,
        read_manifest,
        shard_name,
        stats_of,
        write_manifest,
    )

    _check_options(alpha, plausibility_beta, temperature, k_max, batch_size, records_per_shard, logprob_dtype)
    record_ids = _check_examples(examples)
    full_vocab = _teacher_vocab(teacher)
    if vocab_size is None:
        vocab_size = full_vocab
    elif not (isinstance(vocab_size, int) and 1 <= vocab_size <= full_vocab):
        raise ValueError(f"vocab_size must be an int in [1, {full_vocab}] (the teacher head's size), "
                         f"got {vocab_size!r}")
    collator = DualViewCollator(processor, text_only_view=text_only_view, max_length=max_length)
    teacher.requires_grad_(False)
    teacher.eval()

    folder = Path(out_dir)
    num_shards = math.ceil(len(examples) / records_per_shard)
    header = {
        "format": "caad-teacher-cache", "format_version": 1, "caad_version": caad_kernels.__version__,
        "teacher": teacher_identity(teacher, teacher_path),
        "alpha": float(alpha), "plausibility_beta": float(plausibility_beta), "temperature": float(temperature),
        "k_max": k_max, "logprob_dtype": logprob_dtype, "text_only_view": text_only_view, "vocab_size": vocab_size,
        "max_length": max_length,
        "data": {"path": None if data_path is None else os.fspath(data_path),
                 "sha256": data_sha256 or examples_sha256(examples), "records": len(examples)},
        "records_per_shard": records_per_shard, "batch_size": batch_size, "num_shards": num_shards,
    }
    fp = fingerprint(header)
    torch_lp_dtype = LOGPROB_DTYPES[logprob_dtype]

    ranks = _Ranks()
    try:
        error = _prepare_output(folder, header, ranks) if ranks.rank == 0 else None
        error = ranks.broadcast(error)
        if error is not None:
            from .teacher_cache_store import TeacherCacheError

            raise TeacherCacheError(error)
        manifest = read_manifest(folder)
        done_before = len(manifest["shards"])
        todo = [i for i in range(num_shards) if str(i) not in manifest["shards"]]
        mine = todo[ranks.rank::ranks.world]
        rounds = math.ceil(len(todo) / ranks.world)
        exit_after = int(os.environ.get(EXIT_AFTER_ENV, "0") or 0)

        bar = None
        if progress and ranks.rank == 0:
            from tqdm.auto import tqdm

            initial = sum(len(e["record_ids"]) for e in manifest["shards"].values())
            bar = tqdm(total=len(examples), initial=initial, desc="teacher-cache", unit="rec")
        committed, my_tokens, start = 0, 0, time.perf_counter()
        try:
            for j in range(rounds):
                entry = None
                if j < len(mine):
                    index = mine[j]
                    lo, hi = index * records_per_shard, min((index + 1) * records_per_shard, len(examples))
                    pieces = []
                    for b0 in range(lo, hi, batch_size):
                        chunk = list(examples[b0:min(b0 + batch_size, hi)])
                        pieces += _sparse_batch(teacher, collator(chunk), vocab_size, alpha, plausibility_beta,
                                                temperature, k_max)
                    name = shard_name(index)
                    data = encode_shard(record_ids[lo:hi], pieces, fp, torch_lp_dtype)
                    atomic_write_bytes(folder / name, data)
                    committed += 1
                    stats = stats_of(pieces)
                    my_tokens += stats["tokens"]
                    entry = (index, {"file": name, "record_ids": record_ids[lo:hi], "rows": stats["tokens"],
                                     "bytes": len(data), **stats})
                    if exit_after and committed >= exit_after:
                        os._exit(75)  # as if killed: the shard is on disk, the manifest does not list it yet
                entries = [e for e in ranks.gather(entry) if e is not None]
                if ranks.rank == 0:
                    for index, info in entries:
                        manifest["shards"][str(index)] = info
                        for key in manifest["stats"]:
                            manifest["stats"][key] += info[key]
                    write_manifest(folder, manifest)
                    if bar is not None:
                        bar.update(sum(len(info["record_ids"]) for _, info in entries))
                        elapsed = max(time.perf_counter() - start, 1e-9)
                        bar.set_postfix(tokens_per_s=f"{my_tokens * ranks.world / elapsed:.0f}")
        finally:
            if bar is not None:
                bar.close()
        elapsed = time.perf_counter() - start
        tokens = sum(ranks.gather(my_tokens))
        if ranks.rank == 0:
            manifest["complete"] = len(manifest["shards"]) == num_shards
            write_manifest(folder, manifest)
        manifest = ranks.broadcast(manifest if ranks.rank == 0 else None)
    finally:
        ranks.close()
    return {"out_dir": str(folder), "records": len(examples), "shards": num_shards, "shards_written": len(todo),
            "shards_done_before": done_before, "tokens_written": tokens,
            "tokens_per_s": round(tokens / elapsed, 1) if elapsed > 0 else None,
            "mean_support": round(mean_support(manifest["stats"]), 3), "complete": manifest["complete"]}


def _sparse_batch(teacher: Any, batch: Mapping[str, Any], vocab_size: int, alpha: float, plausibility_beta: float,
                  temperature: float, k_max: int) -> list:
    """One synchronized dual-view teacher forward -> the batch's records' sparse rows."""
    from caad_kernels.sparse_targets import sparse_teacher_targets

    from .teacher import teacher_forward_both_views
    from .teacher_cache_store import sparse_rows_to_records

    a, t, target_ids = teacher_forward_both_views(teacher, batch)
    a = a[:, :vocab_size]
    t = t[:, :vocab_size] if alpha != 0.0 else None
    ids, logprobs, tail = sparse_teacher_targets(a, t, alpha=alpha, plausibility_beta=plausibility_beta,
                                                 temperature=temperature, k_max=k_max)
    return sparse_rows_to_records(ids, logprobs, tail, target_ids, batch["target_lengths"].tolist())


# ----------------------------------------------------------------------------------------------------------------------
# The `caad teacher-cache` command, and `caad train --teacher-cache`
# ----------------------------------------------------------------------------------------------------------------------

_PROG = "caad teacher-cache"
_DEFAULTS: dict[str, Any] = {
    "data": None, "teacher": None, "processor": None, "out": None, "alpha": 1.0, "plausibility_beta": 0.0,
    "temperature": 1.0, "k_max": 32, "logprob_dtype": "float16", "text_only_view": "drop", "batch_size": 8,
    "records_per_shard": 256, "vocab_size": None, "teacher_dtype": None, "device": None, "template": "{label}",
    "skip_bad": False, "no_progress": False,
}


def add_parser(sub: Any) -> None:
    """Register ``caad teacher-cache`` on the ``caad`` command's subparsers."""
    p = sub.add_parser("teacher-cache", help="Stage 2a: run the teacher once and store its sparse contrastive targets "
                       "(resumable; torchrun for several processes)")
    p.add_argument("--data", default=None, help="Pseudo-GT JSONL (records with pseudo_gt, or label + --template)")
    p.add_argument("--teacher", default=None, help="teacher checkpoint (save_pretrained folder)")
    p.add_argument("--processor", default=None, help="processor of the training run (default: the teacher's)")
    p.add_argument("--out", default=None, help="cache folder (created; resumed when it holds the same options)")
    p.add_argument("--alpha", type=float, default=None, help="contrast strength, as in training (default 1.0)")
    p.add_argument("--plausibility-beta", type=float, default=None,
                   help="adaptive plausibility beta_p, as in training (default 0); > 0 makes the support exact")
    p.add_argument("--temperature", type=float, default=None, help="softmax temperature, as in training (default 1)")
    p.add_argument("--k-max", type=int, default=None, help="largest support stored per token (default 32)")
    p.add_argument("--logprob-dtype", choices=["float16", "float32"], default=None, help="default float16")
    p.add_argument("--text-only-view", choices=["drop", "silence"], default=None,
                   help="the teacher's text-only view, as in training: drop the audio, or silence (default drop)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per teacher forward (default 8)")
    p.add_argument("--records-per-shard", type=int, default=None, help="default 256")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="keep the first N teacher columns (a padded teacher head: the student's vocabulary size)")
    p.add_argument("--teacher-dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="run the teacher in this dtype (default: as saved)")
    p.add_argument("--device", default=None, help="teacher device (default cuda:LOCAL_RANK, else cpu)")
    p.add_argument("--template", default=None, help="Pseudo-GT template for records without one")
    p.add_argument("--skip-bad", action="store_true", default=None,
                   help="skip bad records (counted) instead of failing")
    p.add_argument("--no-progress", action="store_true", default=None, help="no progress bar")
    p.add_argument("--config", help="YAML/JSON file with the same options")
    p.set_defaults(func=cmd_teacher_cache)


def cmd_teacher_cache(args: Any) -> int:
    import json

    import torch

    from .cli import _load_model, _merged, _processor, _records
    from .data import MissingDependencyError, RecordError
    from .pseudo_gt import render_template
    from .teacher_cache_store import TeacherCacheError, file_sha256

    opts = _merged(args, _DEFAULTS)
    missing = [f"--{k}" for k in ("data", "teacher", "out") if not opts[k]]
    if missing:
        raise SystemExit(f"{_PROG}: error: {', '.join(missing)} required (see caad teacher-cache --help)")
    for key in ("data", "teacher", "processor"):
        if opts[key] and not os.path.exists(opts[key]):
            raise SystemExit(f"{_PROG}: error: --{key} {opts[key]} does not exist")
    try:
        processor = _processor(opts["processor"] or opts["teacher"])
        records = _records(opts["data"], opts["skip_bad"], processor)
        examples = [{"id": r.id, "audio": r.audio, "instruction": r.instruction,
                     "pseudo_gt": r.pseudo_gt if r.pseudo_gt is not None else render_template(r, opts["template"])}
                    for r in records]
        kw = {k: opts[k] for k in ("alpha", "plausibility_beta", "temperature", "k_max", "logprob_dtype",
                                   "text_only_view", "batch_size", "records_per_shard", "vocab_size")}
        _check_options(**{k: kw[k] for k in ("alpha", "plausibility_beta", "temperature", "k_max", "batch_size",
                                              "records_per_shard", "logprob_dtype")})
    except (RecordError, MissingDependencyError, ValueError, TypeError) as exc:
        raise SystemExit(f"{_PROG}: error: {exc}") from None
    teacher = _load_model(opts["teacher"])
    if opts["teacher_dtype"]:
        teacher = teacher.to(getattr(torch, opts["teacher_dtype"]))
    device = opts["device"] or (f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
    try:
        summary = build_teacher_cache(examples, teacher.to(device), processor, opts["out"], **kw,
                                      data_path=opts["data"], data_sha256=file_sha256(opts["data"]),
                                      teacher_path=opts["teacher"], progress=not opts["no_progress"])
    except (TeacherCacheError, ValueError) as exc:
        raise SystemExit(f"{_PROG}: error: {exc}") from None
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0


def open_cache_for_train_cli(folder: str, train_args: Any, data_path: str, teacher_path: str | None) -> Any:
    """``caad train --teacher-cache``: open the cache for ``train_args`` and check that it was built from this data
    file (and this teacher, when ``--teacher`` is given too); one-line ``caad train: error:`` otherwise."""
    from .cached_teacher import open_for_training
    from .teacher_cache_store import TeacherCacheError, config_sha256, file_sha256

    expected: dict[str, Any] = {"data": {"sha256": file_sha256(data_path)}}
    try:
        if teacher_path is not None:
            from transformers import AutoConfig

            expected["teacher"] = {"config_sha256": config_sha256(AutoConfig.from_pretrained(teacher_path))}
        return open_for_training(folder, train_args.kd_options(), train_args.text_only_view,
                                 fused_linear=train_args.fused_linear, grad_in_forward=train_args.kd_grad_in_forward,
                                 expected=expected)
    except (TeacherCacheError, ValueError) as exc:
        raise SystemExit(f"caad train: error: {exc}") from None
