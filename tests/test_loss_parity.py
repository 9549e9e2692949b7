"""Parity of every option (SPEC §2, §7) with the independent float64 oracle, on every backend."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from spec_oracle import (  # noqa: E402
    PARITY_CASES,
    assert_matches_oracle,
    make_case,
    run_loss,
)

from caad_kernels import ContrastiveKDLoss, available_backends, contrastive_kd_loss  # noqa: E402

BACKENDS = available_backends("cpu")
N, V = 13, 257  # odd N, V not a power of two
LOW_CASES = ["default", "plaus0.1", "reverse_kl", "jsd0.5", "hard_mix", "ignored_rows_none"]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _grad_output(opts, n, seed):
    """A random weight vector for reduction="none", a non-trivial scalar otherwise."""
    if opts.get("reduction") == "none":
        return torch.rand(n, generator=_gen(seed)) * 2 - 0.5
    return 1.3


def _check_case(backend, name, dtype, seed=0):
    s, a, t, labels, opts = make_case(PARITY_CASES[name], N, V, generator=_gen(seed), dtype=dtype)
    go = _grad_output(opts, N, seed + 1)
    loss, grad = run_loss(contrastive_kd_loss, s, a, t, labels, grad_output=go, backend=backend, **opts)
    assert loss.dtype == torch.float32
    assert grad.dtype == s.dtype
    if opts.get("reduction") == "none":
        assert loss.shape == (N,)
    else:
        assert loss.shape == ()
    assert torch.isfinite(loss).all()
    assert_matches_oracle(loss, grad, s, a, t, labels, grad_output=go, **opts)


@pytest.mark.parametrize("name", list(PARITY_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_fp32(backend, name):
    _check_case(backend, name, torch.float32)


@pytest.mark.parametrize("name", LOW_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_low_precision(backend, dtype, name):
    _check_case(backend, name, dtype, seed=5)


@pytest.mark.parametrize("name", ["default", "jsd0.3", "hard_mix"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_row_losses(backend, name):
    """reduction="none" gives each row's ℓ (0 on ignored rows), whatever the case's reduction."""
    s, a, t, labels, opts = make_case(PARITY_CASES[name], N, V, generator=_gen(3))
    opts.pop("num_items_in_batch", None)
    opts["reduction"] = "none"
    rows = contrastive_kd_loss(s, a, t, labels, backend=backend, **opts)
    assert rows.shape == (N,) and rows.dtype == torch.float32
    assert_matches_oracle(rows, None, s, a, t, labels, **opts)
    if labels is not None:
        ignored = labels == opts.get("ignore_index", -100)
        assert ignored.any()
        assert torch.equal(rows[ignored], torch.zeros(int(ignored.sum())))


@pytest.mark.parametrize("name", ["default", "everything", "alpha0_no_text", "num_items_tensor"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_oracle(backend, name):
    """ContrastiveKDLoss(**options)(s, a, t, labels, num_items_in_batch) is the same loss."""
    s, a, t, labels, opts = make_case(PARITY_CASES[name], N, V, generator=_gen(4))
    nib = opts.pop("num_items_in_batch", None)
    module = ContrastiveKDLoss(backend=backend, **opts)
    assert isinstance(module, torch.nn.Module)

    def fn(s_, a_, t_, y_):
        return module(s_, a_, t_, y_, num_items_in_batch=nib)

    loss, grad = run_loss(fn, s, a, t, labels)
    assert_matches_oracle(loss, grad, s, a, t, labels, num_items_in_batch=nib, **opts)


@pytest.mark.parametrize("name", ["default", "jsd0.5", "hard_mix"])
def test_auto_backend(name):
    s, a, t, labels, opts = make_case(PARITY_CASES[name], N, V, generator=_gen(6))
    loss, grad = run_loss(contrastive_kd_loss, s, a, t, labels, backend="auto", **opts)
    assert_matches_oracle(loss, grad, s, a, t, labels, **opts)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("name", ["default", "jsd0.3", "reverse_kl", "everything"])
def test_float64_inputs(backend, name):
    """float64 inputs (torch backend; auto picks it) give a float64 loss, exact to ~1e-10."""
    s, a, t, labels, opts = make_case(PARITY_CASES[name], N, V, generator=_gen(7), dtype=torch.float64)
    loss, grad = run_loss(contrastive_kd_loss, s, a, t, labels, backend=backend, **opts)
    assert loss.dtype == torch.float64 and grad.dtype == torch.float64
    assert_matches_oracle(loss, grad, s, a, t, labels, **opts)


def test_backends_listed():
    """The reference backend is always there; names are the ones of SPEC §6."""
    assert "torch" in BACKENDS
    assert set(BACKENDS) <= {"torch", "triton", "cpu", "cuda"}
