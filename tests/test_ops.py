"""The registered ops (caad_kernels/ops.py), the dispatcher and torch.compile."""

import importlib.util
import logging

import pytest
import torch

import caad_kernels
from caad_kernels import ContrastiveKDLoss, available_backends, contrastive_kd_loss, dispatch

BACKENDS = available_backends("cpu")
SCALARS = dict(alpha=1.0, plausibility_beta=0.0, temperature=1.0, divergence="forward_kl", jsd_beta=0.5,
               soft_weight=1.0, hard_weight=0.0, ignore_index=-100)
OPTION_SETS = [
    {},
    dict(plausibility_beta=0.1, temperature=2.0, hard_weight=0.5),
    dict(divergence="reverse_kl", alpha=0.0),
    dict(divergence="jsd", jsd_beta=0.4, alpha=0.5),
]


def _sample_inputs(shape=(2, 3), vocab=37, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(*shape, vocab, generator=g) * 2).to(dtype)
    a = (torch.randn(*shape, vocab, generator=g) * 2).to(dtype)
    t = (torch.randn(*shape, vocab, generator=g) * 2).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=g)
    labels.view(-1)[1] = -100
    return s, a, t, labels


def _scalar_args(backend, **overrides):
    kw = {**SCALARS, **overrides}
    return [kw[k] for k in SCALARS] + [backend]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", OPTION_SETS)
def test_opcheck_forward(backend, kw):
    s, a, t, labels = _sample_inputs()
    s.requires_grad_()
    t = t if kw.get("alpha", 1.0) != 0 else None
    args = (s, a, t, labels, *_scalar_args(backend, **kw), False)
    torch.library.opcheck(torch.ops.caad.contrastive_kd_fwd.default, args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", OPTION_SETS)
def test_opcheck_backward_ops(backend, kw):
    s, a, t, labels = _sample_inputs(seed=1)
    t = t if kw.get("alpha", 1.0) != 0 else None
    rows, stats = torch.ops.caad.contrastive_kd_fwd(s, a, t, labels, *_scalar_args(backend, **kw), False)
    grad_rows = torch.rand_like(rows)
    tail = _scalar_args(backend, **kw)
    torch.library.opcheck(torch.ops.caad.contrastive_kd_bwd.default, (grad_rows, s, a, t, labels, stats, *tail))
    torch.library.opcheck(torch.ops.caad.contrastive_kd_bwd_.default,
                          (grad_rows, s.clone(), a, t, labels, stats, *tail))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", OPTION_SETS)
def test_opcheck_fwd_grad(backend, kw):
    """grad_in_forward's op: schema, fake kernel and autograd registration.

    Left out: opcheck's generic AOT forward+backward check, which returns every op output to the
    caller — this op's backward rescales its second output (the stored gradient) in place by design,
    and the public API never exposes that output. torch.compile of the public API is tested below.
    """
    s, a, t, labels = _sample_inputs(seed=3)
    s.requires_grad_()
    t = t if kw.get("alpha", 1.0) != 0 else None
    divisor = torch.tensor(5.0)
    torch.library.opcheck(torch.ops.caad.contrastive_kd_fwd_grad.default,
                          (s, a, t, labels, divisor, *_scalar_args(backend, **kw)),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_compile_grad_in_forward(backend, compile_backend):
    s, a, t, labels = _sample_inputs(seed=4)

    def f(s, a, t, labels):
        return contrastive_kd_loss(s, a, t, labels, backend=backend, grad_in_forward=True, hard_weight=0.2)

    s1 = s.clone().requires_grad_()
    want = f(s1, a, t, labels)
    (want * 0.5).backward()
    torch._dynamo.reset()
    s2 = s.clone().requires_grad_()
    got = torch.compile(f, fullgraph=True, backend=compile_backend)(s2, a, t, labels)
    (got * 0.5).backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(s2.grad, s1.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_scale_grad_skips_exactly_one(dtype):
    x = torch.randn(3, 50).to(dtype)
    before = x.clone()
    torch.ops.caad.scale_grad_(x, torch.tensor(1.0, dtype=torch.float64 if dtype == torch.float64 else torch.float32))
    assert torch.equal(x, before)
    torch.ops.caad.scale_grad_(x, torch.tensor(-0.75))
    assert torch.equal(x, (before.double() * -0.75).to(dtype))
    torch.library.opcheck(torch.ops.caad.scale_grad_.default, (x, torch.tensor(2.5)))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_scale_unless_one(dtype):
    """The device-side skip of scale_grad_ on CUDA (run here by the interpreter): untouched at 1,
    scaled otherwise, across several grid-stride iterations and a ragged tail."""
    from caad_kernels.triton_kernels.scale import scale_unless_one

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: conftest set TRITON_INTERPRET=1
    x = torch.randn(5, 7001, device=dev).to(dtype)
    before = x.clone()
    scale_unless_one(x, torch.tensor(1.0, device=dev))
    assert torch.equal(x, before)
    scale_unless_one(x, torch.tensor(0.37, device=dev))
    assert torch.equal(x, (before.float() * 0.37).to(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_saves_only_inputs_and_row_statistics(backend):
    """SPEC §5: what the forward keeps for backward is the inputs themselves plus O(N) fp32."""
    s, a, t, labels = _sample_inputs(shape=(4, 5), vocab=64)
    s.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        loss = contrastive_kd_loss(s, a, t, labels, backend=backend, plausibility_beta=0.05)
    input_ptrs = {x.data_ptr() for x in (s, a, t, labels)}
    n = 20
    for x in saved:
        assert x.data_ptr() in input_ptrs or x.numel() <= 8 * n, (tuple(x.shape), x.dtype)
    loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_writes_into_student_storage(backend):
    s, a, t, labels = _sample_inputs(seed=2)
    ref_s = s.clone().requires_grad_()
    contrastive_kd_loss(ref_s, a, t, labels, backend=backend, hard_weight=0.3).backward()

    leaf = s.clone().requires_grad_()
    logits = leaf * 1.0  # a non-leaf, like an lm_head output
    ptr = logits.data_ptr()
    captured = {}
    logits.register_hook(lambda g: captured.setdefault("grad", g))
    contrastive_kd_loss(logits, a, t, labels, backend=backend, hard_weight=0.3, inplace_backward=True).backward()
    assert captured["grad"].data_ptr() == ptr
    torch.testing.assert_close(leaf.grad, ref_s.grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_function(backend):
    s, a, t, labels = _sample_inputs(seed=3)
    fn = ContrastiveKDLoss(alpha=0.5, temperature=2.0, divergence="jsd", jsd_beta=0.25, backend=backend)
    got = fn(s, a, t, labels, num_items_in_batch=7)
    want = contrastive_kd_loss(s, a, t, labels, alpha=0.5, temperature=2.0, divergence="jsd", jsd_beta=0.25,
                               backend=backend, num_items_in_batch=7)
    assert torch.equal(got, want)
    assert "alpha=0.5" in repr(fn)


class _Distiller(torch.nn.Module):
    def __init__(self, hidden=16, vocab=53, **loss_kw):
        super().__init__()
        self.head = torch.nn.Linear(hidden, vocab)
        self.loss = ContrastiveKDLoss(**loss_kw)

    def forward(self, h, a, t, labels):
        return self.loss(self.head(h), a, t, labels)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_of_a_model_calling_the_loss(backend, compiler):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Distiller(backend=backend, plausibility_beta=0.05, hard_weight=0.2)
    h = torch.randn(2, 6, 16)
    a, t = torch.randn(2, 6, 53) * 2, torch.randn(2, 6, 53) * 2
    labels = torch.randint(0, 53, (2, 6))
    labels[0, :2] = -100

    eager = model(h, a, t, labels)
    eager.backward()
    want = model.head.weight.grad.clone()
    model.zero_grad()

    compiled = torch.compile(model, backend=compiler, fullgraph=True)
    # No on-disk compile caches: a graph cached by another version of this package would be reused.
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        got = compiled(h, a, t, labels)
        got.backward()
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.head.weight.grad, want, rtol=1e-5, atol=1e-6)


def test_available_backends_on_cpu():
    backends = available_backends("cpu")
    assert backends[0] == "torch"
    assert "triton" in backends  # conftest sets TRITON_INTERPRET=1 on machines without CUDA
    assert "cpu" in backends  # the C++ kernels build on every machine the tests run on
    assert "cuda" not in backends


def test_auto_prefers_the_cpu_kernels_on_cpu(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.resolve_backend("auto", torch.device("cpu")) == "cpu"
    assert dispatch.resolve_backend("auto", torch.device("cpu"), float64=True) == "cpu"


def test_auto_falls_back_to_torch_with_one_logged_warning(caplog, monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.setattr(dispatch, "_native_kinds", lambda: "")  # as if the C++ build had failed
    with caplog.at_level(logging.WARNING, logger="caad_kernels"):
        assert dispatch.resolve_backend("auto", torch.device("cpu")) == "torch"
        assert dispatch.resolve_backend("auto", torch.device("cpu")) == "torch"
    warnings = [r for r in caplog.records if "torch reference" in r.getMessage()]
    assert len(warnings) == 1
    s, a, t, labels = _sample_inputs()
    with pytest.raises(ValueError, match="backend='cpu' is unavailable"):
        contrastive_kd_loss(s, a, t, labels, backend="cpu")


def test_env_var_overrides_auto_only(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    assert dispatch.resolve_backend("auto", torch.device("cpu")) == "triton"
    assert dispatch.resolve_backend("torch", torch.device("cpu")) == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "tpu")
    with pytest.raises(ValueError, match="CAAD_BACKEND"):
        dispatch.resolve_backend("auto", torch.device("cpu"))


def test_env_var_backend_is_the_one_that_runs(monkeypatch):
    calls = []
    real = dispatch.backend_module

    def spy(name):
        calls.append(name)
        return real(name)

    monkeypatch.setattr(caad_kernels.ops, "backend_module", spy)
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    s, a, t, labels = _sample_inputs()
    contrastive_kd_loss(s, a, t, labels)
    assert calls == ["triton"]


def test_float64_goes_to_a_float64_backend_and_is_refused_by_triton():
    s, a, t, labels = _sample_inputs(dtype=torch.float64)
    assert contrastive_kd_loss(s, a, t, labels).dtype == torch.float64
    assert contrastive_kd_loss(s, a, t, labels, backend="torch").dtype == torch.float64
    with pytest.raises(TypeError, match="float64"):
        contrastive_kd_loss(s, a, t, labels, backend="triton")


def test_cuda_backend_refuses_cpu_tensors():
    s, a, t, labels = _sample_inputs()
    with pytest.raises(ValueError, match="backend='cuda' is unavailable"):
        contrastive_kd_loss(s, a, t, labels, backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("reduction,num_items", [("mean", "tensor"), ("mean", "int"), ("mean", None), ("sum", None),
                                                  ("none", None)])
def test_gpu_forward_backward_make_no_host_sync(reduction, num_items):
    s, a, t, labels = (x.cuda() for x in _sample_inputs(shape=(4, 8), vocab=1000))
    s = s.to(torch.bfloat16).requires_grad_()
    contrastive_kd_loss(s, a, t, labels, backend="triton", reduction=reduction)  # compile outside the check
    items = {"tensor": torch.tensor(5, device="cuda"), "int": 5, None: None}[num_items]  # an int: no H2D copy
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = contrastive_kd_loss(s, a, t, labels, backend="triton", reduction=reduction, num_items_in_batch=items)
        loss.backward(torch.ones_like(loss))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_grad_in_forward_backward_allocates_no_second_gradient():
    """The backward hands out the gradient stored by the forward: it must not allocate another N×V buffer (a
    zero-filled gradient for the op's non-differentiable second output once doubled peak memory)."""
    n, v = 64, 4096
    s = torch.randn(n, v, requires_grad=True)
    a, t = torch.randn(n, v), torch.randn(n, v)
    loss = contrastive_kd_loss(s, a, t, backend="cpu", grad_in_forward=True)
    with torch.profiler.profile(profile_memory=True) as prof:
        loss.backward()
    allocated = sum(max(e.self_cpu_memory_usage, 0) for e in prof.key_averages())
    assert allocated < n * v * 4 // 4, allocated
    expected = torch.autograd.grad(contrastive_kd_loss(s, a, t, backend="cpu"), s)[0]
    torch.testing.assert_close(s.grad, expected)
