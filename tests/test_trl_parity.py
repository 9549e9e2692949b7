"""With α = 0 and divergence="jsd", the loss is TRL's ``generalized_jsd_loss`` (SPEC §2.4):
TRL's ``beta`` is our ``jsd_beta``, TRL's ``batchmean`` with labels is our ``mean``."""
import os

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl")

from caad_kernels import available_backends, contrastive_kd_loss  # noqa: E402

BACKENDS = available_backends("cpu")
B, T, V = 2, 5, 64


def _trl_jsd():
    try:
        from trl import GKDTrainer
    except ImportError:
        from trl.experimental.gkd import GKDTrainer
    return GKDTrainer.generalized_jsd_loss


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, T, V, generator=g) * 3
    a = torch.randn(B, T, V, generator=g) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 1] = labels[1, 3] = labels[1, 4] = -100
    return s, a, labels


def _trl(s, a, labels, **kwargs):
    """TRL's loss and gradient, computed in float64 (the truth for the fp32 comparison)."""
    s = s.detach().double().requires_grad_(True)
    loss = _trl_jsd()(s, a.double(), labels=labels, **kwargs)
    loss.backward()
    return loss.detach(), s.grad


def _ours(s, a, labels, backend, **kwargs):
    s = s.detach().clone().requires_grad_(True)
    loss = contrastive_kd_loss(s, a, None, labels, alpha=0.0, divergence="jsd", backend=backend, **kwargs)
    loss.backward()
    return loss.detach(), s.grad


def _close(actual, expected, f64=False):
    rtol, atol = (1e-10, 1e-12) if f64 else (1e-5, 1e-6)  # SPEC §4
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_trl_batchmean(backend, beta, tau):
    s, a, labels = _inputs(seed=int(beta * 10 + tau))
    exp_loss, exp_grad = _trl(s, a, labels, beta=beta, temperature=tau)
    loss, grad = _ours(s, a, labels, backend, jsd_beta=beta, temperature=tau)
    assert loss.dtype == torch.float32 and grad.shape == (B, T, V)
    _close(loss, exp_loss)
    _close(grad, exp_grad)
    assert torch.equal(grad[labels == -100], torch.zeros(3, V))


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_trl_sum(backend, beta):
    s, a, labels = _inputs(seed=20)
    exp_loss, exp_grad = _trl(s, a, labels, beta=beta, temperature=1.5, reduction="sum")
    loss, grad = _ours(s, a, labels, backend, jsd_beta=beta, temperature=1.5, reduction="sum")
    _close(loss, exp_loss)
    _close(grad, exp_grad)


@pytest.mark.parametrize("nib", [4, torch.tensor(13)], ids=["int", "tensor"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_trl_num_items_in_batch(backend, nib):
    s, a, labels = _inputs(seed=21)
    exp_loss, exp_grad = _trl(s, a, labels, beta=0.5, num_items_in_batch=nib)
    loss, grad = _ours(s, a, labels, backend, jsd_beta=0.5, num_items_in_batch=nib)
    _close(loss, exp_loss)
    _close(grad, exp_grad)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_matches_trl_float64_torch_backend(beta):
    """The float64-capable reference backend agrees with TRL to float64 precision."""
    s, a, labels = _inputs(seed=22)
    s, a = s.double(), a.double()
    exp_loss, exp_grad = _trl(s, a, labels, beta=beta, temperature=2.0)
    loss, grad = _ours(s, a, labels, "torch", jsd_beta=beta, temperature=2.0)
    assert loss.dtype == torch.float64
    _close(loss, exp_loss, f64=True)
    _close(grad, exp_grad, f64=True)
