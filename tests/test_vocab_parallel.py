"""Tests of ``vocab_parallel_contrastive_kd_loss``: the vocabulary sharded across gloo ranks on CPU.

World sizes 2 and 3 run as real processes (``torch.multiprocessing.spawn``, ``file://`` rendezvous
in a temporary directory). Every rank builds the same full ``[N, V]`` logits from one seed, keeps its
contiguous column shard (uneven shards, V = 101), computes the loss and backpropagates, and writes
(loss, gradient of its shard) to a file; the parent process compares them with an independent
float64 oracle of the *unsharded* loss written below from SPEC §2 (contrast, plausibility masking
with the global max of the audio logits, temperature, forward/reverse KL and TRL's jsd convention,
hard CE at temperature 1, ignore_index, reductions, num_items_in_batch). All cases of one world size
run in one spawn to keep the suite fast; an exception in a case is recorded by the child and fails
that case's test in the parent, an exception outside a case fails every test of that world size.
"""
from __future__ import annotations

import datetime
import math
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

INF = float("inf")
V = 101
SPLITS = {2: [64, 37], 3: [40, 27, 34]}  # contiguous, uneven shards of V = 101
LOSS_KEYS = ("alpha", "plausibility_beta", "temperature", "divergence", "jsd_beta", "soft_weight",
             "hard_weight", "ignore_index")
DEFAULTS = dict(alpha=1.0, plausibility_beta=0.0, temperature=1.0, divergence="forward_kl", jsd_beta=0.5,
                soft_weight=1.0, hard_weight=0.0, ignore_index=-100)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

# ============================================================================================
# The float64 oracle of the unsharded loss (SPEC §2).


def _log_softmax(x):
    return x - torch.logsumexp(x, dim=-1, keepdim=True)


def _kl(logx, logy):
    """Σ_v x_v (log x_v − log y_v) with 0·log 0 = 0."""
    x = logx.exp()
    return (x * torch.where(x > 0, logx - logy, torch.zeros_like(logx))).sum(-1)


def _divergence(logp, logq, divergence, jsd_beta):
    """TRL convention: jsd_beta = 0 is exactly KL(p‖q), jsd_beta = 1 exactly KL(q‖p);
    otherwise m = (1 − β) q + β p, D = β KL(p‖m) + (1 − β) KL(q‖m)."""
    if divergence == "forward_kl" or (divergence == "jsd" and jsd_beta == 0):
        return _kl(logp, logq)
    if divergence == "reverse_kl" or (divergence == "jsd" and jsd_beta == 1):
        return _kl(logq, logp)
    assert divergence == "jsd", divergence
    logm = torch.logaddexp(logq + math.log1p(-jsd_beta), logp + math.log(jsd_beta))
    return jsd_beta * _kl(logp, logm) + (1 - jsd_beta) * _kl(logq, logm)


def _keep_global(a, plausibility_beta):
    return a >= a.max(-1, keepdim=True).values + math.log(plausibility_beta)


def oracle(s, a, t, labels, *, reduction="mean", num_items_in_batch=None, upstream=None, dtype=torch.float64,
           keep_fn=_keep_global, **opts):
    """(reduced loss, d objective / d s) of the unsharded logits [..., V].

    objective = upstream · loss, or Σ_i upstream_i ℓ_i for "none". ``keep_fn`` (which tokens survive
    plausibility masking) is replaceable only to check that the test can tell a local max from the
    global one."""
    o = {k: opts.get(k, DEFAULTS[k]) for k in LOSS_KEYS}
    shape = s.shape
    s2 = s.detach().reshape(-1, shape[-1]).to(dtype).requires_grad_(True)
    a2 = a.detach().reshape(-1, shape[-1]).to(dtype)
    t2 = t.detach().reshape(-1, shape[-1]).to(dtype) if t is not None else None
    n = s2.shape[0]
    if labels is None:
        idx, y = torch.arange(n), None
    else:
        lab = labels.reshape(-1).long()
        idx = (lab != o["ignore_index"]).nonzero()[:, 0]
        y = lab[idx]
    s_, a_ = s2[idx], a2[idx]
    rows = torch.zeros(len(idx), dtype=dtype)
    if o["soft_weight"] != 0:
        alpha = o["alpha"]
        z = (1 + alpha) * a_ - alpha * t2[idx] if alpha != 0 else a_
        z = torch.where(a_ == -INF, a_, z)  # SPEC §3: −inf in a marks the token impossible, whatever t is
        if o["plausibility_beta"] > 0:
            z = torch.where(keep_fn(a_, o["plausibility_beta"]), z, torch.full_like(z, -INF))
        logp = _log_softmax(z / o["temperature"])
        logq = _log_softmax(s_ / o["temperature"])
        rows = rows + o["soft_weight"] * _divergence(logp, logq, o["divergence"], o["jsd_beta"])
    if o["hard_weight"] != 0:
        rows = rows - o["hard_weight"] * _log_softmax(s_).gather(-1, y[:, None])[:, 0]
    # SPEC §3: NaN or +inf anywhere in a valid row makes that row's loss NaN
    bad = torch.zeros(len(idx), dtype=torch.bool)
    for x in (s_.detach(), a_, t2[idx] if t2 is not None else None):
        if x is not None:
            bad = bad | (x.isnan() | (x == INF)).any(-1)
    rows = torch.where(bad, torch.full_like(rows, float("nan")), rows)
    per_row = torch.zeros(n, dtype=dtype).index_put((idx,), rows)
    if reduction == "none":
        loss = per_row
        objective = (per_row * (torch.ones(n) if upstream is None else upstream).to(dtype)).sum()
    else:
        loss = per_row.sum()
        if reduction == "mean":
            loss = loss / (float(num_items_in_batch) if num_items_in_batch is not None else max(len(idx), 1))
        objective = loss * (1.0 if upstream is None else float(upstream))
    if objective.requires_grad:
        (grad,) = torch.autograd.grad(objective, s2)
    else:
        grad = torch.zeros_like(s2)
    return loss.detach(), grad.reshape(shape)


# ============================================================================================
# Cases (shared by the ranks and the parent: everything is generated from the case's seed).

CASES = {
    "fkl": dict(),
    "alpha0_no_text": dict(alpha=0.0, text=False),
    "alpha0.5_tau2": dict(alpha=0.5, temperature=2.0),
    "reverse_kl_tau1.5": dict(divergence="reverse_kl", temperature=1.5),
    "jsd0.3": dict(divergence="jsd", jsd_beta=0.3),
    "jsd0": dict(divergence="jsd", jsd_beta=0.0),
    "jsd1": dict(divergence="jsd", jsd_beta=1.0),
    "plaus0.1": dict(plausibility_beta=0.1),
    "plaus0.2_jsd0.3_tau1.5": dict(plausibility_beta=0.2, divergence="jsd", jsd_beta=0.3, temperature=1.5),
    "plaus0.05_alpha0": dict(plausibility_beta=0.05, alpha=0.0, text=False, labels="some", reduction="sum"),
    "ignored_mean": dict(labels="some"),
    "ignored_sum": dict(labels="some", reduction="sum", divergence="reverse_kl"),
    "ignored_none": dict(labels="some", reduction="none", divergence="jsd", jsd_beta=0.3),
    "hard_mix": dict(labels="some", soft_weight=0.7, hard_weight=0.5),
    "hard_only": dict(labels="some", soft_weight=0.0, hard_weight=1.0),
    "hard_none_plaus_jsd": dict(labels="some", hard_weight=0.4, plausibility_beta=0.1, reduction="none",
                                divergence="jsd", jsd_beta=0.3, temperature=1.3),
    "num_items_int": dict(labels="some", num_items_in_batch=17, hard_weight=0.2),
    "num_items_tensor": dict(labels="some", num_items_in_batch="tensor"),
    "ignore_index_custom": dict(labels="some", ignore_index=-1, hard_weight=0.3),
    "leading_dims": dict(lead=(3, 4), labels="some", hard_weight=0.3, reduction="none", plausibility_beta=0.1),
    "explicit_group": dict(group=True, divergence="jsd", jsd_beta=0.3, labels="some", hard_weight=0.2),
    "strided_teacher_shards": dict(strided=True, plausibility_beta=0.1, labels="some", hard_weight=0.3),
    "all_ignored": dict(labels="none_valid", hard_weight=0.5),
    "bf16_shards": dict(dtype="bf16", labels="some", hard_weight=0.3, divergence="jsd", jsd_beta=0.3,
                        plausibility_beta=0.1, reduction="none"),
    "non_finite": dict(nonfinite=True, labels="some", hard_weight=0.3, reduction="none"),
    # SPEC §3: a row with no distribution (all student / all teacher logits −inf) is NaN for every divergence.
    "no_distribution_rkl": dict(no_distribution=True, divergence="reverse_kl", reduction="none"),
    "no_distribution_jsd": dict(no_distribution=True, divergence="jsd", reduction="none", labels="some",
                                hard_weight=0.3),
    # A saturated student (|x| ~ 1e3, a runner-up 2..30 below the max): the argmax entry of q·(r − D) is
    # compensated, so SPEC's fp32 tolerance holds without the plain-fp32 slack (see the test).
    "saturated_rkl": dict(saturated=True, divergence="reverse_kl", reduction="sum"),
    "saturated_jsd": dict(saturated=True, divergence="jsd", reduction="sum", labels="some"),
}
NO_DISTRIBUTION_ROWS = (4, 7)  # all student logits −inf in row 4, all teacher logits in row 7
NAN_ROWS, NAN_IGNORED_ROW = (3, 5), 2  # rows of the "non_finite" case
PLAUSIBILITY_CASES = [k for k, v in CASES.items() if v.get("plausibility_beta", 0) > 0]
HARD_CASES = [k for k, v in CASES.items() if v.get("hard_weight", 0) > 0 and v.get("labels") == "some"]


def shard_bounds(splits, rank):
    lo = sum(splits[:rank])
    return lo, lo + splits[rank]


def make_case(name, splits):
    """Full logits (fp32), labels, loss options, upstream gradient and flags for one case.

    Labels: row i targets a token of shard i mod world (so the hard term reads every shard); rows
    i ≡ 2 (mod 4) are ignored for labels="some" (every shard keeps valid rows)."""
    opts = dict(CASES[name])
    lead = opts.pop("lead", (12,))
    text = opts.pop("text", True)
    label_mode = opts.pop("labels", None)
    flags = dict(group=opts.pop("group", False), strided=opts.pop("strided", False),
                 dtype=torch.bfloat16 if opts.pop("dtype", None) == "bf16" else torch.float32)
    nonfinite = opts.pop("nonfinite", False)
    no_distribution = opts.pop("no_distribution", False)
    saturated = opts.pop("saturated", False)
    g = torch.Generator().manual_seed(1000 + list(CASES).index(name))
    scale = 1e3 if saturated else 3
    s = torch.randn(*lead, V, generator=g) * scale
    a = torch.randn(*lead, V, generator=g) * scale
    t = (0.5 * a + 0.9 * torch.randn(*lead, V, generator=g) * scale) if text else None
    if saturated:
        rows = torch.arange(s.shape[0])
        top = s.argmax(-1)
        s[rows, (top + 17 * (rows + 1)) % V] = s[rows, top] - torch.linspace(2.0, 30.0, s.shape[0])
    if no_distribution:
        s[NO_DISTRIBUTION_ROWS[0]] = -INF
        a[NO_DISTRIBUTION_ROWS[1]] = -INF
        t[NO_DISTRIBUTION_ROWS[1]] = -INF
    labels = None
    n = math.prod(lead)
    if label_mode is not None:
        ign = opts.get("ignore_index", -100)
        world = len(splits)
        flat = torch.empty(n, dtype=torch.long)
        for i in range(n):
            lo, hi = shard_bounds(splits, i % world)
            flat[i] = int(torch.randint(lo, hi, (1,), generator=g))
        if label_mode == "some":
            flat[torch.arange(n) % 4 == 2] = ign
        elif label_mode == "none_valid":
            flat[:] = ign
        labels = flat.reshape(lead)
    if opts.get("num_items_in_batch") == "tensor":
        opts["num_items_in_batch"] = torch.tensor(9)
    upstream = (torch.rand(n, generator=g) * 2 - 0.5) if opts.get("reduction") == "none" else 1.3
    if nonfinite:
        # NaN in the student's last column (last shard) of row 3, +inf in the audio logits' first column
        # (first shard) of row 5, NaN in an ignored row (2), and padding: the last 6 columns are −inf in
        # both teacher paths (probability 0, never −inf + inf = NaN).
        s[3, V - 1] = float("nan")
        a[5, 0] = INF
        s[NAN_IGNORED_ROW, 10] = float("nan")
        a[:, V - 6:] = -INF
        t[:, V - 6:] = -INF
        assert labels[NAN_IGNORED_ROW] == opts.get("ignore_index", -100)
        labels[labels >= V - 6] = V - 7  # keep the Pseudo-GT tokens off the padding
    if flags["dtype"] != torch.float32:  # low-precision shards: round once; the oracle sees the same values
        s, a = s.to(flags["dtype"]), a.to(flags["dtype"])
        t = t.to(flags["dtype"]) if t is not None else None
    return s, a, t, labels, opts, upstream, flags


# ============================================================================================
# The ranks.


def _worker(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    from caad_kernels import vocab_parallel_contrastive_kd_loss

    splits = SPLITS[world_size]
    lo, hi = shard_bounds(splits, rank)
    results = {}
    for name in CASES:
        try:
            s, a, t, labels, opts, upstream, flags = make_case(name, splits)
            if flags["group"]:
                opts["group"] = dist.new_group(list(range(world_size)))
            if flags["strided"]:  # non-contiguous views of the full tensors
                a_sh, t_sh = a[..., lo:hi], t[..., lo:hi]
            else:
                a_sh = a[..., lo:hi].contiguous()
                t_sh = t[..., lo:hi].contiguous() if t is not None else None
            s_sh = s[..., lo:hi].clone().requires_grad_(True)
            loss = vocab_parallel_contrastive_kd_loss(s_sh, a_sh, t_sh, labels, **opts)
            if loss.dim() == 0:
                objective = loss * upstream
            else:
                objective = (loss * upstream.to(loss)).sum()
            objective.backward()
            results[name] = dict(loss=loss.detach().clone(), grad=s_sh.grad)
        except Exception:  # recorded; the parent fails this case
            results[name] = dict(error=traceback.format_exc())
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


_RESULTS: dict = {}


def _results(world_size, tmp_path_factory):
    """Spawn the ranks once per world size; return [per-rank result dicts]."""
    if world_size not in _RESULTS:
        d = tmp_path_factory.mktemp(f"vp{world_size}")
        try:
            mp.spawn(_worker, args=(world_size, str(d / "rendezvous"), str(d)), nprocs=world_size, join=True)
            _RESULTS[world_size] = [torch.load(d / f"rank{r}.pt") for r in range(world_size)]
        except Exception:  # a crash outside the per-case try (e.g. init) fails every test of this size
            _RESULTS[world_size] = traceback.format_exc()
    res = _RESULTS[world_size]
    if isinstance(res, str):
        pytest.fail(f"ranks failed:\n{res}")
    return res


# ============================================================================================
# Tests (in the parent).


def _fp32_slack(expected, baseline):
    """4× the error of the same formula computed in plain fp32 on the full logits (an fp32 implementation
    cannot beat the rounding of fp32 logits; ~1e-7 almost always). Non-finite entries give no slack."""
    err = (baseline.double() - expected).abs()
    err = err[torch.isfinite(err)]
    return 4.0 * float(err.max()) if err.numel() else 0.0


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("world_size", [2, 3])
def test_matches_unsharded_oracle(world_size, name, tmp_path_factory):
    ranks = _results(world_size, tmp_path_factory)
    splits = SPLITS[world_size]
    errors = [f"rank {r}:\n{res[name]['error']}" for r, res in enumerate(ranks) if "error" in res[name]]
    assert not errors, "\n".join(errors)
    s, a, t, labels, opts, upstream, flags = make_case(name, splits)
    exp_loss, exp_grad = oracle(s, a, t, labels, upstream=upstream, **opts)
    f32_loss, f32_grad = oracle(s, a, t, labels, upstream=upstream, dtype=torch.float32, **opts)
    lead = s.shape[:-1]
    low = flags["dtype"] != torch.float32
    # 3. every rank returns the same loss (bitwise, NaN rows included)
    loss0 = ranks[0][name]["loss"]
    for r, res in enumerate(ranks):
        assert torch.equal(res[name]["loss"].nan_to_num(7.0), loss0.nan_to_num(7.0)), \
            f"rank {r} returned {res[name]['loss']}, rank 0 {loss0}"
    # 1. the loss equals the unsharded loss (SPEC §4: fp32 rtol 1e-5 / atol 1e-6 against float64;
    #    low-precision inputs rtol 2e-3 against the reference of the same, upcast, values)
    assert loss0.dtype == torch.float32
    assert loss0.shape == ((math.prod(lead),) if opts.get("reduction") == "none" else ())
    rtol, atol = (2e-3, 1e-5) if low else (1e-5, 1e-6 + _fp32_slack(exp_loss, f32_loss))
    torch.testing.assert_close(loss0.double(), exp_loss, rtol=rtol, atol=atol, equal_nan=True)
    # 2. each rank's gradient is its columns of the unsharded gradient (rows whose loss is NaN excluded:
    #    SPEC §3 says nothing about their gradient)
    finite_rows = torch.isfinite(exp_grad).all(-1)
    if exp_loss.dim() == 1:
        finite_rows = finite_rows & torch.isfinite(exp_loss).reshape(lead)
    if low:  # fp32 math on exact inputs, then one rounding of the stored gradient (+ cancellation in q − p)
        rtol, atol = 2e-3 + torch.finfo(flags["dtype"]).eps / 2, 1e-4 * float(exp_grad.abs().max())
    elif name.startswith("saturated"):  # plain fp32 cancels at the argmax (slack ~1e-4): SPEC's bound, no slack
        rtol, atol = 1e-5, 1e-6
    else:
        rtol, atol = 1e-5, 1e-6 + _fp32_slack(exp_grad[finite_rows], f32_grad[finite_rows])
    for r, res in enumerate(ranks):
        lo, hi = shard_bounds(splits, r)
        g = res[name]["grad"]
        assert g is not None, f"rank {r}: no gradient"
        assert g.shape == (*lead, hi - lo) and g.dtype == s.dtype, (r, g.shape, g.dtype)
        torch.testing.assert_close(g.double()[finite_rows], exp_grad[..., lo:hi][finite_rows], rtol=rtol,
                                   atol=atol, msg=lambda m, r=r: f"rank {r} gradient shard: {m}")
    if name == "all_ignored":
        assert loss0.item() == 0.0
        assert all((res[name]["grad"] == 0).all() for res in ranks)
    if name.startswith("no_distribution"):
        assert loss0[list(NO_DISTRIBUTION_ROWS)].isnan().all(), loss0
        assert int(torch.isfinite(loss0).sum()) == loss0.numel() - len(NO_DISTRIBUTION_ROWS), loss0
    if name.startswith("saturated"):  # each row's gradient, summed over all shards, is 0
        total = sum(res[name]["grad"].double().sum(-1) for res in ranks)
        assert float(total.abs().max()) <= 1e-6, total
    if name == "non_finite":
        assert loss0[list(NAN_ROWS)].isnan().all(), loss0
        assert loss0[NAN_IGNORED_ROW] == 0
        assert int(finite_rows.sum()) == loss0.numel() - len(NAN_ROWS)  # all other rows compared above


@pytest.mark.parametrize("world_size", [2, 3])
def test_cases_can_fail(world_size):
    """The data make the checks discriminating: masking with each shard's local max of the audio logits
    (instead of the global max) changes the loss, and the hard term's labels fall in every shard."""
    splits = SPLITS[world_size]

    def keep_local(a, beta):
        keep = torch.empty_like(a, dtype=torch.bool)
        for r in range(world_size):
            lo, hi = shard_bounds(splits, r)
            keep[:, lo:hi] = a[:, lo:hi] >= a[:, lo:hi].max(-1, keepdim=True).values + math.log(beta)
        return keep

    for name in PLAUSIBILITY_CASES:
        s, a, t, labels, opts, upstream, _ = make_case(name, splits)
        good, _ = oracle(s, a, t, labels, upstream=upstream, **opts)
        wrong, _ = oracle(s, a, t, labels, upstream=upstream, keep_fn=keep_local, **opts)
        # far outside the test's tolerance (rtol 1e-5, atol 1e-6)
        assert ((good - wrong).abs() - 100 * (1e-5 * good.abs() + 1e-6)).max() > 0, name
    for name in HARD_CASES:
        _, _, _, labels, opts, _, _ = make_case(name, splits)
        y = labels.reshape(-1)
        y = y[y != opts.get("ignore_index", -100)]
        for r in range(world_size):
            lo, hi = shard_bounds(splits, r)
            assert ((y >= lo) & (y < hi)).any(), (name, r)


def test_oracle_against_autograd_closed_form():
    """The oracle's forward-KL + hard-term gradient is SPEC §2's closed form (guards the yardstick)."""
    g = torch.Generator().manual_seed(5)
    s, a, t = (torch.randn(6, 13, generator=g, dtype=torch.float64) * 2 for _ in range(3))
    y = torch.tensor([0, 3, -100, 12, 5, -100])
    loss, grad = oracle(s, a, t, y, alpha=0.5, temperature=1.5, soft_weight=0.8, hard_weight=0.3, reduction="sum")
    v = y >= 0
    p = torch.softmax((1.5 * a - 0.5 * t) / 1.5, -1)
    q = torch.softmax(s / 1.5, -1)
    onehot = torch.nn.functional.one_hot(y.clamp(min=0), 13).double()
    exp = 0.8 * (q - p) / 1.5 + 0.3 * (torch.softmax(s, -1) - onehot)
    torch.testing.assert_close(grad, torch.where(v[:, None], exp, torch.zeros_like(exp)))
    kl = (p * (p.log() - q.log())).sum(-1)
    ce = -torch.log_softmax(s, -1).gather(-1, y.clamp(min=0)[:, None])[:, 0]
    torch.testing.assert_close(loss, ((0.8 * kl + 0.3 * ce) * v).sum())
    # jsd(0) is forward KL and jsd(1) reverse KL exactly (TRL convention)
    fwd = oracle(s, a, None, None, alpha=0.0)[0]
    assert torch.equal(oracle(s, a, None, None, alpha=0.0, divergence="jsd", jsd_beta=0.0)[0], fwd)
    rev = oracle(s, a, None, None, alpha=0.0, divergence="reverse_kl")[0]
    assert torch.equal(oracle(s, a, None, None, alpha=0.0, divergence="jsd", jsd_beta=1.0)[0], rev)
