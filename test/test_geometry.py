"""Tests of vpr_ros.geometry against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vpr_ros.geometry import LocalTangentPlane, PoseTrack, distance_m, rotation_angle_deg
from vpr_ros.types import Pose

S = 1_000_000_000  # one second in ns
T0 = 1_700_000_000 * S  # a realistic epoch stamp, far beyond float64's integer precision in ns


def yaw_quaternion(deg: float) -> tuple[float, float, float, float]:
    half = math.radians(deg) / 2
    return (0.0, 0.0, math.sin(half), math.cos(half))


@pytest.fixture
def track() -> PoseTrack:
    """Two samples one second apart: from the origin at yaw 0 to (2, 4, 6) at yaw 90 deg."""
    return PoseTrack(
        [T0, T0 + S],
        [(0.0, 0.0, 0.0), (2.0, 4.0, 6.0)],
        [yaw_quaternion(0), yaw_quaternion(90)],
    )


def test_midpoint_is_half_way_in_position_and_45_degrees_in_yaw(track: PoseTrack) -> None:
    pose = track.interpolate(T0 + S // 2, max_gap_ns=2 * S)
    assert pose is not None
    assert (pose.x, pose.y, pose.z) == pytest.approx((1.0, 2.0, 3.0))
    # slerp of yaw 0 and yaw 90 at t = 0.5: yaw 45, quaternion (0, 0, sin 22.5, cos 22.5)
    assert (pose.qx, pose.qy, pose.qz, pose.qw) == pytest.approx(
        (0.0, 0.0, 0.3826834324, 0.9238795325)
    )


def test_quarter_point_is_linear_in_position_and_slerped_in_yaw(track: PoseTrack) -> None:
    pose = track.interpolate(T0 + S // 4)
    assert pose is not None
    assert (pose.x, pose.y, pose.z) == pytest.approx((0.5, 1.0, 1.5))
    assert rotation_angle_deg(pose, yaw_quaternion(22.5)) == pytest.approx(0.0, abs=1e-6)


def test_one_nanosecond_steps_are_resolved_at_epoch_stamps() -> None:
    track = PoseTrack([T0, T0 + 4], [(0, 0, 0), (4, 0, 0)], [(0, 0, 0, 1)] * 2)
    pose = track.interpolate(T0 + 1)
    assert pose is not None
    assert pose.x == pytest.approx(1.0)


def test_stamp_between_samples_further_apart_than_the_gap_gives_none() -> None:
    track = PoseTrack([0, 2 * S], [(0, 0, 0), (1, 0, 0)], [(0, 0, 0, 1)] * 2)
    assert track.interpolate(S, max_gap_ns=S) is None
    assert track.interpolate(S, max_gap_ns=2 * S) is not None


def test_exact_sample_hit_is_valid_even_next_to_a_large_gap() -> None:
    track = PoseTrack([0, 10 * S], [(0, 0, 0), (1, 0, 0)], [(0, 0, 0, 1)] * 2)
    assert track.interpolate(10 * S, max_gap_ns=S) == Pose(1.0, 0.0, 0.0)
    assert track.interpolate(0, max_gap_ns=S) == Pose(0.0, 0.0, 0.0)


def test_stamps_outside_the_track_give_none(track: PoseTrack) -> None:
    assert track.interpolate(T0 - 1) is None
    assert track.interpolate(T0 + S + 1) is None


def test_samples_are_sorted_and_duplicate_stamps_keep_the_first() -> None:
    track = PoseTrack(
        [2 * S, 0, 2 * S],
        [(2, 0, 0), (0, 0, 0), (9, 9, 9)],
        [(0, 0, 0, 1), (0, 0, 0, 2), (0, 0, 0, 1)],
    )
    assert len(track) == 2
    pose = track.interpolate(S)
    assert pose is not None
    assert pose.x == pytest.approx(1.0)
    assert pose.qw == pytest.approx(1.0)  # quaternions are normalised


def test_interpolate_many_matches_interpolate(track: PoseTrack) -> None:
    stamps = [T0 - S, T0, T0 + S // 3, T0 + S, T0 + 2 * S]
    positions, quaternions, valid = track.interpolate_many(stamps, max_gap_ns=2 * S)
    assert valid.tolist() == [False, True, True, True, False]
    for stamp, position, quaternion, ok in zip(stamps, positions, quaternions, valid):
        pose = track.interpolate(stamp, max_gap_ns=2 * S)
        if ok:
            assert pose is not None
            np.testing.assert_allclose(pose.as_array(), np.r_[position, quaternion])
        else:
            assert pose is None
            assert np.isnan(position).all()


def test_single_sample_track_only_answers_its_own_stamp() -> None:
    track = PoseTrack([S], [(1, 2, 3)], [(0, 0, 0, 1)])
    assert track.interpolate(S) == Pose(1.0, 2.0, 3.0)
    assert track.interpolate(S + 1) is None
    assert PoseTrack([], np.zeros((0, 3)), np.zeros((0, 4))).interpolate(S) is None


def test_invalid_tracks_raise() -> None:
    with pytest.raises(ValueError, match='same length, got 2, 1 and 2'):
        PoseTrack([0, 1], [(0, 0, 0)], [(0, 0, 0, 1)] * 2)
    with pytest.raises(ValueError, match=r'quaternion \[0.0, 0.0, 0.0, 0.0\] at index 1'):
        PoseTrack([0, 1], [(0, 0, 0)] * 2, [(0, 0, 0, 1), (0, 0, 0, 0)])


def meridian_radius(lat_deg: float) -> float:
    a, f = 6378137.0, 1 / 298.257223563
    e2 = f * (2 - f)
    return a * (1 - e2) / (1 - e2 * math.sin(math.radians(lat_deg)) ** 2) ** 1.5


def normal_radius(lat_deg: float) -> float:
    a, f = 6378137.0, 1 / 298.257223563
    e2 = f * (2 - f)
    return a / math.sqrt(1 - e2 * math.sin(math.radians(lat_deg)) ** 2)


def test_a_point_100_m_north_is_at_enu_0_100() -> None:
    lat0, lon0, alt0 = 47.0, 8.0, 400.0
    plane = LocalTangentPlane(lat0, lon0, alt0)
    dlat = math.degrees(100.0 / meridian_radius(lat0))
    east, north, up = plane.to_enu(lat0 + dlat, lon0, alt0)
    assert east == pytest.approx(0.0, abs=1e-6)
    assert north == pytest.approx(100.0, abs=0.01)
    assert up == pytest.approx(-(100.0**2) / (2 * 6.37e6), abs=1e-3)  # earth curvature: -0.8 mm


def test_a_point_100_m_east_is_at_enu_100_0() -> None:
    lat0, lon0 = -33.9, 151.2
    plane = LocalTangentPlane(lat0, lon0, 0.0)
    dlon = math.degrees(100.0 / (normal_radius(lat0) * math.cos(math.radians(lat0))))
    east, north, _ = plane.to_enu(lat0, lon0 + dlon, 0.0)
    assert east == pytest.approx(100.0, abs=0.01)
    assert north == pytest.approx(0.0, abs=0.01)


def test_enu_and_geodetic_are_inverse_and_vectorised() -> None:
    plane = LocalTangentPlane(47.3769, 8.5417, 408.0)
    assert plane.to_enu(47.3769, 8.5417, 408.0) == pytest.approx((0.0, 0.0, 0.0), abs=1e-6)
    enu = np.array([[0.0, 0.0, 0.0], [100.0, -250.0, 3.0], [-1500.0, 2000.0, -20.0]])
    lat, lon, alt = plane.to_geodetic(enu[:, 0], enu[:, 1], enu[:, 2])
    assert lat.shape == (3,)
    np.testing.assert_allclose(plane.to_enu(lat, lon, alt), enu, atol=1e-6)


def test_invalid_enu_origin_raises() -> None:
    with pytest.raises(ValueError, match='invalid ENU origin'):
        LocalTangentPlane(91.0, 0.0, 0.0)
    with pytest.raises(ValueError, match='invalid ENU origin'):
        LocalTangentPlane(float('nan'), 0.0, 0.0)


def test_rotation_angle_between_orientations() -> None:
    assert rotation_angle_deg(yaw_quaternion(0), yaw_quaternion(90)) == pytest.approx(90.0)
    assert rotation_angle_deg(yaw_quaternion(170), yaw_quaternion(-170)) == pytest.approx(20.0)
    q = yaw_quaternion(30)
    assert rotation_angle_deg(q, tuple(-v for v in q)) == pytest.approx(0.0, abs=1e-6)
    assert rotation_angle_deg(Pose(0, 0, 0), Pose(5, 5, 5, *yaw_quaternion(45))) == pytest.approx(
        45.0
    )


def test_distance_between_positions_or_poses() -> None:
    assert distance_m((0, 0, 0), (3, 4, 0)) == pytest.approx(5.0)
    assert distance_m(Pose(1, 1, 1), Pose(1, 1, 3, *yaw_quaternion(90))) == pytest.approx(2.0)
