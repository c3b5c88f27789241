"""The ``relocalize`` node: camera images in, re-ranked place hypotheses and a pose out.

Subscription callbacks only keep the newest message of each camera (a newer message replaces
an unprocessed one, which counts as dropped) and wake one worker thread. The worker decodes
the image, runs :class:`~vpr_ros.relocalization.Relocalizer` and publishes, with the camera
frame's stamp in every header:

* ``~/hypotheses`` (``sensor_msgs/PointCloud2``): every re-ranked hypothesis, best first, as a
  table (see :mod:`vpr_ros.nodes.conversions`); with ``camera_info_topics`` and a verifying
  re-ranker, verified places carry the query camera's relative pose;
* ``~/pose`` (``geometry_msgs/PoseWithCovarianceStamped``): the best hypothesis when its
  confidence reaches ``confidence_threshold``;
* ``~/hypothesis_poses`` (``geometry_msgs/PoseArray``): the hypotheses' poses, for RViz;
* ``/diagnostics``: rate, latency (with its stages), dropped and skipped frames, map size,
  last error. The level is WARN while frames were skipped within the last
  ``STATUS_WINDOW_PERIODS`` periods, or while a camera topic has publishers but no frame
  arrives (the message names the likely cause: large raw frames sent best effort through
  Fast DDS without the shipped profile, or a QoS mismatch).

Services: ``~/reload_map`` (``std_srvs/Trigger``) loads ``map_dir`` again and swaps it in;
``~/enable`` (``std_srvs/SetBool``) pauses and resumes processing.

Start-up: the model (ONNX Runtime when an export fits, else torch: ``backend``) loads in a
thread while the map loads; the map's checksums are checked after start-up by a
low-priority thread (``background_checksums``), whose failure is an ERROR on
``/diagnostics``. The worker caps its own threads (``num_threads``: faiss's OpenMP threads
are per thread) and decodes frames straight to the model's input size.

Run: ``relocalize --ros-args --params-file config/relocalize.yaml -p map_dir:=/path/to/map``.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from geometry_msgs.msg import PoseArray, PoseWithCovarianceStamped
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_msgs.msg import Header
from std_srvs.srv import SetBool, Trigger

from vpr_ros.config import Conf, nested, option
from vpr_ros.database import PlaceDatabase, verify_checksums
from vpr_ros.dds import no_frames_hint
from vpr_ros.errors import ConfigError, DatabaseError, ImageDecodeError
from vpr_ros.extraction import AUTO, BACKENDS, Extractor, open_extractor
from vpr_ros.images import DEFAULT_MAX_PIXELS, failure_reason, msg_to_rgb
from vpr_ros.models import ModelIdentity, available_models
from vpr_ros.nodes.common import (
    CAMERA_QOS,
    STATUS_WINDOW_PERIODS,
    TRANSPORTS,
    NodeStats,
    diagnostic_status,
    run_node,
)
from vpr_ros.nodes.conversions import (
    camera_intrinsics,
    hypotheses_to_cloud,
    pose_array,
    pose_with_covariance,
)
from vpr_ros.nodes.params import declare_conf, validate_changes
from vpr_ros.relocalization import RelocalizationConf, Relocalizer
from vpr_ros.runtime import set_num_threads, thread_limits
from vpr_ros.types import CameraIntrinsics

try:
    from rclpy.event_handler import SubscriptionEventCallbacks
except ImportError:  # ROS 2 Humble
    from rclpy.qos_event import SubscriptionEventCallbacks

NODE_NAME = 'relocalize'


PARAMS_HEADER = (
    'Parameters of the relocalize node (vpr_ros/nodes/relocalize_node.py).',
    'Start:  relocalize --ros-args --params-file config/relocalize.yaml -p map_dir:=/path/to/map',
    "Generated from the node's settings table: python -m vpr_ros.nodes.params",
    'Parameters marked read-only are fixed at start-up; the others may be set at run time.',
)


@dataclass(frozen=True)
class RelocalizeNodeConf(Conf):
    """The relocalize node's parameters: its own, then the pipeline's (same names)."""

    map_dir: str = option(
        '',
        'Map directory written by build_map (required); ~/reload_map loads the current value '
        'again, so a map rebuilt in place or a new map_dir is swapped in live',
        read_only=False,
    )
    model: str = option(
        '',
        'Model registry name or exported model directory; it must be the model the map was '
        "built with (empty: the registry model named in the map's manifest), or an .onnx "
        'file written by export_onnx',
    )
    backend: str = option(
        AUTO,
        "How the model runs: 'auto' (ONNX Runtime when an export of the model exists and "
        "fits the map (export_onnx), else torch), 'onnxruntime' or 'torch'",
        choices=BACKENDS,
    )
    camera_topics: list[str] = option(
        ['image'],
        'Camera topics (relative names, so they can be remapped); several cameras may feed '
        'one node',
    )
    camera_transports: list[str] = option(
        ['raw'],
        "Per camera topic: 'raw' (sensor_msgs/Image) or 'compressed' "
        '(sensor_msgs/CompressedImage); one value applies to every topic',
        choices=tuple(TRANSPORTS),
    )
    camera_qos: str = option(
        'sensor_data',
        "Camera subscription QoS: 'sensor_data' (best effort; matches any camera publisher) "
        "or 'reliable' (only reliable publishers match)",
        choices=tuple(CAMERA_QOS),
    )
    camera_info_topics: list[str] = option(
        [''],
        "Per camera topic: its sensor_msgs/CameraInfo topic ('': intrinsics unknown); with "
        'them, verifying re-rankers estimate the relative pose of verified places; one value '
        'applies to every topic',
    )
    relocalization: RelocalizationConf = nested(RelocalizationConf, flatten=True)
    confidence_threshold: float = option(
        0.3,
        'Publish ~/pose when the best hypothesis has at least this confidence',
        min=0.0,
        max=1.0,
    )
    pose_covariance: list[float] = option(
        [1.0, 1.0, 1.0, 0.1, 0.1, 0.1],
        'Variances x, y, z (m^2), roll, pitch, yaw (rad^2) of ~/pose at confidence 1; they '
        'are divided by the confidence',
        min=0.0,
        length=6,
    )
    map_frame_id: str = option('map', 'Frame id of the map poses in every output')
    max_rate_hz: float = option(
        10.0,
        'Maximum frames processed per second over all cameras (0: as fast as possible); the '
        'newest frame is always the one processed',
        unit='Hz',
        min=0.0,
    )
    num_threads: int = option(
        0,
        'CPU threads of the model (ONNX Runtime or torch), faiss retrieval and BLAS (0: each '
        "library's default, one per core); on a robot that also runs SLAM, 1 or 2",
        min=0,
    )
    max_image_pixels: int = option(
        DEFAULT_MAX_PIXELS,
        'Frames with more pixels (width * height, from the message fields or the compressed '
        'header) are skipped before decoding and counted',
        unit='px',
        min=1,
    )
    diagnostics_period_s: float = option(
        1.0, 'Period of the status on /diagnostics', unit='s', min=0.05
    )
    background_checksums: bool = option(
        True,
        "Check the map files' SHA-256 after start-up in a low-priority thread (a failure is "
        'an ERROR on /diagnostics) instead of before the first frame; sizes and headers are '
        'checked at load either way, and ~/reload_map checks everything first',
    )

    def validate(self) -> None:
        topics, transports = self.camera_topics, self.camera_transports
        if not topics or any(not topic for topic in topics):
            raise ConfigError(f'camera_topics must list at least one topic, got {topics!r}')
        if len(set(topics)) != len(topics):
            raise ConfigError(f'camera_topics lists a topic twice: {topics!r}')
        if len(transports) not in (1, len(topics)):
            msg = (
                f'camera_transports has {len(transports)} values for {len(topics)} camera '
                'topics; give one value, or one per topic'
            )
            raise ConfigError(msg)
        if len(self.camera_info_topics) not in (1, len(topics)):
            msg = (
                f'camera_info_topics has {len(self.camera_info_topics)} values for '
                f'{len(topics)} camera topics; give one value, or one per topic'
            )
            raise ConfigError(msg)


_WARN_THROTTLE_S = 5.0
NO_FRAMES_WARN_S = 5.0
"""A camera topic with publishers but no frame for this long gets a warning."""


@dataclass
class _Pending:
    """A message waiting for the worker, with its monotonic receive time."""

    msg: Any
    camera: int
    received: float


class _LatestFrames:
    """One slot per camera holding its newest unprocessed message.

    ``put`` never blocks for longer than a lock acquisition; a message that replaces an
    unprocessed one counts as dropped. ``take`` hands out the slot that has waited longest.
    """

    def __init__(self, cameras: int) -> None:
        self._slots: list[_Pending | None] = [None] * cameras
        self._cond = threading.Condition()
        self._closed = False
        self.received = 0
        self.dropped = 0

    def put(self, camera: int, msg: Any) -> None:
        with self._cond:
            self.received += 1
            if self._slots[camera] is not None:
                self.dropped += 1
            self._slots[camera] = _Pending(msg, camera, time.monotonic())
            self._cond.notify()

    def take(self, timeout: float) -> _Pending | None:
        with self._cond:
            self._cond.wait_for(lambda: self._closed or any(self._slots), timeout)
            waiting = [slot for slot in self._slots if slot is not None]
            if self._closed or not waiting:
                return None
            oldest = min(waiting, key=lambda slot: slot.received)
            self._slots[oldest.camera] = None
            return oldest

    def clear(self) -> None:
        """Drop every waiting message (counted as dropped)."""
        with self._cond:
            self.dropped += sum(slot is not None for slot in self._slots)
            self._slots = [None] * len(self._slots)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class _Stats(NodeStats):
    """The worker's counters and timings, and the last best hypothesis.

    The stages timed are ``wait`` (received to taken by the worker), ``decode``, the
    Relocalizer's stages (``extract``, ``retrieve`` and ``rerank``, or ``sequence``),
    ``publish`` (build and publish the hypotheses), and ``latency`` (received to hypotheses
    published; the pose outputs follow).
    """

    def __init__(self) -> None:
        super().__init__()
        self.last_best = ''


def _map_model(map_dir: str, model_name: str) -> tuple[str, ModelIdentity]:
    """The model to query ``map_dir`` with (a name or path) and the identity the map records;
    reads only the map's manifest, so a missing or broken map fails before the model loads."""
    if not map_dir:
        msg = 'parameter map_dir is empty; pass -p map_dir:=/path/to/map (written by build_map)'
        raise ConfigError(msg)
    if not Path(map_dir).exists():
        raise FileNotFoundError(f'map {map_dir!r} does not exist; build it with build_map')
    record = PlaceDatabase.read_manifest(map_dir).get('model')
    map_model = record.get('name') if isinstance(record, dict) else None
    if not isinstance(map_model, str):
        msg = f'map {map_dir!r} has a malformed manifest (no model name); rebuild the map'
        raise DatabaseError(msg)
    try:
        assert isinstance(record, dict)
        identity = ModelIdentity.from_dict(record)
    except (KeyError, TypeError) as err:
        msg = f'map {map_dir!r} has a malformed model record ({err}); rebuild the map'
        raise DatabaseError(msg) from err
    if model_name:
        return model_name, identity
    if map_model not in available_models():
        msg = (
            f'map {map_dir!r} was built with model {map_model!r}, which is not a registry name '
            f'{available_models()}; set the parameter model to its exported model directory'
        )
        raise ConfigError(msg)
    return map_model, identity


class _Loading(threading.Thread):
    """Opens the extractor in a thread of its own, so the model loads while the map does."""

    def __init__(self, source: str, backend: str, num_threads: int | None, expected: Any) -> None:
        super().__init__(name='relocalize-model-load', daemon=True)
        self._args = (source, backend, num_threads, expected)
        self.extractor: Extractor | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        source, backend, num_threads, expected = self._args
        try:
            self.extractor = open_extractor(
                source, backend=backend, batch_size=1, num_threads=num_threads, expected=expected
            )
        except BaseException as err:  # re-raised in the node's thread
            self.error = err

    def result(self) -> Extractor:
        self.join()
        if self.error is not None:
            raise self.error
        assert self.extractor is not None
        return self.extractor


class RelocalizeNode(Node):
    """Relocalizes camera frames against a place map; see the module docstring."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None  # started last, once all else is ready
        conf = declare_conf(self, RelocalizeNodeConf)
        # '~' after ':=' stays as it is.
        conf = conf.replace(map_dir=os.path.expanduser(conf.map_dir))
        self.conf = conf
        self._num_threads = conf.num_threads or None

        start = time.perf_counter()
        source, map_identity = _map_model(conf.map_dir, conf.model)
        loading = _Loading(source, conf.backend, self._num_threads, map_identity)
        # The map loads while the model does; its checksums are checked after start-up.
        database = PlaceDatabase.load(conf.map_dir, verify_checksums=not conf.background_checksums)
        self._extractor = loading.result()
        self._map_lock = threading.Lock()
        self._map_dir = conf.map_dir
        self._relocalizer = Relocalizer(self._extractor, database, conf.relocalization)
        self._relocalizer.relocalize(np.zeros((480, 640, 3), np.uint8))  # warm-up: first frame
        self.get_logger().info(
            f'map {conf.map_dir!r}: {len(database)} places, model '
            f'{self._extractor.identity().describe()} on {self._extractor.backend} (loaded in '
            f'{time.perf_counter() - start:.1f} s)'
        )
        self._thread_limits: dict[str, int] = {}
        self._map_integrity = ''  # why the served map failed its background check ('' ok)

        self._hypotheses_pub = self.create_publisher(PointCloud2, '~/hypotheses', 10)
        self._pose_pub = self.create_publisher(PoseWithCovarianceStamped, '~/pose', 10)
        self._poses_pub = self.create_publisher(PoseArray, '~/hypothesis_poses', 10)
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)

        topics = conf.camera_topics
        transports = conf.camera_transports
        if len(transports) == 1:
            transports = transports * len(topics)
        self._topics = topics
        self._frames = _LatestFrames(len(topics))
        # Per camera: when its last frame came, and since when publishers are matched
        # (monotonic seconds; None: not yet / none).
        self._last_frame: list[float | None] = [None] * len(topics)
        self._publishers_since: list[float | None] = [None] * len(topics)
        self._matched = [0] * len(topics)
        # Frames received and frames DDS reports lost in transport, per camera, and their
        # values at past diagnostics ticks (for the rate over the last NO_FRAMES_WARN_S).
        self._camera_received = [0] * len(topics)
        self._camera_lost = [0] * len(topics)
        self._transport_history: deque[tuple[float, list[int], list[int]]] = deque()
        info_topics = conf.camera_info_topics
        if len(info_topics) == 1:
            info_topics = info_topics * len(topics)
        # The newest intrinsics of each camera (None: unknown).
        self._intrinsics: list[CameraIntrinsics | None] = [None] * len(topics)
        self._stats = _Stats()
        self._enabled = True
        # Camera callbacks only store messages; services and diagnostics have their own groups
        # so that a map reload never delays them.
        camera_group = MutuallyExclusiveCallbackGroup()
        self._camera_subscriptions = [
            self.create_subscription(
                TRANSPORTS[transport],
                topic,
                functools.partial(self.camera_callback, camera),
                CAMERA_QOS[conf.camera_qos],
                callback_group=camera_group,
                event_callbacks=SubscriptionEventCallbacks(
                    message_lost=functools.partial(self._frames_lost, camera)
                ),
            )
            for camera, (topic, transport) in enumerate(zip(topics, transports))
        ]
        self._camera_info_subscriptions = [
            self.create_subscription(
                CameraInfo,
                info_topic,
                functools.partial(self.camera_info_callback, camera),
                CAMERA_QOS[conf.camera_qos],
                callback_group=camera_group,
            )
            for camera, info_topic in enumerate(info_topics)
            if info_topic
        ]
        service_group = MutuallyExclusiveCallbackGroup()
        self.create_service(
            Trigger, '~/reload_map', self.reload_map_callback, callback_group=service_group
        )
        self.create_service(
            SetBool, '~/enable', self.enable_callback, callback_group=service_group
        )
        self.create_timer(
            conf.diagnostics_period_s,
            self.diagnostics_callback,
            callback_group=MutuallyExclusiveCallbackGroup(),
        )
        self.add_on_set_parameters_callback(
            validate_changes(RelocalizeNodeConf, lambda: self.conf, self._apply_conf)
        )

        self._worker = threading.Thread(target=self._work, name='relocalize-worker', daemon=True)
        self._worker.start()
        if conf.background_checksums and database.directory is not None:
            threading.Thread(
                target=self._verify_map,
                args=(database, database.directory),
                name='relocalize-map-checksums',
                daemon=True,
            ).start()
        cameras = ', '.join(
            f'{self.resolve_topic_name(topic)} ({transport})'
            for topic, transport in zip(topics, transports)
        )
        self.get_logger().info(f'relocalizing frames from {cameras}, QoS {conf.camera_qos}')

    def _open_map(self, map_dir: str) -> Relocalizer:
        database = PlaceDatabase.load(map_dir, expected_model=self._extractor.identity())
        return Relocalizer(self._extractor, database, self.conf.relocalization)

    def _verify_map(self, database: PlaceDatabase, directory: Path) -> None:
        """Check the served map's checksums at low priority; a failure is reported on
        /diagnostics (ERROR) and in the log until a reload replaces the map."""
        try:  # Linux: a thread is a task with its own nice value
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):
            pass
        started = time.perf_counter()
        try:
            verify_checksums(directory)
        except DatabaseError as err:
            with self._map_lock:
                if self._relocalizer.database is not database:  # reloaded meanwhile
                    return
                self._map_integrity = str(err)
            self.get_logger().error(f'the served map failed its check: {err}')
            return
        self.get_logger().info(f'map checksums verified in {time.perf_counter() - started:.1f} s')

    def _apply_conf(self, conf: RelocalizeNodeConf) -> None:
        """A run-time parameter change the settings table accepted: the matching settings
        (top_k, rerank_k) take effect with the next frame; map_dir with ~/reload_map."""
        with self._map_lock:
            current = self._relocalizer
            if conf.relocalization != current.conf:
                self._relocalizer = Relocalizer(
                    self._extractor, current.database, conf.relocalization
                )
            self.conf = conf

    # -- callbacks ----------------------------------------------------------------------

    def camera_callback(self, camera: int, msg: Image | CompressedImage) -> None:
        self._last_frame[camera] = time.monotonic()
        self._camera_received[camera] += 1
        if self._enabled:
            self._frames.put(camera, msg)

    def camera_info_callback(self, camera: int, msg: CameraInfo) -> None:
        self._intrinsics[camera] = camera_intrinsics(msg)

    def reload_map_callback(
        self, request: Trigger.Request, response: Trigger.Response
    ) -> Trigger.Response:
        map_dir = os.path.expanduser(self.get_parameter('map_dir').value)
        try:
            relocalizer = self._open_map(map_dir)
        except Exception as err:  # whatever is wrong with the new map, the old one stays
            response.success = False
            response.message = f'kept the current map {self._map_dir!r}: {err}'
            self.get_logger().error(f'map reload failed: {response.message}')
            with self._stats.lock:
                self._stats.last_error = f'map reload failed: {response.message}'
            return response
        with self._map_lock:
            old, self._relocalizer, self._map_dir = self._relocalizer, relocalizer, map_dir
            self._map_integrity = ''  # the new map was checked whole when it loaded
        self._stats.clear_error()
        response.success = True
        response.message = (
            f'loaded map {map_dir!r}: {len(relocalizer.database)} places (was {len(old.database)})'
        )
        self.get_logger().info(response.message)
        return response

    def enable_callback(
        self, request: SetBool.Request, response: SetBool.Response
    ) -> SetBool.Response:
        self._enabled = bool(request.data)
        if not self._enabled:
            self._frames.clear()
        else:  # sequence mode: frames before the pause are no longer the recent past
            with self._map_lock:
                self._relocalizer.reset_sequences()
        response.success = True
        response.message = 'enabled' if self._enabled else 'disabled'
        self.get_logger().info(f'relocalization {response.message}')
        return response

    def _frames_lost(self, camera: int, event: Any) -> None:
        """DDS lost samples of this camera in transport (e.g. fragments that never all came)."""
        self._camera_lost[camera] += int(event.total_count_change)

    def _check_transport(self) -> list[str]:
        """Cameras whose publishers send no frames, with the likely cause; logged
        (throttled) and returned for /diagnostics.

        A camera is suspect when, over the last ``NO_FRAMES_WARN_S``, DDS lost at least as
        many of its frames in transport as arrived, or when a publisher joined its topic
        that long ago and no frame arrived since (large raw frames sent best effort through
        Fast DDS without the shipped profile are lost), or when the topic has publishers
        that do not match the subscription's QoS.
        """
        now = time.monotonic()
        problems = []
        history = self._transport_history
        history.append((now, list(self._camera_received), list(self._camera_lost)))
        while len(history) > 1 and history[1][0] <= now - NO_FRAMES_WARN_S:
            history.popleft()
        then, received_then, lost_then = history[0]
        for camera, (topic, subscription) in enumerate(
            zip(self._topics, self._camera_subscriptions)
        ):
            matched = subscription.get_publisher_count()
            if matched > self._matched[camera]:  # a publisher joined: frames should follow
                self._publishers_since[camera] = now
            self._matched[camera] = matched
            if matched == 0:
                self._publishers_since[camera] = None
                if self.count_publishers(subscription.topic_name) > 0:
                    problems.append(
                        f'camera topic {topic!r} has publishers whose QoS does not match '
                        f'camera_qos {self.conf.camera_qos!r}; publish reliable, or set '
                        'camera_qos: sensor_data (best effort takes any publisher)'
                    )
                continue
            lost = self._camera_lost[camera] - lost_then[camera]
            received = self._camera_received[camera] - received_then[camera]
            since, last = self._publishers_since[camera], self._last_frame[camera]
            if now - then >= NO_FRAMES_WARN_S - 1e-3 and lost > 0 and lost >= received:
                problems.append(
                    f'{lost} frames lost in transport, {received} arrived: '
                    + no_frames_hint(topic)
                )
            elif since is not None and (last is None or last < since):
                if now - since > NO_FRAMES_WARN_S:
                    problems.append(no_frames_hint(topic))
        for problem in problems:
            self.get_logger().warning(problem, throttle_duration_sec=30.0)
        return problems

    def diagnostics_callback(self) -> None:
        stats = self._stats.snapshot(STATUS_WINDOW_PERIODS * self.conf.diagnostics_period_s)
        transport = self._check_transport() if self._enabled else []
        last_best = self._stats.last_best
        with self._map_lock:
            database, map_dir = self._relocalizer.database, self._map_dir
            integrity = self._map_integrity
        values = {
            'enabled': self._enabled,
            'mode': self.conf.relocalization.mode,
            'processing_rate_hz': stats.rate_hz,
            **stats.timing_values('latency'),
            'frames_received': self._frames.received,
            'frames_lost_in_transport': sum(self._camera_lost),
            'frames_processed': stats.processed,
            'frames_dropped': self._frames.dropped,
            'frames_skipped': stats.skipped_total,
            'skipped_reasons': stats.skipped_summary,
            'frames_skipped_recently': stats.recent_skipped.total,
            'map_dir': map_dir,
            'map_places': len(database),
            'model': self._extractor.name,
            'backend': self._extractor.backend,
            'threads': json.dumps(
                {**self._thread_limits, **self._extractor.thread_settings()}, sort_keys=True
            ),
            'map_integrity': integrity or 'ok',
            'last_best': last_best,
            'last_error': stats.last_error,
        }
        level, message = DiagnosticStatus.OK, 'relocalizing'
        if integrity:
            level, message = DiagnosticStatus.ERROR, f'the served map is damaged: {integrity}'
        elif not self._enabled:
            message = 'disabled'
        elif transport:
            level, message = DiagnosticStatus.WARN, '; '.join(transport)
        elif stats.recent_skipped.total:
            summary = stats.recent_skipped.summary()
            level, message = DiagnosticStatus.WARN, f'skipped frames recently: {summary}'
        self._diagnostics_pub.publish(
            diagnostic_status(self, 'relocalization', level, message, values)
        )

    # -- worker -------------------------------------------------------------------------

    def _work(self) -> None:
        # faiss's OpenMP threads are this thread's own setting: cap them here.
        set_num_threads(self._num_threads)
        self._thread_limits = thread_limits()
        max_rate = self.conf.max_rate_hz
        min_interval = 1.0 / max_rate if max_rate > 0 else 0.0
        last_start = -float('inf')
        while not self._stop.is_set():
            wait = last_start + min_interval - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                break
            pending = self._frames.take(timeout=0.5)
            if pending is None or not self._enabled:  # a frame that raced ~/enable false
                continue
            last_start = time.monotonic()
            try:
                self._process(pending)
            except Exception as err:  # keep the node alive whatever one frame does
                if not self.context.ok():  # publishing during shutdown
                    break
                self._stats.error('internal error', f'{type(err).__name__}: {err}')
                self.get_logger().error(
                    f'relocalization failed: {type(err).__name__}: {err}',
                    throttle_duration_sec=_WARN_THROTTLE_S,
                )

    def _process(self, pending: _Pending) -> None:
        msg = pending.msg
        started = time.monotonic()
        with self._map_lock:
            relocalizer = self._relocalizer
        try:
            rgb = msg_to_rgb(
                msg, max_pixels=self.conf.max_image_pixels, size=relocalizer.image_size
            )
        except ImageDecodeError as err:
            self._stats.error(failure_reason(err), str(err))
            self.get_logger().warning(
                f'skipping a frame from {self._topics[pending.camera]!r}: {err}',
                throttle_duration_sec=_WARN_THROTTLE_S,
            )
            return
        decoded = time.monotonic()
        result = relocalizer.relocalize(
            rgb, stream=self._topics[pending.camera], camera=self._intrinsics[pending.camera]
        )
        relocalized = time.monotonic()
        hypotheses = result.hypotheses
        header = Header(stamp=msg.header.stamp, frame_id=self.conf.map_frame_id)
        self._hypotheses_pub.publish(hypotheses_to_cloud(hypotheses, header))
        published = time.monotonic()
        best = result.best
        if (
            best is not None
            and best.pose is not None
            and best.confidence >= self.conf.confidence_threshold
        ):
            self._pose_pub.publish(pose_with_covariance(best, header, self.conf.pose_covariance))
        self._poses_pub.publish(pose_array(hypotheses, header))
        times = {
            'wait': started - pending.received,
            'decode': decoded - started,
            **result.timings,
            'publish': published - relocalized,
            'latency': published - pending.received,
        }
        self._stats.record(times)
        if best is not None:
            with self._stats.lock:
                self._stats.last_best = f'place {best.place_id} ({best.confidence:.2f})'

    def destroy_node(self) -> None:
        self._stop.set()
        if self._worker is not None:
            self._frames.close()
            self._worker.join(timeout=5.0)
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    """Run the node; exit with code 1 if it cannot start (bad parameters, map or model)."""
    run_node(RelocalizeNode, NODE_NAME, args, threads=3)


if __name__ == '__main__':
    main()
