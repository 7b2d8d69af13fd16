"""What this machine can do: the float32 matmul rate and the memory read bandwidth that step times are
measured against (the demo prints the first; the benchmarks put their steps on both), and the rate at which
the kernel hands a process fresh memory, which decides what a freshly allocated large buffer costs."""

from __future__ import annotations

import time


def _best(f, now, n: int = 5) -> float:
    f()  # warm-up
    times = []
    for _ in range(n):
        t0 = now()
        f()
        times.append(now() - t0)
    return min(times)


def matmul_gflop_s(now=time.perf_counter) -> float:
    """GFLOP/s of a 2048 x 2048 float32 matmul on torch's current threads (best of 5)."""
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return 2 * 2048**3 / _best(lambda: a @ b, now) / 1e9


def read_gb_s(now=time.perf_counter) -> float:
    """GB/s of summing 1 GiB of float32 (beyond the caches) on torch's current threads (best of 5)."""
    import torch

    big = torch.ones(2**28)
    return big.numel() * 4 / _best(lambda: big.sum(), now) / 1e9


def fresh_gb_s(now=time.perf_counter) -> float:
    """GB/s of writing 256 MiB of memory the process has never touched (a new allocation each time, larger
    than any malloc threshold, so it comes from mmap): the kernel faults in and zeroes every page on first
    touch, at a rate that differs between machines far more than the read bandwidth does (best of 5)."""
    import torch

    n = 2**26
    return n * 4 / _best(lambda: torch.empty(n).fill_(1.0), now) / 1e9
