"""Profiling a model: its size, the size of the maps it builds, and its speed on this CPU.

``footprint`` (parameters, model and map megabytes), ``extraction_latency_ms`` (a forward
pass at batch 1) and ``matching_latency_ms`` (top-1 search in a map of a given size) are
what the prune command's step table and ``benchmarks/pruning_report.py`` report: what
structured pruning (``vpr_ros.pruning``) buys.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import faiss
import numpy as np
import torch

from vpr_ros.models.base import VprModel

MB = 1e6  # bytes; all sizes here are decimal megabytes


@dataclass(frozen=True)
class Footprint:
    """Sizes of a model and of its map (MB = 10^6 bytes).

    ``map_mb_per_1000`` counts the global descriptors only (float32, 1,000 places), as the
    paper does; ``local_mb_per_1000`` the local features a re-ranking map adds (float16,
    at the model's preprocessing size).
    """

    params: int
    model_mb_fp32: float
    model_mb_fp16: float
    global_dim: int
    local_dim: int
    map_mb_per_1000: float
    local_mb_per_1000: float


def footprint(model: VprModel) -> Footprint:
    """Parameters and memory of ``model`` and of a 1,000-place map it builds."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    elements = sum(t.numel() for t in tensors)
    params = sum(p.numel() for p in model.parameters())
    locations = _local_locations(model)
    return Footprint(
        params=int(params),
        model_mb_fp32=elements * 4 / MB,
        model_mb_fp16=elements * 2 / MB,
        global_dim=int(model.global_dim),
        local_dim=int(model.local_dim),
        map_mb_per_1000=1000 * model.global_dim * 4 / MB,
        local_mb_per_1000=1000 * locations * model.local_dim * 2 / MB,
    )


@torch.inference_mode()
def _local_locations(model: VprModel) -> int:
    """Locations (h * w) of the local map at the preprocessing size, from one forward
    pass: the map's size depends on the backbone stage, any pooling (``local_pool``) and
    the model family, so it is measured rather than derived."""
    was_training = model.training
    model.eval()
    try:
        local = model(torch.zeros(1, 3, *model.preprocessing.size))['local_features']
    finally:
        model.train(was_training)
    return int(local.shape[-2] * local.shape[-1])


@torch.inference_mode()
def extraction_latency_ms(
    model: VprModel,
    *,
    size: tuple[int, int] | None = None,
    runs: int = 20,
    warmup: int = 3,
    statistic: str = 'median',
) -> float:
    """Time of one forward pass at batch 1 on this CPU (preprocessing excluded).

    Args:
        model: the model (put in eval mode).
        size: input (height, width); None: the model's preprocessing size.
        runs: timed passes.
        warmup: untimed passes first.
        statistic: 'median', or 'min' (the least disturbed pass: steadier when other
            processes share the CPU).
    """
    model.eval()
    images = torch.randn(1, 3, *(size or model.preprocessing.size))
    for _ in range(warmup):
        model(images)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model(images)
        times.append(time.perf_counter() - start)
    return _summary(times, statistic) * 1000


def matching_latency_ms(
    dim: int, *, places: int = 10_000, queries: int = 100, seed: int = 0, statistic: str = 'median'
) -> float:
    """Time to find the top-1 place for one query in a ``places``-place map (exhaustive
    inner product, faiss ``IndexFlatIP``, random unit descriptors); median or min."""
    rng = np.random.default_rng(seed)
    database = _unit(rng.standard_normal((places, dim), dtype=np.float32))
    probes = _unit(rng.standard_normal((queries, dim), dtype=np.float32))
    index = faiss.IndexFlatIP(dim)
    index.add(database)
    index.search(probes[:3], 1)
    times = []
    for query in probes:
        start = time.perf_counter()
        index.search(query[None], 1)
        times.append(time.perf_counter() - start)
    return _summary(times, statistic) * 1000


def _summary(times: list[float], statistic: str) -> float:
    return min(times) if statistic == 'min' else statistics.median(times)


def _unit(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True))


__all__ = ['Footprint', 'extraction_latency_ms', 'footprint', 'matching_latency_ms']
