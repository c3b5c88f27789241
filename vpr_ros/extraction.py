"""Batched descriptor extraction: RGB images in, numpy descriptors out."""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch

from vpr_ros.models.base import VprModel


@dataclass
class Descriptors:
    """Descriptors of a batch of images.

    ``global_descriptors``: (B, D) float32, L2-normalised.
    ``local_features``: (B, L, C) float32, L2-normalised per location (L = h * w).
    """

    global_descriptors: np.ndarray
    local_features: np.ndarray

    def __len__(self) -> int:
        return len(self.global_descriptors)


class Extractor:
    """Runs a model on images in batches, without gradients, on the CPU.

    Args:
        model: the place-recognition model.
        batch_size: images per forward pass.
        num_threads: torch intra-op threads (None leaves torch's setting alone).
    """

    def __init__(
        self, model: VprModel, *, batch_size: int = 8, num_threads: int | None = None
    ) -> None:
        self.model = model.eval()
        self.batch_size = max(1, int(batch_size))
        if num_threads:
            torch.set_num_threads(int(num_threads))

    @torch.inference_mode()
    def extract(self, images: Sequence[np.ndarray]) -> Descriptors:
        """Descriptors of ``images`` (RGB uint8 arrays, any size), in one or more batches."""
        globals_, locals_ = [], []
        for start in range(0, len(images), self.batch_size):
            batch = self.model.preprocessing(images[start : start + self.batch_size])
            out = self.model(batch)
            globals_.append(out['global_descriptor'].float().numpy())
            local = out['local_features'].float()
            locals_.append(local.flatten(2).transpose(1, 2).contiguous().numpy())
        return Descriptors(np.concatenate(globals_), np.concatenate(locals_))

    def extract_stream(self, images: Iterable[np.ndarray]) -> Iterator[Descriptors]:
        """Descriptors of a stream of images, yielded one batch at a time."""
        iterator = iter(images)
        while batch := list(islice(iterator, self.batch_size)):
            yield self.extract(batch)


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
