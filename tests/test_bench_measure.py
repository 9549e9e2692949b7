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
