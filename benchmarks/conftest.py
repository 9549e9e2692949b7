"""Benchmark session fixtures: the machine's limits are measured once per run, on the device used."""

import pytest
import torch

from benchmarks.measure import CpuRoofline, copy_bandwidth, cpu_transcendental_rate


@pytest.fixture(scope="session")
def copy_bandwidth_bytes_per_s() -> float:
    return copy_bandwidth(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


@pytest.fixture(scope="session")
def cpu_roofline_limits(copy_bandwidth_bytes_per_s) -> CpuRoofline | None:
    """Copy bandwidth and one core's exp/log rates (CPU runs only; None on a GPU)."""
    if torch.cuda.is_available():
        return None
    return CpuRoofline(copy_bandwidth_bytes_per_s, cpu_transcendental_rate("exp"), cpu_transcendental_rate("log"),
                       torch.get_num_threads())
