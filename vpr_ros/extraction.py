"""Batched descriptor extraction: RGB images in, numpy descriptors out."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch

from vpr_ros.models.base import VprModel
from vpr_ros.runtime import set_num_threads


@dataclass
class Descriptors:
    """Descriptors of a batch of images.

    ``global_descriptors``: (B, D) float32, L2-normalised.
    ``local_features``: (B, L, C) float32, L2-normalised per location (L = h * w).
    ``local_grid``: (h, w) of the local feature map, row-major in ``local_features``.
    """

    global_descriptors: np.ndarray
    local_features: np.ndarray
    local_grid: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.global_descriptors)


class Extractor:
    """Runs a model on images in batches, without gradients, on the CPU.

    Args:
        model: the place-recognition model.
        batch_size: images per forward pass.
        num_threads: torch and faiss threads (None leaves their settings alone).
    """

    def __init__(
        self, model: VprModel, *, batch_size: int = 8, num_threads: int | None = None
    ) -> None:
        self.model = model.eval()
        self.batch_size = max(1, int(batch_size))
        set_num_threads(num_threads)

    @torch.inference_mode()
    def extract(self, images: Sequence[np.ndarray]) -> Descriptors:
        """Descriptors of ``images`` (RGB uint8 arrays, any size), in one or more batches."""
        globals_, locals_ = [], []
        grid: tuple[int, int] | None = None
        for start in range(0, len(images), self.batch_size):
            batch = self.model.preprocessing(images[start : start + self.batch_size])
            out = self.model(batch)
            globals_.append(out['global_descriptor'].float().numpy())
            local = out['local_features'].float()
            grid = (int(local.shape[2]), int(local.shape[3]))
            locals_.append(local.flatten(2).transpose(1, 2).contiguous().numpy())
        return Descriptors(np.concatenate(globals_), np.concatenate(locals_), grid)

    def extract_stream(self, images: Iterable[np.ndarray]) -> Iterator[Descriptors]:
        """Descriptors of a stream of images, yielded one batch at a time."""
        iterator = iter(images)
        while batch := list(islice(iterator, self.batch_size)):
            yield self.extract(batch)
