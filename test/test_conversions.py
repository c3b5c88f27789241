"""Message building for the relocalize node: hypothesis table, poses, bag -> rclpy copies."""

from __future__ import annotations

import math

import numpy as np
import pytest

rclpy = pytest.importorskip('rclpy')
from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402
from rosbags.typesys import Stores, get_typestore  # noqa: E402
from sensor_msgs.msg import Image, PointCloud2, PointField  # noqa: E402
from std_msgs.msg import Header  # noqa: E402

from vpr_ros.nodes.bag_player import message_class, to_rclpy  # noqa: E402
from vpr_ros.nodes.conversions import (  # noqa: E402
    HYPOTHESIS_DTYPE,
    cloud_to_array,
    hypotheses_from_cloud,
    hypotheses_to_cloud,
    key_values,
    msg_to_pose,
    pose_array,
    pose_to_msg,
    pose_with_covariance,
)
from vpr_ros.types import Hypothesis, Pose, RelativePose  # noqa: E402

FIELDS = [
    'x',
    'y',
    'z',
    'qx',
    'qy',
    'qz',
    'qw',
    'place_id',
    'global_score',
    'rerank_score',
    'confidence',
    'inliers',
    'rel_x',
    'rel_y',
    'rel_z',
    'rel_qx',
    'rel_qy',
    'rel_qz',
    'rel_qw',
    'rel_inliers',
    'rel_metric',
]


def header(sec: int = 12, nanosec: int = 345, frame_id: str = 'map') -> Header:
    msg = Header(frame_id=frame_id)
    msg.stamp.sec, msg.stamp.nanosec = sec, nanosec
    return msg


def hypotheses() -> list[Hypothesis]:
    return [
        Hypothesis(
            4,
            40,
            0.91,
            0.62,
            0.55,
            Pose(123456.25, -7.5, 0.5, 0.0, 0.0, 0.6, 0.8),
            inliers=57,
            relative_pose=RelativePose(Pose(0.5, 0.0, -1.25, 0.0, 0.6, 0.0, 0.8), True, 41),
        ),
        Hypothesis(1, 10, 0.85, 0.31, 0.0, Pose(1.0, 2.0, 3.0)),
        Hypothesis(7, 70, 0.80, float('nan'), 0.0, None),
    ]


def assert_same_hypotheses(got: list[Hypothesis], expected: list[Hypothesis]) -> None:
    assert [h.place_id for h in got] == [h.place_id for h in expected]
    for a, b in zip(got, expected):
        assert a.global_score == pytest.approx(b.global_score, abs=1e-6)
        assert a.confidence == pytest.approx(b.confidence, abs=1e-6)
        if math.isnan(b.rerank_score):
            assert math.isnan(a.rerank_score)
        else:
            assert a.rerank_score == pytest.approx(b.rerank_score, abs=1e-6)
        if b.pose is None:
            assert a.pose is None
        else:
            np.testing.assert_allclose(a.pose.as_array(), b.pose.as_array())  # float64: exact
        assert a.inliers == b.inliers
        assert a.relative_pose == b.relative_pose  # float64 and integers: exact


def test_hypothesis_table_has_the_documented_fields_in_order() -> None:
    msg = hypotheses_to_cloud(hypotheses(), header())
    assert [f.name for f in msg.fields] == FIELDS
    types = {f.name: f.datatype for f in msg.fields}
    assert {types[name] for name in FIELDS[:7]} == {PointField.FLOAT64}
    assert types['place_id'] == PointField.INT32
    assert {types[n] for n in FIELDS[8:11]} == {PointField.FLOAT32}
    assert types['inliers'] == types['rel_inliers'] == PointField.INT32
    assert {types[n] for n in FIELDS[12:19]} == {PointField.FLOAT64}
    assert types['rel_metric'] == PointField.UINT8
    assert all(f.count == 1 for f in msg.fields)
    assert (msg.height, msg.width, msg.point_step) == (1, 3, HYPOTHESIS_DTYPE.itemsize)
    assert msg.row_step == 3 * msg.point_step == len(msg.data)
    assert not msg.is_bigendian
    assert not msg.is_dense  # the third hypothesis has no pose
    assert msg.header.frame_id == 'map' and msg.header.stamp.nanosec == 345


def test_hypotheses_survive_serialization_best_first() -> None:
    wire = serialize_message(hypotheses_to_cloud(hypotheses(), header()))
    msg = deserialize_message(wire, PointCloud2)
    got = hypotheses_from_cloud(msg)
    assert_same_hypotheses(got, hypotheses())
    assert all(h.place_index == -1 for h in got)


def test_empty_hypothesis_list_gives_an_empty_dense_table() -> None:
    msg = hypotheses_to_cloud([], header())
    assert msg.width == 0 and msg.is_dense and len(msg.data) == 0
    assert [f.name for f in msg.fields] == FIELDS
    assert hypotheses_from_cloud(deserialize_message(serialize_message(msg), PointCloud2)) == []


def test_place_ids_beyond_int32_are_refused() -> None:
    too_big = Hypothesis(0, 2**31, 0.5, 0.5, 0.5, None)
    with pytest.raises(ValueError, match='does not fit the int32'):
        hypotheses_to_cloud([too_big], header())


def test_cloud_to_array_reads_big_endian_clouds_with_padded_rows() -> None:
    dtype = np.dtype([('a', '>f4'), ('b', '>i2')])
    points = np.array([[(1.5, -2), (2.5, 3)], [(3.5, 4), (4.5, -5)]], dtype)  # 2 rows x 2
    padded = np.zeros((2, points.itemsize * 2 + 4), np.uint8)
    padded[:, : points.itemsize * 2] = points.view(np.uint8).reshape(2, -1)
    msg = PointCloud2(
        height=2,
        width=2,
        fields=[
            PointField(name='a', offset=0, datatype=PointField.FLOAT32, count=1),
            PointField(name='b', offset=4, datatype=PointField.INT16, count=1),
        ],
        is_bigendian=True,
        point_step=points.itemsize,
        row_step=padded.shape[1],
        data=padded.tobytes(),
    )
    table = cloud_to_array(msg)
    assert table['a'].tolist() == [1.5, 2.5, 3.5, 4.5]
    assert table['b'].tolist() == [-2, 3, 4, -5]


def test_reading_a_cloud_that_is_not_a_hypothesis_table_names_the_missing_fields() -> None:
    msg = PointCloud2(
        height=1,
        width=0,
        fields=[PointField(name='x', offset=0, datatype=PointField.FLOAT32, count=1)],
        point_step=4,
    )
    with pytest.raises(ValueError, match="lacks the fields .*'place_id'"):
        hypotheses_from_cloud(msg)


def test_cloud_with_too_few_data_bytes_is_refused() -> None:
    msg = hypotheses_to_cloud(hypotheses(), header())
    msg.data = msg.data[:-1]
    with pytest.raises(ValueError, match='does not fit'):
        cloud_to_array(msg)


def test_pose_with_covariance_scales_the_variances_by_confidence() -> None:
    best = hypotheses()[0]
    msg = pose_with_covariance(best, header(), [1.0, 2.0, 3.0, 0.1, 0.2, 0.3])
    assert msg.header.frame_id == 'map' and msg.header.stamp.sec == 12
    assert msg_to_pose(msg.pose.pose) == best.pose
    covariance = np.asarray(msg.pose.covariance).reshape(6, 6)
    expected = np.diag([1.0, 2.0, 3.0, 0.1, 0.2, 0.3]) / 0.55
    np.testing.assert_allclose(covariance, expected)


def test_pose_with_covariance_of_zero_confidence_stays_finite() -> None:
    certainless = Hypothesis(0, 0, 0.5, 0.1, 0.0, Pose(0.0, 0.0, 0.0))
    msg = pose_with_covariance(certainless, header(), [1.0] * 6)
    assert np.isfinite(msg.pose.covariance).all()
    assert msg.pose.covariance[0] == pytest.approx(100.0)


def test_pose_with_covariance_needs_a_pose_and_six_variances() -> None:
    with pytest.raises(ValueError, match='has no pose'):
        pose_with_covariance(hypotheses()[2], header(), [1.0] * 6)
    with pytest.raises(ValueError, match='needs 6 values'):
        pose_with_covariance(hypotheses()[0], header(), [1.0] * 3)


def test_pose_array_keeps_the_order_and_skips_hypotheses_without_pose() -> None:
    msg = pose_array(hypotheses(), header())
    assert msg.header.frame_id == 'map'
    assert [msg_to_pose(p) for p in msg.poses] == [h.pose for h in hypotheses()[:2]]


def test_pose_round_trip() -> None:
    pose = Pose(1.0, -2.0, 3.5, 0.0, 0.6, 0.0, 0.8)
    assert msg_to_pose(pose_to_msg(pose)) == pose


def test_key_values_format_floats_briefly() -> None:
    pairs = key_values({'rate': 12.3456789, 'count': 3, 'name': 'x', 'on': True})
    assert [(kv.key, kv.value) for kv in pairs] == [
        ('rate', '12.35'),
        ('count', '3'),
        ('name', 'x'),
        ('on', 'True'),
    ]


def test_bag_messages_become_rclpy_messages_field_by_field() -> None:
    for store in (Stores.ROS2_HUMBLE, Stores.ROS1_NOETIC):  # ROS 1 headers carry a seq
        types = get_typestore(store).types
        header_fields = {'stamp': types['builtin_interfaces/msg/Time'](sec=5, nanosec=7)}
        if 'seq' in types['std_msgs/msg/Header'].__dataclass_fields__:
            header_fields['seq'] = 3
        bag_header = types['std_msgs/msg/Header'](frame_id='cam', **header_fields)
        data = np.arange(2 * 3 * 3, dtype=np.uint8)
        image = types['sensor_msgs/msg/Image'](
            header=bag_header,
            height=2,
            width=3,
            encoding='rgb8',
            is_bigendian=0,
            step=9,
            data=data,
        )
        msg = to_rclpy(image, message_class('sensor_msgs/msg/Image'))
        assert isinstance(msg, Image)
        assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (5, 7)
        assert (msg.header.frame_id, msg.height, msg.width, msg.step) == ('cam', 2, 3, 9)
        assert bytes(msg.data) == data.tobytes()
        serialize_message(msg)  # a valid message


def test_bag_pose_arrays_copy_nested_message_sequences() -> None:
    types = get_typestore(Stores.ROS2_HUMBLE).types
    pose = types['geometry_msgs/msg/Pose'](
        position=types['geometry_msgs/msg/Point'](x=1.0, y=2.0, z=3.0),
        orientation=types['geometry_msgs/msg/Quaternion'](x=0.0, y=0.0, z=0.0, w=1.0),
    )
    stamp = types['builtin_interfaces/msg/Time'](sec=1, nanosec=2)
    bag_msg = types['geometry_msgs/msg/PoseArray'](
        header=types['std_msgs/msg/Header'](stamp=stamp, frame_id='map'), poses=[pose, pose]
    )
    msg = to_rclpy(bag_msg, message_class('geometry_msgs/msg/PoseArray'))
    assert [msg_to_pose(p) for p in msg.poses] == [Pose(1.0, 2.0, 3.0)] * 2
    odometry = types['nav_msgs/msg/Odometry']
    assert message_class(odometry.__msgtype__).__name__ == 'Odometry'
