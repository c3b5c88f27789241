"""Faults of the map on disk: crashes at every step of a save, concurrent writers, maps of
the first layout, damaged manifests and npy headers, files changed under a loaded map."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from vpr_ros import database as database_module
from vpr_ros.database import (
    CURRENT,
    GLOBAL_FILE,
    LOCAL_FILE,
    LOCK_FILE,
    MANIFEST,
    PlaceDatabase,
    column_files,
    current_generation,
    map_lock,
    place_records,
)
from vpr_ros.errors import DatabaseError
from vpr_ros.mapfiles import chunk_digests
from vpr_ros.models.identity import ModelIdentity
from vpr_ros.types import Frame, Pose

IDENTITY = ModelIdentity('test_model', 'c0ffee', 'beef', global_dim=16, local_dim=4)
REPO = Path(__file__).resolve().parents[2]


def random_map(count: int, seed: int = 0) -> PlaceDatabase:
    rng = np.random.default_rng(seed)
    descriptors = rng.standard_normal((count, IDENTITY.global_dim)).astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    local = rng.standard_normal((count, 6, IDENTITY.local_dim)).astype(np.float16)
    frames = [
        Frame(np.zeros((1, 1, 3), np.uint8), i, pose=Pose(i, 0.0, 0.0)) for i in range(count)
    ]
    database = PlaceDatabase.empty(IDENTITY)
    database.add(descriptors, place_records(frames), local)
    return database


class SimulatedCrash(BaseException):
    """Raised by the fault hook: like a crash, it skips every ``except Exception`` tidy-up."""


@contextmanager
def crash_at(step: int | None) -> Iterator[list[str]]:
    """Record the save steps; raise SimulatedCrash before step number ``step``."""
    steps: list[str] = []

    def hook(name: str) -> None:
        if step is not None and len(steps) == step:
            raise SimulatedCrash(name)
        steps.append(name)

    database_module.FAULT_HOOK = hook
    try:
        yield steps
    finally:
        database_module.FAULT_HOOK = None


def leftovers(path: Path) -> list[str]:
    """What a map directory holds beyond its pointer, lock and at most two generations (or,
    for a map of the first layout, its files)."""
    names = sorted(entry.name for entry in path.iterdir())
    generations = [n for n in names if n.startswith('gen-')]
    kept = {CURRENT, LOCK_FILE}
    if not (path / CURRENT).exists():
        kept |= {MANIFEST, GLOBAL_FILE, LOCAL_FILE, 'places.npy', 'index.faiss'}
    extra = [n for n in names if n not in kept and not n.startswith('gen-')]
    return extra + (generations[:-2] if len(generations) > 2 else [])


def save_steps(tmp_path: Path) -> list[str]:
    """The steps of a save over an existing map (recorded on a throw-away copy)."""
    random_map(4).save(tmp_path / 'probe')
    with crash_at(None) as steps:
        random_map(7, seed=1).save(tmp_path / 'probe')
    return steps


def test_a_crash_before_any_step_of_save_leaves_the_old_or_the_new_map(tmp_path: Path) -> None:
    steps = save_steps(tmp_path)
    assert {'write pointer', 'swap pointer', 'rename generation', 'write manifest'} <= set(steps)
    outcomes = []
    for step, name in enumerate(steps):
        path = tmp_path / f'map{step}'
        random_map(4).save(path)
        random_map(5, seed=2).save(path)  # so that an old generation is collected too
        with crash_at(step), pytest.raises(SimulatedCrash):
            random_map(7, seed=1).save(path)
        loaded = PlaceDatabase.load(path)  # also collects what the crash left
        assert len(loaded) in (5, 7), name
        outcomes.append(len(loaded))
        assert leftovers(path) == [], (name, leftovers(path))
        random_map(3, seed=3).save(path)  # the map can be written again
        assert len(PlaceDatabase.load(path)) == 3
    # Before the pointer swap the old map is the one; from it on, the new one.
    swap = steps.index('swap pointer')
    assert outcomes == [5] * (swap + 1) + [7] * (len(steps) - swap - 1)


def test_a_crash_during_the_first_save_leaves_no_map_and_does_not_block_the_next(
    tmp_path: Path,
) -> None:
    with crash_at(None) as steps:
        random_map(4).save(tmp_path / 'probe')
    for step, name in enumerate(steps):
        path = tmp_path / f'map{step}'
        with crash_at(step), pytest.raises(SimulatedCrash):
            random_map(7).save(path)
        if PlaceDatabase.is_map(path):
            assert len(PlaceDatabase.load(path)) == 7, name
        elif path.exists():
            with pytest.raises(DatabaseError, match='not a vpr_ros map'):
                PlaceDatabase.load(path)
        random_map(3).save(path)
        assert len(PlaceDatabase.load(path)) == 3
        assert leftovers(path) == [], (name, leftovers(path))


SAVE_FOREVER = textwrap.dedent(
    """
    import sys
    import numpy as np
    sys.path.insert(0, sys.argv[2])
    from test_map_faults import random_map
    n = 0
    while True:
        random_map(3 + n % 5, seed=n).save(sys.argv[1])
        n += 1
        print(n, flush=True)
    """
)


def test_a_writer_killed_at_random_moments_never_leaves_an_unloadable_map(tmp_path: Path) -> None:
    path = tmp_path / 'map'
    random_map(3).save(path)
    rng = np.random.default_rng(0)
    env = {**os.environ, 'PYTHONPATH': f'{REPO}{os.pathsep}{os.environ.get("PYTHONPATH", "")}'}
    for _ in range(6):
        process = subprocess.Popen(
            [sys.executable, '-c', SAVE_FOREVER, str(path), str(Path(__file__).parent)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None
        process.stdout.readline()  # it has saved at least once
        time.sleep(float(rng.uniform(0.0, 0.3)))
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert 3 <= len(PlaceDatabase.load(path)) <= 7
        assert leftovers(path) == []


def write_format_1(directory: Path, count: int, seed: int = 0) -> None:
    """Write, into ``directory``, the files of a map of format version 1 exactly as vpr_ros
    wrote them before segments: one npy file per array (fixed-width strings in the place
    rows, float16 local features), a flat faiss index, one SHA-256 per file."""
    import hashlib

    import faiss

    rng = np.random.default_rng(seed)
    descriptors = rng.standard_normal((count, IDENTITY.global_dim)).astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    frames = [
        Frame(np.zeros((1, 1, 3), np.uint8), i, pose=Pose(i, 0.0, 0.0), source=f'bag{seed}')
        for i in range(count)
    ]
    arrays = {
        'places.npy': place_records(frames),
        GLOBAL_FILE: descriptors,
        LOCAL_FILE: rng.standard_normal((count, 6, IDENTITY.local_dim)).astype(np.float16),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        np.save(directory / name, array, allow_pickle=False)
    index = faiss.IndexFlatIP(IDENTITY.global_dim)
    index.add(descriptors)
    faiss.write_index(index, str(directory / 'index.faiss'))
    files = {
        name: {
            'bytes': (directory / name).stat().st_size,
            'sha256': hashlib.sha256((directory / name).read_bytes()).hexdigest(),
        }
        for name in [*arrays, 'index.faiss']
    }
    manifest = {
        'format': 'vpr_ros.place_database',
        'format_version': 1,
        'created': '2026-01-01T00:00:00Z',
        'model': IDENTITY.to_dict(),
        'place_count': count,
        'global': {'dim': IDENTITY.global_dim, 'dtype': 'float32'},
        'local': {'num_locations': 6, 'dim': IDENTITY.local_dim, 'dtype': 'float16', 'grid': None},
        'sequence': None,
        'enu_origin': None,
        'feature_stores': {},
        'index': {
            'backend': 'faiss',
            'type': 'flat',
            'hnsw_m': 32,
            'hnsw_ef_search': 128,
            'ivf_nlist': 0,
            'pq_m': 0,
            'ivf_nprobe': 16,
        },
        'files': files,
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))


def legacy_map(path: Path, count: int = 4) -> Path:
    """A map as vpr_ros wrote them before generations: format version 1, files at the top."""
    write_format_1(path, count)
    return path


def test_a_map_of_format_version_1_in_a_generation_loads_and_grows(tmp_path: Path) -> None:
    """What the code before format version 2 wrote: CURRENT naming a generation."""
    path = tmp_path / 'map'
    write_format_1(path / 'gen-000001-0123abcd', 5, seed=3)
    (path / CURRENT).write_text('gen-000001-0123abcd\n')
    loaded = PlaceDatabase.load(path)
    assert len(loaded) == 5 and loaded.place_strings('source')[0] == 'bag3'
    query = np.asarray(loaded.global_descriptors[[2]])
    assert loaded.search(query, 1)[1][0, 0] == 2
    loaded.extend(random_map(2, seed=5))
    loaded.save(path)
    again = PlaceDatabase.load(path)
    assert PlaceDatabase.read_manifest(path)['format_version'] == 2
    assert len(again) == 7 and again.search(query, 1)[1][0, 0] == 2
    np.testing.assert_array_equal(again.local_features[[4]], loaded.local_features[[4]])


def test_a_map_of_the_first_layout_loads_and_the_next_save_converts_it(tmp_path: Path) -> None:
    path = legacy_map(tmp_path / 'map')
    assert len(PlaceDatabase.load(path)) == 4
    assert (path / MANIFEST).is_file()  # loading changes nothing
    loaded = PlaceDatabase.load(path)
    loaded.extend(random_map(2, seed=5))
    loaded.save(path)
    assert len(PlaceDatabase.load(path)) == 6
    assert not (path / MANIFEST).exists() and not (path / LOCAL_FILE).exists()
    assert leftovers(path) == []


def test_a_crash_converting_a_map_of_the_first_layout_leaves_it_loadable(tmp_path: Path) -> None:
    legacy_map(tmp_path / 'probe')
    with crash_at(None) as steps:
        random_map(7).save(tmp_path / 'probe')
    for step, name in enumerate(steps):
        path = legacy_map(tmp_path / f'map{step}')
        with crash_at(step), pytest.raises(SimulatedCrash):
            random_map(7).save(path)
        assert len(PlaceDatabase.load(path)) in (4, 7), name
        assert leftovers(path) == [], (name, leftovers(path))


def test_the_first_layouts_interrupted_swap_is_recovered_on_open(tmp_path: Path) -> None:
    """The old save moved the map to .map.old-* before moving the new one in."""
    legacy_map(tmp_path / 'map')
    os.replace(tmp_path / 'map', tmp_path / '.map.old-x1')
    (tmp_path / '.map.tmp-y2').mkdir()
    (tmp_path / '.map.tmp-y2' / GLOBAL_FILE).write_bytes(b'half')
    assert len(PlaceDatabase.load(tmp_path / 'map')) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ['map']


def test_map_directories_are_made_with_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        random_map(2).save(tmp_path / 'maps' / 'office')
    finally:
        os.umask(old)
    path = tmp_path / 'maps' / 'office'
    for directory in (path, current_generation(path)):
        assert directory.stat().st_mode & 0o777 == 0o755
    assert column_files(path, 'global')[0].stat().st_mode & 0o777 == 0o644


HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from vpr_ros.database import map_lock
    with map_lock(sys.argv[1]):
        print('locked', flush=True)
        time.sleep(float(sys.argv[2]))
    """
)


def test_a_second_writer_is_refused_with_the_pid_of_the_first_or_waits(tmp_path: Path) -> None:
    path = tmp_path / 'map'
    random_map(4).save(path)
    env = {**os.environ, 'PYTHONPATH': f'{REPO}{os.pathsep}{os.environ.get("PYTHONPATH", "")}'}
    holder = subprocess.Popen(
        [sys.executable, '-c', HOLD_LOCK, str(path), '3'], env=env, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b'locked\n'
        with pytest.raises(DatabaseError, match=f'being written by PID {holder.pid}'):
            random_map(5).save(path)
        assert len(PlaceDatabase.load(path)) == 4  # readers do not need the lock
        started = time.monotonic()
        random_map(6).save(path, lock_timeout_s=30)  # waits for the holder to finish
        assert time.monotonic() - started > 0.5
        assert len(PlaceDatabase.load(path)) == 6
    finally:
        holder.kill()
        holder.wait()


def test_the_writer_lock_is_reentrant_within_one_process(tmp_path: Path) -> None:
    path = tmp_path / 'map'
    with map_lock(path):
        random_map(2).save(path)  # save takes the lock the caller holds
        assert len(PlaceDatabase.load(path)) == 2
    with map_lock(tmp_path / 'never_written'):
        pass
    assert not (tmp_path / 'never_written').exists()  # the lock made it; it is gone again


def test_a_flipped_byte_in_the_manifest_is_a_database_error(tmp_path: Path) -> None:
    random_map(4).save(tmp_path / 'map')
    manifest = current_generation(tmp_path / 'map') / MANIFEST
    data = bytearray(manifest.read_bytes())
    data[data.index(b'test_model')] ^= 0x80  # 't' becomes a byte that is not UTF-8
    manifest.write_bytes(bytes(data))
    with pytest.raises(DatabaseError, match='unreadable: not UTF-8 text'):
        PlaceDatabase.load(tmp_path / 'map')


@pytest.mark.parametrize('column', ['global', 'local'])
def test_an_npy_header_that_claims_a_huge_shape_is_refused_without_allocating(
    tmp_path: Path, column: str
) -> None:
    path = tmp_path / 'map'
    random_map(4).save(path)
    file = column_files(path, column)[0]
    data = file.read_bytes()
    header_end = data.index(b'\n') + 1
    header = data[:header_end].decode('latin1')
    shape = header[header.index("'shape': (") + 10 : header.index(')')]
    huge = header.replace(f"'shape': ({shape})", "'shape': (10000000000, 10000)")
    huge = huge[: header_end - 1].ljust(header_end - 1) + '\n'  # keep the header length
    hacked = huge.encode('latin1') + data[header_end:]
    file.unlink()  # a new file: the generation before shares the old one
    file.write_bytes(hacked)
    manifest_file = current_generation(path) / MANIFEST
    manifest = json.loads(manifest_file.read_text())
    entry = manifest['files'][file.name]
    entry['sha256'] = chunk_digests(hacked, entry['chunk_bytes'])
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(DatabaseError, match='rebuild the map'):
        PlaceDatabase.load(path)


def test_a_damaged_current_pointer_is_a_clear_error(tmp_path: Path) -> None:
    random_map(4).save(tmp_path / 'map')
    (tmp_path / 'map' / CURRENT).write_text('../../etc\n')
    with pytest.raises(DatabaseError, match='not a generation'):
        PlaceDatabase.load(tmp_path / 'map')
    random_map(2).save(tmp_path / 'map')  # a save repairs it
    assert len(PlaceDatabase.load(tmp_path / 'map')) == 2


def test_a_loaded_map_is_unaffected_when_its_files_are_overwritten_in_place(
    tmp_path: Path,
) -> None:
    """What ``cp other/* map/`` does to a served map: truncate and rewrite its files."""
    path = tmp_path / 'map'
    legacy_map(path, count=6)
    served = PlaceDatabase.load(path)
    expected = np.array(served.local_features, copy=True)
    random_map(2, seed=9).save(tmp_path / 'other')
    for file in current_generation(tmp_path / 'other').iterdir():
        shutil.copyfile(file, path / file.name)  # truncates, then writes
    np.testing.assert_array_equal(served.local_features, expected)  # no SIGBUS, same data
    assert len(served.search(served.global_descriptors[:1], 3)[1][0]) == 3
    assert len(PlaceDatabase.load(path)) == 2  # the copied map, complete


def test_a_served_maps_file_rewritten_in_place_makes_its_places_unusable_not_a_crash(
    tmp_path: Path,
) -> None:
    path = tmp_path / 'map'
    random_map(6).save(path)
    served = PlaceDatabase.load(path)
    random_map(9, seed=9).save(tmp_path / 'other')
    local = column_files(path, 'local')[0]
    shutil.copyfile(column_files(tmp_path / 'other', 'local')[0], local)  # truncate, rewrite
    rows = served.local_features[np.array([1, 4])]  # no SIGBUS: zeros, reported
    assert not rows.any()
    assert served.unusable_places().tolist() == list(range(6))
    assert (
        'changed size' in served.integrity.failures[0]
        and 'unusable' in served.integrity.failures[0]
    )
    query = np.asarray(served.global_descriptors[[2]])
    assert (served.search(query, 3)[1] == -1).all()  # unusable places are never returned
    with pytest.raises(DatabaseError, match='truncated or overwritten'):
        PlaceDatabase.load(path)


def test_a_chunk_failing_its_checksum_is_found_by_verify_and_only_its_places_dropped(
    tmp_path: Path,
) -> None:
    path = tmp_path / 'map'
    database = random_map(64)
    database.save(path)
    local = column_files(path, 'local')[0]
    served = PlaceDatabase.load(path, verify_checksums=False)
    # Small chunks, so a flipped byte condemns only some places.
    manifest_file = current_generation(path) / MANIFEST
    manifest = json.loads(manifest_file.read_text())
    entry = manifest['files'][local.name]
    data = bytearray(local.read_bytes())
    entry['chunk_bytes'] = 256
    entry['sha256'] = chunk_digests(data, 256)
    manifest_file.write_text(json.dumps(manifest))
    served = PlaceDatabase.load(path, verify_checksums=False)
    data[-3] ^= 0xFF  # a byte of the last place's local features
    local.unlink()
    local.write_bytes(bytes(data))
    served = PlaceDatabase.load(path, verify_checksums=False)  # sizes and headers pass
    assert len(served.unusable_places()) == 0
    integrity = served.verify()
    assert integrity.chunks_failed == 1 and integrity.chunks_checked == integrity.chunks_total
    bad = served.unusable_places()
    assert 0 < len(bad) < 64 and 63 in bad
    query = np.asarray(served.global_descriptors[[63]])
    assert 63 not in served.search(query, 5)[1][0]
    assert served.search(np.asarray(served.global_descriptors[[0]]), 1)[1][0, 0] == 0
    with pytest.raises(DatabaseError, match='fails its checksum'):
        PlaceDatabase.load(path)  # verify_checksums=True (the default) checks every chunk


def test_saving_into_a_file_or_a_symlink_is_refused_clearly(tmp_path: Path) -> None:
    (tmp_path / 'file').write_text('x')
    with pytest.raises(DatabaseError, match='is a file; pass a directory'):
        random_map(2).save(tmp_path / 'file')
    random_map(2).save(tmp_path / 'real')
    (tmp_path / 'link').symlink_to(tmp_path / 'real')
    with pytest.raises(DatabaseError, match='is a symlink'):
        random_map(3).save(tmp_path / 'link')
    assert len(PlaceDatabase.load(tmp_path / 'real')) == 2
