"""vpr_ros.frames: a map's pose frame and which frames drift (REP-105)."""

from __future__ import annotations

import numpy as np
import pytest

from vpr_ros.errors import DatabaseError
from vpr_ros.frames import is_drifting_frame, map_pose_frame, pose_frames


def places(*frames: str, posed: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Frame ids of places and whether each has a pose."""
    return np.array(frames, dtype=str), np.full(len(frames), posed)


def test_a_map_records_the_frame_of_its_place_poses() -> None:
    assert map_pose_frame(*places('world', 'world', '')) == 'world'
    assert pose_frames(*places('odom', 'odom')) == ['odom']


def test_a_map_without_poses_or_frame_ids_has_no_frame() -> None:
    assert map_pose_frame(*places('', '')) == ''
    assert map_pose_frame(*places('camera', posed=False)) == ''
    assert map_pose_frame(np.zeros(0, str), np.zeros(0, bool)) == ''


def test_only_the_frames_of_posed_places_count() -> None:
    frame_ids = np.array(['world', 'world', 'camera'])
    posed = np.array([True, True, False])  # the camera frame's place has no pose
    assert map_pose_frame(frame_ids, posed) == 'world'


def test_a_map_that_mixes_frames_is_refused_with_the_frames_named() -> None:
    with pytest.raises(DatabaseError, match=r"map 'm' mixes place poses in the frames \['map', "):
        map_pose_frame(*places('odom', 'map'), where="map 'm'")


@pytest.mark.parametrize(
    ('frame', 'drifting'),
    [
        ('odom', True),
        ('/odom', True),
        ('robot1/odom', True),
        ('wheel_odom', False),
        ('map', False),
        ('vio_odom', True),
    ],
)
def test_odometry_frames_are_recognised_also_under_a_namespace(frame: str, drifting: bool) -> None:
    assert is_drifting_frame(frame, ['odom', 'vio_odom', '']) is drifting
