"""The ``cpu`` backend's one-pass forward + backward (``grad_in_forward=True``, op ``native_kd_forward_backward``).

Each row's gradient comes from the exponentials its forward kept (one multiply per entry, no second read of
s, a, t) where the gradient is q and p alone — forward KL, the hard term at τ = 1 — and the loss is finite;
everything else takes the two-pass row kernel. Checked against the float64 oracle of SPEC §2 on several
vocabulary blocks (V > 2048, the kernel's block), rows whose running maximum starts at −inf, |x| ~ 1e4, and against
``grad_in_forward=False`` bit for bit on the rows SPEC §3 makes non-finite.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from spec_oracle import assert_matches_oracle  # noqa: E402

from caad_kernels import available_backends, contrastive_kd_loss  # noqa: E402

pytestmark = pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="the C++ kernels did not build")

INF = float("inf")
OPTS = {
    "forward_kl": dict(),
    "hard_tau1": dict(soft_weight=0.6, hard_weight=0.4),  # from the kept exps: softmax(s) = q at τ = 1
    "hard_tau2": dict(soft_weight=0.6, hard_weight=0.4, temperature=2.0),  # two-pass rows
    "hard_only": dict(soft_weight=0.0, hard_weight=1.0),
    "alpha0_no_text": dict(alpha=0.0),
    "plausibility": dict(alpha=0.5, plausibility_beta=0.1),
    "tau0.5": dict(temperature=0.5),
    "reverse_kl": dict(divergence="reverse_kl"),  # two-pass rows
    "jsd": dict(divergence="jsd", jsd_beta=0.3),  # two-pass rows
}


def _rows(N, V, seed, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s, a, t = (torch.randn(N, V, generator=g, dtype=torch.float64) * scale for _ in range(3))
    labels = torch.randint(0, V, (N,), generator=g)
    labels[1::4] = -100
    return s.to(dtype), a.to(dtype), t.to(dtype), labels


def _run(s, a, t, labels, gif, **opts):
    leaf = s.detach().clone().requires_grad_(True)
    loss = contrastive_kd_loss(leaf, a, t, labels, backend="cpu", grad_in_forward=gif, **opts)
    loss.backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("V", [1, 7, 2049, 5000])
@pytest.mark.parametrize("name", list(OPTS))
def test_matches_oracle(name, V, dtype):
    opts = dict(OPTS[name])
    s, a, t, labels = _rows(6, V, seed=V, dtype=dtype)
    text = None if opts.get("alpha", 1.0) == 0 else t
    loss, grad = _run(s, a, text, labels, True, **opts)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert (grad[1::4] == 0).all()  # ignored rows: exactly 0
    assert_matches_oracle(loss, grad, s, a, text, labels, **opts)


def _hard_rows(V=6000):
    """Rows that stress the kept exponentials: a leading run of −inf longer than a block (the running
    maximum is −inf there, then jumps to ~−1e4), |x| ~ 1e4, a maximum in the last block."""
    g = torch.Generator().manual_seed(7)
    s, a, t = (torch.randn(4, V, generator=g, dtype=torch.float64) * 3 for _ in range(3))
    for x in (s, a, t):
        x[0, :2300] = -INF  # longer than the kernel's 2048-entry block
        x[0, 2300:] -= 1e4
        x[1] *= 3000.0
        x[2, -5:] += 40.0
    a[3, :2100] = -INF  # masked teacher tokens only: p = 0 there, q > 0
    t[0, :2300] = 0.0  # −inf in a masks the token whatever t is
    return s.float(), a.float(), t.float()


@pytest.mark.parametrize("name", ["forward_kl", "hard_tau1", "plausibility"])
def test_stress_rows_match_oracle(name):
    s, a, t = _hard_rows()
    labels = torch.tensor([2800, 3, 5999, 10])
    loss, grad = _run(s, a, t, labels, True, **OPTS[name])
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert_matches_oracle(loss, grad, s, a, t, labels, **OPTS[name])
    loss_two_pass, grad_two_pass = _run(s, a, t, labels, False, **OPTS[name])
    torch.testing.assert_close(grad, grad_two_pass, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_non_finite_rows_take_the_two_pass_kernel(dtype):
    """NaN, +inf and no-distribution rows (SPEC §3): the same loss and gradient as grad_in_forward=False, with
    bf16 rows read in place and fp16 ones converted."""
    V = 4500
    s, a, t, _ = _rows(6, V, seed=3)
    s[0, 4100] = float("nan")
    a[1, 5] = INF
    t[2, 2600] = -INF  # −inf in t where a is finite: NaN
    s[3, 3000] = -INF  # where p > 0: +inf
    s[4] = -INF  # no student distribution
    # row 5: finite, from the kept exponentials
    s, a, t = s.to(dtype), a.to(dtype), t.to(dtype)
    finite_rtol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps  # one rounding of the stored grad
    labels = torch.arange(6)
    for opts in (dict(reduction="sum"), dict(reduction="sum", soft_weight=0.5, hard_weight=0.5)):
        loss, grad = _run(s, a, t, labels, True, **opts)
        loss_ref, grad_ref = _run(s, a, t, labels, False, **opts)
        torch.testing.assert_close(loss, loss_ref, equal_nan=True, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad[:5], grad_ref[:5], equal_nan=True, rtol=0, atol=0)
        torch.testing.assert_close(grad[5], grad_ref[5], rtol=finite_rtol, atol=1e-7)  # the finite row: kept exps


def test_deterministic_across_thread_counts():
    """Rows are handed to threads dynamically: the result may not depend on which thread took which row."""
    s, a, t, labels = _rows(64, 700, seed=11)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(s, a, t, labels, True)
        torch.set_num_threads(max(2, before))
        two = _run(s, a, t, labels, True)
        again = _run(s, a, t, labels, True)
    finally:
        torch.set_num_threads(before)
    for x, y in ((one, two), (two, again)):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])


@pytest.mark.parametrize("name", ["forward_kl", "plausibility", "hard_tau2"])
@pytest.mark.parametrize("gif", [True, False], ids=["one_pass", "two_pass"])
@pytest.mark.parametrize("mix", ["bf16_all", "bf16_student", "bf16_teacher", "fp16_all"])
def test_mixed_and_fp16_rows_match_oracle(mix, gif, name):
    """bf16 rows are read in place only when s, a and t all are bf16; any other mix (and fp16) is converted
    block by block first. Both routes against the oracle, over several 2048-entry blocks."""
    s, a, t, labels = _rows(6, 4500, seed=21)
    if mix == "bf16_all":
        s, a, t = s.bfloat16(), a.bfloat16(), t.bfloat16()
    elif mix == "bf16_student":
        s = s.bfloat16()
    elif mix == "bf16_teacher":
        a, t = a.bfloat16(), t.bfloat16()
    else:
        s, a, t = s.half(), a.half(), t.half()
    loss, grad = _run(s, a, t, labels, gif, **OPTS[name])
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad.dtype == s.dtype
    assert_matches_oracle(loss, grad, s, a, t, labels, **OPTS[name])
