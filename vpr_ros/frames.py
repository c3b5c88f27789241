"""Coordinate frames of maps and of what the node publishes (REP-105), ROS-free.

A map's place poses are in the frame of the pose messages it was built from; each place
records that frame id (``places.npy`` ``frame_id``). REP-105 names ``map`` a fixed world
frame, in which poses do not drift, and ``odom`` a continuous frame that drifts: a pose in
``odom`` is only valid against the odometry of the same run. So a map built from odometry
cannot tell a localizer where the robot is later on; the node warns about such maps and
does not publish ``~/pose`` from them unless told to.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from vpr_ros.errors import DatabaseError

if TYPE_CHECKING:
    from vpr_ros.database import PlaceDatabase


def pose_frames(frame_ids: Sequence[str] | np.ndarray, posed: np.ndarray) -> list[str]:
    """The distinct frame ids of the places that have a pose (``posed``), sorted; empty frame
    ids are left out. A map gives them as ``place_strings('frame_id')`` and
    ``np.isfinite(places['x'])`` (``database_pose_frame``)."""
    ids = np.asarray(frame_ids, dtype=str)[np.asarray(posed, bool)]
    return sorted({f for f in ids.tolist() if f})


def map_pose_frame(
    frame_ids: Sequence[str] | np.ndarray, posed: np.ndarray, *, where: str = 'the map'
) -> str:
    """The one frame id of a map's place poses ('' when none is recorded); the arguments as
    in ``pose_frames``.

    Raises:
        DatabaseError: the places are in several frames, which no output can be stamped with.
    """
    frames = pose_frames(frame_ids, posed)
    if len(frames) > 1:
        msg = (
            f'{where} mixes place poses in the frames {frames!r}; rebuild it from one pose '
            'source (or transform the poses into one frame first)'
        )
        raise DatabaseError(msg)
    return frames[0] if frames else ''


def database_pose_frame(database: PlaceDatabase, *, where: str = 'the map') -> str:
    """``map_pose_frame`` of a map's places."""
    posed = np.isfinite(database.places['x'])
    return map_pose_frame(database.place_strings('frame_id'), posed, where=where)


def is_drifting_frame(frame_id: str, drifting: Sequence[str]) -> bool:
    """Whether ``frame_id`` is one of the ``drifting`` (odometry) frames, also under a
    namespace or with a leading slash (``robot1/odom`` and ``/odom`` for ``odom``)."""
    name = frame_id.strip('/')
    return any(name == d.strip('/') or name.endswith('/' + d.strip('/')) for d in drifting if d)
