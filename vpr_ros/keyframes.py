"""Keyframe selection: keep a frame when the camera has moved, turned or waited enough."""

from __future__ import annotations

from dataclasses import dataclass

from vpr_ros.config import Conf, option
from vpr_ros.errors import ConfigError
from vpr_ros.geometry import distance_m, rotation_angle_deg
from vpr_ros.types import Pose


@dataclass(frozen=True)
class KeyframeConf(Conf):
    """When a frame becomes a keyframe (a map place); see ``KeyframeSelector``."""

    min_distance_m: float = option(
        1.0,
        'New keyframe after travelling this far (0: every frame with a pose)',
        unit='m',
        min=0.0,
    )
    min_rotation_deg: float = option(
        15.0, 'New keyframe after turning this much', unit='deg', min=0.0
    )
    max_interval_s: float = option(
        0.0, 'New keyframe after this long regardless of motion (0: off)', unit='s', min=0.0
    )


class KeyframeSelector:
    """Decide which frames of a stream become keyframes (map places).

    Policy, applied to frames in stream order by :meth:`accept`:

    1. The first frame is always kept.
    2. A frame with a pose is kept when, compared with the most recent keyframe that had a pose,
       the travelled straight-line distance is ``>= min_distance_m`` **or** the rotation angle
       is ``>= min_rotation_deg``. The first frame with a pose after keyframes without one is
       kept too, so that there is a reference to compare with.
    3. If ``max_interval_s`` is set, any frame (with or without pose) is also kept when at least
       ``max_interval_s`` seconds have passed since the last keyframe (by stamp). This keeps
       places coming while standing still, and is the only rule that applies to frames without
       a pose: without poses and without ``max_interval_s`` only the first frame is kept.

    Stamps that go backwards (e.g. a new bag) never trigger the time rule; call :meth:`reset`
    between independent streams.

    Args:
        min_distance_m: Distance in metres that makes a new keyframe; 0 keeps every posed frame.
        min_rotation_deg: Rotation in degrees that makes a new keyframe.
        max_interval_s: Seconds after which a frame is kept regardless of motion; ``None`` to
            disable the time rule.

    Raises:
        ConfigError: A threshold is negative, or ``max_interval_s`` is not positive.
    """

    def __init__(
        self,
        min_distance_m: float = 1.0,
        min_rotation_deg: float = 15.0,
        max_interval_s: float | None = None,
    ) -> None:
        if min_distance_m < 0 or min_rotation_deg < 0:
            msg = (
                f'keyframe thresholds must be >= 0, got min_distance_m={min_distance_m!r}, '
                f'min_rotation_deg={min_rotation_deg!r}'
            )
            raise ConfigError(msg)
        if max_interval_s is not None and max_interval_s <= 0:
            msg = f'max_interval_s must be > 0 or None (disabled), got {max_interval_s!r}'
            raise ConfigError(msg)
        self.min_distance_m = float(min_distance_m)
        self.min_rotation_deg = float(min_rotation_deg)
        self.max_interval_s = max_interval_s
        self._max_interval_ns = None if max_interval_s is None else round(max_interval_s * 1e9)
        self.reset()

    @classmethod
    def from_conf(cls, conf: KeyframeConf) -> KeyframeSelector:
        return cls(conf.min_distance_m, conf.min_rotation_deg, conf.max_interval_s or None)

    def reset(self) -> None:
        """Forget all keyframes; the next frame is kept."""
        self.last_stamp_ns: int | None = None
        self.last_pose: Pose | None = None
        self.count = 0

    def accept(self, stamp_ns: int, pose: Pose | None = None) -> bool:
        """Decide whether a frame is a keyframe, and remember it if it is.

        Args:
            stamp_ns: The frame's stamp in int nanoseconds.
            pose: The frame's pose, or ``None`` if unknown.

        Returns:
            ``True`` if the frame is a keyframe.
        """
        if self._is_keyframe(stamp_ns, pose):
            self.last_stamp_ns = stamp_ns
            if pose is not None:
                self.last_pose = pose
            self.count += 1
            return True
        return False

    def _is_keyframe(self, stamp_ns: int, pose: Pose | None) -> bool:
        if self.last_stamp_ns is None:
            return True
        if self._max_interval_ns is not None:
            if stamp_ns - self.last_stamp_ns >= self._max_interval_ns:
                return True
        if pose is None:
            return False
        if self.last_pose is None:
            return True
        return (
            distance_m(pose, self.last_pose) >= self.min_distance_m
            or rotation_angle_deg(pose, self.last_pose) >= self.min_rotation_deg
        )
