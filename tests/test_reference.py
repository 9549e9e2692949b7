"""The reference module (caad_kernels/reference.py): gradients in float64.

``gradcheck`` checks the autograd path of the readable formula and the analytic
gradients that the torch backend (and, by parity, every kernel) uses.
"""

import itertools

import pytest
import torch

from caad_kernels import KDOptions, contrastive_kd_loss, contrastive_kd_reference
from caad_kernels.reference import row_loss_grads, row_losses

OPTION_SETS = [
    dict(),
    dict(alpha=0.0),
    dict(alpha=0.5, temperature=2.0),
    dict(plausibility_beta=0.2),
    dict(divergence="reverse_kl", temperature=0.7),
    dict(divergence="jsd", jsd_beta=0.3),
    dict(divergence="jsd", jsd_beta=0.5, plausibility_beta=0.1, temperature=1.5),
    dict(divergence="jsd", jsd_beta=0.0),
    dict(divergence="jsd", jsd_beta=1.0),
    dict(hard_weight=0.7, temperature=2.0),
    dict(soft_weight=0.0, hard_weight=1.0),
]


def _ids(kw):
    return ",".join(f"{k}={v}" for k, v in kw.items()) or "default"


def _inputs(n=5, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    a = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, v, (n,), generator=g)
    labels[1] = -100
    return s, a, t, labels


@pytest.mark.parametrize("kw", OPTION_SETS, ids=_ids)
def test_gradcheck_reference_autograd(kw):
    s, a, t, labels = _inputs()
    s.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: contrastive_kd_reference(x, a, t, labels, **kw), (s,))


@pytest.mark.parametrize("kw", OPTION_SETS, ids=_ids)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_torch_backend_analytic(kw, reduction):
    """Through the registered op: the analytic backward against finite differences."""
    s, a, t, labels = _inputs(seed=1)
    s.requires_grad_()

    def f(x):
        return contrastive_kd_loss(x, a, t, labels, backend="torch", reduction=reduction, **kw)

    assert torch.autograd.gradcheck(f, (s,))


@pytest.mark.parametrize("kw", OPTION_SETS, ids=_ids)
def test_analytic_grads_equal_autograd(kw):
    s, a, t, labels = _inputs(n=7, v=23, seed=2)
    opts = KDOptions(**kw)
    x = s.clone().requires_grad_()
    rows = row_losses(x, a, t, labels, opts)
    weights = torch.rand(rows.shape, dtype=torch.float64)
    (auto,) = torch.autograd.grad((rows * weights).sum(), x)
    analytic = row_loss_grads(s, a, t, labels, opts) * weights.unsqueeze(1)
    torch.testing.assert_close(analytic, auto, rtol=1e-10, atol=1e-12)


def test_reference_is_independent_of_row_chunking(monkeypatch):
    """The torch backend evaluates in row chunks; chunk boundaries must not change a bit."""
    from caad_kernels.backends import torch_backend

    s, a, t, labels = _inputs(n=9, v=13, seed=3)
    s = s.float().reshape(3, 3, 13)
    a, t, labels = a.float().reshape(3, 3, 13), t.float().reshape(3, 3, 13), labels.reshape(3, 3)
    results = []
    for chunk in (13, 26, 1 << 22):
        monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", chunk)
        x = s.clone().requires_grad_()
        loss = contrastive_kd_loss(x, a, t, labels, backend="torch", reduction="none", hard_weight=0.3)
        loss.sum().backward()
        results.append((loss.detach(), x.grad))
    for other in results[1:]:
        assert torch.equal(results[0][0], other[0]) and torch.equal(results[0][1], other[1])


def test_torch_backend_never_allocates_full_fp32_rows(monkeypatch):
    """SPEC §5: the reference math only ever sees chunks of at most CHUNK_ELEMENTS entries."""
    from caad_kernels.backends import torch_backend

    seen = []
    real_losses, real_grads = torch_backend.row_losses, torch_backend.row_loss_grads

    def spy(fn):
        def wrapped(s, *args):
            seen.append(s.numel())
            return fn(s, *args)
        return wrapped

    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(torch_backend, "row_losses", spy(real_losses))
    monkeypatch.setattr(torch_backend, "row_loss_grads", spy(real_grads))
    s, a, t, labels = _inputs(n=40, v=16, seed=4)
    x = s.float().requires_grad_()
    contrastive_kd_loss(x, a.float(), t.float(), labels, backend="torch").backward()
    assert seen and max(seen) <= 64 and sum(seen) == 2 * 40 * 16


@pytest.mark.parametrize("tau,alpha", list(itertools.product([1.0, 3.0], [0.0, 1.0])))
def test_forward_kl_gradient_formula_of_spec(tau, alpha):
    """SPEC §2 states ∂ℓ/∂s = w_soft (q − p)/τ + w_hard (softmax(s) − onehot(y)) for forward KL."""
    s, a, t, labels = _inputs(n=4, v=9, seed=5)
    labels[1] = 3
    z = (1 + alpha) * a - alpha * t
    p, q = torch.softmax(z / tau, -1), torch.softmax(s / tau, -1)
    expected = 0.6 * (q - p) / tau + 0.4 * (torch.softmax(s, -1) - torch.nn.functional.one_hot(labels, 9))
    opts = KDOptions(alpha=alpha, temperature=tau, soft_weight=0.6, hard_weight=0.4)
    torch.testing.assert_close(row_loss_grads(s, a, t, labels, opts), expected, rtol=1e-12, atol=1e-14)
