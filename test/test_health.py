"""vpr_ros.health: the /diagnostics level from a recent window of frame events."""

from __future__ import annotations

import pytest

from vpr_ros.errors import ConfigError
from vpr_ros.health import (
    DROPPED,
    PROCESSED,
    RECEIVED,
    SKIPPED,
    EventWindow,
    HealthConf,
    WindowCounts,
    assess,
)
from vpr_ros.types import SkipCounter


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def feed(window: EventWindow, clock: Clock, seconds: float, rate_hz: float, *kinds: str) -> None:
    """``kinds`` events at ``rate_hz`` for ``seconds``."""
    for _ in range(round(seconds * rate_hz)):
        clock.now += 1.0 / rate_hz
        for kind in kinds:
            window.add(kind)


def test_a_skipped_frame_warns_until_it_leaves_the_window() -> None:
    clock = Clock()
    window = EventWindow(clock=clock)
    feed(window, clock, 2.0, 10.0, RECEIVED, PROCESSED)
    window.add(RECEIVED)
    window.add(SKIPPED, 'unknown encoding bayer_rggb8')
    feed(window, clock, 9.0, 10.0, RECEIVED, PROCESSED)
    problems = assess(window.counts(10.0), window_s=10.0)
    assert problems == ['skipped frames recently: 1 unknown encoding bayer_rggb8']
    feed(window, clock, 1.5, 10.0, RECEIVED, PROCESSED)
    counts = window.counts(10.0)
    assert counts.skipped.total == 0 and counts.span_s == 10.0
    assert assess(counts, window_s=10.0) == []


def test_frames_the_rate_limit_throttles_away_are_no_problem() -> None:
    clock = Clock()
    window = EventWindow(clock=clock)
    for _ in range(300):  # 30 Hz in, 10 Hz processed, the rest replaced while waiting
        clock.now += 1 / 30
        window.add(RECEIVED)
        window.add(PROCESSED if round(clock.now * 30) % 3 == 0 else DROPPED)
    counts = window.counts(10.0)
    assert counts.dropped > 150
    assert assess(counts, window_s=10.0, max_rate_hz=10.0) == []


def test_drops_beyond_the_rate_limit_mean_the_node_falls_behind() -> None:
    clock = Clock()
    window = EventWindow(clock=clock)
    for i in range(300):  # 30 Hz in, 5 Hz processed although 10 Hz are allowed
        clock.now += 1 / 30
        window.add(RECEIVED)
        window.add(PROCESSED if i % 6 == 0 else DROPPED)
    (problem,) = assess(window.counts(10.0), window_s=10.0, max_rate_hz=10.0)
    assert problem.startswith('falling behind: 250 of 300 frames dropped in the last 10 s')
    assert '50 handled of the 100 the rate limit allows' in problem


def test_a_camera_below_the_expected_rate_warns_once_the_window_has_passed() -> None:
    clock = Clock()
    window = EventWindow(clock=clock)
    feed(window, clock, 5.0, 4.0, RECEIVED, PROCESSED)
    assert assess(window.counts(10.0), window_s=10.0, expected_rate_hz=10.0) == []  # too early
    feed(window, clock, 5.0, 4.0, RECEIVED, PROCESSED)
    (problem,) = assess(window.counts(10.0), window_s=10.0, expected_rate_hz=10.0)
    assert problem == (
        'camera frames arrive at 4.0 Hz over the last 10 s, expected 10 Hz (expected_rate_hz)'
    )
    feed(window, clock, 10.0, 9.0, RECEIVED, PROCESSED)  # within the 25 % tolerance
    assert assess(window.counts(10.0), window_s=10.0, expected_rate_hz=10.0) == []


def test_restart_begins_a_new_window() -> None:
    clock = Clock()
    window = EventWindow(clock=clock)
    window.add(SKIPPED, 'corrupt compressed image')
    clock.now += 1.0
    window.restart()
    clock.now += 2.0
    counts = window.counts(10.0)
    assert counts == WindowCounts(2.0, 0, 0, 0, SkipCounter())


def test_events_older_than_the_horizon_are_forgotten() -> None:
    clock = Clock()
    window = EventWindow(clock=clock, horizon_s=5.0)
    feed(window, clock, 20.0, 10.0, RECEIVED)
    assert window.counts(60.0).received in (50, 51)  # the last 5 s at 10 Hz, ends included


@pytest.mark.parametrize(
    ('changes', 'expected'),
    [
        ({'diagnostics_window_s': 0.0}, 'diagnostics_window_s must be >= 0.1'),
        ({'expected_rate_hz': -1.0}, 'expected_rate_hz must be >= 0'),
        ({'rate_tolerance': 2.0}, 'rate_tolerance must be in [0, 1]'),
    ],
)
def test_bad_health_settings_are_refused(changes: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace('[', r'\[').replace(']', r'\]')):
        HealthConf(**changes)
