"""Edge cases of SPEC §2–§5 (shapes, masking, non-finite data, extreme logits, strides, dtypes,
determinism, in-place backward, gradient scaling), each against the independent float64 oracle."""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from spec_oracle import (  # noqa: E402
    assert_loss_close,
    assert_matches_oracle,
    oracle,
    run_loss,
)

from caad_kernels import available_backends, contrastive_kd_loss  # noqa: E402

BACKENDS = available_backends("cpu")
INF = float("inf")
NAN = float("nan")


def _randn(*shape, seed, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _inputs(N, V, seed=0, dtype=torch.float32, scale=3.0):
    return tuple(_randn(N, V, seed=seed + i, scale=scale, dtype=dtype) for i in range(3))


def _labels(N, V, seed=0, ignore_every=3, ignore_index=-100):
    g = torch.Generator().manual_seed(seed + 100)
    y = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        y[torch.arange(N) % ignore_every == 1] = ignore_index
    return y


def _check(backend, s, a, t=None, labels=None, grad_output=None, **opts):
    loss, grad = run_loss(contrastive_kd_loss, s, a, t, labels, grad_output=grad_output, backend=backend,
                          **opts)
    assert torch.isfinite(loss).all(), loss
    assert_matches_oracle(loss, grad, s, a, t, labels, grad_output=grad_output, **opts)
    return loss, grad


# ----------------------------------------------------------------------------- shapes


OPTION_SETS = {
    "fkl_hard": dict(alpha=1.0, soft_weight=0.7, hard_weight=0.3),
    "jsd_tau2_plaus": dict(alpha=0.5, divergence="jsd", jsd_beta=0.5, temperature=2.0,
                           plausibility_beta=0.05),
}


@pytest.mark.parametrize("opts", list(OPTION_SETS), ids=list(OPTION_SETS))
@pytest.mark.parametrize("V", [1, 7, 1000, 4099])
@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_sizes(backend, V, opts):
    N = 9
    s, a, t = _inputs(N, V, seed=V)
    _check(backend, s, a, t, _labels(N, V, seed=V), **OPTION_SETS[opts])


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_one_is_zero_loss(backend):
    """V = 1: p = q = 1, so the divergence, the hard term and the gradient are all 0."""
    s, a, t = _inputs(5, 1, seed=2)
    loss, grad = run_loss(contrastive_kd_loss, s, a, t, _labels(5, 1), backend=backend, hard_weight=1.0,
                          reduction="sum")
    assert abs(float(loss)) <= 1e-6
    assert grad.abs().max() <= 1e-6


@pytest.mark.parametrize("N", [1, 3, 15])
@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_row_counts(backend, N):
    s, a, t = _inputs(N, 129, seed=N)
    _check(backend, s, a, t, _labels(N, 129, seed=N, ignore_every=0), divergence="jsd", jsd_beta=0.3,
           hard_weight=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims(backend):
    """[B, T, V] inputs with [B, T] labels: rows are the flattened leading dims."""
    B, T, V = 3, 5, 67
    s, a, t = (x.reshape(B, T, V) for x in _inputs(B * T, V, seed=11))
    labels = _labels(B * T, V, seed=11).reshape(B, T)
    loss, grad = _check(backend, s, a, t, labels, hard_weight=0.2)
    assert grad.shape == (B, T, V)
    rows = contrastive_kd_loss(s, a, t, labels, backend=backend, reduction="none")
    assert rows.shape == (B * T,)
    assert_matches_oracle(rows, None, s, a, t, labels, reduction="none")


# ----------------------------------------------------------------------------- ignored rows


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_exact_zero(backend):
    N, V = 10, 50
    s, a, t = _inputs(N, V, seed=3)
    labels = _labels(N, V, seed=3)
    ignored = labels == -100
    w = torch.rand(N, generator=torch.Generator().manual_seed(0)) + 0.5
    rows, grad = _check(backend, s, a, t, labels, grad_output=w, reduction="none", hard_weight=0.5)
    assert torch.equal(rows[ignored], torch.zeros(int(ignored.sum())))
    assert torch.equal(grad[ignored], torch.zeros_like(grad[ignored]))
    assert (grad[~ignored].abs().amax(-1) > 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored(backend, reduction):
    """SPEC §3: loss 0 and gradient exactly 0, no NaN (mean divides by max(#valid, 1))."""
    N, V = 6, 40
    s, a, t = _inputs(N, V, seed=4)
    labels = torch.full((N,), -100)
    loss, grad = run_loss(contrastive_kd_loss, s, a, t, labels, backend=backend, reduction=reduction,
                          hard_weight=0.5)
    assert torch.equal(loss, torch.zeros_like(loss))
    assert loss.shape == ((N,) if reduction == "none" else ())
    assert torch.equal(grad, torch.zeros_like(s))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored_with_num_items(backend):
    s, a, t = _inputs(4, 40, seed=5)
    loss, grad = run_loss(contrastive_kd_loss, s, a, t, torch.full((4,), -100), backend=backend,
                          num_items_in_batch=8)
    assert float(loss) == 0.0 and torch.equal(grad, torch.zeros_like(s))


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index(backend):
    N, V = 8, 30
    s, a, t = _inputs(N, V, seed=6)
    labels = _labels(N, V, seed=6, ignore_index=7)  # -100 is then an ordinary (unused) label value
    rows, grad = _check(backend, s, a, t, labels, ignore_index=7, reduction="none")
    assert (rows[labels == 7] == 0).all() and (rows[labels != 7] > 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_labels(backend):
    N, V = 8, 30
    s, a, t = _inputs(N, V, seed=7)
    _check(backend, s, a, t, _labels(N, V, seed=7).to(torch.int32), hard_weight=1.0)


# ----------------------------------------------------------------------------- non-finite data (SPEC §3)

NF_N, NF_V, BAD = 5, 33, 2  # one poisoned row, BAD, among finite ones


def _rows(backend, s, a, t, labels=None, **opts):
    rows = contrastive_kd_loss(s, a, t, labels, backend=backend, reduction="none", **opts)
    exp, _, _ = oracle(s, a, t, labels, reduction="none", **opts)
    return rows, exp


def _assert_only_bad_row_nan(backend, s, a, t, **opts):
    rows, exp = _rows(backend, s, a, t, **opts)
    assert math.isnan(float(exp[BAD])), "oracle disagrees with the test's premise"
    assert math.isnan(float(rows[BAD])), f"row {BAD} should be NaN, got {float(rows[BAD])}"
    keep = torch.arange(NF_N) != BAD
    assert torch.isfinite(rows[keep]).all()
    assert_matches_oracle(rows, None, s, a, t, None, reduction="none", **opts)  # NaN only at BAD
    mean = contrastive_kd_loss(s, a, t, None, backend=backend, **opts)
    assert math.isnan(float(mean)), "a NaN row must make the mean NaN, never a silent 0"


def _poison(x, col, value):
    x = x.clone()
    x[BAD, col] = value
    return x


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_student_gives_nan_row(backend):
    s, a, t = _inputs(NF_N, NF_V, seed=20)
    _assert_only_bad_row_nan(backend, _poison(s, 4, NAN), a, t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_teacher_audio_gives_nan_row(backend):
    s, a, t = _inputs(NF_N, NF_V, seed=21)
    _assert_only_bad_row_nan(backend, s, _poison(a, 4, NAN), t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_teacher_text_gives_nan_row(backend):
    s, a, t = _inputs(NF_N, NF_V, seed=22)
    _assert_only_bad_row_nan(backend, s, a, _poison(t, 4, NAN))


@pytest.mark.parametrize("backend", BACKENDS)
def test_posinf_in_student_gives_nan_row(backend):
    s, a, t = _inputs(NF_N, NF_V, seed=23)
    _assert_only_bad_row_nan(backend, _poison(s, 4, INF), a, t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_posinf_in_teacher_audio_gives_nan_row(backend):
    s, a, t = _inputs(NF_N, NF_V, seed=24)
    _assert_only_bad_row_nan(backend, s, _poison(a, 4, INF), t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_posinf_in_teacher_text_gives_nan_row(backend):
    """+inf in t would naively give z = −∞ (a "valid" mask); SPEC §3 says NaN."""
    s, a, t = _inputs(NF_N, NF_V, seed=25)
    _assert_only_bad_row_nan(backend, s, a, _poison(t, 4, INF))


@pytest.mark.parametrize("backend", BACKENDS)
def test_neginf_in_text_where_audio_finite_gives_nan_row(backend):
    """The contrast (1+α)a − α(−∞) is undefined: NaN, not +inf and not a silent mask."""
    s, a, t = _inputs(NF_N, NF_V, seed=26)
    _assert_only_bad_row_nan(backend, s, a, _poison(t, 4, -INF))


@pytest.mark.parametrize("backend", BACKENDS)
def test_neginf_audio_row_is_nan(backend):
    """A row whose audio logits are all −∞ has no teacher distribution: NaN."""
    s, a, t = _inputs(NF_N, NF_V, seed=27)
    a = a.clone()
    a[BAD] = -INF
    _assert_only_bad_row_nan(backend, s, a, t)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "reverse_kl"])
@pytest.mark.parametrize("masked", ["student", "teacher", "both"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_row_without_a_distribution_is_nan_for_every_divergence(backend, masked, divergence):
    """SPEC §3: all student logits, or all audio-aware logits (here with the text logits), −∞ gives NaN,
    on every backend — before, reverse KL gave a silent 0.0 (torch) and +inf (cpu/triton) on such rows."""
    s, a, t = _inputs(NF_N, NF_V, seed=29)
    s, a, t = s.clone(), a.clone(), t.clone()
    if masked in ("student", "both"):
        s[BAD] = -INF
    if masked in ("teacher", "both"):
        a[BAD] = -INF
        t[BAD] = -INF
    _assert_only_bad_row_nan(backend, s, a, t, divergence=divergence)
    labels = _labels(NF_N, NF_V, seed=29, ignore_every=0)
    rows = contrastive_kd_loss(s, a, t, labels, backend=backend, reduction="none", divergence=divergence,
                               hard_weight=0.5)
    assert math.isnan(float(rows[BAD])) and torch.isfinite(rows[torch.arange(NF_N) != BAD]).all(), rows


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "reverse_kl"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_neginf_in_audio_masks_token(backend, divergence):
    """−∞ in a is an impossible token whatever t is there (finite, −∞, or a huge value): finite
    loss with p_v = 0. With reverse_kl the student is masked too (else q log(q/0) = +∞)."""
    s, a, t = _inputs(NF_N, NF_V, seed=28)
    a, t = a.clone(), t.clone()
    a[:, :3] = -INF  # padding: masked in both paths
    t[:, :3] = -INF
    a[1, 10:14] = -INF  # masked in a only; t finite there, one of them huge
    t[1, 12] = 3e4
    a[3, 20] = -INF
    if divergence == "reverse_kl":
        s = s.clone()
        s[a == -INF] = -INF
    _check(backend, s, a, t, divergence=divergence, reduction="none", alpha=1.5)
    _check(backend, s, a, t, divergence=divergence, alpha=1.5, temperature=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_neginf_padding_alpha0(backend):
    """Padding masked to −∞ in the audio path only, α = 0 (standard KD), teacher text absent."""
    s, a, _ = _inputs(NF_N, NF_V, seed=29)
    a = a.clone()
    a[:, -5:] = -INF
    _check(backend, s, a, None, alpha=0.0, divergence="jsd", jsd_beta=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_neginf_in_student_where_p_positive_gives_posinf(backend):
    s, a, t = _inputs(NF_N, NF_V, seed=30)
    rows, exp = _rows(backend, _poison(s, 4, -INF), a, t)
    assert float(exp[BAD]) == INF, "oracle disagrees with the test's premise"
    assert float(rows[BAD]) == INF, f"row {BAD}: expected +inf, got {float(rows[BAD])}"
    keep = torch.arange(NF_N) != BAD
    assert_loss_close(rows[keep], exp[keep], s)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "reverse_kl"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_neginf_in_student_where_p_zero_is_finite(backend, divergence):
    """0·log 0 = 0: a token impossible for both teacher and student contributes nothing."""
    s, a, t = _inputs(NF_N, NF_V, seed=31)
    a, s = _poison(a, 4, -INF), _poison(s, 4, -INF)
    _check(backend, s, a, t, divergence=divergence, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_ignored_row_does_not_leak(backend):
    """Ignored rows contribute exactly 0 to loss and gradient, even when their data is NaN/inf."""
    s, a, t = _inputs(NF_N, NF_V, seed=32)
    s, a, t = _poison(s, 1, NAN), _poison(a, 2, INF), _poison(t, 3, NAN)
    labels = torch.arange(NF_N)
    labels[BAD] = -100
    loss, grad = _check(backend, s, a, t, labels, hard_weight=0.5)
    assert torch.equal(grad[BAD], torch.zeros_like(grad[BAD]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_text_not_read_when_alpha_zero(backend):
    """α = 0: t is not read (NaN there changes nothing)."""
    s, a, t = _inputs(NF_N, NF_V, seed=33)
    t = torch.full_like(t, NAN)
    _check(backend, s, a, t, alpha=0.0, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
def test_teachers_not_read_when_soft_weight_zero(backend):
    """soft_weight = 0: only the hard term; NaN in both teachers changes nothing."""
    s, a, t = _inputs(NF_N, NF_V, seed=34)
    a, t = torch.full_like(a, NAN), torch.full_like(t, NAN)
    labels = _labels(NF_N, NF_V, seed=34)
    _check(backend, s, a, t, labels, soft_weight=0.0, hard_weight=1.0)


# ----------------------------------------------------------------------------- numerical stability


def _extreme_inputs(N, V, seed):
    """|x| up to 1e4: half the rows spread over [−1e4, 1e4] (near one-hot), half O(1) noise on
    a ±1e4 offset (fp32 spacing there is ~1e-3, so every subtraction of the max matters)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for sign in (1.0, -1.0, 1.0):
        x = (torch.rand(N, V, generator=g, dtype=torch.float64) * 2 - 1) * 1e4
        x[N // 2:] = sign * 1e4 + torch.randn(N - N // 2, V, generator=g, dtype=torch.float64) * 3
        x[0, :4] = torch.tensor([1e4, -1e4, 1e4, -1e4])  # exact extremes, ties of the max included
        out.append(x.clamp(-1e4, 1e4).float())
    return out


def _err(x, truth):
    return float((x.double().cpu() - truth.double().cpu()).abs().max())


EXTREME_OPTS = {
    "fkl": dict(alpha=1.0),
    "fkl_tau2_hard": dict(alpha=0.5, temperature=2.0, hard_weight=0.5),
    "jsd": dict(alpha=1.0, divergence="jsd", jsd_beta=0.5),
    "rkl_alpha0": dict(alpha=0.0, divergence="reverse_kl"),
    "plaus": dict(alpha=1.0, plausibility_beta=0.1),
}


def _assert_within_budget(backend, s, a, t, labels, groups, **opts):
    """Error budget (STYLE.md, Cut Cross-Entropy): the kernel's error against the float64 truth
    may exceed the error of a plain fp32 torch computation of the same formula (our oracle run
    in fp32, log-softmax as x − logsumexp(x)) only by a factor 4, plus a floor of 1e-6 relative
    to the largest value (which only matters where the fp32 computation happens to be exact).
    Errors are maxima over each group of rows, so one lucky fp32 rounding does not decide."""
    opts = dict(opts, reduction="none")
    rows, grad = run_loss(contrastive_kd_loss, s, a, t, labels, backend=backend, **opts)
    truth_rows, _, truth_grad = oracle(s, a, t, labels, **opts)
    b32_rows, _, b32_grad = oracle(s, a, t, labels, dtype=torch.float32, **opts)
    assert torch.isfinite(truth_rows).all(), "the test's premise: a finite truth"
    assert torch.isfinite(rows).all(), rows
    assert torch.isfinite(grad).all()
    for grp in groups:
        for what, k, b, tr in (("loss", rows, b32_rows, truth_rows), ("grad", grad, b32_grad, truth_grad)):
            e_k, e_32 = _err(k[grp], tr[grp]), _err(b[grp], tr[grp])
            bound = 4 * e_32 + 1e-6 * max(1.0, float(tr[grp].abs().max()))
            assert e_k <= bound, f"{what} rows {grp}: error {e_k:.3g} > budget {bound:.3g} (fp32: {e_32:.3g})"
    return rows, grad


@pytest.mark.parametrize("opts", list(EXTREME_OPTS), ids=list(EXTREME_OPTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits(backend, opts):
    """|x| up to 1e4: finite, and within the fp32 error budget of the float64 truth. The two
    halves (spread / offset rows) have losses of very different size: each has its own budget."""
    N, V = 16, 300
    s, a, t = _extreme_inputs(N, V, seed=40)
    labels = _labels(N, V, seed=40, ignore_every=0) if EXTREME_OPTS[opts].get("hard_weight") else None
    halves = [slice(0, N // 2), slice(N // 2, N)]
    _assert_within_budget(backend, s, a, t, labels, halves, **EXTREME_OPTS[opts])


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_all_equal(backend):
    """Constant rows (uniform distributions), at 0, ±1e4 and in between: where teacher and student
    are both uniform the loss and gradient are 0 (to 1e-6 for moderate constants; at ±1e4 the
    fp32 log-sum-exp itself is off by up to half an ulp of 1e4, so there the budget applies)."""
    N, V = 6, 100
    c = torch.tensor([0.0, 3.3, -7.0, 1e4, -1e4, 1e4])[:, None]
    s = c.expand(N, V).contiguous()
    a, t = s.clone(), (s * 0.5).contiguous()
    rows, grad = _assert_within_budget(backend, s, a, t, None, [slice(0, 3), slice(3, 6)])
    assert (rows[:3].abs() <= 1e-6).all(), rows
    assert (grad[:3].abs() <= 1e-6).all()
    s2, a2, _ = _inputs(N, V, seed=41)
    _assert_within_budget(backend, s2, a, t, None, [slice(0, 3), slice(3, 6)])  # uniform teacher
    _assert_within_budget(backend, s, a2, None, None, [slice(0, 3), slice(3, 6)], alpha=0.0,
                          divergence="jsd")  # uniform student


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_hot_teacher(backend, divergence):
    """Exact one-hot (all other audio logits −∞) and numerically one-hot (a gap of 1e4, so
    z = 2a − t is ±1e4 while s is O(1): nothing may cancel at the scale of 1e4)."""
    N, V = 6, 64
    s, _, t = _inputs(N, V, seed=42)
    hot = torch.arange(N) * 7 % V
    exact = torch.full((N, V), -INF)
    exact[torch.arange(N), hot] = 0.0
    near = torch.full((N, V), -5e3)
    near[torch.arange(N), hot] = 5e3
    for a in (exact, near):
        rows, _ = _check(backend, s, a, t, divergence=divergence, reduction="none")
        if divergence == "forward_kl":  # KL(onehot_y ‖ q) = −log q_y
            logq = torch.log_softmax(s.double(), -1)
            assert_loss_close(rows, -logq[torch.arange(N), hot], s)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_hot_student(backend, divergence):
    """The mirror image: a numerically one-hot student (gap 1e4) against an O(1) teacher."""
    N, V = 6, 64
    _, a, t = _inputs(N, V, seed=44)
    hot = torch.arange(N) * 5 % V
    s = torch.full((N, V), -5e3)
    s[torch.arange(N), hot] = 5e3
    rows, _ = _check(backend, s, a, t, divergence=divergence, reduction="none")
    if divergence == "reverse_kl":  # KL(onehot_y ‖ p) = −log p_y
        logp = torch.log_softmax(2 * a.double() - t.double(), -1)
        assert_loss_close(rows, -logp[torch.arange(N), hot], s)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plausibility_leaves_one_token(backend):
    """β_p = 0.5 with every other audio token at least e^5 less likely than the max: only the
    argmax survives, so the contrast is one-hot whatever t says."""
    N, V = 6, 80
    s, a, t = _inputs(N, V, seed=43)
    a = -5.5 - a.abs()
    top = torch.arange(N) * 11 % V
    a[torch.arange(N), top] = 2.0
    for tau in (1.0, 2.0):
        rows, _ = _check(backend, s, a, t, plausibility_beta=0.5, temperature=tau, reduction="none")
        logq = torch.log_softmax(s.double() / tau, -1)
        assert_loss_close(rows, -logq[torch.arange(N), top], s)


# ----------------------------------------------------------------------------- strides and dtypes


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_shifted_3d(backend):
    """The usual causal-LM shift: logits[:, :-1, :] of [B, T, V] with labels[:, 1:], teachers
    permuted views of [V, T, B] storage."""
    B, T, V = 2, 6, 45
    g = torch.Generator().manual_seed(50)
    base = (torch.randn(B, T + 1, V, generator=g) * 3).requires_grad_(True)
    s = base[:, :-1, :]
    a = (torch.randn(V, T, B, generator=g) * 3).permute(2, 1, 0)
    t = (torch.randn(B, T + 1, V, generator=g) * 3)[:, 1:, :]
    labels = torch.randint(0, V, (B, T + 1), generator=g)
    labels[0, 3] = -100
    labels = labels[:, 1:]
    assert not (s.is_contiguous() or a.is_contiguous() or t.is_contiguous() or labels.is_contiguous())
    opts = dict(hard_weight=0.3, divergence="jsd", jsd_beta=0.4)
    loss = contrastive_kd_loss(s, a, t, labels, backend=backend, **opts)
    loss.backward()
    assert_matches_oracle(loss, base.grad[:, :-1, :], s, a, t, labels, **opts)
    assert torch.equal(base.grad[:, -1, :], torch.zeros(B, V))


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_transposed(backend):
    """Each input a [V, N] tensor transposed (column-major rows)."""
    N, V = 7, 90
    s, a, t = (x.t().contiguous().t() for x in _inputs(N, V, seed=51))
    assert s.stride() == (1, N)
    _check(backend, s, a, t, _labels(N, V, seed=51), hard_weight=0.5, plausibility_beta=0.1)
    _check(backend, s, a.contiguous(), t, reduction="none", alpha=0.3)  # mixed layouts


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_column_slice(backend):
    """Rows with a gap between them (a wider buffer sliced to V columns)."""
    N, V = 6, 70
    s, a, t = (x[:, 5:5 + V] for x in _inputs(N, V + 9, seed=52))
    _check(backend, s, a, t, reduction="sum", temperature=1.5)


DTYPE_TRIPLES = [
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16, torch.float16),
    (torch.float32, torch.float32, torch.float32),
    (torch.bfloat16, torch.float32, torch.float16),
    (torch.float32, torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.bfloat16, torch.float32),
]


def _dt_id(trip):
    return "-".join(str(d).replace("torch.", "") for d in trip)


@pytest.mark.parametrize("dtypes", DTYPE_TRIPLES, ids=[_dt_id(d) for d in DTYPE_TRIPLES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_input_dtypes(backend, dtypes):
    """Each input its own dtype; the loss is fp32 and the gradient has s's dtype."""
    N, V = 9, 200
    s, a, t = (x.to(d) for x, d in zip(_inputs(N, V, seed=53), dtypes, strict=True))
    labels = _labels(N, V, seed=53)
    for opts in (dict(hard_weight=0.5), dict(divergence="jsd", jsd_beta=0.7, reduction="none")):
        loss, grad = _check(backend, s, a, t, labels, **opts)
        assert loss.dtype == torch.float32
        assert grad.dtype == s.dtype


# ----------------------------------------------------------------------------- autograd contract


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend, dtype):
    N, V = 16, 2500
    s, a, t = _inputs(N, V, seed=60, dtype=dtype)
    labels = _labels(N, V, seed=60)
    opts = dict(backend=backend, hard_weight=0.3, divergence="jsd", plausibility_beta=0.01)
    l1, g1 = run_loss(contrastive_kd_loss, s, a, t, labels, **opts)
    l2, g2 = run_loss(contrastive_kd_loss, s, a, t, labels, **opts)
    assert torch.equal(l1, l2) and torch.equal(g1, g2)
    r1 = contrastive_kd_loss(s, a, t, labels, reduction="none", **opts)
    r2 = contrastive_kd_loss(s, a, t, labels, reduction="none", **opts)
    assert torch.equal(r1, r2)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward(backend, dtype, reduction):
    """inplace_backward=True: the same gradient, written into the student logits' storage."""
    N, V = 8, 150
    s0, a, t = _inputs(N, V, seed=61, dtype=dtype)
    labels = _labels(N, V, seed=61)
    w = torch.rand(N, generator=torch.Generator().manual_seed(1)) + 0.5
    opts = dict(backend=backend, hard_weight=0.4, reduction=reduction)

    def go(loss):
        return (loss * w).sum() if reduction == "none" else loss * 2.5

    ref_loss, ref_grad = run_loss(contrastive_kd_loss, s0, a, t, labels,
                                  grad_output=w if reduction == "none" else 2.5, **opts)

    leaf = s0.clone().requires_grad_(True)
    s = leaf * 1  # a non-leaf, like the output of an lm_head
    seen = []
    s.register_hook(seen.append)
    loss = contrastive_kd_loss(s, a, t, labels, inplace_backward=True, **opts)
    go(loss).backward()
    assert len(seen) == 1
    assert seen[0].untyped_storage().data_ptr() == s.untyped_storage().data_ptr(), \
        "the gradient does not live in the student logits' storage"
    torch.testing.assert_close(loss.detach(), ref_loss)
    torch.testing.assert_close(leaf.grad, ref_grad)
    assert_matches_oracle(loss, leaf.grad, s0, a, t, labels, reduction=reduction,
                          grad_output=w if reduction == "none" else 2.5, hard_weight=0.4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_output_scaling(backend):
    N, V = 9, 120
    s, a, t = _inputs(N, V, seed=62)
    labels = _labels(N, V, seed=62)
    _check(backend, s, a, t, labels, grad_output=3.7, hard_weight=0.3)
    _check(backend, s, a, t, labels, grad_output=-0.25, divergence="reverse_kl", reduction="sum")
    w = torch.randn(N, generator=torch.Generator().manual_seed(2))
    _check(backend, s, a, t, labels, grad_output=w, reduction="none", divergence="jsd")


@pytest.mark.parametrize("nib", [5, torch.tensor(5), torch.tensor(11.0)], ids=["int", "tensor", "ftensor"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_num_items_in_batch(backend, nib):
    """Σ ℓ / num_items_in_batch, replacing the number of valid rows."""
    N, V = 9, 64
    s, a, t = _inputs(N, V, seed=63)
    labels = _labels(N, V, seed=63)
    loss, _ = _check(backend, s, a, t, labels, num_items_in_batch=nib)
    rows, _, _ = oracle(s, a, t, labels, reduction="none")
    assert_loss_close(loss, rows.sum() / float(nib), s)


# ----------------------------------------------------------------------------- teacher inputs


@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha_zero_without_text(backend):
    N, V = 7, 80
    s, a, _ = _inputs(N, V, seed=70)
    loss, grad = _check(backend, s, a, None, alpha=0.0)
    loss_t, grad_t = run_loss(contrastive_kd_loss, s, a, _randn(N, V, seed=99), None, alpha=0.0,
                              backend=backend)
    assert torch.equal(loss, loss_t) and torch.equal(grad, grad_t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_vocab_larger_sliced(backend):
    """teacher_vocab_slice=True keeps the teachers' first V_student columns."""
    N, V, extra = 7, 100, 28
    s, _, _ = _inputs(N, V, seed=71)
    _, a, t = _inputs(N, V + extra, seed=71)
    a[:, V:] = 50.0  # would dominate if not dropped
    labels = _labels(N, V, seed=71)
    loss, grad = run_loss(contrastive_kd_loss, s, a, t, labels, backend=backend, teacher_vocab_slice=True,
                          hard_weight=0.2)
    assert_matches_oracle(loss, grad, s, a[:, :V], t[:, :V], labels, hard_weight=0.2)
    assert grad.shape == s.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_vocab_larger_refused(backend):
    """Without teacher_vocab_slice a larger teacher vocabulary is refused, saying how to slice."""
    N, V = 4, 100
    s, _, _ = _inputs(N, V, seed=72)
    _, a, t = _inputs(N, V + 28, seed=72)
    with pytest.raises(ValueError, match=r"(?i)slice|\[\s*\.\.\.\s*,\s*:\s*100\s*\]"):
        contrastive_kd_loss(s, a, t, backend=backend)
    with pytest.raises(ValueError, match=r"(?i)slice|\[\s*\.\.\.\s*,\s*:\s*100\s*\]"):
        contrastive_kd_loss(s, a, None, alpha=0.0, backend=backend)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_kl_does_not_depend_on_entry_order(backend, divergence):
    """SPEC §3: a token with p > 0 where s = −inf gives +inf (reverse KL: q > 0 where z = −inf), also when
    that token comes early in the row and a much larger logit later makes its weight underflow in fp32
    (a running sum holding −inf would turn into 0·(−inf) = NaN)."""
    V = 3000  # several vocabulary blocks on every backend
    s = torch.zeros(2, V)
    a = torch.zeros(2, V)
    if divergence == "forward_kl":
        s[:, 3] = -INF      # p_3 > 0, q_3 = 0
        a[:, V - 5] = 200.0  # later: the teacher max jumps by 200 (exp(-200) underflows in fp32)
    else:
        a[:, 3] = -INF
        s[:, V - 5] = 200.0
    for row in range(2):
        if row == 1:  # same row reversed: the impossible token comes last
            s, a = s.flip(-1), a.flip(-1)
        rows = contrastive_kd_loss(s, a, None, alpha=0.0, divergence=divergence, backend=backend, reduction="none")
        assert torch.isinf(rows).all() and (rows > 0).all(), rows


BOUND_OPTS = {
    "tau_min": dict(temperature=1e-4),
    "tau_max": dict(temperature=1e4),
    "alpha_max": dict(alpha=1e4),
    "alpha_max_tau_min_jsd": dict(alpha=1e4, temperature=1e-4, divergence="jsd"),
    "tau_max_reverse": dict(temperature=1e4, divergence="reverse_kl"),
}


@pytest.mark.parametrize("opts", list(BOUND_OPTS), ids=list(BOUND_OPTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_options_at_the_accepted_bounds(backend, opts):
    """The edges of KDOptions' ranges compute the float64 answer (no NaN, no negative divergence)."""
    s, a, t = _inputs(6, 45, seed=51)
    _check(backend, s, a, t, **BOUND_OPTS[opts])
    rows = contrastive_kd_loss(s, a, t, backend=backend, reduction="none", **BOUND_OPTS[opts])
    assert (rows >= 0).all(), rows


@pytest.mark.parametrize("bad", [dict(temperature=1e-38), dict(temperature=1e300), dict(temperature=1e30),
                                 dict(alpha=1e300), dict(alpha=1.5e4), dict(soft_weight=1e300),
                                 dict(hard_weight=1e39)],
                         ids=["tau1e-38", "tau1e300", "tau1e30", "alpha1e300", "alpha1.5e4", "w_soft", "w_hard"])
def test_options_beyond_the_fp32_range_are_refused(bad):
    """Finite but extreme options gave NaN (or a negative KL at τ = 1e30) where float64 is finite: refused,
    with the accepted range in the message."""
    (name, value), = bad.items()
    s, a, t = _inputs(2, 9, seed=52)
    with pytest.raises(ValueError, match=rf"{name} must be .*in \[") as info:
        contrastive_kd_loss(s, a, t, **bad)
    assert repr(value) in str(info.value), info.value


@pytest.mark.parametrize("scale", [1e3, 1e4], ids=["1e3", "1e4"])
@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_saturated_student_gradient_has_no_cancellation(backend, divergence, scale):
    """q·(r − D) at a saturated student's argmax is a difference of two numbers ~|x|: it was 5e-4 off at
    |x| = 1e3 (true gradients ~3e-4) and 2^-8 at 1e4, on every backend, and the row gradient no longer
    summed to 0. Within SPEC §4 (rtol 1e-5, atol 1e-6) of float64 at reduction="sum" (not divided by N),
    and each row's gradient sums to 0."""
    N, V = 8, 203
    s, a, t = _inputs(N, V, seed=61, scale=scale)  # a teacher at the same scale: r ≈ D ≈ |x|
    # A runner-up (s/τ) 2..30 below each row's max: q ≈ 1 at the argmax, yet its true gradient is far
    # from 0 (q_2·(r_1 − r_2) ~ 1e-10..1e-1); random rows at this scale would all be exactly one-hot.
    top = s.argmax(-1)
    runner_up = (top + 1 + torch.arange(N)) % V
    s[torch.arange(N), runner_up] = s[torch.arange(N), top] - torch.linspace(2.0, 30.0, N)
    loss, grad = run_loss(contrastive_kd_loss, s, a, t, None, backend=backend, divergence=divergence,
                          reduction="sum")
    _, _, truth = oracle(s, a, t, divergence=divergence, reduction="sum")
    torch.testing.assert_close(grad.double(), truth, rtol=1e-5, atol=1e-6)
    assert float(grad.double().sum(-1).abs().max()) <= 1e-6, grad.double().sum(-1)


@pytest.mark.parametrize("scale", [4.0, 30.0], ids=["scale4", "scale30"])
@pytest.mark.parametrize("divergence", ["jsd", "forward_kl"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_gradient_within_spec_at_reduction_sum(backend, divergence, scale):
    """SPEC §4's fp32 tolerance (rtol 1e-5, atol 1e-6 of float64) where the gradient is not divided by N:
    reduction="sum", jsd β=0.5, τ=1, −100 labels (the case where one element in 52,581 of the torch
    backend's gradient was 1.5e-6 off: the argmax cancellation of q·(r − D), now compensated).
    Not yet reverse_kl at scale 30: a runner-up entry with q ~ 0.4 and |r| ~ 1e2 still cancels in
    q·(r − D) (2.8e-6 on torch and cpu) — only the argmax entry is compensated so far."""
    N, V = 16, 211
    s, a, t = _inputs(N, V, seed=71, scale=scale)
    labels = _labels(N, V, seed=71)
    kw = dict(divergence=divergence, jsd_beta=0.5, temperature=1.0, reduction="sum")
    loss, grad = run_loss(contrastive_kd_loss, s, a, t, labels, backend=backend, **kw)
    _, truth_loss, truth = oracle(s, a, t, labels, **kw)
    torch.testing.assert_close(loss.double(), truth_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), truth, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_logits_reverse_kl_gradient_is_right_or_non_finite(backend):
    """|logits| ≈ 1e30 in fp32 at τ = 0.1 (outside SPEC's 1e4 guarantee): the cpu backend's reverse-KL
    gradient was off by 1e24 (an ulp of 1e31 surviving r − D); it must be NaN/inf or right, never a huge
    finite wrong number. The student is one-hot at this scale: the true gradient is 0."""
    s, a, t = _inputs(4, 57, seed=81, scale=1e30)
    _, grad = run_loss(contrastive_kd_loss, s, a, t, None, backend=backend, divergence="reverse_kl",
                       temperature=0.1, reduction="sum")
    _, _, truth = oracle(s, a, t, divergence="reverse_kl", temperature=0.1, reduction="sum")
    finite = torch.isfinite(grad)
    assert torch.allclose(grad.double()[finite], truth[finite], rtol=1e-5, atol=1e-6), (grad - truth).abs().max()
