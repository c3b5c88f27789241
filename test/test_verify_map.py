"""verify_map: every chunk of a map checked against its manifest; damage named, not a crash."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vpr_ros.cli.verify_map import main as verify_map_main
from vpr_ros.database import PlaceDatabase, column_files, place_records
from vpr_ros.models.identity import ModelIdentity
from vpr_ros.types import Frame

IDENTITY = ModelIdentity('test_model', 'c0ffee', 'beef', global_dim=16, local_dim=4)


def small_map(path: Path, count: int = 6) -> None:
    rng = np.random.default_rng(0)
    descriptors = rng.standard_normal((count, 16)).astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    frames = [Frame(np.zeros((1, 1, 3), np.uint8), i) for i in range(count)]
    database = PlaceDatabase.empty(IDENTITY)
    database.add(descriptors, place_records(frames), rng.standard_normal((count, 6, 4)))
    database.save(path)


def test_a_sound_map_verifies(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    small_map(tmp_path / 'map')
    assert verify_map_main([str(tmp_path / 'map')]) == 0
    out = capsys.readouterr().out
    assert '6 places' in out and '0 failed' in out and 'map is sound' in out


def test_a_flipped_byte_is_reported_with_the_places_it_makes_unusable(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    small_map(tmp_path / 'map')
    file = column_files(tmp_path / 'map', 'local')[0]
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x01
    file.write_bytes(bytes(data))
    assert verify_map_main([str(tmp_path / 'map')]) == 1
    out = capsys.readouterr().out
    assert '1 failed' in out and 'fails its checksum' in out and file.name in out
    assert '6 places unusable (place ids 0, 1, 2, 3, 4, 5)' in out


def test_a_directory_that_is_not_a_map_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / 'photos').mkdir()
    assert verify_map_main([str(tmp_path / 'photos')]) == 1
    assert 'is not a vpr_ros map' in capsys.readouterr().err
