"""Fused-linear contrastive KD (no [N, V] logits) against the materialised eager version and Liger.

    pytest benchmarks/bench_fused_linear.py --benchmark-only --benchmark-json=fl.json
    python -m benchmarks.report fl.json --out benchmarks/results/fused_linear

Loss as ANCHORS.md: α = 1, τ = 1, forward KL, mean over valid tokens, gradients to the
student hidden states and head. Liger's ``LigerFusedLinearJSD(jsd_beta=0)`` (CUDA only)
gets the contrast done in hidden space, ``(1+α)h_a − αh_t``, which is exact with a shared
teacher head. Figures in ``extra_info``; nothing asserts a speed.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from benchmarks.measure import gpu_peak_extra, sync
from caad_kernels import contrastive_kd_reference, fused_linear_contrastive_kd_loss

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cuda":
    SHAPES = [(8192, 151936, 896, 3584), (4096, 151936, 896, 3584)]  # N, V, Hs, Ht (Qwen2.5-0.5B / 7B heads)
    DTYPE = torch.bfloat16
else:
    SHAPES = [(4096, 32000, 256, 256)]  # the CPU target case
    DTYPE = torch.float32
SMOKE = [(64, 500, 32, 48)]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        shapes = SMOKE if metafunc.config.getoption("benchmark_disable") else SHAPES
        metafunc.parametrize("case", shapes, ids=[f"N{n}-V{v}-Hs{hs}-Ht{ht}" for n, v, hs, ht in shapes])


def _inputs(n, vocab, h_s, h_t):
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=DEVICE) * scale).to(DTYPE)

    hs, ws = r(n, h_s), r(vocab, h_s, scale=h_s**-0.5 * 2)
    ha, ht, wt = r(n, h_t), r(n, h_t), r(vocab, h_t, scale=h_t**-0.5 * 2)
    labels = torch.randint(0, vocab, (n,), generator=g, device=DEVICE)
    labels[::16] = -100
    return hs, ws, ha, ht, wt, labels


def _ours(hs, ws, ha, ht, wt, labels):
    return fused_linear_contrastive_kd_loss(hs, ws, ha, ht, wt, labels, alpha=1.0)


def _eager(hs, ws, ha, ht, wt, labels):
    with torch.no_grad():
        a, t = ha @ wt.t(), ht @ wt.t()
    return contrastive_kd_reference(hs @ ws.t(), a, t, labels, alpha=1.0)


def _liger():
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel not installed"
    if DEVICE.type != "cuda":
        return "Liger's Triton kernels need CUDA"
    from liger_kernel.transformers import LigerFusedLinearJSD

    jsd = LigerFusedLinearJSD(jsd_beta=0.0)

    def fn(hs, ws, ha, ht, wt, labels):
        return jsd(hs, ws, (2.0 * ha.float() - ht.float()).to(ha.dtype), wt, labels)

    return fn


CONTENDERS = {
    "caad-fused-linear": lambda: _ours,
    "eager-materialised": lambda: _eager,
    "liger-fused-linear-jsd": _liger,
}


@pytest.mark.parametrize("name", list(CONTENDERS))
def test_fused_linear_fwd_bwd(benchmark, name, case, request):
    fn = CONTENDERS[name]()
    if isinstance(fn, str):
        pytest.skip(fn)
    smoke = request.config.getoption("benchmark_disable")
    n, vocab, h_s, h_t = case
    hs0, ws0, ha, ht, wt, labels = _inputs(n, vocab, h_s, h_t)
    reference = _eager(hs0.double(), ws0.double(), ha.double(), ht.double(), wt.double(), labels).item()
    value = fn(hs0, ws0, ha, ht, wt, labels).item()
    rel = abs(value - reference) / abs(reference)
    benchmark.extra_info.update(contender=name, kind="ours" if name.startswith("caad") else "peer", n=n, vocab=vocab,
                                hidden_student=h_s, hidden_teacher=h_t, dtype=str(DTYPE).removeprefix("torch."),
                                mode="fwd+bwd", device=torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
                                loss=value, reference_loss=reference, loss_rel_error=rel)
    if rel > (2e-2 if DTYPE != torch.float32 else 1e-4):
        pytest.skip(f"{name} computes another loss here (rel. error {rel:.2e})")

    def setup():
        return (hs0.detach().clone().requires_grad_(), ws0.detach().clone().requires_grad_()), {}

    def run(hs, ws):
        fn(hs, ws, ha, ht, wt, labels).backward()
        sync(DEVICE)

    benchmark.pedantic(run, setup=setup, rounds=1 if smoke else 5, warmup_rounds=0 if smoke else 1, iterations=1)
    if smoke:
        return
    median = benchmark.stats.stats.median
    # FLOP floor: one teacher GEMM (hidden-space contrast) + student forward, dgrad and wgrad.
    flops = 2 * n * vocab * (h_t + 3 * h_s)
    benchmark.extra_info.update(tflop_per_s=flops / median / 1e12, tokens_per_s=n / median)
    if DEVICE.type == "cuda":
        args = setup()[0]
        benchmark.extra_info["peak_extra_bytes"] = gpu_peak_extra(lambda: run(*args))
    else:
        benchmark.extra_info["peak_extra_bytes"] = _cpu_peak(name, case)


def _cpu_peak(name: str, case) -> int | None:
    """Peak extra memory of one call in a fresh process (see benchmarks/measure.py)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    if not Path("/proc/self/clear_refs").exists():
        return None
    root = Path(__file__).resolve().parents[1]
    code = f"""
import ctypes, json, torch
ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)
from benchmarks.bench_fused_linear import CONTENDERS, _inputs
from benchmarks.measure import _status_bytes
fn = CONTENDERS[{name!r}]()
tiny = _inputs(8, 64, 8, 8); fn(tiny[0].requires_grad_(), *tiny[1:]).backward()
hs, ws, ha, ht, wt, labels = _inputs(*{tuple(case)!r})
hs.requires_grad_(); ws.requires_grad_()
open("/proc/self/clear_refs", "w").write("5")
base = _status_bytes("VmRSS:")
fn(hs, ws, ha, ht, wt, labels).backward()
print(json.dumps({{"peak_extra_bytes": _status_bytes("VmHWM:") - base}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=1800,
                          env={**os.environ, "PYTHONPATH": str(root)})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_extra_bytes"]
