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

import numpy as np

from vpr_ros.errors import DatabaseError


def pose_frames(places: np.ndarray, strings: Sequence[str] | None = None) -> list[str]:
    """The distinct frame ids of the places that have a pose, sorted; empty frame ids are
    left out. ``places``: rows with the frame ids in place (``PLACE_RECORD_DTYPE``), or a
    map's rows (``PLACE_DTYPE``) and the map's string table ``strings``."""
    posed = places[np.isfinite(places['x'])] if len(places) else places
    ids = posed['frame_id']
    if strings is not None and np.issubdtype(ids.dtype, np.integer):
        ids = [strings[int(i)] for i in ids]
    return sorted({str(f) for f in ids if str(f)})


def map_pose_frame(
    places: np.ndarray, *, where: str = 'the map', strings: Sequence[str] | None = None
) -> str:
    """The one frame id of a map's place poses ('' when none is recorded); ``places`` and
    ``strings`` as in ``pose_frames``.

    Raises:
        DatabaseError: the places are in several frames, which no output can be stamped with.
    """
    frames = pose_frames(places, strings)
    if len(frames) > 1:
        msg = (
            f'{where} mixes place poses in the frames {frames!r}; rebuild it from one pose '
            'source (or transform the poses into one frame first)'
        )
        raise DatabaseError(msg)
    return frames[0] if frames else ''


def is_drifting_frame(frame_id: str, drifting: Sequence[str]) -> bool:
    """Whether ``frame_id`` is one of the ``drifting`` (odometry) frames, also under a
    namespace or with a leading slash (``robot1/odom`` and ``/odom`` for ``odom``)."""
    name = frame_id.strip('/')
    return any(name == d.strip('/') or name.endswith('/' + d.strip('/')) for d in drifting if d)
