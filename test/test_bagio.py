"""Tests of vpr_ros.bagio: reading real tiny bags (written by vpr_ros.bagwriter or rosbags)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from conftest import T0, S, bag_path, make_frames, storage_file
from rosbags.rosbag2 import Writer
from rosbags.typesys import Stores, get_typestore

from vpr_ros.bagio import NO_POSE_REASON, bag_topics, count_messages, read_frames
from vpr_ros.bagwriter import DEFAULT_NAVSAT_ORIGIN, STORAGES, write_bag
from vpr_ros.errors import BagReadError
from vpr_ros.images import rgb_to_image_fields
from vpr_ros.types import Pose, SkipCounter

IMAGE = '/camera/image_raw'
ODOM = '/odom'


def test_navsat_positions_default_to_the_first_fix_as_enu_origin(tmp_path: Path) -> None:
    frames = make_frames(3)
    bag = write_bag(tmp_path / 'gps', frames, pose_topic='/fix', pose_type='navsat')
    got = list(read_frames(bag, IMAGE, '/fix'))
    # frames are at (i, 0.5 i, 0); relative to the first, which is the origin here
    for i, frame in enumerate(got):
        assert frame.pose is not None
        np.testing.assert_allclose(
            (frame.pose.x, frame.pose.y, frame.pose.z), (i, 0.5 * i, 0.0), atol=1e-3
        )


def test_the_frame_stream_reports_the_enu_origin_it_fixed_or_was_given(tmp_path: Path) -> None:
    frames = make_frames(3)
    bag = write_bag(tmp_path / 'gps', frames, pose_topic='/fix', pose_type='navsat')
    fixed = read_frames(bag, IMAGE, '/fix')
    assert fixed.enu_origin is None  # nothing read yet
    list(fixed)
    assert fixed.enu_origin == pytest.approx(DEFAULT_NAVSAT_ORIGIN)  # frame 0 is at ENU 0

    given = (47.3770, 8.5417, 400.0)  # about 11 m north and 8 m below
    frames_around_given = read_frames(bag, IMAGE, '/fix', enu_origin=given)
    first = next(frames_around_given)
    assert frames_around_given.enu_origin == given
    assert first.pose is not None
    assert first.pose.y == pytest.approx(-11.1, abs=0.1)
    assert first.pose.z == pytest.approx(8.0, abs=0.01)


def write_navsat_bag(path: Path, statuses: list[int]) -> None:
    """A bag written with rosbags directly: images and NavSatFix messages at the same stamps,
    fix ``i`` 1 m further north with status ``statuses[i]`` (-1: no fix)."""
    typestore = get_typestore(Stores.ROS2_HUMBLE)
    types = typestore.types
    plane_north_m = 1.0 / 111_195  # degrees of latitude per metre, roughly
    rgb = make_frames(1)[0].image
    with Writer(path, version=9) as writer:
        images = writer.add_connection(IMAGE, 'sensor_msgs/msg/Image', typestore=typestore)
        fixes = writer.add_connection('/fix', 'sensor_msgs/msg/NavSatFix', typestore=typestore)
        for i, status in enumerate(statuses):
            stamp_ns = T0 + i * S
            header = types['std_msgs/msg/Header'](
                stamp=types['builtin_interfaces/msg/Time'](sec=stamp_ns // S, nanosec=0),
                frame_id='gps',
            )
            fix = types['sensor_msgs/msg/NavSatFix'](
                header=header,
                status=types['sensor_msgs/msg/NavSatStatus'](status=status, service=1),
                latitude=47.0 + i * plane_north_m,
                longitude=8.0,
                altitude=float('nan') if i == 2 else 500.0,
                position_covariance=np.zeros(9),
                position_covariance_type=0,
            )
            writer.write(fixes, stamp_ns, typestore.serialize_cdr(fix, fixes.msgtype))
            encoding, height, width, step, data = rgb_to_image_fields(rgb)
            image = types['sensor_msgs/msg/Image'](
                header=header,
                height=height,
                width=width,
                encoding=encoding,
                is_bigendian=0,
                step=step,
                data=np.frombuffer(data, dtype=np.uint8),
            )
            writer.write(images, stamp_ns, typestore.serialize_cdr(image, images.msgtype))


def test_navsat_fixes_without_a_fix_are_dropped_and_the_first_real_fix_is_the_origin(
    tmp_path: Path,
) -> None:
    bag = tmp_path / 'gps'
    write_navsat_bag(bag, [-1, 0, 0, 2])
    skips = SkipCounter()
    frames = read_frames(bag, IMAGE, '/fix', max_pose_gap_s=1.0, skips=skips)
    got = list(frames)
    # Image 0 has only the no-fix message at its stamp: no pose.
    assert skips.counts == {NO_POSE_REASON: 1}
    assert frames.enu_origin == (pytest.approx(47.0 + 1 / 111_195), 8.0, 500.0)
    assert [f.pose_frame_id for f in got] == ['gps'] * 3
    # North from fix 1; fix 2 has no altitude and takes the origin's.
    np.testing.assert_allclose([f.pose.y for f in got if f.pose], [0.0, 1.0, 2.0], atol=0.02)
    np.testing.assert_allclose([f.pose.z for f in got if f.pose], [0.0, 0.0, 0.0], atol=1e-3)


def test_images_get_poses_interpolated_from_a_slower_pose_topic(tmp_path: Path) -> None:
    frames = make_frames(6, with_poses=False)  # 0.0 .. 0.5 s
    half = math.radians(90.0) / 2
    poses = [Pose(0.0, 0.0, 0.0), Pose(10.0, 0.0, 0.0, 0.0, 0.0, math.sin(half), math.cos(half))]
    bag = write_bag(
        tmp_path / 'slow',
        frames,
        storage='mcap',
        pose_stamps_ns=[T0 + S // 10, T0 + 5 * S // 10],  # poses at 0.1 s and 0.5 s
        poses=poses,
    )
    skips = SkipCounter()
    got = list(read_frames(bag, IMAGE, ODOM, max_pose_gap_s=0.5, skips=skips))

    assert [f.msg_index for f in got] == [1, 2, 3, 4, 5]
    assert skips.counts == {NO_POSE_REASON: 1}  # the image at 0.0 s is before the first pose
    middle = got[2]  # 0.3 s: half way between the poses
    assert middle.pose is not None
    assert middle.pose.x == pytest.approx(5.0)
    assert middle.pose.qz == pytest.approx(math.sin(math.radians(45.0) / 2))
    assert got[1].pose is not None and got[1].pose.x == pytest.approx(2.5)


def test_images_between_poses_further_apart_than_the_gap_are_skipped_and_counted(
    tmp_path: Path,
) -> None:
    frames = make_frames(6, with_poses=False)
    bag = write_bag(
        tmp_path / 'gap',
        frames,
        pose_stamps_ns=[T0, T0 + 5 * S // 10],
        poses=[Pose(0.0, 0.0, 0.0), Pose(5.0, 0.0, 0.0)],
    )
    skips = SkipCounter()
    got = list(read_frames(bag, IMAGE, ODOM, max_pose_gap_s=0.2, skips=skips))
    assert [f.msg_index for f in got] == [0, 5]  # exact pose hits only
    assert skips.counts == {NO_POSE_REASON: 4}


def test_frames_without_pose_topic_have_no_pose(tmp_path: Path) -> None:
    bag = write_bag(tmp_path / 'nopose', make_frames(3), pose_topic=None)
    assert bag_topics(bag) == {IMAGE: 'sensor_msgs/msg/Image'}
    got = list(read_frames(bag, IMAGE))
    assert [(f.pose, f.pose_frame_id) for f in got] == [(None, '')] * 3


def test_zero_header_stamps_fall_back_to_the_bag_receive_time(tmp_path: Path) -> None:
    frames = make_frames(3)
    bag = write_bag(tmp_path / 'zero', frames, stamp_headers=False)
    got = list(read_frames(bag, IMAGE, ODOM))
    assert [f.stamp_ns for f in got] == [f.stamp_ns for f in frames]
    np.testing.assert_allclose(
        [f.pose.as_array() for f in got if f.pose], [f.pose.as_array() for f in frames if f.pose]
    )


@pytest.mark.parametrize('encoding', ['bgr8', 'rgba8', 'mono16'])
def test_raw_image_encodings_are_decoded_from_a_bag(tmp_path: Path, encoding: str) -> None:
    frames = make_frames(2)
    bag = write_bag(tmp_path / encoding, frames, encoding=encoding, pose_topic=None)
    got = list(read_frames(bag, IMAGE))
    if encoding == 'mono16':
        assert np.ptp(got[0].image, axis=2).max() == 0  # grey in all three channels
    else:
        np.testing.assert_array_equal(got[1].image, frames[1].image)


def test_storage_files_inside_a_rosbag2_directory_can_be_read_directly(tmp_path: Path) -> None:
    for storage in ('sqlite3', 'mcap'):
        bag = write_bag(tmp_path / storage, make_frames(2), storage=storage)
        file = storage_file(bag)
        assert len(list(read_frames(file, IMAGE, ODOM))) == 2
        assert count_messages(file, ODOM) == 2


def test_several_bags_are_read_in_order_with_per_bag_message_indexes(tmp_path: Path) -> None:
    first = write_bag(tmp_path / 'a.bag', make_frames(2), storage='rosbag1')
    second = write_bag(tmp_path / 'b', make_frames(3), storage='mcap')
    got = list(read_frames([first, second], IMAGE, ODOM))
    assert [(Path(f.source).name, f.msg_index) for f in got] == [
        ('a.bag', 0),
        ('a.bag', 1),
        ('b', 0),
        ('b', 1),
        ('b', 2),
    ]
    assert count_messages([first, second], IMAGE) == 5


def test_topic_names_match_with_or_without_leading_slash(tmp_path: Path) -> None:
    bag = write_bag(tmp_path / 'r.bag', make_frames(2), storage='rosbag1')
    assert len(list(read_frames(bag, IMAGE.lstrip('/'), ODOM.lstrip('/')))) == 2


def test_missing_topic_error_lists_the_bag_topics_with_types(tmp_path: Path) -> None:
    bag = write_bag(tmp_path / 'run', make_frames(2))
    listing = r'/camera/image_raw \(sensor_msgs/msg/Image\), /odom \(nav_msgs/msg/Odometry\)'
    with pytest.raises(BagReadError, match=f"has no image topic '/front/image'.*{listing}"):
        read_frames(bag, '/front/image', ODOM)
    with pytest.raises(BagReadError, match=f"has no pose topic '/gps/fix'.*{listing}"):
        read_frames(bag, IMAGE, '/gps/fix')
    with pytest.raises(BagReadError, match=f"has no asked topic '/imu'.*{listing}"):
        count_messages(bag, '/imu')


def test_topic_of_the_wrong_type_raises(tmp_path: Path) -> None:
    bag = write_bag(tmp_path / 'run', make_frames(2))
    with pytest.raises(BagReadError, match="image topic '/odom' .* type 'nav_msgs/msg/Odometry'"):
        read_frames(bag, ODOM)
    with pytest.raises(BagReadError, match="pose topic '/camera/image_raw' .* expected one of"):
        read_frames(bag, IMAGE, IMAGE)


def test_missing_bag_path_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match='does not exist'):
        read_frames(tmp_path / 'nothing', IMAGE)
    with pytest.raises(FileNotFoundError, match='does not exist'):
        bag_topics(tmp_path / 'nothing.bag')


def test_unknown_bag_format_raises(tmp_path: Path) -> None:
    path = tmp_path / 'notes.txt'
    path.write_text('not a bag')
    with pytest.raises(BagReadError, match=r"unknown format '\.txt'"):
        bag_topics(path)


@pytest.mark.parametrize('storage', STORAGES)
def test_bag_truncated_to_half_raises_bag_read_error(tmp_path: Path, storage: str) -> None:
    bag = write_bag(bag_path(tmp_path, storage), make_frames(6), storage=storage)
    file = storage_file(bag)
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(BagReadError, match=f"bag '{bag}' is corrupt or truncated: .*repair"):
        list(read_frames(bag, IMAGE, ODOM))


@pytest.mark.parametrize('storage', STORAGES)
def test_bag_with_overwritten_bytes_raises_bag_read_error(tmp_path: Path, storage: str) -> None:
    bag = write_bag(bag_path(tmp_path, storage), make_frames(6), storage=storage)
    file = storage_file(bag)
    data = bytearray(file.read_bytes())
    start = len(data) // 3
    data[start : start + 2000] = b'\xff' * 2000
    file.write_bytes(bytes(data))
    with pytest.raises(BagReadError, match='corrupt or truncated'):
        list(read_frames(bag, IMAGE, ODOM))


@pytest.mark.parametrize('storage', ['mcap', 'rosbag1'])
def test_corruption_found_while_iterating_is_raised_as_bag_read_error(
    tmp_path: Path, storage: str
) -> None:
    bag = write_bag(bag_path(tmp_path, storage), make_frames(6), storage=storage)
    file = storage_file(bag)
    data = bytearray(file.read_bytes())
    start = len(data) // 3  # inside the message data; the index at the end stays intact
    data[start : start + 2000] = b'\xff' * 2000
    file.write_bytes(bytes(data))
    frames = read_frames(bag, IMAGE, ODOM)  # opens fine
    with pytest.raises(BagReadError, match='corrupt or truncated'):
        list(frames)


def write_bag_with_unknown_encoding(path: Path, encoding: str) -> None:
    """A bag written with rosbags directly: image 1 of 3 has an encoding vpr_ros cannot read."""
    typestore = get_typestore(Stores.ROS2_HUMBLE)
    types = typestore.types
    rgb = make_frames(1)[0].image
    with Writer(path, version=9) as writer:
        connection = writer.add_connection(IMAGE, 'sensor_msgs/msg/Image', typestore=typestore)
        for i in range(3):
            enc, height, width, step, data = rgb_to_image_fields(rgb)
            if i == 1:
                enc, step, data = encoding, width * 6, bytes(width * 6 * height)
            stamp_ns = T0 + i * S
            msg = types['sensor_msgs/msg/Image'](
                header=types['std_msgs/msg/Header'](
                    stamp=types['builtin_interfaces/msg/Time'](sec=stamp_ns // S, nanosec=0),
                    frame_id='camera',
                ),
                height=height,
                width=width,
                encoding=enc,
                is_bigendian=0,
                step=step,
                data=np.frombuffer(data, dtype=np.uint8),
            )
            serialized = typestore.serialize_cdr(msg, 'sensor_msgs/msg/Image')
            writer.write(connection, stamp_ns, serialized)


@pytest.mark.parametrize('encoding', ['rgb16', 'yuv422'])
def test_frame_with_unknown_encoding_is_skipped_and_counted(tmp_path: Path, encoding: str) -> None:
    bag = tmp_path / 'foreign'
    write_bag_with_unknown_encoding(bag, encoding)
    skips = SkipCounter()
    got = list(read_frames(bag, IMAGE, skips=skips))
    assert [f.msg_index for f in got] == [0, 2]
    assert skips.counts == {f'unknown encoding {encoding}': 1}
    assert count_messages(bag, IMAGE) == 3
