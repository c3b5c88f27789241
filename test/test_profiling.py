"""Profiling: model and map sizes, extraction and matching latency."""

from __future__ import annotations

import numpy as np
import pytest

from vpr_ros.extraction import Extractor
from vpr_ros.models import DEFAULT_MODEL, load_model
from vpr_ros.profiling import extraction_latency_ms, footprint, matching_latency_ms


def test_footprint_counts_the_pooled_local_map_the_extractor_outputs() -> None:
    model = load_model(DEFAULT_MODEL)
    height, width = model.preprocessing.size
    out = Extractor(model).extract([np.zeros((height, width, 3), np.uint8)])
    _, locations, channels = out.local_features.shape
    assert (locations, channels) == (8 * 10, 112)  # 240 x 320, stride 16, pooled by 2
    size = footprint(model)
    assert size.local_mb_per_1000 == pytest.approx(1000 * locations * channels * 2 / 1e6)
    assert size.map_mb_per_1000 == pytest.approx(1000 * out.global_descriptors.shape[1] * 4 / 1e6)


def test_footprint_counts_every_parameter_and_buffer_of_the_model() -> None:
    model = load_model('resnet18_gem', {'preprocessing': {'size': [64, 64]}}).train()
    size = footprint(model)
    assert size.params == sum(p.numel() for p in model.parameters())
    floats = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    assert floats > size.params  # batch-norm running statistics count in the file size
    assert size.model_mb_fp32 == pytest.approx(floats * 4 / 1e6)
    assert size.model_mb_fp16 == pytest.approx(size.model_mb_fp32 / 2)
    assert (size.global_dim, size.local_dim) == (model.global_dim, model.local_dim)
    assert model.training  # measuring gives the mode back


def test_latencies_are_times_in_milliseconds() -> None:
    model = load_model('resnet18_gem', {'preprocessing': {'size': [64, 64]}})
    fastest = extraction_latency_ms(model, runs=3, warmup=1, statistic='min')
    median = extraction_latency_ms(model, size=(32, 32), runs=3, warmup=1)
    assert fastest > 0 and median > 0
    assert fastest < 1000 and median < 1000
    assert 0 < matching_latency_ms(64, places=1000, queries=20, statistic='min') < 1000
