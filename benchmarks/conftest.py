"""Benchmark session fixtures: the bandwidth roofline is measured once per run, on the device used."""

import pytest
import torch

from benchmarks.measure import copy_bandwidth


@pytest.fixture(scope="session")
def copy_bandwidth_bytes_per_s() -> float:
    return copy_bandwidth(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
