"""Write camera frames and their poses to ROS 1 and ROS 2 bags, with rosbags.

The inverse of :func:`vpr_ros.bagio.read_frames`: tests, benchmarks and the demo make their
bags with :func:`write_bag` (rosbag2 sqlite3 or mcap, or ROS 1 ``.bag``), in every image and
pose message type the reader accepts. Stamps are int nanoseconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rosbags.interfaces import Connection
from rosbags.rosbag1 import Writer as Writer1
from rosbags.rosbag2 import StoragePlugin
from rosbags.rosbag2 import Writer as Writer2
from rosbags.typesys import Stores, get_typestore
from rosbags.typesys.store import Typestore

from vpr_ros.geometry import LocalTangentPlane
from vpr_ros.images import IMAGE_TYPES, rgb_to_compressed_bytes, rgb_to_image_fields
from vpr_ros.poses import POSE_TYPES
from vpr_ros.types import Frame, Pose

STORAGES: tuple[str, ...] = ('sqlite3', 'mcap', 'rosbag1')
"""Bag formats :func:`write_bag` can write."""

DEFAULT_NAVSAT_ORIGIN: tuple[float, float, float] = (47.3769, 8.5417, 408.0)
"""Latitude, longitude (degrees) and altitude (m) that :func:`write_bag` puts at ENU (0, 0, 0)."""

# sensor_msgs/NavSatStatus constants (rosbags' message classes do not type them).
_STATUS_FIX = 0
_SERVICE_GPS = 1


class _MessageFactory:
    """Builds rosbags message objects for one typestore (ROS 1 headers have a ``seq``)."""

    def __init__(self, typestore: Typestore) -> None:
        self.types = typestore.types
        header_cls = self.types['std_msgs/msg/Header']
        self._has_seq = 'seq' in getattr(header_cls, '__dataclass_fields__', {})
        self._seq = 0

    def header(self, stamp_ns: int, frame_id: str) -> Any:
        sec, nanosec = divmod(int(stamp_ns), 1_000_000_000)
        stamp = self.types['builtin_interfaces/msg/Time'](sec=sec, nanosec=nanosec)
        if self._has_seq:
            self._seq += 1
            return self.types['std_msgs/msg/Header'](seq=self._seq, stamp=stamp, frame_id=frame_id)
        return self.types['std_msgs/msg/Header'](stamp=stamp, frame_id=frame_id)

    def image(self, header: Any, rgb: np.ndarray, encoding: str) -> Any:
        encoding, height, width, step, data = rgb_to_image_fields(rgb, encoding)
        return self.types['sensor_msgs/msg/Image'](
            header=header,
            height=height,
            width=width,
            encoding=encoding,
            is_bigendian=0,
            step=step,
            data=np.frombuffer(data, dtype=np.uint8),
        )

    def compressed(self, header: Any, rgb: np.ndarray, fmt: str) -> Any:
        data = rgb_to_compressed_bytes(rgb, fmt)
        return self.types['sensor_msgs/msg/CompressedImage'](
            header=header, format=fmt, data=np.frombuffer(data, dtype=np.uint8)
        )

    def _pose(self, pose: Pose) -> Any:
        t = self.types
        return t['geometry_msgs/msg/Pose'](
            position=t['geometry_msgs/msg/Point'](x=pose.x, y=pose.y, z=pose.z),
            orientation=t['geometry_msgs/msg/Quaternion'](
                x=pose.qx, y=pose.qy, z=pose.qz, w=pose.qw
            ),
        )

    def _pose_cov(self, pose: Pose) -> Any:
        return self.types['geometry_msgs/msg/PoseWithCovariance'](
            pose=self._pose(pose), covariance=np.zeros(36)
        )

    def pose_msg(
        self,
        kind: str,
        header: Any,
        pose: Pose,
        child_frame_id: str,
        plane: LocalTangentPlane | None,
    ) -> Any:
        t = self.types
        if kind == 'odometry':
            zero = t['geometry_msgs/msg/Vector3'](x=0.0, y=0.0, z=0.0)
            twist = t['geometry_msgs/msg/TwistWithCovariance'](
                twist=t['geometry_msgs/msg/Twist'](linear=zero, angular=zero),
                covariance=np.zeros(36),
            )
            return t['nav_msgs/msg/Odometry'](
                header=header,
                child_frame_id=child_frame_id,
                pose=self._pose_cov(pose),
                twist=twist,
            )
        if kind == 'pose_stamped':
            return t['geometry_msgs/msg/PoseStamped'](header=header, pose=self._pose(pose))
        if kind == 'pose_cov':
            return t['geometry_msgs/msg/PoseWithCovarianceStamped'](
                header=header, pose=self._pose_cov(pose)
            )
        assert plane is not None
        lat, lon, alt = (float(v) for v in plane.to_geodetic(pose.x, pose.y, pose.z))
        status_cls = t['sensor_msgs/msg/NavSatStatus']
        return t['sensor_msgs/msg/NavSatFix'](
            header=header,
            status=status_cls(status=_STATUS_FIX, service=_SERVICE_GPS),
            latitude=lat,
            longitude=lon,
            altitude=alt,
            position_covariance=np.zeros(9),
            position_covariance_type=0,
        )


class _BagWriter:
    """One writer interface over rosbags' rosbag1 and rosbag2 writers."""

    def __init__(self, path: Path, storage: str) -> None:
        if storage == 'rosbag1':
            self.typestore = get_typestore(Stores.ROS1_NOETIC)
            self.writer: Writer1 | Writer2 = Writer1(path)
            self._serialize = self.typestore.serialize_ros1
        else:
            self.typestore = get_typestore(Stores.ROS2_HUMBLE)
            plugin = StoragePlugin.MCAP if storage == 'mcap' else StoragePlugin.SQLITE3
            self.writer = Writer2(path, version=Writer2.VERSION_LATEST, storage_plugin=plugin)
            self._serialize = self.typestore.serialize_cdr

    def add(self, topic: str, msgtype: str) -> Connection:
        return self.writer.add_connection(topic, msgtype, typestore=self.typestore)

    def write(self, connection: Connection, receive_ns: int, msg: Any) -> None:
        self.writer.write(connection, receive_ns, self._serialize(msg, connection.msgtype))


def write_bag(
    path: str | Path,
    frames: Iterable[Frame],
    *,
    storage: str = 'sqlite3',
    image_topic: str = '/camera/image_raw',
    compressed: bool = False,
    encoding: str = 'rgb8',
    compressed_format: str = 'jpeg',
    pose_topic: str | None = '/odom',
    pose_type: str = 'odometry',
    pose_frame_id: str = 'map',
    child_frame_id: str = 'base_link',
    navsat_origin: tuple[float, float, float] = DEFAULT_NAVSAT_ORIGIN,
    pose_stamps_ns: Sequence[int] | None = None,
    poses: Sequence[Pose] | None = None,
    stamp_headers: bool = True,
) -> Path:
    """Write frames (and their poses) to a new bag; the inverse of ``bagio.read_frames``.

    Each frame becomes one image message whose header stamp and receive time are
    ``frame.stamp_ns`` and whose header frame id is ``frame.frame_id`` (``'camera'`` if empty).
    Poses are written as one message per frame that has a pose, stamped like the frame, or,
    if ``pose_stamps_ns`` and ``poses`` are given, as those messages instead (at their own rate,
    interleaved by time with the images). Frames should come in time order.

    Args:
        path: The bag to create: a directory for rosbag2 storages, a ``.bag`` file for ROS 1.
        frames: Frames with RGB images; streamed, so it may be a generator.
        storage: ``'sqlite3'`` or ``'mcap'`` (rosbag2), or ``'rosbag1'``.
        image_topic: Topic of the image messages.
        compressed: Write ``sensor_msgs/CompressedImage`` instead of ``sensor_msgs/Image``.
        encoding: ``sensor_msgs/Image`` encoding, see :data:`vpr_ros.images.SUPPORTED_ENCODINGS`.
        compressed_format: ``'jpeg'`` or ``'png'`` for compressed images.
        pose_topic: Topic of the pose messages; ``None`` to write no poses.
        pose_type: One of :data:`vpr_ros.poses.POSE_TYPES`: ``'odometry'``, ``'pose_stamped'``,
            ``'pose_cov'`` or ``'navsat'`` (positions are local ENU metres around
            ``navsat_origin``, converted to latitude/longitude/altitude; orientation dropped).
        pose_frame_id: Header frame id of the pose messages.
        child_frame_id: ``child_frame_id`` of odometry messages.
        navsat_origin: Latitude, longitude (degrees) and altitude (m) of ENU (0, 0, 0).
        pose_stamps_ns: Stamps of separate pose messages (with ``poses``).
        poses: Poses written at ``pose_stamps_ns`` instead of the frames' poses.
        stamp_headers: If ``False``, header stamps are left zero (as some drivers do) and only
            the receive time carries the stamp.

    Returns:
        The path of the written bag.

    Raises:
        ValueError: An unknown storage, pose type or encoding, mismatched ``pose_stamps_ns`` and
            ``poses``, or a rosbag1 path that does not end in ``.bag``.
        FileExistsError: ``path`` exists already.
    """
    path = Path(path)
    if storage not in STORAGES:
        msg = f'unknown storage {storage!r}; expected one of {", ".join(STORAGES)}'
        raise ValueError(msg)
    if pose_type not in POSE_TYPES:
        msg = f'unknown pose_type {pose_type!r}; expected one of {", ".join(POSE_TYPES)}'
        raise ValueError(msg)
    if storage == 'rosbag1' and path.suffix != '.bag':
        msg = f'a rosbag1 bag must be a .bag file, got {str(path)!r}; add the .bag suffix'
        raise ValueError(msg)
    if (pose_stamps_ns is None) != (poses is None) or (
        poses is not None and pose_stamps_ns is not None and len(poses) != len(pose_stamps_ns)
    ):
        msg = 'pose_stamps_ns and poses must be given together and have the same length'
        raise ValueError(msg)
    if path.exists():
        msg = f'bag {str(path)!r} exists already; remove it or choose another path'
        raise FileExistsError(msg)

    extra: list[tuple[int, Pose]] = []
    if poses is not None and pose_stamps_ns is not None:
        extra = sorted(zip((int(s) for s in pose_stamps_ns), poses), key=lambda x: x[0])
    plane = LocalTangentPlane(*navsat_origin) if pose_type == 'navsat' else None

    bag = _BagWriter(path, storage)
    factory = _MessageFactory(bag.typestore)
    image_type = IMAGE_TYPES[1] if compressed else IMAGE_TYPES[0]

    def header(stamp_ns: int, frame_id: str) -> Any:
        return factory.header(stamp_ns if stamp_headers else 0, frame_id)

    with bag.writer:
        image_conn = bag.add(image_topic, image_type)
        pose_conn = bag.add(pose_topic, POSE_TYPES[pose_type].msgtype) if pose_topic else None

        def write_pose(stamp_ns: int, pose: Pose) -> None:
            assert pose_conn is not None
            msg = factory.pose_msg(
                pose_type, header(stamp_ns, pose_frame_id), pose, child_frame_id, plane
            )
            bag.write(pose_conn, stamp_ns, msg)

        next_extra = 0
        for frame in frames:
            if pose_conn is not None:
                while next_extra < len(extra) and extra[next_extra][0] <= frame.stamp_ns:
                    write_pose(*extra[next_extra])
                    next_extra += 1
            image_header = header(frame.stamp_ns, frame.frame_id or 'camera')
            if compressed:
                msg = factory.compressed(image_header, frame.image, compressed_format)
            else:
                msg = factory.image(image_header, frame.image, encoding)
            bag.write(image_conn, frame.stamp_ns, msg)
            if pose_conn is not None and poses is None and frame.pose is not None:
                write_pose(frame.stamp_ns, frame.pose)
        if pose_conn is not None:
            for stamp_ns, pose in extra[next_extra:]:
                write_pose(stamp_ns, pose)
    return path
