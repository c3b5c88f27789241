"""Place database: save/load round trip, append, atomic writes and every rejection."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from vpr_ros.database import (
    GLOBAL_FILE,
    LOCAL_FILE,
    MANIFEST,
    PLACE_DTYPE,
    PlaceDatabase,
    place_records,
)
from vpr_ros.errors import DatabaseError
from vpr_ros.models.base import ModelIdentity
from vpr_ros.types import Frame, Pose

IDENTITY = ModelIdentity('test_model', 'c0ffee', 'beef', global_dim=16, local_dim=4)


def random_map(count: int = 10, seed: int = 0, identity: ModelIdentity = IDENTITY):
    rng = np.random.default_rng(seed)
    global_desc = rng.standard_normal((count, identity.global_dim)).astype(np.float32)
    global_desc /= np.linalg.norm(global_desc, axis=1, keepdims=True)
    local = rng.standard_normal((count, 6, identity.local_dim)).astype(np.float16)
    frames = [
        Frame(
            np.zeros((1, 1, 3), np.uint8),
            1000 * i,
            pose=Pose(float(i), 2.0, 0.0),
            pose_frame_id='map',
            source='run.bag',
            topic='/cam',
            msg_index=i,
        )
        for i in range(count)
    ]
    database = PlaceDatabase.empty(identity)
    database.add(global_desc, place_records(frames), local)
    return database


def test_save_then_load_gives_back_every_array_and_row(tmp_path: Path) -> None:
    database = random_map()
    database.save(tmp_path / 'map')
    loaded = PlaceDatabase.load(tmp_path / 'map', expected_model=IDENTITY)
    assert len(loaded) == 10
    np.testing.assert_array_equal(loaded.global_descriptors, database.global_descriptors)
    np.testing.assert_array_equal(loaded.local_features, database.local_features)
    assert loaded.places.dtype == PLACE_DTYPE
    assert loaded.places['frame_id'][3] == 'map'
    assert loaded.places['msg_index'][3] == 3
    assert loaded.pose(4) == Pose(4.0, 2.0, 0.0)
    scores, ids = loaded.search(database.global_descriptors[[7]], k=3)
    assert ids[0, 0] == 7
    assert scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_local_features_are_memory_mapped_float16(tmp_path: Path) -> None:
    random_map().save(tmp_path / 'map')
    loaded = PlaceDatabase.load(tmp_path / 'map')
    assert isinstance(loaded.local_features, np.memmap)
    assert loaded.local_features.dtype == np.float16


def test_append_keeps_old_places_and_numbers_the_new_traverse(tmp_path: Path) -> None:
    first = random_map(count=5, seed=1)
    first.save(tmp_path / 'map')
    second = random_map(count=3, seed=2)
    loaded = PlaceDatabase.load(tmp_path / 'map', mmap=False)
    loaded.extend(second)
    loaded.save(tmp_path / 'map')
    again = PlaceDatabase.load(tmp_path / 'map')
    assert len(again) == 8
    assert list(again.places['place_id']) == list(range(8))
    assert list(again.places['traverse']) == [0] * 5 + [1] * 3
    _, ids = again.search(second.global_descriptors[[2]], k=1)
    assert ids[0, 0] == 7


def test_appending_descriptors_of_another_dimension_is_refused() -> None:
    database = random_map()
    with pytest.raises(DatabaseError, match='cannot join'):
        database.add(np.zeros((1, 8), np.float32), np.zeros(1, PLACE_DTYPE), None)


def test_a_map_built_by_another_model_is_rejected_with_both_names(tmp_path: Path) -> None:
    random_map().save(tmp_path / 'map')
    other = replace(IDENTITY, name='other_model', weights_hash='f00d')
    with pytest.raises(DatabaseError, match="built with 'test_model'.*'other_model'"):
        PlaceDatabase.load(tmp_path / 'map', expected_model=other)


def test_same_name_but_other_weights_is_rejected(tmp_path: Path) -> None:
    random_map().save(tmp_path / 'map')
    with pytest.raises(DatabaseError, match='rebuild the map'):
        PlaceDatabase.load(tmp_path / 'map', expected_model=replace(IDENTITY, weights_hash='x'))


def test_another_format_version_is_rejected(tmp_path: Path) -> None:
    random_map().save(tmp_path / 'map')
    manifest_path = tmp_path / 'map' / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest['format_version'] = 99
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DatabaseError, match='format version 99'):
        PlaceDatabase.load(tmp_path / 'map')


def test_a_truncated_file_is_rejected(tmp_path: Path) -> None:
    random_map().save(tmp_path / 'map')
    path = tmp_path / 'map' / LOCAL_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatabaseError, match='truncated'):
        PlaceDatabase.load(tmp_path / 'map')


def test_a_corrupt_file_fails_its_checksum(tmp_path: Path) -> None:
    random_map().save(tmp_path / 'map')
    path = tmp_path / 'map' / GLOBAL_FILE
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DatabaseError, match='checksum'):
        PlaceDatabase.load(tmp_path / 'map')


def test_a_directory_without_manifest_is_not_a_map(tmp_path: Path) -> None:
    random_map().save(tmp_path / 'map')
    (tmp_path / 'map' / MANIFEST).unlink()
    with pytest.raises(DatabaseError, match='half-written'):
        PlaceDatabase.load(tmp_path / 'map')


def test_a_missing_map_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match='build_map'):
        PlaceDatabase.load(tmp_path / 'nothing')


def test_a_failed_save_leaves_the_old_map_intact(tmp_path: Path) -> None:
    good = random_map(count=4)
    good.save(tmp_path / 'map')
    broken = random_map(count=4)
    broken.local_features = object()  # cannot be written
    with pytest.raises(Exception):  # noqa: B017 - any failure will do
        broken.save(tmp_path / 'map')
    loaded = PlaceDatabase.load(tmp_path / 'map')
    assert len(loaded) == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.map')]


@pytest.mark.parametrize('kind', ['flat', 'hnsw', 'ivfpq'])
def test_every_index_type_finds_an_exact_copy(tmp_path: Path, kind: str) -> None:
    identity = replace(IDENTITY, global_dim=32)
    rng = np.random.default_rng(3)
    desc = rng.standard_normal((2000, 32)).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    rows = np.zeros(2000, PLACE_DTYPE)
    rows['place_id'] = np.arange(2000)
    database = PlaceDatabase(identity, desc, rows, None, index_conf={'type': kind})
    database.save(tmp_path / 'map')
    loaded = PlaceDatabase.load(tmp_path / 'map')
    _, ids = loaded.search(desc[:20], k=5)
    hits = np.mean([i in row for i, row in zip(range(20), ids)])
    assert hits >= (1.0 if kind == 'flat' else 0.8)
