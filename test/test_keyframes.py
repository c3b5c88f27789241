"""Tests of vpr_ros.keyframes: the distance / rotation / time keyframe policy."""

from __future__ import annotations

import math

import pytest

from vpr_ros.errors import ConfigError
from vpr_ros.keyframes import KeyframeSelector
from vpr_ros.types import Pose

S = 1_000_000_000


def yawed(x: float, yaw_deg: float = 0.0) -> Pose:
    half = math.radians(yaw_deg) / 2
    return Pose(x, 0.0, 0.0, 0.0, 0.0, math.sin(half), math.cos(half))


def test_first_frame_is_always_kept() -> None:
    selector = KeyframeSelector()
    assert selector.accept(0, yawed(0.0))
    assert not selector.accept(S, yawed(0.0))
    assert selector.count == 1


def test_frame_is_kept_once_distance_since_last_keyframe_reaches_the_threshold() -> None:
    selector = KeyframeSelector(min_distance_m=1.0, min_rotation_deg=90.0)
    kept = [selector.accept(i * S, yawed(0.4 * i)) for i in range(8)]
    # distances from the last keyframe: 0.4, 0.8, 1.2 -> keep at x=1.2, then x=2.4
    assert kept == [True, False, False, True, False, False, True, False]


def test_frame_is_kept_once_rotation_since_last_keyframe_reaches_the_threshold() -> None:
    selector = KeyframeSelector(min_distance_m=10.0, min_rotation_deg=15.0)
    assert selector.accept(0, yawed(0.0, 0.0))
    assert not selector.accept(1, yawed(0.0, 10.0))
    assert selector.accept(2, yawed(0.0, 16.0))
    assert not selector.accept(3, yawed(0.0, 2.0))  # 14 deg back from the last keyframe


def test_time_rule_keeps_frames_while_standing_still() -> None:
    selector = KeyframeSelector(max_interval_s=2.0)
    kept = [selector.accept(i * S, yawed(0.0)) for i in range(6)]
    assert kept == [True, False, True, False, True, False]


def test_frames_without_poses_are_kept_by_time_only() -> None:
    without_interval = KeyframeSelector(min_distance_m=0.0)
    assert [without_interval.accept(i * S, None) for i in range(3)] == [True, False, False]
    with_interval = KeyframeSelector(max_interval_s=1.5)
    assert [with_interval.accept(i * S, None) for i in range(5)] == [
        True,
        False,
        True,
        False,
        True,
    ]


def test_first_posed_frame_after_pose_less_keyframes_is_kept_as_reference() -> None:
    selector = KeyframeSelector()
    assert selector.accept(0, None)
    assert selector.accept(1, yawed(0.0))
    assert not selector.accept(2, yawed(0.5))


def test_stamps_going_backwards_never_trigger_the_time_rule_and_reset_starts_over() -> None:
    selector = KeyframeSelector(max_interval_s=1.0)
    assert selector.accept(10 * S, None)
    assert not selector.accept(0, None)
    selector.reset()
    assert selector.accept(0, None)


@pytest.mark.parametrize(
    ('kwargs', 'match'),
    [
        ({'min_distance_m': -1.0}, 'min_distance_m=-1.0'),
        ({'min_rotation_deg': -5.0}, 'min_rotation_deg=-5.0'),
        ({'max_interval_s': 0.0}, 'max_interval_s must be > 0 or None'),
    ],
)
def test_invalid_thresholds_raise_config_error(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        KeyframeSelector(**kwargs)
