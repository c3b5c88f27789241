"""Read camera frames with poses from ROS 1 and ROS 2 bags, and write such bags, with rosbags.

A bag path may be a rosbag2 directory (sqlite3 or mcap storage), a ``.mcap`` or ``.db3`` file,
or a ROS 1 ``.bag`` file. Every reading problem that is the bag's fault becomes a
:class:`~vpr_ros.errors.BagReadError` naming the bag; a missing path is a
``FileNotFoundError``. Stamps are int nanoseconds.

Typical use::

    skips = SkipCounter()
    for frame in read_frames(['run1/'], '/camera/image_raw', '/odom', skips=skips):
        ...
    logger.info('skipped: %s', skips.summary())
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
from rosbags.highlevel import AnyReader
from rosbags.interfaces import Connection
from rosbags.rosbag1 import Writer as Writer1
from rosbags.rosbag2 import StoragePlugin
from rosbags.rosbag2 import Writer as Writer2
from rosbags.typesys import Stores, get_typestore
from rosbags.typesys.store import Typestore

from vpr_ros import logger
from vpr_ros.errors import BagReadError, ImageDecodeError
from vpr_ros.geometry import LocalTangentPlane, PoseTrack
from vpr_ros.images import failure_reason, msg_to_rgb, rgb_to_compressed_bytes, rgb_to_image_fields
from vpr_ros.types import Frame, Pose, SkipCounter

BagPaths: TypeAlias = 'str | Path | Sequence[str | Path]'

IMAGE_TYPES: tuple[str, ...] = ('sensor_msgs/msg/Image', 'sensor_msgs/msg/CompressedImage')
"""Message types accepted on the image topic."""

POSE_TYPES: dict[str, str] = {
    'odometry': 'nav_msgs/msg/Odometry',
    'pose_stamped': 'geometry_msgs/msg/PoseStamped',
    'pose_cov': 'geometry_msgs/msg/PoseWithCovarianceStamped',
    'navsat': 'sensor_msgs/msg/NavSatFix',
}
"""Pose kinds (``write_bag(pose_type=...)``) and the message types accepted on the pose topic."""

STORAGES: tuple[str, ...] = ('sqlite3', 'mcap', 'rosbag1')
"""Bag formats :func:`write_bag` can write."""

DEFAULT_NAVSAT_ORIGIN: tuple[float, float, float] = (47.3769, 8.5417, 408.0)
"""Latitude, longitude (degrees) and altitude (m) that :func:`write_bag` puts at ENU (0, 0, 0)."""

NO_POSE_REASON = 'no pose within max gap'
"""The :class:`SkipCounter` reason for frames without a pose close enough in time."""

_STORAGE_SUFFIXES = ('.mcap', '.db3')
_REPAIR_HINT = (
    're-record it, or try to repair it (`ros2 bag reindex` or `mcap recover` for rosbag2, '
    '`rosbag reindex` for ROS 1 bags)'
)


def _read_typestore() -> Typestore:
    """Types for bags that carry no message definitions (older rosbag2 sqlite3 bags)."""
    return get_typestore(Stores.ROS2_HUMBLE)


def _as_paths(bag_paths: BagPaths) -> list[Path]:
    if isinstance(bag_paths, (str, Path)):
        return [Path(bag_paths)]
    return [Path(p) for p in bag_paths]


def _resolve(path: Path) -> Path:
    """Return what AnyReader should open for ``path``."""
    if not path.exists():
        msg = f'bag {str(path)!r} does not exist; check the path'
        raise FileNotFoundError(msg)
    if path.is_dir():
        if (path / 'metadata.yaml').exists():
            return path
        files = sorted(p for p in path.iterdir() if p.suffix in _STORAGE_SUFFIXES)
        if len(files) == 1:
            return files[0]
        msg = (
            f'bag {str(path)!r} is not a rosbag2 directory: it has no metadata.yaml and '
            f'{len(files)} .mcap/.db3 files; pass the storage file itself, or run '
            '`ros2 bag reindex` on the directory'
        )
        raise BagReadError(msg)
    if path.suffix in (*_STORAGE_SUFFIXES, '.bag'):
        return path
    msg = (
        f'bag {str(path)!r} has unknown format {path.suffix!r}; expected a rosbag2 directory, '
        'a .mcap or .db3 file, or a ROS 1 .bag file'
    )
    raise BagReadError(msg)


def _corrupt(path: Path, err: BaseException) -> BagReadError:
    cause = f'{type(err).__name__}: {err}' if str(err) else type(err).__name__
    msg = f'bag {str(path)!r} is corrupt or truncated: {cause}; {_REPAIR_HINT}'
    return BagReadError(msg)


@contextmanager
def open_bag(path: str | Path) -> Iterator[AnyReader]:
    """Open one bag of any supported format with rosbags' ``AnyReader``.

    Args:
        path: A rosbag2 directory, a ``.mcap``/``.db3`` file, or a ROS 1 ``.bag`` file.

    Yields:
        The open reader; it is closed when the block exits.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        BagReadError: The bag is corrupt, truncated or of an unknown format.
    """
    path = Path(path)
    resolved = _resolve(path)
    try:
        reader = AnyReader([resolved], default_typestore=_read_typestore())
        reader.open()
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as err:
        raise _corrupt(path, err) from err
    try:
        yield reader
    finally:
        try:
            reader.close()
        except Exception as err:  # closing a damaged bag must not hide the first error
            logger.debug('closing bag %r failed: %s', str(path), err)


def iter_messages(
    reader: AnyReader, connections: Sequence[Connection], path: str | Path
) -> Iterator[tuple[Connection, int, Any]]:
    """Stream deserialised messages, turning any failure of the bag into ``BagReadError``.

    Args:
        reader: An open reader from :func:`open_bag`.
        connections: The connections to read, e.g. all connections of one topic.
        path: The bag's path, for error messages.

    Yields:
        ``(connection, receive_time_ns, message)`` in receive-time order.

    Raises:
        BagReadError: The bag turns out to be corrupt or truncated while reading.
    """
    if not connections:
        return
    stream = reader.messages(connections=connections)
    while True:
        try:
            item = next(stream, None)
            if item is None:
                return
            connection, timestamp, rawdata = item
            msg = reader.deserialize(rawdata, connection.msgtype)
        except Exception as err:
            raise _corrupt(Path(path), err) from err
        yield connection, timestamp, msg


def _topics_text(reader: AnyReader) -> str:
    topics = {c.topic: c.msgtype for c in reader.connections}
    if not topics:
        return '(none)'
    return ', '.join(f'{topic} ({msgtype})' for topic, msgtype in sorted(topics.items()))


def _same_topic(a: str, b: str) -> bool:
    return a.lstrip('/') == b.lstrip('/')


def topic_connections(
    reader: AnyReader, path: Path, topic: str, allowed: Iterable[str], role: str
) -> list[Connection]:
    connections = [c for c in reader.connections if _same_topic(c.topic, topic)]
    if not connections:
        msg = (
            f'bag {str(path)!r} has no {role} topic {topic!r}; its topics are: '
            f'{_topics_text(reader)}; pass one of them'
        )
        raise BagReadError(msg)
    allowed = tuple(allowed)
    if allowed and (wrong := [c.msgtype for c in connections if c.msgtype not in allowed]):
        msg = (
            f'{role} topic {topic!r} in bag {str(path)!r} has type {wrong[0]!r}; expected one '
            f'of {", ".join(allowed)}; pass a topic of one of these types'
        )
        raise BagReadError(msg)
    return connections


def bag_topics(path: str | Path) -> dict[str, str]:
    """List the topics of a bag.

    Args:
        path: A bag path, as for :func:`open_bag`.

    Returns:
        Topic name -> message type, e.g. ``{'/odom': 'nav_msgs/msg/Odometry'}``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        BagReadError: The bag is corrupt, truncated or of an unknown format.
    """
    with open_bag(path) as reader:
        return {c.topic: c.msgtype for c in sorted(reader.connections, key=lambda c: c.topic)}


def count_messages(bag_paths: BagPaths, topic: str) -> int:
    """Count the messages of a topic in one or more bags, from the bags' indexes (fast).

    Args:
        bag_paths: One bag path or a sequence of them.
        topic: Topic name.

    Returns:
        The total number of messages on ``topic``.

    Raises:
        FileNotFoundError: A path does not exist.
        BagReadError: A bag is unreadable or has no such topic.
    """
    total = 0
    for path in _as_paths(bag_paths):
        with open_bag(path) as reader:
            connections = topic_connections(reader, path, topic, (), 'asked')
            total += sum(max(c.msgcount, 0) for c in connections)
    return total


def _stamp_ns(msg: Any, receive_ns: int) -> int:
    """Header stamp in ns, or the bag's receive time if the header stamp is zero."""
    stamp = msg.header.stamp
    ns = int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)
    return ns if ns != 0 else int(receive_ns)


class NavSatOrigin:
    """Lazily fixed local tangent plane shared by all bags of one read."""

    def __init__(self, origin: tuple[float, float, float] | None) -> None:
        self.plane = None if origin is None else LocalTangentPlane(*origin)


IDENTITY_QUATERNION = (0.0, 0.0, 0.0, 1.0)


def has_orientation(quaternion: Sequence[float]) -> bool:
    """Whether a quaternion is usable: finite with a non-zero norm. Position-only sources
    publish zeros; callers use the identity for them."""
    norm = math.sqrt(sum(v * v for v in quaternion))
    return math.isfinite(norm) and norm > 1e-9


def pose_sample(
    msg: Any, msgtype: str, navsat: NavSatOrigin
) -> tuple[tuple[float, float, float], tuple[float, float, float, float]] | None:
    """Position and orientation (x, y, z, w) of one pose message, of any of ``POSE_TYPES``.

    Works on rosbags and rclpy messages alike. NavSatFix becomes local ENU metres around
    ``navsat``'s origin (set by the first fix) with identity orientation; a NavSatFix
    without a fix gives ``None``.
    """
    if msgtype == POSE_TYPES['navsat']:
        lat, lon, alt = float(msg.latitude), float(msg.longitude), float(msg.altitude)
        if int(msg.status.status) < 0 or not (math.isfinite(lat) and math.isfinite(lon)):
            return None
        if navsat.plane is None:
            navsat.plane = LocalTangentPlane(lat, lon, alt if math.isfinite(alt) else 0.0)
            logger.info('NavSatFix ENU origin (lat, lon, alt) = %r', navsat.plane.origin)
        if not math.isfinite(alt):
            alt = navsat.plane.origin[2]
        east, north, up = navsat.plane.to_enu(lat, lon, alt).tolist()
        return (east, north, up), (0.0, 0.0, 0.0, 1.0)
    pose = msg.pose if msgtype == POSE_TYPES['pose_stamped'] else msg.pose.pose
    p, q = pose.position, pose.orientation
    return (float(p.x), float(p.y), float(p.z)), (float(q.x), float(q.y), float(q.z), float(q.w))


def _read_track(
    reader: AnyReader, path: Path, connections: list[Connection], navsat: NavSatOrigin
) -> tuple[PoseTrack, str]:
    """Read all poses of one topic of one bag (one pass) into a track."""
    stamps: list[int] = []
    positions: list[tuple[float, float, float]] = []
    quaternions: list[tuple[float, float, float, float]] = []
    frame_ids: set[str] = set()
    first_frame_id = ''
    no_fix = 0
    zero_quaternions = 0
    bad_positions = 0
    for connection, receive_ns, msg in iter_messages(reader, connections, path):
        sample = pose_sample(msg, connection.msgtype, navsat)
        if sample is None:
            no_fix += 1
            continue
        position, quaternion = sample
        if not all(math.isfinite(v) for v in position):
            bad_positions += 1
            continue
        if not has_orientation(quaternion):
            zero_quaternions += 1
            quaternion = IDENTITY_QUATERNION
        stamps.append(_stamp_ns(msg, receive_ns))
        positions.append(position)
        quaternions.append(quaternion)
        frame_id = str(msg.header.frame_id)
        if not frame_ids:
            first_frame_id = frame_id
        frame_ids.add(frame_id)
    topic = connections[0].topic
    if no_fix:
        logger.warning('bag %r: ignored %d NavSatFix messages without a fix', str(path), no_fix)
    if zero_quaternions:
        logger.warning(
            'bag %r: %d pose messages on %r have a zero or non-finite quaternion; '
            'using identity orientation for them',
            str(path),
            zero_quaternions,
            topic,
        )
    if bad_positions:
        logger.warning(
            'bag %r: ignored %d pose messages on %r with a non-finite position',
            str(path),
            bad_positions,
            topic,
        )
    if len(frame_ids) > 1:
        logger.warning(
            'bag %r: pose topic %r mixes frame ids %s; using %r',
            str(path),
            topic,
            sorted(frame_ids),
            first_frame_id,
        )
    if not stamps:
        logger.warning('bag %r: pose topic %r has no usable poses', str(path), topic)
    track = PoseTrack(stamps, np.reshape(positions, (-1, 3)), np.reshape(quaternions, (-1, 4)))
    return track, first_frame_id


def read_frames(
    bag_paths: BagPaths,
    image_topic: str,
    pose_topic: str | None = None,
    *,
    max_pose_gap_s: float = 0.5,
    skips: SkipCounter | None = None,
    navsat_origin: tuple[float, float, float] | NavSatOrigin | None = None,
) -> Iterator[Frame]:
    """Stream camera frames, each with its pose interpolated at the image stamp.

    All bags are opened and their topics checked when this function is called, so a wrong
    path or topic fails here rather than at the first ``next()``. Then, bag by bag, the pose
    topic is read in one pass and the images are streamed in receive order. An image's stamp is
    its header stamp, or the bag receive time if the header stamp is zero.

    Frames are skipped, counted in ``skips`` and logged (a warning for the first frame of each
    reason in each bag) when:

    * no pose lies within ``max_pose_gap_s`` (reason :data:`NO_POSE_REASON`): the image stamp is
      outside the pose track, or its two bracketing poses are further apart than the gap;
    * the image cannot be decoded (reason e.g. ``'unknown encoding rgb16'``, see
      :func:`vpr_ros.images.failure_reason`).

    ``sensor_msgs/NavSatFix`` positions are converted to local ENU metres around
    ``navsat_origin``, or around the first fix of the first bag if it is ``None`` (pass the same
    origin when reading bags that must share a frame, e.g. map and query runs). Their
    orientation is identity and fixes with ``status < 0`` (no fix) are ignored.

    Args:
        bag_paths: One bag path or a sequence of them, read in order.
        image_topic: A ``sensor_msgs/Image`` or ``sensor_msgs/CompressedImage`` topic.
        pose_topic: A ``nav_msgs/Odometry``, ``geometry_msgs/PoseStamped``,
            ``geometry_msgs/PoseWithCovarianceStamped`` or ``sensor_msgs/NavSatFix`` topic;
            ``None`` to read frames without poses.
        max_pose_gap_s: Largest time between the two poses that bracket an image.
        skips: Counter that receives the skipped frames by reason.
        navsat_origin: ENU origin (lat, lon, alt) for NavSatFix poses, or a ``NavSatOrigin``
            shared by several calls (it is fixed by the first fix any of them reads).

    Returns:
        An iterator of :class:`~vpr_ros.types.Frame` with RGB images.

    Raises:
        FileNotFoundError: A path does not exist.
        BagReadError: A bag is corrupt or truncated (also while iterating), or lacks a topic,
            or a topic has the wrong type; the message lists the bag's topics.
    """
    paths = _as_paths(bag_paths)
    if not paths:
        msg = 'no bag paths given; pass at least one bag'
        raise BagReadError(msg)
    for path in paths:
        with open_bag(path) as reader:
            topic_connections(reader, path, image_topic, IMAGE_TYPES, 'image')
            if pose_topic is not None:
                topic_connections(reader, path, pose_topic, POSE_TYPES.values(), 'pose')
    max_gap_ns = round(max_pose_gap_s * 1e9)
    return _generate_frames(
        paths,
        image_topic,
        pose_topic,
        max_gap_ns,
        skips if skips is not None else SkipCounter(),
        navsat_origin if isinstance(navsat_origin, NavSatOrigin) else NavSatOrigin(navsat_origin),
    )


def _generate_frames(
    paths: list[Path],
    image_topic: str,
    pose_topic: str | None,
    max_gap_ns: int,
    skips: SkipCounter,
    navsat: NavSatOrigin,
) -> Iterator[Frame]:
    for path in paths:
        with open_bag(path) as reader:
            track: PoseTrack | None = None
            pose_frame_id = ''
            if pose_topic is not None:
                pose_conns = topic_connections(
                    reader, path, pose_topic, POSE_TYPES.values(), 'pose'
                )
                track, pose_frame_id = _read_track(reader, path, pose_conns, navsat)
            image_conns = topic_connections(reader, path, image_topic, IMAGE_TYPES, 'image')
            bag_skips = SkipCounter()
            count = 0
            messages = iter_messages(reader, image_conns, path)
            for index, (connection, receive_ns, msg) in enumerate(messages):
                stamp_ns = _stamp_ns(msg, receive_ns)
                pose: Pose | None = None
                if track is not None:
                    pose = track.interpolate(stamp_ns, max_gap_ns)
                    if pose is None:
                        detail = f'no pose within the max gap of image stamp {stamp_ns} ns'
                        _skip(skips, bag_skips, path, NO_POSE_REASON, detail)
                        continue
                try:
                    image = msg_to_rgb(msg)
                except ImageDecodeError as err:
                    _skip(skips, bag_skips, path, failure_reason(err), str(err))
                    continue
                count += 1
                yield Frame(
                    image=image,
                    stamp_ns=stamp_ns,
                    frame_id=str(msg.header.frame_id),
                    pose=pose,
                    pose_frame_id=pose_frame_id,
                    source=str(path),
                    topic=connection.topic,
                    msg_index=index,
                )
            logger.info(
                'bag %r: read %d frames from %r, skipped: %s',
                str(path),
                count,
                image_topic,
                bag_skips.summary(),
            )


def _skip(
    skips: SkipCounter, bag_skips: SkipCounter, path: Path, reason: str, detail: str
) -> None:
    if reason not in bag_skips.counts:
        logger.warning(
            'bag %r: skipping frame (%s); further frames skipped for this reason are only counted',
            str(path),
            detail,
        )
    bag_skips.add(reason)
    skips.add(reason)


# --- writing ---------------------------------------------------------------------------------


class _MessageFactory:
    """Builds rosbags message objects for one typestore (ROS 1 headers have a ``seq``)."""

    def __init__(self, typestore: Typestore) -> None:
        self.types = typestore.types
        header_cls = self.types['std_msgs/msg/Header']
        self._has_seq = 'seq' in header_cls.__dataclass_fields__
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
            status=status_cls(status=status_cls.STATUS_FIX, service=status_cls.SERVICE_GPS),
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
    """Write frames (and their poses) to a new bag; the inverse of :func:`read_frames`.

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
        pose_type: One of :data:`POSE_TYPES`: ``'odometry'``, ``'pose_stamped'``,
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
        pose_conn = bag.add(pose_topic, POSE_TYPES[pose_type]) if pose_topic else None

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
