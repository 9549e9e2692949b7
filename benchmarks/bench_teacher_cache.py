"""The offline teacher cache: bytes per target token, storage formats, student step time with the cache.

    python -m pytest benchmarks/bench_teacher_cache.py --benchmark-only -q    # measure
    python -m pytest benchmarks/bench_teacher_cache.py --benchmark-disable -q # smoke: every case once

Rows come from a *trained* tiny teacher (a random head gives near-uniform rows, whose supports say nothing):
the demo's teacher recipe (:mod:`caad.demo`), trained once and cached in the demo's teacher cache; the smoke
run trains a brief version of it (``CAAD_BENCH_FULL_TEACHER=1`` uses the demo's full recipe, minutes).

- ``test_cache_bytes_per_token``: ``caad teacher-cache`` over Pseudo-GT targets (the demo's "{label}" answers
  and its longer metadata descriptions), fp16 log-probs; without plausibility for k in {8, 32, 128}, and with
  β_p in {0.01, 0.1} and k_max = V (exact supports). extra_info: ``bytes_per_token`` (shard bytes over target
  tokens), ``mean_support``, ``rows_with_tail``, and ``dense_over_cache``: the two bf16 ``[V]`` teacher rows a
  live step needs (4·V bytes) over the cache's bytes per token.
- ``test_storage_format``: the same rows (k = 32) as our safetensors CSR shard, as Parquet (zstd) and as Arrow
  IPC with list columns: ``bytes_per_token`` and ``read_rows_per_s`` (read every record back into padded
  tensors, the trainer's access pattern), and ratios against safetensors.
- ``test_student_step``: one student step (forward, loss, backward) on a batch of 16, with the live teacher
  (its dual-view forward + the dense loss) or with the cache (collation with the cached rows + the sparse loss),
  for the demo's teacher and for a larger CPU-sized teacher (hidden 256, 4 layers). extra_info:
  ``live_over_cache`` from both medians timed in the same case. Nothing asserts a speed.
"""

from __future__ import annotations

import io
import os
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from caad.demo import DemoSettings, _teacher  # noqa: E402
from caad.synthetic import beep_records  # noqa: E402
from caad.teacher_cache import build_teacher_cache  # noqa: E402
from caad.teacher_cache_store import TeacherCache, pad_rows, shard_name  # noqa: E402
from caad.tiny_models import build_processor, build_tokenizer, tiny_qwen2_audio  # noqa: E402
from caad.trainer import CAADConfig, CAADTrainer  # noqa: E402

ALPHA, TEMPERATURE = 1.0, 1.0
STEP_BATCH = 16
REPEATS = 5


@pytest.fixture(scope="module")
def trained(request, tmp_path_factory) -> dict[str, Any]:
    smoke = request.config.getoption("benchmark_disable")
    full = os.environ.get("CAAD_BENCH_FULL_TEACHER") == "1"
    settings = DemoSettings(output_dir=str(tmp_path_factory.mktemp("demo")))
    if not full:  # brief, but trained: its rows are peaked like the full teacher's, if less so
        settings.n_train, settings.teacher_epochs = (32, 2) if smoke else (120, 8)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    train = beep_records(settings.n_train, seed=settings.seed)
    teacher, where = _teacher(settings, train, tokenizer, processor)
    teacher.eval()
    n = 16 if smoke else 96
    records = beep_records(n, seed=settings.seed + 7)
    # half short answers ("{label}"), half longer targets (the metadata description)
    examples = [{"id": r["id"], "audio": r["audio"]["array"], "instruction": r["instruction"],
                 "pseudo_gt": r["label"] if i % 2 else r["metadata"]["description"]} for i, r in enumerate(records)]
    return {"tokenizer": tokenizer, "processor": processor, "teacher": teacher, "examples": examples,
            "teacher_dir": str(where), "recipe": "full demo" if full else f"{settings.teacher_epochs} epochs on "
            f"{settings.n_train} clips", "root": tmp_path_factory.mktemp("caches")}


def _cache(trained: dict[str, Any], teacher: Any, name: str, **kw: Any) -> tuple[Path, dict[str, Any]]:
    out = trained["root"] / name
    options = dict(alpha=ALPHA, plausibility_beta=0.0, temperature=TEMPERATURE, k_max=32, logprob_dtype="float16",
                   batch_size=8, records_per_shard=32, progress=False)
    options.update(kw)
    summary = build_teacher_cache(trained["examples"], teacher, trained["processor"], out, **options)
    return out, summary


def _shard_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("shard-*.safetensors"))


@pytest.mark.parametrize("case", ["k8", "k32", "k128", "beta0.01", "beta0.1"])
def test_cache_bytes_per_token(benchmark, trained, case):
    kw = {"k_max": int(case[1:])} if case.startswith("k") else {"plausibility_beta": float(case[4:]), "k_max": 1 << 20}
    vocab = int(trained["teacher"].get_output_embeddings().weight.shape[0])
    kw["k_max"] = min(kw["k_max"], vocab)
    folder, summary = benchmark.pedantic(lambda: _cache(trained, trained["teacher"], f"{case}-{time.time_ns()}", **kw),
                                         rounds=1, iterations=1)
    cache = TeacherCache(folder)
    stats = cache.manifest["stats"]
    per_token = _shard_bytes(folder) / stats["tokens"]
    benchmark.extra_info.update(kd_rel_error_vs_dense=_error_vs_dense(trained, cache, kw.get("plausibility_beta", 0.0)))
    benchmark.extra_info.update(
        case=case, vocab=vocab, teacher=trained["recipe"], tokens=stats["tokens"], bytes_per_token=round(per_token, 2),
        mean_support=round(stats["support_entries"] / stats["tokens"], 2),
        rows_with_tail=round(stats["rows_with_tail"] / stats["tokens"], 3),
        dense_over_cache=round(4 * vocab / per_token, 2), cache_pass_tokens_per_s=summary["tokens_per_s"])


def _error_vs_dense(trained: dict[str, Any], cache: TeacherCache, beta: float) -> float:
    """|sparse − dense| / dense of the KD loss of an untrained student against this cache's rows (fp16 log-probs
    and the top-k cut included) vs the live teacher's dense rows: what the bytes saved cost."""
    from caad.teacher import DualViewCollator, gather_targets, teacher_forward_both_views
    from caad_kernels import contrastive_kd_loss, sparse_contrastive_kd_loss

    examples = trained["examples"]
    batch = DualViewCollator(trained["processor"])(examples)
    a, t, targets = teacher_forward_both_views(trained["teacher"], batch)
    student = tiny_qwen2_audio(trained["tokenizer"], hidden=32, layers=1, seed=200)
    with torch.no_grad():
        view = {k: v for k, v in batch["audio_view"].items() if k != "labels"}
        s, _ = gather_targets(student(**view).logits, batch["audio_view"]["labels"])
        dense = contrastive_kd_loss(s, a, t, targets, alpha=ALPHA, plausibility_beta=beta, temperature=TEMPERATURE,
                                    backend="torch")
        ids, lp, tail, cached_targets = pad_rows([cache.record(ex["id"]) for ex in examples])
        assert torch.equal(cached_targets, targets)
        sparse = sparse_contrastive_kd_loss(s, ids, lp, tail if torch.isfinite(tail).any() else None, targets,
                                            temperature=TEMPERATURE, backend="torch")
    return float(((sparse - dense).abs() / dense.abs()).item())


# ---------------------------------------------------------------------------------------------------------------------
# Storage formats
# ---------------------------------------------------------------------------------------------------------------------


def _records_of(cache: TeacherCache) -> tuple[list[str], list[Any]]:
    ids = [rid for e in cache.manifest["shards"].values() for rid in e["record_ids"]]
    return ids, [cache.record(rid) for rid in ids]


def _arrow_table(ids: list[str], records: list[Any]):
    """One row per target token: record id, position, target, support ids / log-probs as lists, tail."""
    import pyarrow as pa

    rid, pos, tgt, sup, lps, tail = [], [], [], [], [], []
    for r_id, rec in zip(ids, records, strict=True):
        start = 0
        for j, n in enumerate(rec.row_lengths.tolist()):
            rid.append(r_id)
            pos.append(j)
            tgt.append(int(rec.target_ids[j]))
            sup.append(rec.support_ids[start:start + n].to(torch.int32).numpy())
            lps.append(rec.support_logprobs[start:start + n].numpy())
            tail.append(float(rec.tail_logmass[j]))
            start += n
    return pa.table({
        "record_id": pa.array(rid), "position": pa.array(pos, pa.int32()), "target_id": pa.array(tgt, pa.int32()),
        "support_ids": pa.array(sup, pa.list_(pa.int32())), "support_logprobs": pa.array(lps, pa.list_(pa.float16())),
        "tail_logmass": pa.array(tail, pa.float32())})


def _read_arrow_rows(table) -> int:
    """Every record's rows back into padded tensors, from a table already read."""
    import numpy as np

    groups: dict[str, list[int]] = {}
    for i, r in enumerate(table.column("record_id").to_pylist()):
        groups.setdefault(r, []).append(i)
    ids_col, lp_col = table.column("support_ids").combine_chunks(), table.column("support_logprobs").combine_chunks()
    offsets = ids_col.offsets.to_numpy()
    flat_ids, flat_lp = ids_col.values.to_numpy(), lp_col.values.to_numpy()
    n = 0
    for rows in groups.values():
        k = max(offsets[i + 1] - offsets[i] for i in rows)
        pid = np.full((len(rows), k), -1, dtype=np.int64)
        plp = np.zeros((len(rows), k), dtype=np.float16)
        for j, i in enumerate(rows):
            s, e = offsets[i], offsets[i + 1]
            pid[j, :e - s], plp[j, :e - s] = flat_ids[s:e], flat_lp[s:e]
        torch.from_numpy(pid), torch.from_numpy(plp)
        n += len(rows)
    return n


@pytest.fixture(scope="module")
def k32_cache(trained) -> Path:
    return _cache(trained, trained["teacher"], "formats", k_max=32)[0]


@pytest.mark.parametrize("fmt", ["safetensors", "parquet", "arrow"])
def test_storage_format(benchmark, request, trained, k32_cache, fmt):
    import pyarrow.feather as feather
    import pyarrow.parquet as pq

    folder = k32_cache
    ids, records = _records_of(TeacherCache(folder))
    tokens = sum(int(r.target_ids.numel()) for r in records)
    table = _arrow_table(ids, records)
    blobs: dict[str, bytes] = {}
    for name, write in (("parquet", lambda b: pq.write_table(table, b, compression="zstd")),
                        ("arrow", lambda b: feather.write_feather(table, b, compression="uncompressed"))):
        buf = io.BytesIO()
        write(buf)
        blobs[name] = buf.getvalue()
    sizes = {"safetensors": _shard_bytes(folder), **{k: len(v) for k, v in blobs.items()}}

    def read_safetensors() -> int:
        cache = TeacherCache(folder)  # fresh handles: the memory maps are opened inside the timing
        return sum(pad_rows([cache.record(r)])[0].shape[0] for r in ids)

    readers = {
        "safetensors": read_safetensors,
        "parquet": lambda: _read_arrow_rows(pq.read_table(io.BytesIO(blobs["parquet"]))),
        "arrow": lambda: _read_arrow_rows(feather.read_table(io.BytesIO(blobs["arrow"]))),
    }
    assert readers[fmt]() == tokens  # every row read back, before timing
    timed = {}
    repeats = 1 if request.config.getoption("benchmark_disable") else 3
    for name, fn in readers.items():
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        timed[name] = statistics.median(times)
    benchmark(readers[fmt])
    benchmark.extra_info.update(
        format=fmt, tokens=tokens, bytes_per_token=round(sizes[fmt] / tokens, 2),
        read_rows_per_s=round(tokens / timed[fmt], 1),
        bytes_over_safetensors=round(sizes[fmt] / sizes["safetensors"], 3),
        read_time_over_safetensors=round(timed[fmt] / timed["safetensors"], 3),
        shard=shard_name(0))


# ---------------------------------------------------------------------------------------------------------------------
# Student step time: cache vs live teacher
# ---------------------------------------------------------------------------------------------------------------------


def _trainer(trained, tmp, teacher=None, cache=None, **kw):
    tok = trained["tokenizer"]
    student = tiny_qwen2_audio(tok, hidden=32, layers=1, seed=200)
    args = CAADConfig(output_dir=str(tmp), per_device_train_batch_size=STEP_BATCH, report_to=[], save_strategy="no",
                      use_cpu=True, alpha=ALPHA, temperature=TEMPERATURE, **kw)
    return CAADTrainer(model=student, teacher_model=teacher, args=args, processor=trained["processor"],
                       teacher_cache=cache), student


def _step(trainer, student, examples) -> None:
    batch = trainer.data_collator(examples)  # the cache path's collation reads the cached rows: timed too
    loss = trainer.compute_loss(student, batch)
    loss.backward()
    student.zero_grad(set_to_none=True)


@pytest.mark.parametrize("teacher_kind", ["demo", "cpu-sized"])
def test_student_step(benchmark, request, trained, tmp_path, teacher_kind):
    smoke = request.config.getoption("benchmark_disable")
    if teacher_kind == "demo":
        teacher = trained["teacher"]
    else:
        teacher = tiny_qwen2_audio(trained["tokenizer"], hidden=256, layers=4, seed=3)
    beta = 0.1
    folder, _ = _cache(trained, teacher, f"step-{teacher_kind}-{time.time_ns()}", plausibility_beta=beta,
                       k_max=int(teacher.get_output_embeddings().weight.shape[0]))  # >= every support
    examples = trained["examples"][:4 if smoke else STEP_BATCH]
    live, s_live = _trainer(trained, tmp_path / "live", teacher=teacher, plausibility_beta=beta)
    cached, s_cached = _trainer(trained, tmp_path / "cached", cache=folder, plausibility_beta=beta)
    # same loss before timing (exact supports): the two paths compute the same thing
    l_live = live.compute_loss(s_live, live.data_collator(examples)).item()
    l_cached = cached.compute_loss(s_cached, cached.data_collator(examples)).item()
    assert abs(l_live - l_cached) <= 2e-3 * abs(l_live), (l_live, l_cached)  # fp16 log-probs in the cache
    medians = {}
    for name, (tr, st) in (("live", (live, s_live)), ("cache", (cached, s_cached))):
        _step(tr, st, examples)
        times = []
        for _ in range(1 if smoke else REPEATS):
            start = time.perf_counter()
            _step(tr, st, examples)
            times.append(time.perf_counter() - start)
        medians[name] = statistics.median(times)
    benchmark(lambda: _step(cached, s_cached, examples))
    benchmark.extra_info.update(
        teacher=teacher_kind, teacher_hidden=int(teacher.config.text_config.hidden_size),
        teacher_layers=int(teacher.config.text_config.num_hidden_layers), batch=len(examples),
        live_step_ms=round(medians["live"] * 1e3, 2), cache_step_ms=round(medians["cache"] * 1e3, 2),
        live_over_cache=round(medians["live"] / medians["cache"], 2))
