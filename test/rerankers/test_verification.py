"""Verification geometry: RANSAC inliers, relative pose from the essential matrix, metric scale.

Synthetic two- and three-view scenes with known cameras: points in front of the cameras are
projected with a known K, noise and outliers are added, and what comes back is compared
with the truth.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from vpr_ros.rerankers.verification import (
    essential_pose,
    metric_scale,
    place_depths,
    query_in_place_frame,
    ransac_inliers,
)
from vpr_ros.types import CameraIntrinsics

CAMERA = CameraIntrinsics(fx=500.0, fy=500.0, cx=320.0, cy=240.0, width=640, height=480)


def scene_points(rng: np.random.Generator, count: int) -> np.ndarray:
    """(count, 3) points 4..12 m in front of camera a, spread over its view."""
    depth = rng.uniform(4.0, 12.0, count)
    x = rng.uniform(-0.6, 0.6, count) * depth
    y = rng.uniform(-0.45, 0.45, count) * depth
    return np.stack([x, y, depth], axis=1)


def project(points: np.ndarray, rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """Pixels of ``points`` (given in camera a) in the camera with X_b = R X_a + t."""
    camera = points @ rotation.T + translation
    return np.stack(
        [
            CAMERA.fx * camera[:, 0] / camera[:, 2] + CAMERA.cx,
            CAMERA.fy * camera[:, 1] / camera[:, 2] + CAMERA.cy,
        ],
        axis=1,
    )


def rotation_error_deg(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.degrees(Rotation.from_matrix(a.T @ b).magnitude()))


def test_ransac_inliers_are_the_matches_that_follow_the_planted_homography() -> None:
    rng = np.random.default_rng(0)
    homography = np.array([[0.9, 0.1, 12.0], [-0.05, 1.05, -8.0], [2e-4, 1e-4, 1.0]])
    points = rng.uniform(0, 400, (120, 2))
    mapped = np.c_[points, np.ones(120)] @ homography.T
    mapped = mapped[:, :2] / mapped[:, 2:] + rng.normal(0, 0.5, (120, 2))
    outliers = rng.choice(120, 30, replace=False)
    mapped[outliers] = rng.uniform(0, 400, (30, 2))
    inliers = ransac_inliers(points, mapped, threshold=3.0)
    truth = np.ones(120, bool)
    truth[outliers] = False
    assert (inliers == truth).mean() >= 0.97
    assert inliers.sum() >= 85


def test_too_few_matches_for_a_model_verify_nothing() -> None:
    points = np.zeros((3, 2))
    assert not ransac_inliers(points, points).any()
    assert not ransac_inliers(np.zeros((7, 2)), np.zeros((7, 2)), model='fundamental').any()


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_relative_pose_of_a_synthetic_two_view_scene_recovers_the_rotation_within_2_degrees(
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    points = scene_points(rng, 150)
    rotation = Rotation.from_euler('xyz', rng.uniform(-12, 12, 3), degrees=True).as_matrix()
    translation = np.array([0.8, 0.1, 0.3])
    pixels_a = project(points, np.eye(3), np.zeros(3))
    pixels_b = project(points, rotation, translation) + rng.normal(0, 0.5, (150, 2))
    pixels_b[:25] = rng.uniform([0, 0], [640, 480], (25, 2))  # wrong matches

    relative = essential_pose(pixels_a, pixels_b, CAMERA, CAMERA)

    assert relative is not None
    assert rotation_error_deg(relative.rotation, rotation) < 2.0
    direction = translation / np.linalg.norm(translation)
    assert np.degrees(np.arccos(np.clip(relative.translation @ direction, -1, 1))) < 5.0
    assert relative.inliers[25:].mean() > 0.9 and relative.inliers[:25].mean() < 0.2


def test_the_query_pose_is_given_in_the_place_cameras_frame() -> None:
    rng = np.random.default_rng(3)
    points = scene_points(rng, 100)
    # The query camera sits 1 m to the right of the place camera, turned 10 degrees about y.
    turn = Rotation.from_euler('y', 10, degrees=True)
    position = np.array([1.0, 0.0, 0.0])
    rotation = turn.inv().as_matrix()  # X_query = R^T (X_place - C)
    translation = -rotation @ position
    relative = essential_pose(
        project(points, np.eye(3), np.zeros(3)),
        project(points, rotation, translation),
        CAMERA,
        CAMERA,
    )
    assert relative is not None
    pose = query_in_place_frame(relative, scale=None).pose
    np.testing.assert_allclose([pose.x, pose.y, pose.z], position, atol=0.02)  # unit length
    got = Rotation.from_quat([pose.qx, pose.qy, pose.qz, pose.qw])
    assert np.degrees((got.inv() * turn).magnitude()) < 0.5


def test_metric_scale_comes_from_a_neighbouring_keyframe_at_a_known_baseline() -> None:
    rng = np.random.default_rng(4)
    points = scene_points(rng, 120)
    # The neighbour keyframe is 2 m to the right of the place; the query 0.7 m ahead, turned.
    neighbour_r, neighbour_t = np.eye(3), -np.array([2.0, 0.0, 0.0])
    query_r = Rotation.from_euler('y', -6, degrees=True).as_matrix()
    query_t = -query_r @ np.array([0.1, 0.0, 0.7])
    place_px = project(points, np.eye(3), np.zeros(3))
    neighbour_px = project(points, neighbour_r, neighbour_t) + rng.normal(0, 0.3, (120, 2))
    query_px = project(points, query_r, query_t) + rng.normal(0, 0.3, (120, 2))
    indices = np.arange(120)
    # Each view sees only part of the place's keypoints; 80 are seen by both.
    to_query, to_neighbour = indices[:100], indices[20:]

    place_query = essential_pose(place_px[to_query], query_px[to_query], CAMERA, CAMERA)
    place_neighbour = essential_pose(
        place_px[to_neighbour], neighbour_px[to_neighbour], CAMERA, CAMERA
    )
    assert place_query is not None and place_neighbour is not None
    query_depths = place_depths(
        place_query, place_px[to_query], query_px[to_query], to_query, CAMERA, CAMERA
    )
    neighbour_depths = place_depths(
        place_neighbour,
        place_px[to_neighbour],
        neighbour_px[to_neighbour],
        to_neighbour,
        CAMERA,
        CAMERA,
    )
    scale = metric_scale(query_depths, neighbour_depths, baseline_m=2.0)

    assert scale is not None
    pose = query_in_place_frame(place_query, scale)
    assert pose.metric
    np.testing.assert_allclose([pose.pose.x, pose.pose.y, pose.pose.z], [0.1, 0.0, 0.7], atol=0.05)


def test_no_scale_without_enough_keypoints_seen_from_both_views() -> None:
    assert metric_scale({1: 2.0, 2: 3.0}, {1: 1.0, 2: 1.5, 3: 4.0}, baseline_m=1.0) is None
