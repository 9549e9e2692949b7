"""An independent float64 oracle for the contrastive KD loss (SPEC.md §2, §3).

Written from the specification alone; it does not import ``caad_kernels``.
Given student logits ``s``, teacher audio-aware logits ``a``, teacher text-only
logits ``t`` (or None), labels and the options, ``oracle`` returns the per-row
losses ``[N]``, the reduced loss and the gradient of the reduced loss with
respect to ``s`` (by autograd on the formula below, in ``dtype``).

``dtype=torch.float32`` gives the "plain fp32 computation of the same formula"
that the extreme-logit tests use as an error budget. Log-softmax is written as
``x - logsumexp(x)`` on purpose: that is the form any kernel that keeps only a
per-row log-sum-exp (SPEC §5) computes, so the fp32 baseline carries the same
kind of rounding (of ``lse``) and is a fair yardstick.
"""
from __future__ import annotations

import math

import torch

INF = float("inf")


def _log_softmax(x):
    return x - torch.logsumexp(x, dim=-1, keepdim=True)


def _kl(logx, logy):
    """Σ_v x_v (log x_v − log y_v) with 0·log 0 = 0 (x = exp(logx)).

    The difference is replaced by 0 where x = 0 *before* the product, so that
    autograd never sees ``0 · (−∞ − (−∞))``.
    """
    x = logx.exp()
    return (x * torch.where(x > 0, logx - logy, torch.zeros_like(logx))).sum(-1)


def _log_mix(logq, logp, beta):
    """log((1 − β) q + β p) in log space (no underflow at |x| = 1e4).

    Entries where both are −∞ are computed from (0, 0) and then put back to −∞
    so that the backward pass has no exp(−∞ − (−∞)) = NaN in it.
    """
    x1 = logq + math.log1p(-beta)
    x2 = logp + math.log(beta)
    both = (x1 == -INF) & (x2 == -INF)
    zero = torch.zeros_like(x1)
    m = torch.logaddexp(torch.where(both, zero, x1), torch.where(both, zero, x2))
    return torch.where(both, torch.full_like(m, -INF), m)


def _divergence(logp, logq, divergence, jsd_beta):
    if divergence == "forward_kl" or (divergence == "jsd" and jsd_beta == 0):
        return _kl(logp, logq)
    if divergence == "reverse_kl" or (divergence == "jsd" and jsd_beta == 1):
        return _kl(logq, logp)
    assert divergence == "jsd", divergence
    logm = _log_mix(logq, logp, jsd_beta)
    return jsd_beta * _kl(logp, logm) + (1 - jsd_beta) * _kl(logq, logm)


def _bad(x):
    """Rows holding NaN or +inf (SPEC §3: such a row's loss is NaN)."""
    return (x.isnan() | (x == INF)).any(-1)


def row_losses(s, a, t, y, *, alpha, plausibility_beta, temperature, divergence, jsd_beta,
               soft_weight, hard_weight):
    """Losses of valid rows. s, a, t: [M, V] (t may be None when alpha == 0); y: [M] or None."""
    loss = torch.zeros(s.shape[0], dtype=s.dtype, device=s.device)
    bad = _bad(s)
    if soft_weight != 0:  # with soft_weight = 0 the teachers are not read at all
        # SPEC §3: a row with no distribution (all of a, or all of s, −inf) is NaN for every divergence.
        bad = bad | _bad(a) | (a == -INF).all(-1) | (s == -INF).all(-1)
        if alpha != 0:  # with alpha = 0 the text-only teacher is not read at all
            bad = bad | _bad(t) | ((t == -INF) & (a != -INF)).any(-1)
            z = torch.where(a == -INF, torch.full_like(a, -INF), (1 + alpha) * a - alpha * t)
        else:
            z = a
        if plausibility_beta > 0:
            thresh = a.max(-1, keepdim=True).values + math.log(plausibility_beta)
            z = torch.where(a < thresh, torch.full_like(z, -INF), z)
        logp = _log_softmax(z / temperature)
        logq = _log_softmax(s / temperature)
        loss = loss + soft_weight * _divergence(logp, logq, divergence, jsd_beta)
    if hard_weight != 0:
        logq1 = _log_softmax(s)  # temperature 1 (SPEC §2.5)
        loss = loss - hard_weight * logq1.gather(-1, y.long()[:, None])[:, 0]
    return torch.where(bad, torch.full_like(loss, float("nan")), loss)


def oracle(s, a, t=None, labels=None, *, alpha=1.0, plausibility_beta=0.0, temperature=1.0,
           divergence="forward_kl", jsd_beta=0.5, soft_weight=1.0, hard_weight=0.0,
           ignore_index=-100, reduction="mean", num_items_in_batch=None, grad_output=None,
           dtype=torch.float64):
    """Return (per_row [N], reduced loss, grad of the reduced loss w.r.t. s (shape of s)).

    ``grad_output``: a scalar multiplying the reduced loss, or for ``reduction="none"``
    a length-N weight vector w (the gradient is then that of Σ w_i ℓ_i). Default 1.
    """
    V, dev = s.shape[-1], s.device  # computed on s's device (float64 works on CUDA too)
    s2 = s.detach().reshape(-1, V).to(dtype).requires_grad_(True)
    a2 = a.detach().reshape(-1, a.shape[-1]).to(dev, dtype) if a is not None else None
    t2 = t.detach().reshape(-1, t.shape[-1]).to(dev, dtype) if t is not None else None
    N = s2.shape[0]
    if labels is None:
        valid = torch.ones(N, dtype=torch.bool, device=dev)
        y = None
    else:
        y = labels.detach().reshape(-1).to(dev, torch.long)
        valid = y != ignore_index
    idx = valid.nonzero()[:, 0]
    opts = dict(alpha=alpha, plausibility_beta=plausibility_beta, temperature=temperature,
                divergence=divergence, jsd_beta=jsd_beta, soft_weight=soft_weight,
                hard_weight=hard_weight)
    # Only the valid rows enter the graph: ignored rows get exactly 0 loss and 0 gradient.
    rows = row_losses(s2[idx], a2[idx] if a2 is not None else None,
                      t2[idx] if t2 is not None else None,
                      y[idx] if y is not None else None, **opts)
    per_row = torch.zeros(N, dtype=dtype, device=dev).index_put((idx,), rows)
    if reduction == "none":
        w = torch.ones(N) if grad_output is None else torch.as_tensor(grad_output)
        reduced = per_row
        objective = (per_row * w.to(dev, dtype).reshape(-1)).sum()
    else:
        total = per_row.sum()
        if reduction == "sum":
            reduced = total
        elif num_items_in_batch is not None:
            reduced = total / float(num_items_in_batch)
        else:
            reduced = total / max(int(valid.sum()), 1)
        objective = reduced * (1.0 if grad_output is None else float(grad_output))
    if objective.requires_grad:
        (grad,) = torch.autograd.grad(objective, s2)
    else:
        grad = torch.zeros_like(s2)
    return per_row.detach(), reduced.detach(), grad.reshape(s.shape)


# Option sets shared by the CPU parity tests and the GPU tests: every option of SPEC §2 and §7
# appears in at least one case; "labels": "some" marks rows with ignore_index.
PARITY_CASES = {
    "default": dict(),
    "alpha0_no_text": dict(alpha=0.0, text=False),
    "alpha0.5": dict(alpha=0.5),
    "alpha2_tau2": dict(alpha=2.0, temperature=2.0),
    "tau0.5": dict(temperature=0.5),
    "plaus0.1": dict(plausibility_beta=0.1),
    "plaus0.3_tau2_jsd": dict(plausibility_beta=0.3, temperature=2.0, divergence="jsd", jsd_beta=0.5),
    "reverse_kl": dict(divergence="reverse_kl"),
    "reverse_kl_alpha0_tau2": dict(divergence="reverse_kl", alpha=0.0, temperature=2.0),
    "jsd0": dict(divergence="jsd", jsd_beta=0.0),
    "jsd0.3": dict(divergence="jsd", jsd_beta=0.3),
    "jsd0.5": dict(divergence="jsd", jsd_beta=0.5),
    "jsd0.9_tau1.5": dict(divergence="jsd", jsd_beta=0.9, temperature=1.5),
    "jsd1": dict(divergence="jsd", jsd_beta=1.0),
    "jsd0_plaus": dict(divergence="jsd", jsd_beta=0.0, plausibility_beta=0.2),
    "hard_mix": dict(soft_weight=0.7, hard_weight=0.3, labels="some"),
    "hard_only": dict(soft_weight=0.0, hard_weight=1.0, labels="some"),
    "hard_mix_jsd_tau2": dict(soft_weight=0.5, hard_weight=2.0, divergence="jsd", temperature=2.0,
                              labels="some"),
    "soft_weight2.5": dict(soft_weight=2.5),
    "ignored_rows_mean": dict(labels="some"),
    "ignored_rows_sum": dict(labels="some", reduction="sum"),
    "ignored_rows_none": dict(labels="some", reduction="none"),
    "sum_no_labels": dict(reduction="sum"),
    "none_no_labels": dict(reduction="none", divergence="reverse_kl"),
    "num_items_int": dict(labels="some", num_items_in_batch=29),
    "num_items_tensor": dict(labels="some", num_items_in_batch="tensor7"),
    "ignore_index_custom": dict(labels="some", ignore_index=-1),
    "everything": dict(alpha=0.8, plausibility_beta=0.05, temperature=1.7, divergence="jsd",
                       jsd_beta=0.25, soft_weight=0.9, hard_weight=0.4, labels="some",
                       num_items_in_batch=11),
}


def make_case(case, N, V, *, generator, device="cpu", dtype=torch.float32, scale=3.0):
    """Random inputs for one PARITY_CASES entry; returns (s, a, t, labels, kwargs for both sides)."""
    opts = dict(case)
    text = opts.pop("text", True)
    label_mode = opts.pop("labels", None)
    s = (torch.randn(N, V, generator=generator, dtype=torch.float64) * scale)
    a = (torch.randn(N, V, generator=generator, dtype=torch.float64) * scale)
    t = (torch.randn(N, V, generator=generator, dtype=torch.float64) * scale) if text else None
    labels = None
    if label_mode is not None or opts.get("hard_weight", 0) > 0:
        labels = torch.randint(0, V, (N,), generator=generator)
        ign = opts.get("ignore_index", -100)
        labels[torch.arange(N) % 3 == 1] = ign
    nib = opts.get("num_items_in_batch")
    if nib == "tensor7":
        opts["num_items_in_batch"] = torch.tensor(7)

    def to(x):
        return None if x is None else x.to(device=device, dtype=dtype)

    return to(s), to(a), to(t), (None if labels is None else labels.to(device)), opts


# ---------------------------------------------------------------------------------------------
# Test helpers shared by the test files (no import of caad_kernels here: the function under test
# is passed in).

LOW_PRECISION = (torch.bfloat16, torch.float16)


def run_loss(fn, s, a, t=None, labels=None, *, grad_output=None, **kwargs):
    """Call ``fn`` on a fresh leaf copy of ``s`` and backpropagate; return (loss, grad_s).

    ``grad_output``: scalar multiplier of a reduced loss, or a weight vector for ``none``.
    """
    s = s.detach().clone().requires_grad_(True)
    loss = fn(s, a, t, labels, **kwargs)
    if loss.dim() == 0:
        objective = loss * (1.0 if grad_output is None else grad_output)
    else:
        w = torch.ones_like(loss) if grad_output is None else grad_output.to(loss)
        objective = (loss * w).sum()
    objective.backward()
    return loss.detach(), s.grad


def _slack(baseline, expected):
    """4× the largest error of the plain fp32 computation (``oracle(..., dtype=torch.float32)``).

    SPEC §4's fp32 tolerance (rtol 1e-5 / atol 1e-6) is not always attainable in fp32 at all:
    e.g. the reverse-KL gradient q·(log q − log p − D) of randn·3 logits carries the fp32
    rounding of log p (|log p| ~ 30, ulp ~ 2e-6), so the plain fp32 formula itself misses atol
    1e-6 by ~3×. The budget is therefore SPEC's tolerance plus 4× the error of that fp32
    computation (Cut Cross-Entropy's error budget); where fp32 is accurate (almost always) the
    slack is ~1e-7 and the test is SPEC's tolerance. Non-finite baseline errors give no slack.
    """
    if baseline is None:
        return 0.0
    err = (baseline.detach().double().cpu() - expected.detach().double().cpu()).abs()
    err = torch.where(torch.isfinite(err), err, torch.zeros_like(err))
    return 4.0 * float(err.max()) if err.numel() else 0.0


def assert_loss_close(actual, expected, *inputs, baseline=None):
    """SPEC §4: fp32 inputs rtol 1e-5 / atol 1e-6 against float64 (+ the fp32 slack above);
    any bf16/fp16 input: rtol 2e-3 against the float64 oracle of the upcast inputs (upcasting is
    exact, so the oracle of the upcast values *is* the reference of the same low-precision
    inputs; the atol of 1e-5 only covers row losses that are ~0)."""
    low = any(x is not None and x.dtype in LOW_PRECISION for x in inputs)
    f64 = all(x is None or x.dtype == torch.float64 for x in inputs)
    rtol, atol = (2e-3, 1e-5) if low else (1e-10, 1e-12) if f64 else (1e-5, 1e-6)
    torch.testing.assert_close(actual.detach().double().cpu(), expected.detach().double().cpu(),
                               rtol=rtol, atol=atol + _slack(baseline, expected), equal_nan=True)


def assert_grad_close(actual, expected, *inputs, baseline=None):
    """Gradient against the float64 oracle, with a budget paired to the dtypes.

    fp32 everywhere: SPEC's rtol 1e-5 / atol 1e-6 (+ the fp32 slack of ``_slack``);
    float64 everywhere: 1e-10 / 1e-12.
    Any bf16/fp16 input: SPEC's rtol 2e-3 for the fp32 computation, plus the rounding of the
    stored gradient to ``grad.dtype`` (round-to-nearest: at most eps/2 relative, i.e. 2^-8 for
    bf16, whose eps is 2^-7, and 2^-11 for fp16), plus an atol of 1e-4·max|grad| for the fp32
    cancellation in q − p on entries much smaller than the largest ones, plus fp16's subnormal
    spacing (2^-24) for entries that underflow there.
    """
    assert actual is not None, "no gradient reached the student logits"
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    low = any(x is not None and x.dtype in LOW_PRECISION for x in inputs)
    act, exp = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not low and actual.dtype in (torch.float32, torch.float64):
        f64 = actual.dtype == torch.float64 and all(x is None or x.dtype == torch.float64 for x in inputs)
        rtol, atol = (1e-10, 1e-12) if f64 else (1e-5, 1e-6)
        torch.testing.assert_close(act, exp, rtol=rtol, atol=atol + _slack(baseline, expected))
        return
    fi = torch.finfo(actual.dtype)
    rtol = 2e-3 + fi.eps / 2
    atol = 1e-4 * float(exp.abs().max()) + fi.smallest_normal * fi.eps
    torch.testing.assert_close(act, exp, rtol=rtol, atol=atol)


def assert_matches_oracle(loss, grad, s, a, t=None, labels=None, *, grad_output=None, **opts):
    """Compare a kernel's (loss, grad_s) with the float64 oracle, with the budgets above.

    For all-fp32 inputs the plain fp32 computation of the formula is the baseline of the slack.
    Returns the oracle's (per_row, reduced, grad).
    """
    truth = oracle(s, a, t, labels, grad_output=grad_output, **opts)
    fp32 = all(x is None or x.dtype == torch.float32 for x in (s, a, t))
    base = oracle(s, a, t, labels, grad_output=grad_output, dtype=torch.float32, **opts) if fp32 else None
    assert_loss_close(loss, truth[1], s, a, t, baseline=None if base is None else base[1])
    if grad is not None:
        assert_grad_close(grad, truth[2], s, a, t, baseline=None if base is None else base[2])
    return truth
