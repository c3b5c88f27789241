"""Small immutable records shared across the core. Times are int nanoseconds."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Pose:
    """A 6-DoF pose: position in metres, orientation as a unit quaternion (x, y, z, w)."""

    x: float
    y: float
    z: float
    qx: float = 0.0
    qy: float = 0.0
    qz: float = 0.0
    qw: float = 1.0

    def as_array(self) -> np.ndarray:
        return np.array([self.x, self.y, self.z, self.qx, self.qy, self.qz, self.qw])

    @classmethod
    def from_array(cls, values: np.ndarray) -> Pose:
        return cls(*(float(v) for v in values[:7]))

    @classmethod
    def from_row(cls, values: np.ndarray) -> Pose | None:
        """The pose of a map row (x y z qx qy qz qw), or None where it is unknown (NaN)."""
        return None if np.isnan(values[0]) else cls.from_array(values)


@dataclass(frozen=True)
class Frame:
    """One camera image with where it came from and, if known, where it was taken.

    ``image`` is an RGB ``uint8`` array of shape (H, W, 3).
    """

    image: np.ndarray
    stamp_ns: int
    frame_id: str = ''
    pose: Pose | None = None
    pose_frame_id: str = ''
    source: str = ''
    topic: str = ''
    msg_index: int = -1


@dataclass
class SkipCounter:
    """Counts frames skipped, by reason, so summaries can say why frames were lost."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str, n: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return 'none'
        return ', '.join(f'{n} {reason}' for reason, n in sorted(self.counts.items()))


@dataclass(frozen=True)
class CameraIntrinsics:
    """A pinhole camera (``sensor_msgs/CameraInfo`` K and size), in pixels.

    Keypoints are taken as already undistorted (or from a camera with negligible distortion).
    """

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    def matrix(self) -> np.ndarray:
        """The 3x3 calibration matrix K."""
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])

    def scaled_to(self, width: int, height: int) -> CameraIntrinsics:
        """The same camera for an image resized to ``width`` x ``height``."""
        sx, sy = width / self.width, height / self.height
        return CameraIntrinsics(
            self.fx * sx, self.fy * sy, self.cx * sx, self.cy * sy, int(width), int(height)
        )


@dataclass(frozen=True)
class RelativePose:
    """Where the query camera is relative to a map place's camera (optical frames: x right,
    y down, z forward), from the essential matrix of their verified matches.

    ``pose``: the query camera's position and orientation in the place camera's frame. The
    position is in metres when ``metric`` (scaled with the map's keyframe poses), else a unit
    vector (the direction only). ``inliers``: matches consistent with the essential matrix.
    """

    pose: Pose
    metric: bool
    inliers: int


@dataclass(frozen=True)
class Hypothesis:
    """One candidate place for a query, after re-ranking.

    ``global_score``: cosine similarity of global descriptors.
    ``rerank_score``: the re-ranker's score in [0, 1] (``mnn``: fraction of query locations
    with a mutual-nearest-neighbour local match; verifying re-rankers: the fraction of the
    query's keypoints or locations that are RANSAC inliers).
    ``confidence``: in [0, 1], see ``vpr_ros.evidence.confidences``.
    ``inliers``: RANSAC inliers of a verifying re-ranker (-1: not verified).
    ``relative_pose``: the query camera relative to the place's, when the camera intrinsics
    were known and the matches determined it (else None).
    """

    place_index: int
    place_id: int
    global_score: float
    rerank_score: float
    confidence: float
    pose: Pose | None = None
    inliers: int = -1
    relative_pose: RelativePose | None = None
