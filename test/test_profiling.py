"""Profiling: model sizes, the whole map (local features included) as build_map writes it,
the memory of a relocalizing process, extraction, matching and re-ranking latency."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_place

from vpr_ros.database import PlaceDatabase, map_files
from vpr_ros.extraction import TorchExtractor
from vpr_ros.mapping import MapBuilder
from vpr_ros.models import DEFAULT_MODEL, load_model, save_model
from vpr_ros.profiling import (
    extraction_latency_ms,
    footprint,
    local_grid,
    matching_latency_ms,
    process_memory,
    rerank_latency_ms,
    write_synthetic_map,
)
from vpr_ros.types import Frame, Pose

SMALL = {'preprocessing': {'size': [64, 64]}}


def test_footprint_counts_the_pooled_local_map_the_extractor_outputs() -> None:
    model = load_model(DEFAULT_MODEL)
    height, width = model.preprocessing.size
    out = TorchExtractor(model).extract([np.zeros((height, width, 3), np.uint8)])
    _, locations, channels = out.local_features.shape
    assert (locations, channels) == (8 * 10, 112)  # 240 x 320, stride 16, pooled by 2
    size = footprint(model)
    assert size.local_locations == locations
    # Stored int8 (one byte a value; vpr_ros.codecs), as build_map writes them.
    assert size.local_mb_per_1000 == pytest.approx(1000 * locations * channels / 1e6)
    dim = out.global_descriptors.shape[1]
    assert size.global_mb_per_1000 == pytest.approx(1000 * dim * 4 / 1e6)
    # The local features are 1.75 times the global descriptors; the map holds both, and
    # stays under 16 KB a place (issue 14).
    assert size.local_mb_per_1000 == pytest.approx(1.75 * size.global_mb_per_1000)
    assert size.map_mb_per_1000 < 16.0
    assert size.map_mb_per_1000 > size.global_mb_per_1000 + size.local_mb_per_1000


def map_bytes(tmp_path: Path, model, places: int) -> int:
    builder = MapBuilder(model, {'batch_size': 4})
    for i in range(places):
        frame = Frame(synthetic_place(i, (48, 64)), i * 10**9, pose=Pose(20.0 * i, 0.0, 0.0))
        builder.offer(frame)
    path = builder.save(tmp_path / f'map{places}')
    assert len(PlaceDatabase.load(path, expected_model=model.identity())) == places
    return sum(f.stat().st_size for f in map_files(path))


def test_map_size_per_place_is_what_build_map_writes(tmp_path: Path) -> None:
    model = load_model('resnet18_gem', SMALL)
    per_place = (map_bytes(tmp_path, model, 7) - map_bytes(tmp_path, model, 3)) / 4
    assert footprint(model).map_mb_per_1000 * 1e6 / 1000 == pytest.approx(per_place, rel=0.01)


def test_footprint_counts_every_parameter_and_buffer_of_the_model() -> None:
    model = load_model('resnet18_gem', SMALL).train()
    size = footprint(model)
    assert size.params == sum(p.numel() for p in model.parameters())
    floats = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    assert floats > size.params  # batch-norm running statistics count in the file size
    assert size.model_mb_fp32 == pytest.approx(floats * 4 / 1e6)
    assert size.model_mb_fp16 == pytest.approx(size.model_mb_fp32 / 2)
    assert (size.global_dim, size.local_dim) == (model.global_dim, model.local_dim)
    assert model.training  # measuring gives the mode back


def test_process_memory_grows_from_runtime_to_model_to_model_and_map(tmp_path: Path) -> None:
    model = load_model('resnet18_gem', SMALL)
    save_model(model, tmp_path / 'model')
    path = write_synthetic_map(model.identity(), local_grid(model), 3000, tmp_path / 'map')
    memory = process_memory(tmp_path / 'model', path, queries=3)
    assert memory.places == 3000
    assert 0 < memory.runtime_mb < memory.model_mb <= memory.peak_mb
    assert memory.rss_mb <= memory.peak_mb and memory.query_ms > 0
    # Only the map's in-memory tier is resident (place rows and, searched exactly, the
    # global descriptors): its local features and sequence descriptors stay on disk and
    # are read row by row (issue 14), so the map adds less than their size.
    size = footprint(model)
    in_memory_mb = 3.0 * (size.global_mb_per_1000 + 0.096)
    on_disk_mb = 3.0 * (size.map_mb_per_1000 - size.global_mb_per_1000)
    assert memory.rss_mb - memory.model_mb < in_memory_mb + 0.5 * on_disk_mb + 4.0


def test_latencies_are_times_in_milliseconds() -> None:
    model = load_model('resnet18_gem', SMALL)
    fastest = extraction_latency_ms(model, runs=3, warmup=1, statistic='min')
    median = extraction_latency_ms(model, size=(32, 32), runs=3, warmup=1)
    assert fastest > 0 and median > 0
    assert fastest < 1000 and median < 1000
    assert 0 < matching_latency_ms(64, places=1000, queries=20, k=5, statistic='min') < 1000
    assert 0 < rerank_latency_ms(16, 32, candidates=5, runs=3, statistic='min') < 1000
