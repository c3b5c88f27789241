"""vpr_ros.frames: a map's pose frame and which frames drift (REP-105)."""

from __future__ import annotations

import numpy as np
import pytest

from vpr_ros.database import PLACE_DTYPE, PLACE_RECORD_DTYPE
from vpr_ros.errors import DatabaseError
from vpr_ros.frames import is_drifting_frame, map_pose_frame, pose_frames


def places(*frames: str, posed: bool = True) -> np.ndarray:
    rows = np.zeros(len(frames), PLACE_RECORD_DTYPE)
    rows['frame_id'] = frames
    if not posed:
        rows['x'] = np.nan
    return rows


def test_a_map_records_the_frame_of_its_place_poses() -> None:
    assert map_pose_frame(places('world', 'world', '')) == 'world'
    assert pose_frames(places('odom', 'odom')) == ['odom']


def test_a_map_without_poses_or_frame_ids_has_no_frame() -> None:
    assert map_pose_frame(places('', '')) == ''
    assert map_pose_frame(places('camera', posed=False)) == ''
    assert map_pose_frame(np.zeros(0, PLACE_DTYPE)) == ''


def test_a_stored_map_names_its_frame_through_its_string_table() -> None:
    rows = np.zeros(3, PLACE_DTYPE)
    rows['frame_id'] = [2, 2, 0]
    rows['x'][2] = np.nan  # no pose: its frame does not count
    assert map_pose_frame(rows, strings=['camera', '', 'world']) == 'world'


def test_a_map_that_mixes_frames_is_refused_with_the_frames_named() -> None:
    with pytest.raises(DatabaseError, match=r"map 'm' mixes place poses in the frames \['map', "):
        map_pose_frame(places('odom', 'map'), where="map 'm'")


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
