"""The sparse-target loss (SPEC §9): caad_kernels.sparse_contrastive_kd_loss, its ops and backends,
and the target builder caad_kernels.sparse_teacher_targets, against the independent float64
oracle of tests/sparse_oracle.py and the dense oracle of tests/spec_oracle.py."""

import math

import pytest
import torch

from caad_kernels import (
    SparseContrastiveKDLoss,
    available_backends,
    contrastive_kd_loss,
    sparse_contrastive_kd_loss,
    sparse_ops,
    sparse_teacher_targets,
)
from tests.sparse_oracle import contrasted_log_probs, sparse_oracle
from tests.spec_oracle import assert_grad_close, assert_loss_close, oracle

INF = math.inf
BACKENDS = [b for b in ("torch", "cpu", "triton") if b in sparse_ops.IMPLEMENTED and b in available_backends("cpu")]
FLOAT64_BACKENDS = [b for b in BACKENDS if b in ("torch", "cpu")]


def _teacher(n, vocab, seed=0, scale=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale
    t = torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale
    s = torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale
    return s.to(dtype), a.to(dtype), t.to(dtype)


def _labels(n, vocab, seed=0, ignore_index=-100):
    y = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed + 1))
    y[torch.arange(n) % 3 == 1] = ignore_index
    return y


def _run(s, *args, **kw):
    s = s.detach().clone().requires_grad_(True)
    loss = sparse_contrastive_kd_loss(s, *args, **kw)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), s.grad


# Option sets: (builder options, loss options, with tail, labels)
CASES = {
    "exact_plaus": (dict(alpha=1.0, plausibility_beta=0.1, k_max=64), dict(), False, False),
    "topk_tail": (dict(alpha=0.5, k_max=5), dict(), True, False),
    "topk_no_tail": (dict(alpha=0.5, k_max=5), dict(), False, False),
    "tau2_hard": (dict(alpha=1.0, temperature=2.0, k_max=8), dict(temperature=2.0, hard_weight=0.4,
                                                                    soft_weight=0.7), True, True),
    "hard_only": (dict(alpha=1.0, k_max=4), dict(soft_weight=0.0, hard_weight=1.0), True, True),
    "sum": (dict(alpha=1.0, k_max=6), dict(reduction="sum"), True, True),
    "none": (dict(alpha=1.0, k_max=6, plausibility_beta=0.05), dict(reduction="none"), False, True),
    "num_items_int": (dict(alpha=1.0, k_max=6), dict(num_items_in_batch=29), True, True),
    "num_items_tensor": (dict(alpha=1.0, k_max=6), dict(num_items_in_batch=torch.tensor(7)), True, True),
    "ignore_custom": (dict(alpha=1.0, k_max=6, ignore_index=-1), dict(ignore_index=-1), True, "custom"),
    "tau0.5": (dict(alpha=2.0, temperature=0.5, k_max=16), dict(temperature=0.5), True, False),
}


# Every case × dtype on torch and cpu; the Triton interpreter is slow, so it gets every case in fp32
# and the low-precision dtypes on the cases that stress them (tail, hard term, τ ≠ 1).
_LOW_CASES_TRITON = ("topk_tail", "tau2_hard", "tau0.5")
ORACLE_PARAMS = [(b, c, d) for b in BACKENDS for c in CASES for d in (torch.float32, torch.bfloat16, torch.float16)
                 if b != "triton" or d == torch.float32 or c in _LOW_CASES_TRITON]


@pytest.mark.parametrize("backend, case, dtype", ORACLE_PARAMS)
def test_matches_oracle(backend, case, dtype):
    build, kw, with_tail, with_labels = CASES[case]
    n, vocab = 9, 67  # V not a multiple of any block
    s, a, t = _teacher(n, vocab, seed=list(CASES).index(case), dtype=torch.float32)
    ign = -1 if with_labels == "custom" else -100
    y = _labels(n, vocab, ignore_index=ign) if with_labels else None
    ids, lp, tail = sparse_teacher_targets(a, t, y, **build)
    tail = tail if with_tail else None
    if dtype == torch.float16:
        lp = lp.half()  # a cache stored in fp16
    s = s.to(dtype)
    loss, grad = _run(s, ids, lp, tail, y, backend=backend, **kw)
    truth = sparse_oracle(s, ids, lp, tail, y, **kw)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_loss_close(loss, truth[1], s)
    assert_grad_close(grad, truth[2], s)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", [dict(alpha=1.0, plausibility_beta=0.1),
                                  dict(alpha=0.5, plausibility_beta=0.3, temperature=2.0, hard_weight=0.3),
                                  dict(alpha=0.0, plausibility_beta=0.05, temperature=0.7)])
def test_equals_dense_with_exact_support(backend, opts):
    """β_p > 0 and k_max ≥ support: the sparse loss is the dense one (SPEC §9), loss and gradient."""
    n, vocab = 12, 131
    s, a, t = _teacher(n, vocab, seed=3, dtype=torch.float32)
    y = _labels(n, vocab)
    build = {k: v for k, v in opts.items() if k != "hard_weight"}
    ids, lp, tail = sparse_teacher_targets(a, t, y, k_max=vocab, **build)
    support = (ids >= 0).sum(-1)
    assert int(support.max()) < vocab // 2 and bool(torch.isneginf(tail).all())  # plausibility made it sparse
    ids, lp = ids[:, : int(support.max())], lp[:, : int(support.max())]  # K = the largest support
    loss_kw = dict(temperature=opts.get("temperature", 1.0), hard_weight=opts.get("hard_weight", 0.0))
    loss, grad = _run(s, ids, lp, None, y, backend=backend, **loss_kw)
    dense = oracle(s, a, t, y, **opts)  # the independent dense float64 oracle
    assert_loss_close(loss, dense[1], s)
    assert_grad_close(grad, dense[2], s)
    s2 = s.detach().clone().requires_grad_(True)
    ref = contrastive_kd_loss(s2, a, t, y, backend="torch", **opts)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, s2.grad, rtol=1e-5, atol=1e-6)


def _zipf_row(vocab, exponent=1.1, seed=0):
    """Teacher logits whose softmax is Zipf-like (p_r ∝ r^−exponent) over a shuffled vocabulary."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    logits = -exponent * ranks.log() + 0.1 * torch.randn(vocab, generator=g, dtype=torch.float64)
    return logits[torch.randperm(vocab, generator=g)]


def test_topk_error_is_monotone_in_k():
    """Top-k with the tail mass: the loss error against dense is P_T·KL(p|tail ‖ q|tail) ≥ 0, which can
    only shrink as k grows (a finer partition keeps more of the KL), and is 0 at k = V."""
    vocab, n = 500, 4
    a = torch.stack([_zipf_row(vocab, e, seed=i) for i, e in enumerate((0.8, 1.0, 1.2, 1.5))])
    s = torch.stack([_zipf_row(vocab, 1.0, seed=10 + i) for i in range(n)])  # an imperfect student
    dense = oracle(s, a, None, alpha=0.0, reduction="none")[0]
    errors = []
    for k in (1, 2, 4, 8, 16, 32, 64, 128, 256, vocab):
        ids, lp, tail = sparse_teacher_targets(a, alpha=0.0, k_max=k)
        rows = sparse_contrastive_kd_loss(s, ids, lp, tail, reduction="none", backend="torch")
        errors.append(dense - rows)
    err = torch.stack(errors)  # [k, n]
    assert bool((err > -1e-12).all()), err.min()
    assert bool((err[1:] <= err[:-1] + 1e-12).all()), err
    assert float(err[0].min()) > 1e-3  # the test can see an error at all
    torch.testing.assert_close(err[-1], torch.zeros(n, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_v1_and_k_equals_v(backend):
    s = torch.randn(3, 1) * 5
    ids, lp, tail = sparse_teacher_targets(torch.randn(3, 1), alpha=0.0, k_max=4)
    assert ids.shape == (3, 1) and bool((ids == 0).all()) and bool((lp == 0).all())
    loss, grad = _run(s, ids, lp, tail, backend=backend)
    assert float(loss) == 0.0 and bool((grad == 0).all())
    s, a, t = _teacher(5, 7, seed=4, dtype=torch.float32)
    ids, lp, tail = sparse_teacher_targets(a, t, alpha=1.0, k_max=7)
    assert bool((ids >= 0).all())
    loss, grad = _run(s, ids, lp, tail, backend=backend)
    dense = oracle(s, a, t, alpha=1.0)
    assert_loss_close(loss, dense[1], s)
    assert_grad_close(grad, dense[2], s)


def test_builder_matches_independent_formula():
    n, vocab, k = 10, 83, 9
    _, a, t = _teacher(n, vocab, seed=5)
    for opts in (dict(alpha=1.0, plausibility_beta=0.0, temperature=1.3),
                 dict(alpha=0.5, plausibility_beta=0.2, temperature=1.0)):
        ids, lp, tail = sparse_teacher_targets(a, t, k_max=k, chunk_rows=3, **opts)
        log_p = contrasted_log_probs(a, t, **opts)
        assert ids.dtype == torch.int64 and lp.dtype == torch.float64 and ids.shape == (n, k)
        for row in range(n):
            order = sorted(range(vocab), key=lambda v: (-float(log_p[row, v]), v))
            want = [v for v in order[:k] if log_p[row, v] > -INF]
            got = [int(v) for v in ids[row] if v >= 0]
            assert got == want
            assert bool((ids[row, len(want):] == -1).all())
            torch.testing.assert_close(lp[row, : len(want)], log_p[row, want], rtol=1e-12, atol=1e-12)
            rest = 1.0 - float(log_p[row, want].exp().sum())
            if opts["plausibility_beta"] > 0 and len(want) < k:
                assert tail[row] == -INF
            else:
                assert math.isclose(math.exp(float(tail[row])), rest, rel_tol=1e-9, abs_tol=1e-15)
    ids32, lp32, tail32 = sparse_teacher_targets(a.float(), t.float(), alpha=1.0, k_max=k)
    assert lp32.dtype == torch.float32 and tail32.dtype == torch.float32


def test_builder_ties_are_deterministic():
    """Equal log p at the cut: the lower ids are kept, in increasing order (documented rule)."""
    a = torch.zeros(2, 10)
    a[1, 7] = 1.0  # one clear winner, then nine tied tokens
    ids, lp, tail = sparse_teacher_targets(a, alpha=0.0, k_max=4)
    assert ids.tolist() == [[0, 1, 2, 3], [7, 0, 1, 2]]
    torch.testing.assert_close(tail[0].exp(), torch.tensor(0.6))


def test_ties_at_the_plausibility_threshold():
    """SPEC §2 masks a_v < max(a) + log β_p: a token exactly at the threshold is kept."""
    beta = 0.5
    a = torch.full((1, 6), -30.0, dtype=torch.float64)
    a[0, 0] = 0.0
    a[0, 3] = math.log(beta)  # exactly at the threshold: kept
    a[0, 4] = math.nextafter(math.log(beta), -INF)  # one ulp below: masked
    ids, lp, tail = sparse_teacher_targets(a, alpha=0.0, plausibility_beta=beta, k_max=6)
    assert ids.tolist() == [[0, 3, -1, -1, -1, -1]] and tail.item() == -INF
    s = torch.randn(1, 6, dtype=torch.float64)
    for backend in FLOAT64_BACKENDS:
        loss, grad = _run(s, ids, lp, tail, backend=backend)
        dense = oracle(s, a, None, alpha=0.0, plausibility_beta=beta)
        assert_loss_close(loss, dense[1], s)
        assert_grad_close(grad, dense[2], s)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_anywhere_and_pad_values_ignored(backend):
    """−1 may sit anywhere in a row and the log-probabilities under it are never read."""
    n, vocab = 6, 40
    s, a, t = _teacher(n, vocab, seed=6, dtype=torch.float32)
    ids, lp, tail = sparse_teacher_targets(a, t, alpha=1.0, plausibility_beta=0.1, k_max=12)
    ref_loss, ref_grad = _run(s, ids, lp, tail, reduction="none", backend=backend)
    g = torch.Generator().manual_seed(0)
    perm = torch.stack([torch.randperm(12, generator=g) for _ in range(n)])
    ids2, lp2 = ids.gather(1, perm), lp.gather(1, perm)
    lp2 = torch.where(ids2 < 0, torch.tensor([5.0, math.nan, INF, -INF]).repeat(3)[:12].expand(n, 12), lp2)
    loss, grad = _run(s, ids2.int(), lp2, tail, reduction="none", backend=backend)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-7)


def _good_targets(n=3, vocab=10, k=4):
    s, a, t = _teacher(n, vocab, seed=7, dtype=torch.float32)
    ids, lp, tail = sparse_teacher_targets(a, t, alpha=1.0, k_max=k)
    return s, ids, lp, tail


@pytest.mark.parametrize("mutate, kind, match", [
    (lambda s, i, lp, tl: (s, i.clone().index_put_((torch.tensor([1]), torch.tensor([2])), torch.tensor(10)),
                           lp, tl), ValueError, r"teacher_ids must be in \[-1, 10\).*got 10"),
    (lambda s, i, lp, tl: (s, i.clone().index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor(-2)),
                           lp, tl), ValueError, r"teacher_ids must be in \[-1, 10\).*got -2"),
    (lambda s, i, lp, tl: (s, torch.cat([i[:, :1], i[:, :1], i[:, 2:]], 1), lp, tl), ValueError,
     "must not repeat an id"),
    (lambda s, i, lp, tl: (s, i, lp + 0.1, tl), ValueError, r"sum to at most 1 \+ 0.001"),
    (lambda s, i, lp, tl: (s, i, lp, torch.zeros_like(tl)), ValueError, "sum to at most 1"),
    (lambda s, i, lp, tl: (s, i.float(), lp, tl), TypeError, "teacher_ids must be int64, int32 or int16"),
    (lambda s, i, lp, tl: (s, i, lp.long(), tl), TypeError, "teacher_logprobs must be float32"),
    (lambda s, i, lp, tl: (s, i[:2], lp[:2], tl), ValueError, r"teacher_ids must have shape \(3, 'K'\)"),
    (lambda s, i, lp, tl: (s, i, lp[:, :3], tl), ValueError, "teacher_logprobs must have teacher_ids' shape"),
    (lambda s, i, lp, tl: (s, i, lp, tl[:2]), ValueError, r"tail_logmass must have shape \(3,\)"),
    (lambda s, i, lp, tl: (s, i[:, :0], lp[:, :0], tl), ValueError, "K >= 1"),
    (lambda s, i, lp, tl: (s.long(), i, lp, tl), TypeError, "student_logits must be float32"),
])
def test_bad_targets_refused(mutate, kind, match):
    s, ids, lp, tail = mutate(*_good_targets())
    with pytest.raises(kind, match=match):
        sparse_contrastive_kd_loss(s, ids, lp, tail, backend="torch")


def test_value_checks_skip_ignored_rows_and_accept_rounding():
    s, ids, lp, tail = _good_targets()
    y = torch.tensor([1, -100, 2])
    ids = ids.clone()
    ids[1] = 0  # an ignored row may hold anything (e.g. zeros written for padding)
    loss = sparse_contrastive_kd_loss(s, ids, lp + 5e-4, tail, y, backend="torch")  # fp16-like rounding
    assert torch.isfinite(loss)


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_reverse_kl_and_jsd_refused_with_reason(divergence):
    s, ids, lp, tail = _good_targets()
    with pytest.raises(ValueError, match="p is 0 off the support"):
        sparse_contrastive_kd_loss(s, ids, lp, tail, divergence=divergence)
    with pytest.raises(ValueError, match="p is 0 off the support"):
        SparseContrastiveKDLoss(divergence=divergence)
    with pytest.raises(ValueError, match="divergence must be 'forward_kl'"):
        sparse_contrastive_kd_loss(s, ids, lp, tail, divergence="kl")


@pytest.mark.parametrize("kw, kind, match", [
    (dict(backend="cuda"), ValueError, "backend='cuda' has no sparse-target kernel"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
    (dict(temperature=0.0), ValueError, "temperature must be"),
    (dict(hard_weight=1.0), ValueError, "hard_weight=1.0 > 0 needs labels"),
    (dict(reduction="batchmean"), ValueError, "reduction must be one of"),
    (dict(reduction="sum", num_items_in_batch=3), ValueError, "num_items_in_batch replaces"),
    (dict(inplace_backward=1), TypeError, "inplace_backward must be a bool"),
])
def test_bad_options_refused(kw, kind, match):
    s, ids, lp, tail = _good_targets()
    with pytest.raises(kind, match=match):
        sparse_contrastive_kd_loss(s, ids, lp, tail, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_rules(backend):
    """SPEC §3 carried to sparse targets (row by row, against the oracle's rules)."""
    vocab = 8
    s = torch.randn(8, vocab)
    ids = torch.tensor([[0, 1, -1]] * 8)
    lp = torch.log(torch.tensor([[0.75, 0.25, 0.0]] * 8))
    tail = torch.full((8,), -INF)
    s[0, 3] = math.nan  # NaN in s -> NaN
    s[1, 5] = INF  # +inf in s -> NaN
    s[2, 1] = -INF  # −inf where p > 0 -> +inf
    s[3, 6] = -INF  # −inf where p = 0 -> finite
    s[4] = -INF  # no student distribution -> NaN
    lp[5, 0] = math.nan  # NaN teacher log-probability -> NaN
    lp[6] = -INF  # no target distribution -> NaN
    tail[7] = math.log(0.0) if False else math.nan  # NaN tail -> NaN
    rows = sparse_contrastive_kd_loss(s, ids, lp, tail, reduction="none", backend=backend)
    truth = sparse_oracle(s, ids, lp, tail, reduction="none")[0]
    assert [math.isnan(x) for x in rows.tolist()] == [True, True, False, False, True, True, True, True]
    assert rows[2] == INF and math.isfinite(rows[3])
    torch.testing.assert_close(rows.double(), truth, equal_nan=True, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tail_against_impossible_student_is_inf(backend):
    s = torch.tensor([[0.0, 1.0, -INF, -INF]])
    ids, lp = torch.tensor([[0, 1]]), torch.log(torch.tensor([[0.5, 0.3]]))
    rows = sparse_contrastive_kd_loss(s, ids, lp, torch.log(torch.tensor([0.2])), reduction="none", backend=backend)
    assert rows.item() == INF


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored(backend):
    s, ids, lp, tail = _good_targets()
    y = torch.full((3,), -100)
    for reduction in ("mean", "sum", "none"):
        loss, grad = _run(s, ids, lp, tail, y, backend=backend, reduction=reduction, hard_weight=0.5)
        assert bool((loss == 0).all()) and bool((grad == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_student_and_leading_dims(backend):
    b, t_len, vocab = 2, 5, 33
    g = torch.Generator().manual_seed(8)
    full = torch.randn(b, t_len + 1, vocab, generator=g) * 3
    s = full[:, :-1]  # the Hugging Face shift: not viewable as [N, V]
    assert not s.is_contiguous()
    a = torch.randn(b, t_len, vocab, generator=g) * 3
    y = torch.randint(0, vocab, (b, t_len), generator=g)
    y[0, 1] = -100
    ids, lp, tail = sparse_teacher_targets(a, None, y, alpha=0.0, k_max=6)
    assert ids.shape == (b, t_len, 6) and tail.shape == (b, t_len)
    loss, grad = _run(s, ids, lp, tail, y, backend=backend, hard_weight=0.2)
    truth = sparse_oracle(s, ids, lp, tail, y, hard_weight=0.2)
    assert_loss_close(loss, truth[1], s)
    assert_grad_close(grad, truth[2], s)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    s, a, t = _teacher(16, 300, seed=9, dtype=torch.float32)
    ids, lp, tail = sparse_teacher_targets(a, t, alpha=1.0, k_max=20)
    first = _run(s, ids, lp, tail, backend=backend)
    second = _run(s, ids, lp, tail, backend=backend)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward(backend):
    s, a, t = _teacher(6, 29, seed=10, dtype=torch.float32)
    ids, lp, tail = sparse_teacher_targets(a, t, alpha=1.0, k_max=5)
    y = _labels(6, 29)
    want = _run(s, ids, lp, tail, y, backend=backend, hard_weight=0.3)
    leaf = s.clone().requires_grad_(True)
    work = leaf * 1.0  # a non-leaf the in-place backward may overwrite
    loss = sparse_contrastive_kd_loss(work, ids, lp, tail, y, backend=backend, hard_weight=0.3,
                                      inplace_backward=True)
    loss.backward()
    torch.testing.assert_close(loss.detach(), want[0])
    torch.testing.assert_close(leaf.grad, want[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
def test_gradcheck_float64(backend):
    s, a, t = _teacher(5, 11, seed=11)
    y = _labels(5, 11)
    ids, lp, tail = sparse_teacher_targets(a, t, y, alpha=1.0, k_max=4)
    for tl in (tail, None):
        def f(x, tl=tl):
            return sparse_contrastive_kd_loss(x, ids, lp, tl, y, temperature=1.7, hard_weight=0.3,
                                              backend=backend, reduction="none")
        assert torch.autograd.gradcheck(f, (s.clone().requires_grad_(True),))


def _op_samples(backend):
    s, a, t = _teacher(4, 13, seed=12, dtype=torch.float32)
    y = _labels(4, 13)
    ids, lp, tail = sparse_teacher_targets(a, t, y, alpha=1.0, k_max=5)
    ids2, lp2, _ = sparse_teacher_targets(a, t, alpha=1.0, plausibility_beta=0.2, k_max=5)
    return [(s.reshape(2, 2, 13), ids.reshape(2, 2, 5), lp.reshape(2, 2, 5), tail.reshape(2, 2), y.reshape(2, 2),
             1.5, 0.8, 0.2, -100, backend),
            (s, ids2.int(), lp2.half(), None, None, 1.0, 1.0, 0.0, -100, backend)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    for args in _op_samples(backend):
        s = args[0].clone().requires_grad_(True)
        fwd_args = (s, *args[1:], False)
        torch.library.opcheck(torch.ops.caad.sparse_kd_fwd.default, fwd_args)
        rows, stats = (x.detach() for x in torch.ops.caad.sparse_kd_fwd(*fwd_args))
        grad_rows = torch.rand_like(rows)
        rest = args[5:]
        torch.library.opcheck(torch.ops.caad.sparse_kd_bwd.default,
                              (grad_rows, args[0], *args[1:5], stats, *rest))
        torch.library.opcheck(torch.ops.caad.sparse_kd_bwd_.default,
                              (grad_rows, args[0].clone(), *args[1:5], stats, *rest))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    s, a, t = _teacher(6, 21, seed=13, dtype=torch.float32)
    y = _labels(6, 21)
    ids, lp, tail = sparse_teacher_targets(a, t, y, alpha=1.0, k_max=5)

    def step(x):
        return sparse_contrastive_kd_loss(x, ids, lp, tail, y, hard_weight=0.2, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1, x2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    l1, l2 = step(x1), compiled(x2)
    l1.backward()
    l2.backward()
    torch.testing.assert_close(l2, l1)
    torch.testing.assert_close(x2.grad, x1.grad)


def test_module_form():
    s, ids, lp, tail = _good_targets()
    mod = SparseContrastiveKDLoss(temperature=1.5, reduction="sum", backend="torch")
    torch.testing.assert_close(mod(s, ids, lp, tail),
                               sparse_contrastive_kd_loss(s, ids, lp, tail, temperature=1.5, reduction="sum",
                                                          backend="torch"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits(backend):
    """|logits| ~ 1e4, one-hot-like teachers and an all-equal student row (SPEC §4)."""
    n, vocab = 6, 50
    s, a, t = _teacher(n, vocab, seed=14, scale=1e4, dtype=torch.float32)
    s[0] = 7.0  # all equal
    a[1] = -1e4
    a[1, 3] = 1e4  # one-hot teacher
    ids, lp, tail = sparse_teacher_targets(a, t, alpha=0.5, temperature=3.0, k_max=8)
    loss, grad = _run(s, ids, lp, tail, backend=backend, temperature=3.0, reduction="none")
    truth = sparse_oracle(s, ids, lp, tail, temperature=3.0, reduction="none")
    assert bool(torch.isfinite(loss).all())
    assert_loss_close(loss, truth[1], s)
    assert_grad_close(grad, truth[2], s)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton unavailable")
def test_triton_refuses_too_many_ids():
    from caad_kernels.sparse_loss import TRITON_MAX_K

    k = TRITON_MAX_K + 1
    s = torch.zeros(1, k)
    ids = torch.arange(k).unsqueeze(0)
    lp = torch.full((1, k), -math.log(k))
    with pytest.raises(ValueError, match=f"at most {TRITON_MAX_K} ids per row"):
        sparse_contrastive_kd_loss(s, ids, lp, backend="triton")


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ kernels did not build here")
def test_opcheck_native_ops():
    from caad_kernels.backends import sparse_native_backend as native

    native._register_fakes()
    s, a, t = _teacher(4, 13, seed=15, dtype=torch.float32)
    y = _labels(4, 13)
    ids, lp, tail = sparse_teacher_targets(a, t, y, alpha=1.0, k_max=5)
    s3, ids2, lp2, tail1, y1 = native._operands(s.reshape(2, 2, 13), ids, lp, tail, y)
    scalars = (1.5, 0.8, 0.2, -100)
    torch.library.opcheck(torch.ops.caad.native_sparse_kd_forward.default, (s3, ids2, lp2, tail1, y1, *scalars))
    rows, stats = torch.ops.caad.native_sparse_kd_forward(s3, ids2, lp2, tail1, y1, *scalars)
    torch.library.opcheck(torch.ops.caad.native_sparse_kd_backward.default,
                          (torch.rand_like(rows), s3, ids2, lp2, tail1, y1, stats, *scalars, torch.empty_like(s3)))


def test_auto_dispatch(monkeypatch):
    from caad_kernels.sparse_loss import resolve_sparse_backend

    cpu = torch.device("cpu")
    expected = "cpu" if "cpu" in BACKENDS else "torch"
    assert resolve_sparse_backend("auto", cpu, float64=False) == expected
    assert resolve_sparse_backend("auto", cpu, float64=True) == expected  # cpu takes float64 too
    monkeypatch.setenv("CAAD_BACKEND", "torch")
    assert resolve_sparse_backend("auto", cpu, float64=False) == "torch"
    with pytest.raises(TypeError, match="float64 needs one of"):
        resolve_sparse_backend("triton", cpu, float64=True)
