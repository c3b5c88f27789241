"""Tests of vpr_ros.bagwriter: bags written in every storage, image and pose type, read back."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from conftest import T0, S, bag_path, make_frames

from vpr_ros.bagio import bag_topics, iter_messages, open_bag, read_frames
from vpr_ros.bagwriter import DEFAULT_NAVSAT_ORIGIN, STORAGES, write_bag
from vpr_ros.geometry import LocalTangentPlane
from vpr_ros.poses import POSE_TYPES
from vpr_ros.types import Pose

IMAGE = '/camera/image_raw'
ODOM = '/odom'


@pytest.mark.parametrize('storage', STORAGES)
@pytest.mark.parametrize('compressed', [False, True], ids=['image', 'compressed'])
def test_frames_round_trip_through_every_storage_and_image_type(
    tmp_path: Path, storage: str, compressed: bool
) -> None:
    frames = make_frames()
    bag = write_bag(bag_path(tmp_path, storage), frames, storage=storage, compressed=compressed)
    got = list(read_frames(bag, IMAGE, ODOM))

    assert len(got) == len(frames)
    for index, (want, have) in enumerate(zip(frames, got)):
        assert have.stamp_ns == want.stamp_ns
        assert have.frame_id == 'camera_optical'
        assert have.pose is not None and want.pose is not None
        np.testing.assert_allclose(have.pose.as_array(), want.pose.as_array(), atol=1e-12)
        assert have.pose_frame_id == 'map'
        assert have.source == str(bag)
        assert have.topic == IMAGE
        assert have.msg_index == index
        assert have.image.shape == (24, 32, 3)
        if compressed:
            assert np.abs(have.image.astype(int) - want.image.astype(int)).mean() < 3.0
        else:
            np.testing.assert_array_equal(have.image, want.image)


@pytest.mark.parametrize('storage', STORAGES)
@pytest.mark.parametrize('pose_type', list(POSE_TYPES))
def test_each_pose_type_round_trips_through_every_storage(
    tmp_path: Path, storage: str, pose_type: str
) -> None:
    frames = make_frames(4)
    bag = write_bag(
        bag_path(tmp_path, storage),
        frames,
        storage=storage,
        pose_topic='/pose',
        pose_type=pose_type,
        pose_frame_id='odom',
    )
    assert bag_topics(bag)['/pose'] == POSE_TYPES[pose_type].msgtype
    origin = DEFAULT_NAVSAT_ORIGIN if pose_type == 'navsat' else None
    got = list(read_frames(bag, IMAGE, '/pose', enu_origin=origin))

    assert [f.pose_frame_id for f in got] == ['odom'] * 4
    for want, have in zip(frames, got):
        assert have.pose is not None and want.pose is not None
        np.testing.assert_allclose(have.pose.as_array()[:3], want.pose.as_array()[:3], atol=1e-6)
        if pose_type == 'navsat':  # NavSatFix has no orientation
            assert (have.pose.qx, have.pose.qy, have.pose.qz, have.pose.qw) == (0, 0, 0, 1)
        else:
            np.testing.assert_allclose(have.pose.as_array()[3:], want.pose.as_array()[3:])


def test_separate_pose_messages_are_interleaved_with_the_images_by_time(tmp_path: Path) -> None:
    frames = make_frames(4, with_poses=False)  # images at 0.0, 0.1, 0.2, 0.3 s
    stamps = [T0 + S // 20, T0 + 5 * S // 20, T0 + S]  # 0.05, 0.25, 1.0 s
    bag = write_bag(
        tmp_path / 'interleaved',
        frames,
        storage='mcap',
        pose_stamps_ns=stamps[::-1],  # any order
        poses=[Pose(float(i), 0.0, 0.0) for i in range(3)][::-1],
    )
    with open_bag(bag) as reader:
        order = [
            (connection.topic, receive_ns)
            for connection, receive_ns, _ in iter_messages(reader, reader.connections, bag)
        ]
    images = [(IMAGE, f.stamp_ns) for f in frames]
    assert order == [
        images[0], (ODOM, stamps[0]), images[1], images[2], (ODOM, stamps[1]), images[3],
        (ODOM, stamps[2]),
    ]  # fmt: skip


def test_navsat_fixes_are_written_around_the_given_origin_with_a_fix_status(
    tmp_path: Path,
) -> None:
    origin = (-33.8688, 151.2093, 58.0)
    frames = make_frames(2)
    bag = write_bag(tmp_path / 'gps', frames, pose_type='navsat', navsat_origin=origin)
    with open_bag(bag) as reader:
        fixes = [
            msg
            for connection, _, msg in iter_messages(reader, reader.connections, bag)
            if connection.topic == ODOM
        ]
    plane = LocalTangentPlane(*origin)
    for frame, fix in zip(frames, fixes):
        assert frame.pose is not None
        assert fix.status.status >= 0  # a fix
        east_north_up = plane.to_enu(fix.latitude, fix.longitude, fix.altitude)
        np.testing.assert_allclose(east_north_up, (frame.pose.x, frame.pose.y, 0.0), atol=1e-6)
    assert math.isclose(fixes[0].latitude, origin[0])


def test_rosbag1_headers_count_up_their_sequence_numbers(tmp_path: Path) -> None:
    bag = write_bag(tmp_path / 'seq.bag', make_frames(3), storage='rosbag1', pose_topic=None)
    with open_bag(bag) as reader:
        seqs = [msg.header.seq for _, _, msg in iter_messages(reader, reader.connections, bag)]
    assert seqs == [1, 2, 3]


def test_write_bag_rejects_bad_arguments(tmp_path: Path) -> None:
    frames = make_frames(1)
    with pytest.raises(ValueError, match="unknown storage 'ros3'"):
        write_bag(tmp_path / 'x', frames, storage='ros3')
    with pytest.raises(ValueError, match="unknown pose_type 'twist'"):
        write_bag(tmp_path / 'x', frames, pose_type='twist')
    with pytest.raises(ValueError, match='add the .bag suffix'):
        write_bag(tmp_path / 'x', frames, storage='rosbag1')
    with pytest.raises(ValueError, match='given together'):
        write_bag(tmp_path / 'x', frames, poses=[Pose(0, 0, 0)])
    write_bag(tmp_path / 'x', frames)
    with pytest.raises(FileExistsError, match='exists already'):
        write_bag(tmp_path / 'x', frames)
