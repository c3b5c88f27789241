"""vpr_ros types <-> ROS messages for the relocalize node and its consumers.

The hypothesis table is a ``sensor_msgs/PointCloud2`` with one point per hypothesis, best
first, and the fields of :data:`HYPOTHESIS_DTYPE` (little-endian, no padding): a consumer in
any language reads it with its usual point-cloud tools, and RViz draws the places. Poses are in
the map frame; a hypothesis without a pose (a map built without poses) has NaN in ``x`` ..
``qw`` and the cloud is then not dense. A verifying re-ranker fills ``inliers``; with the
camera's intrinsics, a verified place also carries the query camera's pose in the place
camera's optical frame (``rel_x`` .. ``rel_qw``, metres when ``rel_metric`` is 1, else a unit
direction; NaN when unknown) - e.g. a loop-closure constraint.

The loop-closure table (``~/loop_closures``, :data:`LOOP_CLOSURE_DTYPE`) has the same
columns plus the two stamps a SLAM back end needs to add the constraint: the query frame's
(``query_sec``, ``query_nanosec``) and the matched place's source image's (``place_sec``,
``place_nanosec``), as ``builtin_interfaces/Time`` splits them, and the distance driven
between them (``trajectory_gap_m``, NaN for places of a map loaded from disk).

The map's places go out as a ``visualization_msgs/MarkerArray`` (:func:`map_places_markers`):
a sphere per place and a line per traverse in keyframe order.
"""

from __future__ import annotations

import array
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from diagnostic_msgs.msg import KeyValue
from geometry_msgs.msg import Point, PoseArray, PoseWithCovarianceStamped, Quaternion
from geometry_msgs.msg import Pose as PoseMsg
from nav_msgs.msg import Path
from sensor_msgs.msg import CameraInfo, PointCloud2, PointField
from std_msgs.msg import ColorRGBA, Header
from visualization_msgs.msg import Marker, MarkerArray

from vpr_ros.types import CameraIntrinsics, Hypothesis, Pose, RelativePose

if TYPE_CHECKING:
    from vpr_ros.loop_closure import LoopClosure

# The pose columns of vpr_ros.database.PLACE_DTYPE; not imported from there, because that
# module loads faiss and torch, and readers of the table need neither.
POSE_FIELDS = ('x', 'y', 'z', 'qx', 'qy', 'qz', 'qw')
RELATIVE_FIELDS = tuple(f'rel_{name}' for name in POSE_FIELDS)

HYPOTHESIS_DTYPE = np.dtype(
    [(name, '<f8') for name in POSE_FIELDS]
    + [
        ('place_id', '<i4'),
        ('global_score', '<f4'),
        ('rerank_score', '<f4'),
        ('confidence', '<f4'),
        ('inliers', '<i4'),
    ]
    + [(name, '<f8') for name in RELATIVE_FIELDS]
    + [('rel_inliers', '<i4'), ('rel_metric', 'u1')]
)
"""One row of the hypothesis table (137 bytes): map pose x y z qx qy qz qw, place id, scores,
confidence, RANSAC inliers (-1: not verified), the query's relative pose rel_x .. rel_qw, its
essential-matrix inliers and whether it is metric."""

LOOP_CLOSURE_DTYPE = np.dtype(
    HYPOTHESIS_DTYPE.descr
    + [
        ('query_sec', '<i4'),
        ('query_nanosec', '<u4'),
        ('place_sec', '<i4'),
        ('place_nanosec', '<u4'),
        ('trajectory_gap_m', '<f4'),
    ]
)
"""One row of the loop-closure table: a hypothesis row (the matched place) and the query's
and the place's stamps (sec, nanosec), and the distance driven between them."""

# PointField datatype <-> numpy kind and size (PointField has no 64-bit integers).
_POINTFIELD_DTYPES: dict[int, str] = {
    PointField.INT8: 'i1',
    PointField.UINT8: 'u1',
    PointField.INT16: 'i2',
    PointField.UINT16: 'u2',
    PointField.INT32: 'i4',
    PointField.UINT32: 'u4',
    PointField.FLOAT32: 'f4',
    PointField.FLOAT64: 'f8',
}
_DTYPE_POINTFIELDS = {code: datatype for datatype, code in _POINTFIELD_DTYPES.items()}

MIN_COVARIANCE_CONFIDENCE = 0.01
"""Confidences below this scale the covariance as if they were this (no division by zero)."""


def stamp_ns(stamp: Any) -> int:
    """A ``builtin_interfaces/Time`` as int nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def array_to_cloud(table: np.ndarray, header: Header) -> PointCloud2:
    """A one-row ``PointCloud2`` holding a structured array, one point per element.

    Args:
        table: 1-D structured array of scalar fields of the types ``PointField`` knows.
        header: stamp and frame id of the cloud.

    Raises:
        ValueError: a field has a type ``PointField`` cannot describe (e.g. int64).
    """
    fields = []
    columns: Mapping[str, tuple[Any, ...]] = table.dtype.fields or {}
    for name in table.dtype.names or ():
        dtype, offset = columns[name][:2]
        code = _DTYPE_POINTFIELDS.get(dtype.newbyteorder('<').str[1:])
        if code is None or dtype.shape:
            msg = f'field {name!r} of type {dtype} has no PointField datatype'
            raise ValueError(msg)
        fields.append(PointField(name=name, offset=offset, datatype=code, count=1))
    little = table.dtype.newbyteorder('<')
    data = np.ascontiguousarray(table.astype(little, copy=False))
    msg = PointCloud2(
        header=header,
        height=1,
        width=len(table),
        fields=fields,
        is_bigendian=False,
        point_step=table.dtype.itemsize,
        row_step=table.dtype.itemsize * len(table),
    )
    msg.data = array.array('B', data.tobytes())
    return msg


def cloud_to_array(msg: PointCloud2) -> np.ndarray:
    """The points of any ``PointCloud2`` as a 1-D structured array (row-major).

    Raises:
        ValueError: the cloud's layout is inconsistent or uses an unknown datatype.
    """
    order = '>' if msg.is_bigendian else '<'
    names, formats, offsets = [], [], []
    for field in msg.fields:
        kind = _POINTFIELD_DTYPES.get(field.datatype)
        if kind is None:
            msg_text = f'field {field.name!r} has unknown PointField datatype {field.datatype}'
            raise ValueError(msg_text)
        names.append(field.name)
        formats.append((order + kind, (field.count,)) if field.count > 1 else order + kind)
        offsets.append(field.offset)
    dtype = np.dtype(
        {'names': names, 'formats': formats, 'offsets': offsets, 'itemsize': msg.point_step}
    )
    height, width = int(msg.height), int(msg.width)
    data = np.frombuffer(msg.data, np.uint8) if len(msg.data) else np.zeros(0, np.uint8)
    if msg.point_step * width > msg.row_step or len(data) < msg.row_step * height:
        msg_text = (
            f'cloud of {height}x{width} points with point_step {msg.point_step} and row_step '
            f'{msg.row_step} does not fit its {len(data)} data bytes'
        )
        raise ValueError(msg_text)
    rows = data[: msg.row_step * height].reshape(height, msg.row_step)
    points = np.ascontiguousarray(rows[:, : msg.point_step * width])
    return points.view(dtype).reshape(-1)


def hypotheses_to_table(hypotheses: Sequence[Hypothesis]) -> np.ndarray:
    """Hypotheses as rows of :data:`HYPOTHESIS_DTYPE`, in the given order.

    Raises:
        ValueError: a place id does not fit the table's int32 column.
    """
    table = np.zeros(len(hypotheses), HYPOTHESIS_DTYPE)
    info = np.iinfo(np.int32)
    for row, hypothesis in zip(table, hypotheses):
        if not info.min <= hypothesis.place_id <= info.max:
            msg = f'place id {hypothesis.place_id!r} does not fit the int32 place_id field'
            raise ValueError(msg)
        pose = hypothesis.pose.as_array() if hypothesis.pose is not None else np.full(7, np.nan)
        for name, value in zip(POSE_FIELDS, pose):
            row[name] = value
        row['place_id'] = hypothesis.place_id
        row['global_score'] = hypothesis.global_score
        row['rerank_score'] = hypothesis.rerank_score
        row['confidence'] = hypothesis.confidence
        row['inliers'] = hypothesis.inliers
        relative = hypothesis.relative_pose
        values = relative.pose.as_array() if relative is not None else np.full(7, np.nan)
        for name, value in zip(RELATIVE_FIELDS, values):
            row[name] = value
        row['rel_inliers'] = relative.inliers if relative is not None else 0
        row['rel_metric'] = bool(relative is not None and relative.metric)
    return table


def hypotheses_to_cloud(hypotheses: Sequence[Hypothesis], header: Header) -> PointCloud2:
    """The hypothesis table message: one point per hypothesis, best first."""
    msg = array_to_cloud(hypotheses_to_table(hypotheses), header)
    msg.is_dense = all(h.pose is not None for h in hypotheses)
    return msg


def hypotheses_from_cloud(msg: PointCloud2) -> list[Hypothesis]:
    """Read a hypothesis table back, best first.

    ``place_index`` (a row number inside the node's map) is not in the table and is -1;
    a row whose position is NaN has no pose.

    Raises:
        ValueError: the cloud lacks a field of :data:`HYPOTHESIS_DTYPE`.
    """
    table = cloud_to_array(msg)
    wanted = HYPOTHESIS_DTYPE.names or ()
    missing = [name for name in wanted if name not in (table.dtype.names or ())]
    if missing:
        msg_text = f'the cloud is not a hypothesis table: it lacks the fields {missing!r}'
        raise ValueError(msg_text)
    hypotheses = []
    for row in table:
        pose = None
        if not np.isnan(row['x']):
            pose = Pose(*(float(row[name]) for name in POSE_FIELDS))
        relative = None
        if not np.isnan(row['rel_x']):
            relative = RelativePose(
                Pose(*(float(row[name]) for name in RELATIVE_FIELDS)),
                metric=bool(row['rel_metric']),
                inliers=int(row['rel_inliers']),
            )
        hypotheses.append(
            Hypothesis(
                place_index=-1,
                place_id=int(row['place_id']),
                global_score=float(row['global_score']),
                rerank_score=float(row['rerank_score']),
                confidence=float(row['confidence']),
                pose=pose,
                inliers=int(row['inliers']),
                relative_pose=relative,
            )
        )
    return hypotheses


def camera_intrinsics(msg: CameraInfo) -> CameraIntrinsics | None:
    """The pinhole intrinsics of a ``sensor_msgs/CameraInfo`` (None: uncalibrated, K = 0)."""
    k = [float(v) for v in msg.k]
    if k[0] <= 0 or k[4] <= 0 or msg.width <= 0 or msg.height <= 0:
        return None
    return CameraIntrinsics(k[0], k[4], k[2], k[5], int(msg.width), int(msg.height))


def pose_to_msg(pose: Pose) -> PoseMsg:
    """A :class:`~vpr_ros.types.Pose` as a ``geometry_msgs/Pose``."""
    return PoseMsg(
        position=Point(x=pose.x, y=pose.y, z=pose.z),
        orientation=Quaternion(x=pose.qx, y=pose.qy, z=pose.qz, w=pose.qw),
    )


def msg_to_pose(msg: PoseMsg) -> Pose:
    """A ``geometry_msgs/Pose`` as a :class:`~vpr_ros.types.Pose`."""
    p, q = msg.position, msg.orientation
    return Pose(p.x, p.y, p.z, q.x, q.y, q.z, q.w)


def pose_with_covariance(
    hypothesis: Hypothesis, header: Header, covariance_diagonal: Sequence[float]
) -> PoseWithCovarianceStamped:
    """The pose of a hypothesis with a covariance that grows as its confidence falls.

    Args:
        hypothesis: a hypothesis with a pose.
        header: stamp and (map) frame id.
        covariance_diagonal: variances of x, y, z (m^2) and roll, pitch, yaw (rad^2) at
            confidence 1; they are divided by the confidence (at least
            :data:`MIN_COVARIANCE_CONFIDENCE`).

    Raises:
        ValueError: the hypothesis has no pose, or the diagonal is not 6 values.
    """
    if hypothesis.pose is None:
        msg = f'hypothesis for place {hypothesis.place_id} has no pose (map without poses)'
        raise ValueError(msg)
    if len(covariance_diagonal) != 6:
        msg = f'covariance diagonal needs 6 values, got {len(covariance_diagonal)}'
        raise ValueError(msg)
    scale = 1.0 / max(hypothesis.confidence, MIN_COVARIANCE_CONFIDENCE)
    msg = PoseWithCovarianceStamped(header=header)
    msg.pose.pose = pose_to_msg(hypothesis.pose)
    msg.pose.covariance = np.diag(np.asarray(covariance_diagonal, np.float64) * scale).reshape(-1)
    return msg


def pose_array(hypotheses: Sequence[Hypothesis], header: Header) -> PoseArray:
    """The poses of the hypotheses that have one, best first."""
    return PoseArray(
        header=header, poses=[pose_to_msg(h.pose) for h in hypotheses if h.pose is not None]
    )


def key_values(values: Mapping[str, Any]) -> list[KeyValue]:
    """Diagnostic key/value pairs; floats with 4 significant digits."""
    return [
        KeyValue(key=key, value=f'{value:.4g}' if isinstance(value, float) else str(value))
        for key, value in values.items()
    ]


def split_stamp(stamp_ns: int) -> tuple[int, int]:
    """Int nanoseconds as ``builtin_interfaces/Time`` (sec, nanosec)."""
    sec, nanosec = divmod(int(stamp_ns), 1_000_000_000)
    return sec, nanosec


def loop_closures_to_cloud(closures: Sequence[LoopClosure], header: Header) -> PointCloud2:
    """The loop-closure table message: one point per closure, best first."""
    hypotheses = hypotheses_to_table([c.hypothesis for c in closures])
    table = np.zeros(len(closures), LOOP_CLOSURE_DTYPE)
    for name in HYPOTHESIS_DTYPE.names or ():
        table[name] = hypotheses[name]
    for row, closure in zip(table, closures):
        row['query_sec'], row['query_nanosec'] = split_stamp(closure.query_stamp_ns)
        row['place_sec'], row['place_nanosec'] = split_stamp(closure.place_stamp_ns)
        row['trajectory_gap_m'] = closure.trajectory_gap_m
    msg = array_to_cloud(table, header)
    msg.is_dense = all(c.hypothesis.pose is not None for c in closures)
    return msg


def loop_closures_from_cloud(msg: PointCloud2) -> list[LoopClosure]:
    """Read a loop-closure table back, best first (``place_index`` is -1, as in
    :func:`hypotheses_from_cloud`).

    Raises:
        ValueError: the cloud lacks a field of :data:`LOOP_CLOSURE_DTYPE`.
    """
    from vpr_ros.loop_closure import LoopClosure

    table = cloud_to_array(msg)
    missing = [n for n in LOOP_CLOSURE_DTYPE.names or () if n not in (table.dtype.names or ())]
    if missing:
        msg_text = f'the cloud is not a loop-closure table: it lacks the fields {missing!r}'
        raise ValueError(msg_text)
    return [
        LoopClosure(
            query_stamp_ns=int(row['query_sec']) * 1_000_000_000 + int(row['query_nanosec']),
            place_stamp_ns=int(row['place_sec']) * 1_000_000_000 + int(row['place_nanosec']),
            hypothesis=hypothesis,
            trajectory_gap_m=float(row['trajectory_gap_m']),
        )
        for row, hypothesis in zip(table, hypotheses_from_cloud(msg))
    ]


def path_poses(msg: Path) -> tuple[np.ndarray, np.ndarray]:
    """A ``nav_msgs/Path``'s pose stamps (M,) int64 ns and poses (M, 7) x y z qx qy qz qw."""
    stamps = np.array([stamp_ns(p.header.stamp) for p in msg.poses], np.int64)
    poses = np.array([msg_to_pose(p.pose).as_array() for p in msg.poses], np.float64)
    return stamps, poses.reshape(-1, 7)


PLACE_COLOR = ColorRGBA(r=0.1, g=0.6, b=1.0, a=0.9)
TRAVERSE_COLOR = ColorRGBA(r=0.1, g=0.6, b=1.0, a=0.4)


def map_places_markers(
    positions: np.ndarray, traverses: np.ndarray, header: Header, *, scale_m: float = 0.6
) -> MarkerArray:
    """The map's places for RViz: a sphere per place with a pose (marker 0) and a line
    through each traverse's places in keyframe order (marker 1 + traverse). A DELETEALL
    comes first, so that a map that lost a traverse shows no stale line."""
    markers = [Marker(header=header, ns='map_places', action=Marker.DELETEALL)]
    known = np.isfinite(positions).all(axis=1)
    spheres = Marker(header=header, ns='map_places', id=0, type=Marker.SPHERE_LIST)
    spheres.scale.x = spheres.scale.y = spheres.scale.z = scale_m
    spheres.pose.orientation.w = 1.0
    spheres.color = PLACE_COLOR
    spheres.points = [Point(x=float(x), y=float(y), z=float(z)) for x, y, z in positions[known]]
    markers.append(spheres)
    for traverse in np.unique(traverses[known]):
        chain = positions[known & (traverses == traverse)]
        if len(chain) < 2:
            continue
        line = Marker(
            header=header, ns='map_traverses', id=1 + int(traverse), type=Marker.LINE_STRIP
        )
        line.scale.x = scale_m / 4
        line.pose.orientation.w = 1.0
        line.color = TRAVERSE_COLOR
        line.points = [Point(x=float(x), y=float(y), z=float(z)) for x, y, z in chain]
        markers.append(line)
    return MarkerArray(markers=markers)
