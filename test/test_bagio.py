"""Tests of vpr_ros.bagio: real tiny bags in every storage, written and read back."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from rosbags.rosbag2 import Writer
from rosbags.typesys import Stores, get_typestore

from vpr_ros.bagio import (
    NO_POSE_REASON,
    POSE_TYPES,
    STORAGES,
    bag_topics,
    count_messages,
    read_frames,
    write_bag,
)
from vpr_ros.errors import BagReadError
from vpr_ros.images import rgb_to_image_fields
from vpr_ros.types import Frame, Pose, SkipCounter

S = 1_000_000_000
T0 = 1_700_000_000 * S
IMAGE = '/camera/image_raw'
ODOM = '/odom'


def bag_path(tmp_path: Path, storage: str, name: str = 'run') -> Path:
    return tmp_path / (f'{name}.bag' if storage == 'rosbag1' else name)


def storage_file(bag: Path) -> Path:
    """The one file that holds the messages of a bag."""
    return (
        bag if bag.is_file() else next(p for p in bag.iterdir() if p.suffix in ('.db3', '.mcap'))
    )


def make_frames(n: int = 6, *, with_poses: bool = True) -> list[Frame]:
    """Tiny smooth 32x24 images, 0.1 s apart, moving 1 m along x and turning 10 deg per frame."""
    y, x = np.mgrid[0:24, 0:32]
    frames = []
    for i in range(n):
        image = np.stack([x * 8, y * 10, np.full_like(x, 40 * i)], axis=-1).astype(np.uint8)
        half = math.radians(10.0 * i) / 2
        pose = Pose(float(i), 0.5 * i, 0.0, 0.0, 0.0, math.sin(half), math.cos(half))
        frames.append(
            Frame(
                image=image,
                stamp_ns=T0 + i * S // 10,
                frame_id='camera_optical',
                pose=pose if with_poses else None,
            )
        )
    return frames


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
    assert bag_topics(bag)['/pose'] == POSE_TYPES[pose_type]
    origin = (47.3769, 8.5417, 408.0) if pose_type == 'navsat' else None
    got = list(read_frames(bag, IMAGE, '/pose', navsat_origin=origin))

    assert [f.pose_frame_id for f in got] == ['odom'] * 4
    for want, have in zip(frames, got):
        assert have.pose is not None and want.pose is not None
        np.testing.assert_allclose(have.pose.as_array()[:3], want.pose.as_array()[:3], atol=1e-6)
        if pose_type == 'navsat':  # NavSatFix has no orientation
            assert (have.pose.qx, have.pose.qy, have.pose.qz, have.pose.qw) == (0, 0, 0, 1)
        else:
            np.testing.assert_allclose(have.pose.as_array()[3:], want.pose.as_array()[3:])


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
