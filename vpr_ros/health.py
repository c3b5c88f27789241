"""Whether a running node is healthy, judged on a recent window (ROS-free).

:class:`EventWindow` remembers when frames were received, processed, skipped (with the
reason) and dropped; :meth:`EventWindow.counts` counts them over the last ``window_s``.
:func:`assess` turns such counts into the problems ``/diagnostics`` reports:

* frames skipped (bad encodings, oversized images, errors);
* frames dropped beyond what the rate limit explains: the node falls behind its cameras;
* frames arriving slower than expected (``expected_rate_hz``): a camera stalled or slowed.

A problem clears by itself once it leaves the window; the counters since start stay on
``/diagnostics`` for the record.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from vpr_ros.config import Conf, option
from vpr_ros.types import SkipCounter

RECEIVED = 'received'
PROCESSED = 'processed'
DROPPED = 'dropped'
SKIPPED = 'skipped'

MIN_FRAMES_FOR_RATES = 5
"""Rate checks need at least this many frames (or expected frames) in the window."""


@dataclass(frozen=True)
class HealthConf(Conf):
    """How ``/diagnostics`` judges the node (the relocalize node's parameters)."""

    diagnostics_window_s: float = option(
        10.0,
        'The /diagnostics level reflects the skipped and dropped frames and the frame rate of '
        'this recent window, so a problem clears once it is this old',
        unit='s',
        min=0.1,
        read_only=False,
    )
    expected_rate_hz: float = option(
        0.0,
        'Camera frames per second the node should receive over all cameras; fewer over the '
        'window (by more than rate_tolerance) is a warning (0: no check)',
        unit='Hz',
        min=0.0,
        read_only=False,
    )
    rate_tolerance: float = option(
        0.25,
        'Fraction by which the received rate may fall short of expected_rate_hz, and the '
        'processed frames short of what max_rate_hz allows, before it is a warning',
        min=0.0,
        max=1.0,
        read_only=False,
    )


@dataclass(frozen=True)
class WindowCounts:
    """What happened in a recent window of ``span_s`` seconds (shorter than asked while the
    window has not yet been filled since counting started)."""

    span_s: float
    received: int = 0
    processed: int = 0
    dropped: int = 0
    skipped: SkipCounter = field(default_factory=SkipCounter)

    def rate_hz(self, count: int) -> float:
        return count / self.span_s if self.span_s > 0 else 0.0


class EventWindow:
    """Times of frame events over the last ``horizon_s`` (thread-safe).

    Args:
        horizon_s: how far back events are kept (the longest window asked for).
        clock: monotonic seconds (injectable for tests).
        max_events: a bound on memory whatever the frame rate.
    """

    def __init__(
        self,
        *,
        horizon_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        max_events: int = 200_000,
    ) -> None:
        self.horizon_s = horizon_s
        self._clock = clock
        self._lock = threading.Lock()
        self._events: deque[tuple[float, str, str]] = deque(maxlen=max_events)
        self._started = clock()

    def restart(self) -> None:
        """Forget everything; windows start now (e.g. the node was activated)."""
        with self._lock:
            self._events.clear()
            self._started = self._clock()

    def add(self, kind: str, reason: str = '') -> None:
        """One event of ``kind`` (``received``, ``processed``, ``dropped``, ``skipped``)."""
        now = self._clock()
        with self._lock:
            self._events.append((now, kind, reason))
            while self._events and self._events[0][0] < now - self.horizon_s:
                self._events.popleft()

    def counts(self, window_s: float) -> WindowCounts:
        """Events of the last ``window_s`` seconds."""
        now = self._clock()
        start = now - window_s
        totals = {RECEIVED: 0, PROCESSED: 0, DROPPED: 0}
        skipped = SkipCounter()
        with self._lock:
            span = min(window_s, now - self._started)
            for when, kind, reason in reversed(self._events):
                if when < start:
                    break
                if kind == SKIPPED:
                    skipped.add(reason)
                elif kind in totals:
                    totals[kind] += 1
        return WindowCounts(span, totals[RECEIVED], totals[PROCESSED], totals[DROPPED], skipped)


def assess(
    counts: WindowCounts,
    *,
    window_s: float,
    max_rate_hz: float = 0.0,
    expected_rate_hz: float = 0.0,
    rate_tolerance: float = 0.25,
) -> list[str]:
    """The problems in a window (empty: healthy).

    Args:
        counts: the window's events.
        window_s: the window asked for (the rate check waits until it has passed once).
        max_rate_hz: the node's processing limit (0: none); frames it throttles away are no
            problem.
        expected_rate_hz: the frame rate the cameras should deliver (0: no check).
        rate_tolerance: allowed shortfall of either rate, as a fraction.
    """
    problems = []
    if counts.skipped.total:
        problems.append(f'skipped frames recently: {counts.skipped.summary()}')
    handled = counts.processed + counts.skipped.total
    # What the node could have handled: every frame, or as many as max_rate_hz lets through.
    possible = float(counts.received)
    if max_rate_hz > 0:
        possible = min(possible, max_rate_hz * counts.span_s)
    if possible >= MIN_FRAMES_FOR_RATES and handled < (1.0 - rate_tolerance) * possible:
        problems.append(
            f'falling behind: {counts.dropped} of {counts.received} frames dropped in the last '
            f'{counts.span_s:.0f} s, {handled} handled of the {possible:.0f} the rate limit '
            'allows; lower the camera rate or max_rate_hz, or use a smaller model'
        )
    expected = expected_rate_hz * counts.span_s
    full_window = counts.span_s >= window_s - 1e-6
    if expected_rate_hz > 0 and full_window and expected >= MIN_FRAMES_FOR_RATES:
        if counts.received < (1.0 - rate_tolerance) * expected:
            problems.append(
                f'camera frames arrive at {counts.rate_hz(counts.received):.1f} Hz over the last '
                f'{counts.span_s:.0f} s, expected {expected_rate_hz:g} Hz (expected_rate_hz)'
            )
    return problems
