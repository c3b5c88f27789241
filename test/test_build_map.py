"""build_map over bags written by the test: every storage, image type and pose type."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_place

from vpr_ros.bagwriter import DEFAULT_NAVSAT_ORIGIN, write_bag
from vpr_ros.cli.build_map import main as build_map_main
from vpr_ros.database import PlaceDatabase
from vpr_ros.errors import BagReadError, DatabaseError
from vpr_ros.mapping import MapBuilder, build_map
from vpr_ros.types import Frame, Pose

STEP_M = 0.6  # metres between frames; keyframes every 1 m keep every second frame


def route_frames(count: int = 8, start_ns: int = 10**9) -> list[Frame]:
    return [
        Frame(
            synthetic_place(i, (60, 80)),
            start_ns + i * 100_000_000,
            frame_id='camera',
            pose=Pose(i * STEP_M, 0.0, 0.0),
        )
        for i in range(count)
    ]


CASES = [
    ('sqlite3', False, 'odometry'),
    ('mcap', True, 'pose_stamped'),
    ('rosbag1', False, 'pose_cov'),
    ('sqlite3', True, 'navsat'),
    ('mcap', False, 'navsat'),
    ('rosbag1', True, 'odometry'),
]


@pytest.mark.parametrize(('storage', 'compressed', 'pose_type'), CASES)
def test_build_map_keeps_one_place_per_metre_with_interpolated_poses(
    tmp_path: Path, default_model, storage: str, compressed: bool, pose_type: str
) -> None:
    bag = write_bag(
        tmp_path / ('run.bag' if storage == 'rosbag1' else f'run_{storage}'),
        route_frames(),
        storage=storage,
        compressed=compressed,
        pose_type=pose_type,
    )
    summary = build_map(
        default_model, [bag], '/camera/image_raw', '/odom', tmp_path / 'map', progress=False
    )
    assert summary.messages_read == 8
    assert summary.skipped.total == 0
    database = PlaceDatabase.load(tmp_path / 'map', expected_model=default_model.identity())
    # Frames at 0, 0.6, 1.2, ... m: keyframes at 0, 1.2, 2.4, 3.6 m.
    assert len(database) == summary.keyframes == 4
    np.testing.assert_allclose(database.places['x'], [0.0, 1.2, 2.4, 3.6], atol=0.05)
    assert list(database.places['msg_index']) == [0, 2, 4, 6]
    assert database.local_features.shape[2] == default_model.local_dim
    # Patch-normalised 64x32 pixels per place, for sequence matching.
    assert database.sequence_descriptors.shape == (4, 64 * 32)
    assert database.sequence_conf == {'image_size': [64, 32], 'patch': 8}


def test_appending_a_second_bag_adds_a_traverse(tmp_path: Path, default_model) -> None:
    first = write_bag(tmp_path / 'a', route_frames(4), storage='sqlite3')
    second = write_bag(tmp_path / 'b', route_frames(4, start_ns=5 * 10**9), storage='mcap')
    build_map(default_model, [first], '/camera/image_raw', '/odom', tmp_path / 'm', progress=False)
    build_map(
        default_model,
        [second],
        '/camera/image_raw',
        '/odom',
        tmp_path / 'm',
        append=True,
        progress=False,
    )
    database = PlaceDatabase.load(tmp_path / 'm')
    assert list(database.places['traverse']) == [0, 0, 1, 1]
    assert len(set(database.places['place_id'])) == 4


def test_frames_without_pose_are_skipped_and_counted(tmp_path: Path, default_model) -> None:
    frames = route_frames(6)
    # Poses only cover the first half of the images.
    bag = write_bag(
        tmp_path / 'bag',
        frames,
        pose_stamps_ns=[f.stamp_ns for f in frames[:3]],
        poses=[f.pose for f in frames[:3]],
    )
    summary = build_map(
        default_model,
        [bag],
        '/camera/image_raw',
        '/odom',
        tmp_path / 'map',
        conf={'max_pose_gap_s': 0.15},
        progress=False,
    )
    assert summary.messages_read == 6
    assert summary.skipped.total == 3
    assert 'no pose' in summary.skipped.summary()


def test_corrupt_bag_gives_a_clear_error_and_no_map(tmp_path: Path, default_model) -> None:
    bag = write_bag(tmp_path / 'run.bag', route_frames(), storage='rosbag1')
    data = bag.read_bytes()
    bag.write_bytes(data[: len(data) // 2])
    with pytest.raises(BagReadError, match='corrupt|truncated'):
        build_map(
            default_model, [bag], '/camera/image_raw', '/odom', tmp_path / 'map', progress=False
        )
    assert not (tmp_path / 'map').exists()


def test_cli_lists_the_topics_when_one_is_missing(tmp_path: Path, capsys) -> None:
    bag = write_bag(tmp_path / 'bag', route_frames(2))
    code = build_map_main(
        [
            '--bag',
            str(bag),
            '--image-topic',
            '/nope',
            '--pose-topic',
            '/odom',
            '--out',
            str(tmp_path / 'map'),
            '--no-progress',
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert '/nope' in err and '/camera/image_raw' in err
    assert not (tmp_path / 'map').exists()


def test_cli_reads_options_from_a_yaml_file(tmp_path: Path, capsys) -> None:
    bag = write_bag(tmp_path / 'bag', route_frames(4), storage='mcap')
    params = tmp_path / 'params.yaml'
    params.write_text(
        'build_map:\n  ros__parameters:\n    image_topic: /camera/image_raw\n'
        '    pose_topic: /odom\n    min_distance_m: 0.1\n'
    )
    code = build_map_main(
        [
            '--params',
            str(params),
            '--bag',
            str(bag),
            '--out',
            str(tmp_path / 'map'),
            '--no-progress',
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert len(PlaceDatabase.load(tmp_path / 'map')) == 4
    assert 'keyframes kept:     4' in capsys.readouterr().out


def test_navsat_bags_and_appends_share_one_local_frame(tmp_path: Path, default_model) -> None:
    def route(start_x: float, start_ns: int) -> list[Frame]:
        return [
            Frame(synthetic_place(i, (60, 80)), start_ns + i * 10**8, pose=Pose(start_x + i, 0, 0))
            for i in range(3)
        ]

    first = write_bag(tmp_path / 'a', route(0.0, 10**9), pose_type='navsat')
    second = write_bag(tmp_path / 'b', route(100.0, 5 * 10**9), pose_type='navsat')
    third = write_bag(tmp_path / 'c', route(200.0, 9 * 10**9), pose_type='navsat')
    topics = ('/camera/image_raw', '/odom')
    conf = {'keyframes': {'min_distance_m': 0.5}}  # places 1 m apart: keep all
    build_map(default_model, [first, second], *topics, tmp_path / 'm', conf=conf, progress=False)
    build_map(
        default_model, [third], *topics, tmp_path / 'm', conf=conf, append=True, progress=False
    )
    database = PlaceDatabase.load(tmp_path / 'm')
    np.testing.assert_allclose(
        database.places['x'], [0, 1, 2, 100, 101, 102, 200, 201, 202], atol=0.01
    )
    # The first fix of the first bag (at ENU 0) is the origin of all of them.
    assert database.enu_origin == pytest.approx(DEFAULT_NAVSAT_ORIGIN)


def test_a_map_keeps_its_enu_origin_and_refuses_another(default_model) -> None:
    builder = MapBuilder(default_model)
    builder.record_enu_origin(None)  # odometry poses: nothing to record
    assert builder.database.enu_origin is None
    builder.record_enu_origin((47.0, 8.0, 400.0))
    builder.record_enu_origin((47.0, 8.0, 400.0))
    assert builder.database.enu_origin == (47.0, 8.0, 400.0)
    with pytest.raises(DatabaseError, match=r'ENU frame at \(47.5, 8.0, 400.0\)'):
        builder.record_enu_origin((47.5, 8.0, 400.0))


def test_bags_on_the_command_line_replace_the_files_bags(tmp_path: Path, capsys) -> None:
    in_file = write_bag(tmp_path / 'in_file', route_frames(2))
    on_command_line = write_bag(tmp_path / 'on_cli', route_frames(4), storage='mcap')
    params = tmp_path / 'params.yaml'
    params.write_text(
        f'bag: {in_file}\nimage_topic: /camera/image_raw\npose_topic: /odom\nmin_distance_m: 0.1\n'
    )
    out = tmp_path / 'map'
    assert build_map_main(['--params', str(params), '--out', str(out), '--no-progress']) == 0
    assert len(PlaceDatabase.load(out)) == 2
    code = build_map_main(
        ['--params', str(params), '--bag', str(on_command_line), '--out', str(out),
         '--no-progress']
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    database = PlaceDatabase.load(out)
    assert len(database) == 4
    assert set(database.place_strings('source')) == {str(on_command_line)}


def test_the_shipped_build_map_parameters_file_is_valid(tmp_path: Path) -> None:
    from vpr_ros.cli.build_map import make_parser
    from vpr_ros.cli.common import parse_with_params_file

    shipped = Path(__file__).parents[1] / 'config' / 'build_map.yaml'
    args = parse_with_params_file(
        make_parser(), ['--params', str(shipped), '--bag', 'x', '--out', 'y'], 'build_map'
    )
    assert args.image_topic == '/camera/image_raw' and args.index__type == 'flat'


def test_a_negated_switch_in_a_parameters_file_means_what_it_says(tmp_path: Path) -> None:
    from vpr_ros.cli.build_map import make_parser
    from vpr_ros.cli.common import parse_with_params_file

    params = tmp_path / 'p.yaml'
    params.write_text('no_local_features: true\nsequence_descriptors: false\n')
    argv = ['--params', str(params), '--bag', 'x', '--image-topic', 'i', '--out', 'y']
    args = parse_with_params_file(make_parser(), argv, 'build_map')
    assert args.local_features is False and args.sequence_descriptors is False


def test_cli_stores_the_keypoints_of_the_verifiers_it_is_asked_for(tmp_path: Path, capsys) -> None:
    bag = write_bag(tmp_path / 'bag', route_frames(4), storage='mcap')
    argv = ['--bag', str(bag), '--image-topic', '/camera/image_raw', '--pose-topic', '/odom']
    argv += ['--out', str(tmp_path / 'map'), '--no-progress']
    argv += ['--verifiers', 'xfeat_lighterglue', '--verifier-keypoints', '16']
    assert build_map_main(argv) == 0, capsys.readouterr().err
    database = PlaceDatabase.load(tmp_path / 'map')
    assert set(database.feature_stores) == {'xfeat'}
    assert database.feature_store_settings['xfeat']['max_keypoints'] == 16
    assert len(database.feature_stores['xfeat']) == len(database)
    bad = [*argv[:-4], '--verifiers', 'superglue']
    assert build_map_main(bad) == 1
    assert "verifiers names ['superglue']" in capsys.readouterr().err


def test_cli_runs_the_model_on_onnxruntime_when_an_export_exists(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vpr_ros.cli.export_onnx import main as export_main
    from vpr_ros.extraction import CACHE_ENV
    from vpr_ros.models import load_model

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / 'cache'))
    model = 'selavpr_tiny_random'
    bag = write_bag(tmp_path / 'bag', route_frames(4), storage='mcap')
    common = ['--bag', str(bag), '--image-topic', '/camera/image_raw', '--pose-topic', '/odom']
    common += ['--model', model, '--min-distance-m', '0.1', '--no-progress']
    assert build_map_main([*common, '--out', str(tmp_path / 'torch_map')]) == 0
    assert f'model:              {model} on torch' in capsys.readouterr().out
    assert export_main(['--model', model]) == 0
    capsys.readouterr()
    assert build_map_main([*common, '--out', str(tmp_path / 'onnx_map')]) == 0
    assert f'model:              {model} on onnxruntime' in capsys.readouterr().out
    # Both maps are the model's and hold the same places, whichever backend described them.
    identity = load_model(model).identity()
    on_torch = PlaceDatabase.load(tmp_path / 'torch_map', expected_model=identity)
    on_onnx = PlaceDatabase.load(tmp_path / 'onnx_map', expected_model=identity)
    cosine = np.sum(
        np.asarray(on_torch.global_descriptors) * np.asarray(on_onnx.global_descriptors), axis=1
    )
    assert len(on_onnx) == len(on_torch) == 4
    assert cosine.min() >= 1 - 1e-4
