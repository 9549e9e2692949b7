"""Throughput and memory of the contrastive KD loss: our backends against the peers, one run.

    pytest benchmarks/ --benchmark-only --benchmark-json=bench.json   # measure
    python -m benchmarks.report bench.json                            # Markdown table + plots
    pytest benchmarks/ --benchmark-disable                            # quick correctness smoke (CI)

Shapes follow the device (CPU set here, GPU set on CUDA). Each case first checks that the
contender's loss agrees with the float64-accumulated reference on the same inputs; a peer that
computes something else is recorded as such, not timed against us. Figures go to
``extra_info``: tokens/s, effective GB/s, % of the bandwidth roofline measured in the same
run, on the CPU the time as a multiple of the memory floor and of the exp floor (both measured
in the same process, see ``benchmarks.measure.CpuRoofline``), peak extra memory, loss agreement.
Nothing here asserts a speed. ``python -m benchmarks.headline`` times the headline CPU case with
interleaved rounds (the ratio to trust on a shared machine).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.implementations import ALPHA, CONTENDERS
from benchmarks.measure import (
    cpu_peak_extra_subprocess,
    gpu_peak_extra,
    make_inputs,
    roofline_bytes,
    sync,
)
from caad_kernels import contrastive_kd_loss

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cuda":
    SHAPES = [(n, v) for n in (4096, 8192, 16384) for v in (32000, 128256, 151936, 262144)]
    DTYPES = [torch.bfloat16]
    MATERIALISE_LIMIT = 16384 * 151936  # entries: peers' fp32 temporaries beyond this exceed 80 GB
else:
    SHAPES = [(512, 32000), (2048, 32000), (512, 151936), (2048, 151936)]
    DTYPES = [torch.float32, torch.bfloat16]
    MATERIALISE_LIMIT = 2048 * 32000  # eager needs ~11 fp32 copies of [N, V]: keep it within 24 GiB
SMOKE_SHAPES = [(64, 1000)]


def _shapes(config) -> list[tuple[int, int]]:
    return SMOKE_SHAPES if config.getoption("benchmark_disable") else SHAPES


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        shapes = _shapes(metafunc.config)
        metafunc.parametrize("shape", shapes, ids=[f"N{n}-V{v}" for n, v in shapes])


def _reference_loss(s, a, t, labels) -> float:
    """The same loss accumulated in float64 (torch backend) as the agreement check."""
    return contrastive_kd_loss(s.double(), a.double(), t.double(), labels, alpha=ALPHA, backend="torch").item()


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("contender", CONTENDERS, ids=lambda c: c.name)
def test_contrastive_kd(benchmark, contender, dtype, shape, mode, request, copy_bandwidth_bytes_per_s,
                        cpu_roofline_limits):
    n, vocab = shape
    smoke = request.config.getoption("benchmark_disable")
    if contender.materialises and n * vocab > MATERIALISE_LIMIT and not smoke:
        pytest.skip(f"{contender.name} materialises several fp32 [N, V] tensors: too large here")
    fn = contender.make(DEVICE)
    if isinstance(fn, str):
        pytest.skip(fn)
    backward = mode == "fwd+bwd"
    s0, a, t, labels = make_inputs(n, vocab, dtype, DEVICE)

    # Same math first: the contender's loss against a float64-accumulated reference.
    reference = _reference_loss(s0, a, t, labels)
    value = fn(s0, a, t, labels).item()
    rel_error = abs(value - reference) / max(abs(reference), 1e-12)
    tolerance = 2e-3 if dtype != torch.float32 else 1e-4
    agrees = rel_error <= tolerance
    benchmark.extra_info.update(
        contender=contender.name, kind=contender.kind, device=torch.cuda.get_device_name() if DEVICE.type == "cuda"
        else "cpu", n=n, vocab=vocab, dtype=str(dtype).removeprefix("torch."), mode=mode,
        loss=value, reference_loss=reference, loss_rel_error=rel_error, same_math=agrees,
    )
    if not agrees:
        # Recorded, not timed: the table reports it as computing something else.
        assert smoke is False or contender.kind == "peer", f"{contender.name}: loss {value} vs {reference}"
        pytest.skip(f"{contender.name} computes another loss here (rel. error {rel_error:.2e})")

    def setup():
        s = s0.detach().clone().requires_grad_(backward)
        sync(DEVICE)
        return (s,), {}

    def run(s):
        loss = fn(s, a, t, labels)
        if backward:
            loss.backward()
        sync(DEVICE)

    rounds = 1 if smoke else (10 if DEVICE.type == "cuda" else 3)
    benchmark.pedantic(run, setup=setup, rounds=rounds, warmup_rounds=0 if smoke else 1, iterations=1)
    if smoke:
        return
    median = benchmark.stats.stats.median
    moved = roofline_bytes(n, vocab, dtype, backward)
    roofline_s = moved / copy_bandwidth_bytes_per_s
    benchmark.extra_info.update(
        tokens_per_s=n / median, effective_gb_per_s=moved / median / 1e9, roofline_ms=roofline_s * 1e3,
        percent_of_roofline=100 * roofline_s / median, copy_bandwidth_gb_per_s=copy_bandwidth_bytes_per_s / 1e9,
    )
    if cpu_roofline_limits is not None:
        # The CPU roofline: the memory floor (s, a, t read once, grad_s written once, at the copy bandwidth)
        # and the compute floor (two exps per entry on every core); the larger one bounds the kernel.
        limits = cpu_roofline_limits
        memory_s, exp_s = limits.memory_floor_s(n, vocab, dtype, backward), limits.exp_floor_s(n, vocab)
        benchmark.extra_info.update(
            memory_floor_ms=memory_s * 1e3, exp_floor_ms=exp_s * 1e3, times_memory_floor=median / memory_s,
            times_exp_floor=median / exp_s, floor_bound="memory" if memory_s >= exp_s else "exp",
            exp_per_s_per_core=limits.exp_per_s_per_core, log_per_s_per_core=limits.log_per_s_per_core,
            cores=limits.cores)
    if DEVICE.type == "cuda":
        s = s0.detach().clone().requires_grad_(backward)
        benchmark.extra_info["peak_extra_bytes"] = gpu_peak_extra(lambda: run(s))
    else:
        benchmark.extra_info["peak_extra_bytes"] = cpu_peak_extra_subprocess(
            contender.name, n, vocab, str(dtype).removeprefix("torch."), backward)
