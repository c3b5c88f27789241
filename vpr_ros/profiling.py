"""Profiling the whole system: the model, the map it builds, the process, and their speed.

What structured pruning (``vpr_ros.pruning``) buys is measured here, for the prune
command's step table and ``benchmarks/pruning_report.py``:

- ``footprint``: parameters and model megabytes; the map per 1,000 places, both as the
  paper counts it (float32 global descriptors only) and as ``build_map`` writes it
  (measured from a real ``PlaceDatabase``: place rows, global descriptors, float16 local
  features and the faiss index), since the local features are most of a map;
- ``process_memory``: the resident memory of a fresh process that loads the model and a
  map and relocalizes queries through the ``Relocalizer``, as the node does (its own
  python, torch and faiss included, and the same without model and map);
- ``extraction_latency_ms`` (a forward pass at batch 1), ``matching_latency_ms`` (the top
  candidates in a map of a given size) and ``rerank_latency_ms`` (MNN re-ranking of the
  top candidates on local features of a given shape).

``python -m vpr_ros.profiling MODEL MAP_DIR`` is the process that ``process_memory`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
import torch

from vpr_ros.codecs import VectorCodec
from vpr_ros.database import DEFAULT_LOCAL_DTYPE, PlaceDatabase, map_files, place_records
from vpr_ros.errors import ConfigError
from vpr_ros.mapping import BuildConf
from vpr_ros.models.base import VprModel
from vpr_ros.models.identity import ModelIdentity
from vpr_ros.rerankers.mnn import mnn_scores
from vpr_ros.types import Frame, Pose

MB = 1e6  # bytes; all sizes here are decimal megabytes


# --------------------------------------------------------------------------------------
# Model and map sizes


@dataclass(frozen=True)
class Footprint:
    """Sizes of a model and of its map (MB = 10^6 bytes).

    ``global_mb_per_1000`` counts the global descriptors only (float32, 1,000 places), as
    the pruning paper does; ``local_mb_per_1000`` the local features that a re-ranking map
    adds, as build_map stores them (int8 by default, ``vpr_ros.codecs``; at the model's
    preprocessing size); ``map_mb_per_1000`` the whole
    map as ``build_map`` writes it with its default settings (place rows, global
    descriptors, local features, sequence descriptors, faiss index), measured on a map.
    """

    params: int
    model_mb_fp32: float
    model_mb_fp16: float
    global_dim: int
    local_dim: int
    local_locations: int
    global_mb_per_1000: float
    local_mb_per_1000: float
    map_mb_per_1000: float


def footprint(model: VprModel) -> Footprint:
    """Parameters and memory of ``model`` and of a 1,000-place map it builds."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    elements = sum(t.numel() for t in tensors)
    params = sum(p.numel() for p in model.parameters())
    grid = local_grid(model)
    locations = grid[0] * grid[1]
    return Footprint(
        params=int(params),
        model_mb_fp32=elements * 4 / MB,
        model_mb_fp16=elements * 2 / MB,
        global_dim=int(model.global_dim),
        local_dim=int(model.local_dim),
        local_locations=locations,
        global_mb_per_1000=1000 * model.global_dim * 4 / MB,
        local_mb_per_1000=1000
        * VectorCodec(DEFAULT_LOCAL_DTYPE, model.local_dim).bytes_per_row((locations,))
        / MB,
        map_mb_per_1000=1000 * map_bytes_per_place(model.identity(), grid) / MB,
    )


@torch.inference_mode()
def local_grid(model: VprModel) -> tuple[int, int]:
    """Size (h, w) of the local map at the preprocessing size, from one forward pass: it
    depends on the backbone stage, any pooling (``local_pool``) and the model family, so
    it is measured rather than derived."""
    was_training = model.training
    model.eval()
    try:
        local = model(torch.zeros(1, 3, *model.preprocessing.size))['local_features']
    finally:
        model.train(was_training)
    return int(local.shape[-2]), int(local.shape[-1])


def map_bytes_per_place(
    model: ModelIdentity, grid: tuple[int, int], build: BuildConf | None = None
) -> float:
    """Bytes one more place adds to a map on disk as ``build_map`` writes it with ``build``
    (default settings: place row, global descriptor, float16 local features on ``grid``,
    sequence descriptor, faiss index entry): the size difference of two small real maps,
    so the fixed headers and the manifest do not count."""
    with tempfile.TemporaryDirectory(prefix='vpr_map_size_') as tmp:
        sizes = []
        for count in (2, 6):
            path = write_synthetic_map(model, grid, count, Path(tmp) / str(count), build=build)
            sizes.append(sum(f.stat().st_size for f in map_files(path)))
    return (sizes[1] - sizes[0]) / 4


def write_synthetic_map(
    model: ModelIdentity,
    grid: tuple[int, int],
    places: int,
    path: str | os.PathLike[str],
    *,
    build: BuildConf | None = None,
    seed: int = 0,
) -> Path:
    """Write a map of ``places`` random places for ``model`` in the format ``build_map``
    writes with ``build`` (default settings): unit global descriptors, unit float16
    local features on the local ``grid`` (h, w), sequence descriptors, the index."""
    build = build or BuildConf()
    rng = np.random.default_rng(seed)
    sequence_conf = build.sequence_settings()
    database = PlaceDatabase.empty(
        model,
        with_local=build.local_features,
        index_conf=build.index,
        sequence_conf=sequence_conf,
    )
    block = 1000
    for start in range(0, places, block):
        count = min(block, places - start)
        frames = [
            Frame(np.zeros((1, 1, 3), np.uint8), i, pose=Pose(float(i), 0.0, 0.0))
            for i in range(start, start + count)
        ]
        local = sequence = None
        if build.local_features:
            shape = (count, grid[0] * grid[1], model.local_dim)
            raw = rng.standard_normal(shape, dtype=np.float32)
            local = (raw / np.linalg.norm(raw, axis=2, keepdims=True)).astype(np.float16)
        if sequence_conf is not None:
            width, height = sequence_conf['image_size']
            raw = rng.standard_normal((count, width * height), dtype=np.float32)
            sequence = _unit(raw).astype(np.float16)
        database.add(
            _unit(rng.standard_normal((count, model.global_dim), dtype=np.float32)),
            place_records(frames, first_id=start),
            local,
            sequence,
            local_grid=grid,
        )
    return database.save(path)


# --------------------------------------------------------------------------------------
# Latency


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
    dim: int,
    *,
    places: int = 10_000,
    queries: int = 100,
    k: int = 1,
    seed: int = 0,
    statistic: str = 'median',
) -> float:
    """Time to find the top ``k`` places for one query in a ``places``-place map
    (exhaustive inner product, faiss ``IndexFlatIP``, random unit descriptors)."""
    rng = np.random.default_rng(seed)
    database = _unit(rng.standard_normal((places, dim), dtype=np.float32))
    probes = _unit(rng.standard_normal((queries, dim), dtype=np.float32))
    index = faiss.IndexFlatIP(dim)
    index.add(database)
    index.search(probes[:3], k)
    times = []
    for query in probes:
        start = time.perf_counter()
        index.search(query[None], k)
        times.append(time.perf_counter() - start)
    return _summary(times, statistic) * 1000


def rerank_latency_ms(
    locations: int,
    channels: int,
    *,
    candidates: int = 20,
    runs: int = 20,
    seed: int = 0,
    statistic: str = 'median',
) -> float:
    """Time of MNN re-ranking (``rerank.mnn_scores``) of ``candidates`` places for one
    query, on random unit local features of ``locations`` x ``channels`` (float16 in the
    map, as stored)."""
    rng = np.random.default_rng(seed)
    query = _unit(rng.standard_normal((locations, channels), dtype=np.float32))
    raw = rng.standard_normal((candidates, locations, channels), dtype=np.float32)
    stored = (raw / np.linalg.norm(raw, axis=2, keepdims=True)).astype(np.float16)
    mnn_scores(query, stored.astype(np.float32))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        mnn_scores(query, stored.astype(np.float32))  # the re-ranker reads float16 rows
        times.append(time.perf_counter() - start)
    return _summary(times, statistic) * 1000


def _summary(times: list[float], statistic: str) -> float:
    return min(times) if statistic == 'min' else statistics.median(times)


def _unit(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True))


# --------------------------------------------------------------------------------------
# Process memory


@dataclass(frozen=True)
class ProcessMemory:
    """Resident memory (MB) of a process that relocalizes against a map, as the node does.

    ``runtime_mb``: python with torch, faiss and vpr_ros imported (no model, no map);
    ``model_mb``: after the model is loaded and has run once; ``rss_mb``: after the map
    is loaded and ``queries`` frames were relocalized; ``peak_mb``: the high-water mark.
    ``query_ms``: the median time of a relocalization (extraction, retrieval, re-ranking).
    """

    runtime_mb: float
    model_mb: float
    rss_mb: float
    peak_mb: float
    query_ms: float
    places: int


def process_memory(
    model: str | os.PathLike[str],
    map_dir: str | os.PathLike[str],
    *,
    queries: int = 10,
    threads: int = 1,
    timeout_s: float = 600.0,
) -> ProcessMemory:
    """Measure ``ProcessMemory`` in a fresh python process (this one's memory is not the
    node's): it loads ``model`` (a registry name or an exported folder) and the map at
    ``map_dir`` (e.g. ``write_synthetic_map``) and relocalizes ``queries`` random frames.

    Raises:
        RuntimeError: the process failed (its stderr is in the message).
    """
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(root), os.environ.get('PYTHONPATH', '')])
    env = {**os.environ, 'PYTHONPATH': path}
    command = [
        sys.executable,
        '-m',
        'vpr_ros.profiling',
        str(model),
        str(map_dir),
        '--queries',
        str(queries),
        '--threads',
        str(threads),
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=timeout_s, check=False
    )
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-3:]
        raise RuntimeError(f'process memory of {str(model)!r} failed: {" | ".join(tail)}')
    return ProcessMemory(**json.loads(done.stdout.strip().splitlines()[-1]))


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (kB), in MB."""
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(f'{field}:'):
            return int(line.split()[1]) * 1024 / MB
    raise ConfigError(f'/proc/self/status has no {field}; process memory needs Linux')


def measure_this_process(
    model_source: str, map_dir: str, queries: int, threads: int
) -> ProcessMemory:
    """The body of ``process_memory``, run in the fresh process."""
    from vpr_ros.models import load_model
    from vpr_ros.relocalization import Relocalizer
    from vpr_ros.runtime import set_num_threads

    set_num_threads(threads)
    runtime = _status_mb('VmRSS')
    model = load_model(model_source)
    height, width = model.preprocessing.size
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(queries)]
    with torch.inference_mode():
        model(model.preprocessing(frames[:1]))
    model_mb = _status_mb('VmRSS')
    database = PlaceDatabase.load(map_dir, expected_model=model.identity())
    # Retrieval and re-ranking: what the map's tiers cost (the place filter, mode: filter,
    # also holds the map's global and patch descriptors in memory).
    relocalizer = Relocalizer(model, database, {'mode': 'single'})
    times = []
    for frame in frames:
        start = time.perf_counter()
        relocalizer.relocalize(frame)
        times.append(time.perf_counter() - start)
    return ProcessMemory(
        runtime_mb=runtime,
        model_mb=model_mb,
        rss_mb=_status_mb('VmRSS'),
        peak_mb=_status_mb('VmHWM'),
        query_ms=1000 * statistics.median(times),
        places=len(database),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog='python -m vpr_ros.profiling',
        description='Print the ProcessMemory (JSON) of relocalizing against a map.',
    )
    parser.add_argument('model', help='registry name or exported model folder')
    parser.add_argument('map_dir', help='map folder built with that model')
    parser.add_argument('--queries', type=int, default=10, help='frames to relocalize')
    parser.add_argument('--threads', type=int, default=1, help='torch and faiss threads')
    args = parser.parse_args(argv)
    result = measure_this_process(args.model, args.map_dir, args.queries, args.threads)
    print(json.dumps(asdict(result)))
    return 0


__all__ = [
    'Footprint',
    'ProcessMemory',
    'extraction_latency_ms',
    'footprint',
    'local_grid',
    'map_bytes_per_place',
    'matching_latency_ms',
    'process_memory',
    'rerank_latency_ms',
    'write_synthetic_map',
]


if __name__ == '__main__':
    raise SystemExit(main())
