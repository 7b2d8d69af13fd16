"""Keep a CPU training process's resident memory flat across steps.

glibc serves allocations below its mmap threshold from the heap, and that threshold grows to 32 MiB
as large blocks are freed. A training step frees and re-allocates hundreds of activation and gradient
buffers of 0.1-30 MiB in shifting sizes, so the heap fragments and keeps freed memory: measured on the
SmolLM2 teacher -> pruned student benchmark, peak RSS grew by ~170 MiB over the first steps. Pinning the
threshold sends the large buffers to mmap, which gives them back on free.

Memory from mmap is new each time, and the kernel faults in and zeroes every page of it on first touch
(a fresh 113 MB buffer took 45 ms against 11 ms to refill a resident one). So the threshold sits at 1 MiB,
above the many ~0.9 MiB activations of a small model's step, which the heap then reuses: on that benchmark
(off-policy, 2026-12-05) a step took 1.53-1.58 s against 1.87-2.05 s at 512 KiB, for a peak RSS ~100 MiB
(4 %) higher; at 4 MiB or more the heap's fragmentation added 160-190 MiB.

The heap still keeps the pages of the small activations a forward frees (the teacher's, or the student's as the
backward goes), in holes between live blocks, while the gradients that follow come from mmap. So a step releases
the heap's free pages twice per micro-batch, before the loss and before the backward (``release_free_heap``; not
in a pipeline's schedule, which interleaves micro-batches): on that benchmark (2026-12-06, an AMD EPYC VM) the peak
fell by 45-80 MiB, to 1.09-1.10x the floor of equal work, for 0.7-23 ms per call. And once more halfway through the
student's backward (``release_halfway_back``), when the layers above the middle one have freed their activations into
the heap and their gradients have come from mmap: there the on-policy step's peak had moved (2369-2422 MiB over 8
steps), and with it the backward's stayed at 2352-2369, under the loss's forward (2387-2395; 2026-12-06 night, the
same VM).
"""

from __future__ import annotations

import ctypes
import os

import torch

M_MMAP_THRESHOLD = -3  # mallopt parameter number (glibc malloc.h)
DEFAULT_MMAP_THRESHOLD = 1024 * 1024


_libc = None  # glibc, once limit_heap_retention has applied its policy to this process


def limit_heap_retention(threshold: int = DEFAULT_MMAP_THRESHOLD) -> bool:
    """Pin glibc's mmap threshold, and let ``release_free_heap`` trim; a no-op (False) off glibc or when
    MALLOC_MMAP_THRESHOLD_ is set."""
    global _libc
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False  # the user chose
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    if not libc.mallopt(M_MMAP_THRESHOLD, threshold):
        return False
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    _libc = libc
    return True


def release_free_heap() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim); a no-op unless
    ``limit_heap_retention`` applied (a CPU training process on glibc)."""
    if _libc is not None:
        _libc.malloc_trim(0)


def release_halfway_back(layers: torch.nn.ModuleList) -> None:
    """``release_free_heap`` each time a backward reaches the output of the middle one of ``layers`` (the student's
    decoder layers; the layers above it are done then: 7 of 15); nothing unless ``limit_heap_retention`` applied."""
    if _libc is not None and len(layers):
        layers[len(layers) // 2].register_forward_hook(_release_when_gradient_arrives)


def _release_when_gradient_arrives(_module, _args, out) -> None:
    hidden = out[0] if isinstance(out, tuple) else out
    if isinstance(hidden, torch.Tensor) and hidden.requires_grad:  # (not in generation or evaluation)
        hidden.register_hook(_release)


def _release(_grad) -> None:
    release_free_heap()
