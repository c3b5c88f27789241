"""build_map over several bags on a local Ray instance: shards built by workers, merged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_build_map import route_frames

from vpr_ros.bagwriter import write_bag
from vpr_ros.cli.build_map import main as build_map_main
from vpr_ros.database import PlaceDatabase
from vpr_ros.mapping import build_map

pytest.importorskip('ray')


def test_three_bags_on_two_ray_workers_make_the_map_one_process_makes(
    tmp_path: Path, default_model, capsys: pytest.CaptureFixture
) -> None:
    bags = [
        write_bag(tmp_path / f'run{i}', route_frames(4, start_ns=(1 + 10 * i) * 10**9))
        for i in range(3)
    ]
    build_map(default_model, bags, '/camera/image_raw', '/odom', tmp_path / 'one',
              progress=False)  # fmt: skip
    args = ['--image-topic', '/camera/image_raw', '--pose-topic', '/odom', '--no-progress']
    for bag in bags:
        args += ['--bag', str(bag)]
    code = build_map_main([*args, '--out', str(tmp_path / 'ray'), '--workers', '2'])
    assert code == 0, capsys.readouterr().err
    assert 'places in map:      6' in capsys.readouterr().out
    one, ray = PlaceDatabase.load(tmp_path / 'one'), PlaceDatabase.load(tmp_path / 'ray')
    assert len(ray) == len(one) == 6
    assert ray.places['traverse'].tolist() == one.places['traverse'].tolist() == [0, 0, 1, 1, 2, 2]
    assert sorted(ray.place_strings('source').tolist()) == sorted(map(str, bags * 2))
    np.testing.assert_allclose(ray.places['x'], one.places['x'], atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(ray.global_descriptors), np.asarray(one.global_descriptors), atol=1e-4
    )
    assert not [p for p in tmp_path.iterdir() if '.shards-' in p.name]  # shards removed
