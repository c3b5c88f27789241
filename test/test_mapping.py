"""MapBuilder: keyframes become places with descriptors, grid and sequence descriptors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_place

from vpr_ros.database import PlaceDatabase
from vpr_ros.errors import ConfigError, DatabaseError
from vpr_ros.mapping import BuildConf, MapBuilder
from vpr_ros.types import Frame, Pose


def frames(count: int, step_m: float = 2.0) -> list[Frame]:
    return [
        Frame(synthetic_place(i, (60, 80)), i * 10**8, pose=Pose(step_m * i, 0.0, 0.0))
        for i in range(count)
    ]


def test_keyframes_become_places_with_the_local_grid_recorded(
    tmp_path: Path, default_model
) -> None:
    builder = MapBuilder(default_model, {'batch_size': 3})
    builder.start_traverse()
    kept = [builder.offer(frame) for frame in frames(5)]
    assert all(kept)
    path = builder.save(tmp_path / 'map')
    loaded = PlaceDatabase.load(path)
    assert len(loaded) == 5 and loaded.local_grid == (8, 10)
    assert loaded.local_features.shape == (5, 80, 112)
    assert loaded.sequence_descriptors.shape == (5, 64 * 32)
    assert PlaceDatabase.read_manifest(path)['local']['grid'] == [8, 10]


def test_frames_closer_than_the_keyframe_distance_are_not_places(default_model) -> None:
    builder = MapBuilder(default_model, {'min_distance_m': 3.0})
    kept = [builder.offer(frame) for frame in frames(6, step_m=1.0)]
    assert kept == [True, False, False, True, False, False]


def test_a_map_without_local_or_sequence_data_stores_neither(default_model) -> None:
    builder = MapBuilder(
        default_model, BuildConf(local_features=False, sequence_descriptors=False)
    )
    for frame in frames(2):
        builder.offer(frame)
    builder.flush()
    assert builder.database.local_features is None
    assert builder.database.sequence_descriptors is None


def test_build_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match='max_pose_gap_s must be > 0'):
        BuildConf.from_dict({'max_pose_gap_s': 0.0})
    with pytest.raises(ConfigError, match='min_distance_m must be >= 0'):
        BuildConf.from_dict({'keyframes': {'min_distance_m': -1.0}})


def test_sequence_descriptors_follow_the_build_settings(default_model) -> None:
    conf = BuildConf(sequence_image_size=[32, 16], sequence_patch=4)
    builder = MapBuilder(default_model, conf)
    builder.offer(frames(1)[0])
    builder.flush()
    assert builder.database.sequence_conf == {'image_size': [32, 16], 'patch': 4}
    assert builder.database.sequence_descriptors.shape == (1, 512)
    assert np.isfinite(builder.database.sequence_descriptors).all()


def test_verifier_keypoints_are_stored_per_place_and_recorded_in_the_manifest(
    tmp_path: Path, default_model
) -> None:
    conf = {'verifiers': 'xfeat_lighterglue', 'verifier_keypoints': 32}
    builder = MapBuilder(default_model, conf)
    for frame in frames(3):
        builder.offer(frame)
    path = builder.save(tmp_path / 'map')
    loaded = PlaceDatabase.load(path)
    rows = loaded.feature_stores['xfeat']
    assert len(rows) == 3 and (rows['count'] > 0).all()
    assert (rows['image_size'] == [80, 60]).all()
    entry = PlaceDatabase.read_manifest(path)['feature_stores']['xfeat']
    assert entry['bytes_per_place'] == 12 + 32 * (8 + 2 * 64)
    assert entry['settings'] == {'extractor': 'xfeat', 'max_keypoints': 32, 'max_image_side': 640}


def test_unknown_verifiers_and_a_changed_store_on_append_are_refused(default_model) -> None:
    with pytest.raises(ConfigError, match=r"verifiers names \['mnn_ransac'\]"):
        BuildConf.from_dict({'verifiers': 'mnn_ransac'})
    plain = MapBuilder(default_model).database
    with pytest.raises(DatabaseError, match='an appended map keeps its own'):
        MapBuilder(default_model, {'verifiers': 'xfeat_lighterglue'}, database=plain)
