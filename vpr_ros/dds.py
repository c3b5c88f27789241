"""The Fast DDS profile for large camera frames, and the environment that uses it.

On one host Fast DDS sends samples through its shared-memory transport, whose segment is
512 kB per participant by default. A raw image larger than that (640 x 480 rgb8 is 922 kB)
is split into fragments that must all fit in the *publisher's* segment at once; a
best-effort publisher cannot wait for room, so the frame never completes and the
subscriber sees nothing. ``config/fastdds.xml`` (shipped) gives every participant a 16 MB
segment. It must be in effect in the publisher's process (the camera driver, the bag
player): Fast DDS reads it from ``FASTDDS_DEFAULT_PROFILES_FILE`` when a process starts
its first participant.

:func:`dds_environment` adds the shipped profile to an environment for a child process,
:func:`use_shipped_profile` to this process (before ``rclpy.init``); neither overrides a
profile the user set, and both say what they did. No rclpy here.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

PROFILE_ENV = 'FASTDDS_DEFAULT_PROFILES_FILE'
PROFILE_NAME = 'fastdds.xml'
FASTDDS_RMWS = ('rmw_fastrtps_cpp', 'rmw_fastrtps_dynamic_cpp')


def shipped_profile() -> Path | None:
    """The package's Fast DDS profile: in the source tree, or installed under
    ``share/vpr_ros/config``; None if neither exists."""
    candidates = [
        Path(__file__).resolve().parents[1] / 'config' / PROFILE_NAME,
        Path(sys.prefix) / 'share' / 'vpr_ros' / 'config' / PROFILE_NAME,
    ]
    try:
        from ament_index_python.packages import get_package_share_directory

        candidates.append(Path(get_package_share_directory('vpr_ros')) / 'config' / PROFILE_NAME)
    except Exception:  # no ament index (a plain venv) or the package is not installed there
        pass
    return next((path for path in candidates if path.is_file()), None)


def uses_fastdds(env: Mapping[str, str]) -> bool:
    """Whether processes started with ``env`` use Fast DDS (the ROS 2 default RMW)."""
    return env.get('RMW_IMPLEMENTATION', '') in ('', *FASTDDS_RMWS)


def dds_environment(env: Mapping[str, str] | None = None) -> tuple[dict[str, str], str]:
    """``env`` (default: this process's) with the shipped profile, unless one is set.

    Returns:
        The environment, and one line saying which profile it uses and why.
    """
    result = dict(os.environ if env is None else env)
    if not uses_fastdds(result):
        return result, f'RMW {result["RMW_IMPLEMENTATION"]!r}: no Fast DDS profile needed'
    own = result.get(PROFILE_ENV, '')
    profile = shipped_profile()
    if own and profile is not None and Path(own).resolve() == profile:
        return result, f'Fast DDS profile {own!r} (large best-effort frames)'
    if own:
        note = (
            f'{PROFILE_ENV} is set to {own!r} (yours, kept); raw frames over 512 kB sent best '
            "effort need a shared-memory segment that holds them (see vpr_ros's config/"
            f'{PROFILE_NAME})'
        )
        return result, note
    if profile is None:
        return result, f'the Fast DDS profile {PROFILE_NAME} is not installed; using defaults'
    result[PROFILE_ENV] = str(profile)
    return result, f'Fast DDS profile {str(profile)!r} (large best-effort frames)'


def use_shipped_profile() -> str:
    """Put the shipped profile into this process's environment (unless one is set); call
    before ``rclpy.init``. Returns the note of :func:`dds_environment`."""
    env, note = dds_environment()
    if PROFILE_ENV in env:
        os.environ[PROFILE_ENV] = env[PROFILE_ENV]
    return note


def no_frames_hint(topic: str) -> str:
    """What to do when a camera topic has publishers but no frame arrives."""
    profile = shipped_profile()
    where = str(profile) if profile else f'config/{PROFILE_NAME} of vpr_ros'
    return (
        f'camera topic {topic!r} has publishers but its frames do not arrive: with Fast '
        'DDS, raw images over 512 kB published best effort are dropped unless the publisher '
        f'runs with a larger shared-memory segment; start the camera driver with '
        f'{PROFILE_ENV}={where}, or publish reliable (and set camera_qos: reliable), or '
        'use compressed images'
    )
