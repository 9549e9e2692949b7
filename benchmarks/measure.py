"""Measurements shared by the benchmark suites: inputs, bandwidth roofline, peak extra memory.

Peak extra memory is what a call allocates beyond its live inputs:
  * GPU: ``torch.cuda.max_memory_allocated`` after a reset, minus what was allocated before;
  * CPU: torch has no CPU allocator statistics, and glibc's malloc reuses freed pages, so
    the peak is taken in a fresh subprocess (``python -m benchmarks.measure``) with malloc's
    mmap threshold pinned low: every large buffer is then mapped on allocation and
    unmapped on free, and the rise of the resident-set high-water mark (``VmHWM``, reset
    through ``/proc/self/clear_refs``) is the allocations' peak.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def make_inputs(n: int, vocab: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Student/teacher logits ``[n, vocab]`` at a realistic scale, labels with 1 in 16 ignored."""
    g = torch.Generator(device=device).manual_seed(seed)
    s = (torch.randn(n, vocab, generator=g, device=device) * 2).to(dtype)
    a = (torch.randn(n, vocab, generator=g, device=device) * 2).to(dtype)
    t = (torch.randn(n, vocab, generator=g, device=device) * 2).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=g, device=device)
    labels[::16] = -100
    return s, a, t, labels


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device (GPU: median of 10) or STREAM-like (CPU: best of 10, all threads) copy bandwidth in
    bytes/s, read + write counted. The CPU takes the best round: on a shared machine the others measure the
    neighbours, and a floor should be the machine's."""
    if device.type == "cpu":
        nbytes = min(nbytes, 1 << 28)
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x)
    times = []
    for _ in range(12):
        sync(device)
        start = time.perf_counter()
        y.copy_(x)
        sync(device)
        times.append(time.perf_counter() - start)
    times = sorted(times[2:])
    best = times[0] if device.type == "cpu" else times[len(times) // 2]
    return 2 * nbytes / best


def cpu_transcendental_rate(op: str = "exp", numel: int = 1 << 14, repeats: int = 200) -> float:
    """One core's throughput of torch's vectorised ``exp`` or ``log`` (values/s, best of 5) on an
    L2-resident fp32 buffer: the compute side of the CPU roofline (the loss needs two exps per entry)."""
    fn = {"exp": torch.exp, "log": torch.log}[op]
    x = torch.rand(numel) * -20.0 if op == "exp" else torch.rand(numel) + 0.5
    out = torch.empty_like(x)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(repeats):
                fn(x, out=out)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return numel * repeats / best


def first_touch(nbytes: int = 1 << 28) -> tuple[float, bool]:
    """What a new ``nbytes`` allocation costs before it can be written, as this process's allocator serves it:
    ``(bytes/s, pages reused)``. Each of 5 rounds allocates a buffer and zeroes it twice with all threads; the first
    zeroing pays the page faults of fresh memory, the second does not, and their difference (best of the rounds) is
    the first-touch cost. An ``[N, V]`` output larger than glibc's mmap threshold (32 MiB at most) is fresh memory
    on every call (freed by munmap, mapped again by the next call); with the threshold raised
    (``MALLOC_MMAP_THRESHOLD_``, and ``MALLOC_TRIM_THRESHOLD_`` so the heap is not trimmed) a freed buffer's pages
    are reused, which the rounds after the first see. "Pages reused": the first touch costs under a tenth of a
    plain zeroing; the rate is then infinite."""
    fresh, touched = [], []
    for _ in range(5):
        x = torch.empty(nbytes // 4, dtype=torch.float32)
        for times in (fresh, touched):
            start = time.perf_counter()
            x.zero_()
            times.append(time.perf_counter() - start)
        del x
    cost = min(fresh) - min(touched)
    if cost < 0.1 * min(touched):
        return float("inf"), True
    return nbytes / cost, False


@dataclass(frozen=True)
class CpuRoofline:
    """The CPU machine limits measured in the benchmark's own process."""

    copy_bytes_per_s: float  # all threads
    exp_per_s_per_core: float
    log_per_s_per_core: float
    cores: int  # torch threads
    first_touch_bytes_per_s: float = float("inf")  # fresh memory made usable, all threads (first_touch)
    pages_reused: bool = False  # first_touch(): a new buffer's pages were reused, not fresh

    def first_touch_s(self, n: int, vocab: int, dtype: torch.dtype) -> float:
        """First-touch time of one new ``[N, V]`` output of ``dtype`` (grad_s, which every contender allocates);
        0 when the allocator reuses pages."""
        return n * vocab * torch.empty((), dtype=dtype).element_size() / self.first_touch_bytes_per_s

    def memory_floor_s(self, n: int, vocab: int, dtype: torch.dtype, backward: bool) -> float:
        return roofline_bytes(n, vocab, dtype, backward) / self.copy_bytes_per_s

    def exp_floor_s(self, n: int, vocab: int) -> float:
        """Two exps per entry (softmax of s and of z), on every core: no kernel computes fewer."""
        return 2 * n * vocab / (self.exp_per_s_per_core * self.cores)


def cpu_roofline() -> CpuRoofline:
    return CpuRoofline(copy_bandwidth(torch.device("cpu")), cpu_transcendental_rate("exp"),
                       cpu_transcendental_rate("log"), torch.get_num_threads(), *first_touch())


def roofline_bytes(n: int, vocab: int, dtype: torch.dtype, backward: bool) -> int:
    """Bytes a perfect fused kernel moves: read a, t, s once; write grad_s once (fwd+bwd)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return n * vocab * elem * (4 if backward else 3)


def gpu_peak_extra(fn) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def cpu_peak_extra_subprocess(contender: str, n: int, vocab: int, dtype: str, backward: bool) -> int | None:
    """Peak extra bytes of one call, measured in a fresh process (None where that cannot be done)."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    cmd = [sys.executable, "-m", "benchmarks.measure", "--contender", contender, "--n", str(n), "--vocab",
           str(vocab), "--dtype", dtype] + (["--backward"] if backward else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise RuntimeError(f"peak-memory subprocess failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


def _pin_malloc_mmap_threshold() -> None:
    libc = ctypes.CDLL("libc.so.6")
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 1 << 16)


def _main() -> None:
    from benchmarks.implementations import CONTENDERS

    parser = argparse.ArgumentParser(description="peak extra CPU memory of one loss call (internal)")
    parser.add_argument("--contender", required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--vocab", type=int, required=True)
    parser.add_argument("--dtype", required=True)
    parser.add_argument("--backward", action="store_true")
    args = parser.parse_args()
    _pin_malloc_mmap_threshold()
    device = torch.device("cpu")
    fn = next(c for c in CONTENDERS if c.name == args.contender).make(device)
    dtype = getattr(torch, args.dtype)
    # Warm up on a tiny problem (JIT builds, compile caches) so only the real call is measured.
    tiny = make_inputs(4, 64, dtype, device)
    warm = tiny[0].clone().requires_grad_(args.backward)
    loss = fn(warm, *tiny[1:])
    if args.backward:
        loss.backward()
    s, a, t, labels = make_inputs(args.n, args.vocab, dtype, device)
    s.requires_grad_(args.backward)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    base = _status_bytes("VmRSS:")
    loss = fn(s, a, t, labels)
    if args.backward:
        loss.backward()
    peak = _status_bytes("VmHWM:") - base
    print(json.dumps({"peak_extra_bytes": peak}))


if __name__ == "__main__":
    _main()
