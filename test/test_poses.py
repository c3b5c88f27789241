"""Tests of vpr_ros.poses: pose messages (rosbags and rclpy alike) -> pose tracks."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import T0, S, make_frames

from vpr_ros.bagio import iter_messages, open_bag
from vpr_ros.bagwriter import DEFAULT_NAVSAT_ORIGIN, write_bag
from vpr_ros.geometry import LocalTangentPlane
from vpr_ros.poses import (
    IDENTITY_QUATERNION,
    NO_FIX,
    NON_FINITE_POSITION,
    POSE_MSGTYPES,
    POSE_TYPES,
    PoseTrackBuilder,
    message_stamp_ns,
    pose_type_of,
)

rclpy = pytest.importorskip('rclpy')
from geometry_msgs.msg import PoseStamped, PoseWithCovarianceStamped  # noqa: E402
from nav_msgs.msg import Odometry  # noqa: E402
from sensor_msgs.msg import NavSatFix, NavSatStatus  # noqa: E402

RCLPY_CLASSES = {
    'odometry': Odometry,
    'pose_stamped': PoseStamped,
    'pose_cov': PoseWithCovarianceStamped,
    'navsat': NavSatFix,
}


def rclpy_pose(
    kind: str,
    stamp_ns: int,
    position: tuple[float, float, float],
    quaternion: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 1.0),
    frame_id: str = 'odom',
) -> Any:
    """An rclpy pose message of ``kind`` (NavSatFix: ``position`` is lat, lon, alt)."""
    msg = RCLPY_CLASSES[kind]()
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, S)
    msg.header.frame_id = frame_id
    if kind == 'navsat':
        msg.latitude, msg.longitude, msg.altitude = position
        msg.status.status = NavSatStatus.STATUS_FIX
        return msg
    pose = msg.pose if kind == 'pose_stamped' else msg.pose.pose
    pose.position.x, pose.position.y, pose.position.z = position
    q = pose.orientation
    q.x, q.y, q.z, q.w = quaternion
    return msg


def rosbags_poses(tmp_path: Path, kind: str) -> list[Any]:
    """The pose messages of a bag written by vpr_ros.bagwriter, as rosbags reads them."""
    bag = write_bag(tmp_path / kind, make_frames(4), pose_topic='/pose', pose_type=kind)
    with open_bag(bag) as reader:
        connections = [c for c in reader.connections if c.topic == '/pose']
        return [msg for _, _, msg in iter_messages(reader, connections, bag)]


def rclpy_poses(kind: str) -> list[Any]:
    """The same poses as :func:`rosbags_poses`, as rclpy messages."""
    plane = LocalTangentPlane(*DEFAULT_NAVSAT_ORIGIN)
    messages = []
    for frame in make_frames(4):
        pose = frame.pose
        assert pose is not None
        if kind == 'navsat':
            lat, lon, alt = (float(v) for v in plane.to_geodetic(pose.x, pose.y, pose.z))
            messages.append(rclpy_pose(kind, frame.stamp_ns, (lat, lon, alt), frame_id='map'))
        else:
            quaternion = (pose.qx, pose.qy, pose.qz, pose.qw)
            messages.append(
                rclpy_pose(kind, frame.stamp_ns, (pose.x, pose.y, pose.z), quaternion, 'map')
            )
    return messages


@pytest.mark.parametrize('kind', list(POSE_TYPES))
def test_rosbags_and_rclpy_messages_of_every_pose_type_give_the_same_track(
    tmp_path: Path, kind: str
) -> None:
    tracks = []
    for messages in (rosbags_poses(tmp_path, kind), rclpy_poses(kind)):
        builder = PoseTrackBuilder('/pose')
        assert all(builder.add(msg, POSE_TYPES[kind]) for msg in messages)
        assert builder.frame_id == 'map'
        assert builder.issues() == []
        tracks.append(builder.track())
    from_bag, from_rclpy = tracks
    np.testing.assert_array_equal(from_bag.stamps_ns, [f.stamp_ns for f in make_frames(4)])
    np.testing.assert_array_equal(from_bag.stamps_ns, from_rclpy.stamps_ns)
    np.testing.assert_allclose(from_bag.positions, from_rclpy.positions, atol=1e-9)
    np.testing.assert_allclose(from_bag.quaternions, from_rclpy.quaternions, atol=1e-12)
    expected = [f.pose.as_array() for f in make_frames(4) if f.pose]
    np.testing.assert_allclose(from_bag.positions, np.array(expected)[:, :3], atol=1e-6)
    if kind == 'navsat':  # no orientation: identity
        np.testing.assert_array_equal(from_bag.quaternions, [IDENTITY_QUATERNION] * 4)


def test_a_navsat_track_is_centred_on_the_first_fix_unless_an_origin_is_given() -> None:
    fixes = [
        rclpy_pose('navsat', T0, (47.0, 8.0, 500.0)),
        rclpy_pose('navsat', T0 + S, (47.001, 8.0, math.nan)),  # unknown altitude
    ]
    first = PoseTrackBuilder('/fix')
    for fix in fixes:
        first.add(fix, POSE_TYPES['navsat'])
    assert first.enu_origin == (47.0, 8.0, 500.0)
    np.testing.assert_allclose(first.track().positions[0], (0.0, 0.0, 0.0), atol=1e-9)
    north = first.track().positions[1]
    assert north[1] == pytest.approx(111.2, abs=0.1)  # 0.001 deg of latitude
    assert north[2] == pytest.approx(0.0, abs=0.01)  # the origin's altitude

    given = PoseTrackBuilder('/fix', enu_origin=(47.001, 8.0, 500.0))
    for fix in fixes:
        given.add(fix, POSE_TYPES['navsat'])
    assert given.enu_origin == (47.001, 8.0, 500.0)
    assert given.track().positions[0][1] == pytest.approx(-111.2, abs=0.1)


def test_unusable_poses_are_dropped_and_counted_and_zero_quaternions_become_identity() -> None:
    issues: list[str] = []
    builder = PoseTrackBuilder('odom', on_issue=issues.append)
    odometry = POSE_TYPES['odometry']
    no_fix = rclpy_pose('navsat', T0, (47.0, 8.0, 500.0))
    no_fix.status.status = NavSatStatus.STATUS_NO_FIX
    assert not builder.add(no_fix, POSE_TYPES['navsat'])
    assert not builder.add(rclpy_pose('odometry', T0, (math.nan, 0.0, 0.0)), odometry)
    assert not builder.add(rclpy_pose('odometry', T0, (0.0, math.inf, 0.0)), odometry)
    zero = (0.0, 0.0, 0.0, 0.0)
    assert builder.add(rclpy_pose('odometry', T0, (1.0, 0.0, 0.0), zero), odometry)
    assert builder.add(rclpy_pose('odometry', T0 + S, (2.0, 0.0, 0.0), zero), odometry)
    nan_quaternion = (math.nan, 0.0, 0.0, 1.0)
    assert builder.add(
        rclpy_pose('odometry', T0 + 2 * S, (3.0, 0.0, 0.0), nan_quaternion), odometry
    )

    assert builder.ignored.counts == {NO_FIX: 1, NON_FINITE_POSITION: 2}
    assert builder.identity_orientations == 3
    assert builder.enu_origin is None  # a fix without a fix fixes nothing
    track = builder.track()
    np.testing.assert_array_equal(track.positions[:, 0], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(track.quaternions, [IDENTITY_QUATERNION] * 3)
    # Told once per kind as it happens; the summary counts.
    assert len(issues) == 3
    assert builder.issues() == [
        "ignored 1 NavSatFix messages without a fix on 'odom'",
        "ignored 2 pose messages on 'odom' with a non-finite position",
        "3 pose messages on 'odom' have a zero or non-finite quaternion; using identity "
        'orientation for them',
    ]


def test_a_topic_that_mixes_frame_ids_keeps_the_first_and_says_so() -> None:
    issues: list[str] = []
    builder = PoseTrackBuilder('odom', on_issue=issues.append)
    for i, frame_id in enumerate(['odom', 'map', 'odom', 'map']):
        builder.add(rclpy_pose('pose_stamped', T0 + i * S, (i, 0, 0), frame_id=frame_id),
                    POSE_TYPES['pose_stamped'])  # fmt: skip
    assert builder.frame_id == 'odom'
    assert issues == ["pose topic 'odom' mixes frame ids ['map', 'odom']; using 'odom'"]
    assert builder.issues() == issues
    assert len(builder) == 4


def test_a_topic_without_usable_poses_is_reported() -> None:
    builder = PoseTrackBuilder('odom')
    builder.add(rclpy_pose('odometry', T0, (math.nan, 0, 0)), POSE_TYPES['odometry'])
    assert len(builder.track()) == 0
    assert builder.track().interpolate(T0) is None
    assert builder.issues()[-1] == "pose topic 'odom' has no usable poses"


def test_a_bounded_builder_keeps_the_newest_samples() -> None:
    builder = PoseTrackBuilder('odom', max_samples=3)
    assert builder.newest_stamp_ns is None
    for i in range(5):
        builder.add(rclpy_pose('odometry', T0 + i * S, (i, 0, 0)), POSE_TYPES['odometry'])
    assert len(builder) == 3
    assert builder.newest_stamp_ns == T0 + 4 * S
    track = builder.track()
    np.testing.assert_array_equal(track.stamps_ns, [T0 + 2 * S, T0 + 3 * S, T0 + 4 * S])
    pose = track.interpolate(T0 + 5 * S // 2)
    assert pose is not None and pose.x == pytest.approx(2.5)


def test_zero_header_stamps_fall_back_to_the_receive_time() -> None:
    msg = rclpy_pose('odometry', 0, (1.0, 0.0, 0.0))
    assert message_stamp_ns(msg) == 0
    assert message_stamp_ns(msg, receive_ns=T0) == T0
    assert message_stamp_ns(rclpy_pose('odometry', T0, (1.0, 0.0, 0.0)), receive_ns=5) == T0
    builder = PoseTrackBuilder('odom')
    builder.add(msg, POSE_TYPES['odometry'], receive_ns=T0)
    assert builder.newest_stamp_ns == T0


def test_pose_types_are_found_by_message_type() -> None:
    assert POSE_MSGTYPES == tuple(t.msgtype for t in POSE_TYPES.values())
    assert pose_type_of('sensor_msgs/msg/NavSatFix') is POSE_TYPES['navsat']
    with pytest.raises(ValueError, match="'geometry_msgs/msg/Twist' is not a pose message type"):
        pose_type_of('geometry_msgs/msg/Twist')
