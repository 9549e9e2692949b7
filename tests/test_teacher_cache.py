"""The offline teacher cache (caad/teacher_cache*.py, caad/cached_teacher.py; SPEC §9) on tiny Qwen2-Audio models.

The oracle is written here from SPEC §2/§9 in float64 — contrast, plausibility mask, temperature, top-k of the
support and the tail mass — never from the code under test.
"""

import contextlib
import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("safetensors")
pytest.importorskip("soundfile")

from caad.cached_teacher import CachedTargetsCollator  # noqa: E402
from caad.cli import main  # noqa: E402
from caad.data import load_records, save_jsonl  # noqa: E402
from caad.synthetic import beep_records  # noqa: E402
from caad.teacher import DualViewCollator, teacher_forward_both_views  # noqa: E402
from caad.teacher_cache import EXIT_AFTER_ENV, build_teacher_cache  # noqa: E402
from caad.teacher_cache_store import (  # noqa: E402
    RecordTargets,
    TeacherCache,
    TeacherCacheError,
    encode_shard,
    fingerprint,
    pad_rows,
    read_manifest,
    shard_name,
    write_manifest,
)
from caad.tiny_models import build_processor, build_tokenizer, tiny_qwen2_audio  # noqa: E402
from caad.trainer import CAADConfig, CAADTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OPTS = dict(alpha=1.0, plausibility_beta=0.1, temperature=2.0)  # beta_p > 0: exact supports


def _teacher(tokenizer):
    """A random tiny teacher whose head is scaled up, so that its rows are peaked like a trained model's
    (a random head gives nearly uniform rows, where plausibility keeps almost every token)."""
    teacher = tiny_qwen2_audio(tokenizer, hidden=64, layers=2, seed=7)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(40.0)
    return teacher


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    records = beep_records(10, seed=3)
    # Targets of different lengths (a label or a whole description), so rows per record vary.
    examples = [{"id": r["id"], "audio": r["audio"]["array"], "instruction": r["instruction"],
                 "pseudo_gt": r["label"] if i % 2 else r["metadata"]["description"]} for i, r in enumerate(records)]
    teacher = _teacher(tokenizer)
    # On disk too, for the CLI and the subprocesses: a save_pretrained teacher + processor and a Pseudo-GT JSONL.
    root = tmp_path_factory.mktemp("cache-setup")
    teacher.save_pretrained(root / "teacher")
    processor.save_pretrained(root / "teacher")
    loaded = load_records(records)[0]
    for rec, ex in zip(loaded, examples, strict=True):
        rec.pseudo_gt = ex["pseudo_gt"]
    save_jsonl(loaded, root / "pgt.jsonl")
    return tokenizer, processor, examples, teacher, root


@pytest.fixture(scope="module")
def built(setup, tmp_path_factory):
    """The cache of the module's examples with the default options of _build (read-only: copy to modify)."""
    out = tmp_path_factory.mktemp("built") / "cache"
    _build(setup, out)
    return out


def _copy(built, tmp_path):
    shutil.copytree(built, tmp_path / "copy")
    return tmp_path / "copy"


def _build(setup, out, **kw):
    _, processor, examples, teacher, _ = setup
    options = {**OPTS, "k_max": 512, "logprob_dtype": "float32", "batch_size": 3, "records_per_shard": 4,
               "progress": False, **kw}
    return build_teacher_cache(examples, teacher, processor, out, **options)


def _oracle(a, t, alpha, plausibility_beta, temperature, k_max):
    """SPEC §2 + §9 in float64: (support ids per row, their log p, the tail log-mass per row)."""
    a, t = a.double(), t.double()
    z = (1 + alpha) * a - alpha * t
    if plausibility_beta > 0:
        z = z.masked_fill(a < a.max(-1, keepdim=True).values + math.log(plausibility_beta), -math.inf)
    logp = torch.log_softmax(z / temperature, -1)
    rows = []
    for lp in logp:
        support = torch.isfinite(lp).nonzero().flatten()
        order = lp[support].argsort(descending=True)
        keep = support[order[:k_max]]
        rest = support[order[k_max:]]
        tail = torch.logsumexp(lp[rest], 0) if rest.numel() else torch.tensor(-math.inf, dtype=torch.float64)
        rows.append((keep, lp[keep], tail))
    return rows


def _cached_rows(cache, examples):
    out = []
    for ex in examples:
        rec = cache.record(ex["id"])
        starts = torch.cat([torch.zeros(1, dtype=torch.long), rec.row_lengths.cumsum(0)])
        for j in range(rec.target_ids.numel()):
            sl = slice(int(starts[j]), int(starts[j + 1]))
            out.append((rec.support_ids[sl], rec.support_logprobs[sl], rec.tail_logmass[j], rec.target_ids[j]))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_shard_round_trip_and_padding(tmp_path, dtype):
    """write -> read gives the same tensors; pad_rows puts every support entry at its row with -1 pads."""
    gen = torch.Generator().manual_seed(0)
    records, ids = [], []
    for r in range(5):
        n_rows = [1, 3, 2, 7, 1][r]
        lengths = torch.randint(1, 9, (n_rows,), generator=gen)
        if r == 3:
            lengths[2] = 40  # one long support
        e = int(lengths.sum())
        records.append(RecordTargets(
            target_ids=torch.randint(0, 1000, (n_rows,), generator=gen), row_lengths=lengths,
            support_ids=torch.randint(0, 150_000, (e,), generator=gen),
            support_logprobs=(-torch.rand(e, generator=gen) * 20).to(dtype),
            tail_logmass=torch.where(torch.rand(n_rows, generator=gen) < 0.5, -math.inf, -3.0)))
        ids.append(f"rec/{r} ü")  # any characters
    manifest = {"format": "caad-teacher-cache", "format_version": 1, "logprob_dtype": str(dtype)[6:],
                "vocab_size": 150_000, "num_shards": 2, "complete": True, "shards": {}}
    fp = fingerprint(manifest)
    for index, (lo, hi) in enumerate([(0, 2), (2, 5)]):
        (tmp_path / shard_name(index)).write_bytes(encode_shard(ids[lo:hi], records[lo:hi], fp, dtype))
        manifest["shards"][str(index)] = {"file": shard_name(index), "record_ids": ids[lo:hi]}
    write_manifest(tmp_path, manifest)
    cache = TeacherCache(tmp_path)
    assert len(cache) == 5 and "rec/0 ü" in cache
    got = [cache.record(rid) for rid in ids]
    for want, have in zip(records, got, strict=True):
        for field in ("target_ids", "row_lengths", "support_ids", "support_logprobs", "tail_logmass"):
            w, h = getattr(want, field), getattr(have, field)
            assert h.dtype == (w.dtype if field != "tail_logmass" else torch.float32), field
            assert torch.equal(h, w.to(h.dtype)), field
    lengths = [1, 2, 2, 7, 1]  # record 1 and 2 truncated to a prefix of their rows
    pid, plp, ptail, ptgt = pad_rows(got, lengths)
    assert pid.shape == (13, 40) and plp.dtype == dtype
    row = 0
    for rec, n in zip(records, lengths, strict=True):
        start = 0
        for j in range(n):
            k = int(rec.row_lengths[j])
            assert torch.equal(pid[row, :k], rec.support_ids[start:start + k]) and (pid[row, k:] == -1).all()
            assert torch.equal(plp[row, :k], rec.support_logprobs[start:start + k]) and (plp[row, k:] == 0).all()
            assert ptail[row] == rec.tail_logmass[j] and ptgt[row] == rec.target_ids[j]
            start += k
            row += 1
    with pytest.raises(TeacherCacheError, match="not in the teacher cache"):
        cache.record("nope")


def test_stray_shard_of_another_cache_is_refused(tmp_path, setup, built):
    from safetensors import safe_open

    folder = _copy(built, tmp_path)
    with safe_open(str(folder / shard_name(1)), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    from safetensors.torch import save_file

    save_file(tensors, str(folder / shard_name(1)), metadata={**meta, "fingerprint": "another-cache"})
    cache = TeacherCache(folder)
    cache.record(setup[2][0]["id"])  # shard 0 is fine
    with pytest.raises(TeacherCacheError, match="fingerprint"):
        cache.record(setup[2][5]["id"])


# ---------------------------------------------------------------------------------------------------------------------
# The cache pass
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k_max", [512, 3])
def test_cache_equals_the_live_contrastive_targets(setup, tmp_path, built, k_max):
    """Cached rows == the float64 oracle on the live teacher's logits of the same examples (another batching):
    exact supports under plausibility when k_max >= the support, else the top-k and the tail mass."""
    _, processor, examples, teacher, _ = setup
    if k_max == 512:
        folder = built
    else:
        folder = tmp_path
        summary = _build(setup, folder, k_max=k_max)
        assert summary["complete"] and summary["shards"] == 3 and summary["tokens_written"] > 0
        assert summary["tokens_per_s"] > 0 and summary["shards_written"] == 3
    cache = TeacherCache(folder)
    batch = DualViewCollator(processor)(examples)  # one batch of 10, not the cache pass's batches of 3
    a, t, targets = teacher_forward_both_views(teacher, batch)
    oracle = _oracle(a, t, **OPTS, k_max=k_max)
    cached = _cached_rows(cache, examples)
    assert len(cached) == len(oracle) == targets.numel()
    sizes = []
    for (ids, lp, tail, tgt), (w_ids, w_lp, w_tail), want_tgt in zip(cached, oracle, targets, strict=True):
        assert int(tgt) == int(want_tgt)
        assert sorted(ids.tolist()) == sorted(w_ids.tolist())
        order = ids.argsort()
        w_order = w_ids.argsort()
        torch.testing.assert_close(lp[order].double(), w_lp[w_order], rtol=1e-5, atol=1e-5)
        if math.isinf(w_tail):
            assert math.isinf(tail) and tail < 0
        else:
            torch.testing.assert_close(tail.double(), w_tail, rtol=1e-5, atol=1e-5)
        sizes.append(len(w_ids) + (0 if math.isinf(w_tail) else 1))
    # the scaled head makes supports of a few to tens of tokens: neither trivial nor the whole vocabulary
    assert 1 < sum(sizes) / len(sizes) < 100
    if k_max == 3:
        assert any(not math.isinf(c[2]) for c in cached)  # some rows really were cut to a top-k with a tail


def test_float16_logprobs_are_rounded_float32(setup, tmp_path, built):
    _build(setup, tmp_path / "16", logprob_dtype="float16")
    c32, c16 = TeacherCache(built), TeacherCache(tmp_path / "16")
    for ex in setup[2]:
        r32, r16 = c32.record(ex["id"]), c16.record(ex["id"])
        assert r16.support_logprobs.dtype == torch.float16
        assert torch.equal(r16.support_ids, r32.support_ids)
        assert torch.equal(r16.support_logprobs, r32.support_logprobs.half())
    bytes16 = sum((tmp_path / "16" / shard_name(i)).stat().st_size for i in range(3))
    bytes32 = sum((built / shard_name(i)).stat().st_size for i in range(3))
    assert bytes16 < bytes32


def test_resume_refuses_other_options_naming_the_field(setup, tmp_path, built):
    tmp_path = _copy(built, tmp_path)
    for field, value in (("k_max", 7), ("alpha", 0.5), ("plausibility_beta", 0.2), ("temperature", 1.0),
                         ("logprob_dtype", "float16"), ("text_only_view", "silence"), ("records_per_shard", 5)):
        with pytest.raises(TeacherCacheError, match=rf"manifest field {field} is"):
            _build(setup, tmp_path, **{field: value})
    for kw, field in (({"data_sha256": "0" * 64}, "data.sha256"), ({"batch_size": 2}, "batch_size"),
                      ({"vocab_size": 300}, "vocab_size"), ({"max_length": 60}, "max_length")):
        with pytest.raises(TeacherCacheError, match=rf"manifest field {field} is"):
            _build(setup, tmp_path, **kw)
    _, processor, examples, teacher, _ = setup
    with pytest.raises(TeacherCacheError, match="manifest field teacher.dtype is 'float32', expected 'bfloat16'"):
        build_teacher_cache(examples, copy.deepcopy(teacher).to(torch.bfloat16), processor, tmp_path,
                            **{**OPTS, "k_max": 512, "logprob_dtype": "float32", "batch_size": 3,
                               "records_per_shard": 4})
    import caad_kernels

    version = caad_kernels.__version__
    caad_kernels.__version__ = "0.0.0-other"
    try:
        with pytest.raises(TeacherCacheError, match="manifest field caad_version is"):
            _build(setup, tmp_path)
    finally:
        caad_kernels.__version__ = version
    # a complete cache is a no-op to resume
    again = _build(setup, tmp_path)
    assert again["shards_written"] == 0 and again["shards_done_before"] == 3 and again["complete"]


def test_bad_examples_and_options(setup, tmp_path):
    _, processor, examples, teacher, _ = setup
    no_id = [dict(examples[0])]
    del no_id[0]["id"]
    with pytest.raises(ValueError, match="example 0 has no 'id'"):
        build_teacher_cache(no_id, teacher, processor, tmp_path / "x")
    with pytest.raises(ValueError, match="duplicate id"):
        build_teacher_cache([examples[0], examples[0]], teacher, processor, tmp_path / "x")
    for kw, match in (({"k_max": 0}, "k_max"), ({"records_per_shard": 1.5}, "records_per_shard"),
                      ({"logprob_dtype": "bfloat16"}, "logprob_dtype"), ({"temperature": 0.0}, "temperature"),
                      ({"vocab_size": 10_000}, "vocab_size")):
        with pytest.raises(ValueError, match=match):
            build_teacher_cache(examples, teacher, processor, tmp_path / "x", **kw)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something.txt").write_text("x")
    with pytest.raises(TeacherCacheError, match="not empty"):
        build_teacher_cache(examples, teacher, processor, tmp_path / "full", progress=False)


# ---------------------------------------------------------------------------------------------------------------------
# Training from the cache
# ---------------------------------------------------------------------------------------------------------------------


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=0.5,
                optim="sgd", lr_scheduler_type="constant", report_to=[], save_strategy="no", logging_steps=1,
                seed=0, use_cpu=True, dataloader_drop_last=False, kd_backend="torch", **OPTS)
    base.update(kw)
    return CAADConfig(**base)


def test_training_from_the_cache_equals_live_teacher_training(setup, tmp_path, built):
    """beta_p > 0 and k_max >= every support: the same losses and, after 3 SGD steps with gradient accumulation,
    the same weights as training with the live teacher (the sparse loss is exact there, SPEC §9)."""
    tokenizer, processor, examples, teacher, _ = setup
    runs = []
    for cache in (None, built):
        student = tiny_qwen2_audio(tokenizer, hidden=32, layers=1, seed=1)
        args = _args(tmp_path / ("live" if cache is None else "cached"), hard_weight=0.3,
                     per_device_train_batch_size=2, gradient_accumulation_steps=2)
        trainer = CAADTrainer(model=student, teacher_model=None if cache else teacher, args=args,
                              processor=processor, train_dataset=examples, teacher_cache=cache)
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
        runs.append((student, losses, trainer))
    (live, live_losses, _), (cached, cached_losses, trainer) = runs
    assert trainer.teacher is None and len(live_losses) == len(cached_losses) == 3
    for a, b in zip(live_losses, cached_losses, strict=True):
        assert math.isclose(a, b, rel_tol=1e-4), (live_losses, cached_losses)
    init = tiny_qwen2_audio(tokenizer, hidden=32, layers=1, seed=1)
    moved = 0.0
    for (name, p_live), p_cached, p0 in zip(live.named_parameters(), cached.parameters(), init.parameters(),
                                            strict=True):
        torch.testing.assert_close(p_cached, p_live, rtol=1e-4, atol=1e-5, msg=name)
        moved = max(moved, float((p_live - p0).detach().abs().max()))
    assert moved > 1e-3
    logged = [h for h in trainer.state.log_history if "kd_loss" in h]
    assert logged and logged[0]["target_tokens_per_s"] > 0 and logged[0]["ce_loss"] > 0


def test_one_step_loss_and_gradient_equal_the_live_teacher(setup, tmp_path, built):
    """compute_loss with num_items_in_batch: same loss and student gradient as the live teacher, one batch."""
    tokenizer, processor, examples, teacher, _ = setup
    results = []
    for cache in (None, built):
        student = tiny_qwen2_audio(tokenizer, hidden=32, layers=1, seed=1)
        trainer = CAADTrainer(model=student, teacher_model=None if cache else teacher, processor=processor,
                              args=_args(tmp_path, hard_weight=0.2), teacher_cache=cache)
        batch = trainer.data_collator(examples[2:7])
        assert ("text_view" in batch) == (cache is None)
        loss = trainer.compute_loss(student, batch, num_items_in_batch=11)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in student.parameters() if p.grad is not None]))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert len(g0) == len(g1) > 0
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_trainer_refuses_a_cache_built_with_other_options(setup, tmp_path, built):
    tokenizer, processor, _, _, _ = setup
    student = tiny_qwen2_audio(tokenizer, hidden=32, layers=1)
    for field, value in (("alpha", 0.5), ("plausibility_beta", 0.05), ("temperature", 1.0),
                         ("text_only_view", "silence")):
        with pytest.raises(TeacherCacheError, match=rf"manifest field {field} is .*expected {value!r}"):
            CAADTrainer(model=student, args=_args(tmp_path, **{field: value}), processor=processor,
                        teacher_cache=built)


def test_trainer_refuses_what_a_cache_cannot_serve(setup, tmp_path, built):
    tokenizer, processor, examples, teacher, _ = setup
    shutil.copytree(built, tmp_path / "cache")
    student = tiny_qwen2_audio(tokenizer, hidden=32, layers=1)
    for kw, match in (({"divergence": "jsd"}, "forward_kl"), ({"fused_linear": True}, "fused_linear"),
                      ({"kd_grad_in_forward": True}, "kd_grad_in_forward")):
        with pytest.raises(ValueError, match=match):
            CAADTrainer(model=student, args=_args(tmp_path, **kw), processor=processor,
                        teacher_cache=tmp_path / "cache")
    with pytest.raises(ValueError, match="exactly one of teacher_model and teacher_cache"):
        CAADTrainer(model=student, teacher_model=teacher, args=_args(tmp_path), processor=processor,
                    teacher_cache=tmp_path / "cache")
    with pytest.raises(ValueError, match="exactly one"):
        CAADTrainer(model=student, args=_args(tmp_path), processor=processor)
    # incomplete cache
    manifest = read_manifest(tmp_path / "cache")
    write_manifest(tmp_path / "cache", {**manifest, "complete": False})
    with pytest.raises(TeacherCacheError, match="incomplete"):
        CAADTrainer(model=student, args=_args(tmp_path), processor=processor, teacher_cache=tmp_path / "cache")


def test_collator_refuses_rows_that_are_not_the_batch_targets(setup, built):
    tokenizer, processor, examples, _, _ = setup
    collate = CachedTargetsCollator(DualViewCollator(processor), TeacherCache(built))
    other = [dict(examples[0]), {**examples[1], "pseudo_gt": "high"}, dict(examples[2])]
    assert examples[1]["pseudo_gt"] != "high"
    with pytest.raises(TeacherCacheError, match=rf"record {examples[1]['id']!r}, target position 0: .* label is"):
        collate(other)
    longer = [{**examples[1], "pseudo_gt": examples[1]["pseudo_gt"] + " three three"}]
    with pytest.raises(TeacherCacheError, match="target tokens but the teacher cache holds"):
        collate(longer)
    with pytest.raises(TeacherCacheError, match="not in the teacher cache"):
        collate([{**examples[0], "id": "unknown"}])
    with pytest.raises(ValueError, match="has no 'id'"):
        collate([{k: v for k, v in examples[0].items() if k != "id"}])
    # a truncating collator (max_length) pairs the first rows of each record
    truncating = CachedTargetsCollator(DualViewCollator(processor, max_length=60), TeacherCache(built))
    batch = truncating(examples[:4])
    assert batch["teacher_targets"]["ids"].shape[0] == batch["target_ids"].numel()


def test_student_with_another_vocabulary_is_refused(setup, tmp_path, built):
    tokenizer, processor, examples, _, _ = setup
    student = tiny_qwen2_audio(tokenizer, hidden=32, layers=1)
    student.resize_token_embeddings(len(tokenizer) + 8)
    trainer = CAADTrainer(model=student, args=_args(tmp_path), processor=processor, teacher_cache=built)
    with pytest.raises(TeacherCacheError, match="vocab_size is 399; rebuild the cache with --vocab-size 407"):
        trainer.compute_loss(student, trainer.data_collator(examples[:2]))


# ---------------------------------------------------------------------------------------------------------------------
# Command line, kill/resume, several processes
# ---------------------------------------------------------------------------------------------------------------------


def _cli_args(root, out, *extra):
    return ["teacher-cache", "--data", str(root / "pgt.jsonl"), "--teacher", str(root / "teacher"), "--out", str(out),
            "--alpha", "1.0", "--plausibility-beta", "0.1", "--temperature", "2.0", "--k-max", "512",
            "--logprob-dtype", "float32", "--batch-size", "3", "--records-per-shard", "2", "--no-progress", *extra]


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}
    env.pop("TRITON_INTERPRET", None)
    return env


def _same_cache(a: Path, b: Path) -> None:
    ma, mb = read_manifest(a), read_manifest(b)
    assert ma["complete"] and mb["complete"]
    for key in ("shards", "stats", "num_shards", "data", "teacher"):
        assert ma[key] == mb[key], key
    from safetensors.torch import load_file

    for entry in ma["shards"].values():
        ta, tb = load_file(a / entry["file"]), load_file(b / entry["file"])
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (entry["file"], k)


@contextlib.contextmanager
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cli_reference(setup, tmp_path_factory):
    """The uninterrupted single-process cache, built through `caad teacher-cache`."""
    out = tmp_path_factory.mktemp("cli-ref") / "cache"
    with _one_thread():  # as the subprocesses (OMP_NUM_THREADS=1): bitwise comparable
        assert main(_cli_args(setup[4], out)) == 0
    return out


def test_kill_and_resume_gives_the_uninterrupted_cache(setup, tmp_path, cli_reference, capsys):
    """Killed after committing 2 shards (the 2nd not yet in the manifest) with a torn temporary file beside them;
    the rerun recomputes only what the manifest lacks, and the result equals an uninterrupted run."""
    root = setup[4]
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "caad", *_cli_args(root, out)]
    proc = subprocess.run(cmd, env=_env(**{EXIT_AFTER_ENV: "2"}), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 75, proc.stderr[-2000:]
    manifest = read_manifest(out)
    assert sorted(manifest["shards"]) == ["0"] and not manifest["complete"]
    assert (out / shard_name(1)).exists()  # renamed, not yet recorded: will be recomputed, not duplicated
    (out / f".{shard_name(2)}.tmp-12345").write_bytes(b"torn")
    with pytest.raises(TeacherCacheError, match=r"incomplete \(1 of 5 shards\)"):
        TeacherCache(out)
    with _one_thread():  # resumed in this process (one fewer interpreter start), threads as the reference
        assert main(_cli_args(root, out)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["shards_done_before"] == 1 and summary["shards_written"] == 4 and summary["complete"]
    assert not list(out.glob(".*.tmp-*"))
    ids = [rid for e in read_manifest(out)["shards"].values() for rid in e["record_ids"]]
    assert sorted(ids) == sorted(ex["id"] for ex in setup[2])  # every record once: no duplicates, none lost
    _same_cache(out, cli_reference)


def test_two_processes_equal_one(setup, tmp_path, cli_reference):
    """torchrun, 2 gloo processes: each writes its own shards; together they are the single-process cache."""
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "caad", *_cli_args(setup[4], out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same_cache(out, cli_reference)


def test_cli_train_from_the_cache_and_one_line_errors(setup, tmp_path, cli_reference, capsys):
    root = setup[4]
    student_dir = tmp_path / "student"
    tiny_qwen2_audio(setup[0], hidden=32, layers=1, seed=1).save_pretrained(student_dir)
    setup[1].save_pretrained(student_dir)
    train = ["train", "--data", str(root / "pgt.jsonl"), "--student", str(student_dir), "--teacher-cache",
             str(cli_reference), "--output-dir", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "5",
             "--alpha", "1.0", "--plausibility-beta", "0.1", "--temperature", "2.0", "--kd-backend", "torch"]
    assert main(train) == 0
    assert (tmp_path / "run" / "student" / "config.json").exists()

    def one_line_error(argv, prefix, *needles):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        msg = str(exc.value.code)
        assert "\n" not in msg and msg.startswith(prefix), msg
        for needle in needles:
            assert needle in msg, msg

    one_line_error([*train[:-8], "--alpha", "0.5"], "caad train: error:", "manifest field alpha is 1.0",
                   "expected 0.5")
    other_data = root / "other.jsonl"  # beside the audio files its relative paths name
    other_data.write_text((root / "pgt.jsonl").read_text().replace('"low"', '"high"'))
    one_line_error([*train[:2], str(other_data), *train[3:]], "caad train: error:", "data.sha256")
    one_line_error([*train, "--teacher", str(student_dir)], "caad train: error:", "teacher.config_sha256")
    one_line_error(["teacher-cache", "--data", str(root / "pgt.jsonl")], "caad teacher-cache: error:",
                   "--teacher", "--out")
    one_line_error(_cli_args(root, tmp_path / "x", "--k-max", "0"), "caad teacher-cache: error:", "k_max")
    missing = _cli_args(root, tmp_path / "x")
    missing[2] = str(tmp_path / "nope.jsonl")
    one_line_error(missing, "caad teacher-cache: error:", "nope.jsonl")
    shutil.copytree(cli_reference, tmp_path / "resume")
    one_line_error(_cli_args(root, tmp_path / "resume", "--temperature", "1.0"), "caad teacher-cache: error:",
                   "manifest field temperature is 2.0")
