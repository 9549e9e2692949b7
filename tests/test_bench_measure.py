"""benchmarks/measure.py: the CPU roofline the benchmark reports against (floors from measured rates)."""

import torch

from benchmarks.measure import CpuRoofline, cpu_transcendental_rate, roofline_bytes


def test_floors_are_bytes_over_bandwidth_and_exps_over_rate():
    roof = CpuRoofline(copy_bytes_per_s=2e10, exp_per_s_per_core=1e9, log_per_s_per_core=5e8, cores=2)
    # fwd+bwd moves s, a, t in and grad_s out: 16 B per entry in fp32, 8 in bf16.
    assert roofline_bytes(2048, 32000, torch.float32, True) == 2048 * 32000 * 16
    assert roofline_bytes(2048, 32000, torch.bfloat16, True) == 2048 * 32000 * 8
    assert roof.memory_floor_s(2048, 32000, torch.float32, True) == 2048 * 32000 * 16 / 2e10
    assert roof.memory_floor_s(2048, 32000, torch.bfloat16, False) == 2048 * 32000 * 6 / 2e10
    assert roof.exp_floor_s(2048, 32000) == 2 * 2048 * 32000 / 2e9


def test_transcendental_rates_are_measured_on_one_thread():
    threads = torch.get_num_threads()
    exp_rate = cpu_transcendental_rate("exp", numel=1 << 12, repeats=5)
    log_rate = cpu_transcendental_rate("log", numel=1 << 12, repeats=5)
    assert torch.get_num_threads() == threads  # restored
    # Any real CPU does between 1e6 and 1e12 vectorised exps per second per core.
    assert 1e6 < exp_rate < 1e12 and 1e6 < log_rate < 1e12


def test_first_touch_is_grad_bytes_over_rate():
    fresh = CpuRoofline(2e10, 1e9, 5e8, 2, first_touch_bytes_per_s=5e9)
    assert fresh.first_touch_s(2048, 32000, torch.float32) == 2048 * 32000 * 4 / 5e9
    assert fresh.first_touch_s(2048, 32000, torch.bfloat16) == 2048 * 32000 * 2 / 5e9
    reused = CpuRoofline(2e10, 1e9, 5e8, 2, first_touch_bytes_per_s=float("inf"), pages_reused=True)
    assert reused.first_touch_s(2048, 32000, torch.float32) == 0.0


def test_first_touch_measures_fresh_pages_and_sees_reused_ones(monkeypatch):
    """Measured, not read from the environment: a 256 MiB buffer (above glibc's mmap threshold) is fresh memory on
    every allocation by default (its first zeroing pays the page faults); an allocator that hands back the same,
    already touched pages (simulated here: glibc's own reuse under MALLOC_MMAP_THRESHOLD_ is at the mercy of the
    kernel's reclaim of idle memory, DAMON on this VM) is seen as reused, with an infinite rate."""
    from benchmarks import measure

    rate, reused = measure.first_touch()
    assert not reused and 1e7 < rate < 1e12  # fresh pages: between 10 MB/s and 1 TB/s
    kept = torch.zeros((1 << 28) // 4)
    monkeypatch.setattr(measure.torch, "empty", lambda *shape, **kw: kept)
    assert measure.first_touch() == (float("inf"), True)
