"""Extraction: batched model outputs as normalised numpy descriptors with their grid."""

from __future__ import annotations

import numpy as np
from conftest import synthetic_place

from vpr_ros.extraction import TorchExtractor


def test_descriptors_are_normalised_and_carry_the_local_grid(default_model) -> None:
    images = [synthetic_place(i) for i in range(3)]
    out = TorchExtractor(default_model, batch_size=2).extract(images)
    assert out.global_descriptors.shape == (3, default_model.global_dim) == (3, 1280)
    # 240x320 input, stride-16 stage (15 x 20) pooled by 2: 8 x 10 locations of 112 channels.
    assert out.local_features.shape == (3, 8 * 10, 112)
    assert out.local_grid == (8, 10)
    np.testing.assert_allclose(np.linalg.norm(out.global_descriptors, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out.local_features, axis=2), 1, atol=1e-4)


def test_batching_does_not_change_descriptors(default_model) -> None:
    images = [synthetic_place(i) for i in range(3)]
    one = TorchExtractor(default_model, batch_size=1).extract(images).global_descriptors
    three = TorchExtractor(default_model, batch_size=3).extract(images).global_descriptors
    np.testing.assert_allclose(one, three, atol=1e-4)


def test_a_stream_is_described_one_batch_at_a_time(default_model) -> None:
    images = (synthetic_place(i) for i in range(5))
    batches = list(TorchExtractor(default_model, batch_size=2).extract_stream(images))
    assert [len(b) for b in batches] == [2, 2, 1]
