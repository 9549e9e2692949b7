"""Sparse-target loss (SPEC §9) against the dense contrastive KD op, fwd+bwd, one run.

    pytest benchmarks/bench_sparse_kd.py --benchmark-only --benchmark-json=sparse.json   # measure
    pytest benchmarks/bench_sparse_kd.py --benchmark-disable                            # smoke (CI)

Each case times our sparse loss (``K`` cached ids per row) and, interleaved in the same test on
the same student logits, the dense op of the same backend family (``cpu`` on CPU; ``triton`` on
CUDA) with its teacher logits, and records the ratio ``sparse / dense`` in ``extra_info`` with the
bytes each moves per vocabulary entry: sparse reads ``s`` in the forward and ``s`` again plus
writes ``grad_s`` in the backward (3 × element size: 6 B in bf16), dense reads ``a, t, s`` twice
and writes ``grad_s`` (7 × element size: 14 B in bf16). A third contender is what users of
offline top-k distillation write by hand: ``log_softmax(s/τ).gather(ids)`` under autograd.
The smoke run uses a tiny shape; the headline (N = 2048, V = 151,936) only runs when measuring.
Nothing here asserts a speed.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from caad_kernels import available_backends, contrastive_kd_loss, sparse_contrastive_kd_loss

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HEADLINE = (8192, 151936) if DEVICE.type == "cuda" else (2048, 151936)
SMOKE = (64, 1000)
KS = (8, 32, 128)
DTYPES = (torch.float32, torch.bfloat16)
SPARSE_BACKEND = "triton" if DEVICE.type == "cuda" else "cpu"
DENSE_BACKEND = "triton" if DEVICE.type == "cuda" else "cpu"


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _inputs(n: int, vocab: int, k: int, dtype: torch.dtype, seed: int = 0):
    """Student logits, distinct cached ids per row (90% of the mass on them, 10% tail), labels."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    s = (torch.randn(n, vocab, generator=g, device=DEVICE) * 2).to(dtype)
    start = torch.randint(0, vocab, (n, 1), generator=g, device=DEVICE)
    stride = max(1, vocab // k)
    ids = (start + stride * torch.arange(k, device=DEVICE)) % vocab
    lp = torch.log_softmax(torch.randn(n, k, generator=g, device=DEVICE) * 2, dim=-1) + math.log(0.9)
    tail = torch.full((n,), math.log(0.1), device=DEVICE)
    labels = torch.randint(0, vocab, (n,), generator=g, device=DEVICE)
    labels[::16] = -100
    return s, ids, lp, tail, labels


def _eager_sparse(s, ids, lp, tail, labels):
    """What a user writes for cached top-k targets (the tail dropped): KL on the gathered ids."""
    log_q = torch.log_softmax(s.float(), dim=-1).gather(-1, ids)
    rows = (lp.exp() * (lp - log_q)).sum(-1)
    valid = labels != -100
    return (rows * valid).sum() / valid.sum().clamp_min(1)


def _time(fn, s0, rounds: int) -> float:
    """Median seconds of fn(s).backward() on fresh leaf copies of s0 (one warm-up)."""
    times = []
    for i in range(rounds + 1):
        s = s0.detach().clone().requires_grad_(True)
        _sync()
        start = time.perf_counter()
        fn(s).backward()
        _sync()
        if i:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


_DENSE_CACHE: dict[tuple, float] = {}


def _dense_seconds(s0: torch.Tensor, labels: torch.Tensor, rounds: int) -> float:
    """The dense op's fwd+bwd on the same student logits (timed once per shape and dtype in this run)."""
    key = (tuple(s0.shape), s0.dtype)
    if key not in _DENSE_CACHE:
        g = torch.Generator(device=DEVICE).manual_seed(1)
        a = (torch.randn(*s0.shape, generator=g, device=DEVICE) * 2).to(s0.dtype)
        t = (torch.randn(*s0.shape, generator=g, device=DEVICE) * 2).to(s0.dtype)
        _DENSE_CACHE[key] = _time(lambda s: contrastive_kd_loss(s, a, t, labels, backend=DENSE_BACKEND), s0, rounds)
    return _DENSE_CACHE[key]


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("contender", ["caad-sparse", "eager-sparse"])
def test_sparse_kd(benchmark, contender, dtype, k, request):
    smoke = request.config.getoption("benchmark_disable")
    n, vocab = SMOKE if smoke else HEADLINE
    if SPARSE_BACKEND not in available_backends(DEVICE) or DENSE_BACKEND not in available_backends(DEVICE):
        pytest.skip(f"backend {SPARSE_BACKEND!r} unavailable on {DEVICE.type}")
    s0, ids, lp, tail, labels = _inputs(n, vocab, k, dtype)
    if contender == "caad-sparse":
        def fn(s):
            return sparse_contrastive_kd_loss(s, ids, lp, tail, labels, backend=SPARSE_BACKEND)
    else:
        def fn(s):
            return _eager_sparse(s, ids, lp, tail, labels)
    # Same math first, on 64 rows (tail-free targets, where the hand-written loss is the definition).
    c_s, c_ids, c_lp, c_y = s0[:64], ids[:64], lp[:64], labels[:64]
    check = sparse_contrastive_kd_loss(c_s.double(), c_ids, c_lp, None, c_y, backend="torch").item()
    mine = (sparse_contrastive_kd_loss(c_s, c_ids, c_lp, None, c_y, backend=SPARSE_BACKEND)
            if contender == "caad-sparse" else _eager_sparse(c_s, c_ids, c_lp, None, c_y)).item()
    rel = abs(mine - check) / max(abs(check), 1e-12)
    assert rel <= (1e-4 if dtype == torch.float32 else 2e-3), (mine, check)

    def setup():
        return (s0.detach().clone().requires_grad_(True),), {}

    def run(s):
        fn(s).backward()
        _sync()

    rounds = 1 if smoke else 3
    benchmark.pedantic(run, setup=setup, rounds=rounds, warmup_rounds=0 if smoke else 1, iterations=1)
    elem = s0.element_size()
    benchmark.extra_info.update(sparse_case=contender, backend=SPARSE_BACKEND, n=n, vocab=vocab, k=k,
                                dtype=str(dtype).removeprefix("torch."), mode="fwd+bwd", loss_rel_error=rel,
                                bytes_per_entry_sparse=3 * elem, bytes_per_entry_dense=7 * elem)
    if smoke:
        return
    dense_s = _dense_seconds(s0, labels, rounds)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(dense_backend=DENSE_BACKEND, dense_median_s=dense_s, sparse_median_s=median,
                                ratio_sparse_over_dense=median / dense_s, tokens_per_s=n / median,
                                effective_gb_per_s=3 * elem * n * vocab / median / 1e9)
