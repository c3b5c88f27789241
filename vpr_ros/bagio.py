"""Read camera frames with poses from ROS 1 and ROS 2 bags, with rosbags.

A bag path may be a rosbag2 directory (sqlite3 or mcap storage), a ``.mcap`` or ``.db3`` file,
or a ROS 1 ``.bag`` file. Every reading problem that is the bag's fault becomes a
:class:`~vpr_ros.errors.BagReadError` naming the bag; a missing path is a
``FileNotFoundError``. Stamps are int nanoseconds. Pose messages become tracks in
:mod:`vpr_ros.poses`; writing bags is :mod:`vpr_ros.bagwriter`.

Typical use::

    skips = SkipCounter()
    frames = read_frames(['run1/'], '/camera/image_raw', '/odom', skips=skips)
    for frame in frames:
        ...
    logger.info('skipped: %s', skips.summary())
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeAlias

from rosbags.highlevel import AnyReader
from rosbags.interfaces import Connection
from rosbags.typesys import Stores, get_typestore
from rosbags.typesys.store import Typestore

from vpr_ros import logger
from vpr_ros.errors import BagReadError, ImageDecodeError
from vpr_ros.geometry import PoseTrack
from vpr_ros.images import DEFAULT_MAX_PIXELS, IMAGE_TYPES, failure_reason, msg_to_rgb
from vpr_ros.poses import (
    POSE_MSGTYPES,
    EnuOrigin,
    PoseTrackBuilder,
    message_stamp_ns,
    pose_type_of,
)
from vpr_ros.types import Frame, Pose, SkipCounter

BagPaths: TypeAlias = 'str | Path | Sequence[str | Path]'

__all__ = [
    'IMAGE_TYPES',
    'NO_POSE_REASON',
    'FrameStream',
    'bag_topics',
    'count_messages',
    'iter_messages',
    'open_bag',
    'read_frames',
    'topic_connections',
]

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
    """The connections of ``topic`` (with or without a leading slash), checked.

    Args:
        reader: An open reader from :func:`open_bag`.
        path: The bag's path, for error messages.
        topic: The topic name.
        allowed: The message types the topic may have; empty for any.
        role: What the topic is for (``'image'``, ``'pose'``), for error messages.

    Raises:
        BagReadError: The bag has no such topic (the message lists its topics), or the topic
            has a type not in ``allowed``.
    """
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


def _read_track(
    reader: AnyReader, path: Path, connections: list[Connection], enu_origin: EnuOrigin | None
) -> PoseTrackBuilder:
    """Read all poses of one topic of one bag (one pass); warn once per kind of problem."""
    builder = PoseTrackBuilder(connections[0].topic, enu_origin=enu_origin)
    for connection, receive_ns, msg in iter_messages(reader, connections, path):
        builder.add(msg, pose_type_of(connection.msgtype), receive_ns)
    for issue in builder.issues():
        logger.warning('bag %r: %s', str(path), issue)
    return builder


def check_bags(bag_paths: BagPaths, image_topic: str, pose_topic: str | None) -> list[Path]:
    """Open every bag and check that it has the topics, with the right types.

    Cheap (indexes only): commands call it before loading a model, so that a wrong path or
    topic fails at once.

    Returns:
        The bag paths.

    Raises:
        FileNotFoundError: A path does not exist.
        BagReadError: No bag given, a bag is unreadable, or lacks a topic (the message lists
            the bag's topics), or a topic has the wrong type.
    """
    paths = _as_paths(bag_paths)
    if not paths:
        msg = 'no bag paths given; pass at least one bag'
        raise BagReadError(msg)
    for path in paths:
        with open_bag(path) as reader:
            topic_connections(reader, path, image_topic, IMAGE_TYPES, 'image')
            if pose_topic is not None:
                topic_connections(reader, path, pose_topic, POSE_MSGTYPES, 'pose')
    return paths


def read_frames(
    bag_paths: BagPaths,
    image_topic: str,
    pose_topic: str | None = None,
    *,
    max_pose_gap_s: float = 0.5,
    skips: SkipCounter | None = None,
    enu_origin: Sequence[float] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> FrameStream:
    """Stream camera frames, each with its pose interpolated at the image stamp.

    All bags are opened and their topics checked when this function is called, so a wrong
    path or topic fails here rather than at the first ``next()``. Then, bag by bag, the pose
    topic is read in one pass (:class:`~vpr_ros.poses.PoseTrackBuilder`) and the images are
    streamed in receive order. An image's stamp is its header stamp, or the bag receive time
    if the header stamp is zero.

    Frames are skipped, counted in ``skips`` and logged (a warning for the first frame of each
    reason in each bag) when:

    * no pose lies within ``max_pose_gap_s`` (reason :data:`NO_POSE_REASON`): the image stamp is
      outside the pose track, or its two bracketing poses are further apart than the gap;
    * the image cannot be decoded (reason e.g. ``'unknown encoding rgb16'``, see
      :func:`vpr_ros.images.failure_reason`).

    ``sensor_msgs/NavSatFix`` positions are converted to local ENU metres around
    ``enu_origin``, or, if it is ``None``, around the first fix read, which then serves all
    the bags of this call; :attr:`FrameStream.enu_origin` reports it. Pass it on when reading
    bags that must share a frame (e.g. the next traverse of a map, or query runs). Their
    orientation is identity and fixes with ``status < 0`` (no fix) are ignored.

    Args:
        bag_paths: One bag path or a sequence of them, read in order.
        image_topic: A ``sensor_msgs/Image`` or ``sensor_msgs/CompressedImage`` topic.
        pose_topic: A topic of one of :data:`vpr_ros.poses.POSE_MSGTYPES`
            (``nav_msgs/Odometry``, ``geometry_msgs/PoseStamped``,
            ``geometry_msgs/PoseWithCovarianceStamped``, ``sensor_msgs/NavSatFix``);
            ``None`` to read frames without poses.
        max_pose_gap_s: Largest time between the two poses that bracket an image.
        skips: Counter that receives the skipped frames by reason.
        enu_origin: ENU origin (lat, lon, alt) for NavSatFix poses, or ``None``.
        max_pixels: Frames with more pixels are skipped before they are decoded (reason
            :data:`vpr_ros.images.TOO_LARGE_REASON`); None for no cap.

    Returns:
        An iterator of :class:`~vpr_ros.types.Frame` with RGB images.

    Raises:
        FileNotFoundError: A path does not exist.
        BagReadError: A bag is corrupt or truncated (also while iterating), or lacks a topic,
            or a topic has the wrong type; the message lists the bag's topics.
    """
    paths = check_bags(bag_paths, image_topic, pose_topic)
    return FrameStream(
        paths,
        image_topic,
        pose_topic,
        max_gap_ns=round(max_pose_gap_s * 1e9),
        skips=skips if skips is not None else SkipCounter(),
        enu_origin=enu_origin,
        max_pixels=max_pixels,
    )


class FrameStream(Iterator[Frame]):
    """The frames :func:`read_frames` streams, and the ENU origin reading them fixed."""

    def __init__(
        self,
        paths: list[Path],
        image_topic: str,
        pose_topic: str | None,
        *,
        max_gap_ns: int,
        skips: SkipCounter,
        enu_origin: Sequence[float] | None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self._max_pixels = max_pixels
        self._enu_origin: EnuOrigin | None = None
        if enu_origin is not None:
            lat, lon, alt = (float(v) for v in enu_origin)
            self._enu_origin = (lat, lon, alt)
        self._frames = self._generate(paths, image_topic, pose_topic, max_gap_ns, skips)

    @property
    def enu_origin(self) -> EnuOrigin | None:
        """(lat, lon, alt) of the ENU frame NavSatFix poses are in: the one given to
        :func:`read_frames`, or the first fix read so far (``None`` before any)."""
        return self._enu_origin

    def __iter__(self) -> FrameStream:
        return self

    def __next__(self) -> Frame:
        return next(self._frames)

    def _generate(
        self,
        paths: list[Path],
        image_topic: str,
        pose_topic: str | None,
        max_gap_ns: int,
        skips: SkipCounter,
    ) -> Iterator[Frame]:
        for path in paths:
            with open_bag(path) as reader:
                track: PoseTrack | None = None
                pose_frame_id = ''
                if pose_topic is not None:
                    pose_conns = topic_connections(reader, path, pose_topic, POSE_MSGTYPES, 'pose')
                    poses = _read_track(reader, path, pose_conns, self._enu_origin)
                    self._enu_origin = poses.enu_origin
                    track, pose_frame_id = poses.track(), poses.frame_id
                image_conns = topic_connections(reader, path, image_topic, IMAGE_TYPES, 'image')
                bag_skips = SkipCounter()
                count = 0
                messages = iter_messages(reader, image_conns, path)
                for index, (connection, receive_ns, msg) in enumerate(messages):
                    stamp_ns = message_stamp_ns(msg, receive_ns)
                    pose: Pose | None = None
                    if track is not None:
                        pose = track.interpolate(stamp_ns, max_gap_ns)
                        if pose is None:
                            detail = f'no pose within the max gap of image stamp {stamp_ns} ns'
                            _skip(skips, bag_skips, path, NO_POSE_REASON, detail)
                            continue
                    try:
                        image = msg_to_rgb(msg, max_pixels=self._max_pixels)
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
