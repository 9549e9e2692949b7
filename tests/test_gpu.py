"""CUDA checks: parity on every CUDA backend, a realistic bf16 shape, and N·V > 2^31 (SPEC §4)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from spec_oracle import (  # noqa: E402
    PARITY_CASES,
    assert_grad_close,
    assert_loss_close,
    make_case,
    oracle,
    run_loss,
)

from caad_kernels import available_backends, contrastive_kd_loss  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CANDIDATES = ["torch", "triton", "cuda"]
FUSED = ["triton", "cuda"]
DEV = "cuda"


def _need(backend):
    if backend not in available_backends(DEV):
        pytest.skip(f"backend {backend!r} is not available on {DEV}")
    return backend


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_a_fused_backend_is_available():
    """SPEC §6: auto picks cuda or triton for CUDA tensors; at least one of them must be there."""
    backends = available_backends(DEV)
    assert "torch" in backends
    assert set(FUSED) & set(backends), backends


def _check_case(backend, name, dtype, N, V, seed):
    s, a, t, labels, opts = make_case(PARITY_CASES[name], N, V, generator=_gen(seed), device=DEV, dtype=dtype)
    go = torch.rand(N, generator=_gen(seed + 1)) + 0.5 if opts.get("reduction") == "none" else 1.3
    loss, grad = run_loss(contrastive_kd_loss, s, a, t, labels, grad_output=go, backend=backend, **opts)
    _, exp_loss, exp_grad = oracle(s, a, t, labels, grad_output=go, **opts)
    assert loss.device.type == DEV and grad.device.type == DEV
    assert loss.dtype == torch.float32 and grad.dtype == s.dtype
    assert torch.isfinite(loss).all()
    assert_loss_close(loss, exp_loss, s, a, t)
    assert_grad_close(grad, exp_grad, s, a, t)


@pytest.mark.parametrize("name", list(PARITY_CASES))
@pytest.mark.parametrize("backend", CANDIDATES)
def test_parity_cuda_fp32(backend, name):
    _check_case(_need(backend), name, torch.float32, N=37, V=4099, seed=0)


LOW_CASES = ["default", "plaus0.1", "reverse_kl", "jsd0.5", "hard_mix", "ignored_rows_none"]


@pytest.mark.parametrize("name", LOW_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", CANDIDATES)
def test_parity_cuda_low_precision(backend, dtype, name):
    _check_case(_need(backend), name, dtype, N=37, V=4099, seed=1)


@pytest.mark.parametrize("opts", [dict(), dict(divergence="jsd", jsd_beta=0.5, hard_weight=0.2)],
                         ids=["fkl", "jsd_hard"])
@pytest.mark.parametrize("backend", CANDIDATES)
def test_realistic_bf16(backend, opts):
    """A Qwen-sized vocabulary in bf16 (SPEC §4: rtol 2e-3 of the reference of the same inputs)."""
    _need(backend)
    N, V = 256, 151936
    g = torch.Generator(device=DEV).manual_seed(2)
    s, a, t = (torch.randn(N, V, generator=g, device=DEV).mul_(3).to(torch.bfloat16) for _ in range(3))
    labels = torch.randint(0, V, (N,), generator=g, device=DEV)
    labels[::5] = -100
    loss, grad = run_loss(contrastive_kd_loss, s, a, t, labels, backend=backend, **opts)
    _, exp_loss, exp_grad = oracle(s, a, t, labels, **opts)
    assert_loss_close(loss, exp_loss, s)
    assert_grad_close(grad, exp_grad, s)


@pytest.mark.parametrize("backend", CANDIDATES)
def test_nonfinite_rules_cuda(backend):
    """SPEC §3 on the device: NaN / +inf rows are NaN, −inf masks tokens, ignored rows are 0."""
    _need(backend)
    N, V = 8, 1000
    g = _gen(3)
    s, a, t = (torch.randn(N, V, generator=g) * 3 for _ in range(3))
    s[1, 5] = float("nan")
    t[2, 6] = float("inf")
    t[3, 7] = -float("inf")  # a finite there: undefined contrast
    a[4, :10] = -float("inf")  # padding in both paths
    t[4, :10] = -float("inf")
    a[5, 3] = t[5, 3] = float("nan")  # in an ignored row
    labels = torch.arange(N)
    labels[5] = -100
    s, a, t, labels = (x.to(DEV) for x in (s, a, t, labels))
    rows = contrastive_kd_loss(s, a, t, labels, backend=backend, reduction="none")
    exp, _, _ = oracle(s, a, t, labels, reduction="none")
    assert exp[1:4].isnan().all() and torch.isfinite(exp[[0, 4, 5, 6, 7]]).all()
    assert_loss_close(rows, exp, s)  # equal_nan: NaN exactly where the oracle has NaN
    assert float(rows[5]) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", CANDIDATES)
def test_deterministic_cuda(backend, dtype):
    _need(backend)
    N, V = 512, 32000
    g = torch.Generator(device=DEV).manual_seed(4)
    s, a, t = (torch.randn(N, V, generator=g, device=DEV).mul_(3).to(dtype) for _ in range(3))
    opts = dict(backend=backend, divergence="jsd", plausibility_beta=0.01)
    l1, g1 = run_loss(contrastive_kd_loss, s, a, t, **opts)
    l2, g2 = run_loss(contrastive_kd_loss, s, a, t, **opts)
    assert torch.equal(l1, l2) and torch.equal(g1, g2)


@pytest.mark.parametrize("backend", CANDIDATES)
def test_inplace_backward_cuda(backend):
    _need(backend)
    N, V = 64, 32000
    g = torch.Generator(device=DEV).manual_seed(5)
    s0, a, t = (torch.randn(N, V, generator=g, device=DEV).mul_(3).to(torch.bfloat16) for _ in range(3))
    ref_loss, ref_grad = run_loss(contrastive_kd_loss, s0, a, t, backend=backend)
    leaf = s0.clone().requires_grad_(True)
    s = leaf * 1
    seen = []
    s.register_hook(seen.append)
    loss = contrastive_kd_loss(s, a, t, backend=backend, inplace_backward=True)
    loss.backward()
    assert seen[0].untyped_storage().data_ptr() == s.untyped_storage().data_ptr()
    torch.testing.assert_close(loss.detach(), ref_loss)
    torch.testing.assert_close(leaf.grad, ref_grad)


@pytest.mark.parametrize("backend", FUSED)
def test_64bit_indexing(backend):
    """N·V = 14200 · 151936 ≈ 2.16e9 > 2^31 elements (4.3 GB per bf16 tensor): the loss is
    finite, and rows on both sides of element 2^31 match the oracle (row 14134 straddles it)."""
    _need(backend)
    N, V = 14200, 151936
    assert N * V > 2**31
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs ~25 GB of device memory")
    g = torch.Generator(device=DEV).manual_seed(6)
    s, a, t = (torch.randn(N, V, generator=g, device=DEV, dtype=torch.bfloat16).mul_(3) for _ in range(3))
    labels = torch.randint(0, V, (N,), generator=g, device=DEV)
    labels[14140] = -100
    sl = s.detach().requires_grad_(True)
    rows = contrastive_kd_loss(sl, a, t, labels, backend=backend, reduction="none", hard_weight=0.1)
    rows.sum().backward()  # grad of Σℓ: each row's own gradient, unscaled
    assert torch.isfinite(rows).all()
    mean = contrastive_kd_loss(s, a, t, labels, backend=backend, hard_weight=0.1)
    assert torch.isfinite(mean)
    torch.testing.assert_close(mean.double(), rows.double().sum() / int((labels != -100).sum()),
                               rtol=1e-5, atol=1e-6)
    pick = torch.tensor([0, 1, 7000, 14133, 14134, 14135, 14140, N - 1], device=DEV)
    exp_rows, _, exp_grad = oracle(s[pick], a[pick], t[pick], labels[pick], reduction="none", hard_weight=0.1)
    assert_loss_close(rows[pick], exp_rows, s)
    assert_grad_close(sl.grad[pick], exp_grad, s)
    assert float(rows[14140]) == 0.0 and not sl.grad[14140].any()


# --- grad_in_forward: on sm_90 the cuda backend runs one cluster kernel (row on chip) ---

SCALAR_CASES = [n for n, c in PARITY_CASES.items() if c.get("reduction") != "none"]


@pytest.mark.parametrize("name", SCALAR_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("backend", CANDIDATES)
def test_grad_in_forward_parity_cuda(backend, dtype, name, monkeypatch):
    """V = 4096 (a multiple of every chunk width: the cluster kernel's case) against the oracle."""
    _need(backend)
    if backend == "cuda" and torch.cuda.get_device_capability()[0] >= 9:
        monkeypatch.setenv("CAAD_CUDA_CLUSTER", "require")
    s, a, t, labels, opts = make_case(PARITY_CASES[name], 37, 4096, generator=_gen(11), device=DEV, dtype=dtype)
    loss, grad = run_loss(contrastive_kd_loss, s, a, t, labels, grad_output=1.3, backend=backend,
                          grad_in_forward=True, **opts)
    _, exp_loss, exp_grad = oracle(s, a, t, labels, grad_output=1.3, **opts)
    assert loss.dtype == torch.float32 and grad.dtype == s.dtype
    assert_loss_close(loss, exp_loss, s, a, t)
    assert_grad_close(grad, exp_grad, s, a, t)


@pytest.mark.parametrize("V", [8, 4104, 32008, 151936, 4099])
@pytest.mark.parametrize("backend", FUSED)
def test_grad_in_forward_shapes_cuda(backend, V, monkeypatch):
    """Cluster sizes 1..16 (V = 8 … 151,936; the last slice shorter than the others) and a V that is
    not a multiple of the chunk (4099: the two-kernel fallback); ignored rows and the hard term."""
    _need(backend)
    N = 24
    g = torch.Generator(device=DEV).manual_seed(12)
    s, a, t = (torch.randn(N, V, generator=g, device=DEV).mul_(3).to(torch.bfloat16) for _ in range(3))
    labels = torch.randint(0, V, (N,), generator=g, device=DEV)
    labels[3] = -100
    opts = dict(hard_weight=0.2, plausibility_beta=0.05)
    if backend == "cuda" and V % 8 == 0 and torch.cuda.get_device_capability()[0] >= 9:
        monkeypatch.setenv("CAAD_CUDA_CLUSTER", "require")
    loss, grad = run_loss(contrastive_kd_loss, s, a, t, labels, backend=backend, grad_in_forward=True, **opts)
    _, exp_loss, exp_grad = oracle(s, a, t, labels, **opts)
    assert_loss_close(loss, exp_loss, s, a, t)
    assert_grad_close(grad, exp_grad, s, a, t)
    assert not grad[3].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grad_in_forward_cluster_vs_two_kernels(dtype, monkeypatch):
    """The cluster kernel and the two-kernel path (CAAD_CUDA_CLUSTER=0) agree, and each is bitwise
    deterministic."""
    _need("cuda")
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the cluster kernel needs sm_90")
    N, V = 96, 151936
    g = torch.Generator(device=DEV).manual_seed(13)
    s, a, t = (torch.randn(N, V, generator=g, device=DEV).mul_(3).to(dtype) for _ in range(3))
    opts = dict(backend="cuda", grad_in_forward=True, divergence="jsd", jsd_beta=0.3, plausibility_beta=0.01)
    monkeypatch.setenv("CAAD_CUDA_CLUSTER", "require")  # an error, not a silent fallback, if it cannot run
    l1, g1 = run_loss(contrastive_kd_loss, s, a, t, **opts)
    l2, g2 = run_loss(contrastive_kd_loss, s, a, t, **opts)
    assert torch.equal(l1, l2) and torch.equal(g1, g2)
    monkeypatch.setenv("CAAD_CUDA_CLUSTER", "0")
    l3, g3 = run_loss(contrastive_kd_loss, s, a, t, **opts)
    torch.testing.assert_close(l1, l3, rtol=1e-5, atol=1e-6)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-6)
    torch.testing.assert_close(g1.float(), g3.float(), **tol)


@pytest.mark.parametrize("backend", FUSED)
def test_grad_in_forward_64bit_indexing(backend):
    """N·V > 2^31 through the grad_in_forward path (the cluster kernel on sm_90)."""
    _need(backend)
    N, V = 14200, 151936
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs ~30 GB of device memory")
    g = torch.Generator(device=DEV).manual_seed(14)
    s, a, t = (torch.randn(N, V, generator=g, device=DEV, dtype=torch.bfloat16).mul_(3) for _ in range(3))
    sl = s.detach().requires_grad_(True)
    loss = contrastive_kd_loss(sl, a, t, backend=backend, grad_in_forward=True, reduction="sum")
    loss.backward()
    assert torch.isfinite(loss)
    pick = torch.tensor([0, 14133, 14134, 14135, N - 1], device=DEV)
    _, _, exp_grad = oracle(s[pick], a[pick], t[pick], None, reduction="sum")
    assert_grad_close(sl.grad[pick], exp_grad, s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_scale_grad_on_device(dtype):
    """grad_in_forward's backward on CUDA: untouched at an upstream of exactly 1 (decided on the device),
    scaled otherwise, for a tensor larger than one grid-stride sweep."""
    x = torch.randn(3, 700_001, device=DEV).to(dtype)
    before = x.clone()
    torch.ops.caad.scale_grad_(x, torch.tensor(1.0, device=DEV))
    assert torch.equal(x, before)
    factor = torch.tensor(-0.3, device=DEV)  # the same fp32 factor on both sides: an exact comparison
    torch.ops.caad.scale_grad_(x, factor)
    torch.testing.assert_close(x, (before.float() * factor).to(dtype), rtol=0, atol=0)
    torch.library.opcheck(torch.ops.caad.scale_grad_.default, (x, torch.tensor(2.0, device=DEV)))
