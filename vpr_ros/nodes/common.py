"""What the vpr_ros nodes share: message and QoS tables, worker statistics with their
``/diagnostics`` status, and ``main()``'s start-up and shutdown handling.

* :data:`TRANSPORTS`, :data:`CAMERA_QOS`, :data:`POSE_QOS`: the choices of the nodes'
  ``camera_transport(s)``, ``camera_qos`` and ``pose_qos`` parameters;
* :func:`message_class`: the rclpy class of a message type name (``'nav_msgs/msg/Odometry'``);
* :class:`NodeStats`: counters and recent stage timings a worker thread fills and the
  diagnostics timer reads, with the times of frame events (:class:`vpr_ros.health.EventWindow`):
  the status level comes from a recent window, not from counters since start;
  :func:`diagnostic_status` makes the ``/diagnostics`` message;
* :func:`run_node`: spin a node until Ctrl-C or shutdown, exit with code 1 and a one-line
  ``cannot start: ...`` if it cannot start; the shipped Fast DDS profile is used unless the
  user set one (:mod:`vpr_ros.dds`).
"""

from __future__ import annotations

import importlib
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.logging import get_logger
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image

from vpr_ros.dds import use_shipped_profile
from vpr_ros.errors import VprError
from vpr_ros.health import PROCESSED, SKIPPED, EventWindow, WindowCounts
from vpr_ros.nodes.conversions import key_values
from vpr_ros.poses import POSE_TYPES
from vpr_ros.runtime import tune_malloc
from vpr_ros.types import SkipCounter

N = TypeVar('N', bound=Node)

TRANSPORTS: dict[str, type] = {'raw': Image, 'compressed': CompressedImage}
"""Camera transport -> image message class."""

CAMERA_QOS: dict[str, QoSProfile] = {
    'sensor_data': qos_profile_sensor_data,
    'reliable': QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE),
}
"""Camera subscription QoS: best effort matches any publisher; reliable only reliable ones."""

POSE_QOS: dict[str, QoSProfile] = {
    'reliable': QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE),
    'sensor_data': qos_profile_sensor_data,
}
"""Pose subscription QoS: reliable with a deep queue (no pose lost), or best effort for
publishers that only offer that."""

START_UP_ERRORS: tuple[type[BaseException], ...] = (
    VprError,
    FileNotFoundError,
    ParameterException,
)
"""What a node's constructor raises for bad parameters, maps or models."""

LATENCY_WINDOW = 200
"""Frames the timing statistics cover."""

STATUS_WINDOW_PERIODS = 10
"""The ``/diagnostics`` level reflects the last this many diagnostics periods."""


def message_class(type_name: str) -> type:
    """The rclpy class of ``'pkg/msg/Name'`` or ``'pkg/Name'`` (as rclpy spells field types)."""
    parts = type_name.split('/')
    module = importlib.import_module(f'{parts[0]}.msg')
    cls: type = getattr(module, parts[-1])
    return cls


def pose_message_class(kind: str) -> type:
    """The rclpy class of a pose kind of :data:`vpr_ros.poses.POSE_TYPES`."""
    return message_class(POSE_TYPES[kind].msgtype)


@dataclass(frozen=True)
class StatsSnapshot:
    """What :class:`NodeStats` held at one moment."""

    processed: int
    rate_hz: float
    milliseconds: dict[str, np.ndarray]
    skipped_total: int
    skipped_summary: str
    last_error: str
    recent: WindowCounts
    """Frame events within the window asked of ``snapshot``."""

    @property
    def recent_skipped(self) -> SkipCounter:
        """Frames skipped within the window, by reason."""
        return self.recent.skipped

    def timing_values(self, total: str = 'latency') -> dict[str, float]:
        """Diagnostic values: median and 95th percentile of ``total``, median of each
        other stage (``<stage>_median_ms``)."""
        stages = dict(self.milliseconds)
        total_ms = stages.pop(total, np.zeros(1))
        return {
            f'{total}_median_ms': float(np.median(total_ms)),
            f'{total}_p95_ms': float(np.percentile(total_ms, 95)),
            **{f'{stage}_median_ms': float(np.median(ms)) for stage, ms in stages.items()},
        }


class NodeStats:
    """Counters and recent timings shared by a worker thread and the diagnostics timer.

    ``seconds`` holds, per stage, the times of the last :data:`LATENCY_WINDOW` frames;
    ``events`` the times of frame events (the node adds ``received`` and ``dropped``; skips
    and processed frames are added here); hold ``lock`` to change anything directly.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.lock = threading.Lock()
        self.processed = 0
        self.skipped = SkipCounter()
        self.seconds: dict[str, deque[float]] = {}
        self.last_error = ''
        self.events = EventWindow(clock=clock)
        self._clock = clock
        self._rate_state = (clock(), 0)

    def error(self, reason: str, text: str) -> None:
        """Count one skipped frame under ``reason``; ``text`` becomes the last error."""
        with self.lock:
            self.skipped.add(reason)
            self.last_error = text
        self.events.add(SKIPPED, reason)

    def clear_error(self) -> None:
        """Forget the last error (after a successful reload)."""
        with self.lock:
            self.last_error = ''

    def record(self, seconds: Mapping[str, float]) -> None:
        """Count one processed frame with its stage times."""
        with self.lock:
            self.processed += 1
            for stage, value in seconds.items():
                window = self.seconds.setdefault(stage, deque(maxlen=LATENCY_WINDOW))
                window.append(value)
        self.events.add(PROCESSED)

    def snapshot(self, window_s: float = 10.0) -> StatsSnapshot:
        """The current values; the rate is over the time since the previous snapshot, the
        recent skips over the last ``window_s``."""
        now = self._clock()
        recent = self.events.counts(window_s)
        with self.lock:
            then, processed_then = self._rate_state
            self._rate_state = (now, self.processed)
            return StatsSnapshot(
                processed=self.processed,
                rate_hz=(self.processed - processed_then) / max(now - then, 1e-9),
                milliseconds={k: np.array(v) * 1e3 for k, v in self.seconds.items()},
                skipped_total=self.skipped.total,
                skipped_summary=self.skipped.summary(),
                last_error=self.last_error,
                recent=recent,
            )


def diagnostic_status(
    node: Node, what: str, level: bytes, message: str, values: Mapping[str, Any]
) -> DiagnosticArray:
    """The ``/diagnostics`` message of one node: one status named ``'<node>: <what>'``."""
    status = DiagnosticStatus(
        level=level,
        name=f'{node.get_name()}: {what}',
        message=message,
        hardware_id=node.get_fully_qualified_name(),
        values=key_values(values),
    )
    array = DiagnosticArray(status=[status])
    array.header.stamp = node.get_clock().now().to_msg()
    return array


def run_node(
    make_node: Callable[[], N], name: str, args: list[str] | None = None, *, threads: int = 3
) -> None:
    """Run a node on a multi-threaded executor until Ctrl-C or an external shutdown, then
    ``destroy_node()`` it (nodes stop their workers, and save, there).

    A node that cannot start (one of :data:`START_UP_ERRORS`) is logged as
    ``cannot start: <reason>`` and the process exits with code 1, without a traceback.
    """
    tune_malloc()
    dds_note = use_shipped_profile()  # before the first participant
    with rclpy.init(args=args):
        get_logger(name).info(dds_note)
        try:
            node = make_node()
        except START_UP_ERRORS as err:
            get_logger(name).fatal(f'cannot start: {err}')
            sys.exit(1)
        executor = MultiThreadedExecutor(num_threads=threads)
        executor.add_node(node)
        try:
            executor.spin()
        except (KeyboardInterrupt, ExternalShutdownException):
            pass
        finally:
            node.destroy_node()
