"""Process settings for running a model per frame: memory allocator and CPU threads.

Kept apart from the model code so that commands can apply them before anything heavy is
imported, and so that every entry point (the nodes, the commands, the benchmarks) runs the
model alike.

Thread caps and where they apply: torch's (``torch.set_num_threads``) and OpenBLAS's
(``threadpoolctl``) are process-wide; OpenMP's, which faiss searches with, belong to the
calling thread (``omp_set_num_threads`` sets the caller's own setting; a thread that never
set it uses the default, one per core): so ``set_num_threads`` must run in the thread that
searches, e.g. the node's worker. ONNX Runtime takes its threads when its session is made
(``extraction.OnnxExtractor``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys


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
    """Cap the CPU threads of faiss (OpenMP, in the calling thread), OpenBLAS and other BLAS
    libraries, and torch when it is loaded (None or 0: leave their defaults)."""
    if not num_threads:
        return
    import faiss
    from threadpoolctl import threadpool_limits

    faiss.omp_set_num_threads(int(num_threads))
    threadpool_limits(limits=int(num_threads), user_api='blas')
    if 'torch' in sys.modules:  # never imported for this: the ONNX Runtime path has no torch
        import torch

        torch.set_num_threads(int(num_threads))


def thread_limits() -> dict[str, int]:
    """The threads the calling thread's libraries would use: faiss (OpenMP), BLAS (the
    largest of the BLAS libraries loaded), torch (when loaded)."""
    import faiss
    from threadpoolctl import threadpool_info

    limits = {'faiss': int(faiss.omp_get_max_threads())}
    blas = [int(i['num_threads']) for i in threadpool_info() if i.get('user_api') == 'blas']
    if blas:
        limits['blas'] = max(blas)
    if 'torch' in sys.modules:
        import torch

        limits['torch'] = int(torch.get_num_threads())
    return limits
