"""``grad_in_forward=True``: the forward also computes d loss / d student_logits when autograd needs it, and the
backward only multiplies that gradient by the upstream scalar.

Every result is checked against the independent float64 oracle (tests/spec_oracle.py, SPEC §4 budgets) and
against ``grad_in_forward=False`` on every backend available on CPU (``triton`` runs in the interpreter, so
its shapes are tiny).
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from spec_oracle import LOW_PRECISION, assert_matches_oracle, oracle  # noqa: E402

from caad_kernels import ContrastiveKDLoss, available_backends, contrastive_kd_loss  # noqa: E402

BACKENDS = available_backends("cpu")
F64_BACKENDS = [b for b in BACKENDS if b in ("torch", "cpu")]
COMPILE_BACKENDS = [b for b in BACKENDS if b in ("torch", "cpu")]
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}

# Options of SPEC §2 / §7. Test-only keys: "text" (False: no text-only teacher), "labels" ("some": every third
# row ignored, None: no labels), "num_items_in_batch" = "tensor5" (a 0-dim tensor, made fresh per call).
CASES = {
    "forward_kl": dict(),
    "reverse_kl": dict(divergence="reverse_kl"),
    "jsd0.3": dict(divergence="jsd", jsd_beta=0.3),
    "alpha0_no_text": dict(alpha=0.0, text=False),
    "alpha1_plaus0.1": dict(alpha=1.0, plausibility_beta=0.1),
    "tau2": dict(temperature=2.0),
    "hard_weight": dict(soft_weight=0.7, hard_weight=0.5),
    "sum": dict(reduction="sum"),
    "nib_int": dict(num_items_in_batch=7),
    "nib_tensor": dict(num_items_in_batch="tensor5"),
    "no_labels": dict(labels=None),
    "everything": dict(alpha=0.5, plausibility_beta=0.1, temperature=2.0, divergence="jsd", jsd_beta=0.3,
                       soft_weight=0.9, hard_weight=0.4, ignore_index=-1, num_items_in_batch=11),
}
LOW_CASES = ["forward_kl", "reverse_kl", "jsd0.3", "alpha1_plaus0.1", "everything"]
F64_CASES = ["forward_kl", "jsd0.3", "everything"]


def _shape(backend):
    """(leading shape, V): tiny for the Triton interpreter, V odd and not a power of two everywhere."""
    return ((2, 3), 37) if backend == "triton" else ((3, 5), 67)


def _inputs(lead, V, *, seed=0, dtype=torch.float32, teacher_dtype=None, text=True, labels="some",
            ignore_index=-100, label_dtype=torch.int64, scale=3.0):
    g = torch.Generator().manual_seed(seed)

    def rnd():
        return torch.randn(*lead, V, generator=g, dtype=torch.float64) * scale

    s, a = rnd(), rnd()
    t = rnd() if text else None
    y = None
    if labels is not None:
        y = torch.randint(0, V, lead, generator=g)
        flat = y.view(-1)
        if labels == "some":
            flat[1::3] = ignore_index
        elif labels == "all":
            flat[:] = ignore_index
        else:
            assert labels == "valid", labels
        y = y.to(label_dtype)
    tdt = teacher_dtype or dtype
    return s.to(dtype), a.to(tdt), (None if t is None else t.to(tdt)), y


def _case(name, backend, dtype=torch.float32, *, seed=0, label_dtype=torch.int64, teacher_dtype=None):
    opts = dict(CASES[name])
    text = opts.pop("text", True)
    labels = opts.pop("labels", "some")
    if opts.get("num_items_in_batch") == "tensor5":
        opts["num_items_in_batch"] = torch.tensor(5)
    lead, V = _shape(backend)
    s, a, t, y = _inputs(lead, V, seed=seed, dtype=dtype, teacher_dtype=teacher_dtype, text=text, labels=labels,
                         ignore_index=opts.get("ignore_index", -100), label_dtype=label_dtype)
    return s, a, t, y, opts


def _run(s, a, t, y, *, backend, gif, upstream=None, **opts):
    """Loss and d(upstream·loss)/ds on a fresh leaf copy of s; upstream None: plain ``loss.backward()``."""
    leaf = s.detach().clone().requires_grad_(True)
    loss = contrastive_kd_loss(leaf, a, t, y, backend=backend, grad_in_forward=gif, **opts)
    assert loss.requires_grad and loss.grad_fn is not None
    (loss if upstream is None else loss * upstream).backward()
    return loss.detach(), leaf.grad


def _fp32_slack(s, a, t, y, **opts):
    """4x the error of the plain fp32 formula (tests/spec_oracle.py ``_slack``), for (loss, grad); 0 unless all
    inputs are fp32."""
    if not all(x is None or x.dtype == torch.float32 for x in (s, a, t)):
        return 0.0, 0.0
    ref = oracle(s, a, t, y, **opts)
    f32 = oracle(s, a, t, y, dtype=torch.float32, **opts)
    return tuple(4.0 * float((f32[i].double() - ref[i]).abs().max()) for i in (1, 2))


def _assert_twin(loss, grad, loss_ref, grad_ref, s, a, t, y, **opts):
    """grad_in_forward=True against grad_in_forward=False, within SPEC §4's budget.

    fp32: rtol 1e-5 / atol 1e-6 (+ the fp32 slack of the oracle helpers); float64: 1e-10 / 1e-12; any bf16/fp16
    input: loss rtol 2e-3, gradient rtol 2e-3 plus one unit of the stored gradient's dtype (the two fp32 values
    may round to neighbouring bf16/fp16 numbers) and the oracle helpers' atol.
    """
    inputs = (s, a, t)
    assert loss.dtype == loss_ref.dtype and loss.shape == loss_ref.shape
    assert grad is not None and grad.dtype == grad_ref.dtype == s.dtype and grad.shape == s.shape
    low = any(x is not None and x.dtype in LOW_PRECISION for x in inputs)
    f64 = all(x is None or x.dtype == torch.float64 for x in inputs)
    sl_loss, sl_grad = _fp32_slack(s, a, t, y, **opts)
    if f64:
        lt = gt = (1e-10, 1e-12)
    elif not low:
        lt, gt = (1e-5, 1e-6 + sl_loss), (1e-5, 1e-6 + sl_grad)
    else:
        fi = torch.finfo(grad.dtype)
        lt = (2e-3, 1e-5)
        gt = (2e-3 + fi.eps, 1e-4 * float(grad_ref.double().abs().max()) + fi.smallest_normal * fi.eps)
    torch.testing.assert_close(loss.double(), loss_ref.double(), rtol=lt[0], atol=lt[1])
    torch.testing.assert_close(grad.double(), grad_ref.double(), rtol=gt[0], atol=gt[1])


def _assert_multiple(got, single, k):
    """``got`` is k x ``single`` up to the rounding of one product in the gradient's dtype."""
    assert got is not None and got.dtype == single.dtype and got.shape == single.shape
    want = single.double() * k
    eps = torch.finfo(single.dtype).eps
    torch.testing.assert_close(got.double(), want, rtol=2 * eps, atol=2 * eps * float(want.abs().max()) + 1e-30)


def _check(backend, s, a, t, y, **opts):
    """Both settings against the oracle and each other; returns grad_in_forward=True's (loss, grad)."""
    loss_f, grad_f = _run(s, a, t, y, backend=backend, gif=False, **opts)
    loss_t, grad_t = _run(s, a, t, y, backend=backend, gif=True, **opts)
    assert torch.isfinite(loss_t).all() and torch.isfinite(grad_t).all()
    assert_matches_oracle(loss_f, grad_f, s, a, t, y, **opts)
    assert_matches_oracle(loss_t, grad_t, s, a, t, y, **opts)
    _assert_twin(loss_t, grad_t, loss_f, grad_f, s, a, t, y, **opts)
    return loss_t, grad_t


# ----------------------------------------------------------------------------- 1. values and gradients


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_oracle_and_default_fp32(backend, name):
    s, a, t, y, opts = _case(name, backend)
    loss, _ = _check(backend, s, a, t, y, **opts)
    assert loss.dtype == torch.float32 and loss.shape == ()


@pytest.mark.parametrize("name", LOW_CASES)
@pytest.mark.parametrize("dtype", list(LOW_PRECISION), ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_oracle_and_default_low_precision(backend, dtype, name):
    s, a, t, y, opts = _case(name, backend, dtype, seed=1)
    loss, grad = _check(backend, s, a, t, y, **opts)
    assert loss.dtype == torch.float32 and grad.dtype == dtype


@pytest.mark.parametrize("name", F64_CASES)
@pytest.mark.parametrize("backend", F64_BACKENDS)
def test_matches_oracle_and_default_float64(backend, name):
    s, a, t, y, opts = _case(name, backend, torch.float64, seed=2)
    _, grad = _check(backend, s, a, t, y, **opts)
    assert grad.dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes(backend):
    """bf16 student, fp32 teachers (SPEC §3: each input may have its own dtype)."""
    s, a, t, y, opts = _case("hard_weight", backend, torch.bfloat16, seed=3, teacher_dtype=torch.float32)
    _, grad = _check(backend, s, a, t, y, **opts)
    assert grad.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_labels(backend):
    s, a, t, y, opts = _case("hard_weight", backend, seed=4, label_dtype=torch.int32)
    assert y.dtype == torch.int32
    _check(backend, s, a, t, y, **opts)


@pytest.mark.parametrize("opts", [dict(soft_weight=0.7, hard_weight=0.5), dict(divergence="jsd", jsd_beta=0.3)],
                         ids=["fkl_hard", "jsd0.3"])
@pytest.mark.parametrize("V", [1, 7])
@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_vocab(backend, V, opts):
    s, a, t, y = _inputs((5,), V, seed=5 + V)
    _check(backend, s, a, t, y, **opts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_student(backend, dtype):
    """The student is logits[:, :-1] of a [B, T+1, V] tensor (as in causal LM shifting); the teachers are
    non-contiguous too. The gradient reaches the full tensor, 0 on the dropped position."""
    B, T, V = (2, 3, 37) if backend == "triton" else (3, 4, 67)
    opts = dict(alpha=0.5, temperature=2.0, soft_weight=0.8, hard_weight=0.3)
    s_full, a_full, t_full, _ = _inputs((B, T + 1), V, seed=6, dtype=dtype, labels=None)
    _, _, _, y = _inputs((B, T), V, seed=7, labels="some")
    a, t = a_full[:, 1:], t_full[:, 1:]
    assert not a.is_contiguous() and not t.is_contiguous()
    results = {}
    for gif in (False, True):
        leaf = s_full.detach().clone().requires_grad_(True)
        s = leaf[:, :-1]
        assert not s.is_contiguous()
        loss = contrastive_kd_loss(s, a, t, y, backend=backend, grad_in_forward=gif, **opts)
        loss.backward()
        assert torch.equal(leaf.grad[:, -1], torch.zeros_like(leaf.grad[:, -1]))
        results[gif] = (loss.detach(), leaf.grad[:, :-1])
    s_view = s_full[:, :-1]
    assert_matches_oracle(*results[True], s_view, a, t, y, **opts)
    _assert_twin(*results[True], *results[False], s_view, a, t, y, **opts)


@pytest.mark.parametrize("opts", [dict(), dict(reduction="sum"), dict(num_items_in_batch=4),
                                  dict(num_items_in_batch=torch.tensor(3), hard_weight=0.5, divergence="jsd")],
                         ids=["mean", "sum", "nib_int", "nib_tensor_hard_jsd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored(backend, dtype, opts):
    """SPEC §3: loss 0 and gradient exactly 0, no NaN."""
    lead, V = _shape(backend)
    s, a, t, y = _inputs(lead, V, seed=8, dtype=dtype, labels="all")
    loss, grad = _run(s, a, t, y, backend=backend, gif=True, **opts)
    assert loss.item() == 0.0
    assert grad.dtype == dtype and grad.shape == s.shape
    assert torch.equal(grad, torch.zeros_like(grad))
    # and with an upstream gradient other than 1
    loss, grad = _run(s, a, t, y, backend=backend, gif=True, upstream=3.0, **opts)
    assert loss.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    """SPEC §4: the same inputs give bitwise the same loss and gradient."""
    s, a, t, y, opts = _case("everything", backend, seed=9)
    l1, g1 = _run(s, a, t, y, backend=backend, gif=True, **opts)
    l2, g2 = _run(s, a, t, y, backend=backend, gif=True, **opts)
    assert torch.equal(l1, l2) and torch.equal(g1, g2)


# ----------------------------------------------------------------------------- 2. upstream scaling


@pytest.mark.parametrize("name", ["hard_weight", "everything"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("backend", BACKENDS)
def test_upstream_scaling(backend, dtype, name):
    s, a, t, y, opts = _case(name, backend, dtype, seed=10)
    loss1, g1 = _run(s, a, t, y, backend=backend, gif=True, **opts)  # upstream exactly 1
    loss_f, g_f = _run(s, a, t, y, backend=backend, gif=False, **opts)
    _assert_twin(loss1, g1, loss_f, g_f, s, a, t, y, **opts)

    loss3, g3 = _run(s, a, t, y, backend=backend, gif=True, upstream=3.0, **opts)
    assert torch.equal(loss3, loss1)
    _assert_multiple(g3, g1, 3)
    assert_matches_oracle(loss3, g3, s, a, t, y, grad_output=3.0, **opts)

    leaf = s.detach().clone().requires_grad_(True)
    loss = contrastive_kd_loss(leaf, a, t, y, backend=backend, grad_in_forward=True, **opts)
    (loss + loss).backward()
    _assert_multiple(leaf.grad, g1, 2)

    leaf = s.detach().clone().requires_grad_(True)
    loss = contrastive_kd_loss(leaf, a, t, y, backend=backend, grad_in_forward=True, **opts)
    (-0.5 * loss).backward()
    _assert_multiple(leaf.grad, g1, -0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_leaf_student_through_a_head(backend):
    """The student logits come out of a linear head; the gradient reaches its weight scaled by the upstream."""
    lead, V = _shape(backend)
    _, a, t, y = _inputs(lead, V, seed=11)
    g = torch.Generator().manual_seed(12)
    h = torch.randn(*lead, 8, generator=g)
    w0 = torch.randn(V, 8, generator=g)
    opts = dict(plausibility_beta=0.1, hard_weight=0.3, num_items_in_batch=5)
    grads = {}
    for gif, up in ((False, 1.0), (True, 1.0), (True, 2.5)):
        w = w0.clone().requires_grad_(True)
        loss = contrastive_kd_loss(h @ w.T, a, t, y, backend=backend, grad_in_forward=gif, **opts)
        (loss * up).backward()
        grads[gif, up] = w.grad
    torch.testing.assert_close(grads[True, 1.0], grads[False, 1.0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[True, 2.5], 2.5 * grads[False, 1.0], rtol=1e-5, atol=2.5e-5)
    s = (h @ w0.T).detach()
    truth = oracle(s, a, t, y, **opts)[2]
    want = torch.einsum("...v,...k->vk", truth, h.double())
    torch.testing.assert_close(grads[True, 1.0].double(), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- 3. backward twice


@pytest.mark.parametrize("between", ["nothing", "zero_grad", "grad_none"])
@pytest.mark.parametrize("upstream", [1.0, 3.0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_twice(backend, upstream, between):
    """retain_graph=True: every further backward gives the right gradient again or raises RuntimeError; never a
    silently wrong one (e.g. a stored gradient scaled in place, or aliased by .grad and then zeroed)."""
    s, a, t, y, opts = _case("everything", backend, seed=13)
    leaf = s.detach().clone().requires_grad_(True)
    loss = contrastive_kd_loss(leaf, a, t, y, backend=backend, grad_in_forward=True, **opts)
    obj = loss if upstream == 1.0 else upstream * loss
    obj.backward(retain_graph=True)
    g1 = leaf.grad.clone()
    assert_matches_oracle(loss.detach(), g1, s, a, t, y, grad_output=upstream, **opts)
    for k in (2, 3):
        if between == "zero_grad":
            leaf.grad.zero_()  # optimizer.zero_grad(set_to_none=False)
        elif between == "grad_none":
            leaf.grad = None
        try:
            obj.backward(retain_graph=True)
        except RuntimeError:
            return  # refusing is allowed
        _assert_multiple(leaf.grad, g1, k if between == "nothing" else 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_uses_the_forward_time_gradient(backend):
    """The gradient is computed in the forward: changing the teachers in place after it either leaves the
    gradient as it was at forward time or raises RuntimeError (never a gradient of other data)."""
    s, a, t, y, opts = _case("hard_weight", backend, seed=14)
    _, want = _run(s, a, t, y, backend=backend, gif=True, **opts)
    a2, t2 = a.clone(), t.clone()
    leaf = s.detach().clone().requires_grad_(True)
    loss = contrastive_kd_loss(leaf, a2, t2, y, backend=backend, grad_in_forward=True, **opts)
    a2.mul_(-1.0)
    t2.add_(5.0)
    try:
        loss.backward()
    except RuntimeError:
        return
    assert torch.equal(leaf.grad, want)


# ----------------------------------------------------------------------------- 4. errors


@pytest.mark.parametrize("requires_grad", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_reduction_none_refused(backend, requires_grad):
    s, a, t, y, _ = _case("forward_kl", backend)
    s.requires_grad_(requires_grad)
    rows = contrastive_kd_loss(s, a, t, y, backend=backend, reduction="none", grad_in_forward=False)
    assert rows.numel() == y.numel()
    with pytest.raises(ValueError, match="grad_in_forward"):
        contrastive_kd_loss(s, a, t, y, backend=backend, reduction="none", grad_in_forward=True)
    with pytest.raises(ValueError, match="grad_in_forward"):
        ContrastiveKDLoss(backend=backend, reduction="none", grad_in_forward=True)(s, a, t, y)


@pytest.mark.parametrize("requires_grad", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_refused(backend, requires_grad):
    s, a, t, y, _ = _case("forward_kl", backend)
    s = s.requires_grad_(requires_grad) * 1.0  # a non-leaf: inplace_backward itself is allowed there
    contrastive_kd_loss(s, a, t, y, backend=backend, inplace_backward=True, grad_in_forward=False)
    with pytest.raises(ValueError, match="grad_in_forward"):
        contrastive_kd_loss(s, a, t, y, backend=backend, inplace_backward=True, grad_in_forward=True)
    with pytest.raises(ValueError, match="grad_in_forward"):
        ContrastiveKDLoss(backend=backend, inplace_backward=True, grad_in_forward=True)(s, a, t, y)


@pytest.mark.parametrize("value", [1, 0, "yes", 1.0, None], ids=["int1", "int0", "str", "float", "None"])
def test_non_bool_refused(value):
    s, a, t, y, _ = _case("forward_kl", "torch")
    s.requires_grad_(True)
    with pytest.raises(TypeError, match="grad_in_forward"):
        contrastive_kd_loss(s, a, t, y, backend="torch", grad_in_forward=value)
    with pytest.raises(TypeError, match="grad_in_forward"):
        ContrastiveKDLoss(backend="torch", grad_in_forward=value)(s, a, t, y)


# ----------------------------------------------------------------------------- 5. no gradient needed


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "student_no_grad"])
@pytest.mark.parametrize("name", ["forward_kl", "everything"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_needed(backend, name, mode):
    s, a, t, y, opts = _case(name, backend, seed=15)
    if mode == "student_no_grad":
        assert torch.is_grad_enabled() and not s.requires_grad
        ctx = torch.enable_grad()
    else:
        s.requires_grad_(True)
        ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx:
        want = contrastive_kd_loss(s, a, t, y, backend=backend, grad_in_forward=False, **opts)
        got = contrastive_kd_loss(s, a, t, y, backend=backend, grad_in_forward=True, **opts)
    assert not got.requires_grad and got.grad_fn is None
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want), (got, want)
    assert_matches_oracle(got, None, s, a, t, y, **opts)


# ----------------------------------------------------------------------------- 6. torch.compile


class _Head(torch.nn.Module):
    def __init__(self, hidden, vocab, **loss_kw):
        super().__init__()
        self.head = torch.nn.Linear(hidden, vocab)
        self.loss = ContrastiveKDLoss(**loss_kw)

    def forward(self, h, a, t, labels):
        return 2.5 * self.loss(self.head(h), a, t, labels)


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_torch_compile_function(backend):
    torch._dynamo.reset()
    opts = dict(plausibility_beta=0.05, hard_weight=0.2, divergence="jsd", jsd_beta=0.3, num_items_in_batch=5)
    s, a, t, y = _inputs((2, 4), 29, seed=16)

    def fn(s_, a_, t_, y_):
        return contrastive_kd_loss(s_, a_, t_, y_, backend=backend, grad_in_forward=True, **opts)

    eager, g_eager = _run(s, a, t, y, backend=backend, gif=True, **opts)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    leaf = s.clone().requires_grad_(True)
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        got = compiled(leaf, a, t, y)
        got.backward()
    torch.testing.assert_close(got.detach(), eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(leaf.grad, g_eager, rtol=1e-5, atol=1e-6)
    assert_matches_oracle(got.detach(), leaf.grad, s, a, t, y, **opts)


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_torch_compile_model(backend):
    """A compiled model (linear head + the loss module, output scaled by 2.5) gives eager's loss and gradient."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Head(16, 31, backend=backend, plausibility_beta=0.05, hard_weight=0.2, grad_in_forward=True)
    h = torch.randn(2, 5, 16)
    _, a, t, y = _inputs((2, 5), 31, seed=17)

    eager = model(h, a, t, y)
    eager.backward()
    want = model.head.weight.grad.clone()
    model.zero_grad()
    ref = _Head(16, 31, backend=backend, plausibility_beta=0.05, hard_weight=0.2)
    ref.load_state_dict(model.state_dict())
    ref(h, a, t, y).backward()
    torch.testing.assert_close(want, ref.head.weight.grad, rtol=1e-5, atol=1e-6)

    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        got = compiled(h, a, t, y)
        got.backward()
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.head.weight.grad, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- 7. module form


@pytest.mark.parametrize("name", ["everything", "nib_tensor", "alpha0_no_text"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_function(backend, name):
    s, a, t, y, opts = _case(name, backend, seed=18)
    nib = opts.pop("num_items_in_batch", None)
    module = ContrastiveKDLoss(backend=backend, grad_in_forward=True, **opts)
    leaf = s.clone().requires_grad_(True)
    got = module(leaf, a, t, y, num_items_in_batch=nib)
    got.backward()
    want, g_want = _run(s, a, t, y, backend=backend, gif=True, num_items_in_batch=nib, **opts)
    assert torch.equal(got.detach(), want)
    assert torch.equal(leaf.grad, g_want)
    assert_matches_oracle(want, g_want, s, a, t, y, num_items_in_batch=nib, **opts)
