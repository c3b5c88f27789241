"""Place database: save/load round trip, append, atomic writes and every rejection."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import vpr_ros.database as database_module
from vpr_ros.database import (
    MANIFEST,
    PLACE_DTYPE,
    PlaceDatabase,
    column_files,
    current_generation,
    place_records,
)
from vpr_ros.errors import DatabaseError
from vpr_ros.mapfiles import Column
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
    assert loaded.place_strings('frame_id')[3] == 'map'
    assert loaded.places['msg_index'][3] == 3
    assert loaded.pose(4) == Pose(4.0, 2.0, 0.0)
    scores, ids = loaded.search(database.global_descriptors[[7]], k=3)
    assert ids[0, 0] == 7
    assert scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_local_features_stay_on_disk_and_are_read_row_by_row_as_float32(tmp_path: Path) -> None:
    database = random_map()
    database.save(tmp_path / 'map')
    loaded = PlaceDatabase.load(tmp_path / 'map')
    assert loaded.local_features is not None and not loaded.local_features.column.in_memory
    rows = loaded.local_features[np.array([7, 2])]
    assert rows.dtype == np.float32 and rows.shape == (2, 6, 4)
    np.testing.assert_array_equal(rows, np.asarray(database.local_features)[[7, 2]])


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
    manifest_path = current_generation(tmp_path / 'map') / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest['format_version'] = 99
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DatabaseError, match='format version 99'):
        PlaceDatabase.load(tmp_path / 'map')


def test_a_truncated_file_is_rejected(tmp_path: Path) -> None:
    random_map().save(tmp_path / 'map')
    path = column_files(tmp_path / 'map', 'local')[0]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatabaseError, match='truncated'):
        PlaceDatabase.load(tmp_path / 'map')


def test_a_corrupt_file_fails_its_checksum(tmp_path: Path) -> None:
    random_map().save(tmp_path / 'map')
    path = column_files(tmp_path / 'map', 'global')[0]
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DatabaseError, match='checksum'):
        PlaceDatabase.load(tmp_path / 'map')


def test_a_directory_without_manifest_is_not_a_map(tmp_path: Path) -> None:
    random_map().save(tmp_path / 'map')
    (current_generation(tmp_path / 'map') / MANIFEST).unlink()
    with pytest.raises(DatabaseError, match='half-written'):
        PlaceDatabase.load(tmp_path / 'map')


def test_a_missing_map_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match='build_map'):
        PlaceDatabase.load(tmp_path / 'nothing')


def test_a_failed_save_leaves_the_old_map_intact(tmp_path: Path, monkeypatch) -> None:
    good = random_map(count=4)
    good.save(tmp_path / 'map')
    broken = random_map(count=4)

    def fail_at_the_index(step: str) -> None:
        if step == 'write index':
            raise OSError('disk on fire')

    monkeypatch.setattr(database_module, 'FAULT_HOOK', fail_at_the_index)
    with pytest.raises(Exception):  # noqa: B017 - any failure will do
        broken.save(tmp_path / 'map')
    monkeypatch.setattr(database_module, 'FAULT_HOOK', None)
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


def test_saving_over_a_directory_that_is_not_a_map_is_refused(tmp_path: Path) -> None:
    (tmp_path / 'photos').mkdir()
    (tmp_path / 'photos' / 'precious.jpg').write_bytes(b'x')
    with pytest.raises(DatabaseError, match='not a vpr_ros map'):
        random_map().save(tmp_path / 'photos')
    assert (tmp_path / 'photos' / 'precious.jpg').exists()


def test_a_stale_temporary_directory_does_not_block_saving(tmp_path: Path) -> None:
    random_map().save(tmp_path / 'map')
    for stale in ('.map.old-1', '.map.tmp-1'):
        (tmp_path / stale).mkdir()
        (tmp_path / stale / 'junk').write_bytes(b'x')
    random_map(count=3).save(tmp_path / 'map')
    assert len(PlaceDatabase.load(tmp_path / 'map')) == 3


@pytest.mark.parametrize(
    'damage',
    [
        lambda m: m['model'].pop('local_dim'),
        lambda m: m.pop('files'),
        lambda m: m.__setitem__('local', None),
        lambda m: m['files'].pop(m['columns']['global']['segments'][0]['file']),
    ],
    ids=['no local_dim', 'no file list', 'local null', 'a file unlisted'],
)
def test_a_malformed_manifest_is_a_database_error(tmp_path: Path, damage) -> None:
    random_map().save(tmp_path / 'map')
    manifest_path = current_generation(tmp_path / 'map') / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    damage(manifest)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DatabaseError, match='malformed manifest|lists files|lists columns'):
        PlaceDatabase.load(tmp_path / 'map')


def test_a_refused_add_changes_nothing() -> None:
    database = random_map(count=5)
    rows = np.zeros(2, PLACE_DTYPE)
    rows['place_id'] = [50, 51]
    with pytest.raises(DatabaseError, match='mismatched row counts'):
        database.add(np.zeros((3, 16), np.float32), rows, np.zeros((2, 6, 4), np.float16))
    with pytest.raises(DatabaseError, match='channels'):
        database.add(np.zeros((2, 16), np.float32), rows, np.zeros((2, 6, 9), np.float16))
    assert len(database) == len(database.global_descriptors) == len(database.local_features) == 5
    assert database.index.ntotal == 5


def test_a_map_grown_place_by_place_stores_the_configured_approximate_index(
    tmp_path: Path,
) -> None:
    identity = replace(IDENTITY, global_dim=32)
    database = PlaceDatabase.empty(identity, with_local=False, index_conf={'type': 'ivfpq'})
    rng = np.random.default_rng(4)
    for start in range(0, 2000, 100):
        desc = rng.standard_normal((100, 32)).astype(np.float32)
        rows = np.zeros(100, PLACE_DTYPE)
        rows['place_id'] = np.arange(start, start + 100)
        database.add(desc / np.linalg.norm(desc, axis=1, keepdims=True), rows)
    database.save(tmp_path / 'map')
    loaded = PlaceDatabase.load(tmp_path / 'map')
    assert 'IVF' in type(loaded.index.faiss_index).__name__


# -- extra per-place feature stores ---------------------------------------------------------

STORE_DTYPE = np.dtype([('count', '<i4'), ('keypoints', '<f4', (3, 2)), ('desc', '<f2', (3, 4))])
STORE_SETTINGS = {'extractor': 'test', 'max_keypoints': 3}


def store_rows(count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = np.zeros(count, STORE_DTYPE)
    rows['count'] = rng.integers(0, 4, count)
    rows['keypoints'] = rng.uniform(0, 100, (count, 3, 2))
    rows['desc'] = rng.standard_normal((count, 3, 4))
    return rows


def map_with_store(count: int = 5, seed: int = 0) -> PlaceDatabase:
    base = random_map(count, seed)
    database = PlaceDatabase.empty(IDENTITY, feature_stores={'kp': (STORE_DTYPE, STORE_SETTINGS)})
    database.add(
        np.asarray(base.global_descriptors),
        base.places,
        np.asarray(base.local_features),
        feature_stores={'kp': store_rows(count, seed)},
        strings=base.strings,
    )
    return database


def test_feature_stores_survive_save_and_load_with_their_manifest_entry(tmp_path: Path) -> None:
    database = map_with_store()
    database.save(tmp_path / 'map')
    manifest = json.loads((current_generation(tmp_path / 'map') / MANIFEST).read_text())
    entry = manifest['feature_stores']['kp']
    assert entry['shape'] == [5] and entry['bytes_per_place'] == STORE_DTYPE.itemsize
    assert entry['settings'] == STORE_SETTINGS
    assert [f.name.split('.')[0] for f in column_files(tmp_path / 'map', 'store_kp')] == [
        'store_kp'
    ]
    loaded = PlaceDatabase.load(tmp_path / 'map')
    # Read from disk row by row, like the local features.
    assert isinstance(loaded.feature_stores['kp'], Column)
    np.testing.assert_array_equal(loaded.feature_stores['kp'], database.feature_stores['kp'])
    assert loaded.feature_store_settings == {'kp': STORE_SETTINGS}


def test_a_map_without_feature_stores_loads_with_none(tmp_path: Path) -> None:
    random_map().save(tmp_path / 'map')
    loaded = PlaceDatabase.load(tmp_path / 'map')
    assert loaded.feature_stores == {} and loaded.feature_store_settings == {}


def test_adding_places_without_the_maps_stores_is_refused_and_changes_nothing() -> None:
    database = map_with_store()
    more = random_map(2, seed=1)
    places = more.places.copy()
    places['place_id'] += database.next_place_id()
    with pytest.raises(DatabaseError, match='add exactly the stores the map has'):
        database.add(more.global_descriptors[:], places, more.local_features[:])
    wrong = np.zeros(2, np.dtype([('count', '<i4')]))
    with pytest.raises(DatabaseError, match="feature store 'kp' rows of"):
        database.add(
            more.global_descriptors[:],
            places,
            more.local_features[:],
            feature_stores={'kp': wrong},
            strings=more.strings,
        )
    assert len(database) == 5 and len(database.feature_stores['kp']) == 5
    assert database.index.ntotal == 5


def test_extending_a_map_joins_its_stores_and_refuses_other_settings() -> None:
    database, other = map_with_store(5), map_with_store(3, seed=2)
    database.extend(other)
    assert len(database.feature_stores['kp']) == 8
    np.testing.assert_array_equal(database.feature_stores['kp'][5:], other.feature_stores['kp'])
    with pytest.raises(DatabaseError, match='build both with the same verifiers'):
        database.extend(random_map(2, seed=3))


def test_a_store_that_does_not_match_its_manifest_entry_is_rejected(tmp_path: Path) -> None:
    map_with_store().save(tmp_path / 'map')
    manifest_path = current_generation(tmp_path / 'map') / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest['feature_stores']['kp']['shape'] = [6]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DatabaseError, match="feature store 'kp' is"):
        PlaceDatabase.load(tmp_path / 'map')


def test_an_append_writes_only_the_new_places_and_links_the_rest(tmp_path: Path) -> None:
    path = tmp_path / 'map'
    random_map(10).save(path)
    old = {f.name: f.stat().st_ino for f in column_files(path, 'local')}
    loaded = PlaceDatabase.load(path)
    more = random_map(3, seed=4)
    places = more.places.copy()
    places['place_id'] += loaded.next_place_id()
    places['traverse'] = loaded.next_traverse()
    for i in range(3):  # appends wait in memory as blocks, joined once at the save
        loaded.add(
            np.asarray(more.global_descriptors[i : i + 1]),
            places[i : i + 1],
            np.asarray(more.local_features[i : i + 1]),
            strings=more.strings,
        )
    loaded.save(path)
    files = column_files(path, 'local')
    assert len(files) == 2  # the old segment, and one new one for the three places
    assert files[0].stat().st_ino == old[files[0].name]  # the same file, hard-linked
    assert np.load(files[1]).shape[0] == 3
    again = PlaceDatabase.load(path)
    assert len(again) == 13 and again.places['traverse'].tolist() == [0] * 10 + [1] * 3
    manifest = PlaceDatabase.read_manifest(path)
    assert set(manifest['traverses']) == {'0', '1'} and 'added' in manifest['traverses']['1']
