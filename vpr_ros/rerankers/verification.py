"""Geometric verification of matches (OpenCV RANSAC), and relative poses between cameras.

* ``ransac_inliers``: the matches consistent with one homography (or fundamental matrix),
  robustly estimated by OpenCV's USAC MAGSAC; verifying re-rankers score by their count.
* ``essential_pose``: with intrinsics, the relative rotation and translation direction
  from the essential matrix (``cv2.findEssentialMat`` + ``cv2.recoverPose``).
* ``metric_scale``: the unknown scale of that translation, from a second map keyframe whose
  distance to the first is known from the map's poses: both views triangulate the same
  place keypoints, one at unit and one at metric baseline, and the depth ratio is the scale.

Conventions: points are (N, 2) pixels (x, y); ``essential_pose(points_a, points_b)``
returns R, t with X_b = R X_a + t (camera b's coordinates of a point given in camera a's).
cv2 is imported where used, so the settings table stays cheap to import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from vpr_ros.config import Conf, option
from vpr_ros.types import CameraIntrinsics, Pose, RelativePose

RANSAC_MODELS = ('homography', 'fundamental')
_MIN_MATCHES = {'homography': 4, 'fundamental': 8}
_MIN_ESSENTIAL_MATCHES = 5


@dataclass(frozen=True)
class VerificationConf(Conf):
    """How verifying re-rankers check matches, and when they estimate relative poses."""

    ransac_model: str = option(
        'homography',
        "What the matches of a true place must agree on: 'homography' (a plane or a camera "
        "rotation; the usual check in place recognition) or 'fundamental' (any static scene)",
        choices=RANSAC_MODELS,
    )
    ransac_threshold_px: float = option(
        8.0,
        'Keypoint verifiers: largest reprojection (or epipolar) error of an inlier, in pixels '
        'of the original image',
        unit='px',
        min=0.0,
        min_exclusive=True,
    )
    grid_threshold_cells: float = option(
        1.5,
        'mnn_ransac: largest error of an inlier, in cells of the local-feature grid',
        unit='cells',
        min=0.0,
        min_exclusive=True,
    )
    ransac_iterations: int = option(1000, 'Most RANSAC iterations per candidate', min=1)
    ransac_confidence: float = option(
        0.999, 'RANSAC stops once it is this sure of its best model', min=0.5, max=1.0
    )
    pose_threshold_px: float = option(
        2.0,
        'Relative pose (intrinsics known): largest epipolar error of an essential-matrix inlier',
        unit='px',
        min=0.0,
        min_exclusive=True,
    )
    min_pose_inliers: int = option(
        15,
        'A relative pose (intrinsics known) needs at least this many essential-matrix inliers',
        min=_MIN_ESSENTIAL_MATCHES,
    )
    min_baseline_m: float = option(
        0.3,
        "Metric scale of the best place's relative pose: the neighbouring keyframe used must "
        'be at least this far from it (0 disables scaling)',
        unit='m',
        min=0.0,
    )


def ransac_inliers(
    points0: np.ndarray,
    points1: np.ndarray,
    *,
    model: str = 'homography',
    threshold: float = 8.0,
    iterations: int = 1000,
    confidence: float = 0.999,
) -> np.ndarray:
    """(N,) bool: which matches ``points0[i] <-> points1[i]`` agree with the model that
    USAC MAGSAC finds; all False when there are too few matches to fit one."""
    import cv2

    count = len(points0)
    if count < _MIN_MATCHES[model]:
        return np.zeros(count, bool)
    p0 = np.ascontiguousarray(points0, np.float32).reshape(-1, 1, 2)
    p1 = np.ascontiguousarray(points1, np.float32).reshape(-1, 1, 2)
    if model == 'homography':
        matrix, mask = cv2.findHomography(
            p0, p1, cv2.USAC_MAGSAC, threshold, maxIters=iterations, confidence=confidence
        )
    else:
        matrix, mask = cv2.findFundamentalMat(
            p0, p1, cv2.USAC_MAGSAC, threshold, confidence, iterations
        )
    if matrix is None or mask is None:
        return np.zeros(count, bool)
    inliers: np.ndarray = mask.reshape(-1).astype(bool)
    return inliers


class EssentialPose(NamedTuple):
    """R, t (unit) with X_b = R X_a + t, and which matches are its inliers."""

    rotation: np.ndarray
    translation: np.ndarray
    inliers: np.ndarray


def normalized(points: np.ndarray, camera: CameraIntrinsics) -> np.ndarray:
    """(N, 2) pixels -> (N, 2) normalised image coordinates (K^-1 applied)."""
    xy = np.asarray(points, np.float64).reshape(-1, 2)
    return np.stack([(xy[:, 0] - camera.cx) / camera.fx, (xy[:, 1] - camera.cy) / camera.fy], 1)


def essential_pose(
    points_a: np.ndarray,
    points_b: np.ndarray,
    camera_a: CameraIntrinsics,
    camera_b: CameraIntrinsics,
    *,
    threshold_px: float = 2.0,
    confidence: float = 0.999,
    iterations: int = 1000,
) -> EssentialPose | None:
    """Relative pose of camera b to camera a from matched pixels (None: too few matches or
    no essential matrix found). Inliers are those in front of both cameras."""
    import cv2

    if len(points_a) < _MIN_ESSENTIAL_MATCHES:
        return None
    na, nb = normalized(points_a, camera_a), normalized(points_b, camera_b)
    focal = (camera_a.fx + camera_a.fy + camera_b.fx + camera_b.fy) / 4
    identity = np.eye(3)
    essential, mask = cv2.findEssentialMat(
        na,
        nb,
        identity,
        method=cv2.USAC_MAGSAC,
        prob=confidence,
        threshold=threshold_px / focal,
        maxIters=iterations,
    )
    if essential is None or mask is None or essential.shape != (3, 3):
        return None
    _, rotation, translation, mask = cv2.recoverPose(essential, na, nb, identity, mask=mask)
    inliers = mask.reshape(-1).astype(bool)
    return EssentialPose(rotation, translation.reshape(3), inliers)


def triangulate(relative: EssentialPose, na: np.ndarray, nb: np.ndarray) -> np.ndarray:
    """(N, 3) points in camera a's frame from normalised matches, at unit baseline."""
    import cv2

    first = np.hstack([np.eye(3), np.zeros((3, 1))])
    second = np.hstack([relative.rotation, relative.translation.reshape(3, 1)])
    homogeneous = cv2.triangulatePoints(first, second, na.T.astype(np.float64), nb.T)
    points: np.ndarray = (homogeneous[:3] / homogeneous[3]).T
    return points


def query_in_place_frame(relative: EssentialPose, scale: float | None) -> RelativePose:
    """The query camera (b) in the place camera's (a) frame; metric when ``scale`` is given."""
    from scipy.spatial.transform import Rotation

    rotation_t = relative.rotation.T
    position = -rotation_t @ relative.translation * (scale if scale is not None else 1.0)
    qx, qy, qz, qw = Rotation.from_matrix(rotation_t).as_quat()
    x, y, z = (float(v) for v in position)
    pose = Pose(x, y, z, float(qx), float(qy), float(qz), float(qw))
    return RelativePose(pose, metric=scale is not None, inliers=int(relative.inliers.sum()))


def place_depths(
    relative: EssentialPose,
    place_points: np.ndarray,
    other_points: np.ndarray,
    place_indices: np.ndarray,
    camera_place: CameraIntrinsics,
    camera_other: CameraIntrinsics,
) -> dict[int, float]:
    """Depth in the place camera of each inlier place keypoint (by its index), at unit
    baseline between the place camera (a) and the other (b)."""
    keep = relative.inliers
    points = triangulate(
        relative,
        normalized(place_points[keep], camera_place),
        normalized(other_points[keep], camera_other),
    )
    return dict(zip(np.asarray(place_indices)[keep].tolist(), points[:, 2].tolist()))


def metric_scale(
    query_depths: dict[int, float],
    neighbour_depths: dict[int, float],
    baseline_m: float,
    *,
    min_common: int = 5,
) -> float | None:
    """Metres per unit of the place -> query translation (None: too few shared points).

    The place keypoints verified against both the query (``query_depths``, unit baseline)
    and a neighbouring map keyframe ``baseline_m`` away (``neighbour_depths``, unit
    baseline) have two depth estimates; the median ratio of their metric depths
    (neighbour depth x baseline) to their query depths is the scale.
    """
    ratios = [
        depth * baseline_m / query_depths[index]
        for index, depth in neighbour_depths.items()
        if depth > 0 and query_depths.get(index, 0.0) > 0
    ]
    if len(ratios) < min_common:
        return None
    return float(np.median(ratios))
