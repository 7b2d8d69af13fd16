"""What this machine can do: the float32 matmul rate and the memory read bandwidth that step times are
measured against (the demo prints the first; the benchmarks put their steps on both), and the rate at which
the kernel hands a process fresh memory, which decides what a freshly allocated large buffer costs.

Two float32 products are at hand on the CPU: torch's (MKL's BLAS) and oneDNN's. Which is faster depends on the
CPU: on one AMD EPYC VM (Zen 5, 2 cores) MKL multiplied at 203 GFLOP/s and oneDNN at 417 (MKL takes its AVX2 path
there; oneDNN its AVX-512 one). ``onednn_faster`` times them once per process for the callers that can take either.
"""

from __future__ import annotations

import functools
import os
import threading
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


def onednn_gflop_s(now=time.perf_counter) -> float:
    """GFLOP/s of oneDNN's 2048 x 2048 float32 product on torch's current threads (best of 5); 0 without oneDNN."""
    import torch

    if not has_onednn():
        return 0.0
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return 2 * 2048**3 / _best(lambda: onednn_linear(a, b), now) / 1e9


# oneDNN keeps each product it builds (a JIT kernel and its buffers: about 0.56 MiB per shape, over two caches,
# ideep's and its own, of 1024 entries each). A run whose padded lengths change every step builds 15-30 new products
# a step: on benchmarks/e2e_vs_trl.py's run the heap grew by about 5 MiB a step and the peak by 60 MiB over 12 steps,
# toward several hundred MiB on a long run. A step uses fewer shapes than the bound (each layer's few weight shapes,
# forward and gradients: 14-16 builds a step off-policy on that run, 21 on-policy, by ONEDNN_VERBOSE=profile_create),
# so nothing is built twice within a step; a length that returns after its eviction is built again (with 1024
# entries that run built 0-16 a step, as its lengths recur: about 0.6 ms each).
ONEDNN_CACHE_CAPACITY = 32


def bound_onednn_caches() -> None:
    """Bound oneDNN's caches to ``ONEDNN_CACHE_CAPACITY`` (a value the user set stays). Each cache reads its size once,
    at the process's first oneDNN operation of any kind (torch's own too: a bfloat16 linear, a convolution), so the
    CLI calls this before torch is imported, and ``has_onednn`` before gkd's first product for library use."""
    for name in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY"):
        os.environ.setdefault(name, str(ONEDNN_CACHE_CAPACITY))


@functools.cache
def has_onednn() -> bool:
    """Whether oneDNN's product is at hand (and, first, ``bound_onednn_caches``)."""
    import torch

    bound_onednn_caches()
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def onednn_takes(x, w) -> bool:
    """Whether ``onednn_linear`` computes ``x @ w.T`` for these tensors: float32, on the CPU, plain (not DTensors:
    tensor parallel's layers keep F.linear), with rows."""
    import torch

    return (x.dtype == w.dtype == torch.float32 and x.device.type == w.device.type == "cpu" and x.numel() > 0
            and not isinstance(x, _dtensor()) and not isinstance(w, _dtensor()))


def onednn_linear(x, w, b=None):
    """``x @ w.T + b`` by oneDNN's float32 product (the one torch.compile's CPU backend calls for a linear layer),
    on the plain weight; no autograd."""
    import torch

    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


# a transpose of up to this many bytes for oneDNN's product goes into one buffer each thread keeps (transposed_rows)
SCRATCH_BYTES = 16 << 20
_scratch = threading.local()


def transposed_rows(g, room=None):
    """``g.T`` laid out row by row, as oneDNN's product takes its rows (a weight gradient's ``g.T @ x``): in ``room``'s
    storage where it has the room (a dead contiguous buffer of g's dtype and device, already in memory), else up to
    SCRATCH_BYTES in a buffer this thread keeps, else a copy of its own. A fresh copy above the heap's mmap threshold
    (gkd.train.malloc) is fresh pages each time: a 15-layer SmolLM2 student's weight gradients made 127 MB of them a
    step at 412 positions, and their 105 products took 218 ms against 177 in one buffer (AMD VM). Valid only until
    the next call on this thread: the caller's product reads it at once."""
    n = g.numel()
    if room is not None and room.dtype == g.dtype and room.device == g.device and room.is_contiguous() \
            and room.numel() >= n:
        buf = room.view(-1)
    elif n * g.element_size() <= SCRATCH_BYTES and g.device.type == "cpu":
        buf = getattr(_scratch, "buf", None)
        if buf is None or buf.numel() < n or buf.dtype != g.dtype:
            buf = _scratch.buf = g.new_empty(n)
    else:
        return g.T.contiguous()
    return buf[:n].view(g.shape[1], g.shape[0]).copy_(g.T)


_settled: list[bool] = []  # the choice every process of a run agreed on (settle_onednn), if any


PRODUCT_VARIABLE = "GKD_CPU_PRODUCT"  # auto (the default), torch or onednn


def pinned_product() -> str | None:
    """The float32 product the environment pins (``GKD_CPU_PRODUCT``: torch or onednn), None for auto: runs meant
    to compare bit for bit pin one, since each process otherwise times the two, and a busy machine can time them
    otherwise."""
    value = os.environ.get(PRODUCT_VARIABLE, "auto").strip().lower()
    if value not in ("auto", "torch", "onednn"):
        from gkd.errors import GKDError

        raise GKDError(f"{PRODUCT_VARIABLE}={os.environ[PRODUCT_VARIABLE]!r}: choose auto, torch or onednn")
    return None if value == "auto" else value


def onednn_faster() -> bool:
    """Whether the CPU's float32 products are oneDNN's: what ``settle_onednn`` set; else the product
    ``GKD_CPU_PRODUCT`` pins (oneDNN only where torch has it); else whether oneDNN's beats torch's by a clear margin
    (1.25x) on this machine and thread count, timed once per process at [256, 1024] x [1024, 1024], the two
    alternating, best of 3 each."""
    import torch

    if _settled:
        return _settled[-1]
    pinned = pinned_product()
    if pinned is not None:
        return pinned == "onednn" and has_onednn()
    return _onednn_faster(torch.get_num_threads())


def settle_onednn(use: bool) -> None:
    """From now on ``onednn_faster()`` is ``use`` in this process (a run's processes agree on one product)."""
    _settled[:] = [bool(use)]


@functools.cache
def _onednn_faster(threads: int) -> bool:
    import torch

    if not has_onednn():
        return False
    seeded = torch.Generator().manual_seed(0)  # (not the global generator: a run's draws stay its own)
    x, w = torch.randn(256, 1024, generator=seeded), torch.randn(1024, 1024, generator=seeded)
    ours, theirs = lambda: onednn_linear(x, w), lambda: x @ w.T  # noqa: E731
    ours(), theirs()  # warm-up
    best = [float("inf"), float("inf")]
    for _ in range(3):
        for i, f in enumerate((ours, theirs)):
            t0 = time.perf_counter()
            f()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best[0] * 1.25 < best[1]


def training_gflop_s(now=time.perf_counter) -> float:
    """GFLOP/s of the float32 product a CPU run trains with here: oneDNN's where ``onednn_faster`` picks it
    (gkd.models.onednn), torch's otherwise."""
    return onednn_gflop_s(now) if onednn_faster() else matmul_gflop_s(now)


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
