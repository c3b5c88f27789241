"""merge_maps: maps of several robots become one, frames aligned by a given transform."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vpr_ros.cli.merge_maps import main as merge_maps_main
from vpr_ros.database import PlaceDatabase, place_records
from vpr_ros.models.identity import ModelIdentity
from vpr_ros.types import Frame, Pose

IDENTITY = ModelIdentity('test_model', 'c0ffee', 'beef', global_dim=16, local_dim=4)


def robot_map(path: Path, count: int, seed: int, source: str) -> PlaceDatabase:
    rng = np.random.default_rng(seed)
    descriptors = rng.standard_normal((count, IDENTITY.global_dim)).astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    local = rng.standard_normal((count, 6, IDENTITY.local_dim)).astype(np.float32)
    frames = [
        Frame(
            np.zeros((1, 1, 3), np.uint8),
            10**9 * (seed * 100 + i),
            pose=Pose(float(i), 0.0, 0.0),
            source=source,
        )
        for i in range(count)
    ]
    database = PlaceDatabase.empty(IDENTITY)
    database.add(descriptors, place_records(frames), local)
    database.save(path)
    return database


def test_two_robots_maps_merge_with_the_second_moved_into_the_first_frame(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    a = robot_map(tmp_path / 'a', 5, seed=1, source='robot_a.bag')
    b = robot_map(tmp_path / 'b', 3, seed=2, source='robot_b.bag')
    code = merge_maps_main(
        [str(tmp_path / 'a'), str(tmp_path / 'b'), '--out', str(tmp_path / 'm'), '--transform',
         '2:10,5,0,90']
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    merged = PlaceDatabase.load(tmp_path / 'm')
    assert len(merged) == 8 and len(set(merged.places['place_id'].tolist())) == 8
    assert merged.places['traverse'].tolist() == [0] * 5 + [1] * 3
    assert merged.place_strings('source').tolist() == ['robot_a.bag'] * 5 + ['robot_b.bag'] * 3
    assert {t['source'] for t in merged.traverses.values()} == {'robot_a.bag', 'robot_b.bag'}
    # b's place 2 was at (2, 0): rotated 90 degrees about z, then moved by (10, 5).
    np.testing.assert_allclose(merged.poses[7, :3], [10.0, 7.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(merged.poses[2, :3], [2.0, 0.0, 0.0])  # a's frame is kept
    query = np.asarray(b.global_descriptors[[1]])
    assert merged.search(query, 1)[1][0, 0] == 6
    np.testing.assert_allclose(merged.local_features[[6]], b.local_features[[1]], atol=1e-6)
    assert 'merged 2 maps: 8 places, 2 traverses' in capsys.readouterr().out
    assert len(PlaceDatabase.load(tmp_path / 'a')) == len(a)  # inputs unchanged


def test_maps_of_another_model_are_refused_naming_both(tmp_path: Path, capsys) -> None:
    robot_map(tmp_path / 'a', 3, seed=1, source='a')
    other = ModelIdentity('other_model', 'f00d', 'cafe', global_dim=16, local_dim=4)
    database = PlaceDatabase.empty(other)
    rows = place_records([Frame(np.zeros((1, 1, 3), np.uint8), 0)])
    database.add(np.eye(1, 16, dtype=np.float32), rows, np.ones((1, 6, 4), np.float32))
    database.save(tmp_path / 'b')
    code = merge_maps_main(
        [str(tmp_path / 'a'), str(tmp_path / 'b'), '--out', str(tmp_path / 'm')]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert 'other_model' in err and 'test_model' in err
    assert not (tmp_path / 'm').exists()


def test_a_malformed_transform_is_a_one_line_error_before_any_map_is_read(
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, '-m', 'vpr_ros.cli.merge_maps', 'x', 'y', '--out', str(tmp_path / 'm'),
         '--transform', '3:1,2'],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert 'expected I:x,y,z,yaw_deg' in result.stderr and '(1..2)' in result.stderr
    assert time.monotonic() - started < 10  # no map, model or engine was loaded
