"""Process settings for running a model per frame: memory allocator and CPU threads.

Kept apart from the model code so that commands can apply them before anything heavy is
imported, and so that every entry point (the nodes, the commands, the benchmarks) runs the
model alike.
"""

from __future__ import annotations

import ctypes
import ctypes.util


def tune_malloc() -> bool:
    """Make glibc keep freed memory for reuse, for a process that runs a model per frame.

    A forward pass allocates and frees some 20 MB of activations. With glibc's defaults these
    large blocks are mapped and unmapped on every frame (about 5000 page faults, a quarter of
    the forward time on a 2-core machine) and the worker thread gets an arena of its own. One
    arena and fixed thresholds make every frame reuse the same memory; freed memory above
    256 MB is still returned. Returns False where ``mallopt`` is not available (not glibc).
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6').mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8  # from glibc's malloc.h
    settings = ((m_arena_max, 1), (m_mmap_threshold, 32 << 20), (m_trim_threshold, 256 << 20))
    return all(mallopt(option, value) == 1 for option, value in settings)


def set_num_threads(num_threads: int | None) -> None:
    """Cap the CPU threads of torch and faiss (None or 0: leave their defaults)."""
    if not num_threads:
        return
    import faiss
    import torch

    torch.set_num_threads(int(num_threads))
    faiss.omp_set_num_threads(int(num_threads))
