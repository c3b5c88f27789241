"""Pose messages -> pose tracks: the one table of pose message types and the one track builder.

This module owns

* :data:`POSE_TYPES`: the pose kinds (``'odometry'``, ``'pose_stamped'``, ``'pose_cov'``,
  ``'navsat'``), their ROS message types and how each one is decoded;
* :class:`PoseTrackBuilder`: pose messages of one topic -> a
  :class:`~vpr_ros.geometry.PoseTrack`. It drops what cannot be used (NavSatFix without a fix,
  non-finite positions), gives position-only sources (zero quaternion) the identity
  orientation, notes the pose frame id (warning when a topic mixes several) and counts all of
  this for one warning each;
* the NavSatFix ENU origin's flow. The origin of a map's local East-North-Up frame is read
  from the map once (``PlaceDatabase.enu_origin``, ``None`` for a new map) and given to the
  track builder; if it is ``None`` the builder fixes it from the first fix it reads and
  reports it (:attr:`PoseTrackBuilder.enu_origin`); the caller passes it on to the next bag
  and records it in the map (``MapBuilder.record_enu_origin``). Nothing else holds it.

The decoders read message attributes only, so rosbags messages and rclpy messages work alike.
Stamps are int nanoseconds, positions metres, quaternions ``(x, y, z, w)``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeAlias

from vpr_ros.geometry import LocalTangentPlane, PoseTrack
from vpr_ros.types import SkipCounter

Position: TypeAlias = tuple[float, float, float]
Quaternion: TypeAlias = tuple[float, float, float, float]
EnuOrigin: TypeAlias = tuple[float, float, float]
"""Latitude, longitude (degrees) and altitude (m) of a local ENU frame's (0, 0, 0)."""

IDENTITY_QUATERNION: Quaternion = (0.0, 0.0, 0.0, 1.0)


class LocalPose(NamedTuple):
    """A decoded pose in a local metric frame."""

    position: Position
    quaternion: Quaternion


class GeodeticFix(NamedTuple):
    """A decoded GNSS fix: degrees, degrees, metres (altitude may be NaN: unknown)."""

    latitude: float
    longitude: float
    altitude: float


Decoded: TypeAlias = 'LocalPose | GeodeticFix | None'
"""What a decoder makes of one message; ``None`` for a NavSatFix without a fix."""


class PoseType(NamedTuple):
    """One kind of pose message: its ROS type and its decoder."""

    kind: str
    msgtype: str
    decode: Callable[[Any], Decoded]


def _local(pose: Any) -> LocalPose:
    """A ``geometry_msgs/Pose`` as plain floats."""
    p, q = pose.position, pose.orientation
    return LocalPose(
        (float(p.x), float(p.y), float(p.z)), (float(q.x), float(q.y), float(q.z), float(q.w))
    )


def _decode_navsat(msg: Any) -> GeodeticFix | None:
    lat, lon = float(msg.latitude), float(msg.longitude)
    if int(msg.status.status) < 0 or not (math.isfinite(lat) and math.isfinite(lon)):
        return None
    return GeodeticFix(lat, lon, float(msg.altitude))


POSE_TYPES: dict[str, PoseType] = {
    pose_type.kind: pose_type
    for pose_type in (
        PoseType('odometry', 'nav_msgs/msg/Odometry', lambda msg: _local(msg.pose.pose)),
        PoseType('pose_stamped', 'geometry_msgs/msg/PoseStamped', lambda msg: _local(msg.pose)),
        PoseType(
            'pose_cov',
            'geometry_msgs/msg/PoseWithCovarianceStamped',
            lambda msg: _local(msg.pose.pose),
        ),
        PoseType('navsat', 'sensor_msgs/msg/NavSatFix', _decode_navsat),
    )
}
"""Pose kind -> its message type and decoder; the one table of accepted pose messages."""

POSE_MSGTYPES: tuple[str, ...] = tuple(t.msgtype for t in POSE_TYPES.values())
"""The message types accepted on a pose topic."""


def pose_type_of(msgtype: str) -> PoseType:
    """The pose type of a message type such as ``'nav_msgs/msg/Odometry'``.

    Raises:
        ValueError: not one of :data:`POSE_MSGTYPES`.
    """
    for pose_type in POSE_TYPES.values():
        if pose_type.msgtype == msgtype:
            return pose_type
    msg = f'{msgtype!r} is not a pose message type; expected one of {", ".join(POSE_MSGTYPES)}'
    raise ValueError(msg)


def has_orientation(quaternion: Sequence[float]) -> bool:
    """Whether a quaternion is usable: finite with a non-zero norm. Position-only sources
    publish zeros; the track builder uses the identity for them."""
    norm = math.sqrt(sum(v * v for v in quaternion))
    return math.isfinite(norm) and norm > 1e-9


def message_stamp_ns(msg: Any, receive_ns: int | None = None) -> int:
    """A message's header stamp in ns; ``receive_ns`` instead if given and the stamp is zero
    (some drivers leave header stamps empty)."""
    stamp = msg.header.stamp
    ns = int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)
    return int(receive_ns) if ns == 0 and receive_ns is not None else ns


# Reasons a pose message is not used, and what is said about them (count, topic).
NO_FIX = 'NavSatFix without a fix'
NON_FINITE_POSITION = 'non-finite position'
_ISSUES: dict[str, str] = {
    NO_FIX: 'ignored {n} NavSatFix messages without a fix on {topic!r}',
    NON_FINITE_POSITION: 'ignored {n} pose messages on {topic!r} with a non-finite position',
}


class PoseTrackBuilder:
    """Pose messages of one topic -> a :class:`~vpr_ros.geometry.PoseTrack`.

    Positions and orientations are taken as they are, except that

    * a NavSatFix without a fix (``status < 0`` or a non-finite latitude/longitude) and a
      pose with a non-finite position are dropped and counted (:attr:`ignored`);
    * a zero or non-finite quaternion (position-only sources) becomes the identity, counted;
    * a NavSatFix becomes ENU metres around :attr:`enu_origin` (fixed by the first fix when
      it was not given) with identity orientation; an unknown altitude is the origin's.

    The pose frame id is the first message's; a topic that mixes frame ids is warned about.

    Args:
        topic: the pose topic, for messages.
        enu_origin: the ENU origin NavSatFix poses must share (e.g. the map's), or ``None``
            to take the first fix.
        max_samples: keep only the newest samples (a live node's bounded history); ``None``
            keeps all.
        on_issue: called with a one-line text the first time each kind of problem occurs
            (a live node logs it at once); the counted summary is :meth:`issues`.
    """

    def __init__(
        self,
        topic: str = '',
        *,
        enu_origin: Sequence[float] | None = None,
        max_samples: int | None = None,
        on_issue: Callable[[str], None] | None = None,
    ) -> None:
        self.topic = topic
        self._plane = LocalTangentPlane(*enu_origin) if enu_origin is not None else None
        self._samples: deque[tuple[int, Position, Quaternion]] = deque(maxlen=max_samples)
        self._on_issue = on_issue
        self.ignored = SkipCounter()
        """Messages not used, by reason (:data:`NO_FIX`, :data:`NON_FINITE_POSITION`)."""
        self.identity_orientations = 0
        """Poses with a zero or non-finite quaternion that got the identity."""
        self.frame_id = ''
        """The pose frame id: the first message's."""
        self.frame_ids: set[str] = set()
        self.received = 0

    @property
    def enu_origin(self) -> EnuOrigin | None:
        """(lat, lon, alt) of the ENU frame of NavSatFix poses: the one given or the first
        fix's; ``None`` while no fix was read and none was given."""
        return self._plane.origin if self._plane is not None else None

    def __len__(self) -> int:
        return len(self._samples)

    @property
    def newest_stamp_ns(self) -> int | None:
        """The stamp of the newest sample (by arrival), or ``None`` without samples."""
        return self._samples[-1][0] if self._samples else None

    def add(self, msg: Any, pose_type: PoseType, receive_ns: int | None = None) -> bool:
        """Take one pose message; returns whether it became a sample.

        Args:
            msg: a rosbags or rclpy message of ``pose_type``.
            pose_type: from :data:`POSE_TYPES`.
            receive_ns: the bag's receive time, used if the header stamp is zero.
        """
        self.received += 1
        decoded = pose_type.decode(msg)
        if decoded is None:
            return self._ignore(NO_FIX)
        if isinstance(decoded, GeodeticFix):
            position, quaternion = self._to_enu(decoded), IDENTITY_QUATERNION
        else:
            position, quaternion = decoded
        if not all(math.isfinite(v) for v in position):
            return self._ignore(NON_FINITE_POSITION)
        if not has_orientation(quaternion):
            if not self.identity_orientations:
                self._issue(self._identity_text(1))
            self.identity_orientations += 1
            quaternion = IDENTITY_QUATERNION
        frame_id = str(msg.header.frame_id)
        if not self.frame_ids:
            self.frame_id = frame_id
        elif frame_id not in self.frame_ids:
            self._issue(self._frame_ids_text([*self.frame_ids, frame_id]))
        self.frame_ids.add(frame_id)
        self._samples.append((message_stamp_ns(msg, receive_ns), position, quaternion))
        return True

    def track(self) -> PoseTrack:
        """The samples so far as an interpolable track."""
        if not self._samples:
            return PoseTrack([], [], [])
        stamps, positions, quaternions = zip(*self._samples)
        return PoseTrack(stamps, positions, quaternions)

    def issues(self) -> list[str]:
        """One line per kind of problem seen so far, with counts (empty: none)."""
        lines = [
            _ISSUES[reason].format(n=n, topic=self.topic)
            for reason, n in sorted(self.ignored.counts.items())
        ]
        if self.identity_orientations:
            lines.append(self._identity_text(self.identity_orientations))
        if len(self.frame_ids) > 1:
            lines.append(self._frame_ids_text(self.frame_ids))
        if self.received and not self._samples:
            lines.append(f'pose topic {self.topic!r} has no usable poses')
        return lines

    def _to_enu(self, fix: GeodeticFix) -> Position:
        lat, lon, alt = fix
        if self._plane is None:
            self._plane = LocalTangentPlane(lat, lon, alt if math.isfinite(alt) else 0.0)
        if not math.isfinite(alt):
            alt = self._plane.origin[2]
        east, north, up = (float(v) for v in self._plane.to_enu(lat, lon, alt))
        return east, north, up

    def _ignore(self, reason: str) -> bool:
        if reason not in self.ignored.counts:
            self._issue(_ISSUES[reason].format(n=1, topic=self.topic) + ' (more are counted)')
        self.ignored.add(reason)
        return False

    def _issue(self, text: str) -> None:
        if self._on_issue is not None:
            self._on_issue(text)

    def _identity_text(self, n: int) -> str:
        return (
            f'{n} pose messages on {self.topic!r} have a zero or non-finite quaternion; '
            'using identity orientation for them'
        )

    def _frame_ids_text(self, frame_ids: Sequence[str] | set[str]) -> str:
        return (
            f'pose topic {self.topic!r} mixes frame ids {sorted(frame_ids)}; '
            f'using {self.frame_id!r}'
        )
