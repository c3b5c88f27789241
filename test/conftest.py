"""Shared fixtures: small synthetic places and the default model, loaded once."""

from __future__ import annotations

import os
import tempfile

import cv2
import numpy as np
import pytest
import torch

from vpr_ros.dds import PROFILE_ENV, dds_environment

# One thread per test process: the CI machine has two cores.
torch.set_num_threads(1)
# ONNX exports of registry models come from an empty cache of the tests' own, not the
# user's (vpr_ros.extraction): tests that want ONNX Runtime export first.
os.environ['VPR_ROS_CACHE_DIR'] = tempfile.mkdtemp(prefix='vpr_ros_test_cache_')
os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
# The shipped Fast DDS profile for every participant of the tests (this process's too),
# unless one is set (scripts/test.sh sets the same file).
_dds_env, _ = dds_environment()
if PROFILE_ENV in _dds_env:
    os.environ[PROFILE_ENV] = _dds_env[PROFILE_ENV]


def synthetic_place(index: int, size: tuple[int, int] = (120, 160)) -> np.ndarray:
    """A distinct, textured RGB image for place ``index`` (deterministic)."""
    height, width = size
    rng = np.random.default_rng(1000 + index)
    image = np.zeros((height, width, 3), np.uint8)
    image[:] = rng.integers(30, 90, 3)
    for _ in range(12):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        if rng.random() < 0.5:
            cv2.circle(image, center, int(rng.integers(5, height // 3)), color, -1)
        else:
            corner = (center[0] + int(rng.integers(10, 60)), center[1] + int(rng.integers(10, 60)))
            cv2.rectangle(image, center, corner, color, -1)
    return image


def viewed_again(image: np.ndarray, shift_px: int = 4, gain: float = 1.15) -> np.ndarray:
    """The same place seen again: a small shift and a lighting change."""
    moved = np.roll(image, shift_px, axis=1)
    return np.clip(moved.astype(np.float32) * gain + 5, 0, 255).astype(np.uint8)


@pytest.fixture(scope='session')
def default_model():
    from vpr_ros.models import DEFAULT_MODEL, load_model

    return load_model(DEFAULT_MODEL)


_domain_offset = iter(range(1000))


def ros_environment() -> dict[str, str]:
    """Environment for a ROS process of one test: loopback only and a domain of its own.

    Domain ids are spread by process id so that parallel test runs on one machine do not
    see each other's nodes.
    """
    domain = 1 + (os.getpid() * 7 + next(_domain_offset)) % 100
    env = dict(os.environ)
    env.update(
        ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST',
        ROS_DOMAIN_ID=str(domain),
        PYTHONUNBUFFERED='1',
    )
    return env


# -- small bags (test_bagio, test_bagwriter, test_poses) -----------------------------------

S = 1_000_000_000  # one second in ns
T0 = 1_700_000_000 * S  # a realistic epoch stamp


def bag_path(tmp_path, storage: str, name: str = 'run'):
    """Where a bag of ``storage`` goes: a ``.bag`` file for ROS 1, else a directory."""
    return tmp_path / (f'{name}.bag' if storage == 'rosbag1' else name)


def storage_file(bag):
    """The one file that holds the messages of a bag."""
    return (
        bag if bag.is_file() else next(p for p in bag.iterdir() if p.suffix in ('.db3', '.mcap'))
    )


def make_frames(n: int = 6, *, with_poses: bool = True) -> list:
    """Tiny smooth 32x24 images, 0.1 s apart, moving 1 m along x and turning 10 deg per frame."""
    import math

    from vpr_ros.types import Frame, Pose

    y, x = np.mgrid[0:24, 0:32]
    frames = []
    for i in range(n):
        image = np.stack([x * 8, y * 10, np.full_like(x, 40 * i)], axis=-1).astype(np.uint8)
        half = math.radians(10.0 * i) / 2
        pose = Pose(float(i), 0.5 * i, 0.0, 0.0, 0.0, math.sin(half), math.cos(half))
        frames.append(
            Frame(
                image=image,
                stamp_ns=T0 + i * S // 10,
                frame_id='camera_optical',
                pose=pose if with_poses else None,
            )
        )
    return frames
