"""The ``relocalize`` node: camera images in, place hypotheses, a pose a localizer can act
on, and loop closures out. A managed (lifecycle) node.

Lifecycle (``rclpy`` ``LifecycleNode``; with ``autostart`` it configures and activates
itself at start-up, else a lifecycle manager drives it):

* configure: load and check the model and the map (a failure, e.g. a bad map, ends in
  ``unconfigured`` with the reason logged and on ``/diagnostics``; the process lives on);
* activate: subscribe to the cameras (and the pose, odometry, localizer and optimised path
  topics that are set) and publish;
* deactivate: unsubscribe and pause (the model and map stay loaded);
* cleanup: free the model and the map.

Subscription callbacks only keep the newest message of each camera (a newer message
replaces an unprocessed one, which counts as dropped) and wake one worker thread. The
worker decodes the image, runs the :class:`~vpr_ros.relocalization.Relocalizer` and
publishes, with the camera frame's stamp and the map's pose frame in every header:

* ``~/hypotheses`` (``sensor_msgs/PointCloud2``): every re-ranked hypothesis, best first, as a
  table (see :mod:`vpr_ros.nodes.conversions`);
* ``~/pose`` (``geometry_msgs/PoseWithCovarianceStamped``): the best hypothesis when the
  pose policy (:mod:`vpr_ros.pose_policy`, ``pose_policy``) says so: by default only when
  the node goes from lost to localized or its answer jumps, so it can be remapped to
  ``/initialpose``; with ``localizer_pose_topic``, only when a confident answer disagrees
  with the localizer. Not published from a map whose poses are in a drifting odometry frame
  (REP-105) unless ``allow_odom_frame_map``;
* ``~/hypothesis_poses`` (``geometry_msgs/PoseArray``): the hypotheses' poses, for RViz;
* ``~/map_places`` (``visualization_msgs/MarkerArray``, transient local): the map's places;
* ``/diagnostics``: lifecycle state, rates, latency, skipped and dropped frames, publications
  and their causes, map size and frame, last error. The level comes from a recent window
  (``diagnostics_window_s``: skips, drops beyond the rate limit, an ``expected_rate_hz``
  check) and from cameras whose frames do not arrive.

Loop-closure mode (``loop_closure.enabled``): the map grows from the cameras with poses from
``loop_closure.pose_topic`` (:mod:`vpr_ros.loop_closure`), each frame is matched against the
places outside the recent past, and confident matches go out on ``~/loop_closures`` (a table
like ``~/hypotheses`` with both stamps). With ``optimized_path_topic`` (``nav_msgs/Path``)
place poses follow the SLAM back end's optimised keyframe poses, matched by stamp.

Services: ``~/relocalize`` (``std_srvs/Trigger``) publishes the next confident answer and
says which; ``~/reload_map`` (``std_srvs/Trigger``) loads ``map_dir`` again and swaps it in;
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
import gc
import json
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from geometry_msgs.msg import PoseArray, PoseWithCovarianceStamped
from nav_msgs.msg import Path as PathMsg
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_msgs.msg import Header
from std_srvs.srv import SetBool, Trigger
from visualization_msgs.msg import MarkerArray

from vpr_ros.config import Conf, nested, option
from vpr_ros.database import PlaceDatabase
from vpr_ros.dds import no_frames_hint
from vpr_ros.errors import ConfigError, DatabaseError, ImageDecodeError, VprError
from vpr_ros.extraction import AUTO, BACKENDS, Extractor, open_extractor
from vpr_ros.frames import database_pose_frame, is_drifting_frame
from vpr_ros.health import DROPPED, RECEIVED, HealthConf, assess
from vpr_ros.images import DEFAULT_MAX_PIXELS, failure_reason, msg_to_rgb
from vpr_ros.loop_closure import LoopClosureConf, LoopClosureDetector, update_place_poses
from vpr_ros.models import DEFAULT_MODEL, available_models, load_model
from vpr_ros.models.identity import ModelIdentity
from vpr_ros.nodes.common import (
    CAMERA_QOS,
    POSE_QOS,
    TRANSPORTS,
    NodeStats,
    diagnostic_status,
    pose_message_class,
    run_node,
)
from vpr_ros.nodes.conversions import (
    camera_intrinsics,
    hypotheses_to_cloud,
    loop_closures_to_cloud,
    map_places_markers,
    path_poses,
    pose_array,
    pose_with_covariance,
    stamp_ns,
)
from vpr_ros.nodes.params import declare_conf, validate_changes
from vpr_ros.pose_policy import (
    EVERY_FRAME,
    Belief,
    KeyframeOrderBelief,
    LocalizerBelief,
    OdometryBelief,
    PoseDecision,
    PosePolicy,
    PosePolicyConf,
)
from vpr_ros.poses import POSE_TYPES, LocalPose, PoseTrackBuilder
from vpr_ros.relocalization import RelocalizationConf, Relocalizer
from vpr_ros.runtime import set_num_threads, thread_limits
from vpr_ros.types import CameraIntrinsics, Hypothesis, Pose

if TYPE_CHECKING:
    from vpr_ros.models.base import VprModel

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

MAP_PLACES_QOS = QoSProfile(
    depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
)
"""``~/map_places`` is latched: RViz started later still gets the map."""


@dataclass(frozen=True)
class LoopClosureNodeConf(Conf):
    """Loop-closure mode: the pose source of the growing map, and the recent past."""

    enabled: bool = option(
        False,
        'Loop-closure mode: the node maps and queries at once. Camera frames with a pose from '
        'loop_closure.pose_topic join the map as keyframes, each frame is matched against the '
        'places outside the recent past, and confident matches go out on ~/loop_closures (no '
        '~/pose); map_dir, when it holds a map, is the starting map',
    )
    pose_topic: str = option(
        'odom', "Pose source of the keyframes: the SLAM stack's odometry or keyframe poses"
    )
    pose_type: str = option(
        'odometry', 'Message type of loop_closure.pose_topic', choices=tuple(POSE_TYPES)
    )
    pose_qos: str = option(
        'reliable',
        "Pose subscription QoS: 'reliable', or 'sensor_data' for best-effort pose publishers",
        choices=tuple(POSE_QOS),
    )
    max_pose_gap_s: float = option(
        0.5,
        'A frame gets the pose interpolated at its stamp, or the nearest pose within this; '
        'a frame without one is matched but not added to the map',
        unit='s',
        min=0.0,
        min_exclusive=True,
    )
    closure: LoopClosureConf = nested(LoopClosureConf, flatten=True)


@dataclass(frozen=True)
class RelocalizeNodeConf(Conf):
    """The relocalize node's parameters: its own, then the pipeline's (same names)."""

    autostart: bool = option(
        True,
        'Configure and activate at start-up (a map or model that fails ends the process); '
        'false: stay unconfigured until a lifecycle manager (e.g. nav2_lifecycle_manager) '
        'drives the transitions',
    )
    map_dir: str = option(
        '',
        'Map directory written by build_map (required, except in loop-closure mode); '
        '~/reload_map and the next configure load the current value, so a map rebuilt in '
        'place or a new map_dir is swapped in live',
        read_only=False,
    )
    model: str = option(
        '',
        'Model registry name or exported model directory; it must be the model the map was '
        "built with (empty: the registry model named in the map's manifest; in loop-closure "
        f'mode without a map, {DEFAULT_MODEL}), or an .onnx file written by export_onnx',
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
    outputs: PosePolicyConf = nested(PosePolicyConf, flatten=True)
    odom_topic: str = option(
        '',
        'nav_msgs/Odometry topic that moves the place filter by the distance travelled (gaps '
        'longer than filter.odom_timeout_s fall back to the keyframe order, with a warning) '
        "and the tracked belief between answers (dead reckoning; on_change's jump test); "
        "empty: both advance along the map's keyframe order",
    )
    localizer_pose_topic: str = option(
        '',
        "The localizer's pose (geometry_msgs/PoseWithCovarianceStamped, e.g. AMCL's "
        'amcl_pose); with it, on_change publishes only a confident answer that disagrees with '
        'the localizer by more than disagreement_m (kidnapped-robot recovery)',
    )
    pose_covariance: list[float] = option(
        [1.0, 1.0, 1.0, 0.1, 0.1, 0.1],
        'Variances x, y, z (m^2), roll, pitch, yaw (rad^2) of ~/pose at confidence 1; they '
        'are divided by the confidence',
        min=0.0,
        length=6,
    )
    map_frame_id: str = option(
        'map',
        "Frame id of the outputs when the map records none for its poses (the map's own pose "
        'frame is used otherwise)',
    )
    odom_frames: list[str] = option(
        ['odom'],
        'Frame ids that drift (odometry frames, REP-105), also under a namespace; a map whose '
        'poses are in one gets a warning and publishes no ~/pose',
    )
    allow_odom_frame_map: bool = option(
        False,
        'Publish ~/pose even from a map whose poses are in an odometry frame (valid only '
        'against the odometry of the run that built it)',
    )
    optimized_path_topic: str = option(
        '',
        "nav_msgs/Path of the SLAM back end's optimised keyframe poses; each place takes the "
        "path's pose at its stamp, so the map follows the graph optimisation (empty: off)",
    )
    path_max_gap_s: float = option(
        1.0,
        'A place between two optimised poses at most this far apart gets the interpolated '
        'pose (0: only places whose stamp is on the path)',
        unit='s',
        min=0.0,
    )
    loop_closure: LoopClosureNodeConf = nested(LoopClosureNodeConf)
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
    health: HealthConf = nested(HealthConf, flatten=True)

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
        if self.loop_closure.enabled and self.relocalization.mode != 'single':
            msg = (
                'loop_closure.enabled matches each frame on its own: set mode to single '
                f'(got {self.relocalization.mode!r})'
            )
            raise ConfigError(msg)


_WARN_THROTTLE_S = 5.0
NO_FRAMES_WARN_S = 5.0
"""A camera topic with publishers but no frame for this long gets a warning."""
POSE_HISTORY = 2000
"""Pose samples kept for the loop-closure keyframes' poses."""


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

    def put(self, camera: int, msg: Any) -> bool:
        """Keep ``msg`` as the camera's newest; returns whether it replaced (dropped) one."""
        with self._cond:
            self.received += 1
            replaced = self._slots[camera] is not None
            self.dropped += replaced
            self._slots[camera] = _Pending(msg, camera, time.monotonic())
            self._cond.notify()
            return replaced

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
    """The worker's counters and timings, the last best hypothesis and what was published.

    The stages timed are ``wait`` (received to taken by the worker), ``decode``, the
    Relocalizer's stages (``extract``, ``retrieve`` and ``rerank``, or ``sequence``; in
    loop-closure mode also ``add``), ``publish`` (build and publish the hypotheses), and
    ``latency`` (received to hypotheses published; the other outputs follow).
    """

    def __init__(self) -> None:
        super().__init__()
        self.last_best = ''
        self.last_pose = ''
        self.loop_closures = 0
        self.last_loop_closure = ''
        self.keyframes_added = 0
        self.path_updates = 0
        self.places_moved = 0


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


def _yaw_deg(pose: Pose) -> float:
    return float(
        np.degrees(
            np.arctan2(
                2 * (pose.qw * pose.qz + pose.qx * pose.qy),
                1 - 2 * (pose.qy * pose.qy + pose.qz * pose.qz),
            )
        )
    )


def describe_answer(hypothesis: Hypothesis, frame_id: str) -> str:
    """One line on a published answer: place, confidence and pose."""
    text = f'place {hypothesis.place_id} (confidence {hypothesis.confidence:.2f})'
    pose = hypothesis.pose
    if pose is not None:
        text += (
            f' at x={pose.x:.2f} y={pose.y:.2f} z={pose.z:.2f} m, yaw {_yaw_deg(pose):.0f} deg '
            f'in frame {frame_id!r}'
        )
    return text


class RelocalizeNode(LifecycleNode):
    """Relocalizes camera frames against a place map; see the module docstring."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        # What destroy_node stops, set first: a refused parameter ends the constructor.
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._frames = _LatestFrames(0)
        self._active = False
        conf = declare_conf(self, RelocalizeNodeConf)
        # '~' after ':=' stays as it is.
        self.conf = conf.replace(map_dir=os.path.expanduser(conf.map_dir))
        self._num_threads = conf.num_threads or None
        self._lifecycle = 'unconfigured'
        self._configure_error: BaseException | None = None
        # What configure loads and cleanup frees (guarded by _map_lock).
        self._map_lock = threading.Lock()
        self._model: VprModel | Extractor | None = None
        self._thread_limits: dict[str, int] = {}
        self._relocalizer: Relocalizer | None = None
        self._detector: LoopClosureDetector | None = None
        self._map_dir = ''
        self._map_frame = conf.map_frame_id
        self._map_frame_recorded = False  # the map (or the pose source) named the frame
        self._frame_problem = ''  # a map in an odometry frame (REP-105)
        self._pose_blocked = False
        self._places_dirty = False
        # The pose policy and its beliefs (configure makes them).
        self._policy: PosePolicy | None = None
        self._keyframe_belief: KeyframeOrderBelief | None = None
        self._odometry_belief: OdometryBelief | None = None
        self._localizer_belief: LocalizerBelief | None = None
        self._poses = PoseTrackBuilder(
            conf.loop_closure.pose_topic, max_samples=POSE_HISTORY, on_issue=self._warn
        )
        self._poses_lock = threading.Lock()
        # The newest odometry for the place filter: (header stamp s, monotonic s, xyz).
        self._odometry: tuple[float, float, np.ndarray] | None = None

        topics = conf.camera_topics
        transports = conf.camera_transports
        self._topics = topics
        self._transports = transports * len(topics) if len(transports) == 1 else transports
        info_topics = conf.camera_info_topics
        self._info_topics = info_topics * len(topics) if len(info_topics) == 1 else info_topics
        self._frames = _LatestFrames(len(topics))
        # Per camera: when its last frame came, and since when publishers are matched
        # (monotonic seconds; None: not yet / none).
        self._last_frame: list[float | None] = [None] * len(topics)
        self._outputs_since: list[float | None] = [None] * len(topics)
        self._matched = [0] * len(topics)
        # Frames received and frames DDS reports lost in transport, per camera, and their
        # values at past diagnostics ticks (for the rate over the last NO_FRAMES_WARN_S).
        self._camera_received = [0] * len(topics)
        self._camera_lost = [0] * len(topics)
        self._transport_history: deque[tuple[float, list[int], list[int]]] = deque()
        # The newest intrinsics of each camera (None: unknown).
        self._intrinsics: list[CameraIntrinsics | None] = [None] * len(topics)
        self._stats = _Stats()
        self._enabled = True
        self._active = False
        self._camera_subscriptions: list[Any] = []
        self._other_subscriptions: list[Any] = []
        self._outputs: dict[str, Any] = {}

        self._diagnostics_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        # Camera callbacks only store messages; services and diagnostics have their own groups
        # so that a map reload never delays them, and ~/relocalize (which waits for an
        # answer) has its own.
        self._camera_group = MutuallyExclusiveCallbackGroup()
        self._inputs_group = MutuallyExclusiveCallbackGroup()
        service_group = MutuallyExclusiveCallbackGroup()
        self.create_service(
            Trigger, '~/reload_map', self.reload_map_callback, callback_group=service_group
        )
        self.create_service(
            SetBool, '~/enable', self.enable_callback, callback_group=service_group
        )
        self.create_service(
            Trigger,
            '~/relocalize',
            self.relocalize_callback,
            callback_group=MutuallyExclusiveCallbackGroup(),
        )
        self.create_timer(
            conf.diagnostics_period_s,
            self.diagnostics_callback,
            callback_group=MutuallyExclusiveCallbackGroup(),
        )
        self.add_on_set_parameters_callback(
            validate_changes(RelocalizeNodeConf, lambda: self.conf, self._apply_conf)
        )
        if conf.autostart:
            self.start()

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Configure and activate (what ``autostart`` does).

        Raises:
            the reason configuration failed (a bad map or model), as configure saw it.
        """
        if self.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            error = self._configure_error
            raise error if error is not None else VprError('configure failed')
        if self.trigger_activate() != TransitionCallbackReturn.SUCCESS:
            raise VprError('activate failed; see the log')

    @property
    def lifecycle_state(self) -> str:
        """``unconfigured``, ``inactive``, ``active`` or ``finalized``."""
        return self._lifecycle

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._configure_error = None
        try:
            self._configure()
        except Exception as err:  # whatever fails, the node stays up, unconfigured
            self._release()
            known = isinstance(err, (VprError, OSError))
            text = f'cannot configure: {err if known else f"{type(err).__name__}: {err}"}'
            self.get_logger().error(text)
            with self._stats.lock:
                self._stats.last_error = text
            # Set last: the diagnostics timer reports the error once both are known.
            self._configure_error = err
            return TransitionCallbackReturn.FAILURE
        self._stats.clear_error()
        self._lifecycle = 'inactive'
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._subscribe()
        self._stats.events.restart()
        if self._policy is not None:
            self._policy.reset()  # the node starts lost
        with self._map_lock:
            if self._relocalizer is not None:
                self._relocalizer.reset_sequences()
        result: TransitionCallbackReturn = super().on_activate(state)
        self._active = True
        self._lifecycle = 'active'
        self._publish_map_places()
        self.get_logger().info(f'active: relocalizing frames from {self._cameras_text()}')
        return result

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active = False
        self._unsubscribe()
        self._frames.clear()
        result: TransitionCallbackReturn = super().on_deactivate(state)
        self._lifecycle = 'inactive'
        self.get_logger().info('inactive: paused')
        return result

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        self._lifecycle = 'unconfigured'
        self.get_logger().info('unconfigured: model and map freed')
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active = False
        self._unsubscribe()
        self._release()
        self._lifecycle = 'finalized'
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active = False
        self._unsubscribe()
        self._release()
        self._lifecycle = 'unconfigured'
        return TransitionCallbackReturn.SUCCESS

    def _configure(self) -> None:
        """Load and check the model and the map; make the publishers, the pose policy and
        the worker."""
        conf = self.conf
        map_dir = os.path.expanduser(conf.map_dir)
        start = time.perf_counter()
        loop_closure = conf.loop_closure
        model: VprModel | Extractor
        if loop_closure.enabled:
            database = None
            if map_dir and PlaceDatabase.is_map(map_dir):
                model = load_model(_map_model(map_dir, conf.model)[0])
                database = PlaceDatabase.load(map_dir, expected_model=model.identity())
            else:
                model = load_model(conf.model or DEFAULT_MODEL)
            detector = LoopClosureDetector(
                model,
                loop_closure.closure,
                conf.relocalization,
                database=database,
                num_threads=self._num_threads,
            )
            detector.extractor.extract([np.zeros((480, 640, 3), np.uint8)])  # warm-up
            where = f'map {map_dir!r}' if database is not None else 'the live map'
            relocalizer, served = None, detector.database
        else:
            # The model loads (torch or ONNX Runtime) while the map does.
            source, map_identity = _map_model(map_dir, conf.model)
            loading = _Loading(source, conf.backend, self._num_threads, map_identity)
            try:
                database = self._load_map(map_dir)
            finally:
                extractor = loading.result()
            database.check_model(extractor.identity())
            relocalizer = Relocalizer(extractor, database, conf.relocalization)
            model = extractor
            relocalizer.relocalize(np.zeros((480, 640, 3), np.uint8))  # warm-up: first frame
            relocalizer.reset_sequences()  # the warm-up frame is not part of any history
            where, detector, served = f'map {map_dir!r}', None, relocalizer.database
        frame = database_pose_frame(served, where=where)
        with self._map_lock:
            self._model, self._relocalizer, self._detector = model, relocalizer, detector
        self._map_dir = map_dir
        self._set_map_frame(frame)
        database = self._database()
        self.get_logger().info(
            f'{where}: {len(database)} places in frame {self._map_frame!r}, model '
            f'{model.identity().describe()} (loaded in {time.perf_counter() - start:.1f} s)'
        )
        self._make_policy(database)
        publishers: dict[str, tuple[type, str, QoSProfile | int]] = {
            'hypotheses': (PointCloud2, '~/hypotheses', 10),
            'hypothesis_poses': (PoseArray, '~/hypothesis_poses', 10),
            'map_places': (MarkerArray, '~/map_places', MAP_PLACES_QOS),
        }
        if loop_closure.enabled:
            publishers['loop_closures'] = (PointCloud2, '~/loop_closures', 10)
        else:
            publishers['pose'] = (PoseWithCovarianceStamped, '~/pose', 10)
        self._outputs = {
            name: self.create_lifecycle_publisher(kind, topic, qos)
            for name, (kind, topic, qos) in publishers.items()
        }
        self._places_dirty = True
        self._stop = threading.Event()
        self._frames = _LatestFrames(len(self._topics))
        self._worker = threading.Thread(target=self._work, name='relocalize-worker', daemon=True)
        self._worker.start()

    def _set_map_frame(self, frame: str) -> None:
        """Outputs are stamped with the map's pose frame; an odometry frame is warned about
        and (unless allowed) publishes no ~/pose."""
        conf = self.conf
        self._map_frame = frame or conf.map_frame_id
        self._map_frame_recorded = bool(frame)
        self._frame_problem, self._pose_blocked = '', False
        if conf.loop_closure.enabled or not is_drifting_frame(self._map_frame, conf.odom_frames):
            return
        if conf.allow_odom_frame_map:
            self.get_logger().warning(
                f'map {self._map_dir!r} has its poses in the odometry frame '
                f'{self._map_frame!r}, which drifts (REP-105); publishing ~/pose from it '
                'because allow_odom_frame_map is true'
            )
            return
        self._pose_blocked = True
        self._frame_problem = (
            f'map {self._map_dir!r} has its poses in the odometry frame {self._map_frame!r}, '
            'which drifts (REP-105): no ~/pose is published from it. Build the map from poses '
            "in a fixed frame (a localizer's or a SLAM map's), or set allow_odom_frame_map: "
            'true to publish anyway'
        )
        self.get_logger().warning(self._frame_problem)

    def _make_policy(self, database: PlaceDatabase) -> None:
        conf = self.conf
        keyframe = KeyframeOrderBelief(
            database.poses[:, :3],
            database.places['traverse'],
            max_speed_mps=conf.outputs.max_speed_mps,
        )
        belief: Belief = keyframe
        self._odometry_belief = self._localizer_belief = None
        if conf.odom_topic:
            belief = self._odometry_belief = OdometryBelief(keyframe)
        if conf.localizer_pose_topic:
            belief = self._localizer_belief = LocalizerBelief(self._odometry_belief or keyframe)
        self._keyframe_belief = keyframe
        self._policy = PosePolicy(
            conf.outputs, belief, supervised=self._localizer_belief is not None
        )

    def _release(self) -> None:
        """Stop the worker and free what configure made (the model first of all)."""
        self._stop.set()
        self._frames.close()
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(timeout=10.0)
        self._worker = None
        for publisher in self._outputs.values():
            self.destroy_lifecycle_publisher(publisher)
        self._outputs = {}
        with self._map_lock:
            self._model = self._relocalizer = self._detector = None
        self._policy = self._keyframe_belief = None
        self._odometry_belief = self._localizer_belief = None
        gc.collect()

    def _subscribe(self) -> None:
        conf = self.conf
        qos = CAMERA_QOS[conf.camera_qos]
        self._camera_subscriptions = [
            self.create_subscription(
                TRANSPORTS[transport],
                topic,
                functools.partial(self.camera_callback, camera),
                qos,
                callback_group=self._camera_group,
                event_callbacks=SubscriptionEventCallbacks(
                    message_lost=functools.partial(self._frames_lost, camera)
                ),
            )
            for camera, (topic, transport) in enumerate(zip(self._topics, self._transports))
        ]
        self._matched = [0] * len(self._topics)
        self._outputs_since = [None] * len(self._topics)
        subscriptions = [
            self.create_subscription(
                CameraInfo,
                info_topic,
                functools.partial(self.camera_info_callback, camera),
                qos,
                callback_group=self._camera_group,
            )
            for camera, info_topic in enumerate(self._info_topics)
            if info_topic
        ]
        pose_qos = POSE_QOS['reliable']
        group = self._inputs_group
        if conf.odom_topic and self._odometry_belief is not None:
            subscriptions.append(
                self.create_subscription(
                    pose_message_class('odometry'),
                    conf.odom_topic,
                    self.odometry_callback,
                    pose_qos,
                    callback_group=group,
                )
            )
        if conf.localizer_pose_topic and self._localizer_belief is not None:
            subscriptions.append(
                self.create_subscription(
                    PoseWithCovarianceStamped,
                    conf.localizer_pose_topic,
                    self.localizer_callback,
                    pose_qos,
                    callback_group=group,
                )
            )
        if conf.loop_closure.enabled:
            source = conf.loop_closure
            subscriptions.append(
                self.create_subscription(
                    pose_message_class(source.pose_type),
                    source.pose_topic,
                    self.pose_callback,
                    POSE_QOS[source.pose_qos],
                    callback_group=group,
                )
            )
        if conf.optimized_path_topic:
            subscriptions.append(
                self.create_subscription(
                    PathMsg,
                    conf.optimized_path_topic,
                    self.path_callback,
                    10,
                    callback_group=group,
                )
            )
        self._other_subscriptions = subscriptions

    def _unsubscribe(self) -> None:
        for subscription in self._camera_subscriptions + self._other_subscriptions:
            self.destroy_subscription(subscription)
        self._camera_subscriptions, self._other_subscriptions = [], []

    def _cameras_text(self) -> str:
        return ', '.join(
            f'{self.resolve_topic_name(topic)} ({transport})'
            for topic, transport in zip(self._topics, self._transports)
        )

    def _threads_in_force(self) -> dict[str, int]:
        """Threads each library runs with: the worker's caps and the model backend's."""
        settings = getattr(self._model, 'thread_settings', None)
        return {**self._thread_limits, **(settings() if callable(settings) else {})}

    @staticmethod
    def _load_map(map_dir: str, model: VprModel | Extractor | None = None) -> PlaceDatabase:
        # Sizes and headers now; chunk checksums in the background, so that start-up does
        # not grow with the map (a failed chunk makes its places unusable, and is logged).
        database = PlaceDatabase.load(
            map_dir,
            expected_model=None if model is None else model.identity(),
            verify_checksums=False,
        )
        database.verify_in_background()
        return database

    def _open_map(self, model: VprModel | Extractor, map_dir: str) -> Relocalizer:
        database = self._load_map(map_dir, model)
        return Relocalizer(
            model, database, self.conf.relocalization, num_threads=self._num_threads
        )

    def _database(self) -> PlaceDatabase:
        """The map being served (hold ``_map_lock`` or be the only user)."""
        if self._detector is not None:
            return self._detector.database
        assert self._relocalizer is not None
        return self._relocalizer.database

    def _apply_conf(self, conf: RelocalizeNodeConf) -> None:
        """A run-time parameter change the settings table accepted: the matching settings
        and thresholds take effect with the next frame; map_dir with ~/reload_map or the
        next configure."""
        with self._map_lock:
            current = self._relocalizer
            if current is not None and conf.relocalization != current.conf:
                self._relocalizer = Relocalizer(
                    current.extractor,
                    current.database,
                    conf.relocalization,
                    num_threads=self._num_threads,
                )
            if self._detector is not None:
                self._detector.set_conf(conf.loop_closure.closure, conf.relocalization)
            if self._policy is not None:
                self._policy.set_conf(conf.outputs)
            if self._keyframe_belief is not None:
                self._keyframe_belief.max_speed_mps = conf.outputs.max_speed_mps
            self.conf = conf

    def _warn(self, text: str) -> None:
        self.get_logger().warning(text)

    # -- callbacks ----------------------------------------------------------------------

    def camera_callback(self, camera: int, msg: Image | CompressedImage) -> None:
        self._last_frame[camera] = time.monotonic()
        self._camera_received[camera] += 1
        if self._enabled and self._active:
            self._stats.events.add(RECEIVED)
            if self._frames.put(camera, msg):
                self._stats.events.add(DROPPED)

    def camera_info_callback(self, camera: int, msg: CameraInfo) -> None:
        self._intrinsics[camera] = camera_intrinsics(msg)

    def odometry_callback(self, msg: Any) -> None:
        decoded = POSE_TYPES['odometry'].decode(msg)  # the one pose decoder
        if not isinstance(decoded, LocalPose):
            return
        position, quaternion = decoded
        stamp = stamp_ns(msg.header.stamp)
        # For the place filter: (header stamp s, monotonic receipt s, position xyz).
        self._odometry = (stamp * 1e-9, time.monotonic(), np.asarray(position, np.float64))
        if self._odometry_belief is not None:
            self._odometry_belief.add_odometry(stamp, Pose(*position, *quaternion))

    def _odometry_at(self, frame_stamp: float, received: float) -> np.ndarray | None:
        """The odometry position for the place filter at a frame, or None when there is
        none recent enough (a gap: the filter falls back to the keyframe order and warns)."""
        odometry = self._odometry
        if odometry is None:
            return None
        stamp, odometry_received, xyz = odometry
        timeout = self.conf.relocalization.filter.odom_timeout_s
        if frame_stamp > 0 and stamp > 0:
            return xyz if abs(frame_stamp - stamp) <= timeout else None
        return xyz if abs(received - odometry_received) <= timeout else None

    def localizer_callback(self, msg: PoseWithCovarianceStamped) -> None:
        belief = self._localizer_belief
        if belief is None:
            return
        frame = str(msg.header.frame_id)
        if frame and frame != self._map_frame:
            self.get_logger().warning(
                f'localizer pose in frame {frame!r}, the map is in {self._map_frame!r}: '
                'ignored (both must be the same fixed frame)',
                throttle_duration_sec=30.0,
            )
            return
        p = msg.pose.pose.position
        belief.add_localizer_pose(stamp_ns(msg.header.stamp), np.array([p.x, p.y, p.z]))

    def pose_callback(self, msg: Any) -> None:
        """Loop-closure mode: a pose of the SLAM stack for the keyframes."""
        with self._poses_lock:
            self._poses.add(msg, POSE_TYPES[self.conf.loop_closure.pose_type])
            frame = self._poses.frame_id
        if frame and not self._map_frame_recorded:
            self._map_frame, self._map_frame_recorded = frame, True  # a new map's frame
        elif frame and frame != self._map_frame:
            self.get_logger().warning(
                f'poses on {self.conf.loop_closure.pose_topic!r} are in frame {frame!r}, '
                f'the map in {self._map_frame!r}: keyframes would mix frames',
                throttle_duration_sec=30.0,
            )

    def path_callback(self, msg: PathMsg) -> None:
        """Place poses follow an optimised trajectory, matched by stamp."""
        frame = str(msg.header.frame_id)
        if frame and frame != self._map_frame:
            self.get_logger().warning(
                f'optimised path in frame {frame!r}, the map is in {self._map_frame!r}: ignored',
                throttle_duration_sec=30.0,
            )
            return
        stamps, poses = path_poses(msg)
        max_gap_ns = round(self.conf.path_max_gap_s * 1e9)
        with self._map_lock:
            if self._relocalizer is None and self._detector is None:
                return
            database = self._database()
            try:
                moved = update_place_poses(database, stamps, poses, max_gap_ns=max_gap_ns)
            except ValueError as err:
                self.get_logger().warning(
                    f'optimised path ignored: {err}', throttle_duration_sec=30.0
                )
                return
            if len(moved) and self._keyframe_belief is not None:
                self._keyframe_belief.set_map(database.poses[:, :3], database.places['traverse'])
        with self._stats.lock:
            self._stats.path_updates += 1
            self._stats.places_moved = len(moved)
        if len(moved):
            self._places_dirty = True

    def reload_map_callback(
        self, request: Trigger.Request, response: Trigger.Response
    ) -> Trigger.Response:
        if self.conf.loop_closure.enabled:
            response.success = False
            response.message = 'loop-closure mode builds its map live: nothing to reload'
            return response
        with self._map_lock:
            model, old = self._model, self._relocalizer
        if model is None or old is None:
            response.success = False
            response.message = f'not configured (lifecycle state {self._lifecycle})'
            return response
        map_dir = os.path.expanduser(self.get_parameter('map_dir').value)
        try:
            relocalizer = self._open_map(model, map_dir)
            frame = database_pose_frame(relocalizer.database, where=f'map {map_dir!r}')
        except Exception as err:  # whatever is wrong with the new map, the old one stays
            response.success = False
            response.message = f'kept the current map {self._map_dir!r}: {err}'
            self.get_logger().error(f'map reload failed: {response.message}')
            with self._stats.lock:
                self._stats.last_error = f'map reload failed: {response.message}'
            return response
        with self._map_lock:
            self._relocalizer, self._map_dir = relocalizer, map_dir
            self._set_map_frame(frame)
            if self._keyframe_belief is not None:
                database = relocalizer.database
                self._keyframe_belief.set_map(database.poses[:, :3], database.places['traverse'])
        if self._policy is not None:
            self._policy.reset()  # place indices name other places now
        self._places_dirty = True
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
                if self._relocalizer is not None:
                    self._relocalizer.reset_sequences()
        response.success = True
        response.message = 'enabled' if self._enabled else 'disabled'
        self.get_logger().info(f'relocalization {response.message}')
        return response

    def relocalize_callback(
        self, request: Trigger.Request, response: Trigger.Response
    ) -> Trigger.Response:
        """Publish the next answer that reaches confidence_threshold, and say which."""
        policy, response.success = self._policy, False
        if self.conf.loop_closure.enabled:
            response.message = 'loop-closure mode publishes no ~/pose'
        elif not self._active or policy is None:
            response.message = f'not active (lifecycle state {self._lifecycle})'
        elif not self._enabled:
            response.message = 'disabled (~/enable)'
        elif self._pose_blocked:
            response.message = self._frame_problem
        if response.message or policy is None:
            return response
        timeout = self.conf.outputs.request_timeout_s
        pending = policy.request()
        if not pending.wait(timeout):
            policy.cancel(pending)
            response.message = (
                f'no answer reached confidence_threshold '
                f'{self.conf.outputs.confidence_threshold:g} within {timeout:g} s; nothing '
                'published'
            )
            return response
        assert pending.hypothesis is not None
        sec, nanosec = divmod(pending.stamp_ns, 1_000_000_000)
        response.success = True
        response.message = (
            f'published {describe_answer(pending.hypothesis, self._map_frame)}, camera stamp '
            f'{sec}.{nanosec:09d}'
        )
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
                self._outputs_since[camera] = now
            self._matched[camera] = matched
            if matched == 0:
                self._outputs_since[camera] = None
                if self.count_publishers(subscription.topic_name) > 0:
                    problems.append(
                        f'camera topic {topic!r} has publishers whose QoS does not match '
                        f'camera_qos {self.conf.camera_qos!r}; publish reliable, or set '
                        'camera_qos: sensor_data (best effort takes any publisher)'
                    )
                continue
            lost = self._camera_lost[camera] - lost_then[camera]
            received = self._camera_received[camera] - received_then[camera]
            since, last = self._outputs_since[camera], self._last_frame[camera]
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
        conf = self.conf
        window = conf.health.diagnostics_window_s
        stats = self._stats.snapshot(window)
        recent = stats.recent
        active = self._active and self._enabled
        transport = self._check_transport() if active else []
        with self._map_lock:
            places = len(self._database()) if self._model is not None else 0
            # Places whose stored data failed its size or chunk check (issue 14's
            # background verification): they are no longer answered.
            unusable = len(self._database().unusable_places()) if self._model is not None else 0
        policy = self._policy
        values: dict[str, Any] = {
            'lifecycle_state': self._lifecycle,
            'enabled': self._enabled,
            'mode': 'loop_closure' if conf.loop_closure.enabled else conf.relocalization.mode,
            'processing_rate_hz': stats.rate_hz,
            **stats.timing_values('latency'),
            'frames_received': self._frames.received,
            'frames_lost_in_transport': sum(self._camera_lost),
            'frames_processed': stats.processed,
            'frames_dropped': self._frames.dropped,
            'frames_skipped': stats.skipped_total,
            'skipped_reasons': stats.skipped_summary,
            'window_s': recent.span_s,
            'frames_received_recently': recent.received,
            'frames_dropped_recently': recent.dropped,
            'frames_skipped_recently': recent.skipped.total,
            'received_rate_hz': recent.rate_hz(recent.received),
            'expected_rate_hz': conf.health.expected_rate_hz,
            'map_dir': self._map_dir,
            'map_places': places,
            'map_places_unusable': unusable,
            'map_frame': self._map_frame,
            'model': self._model.name if self._model is not None else '',
            'backend': getattr(self._model, 'backend', 'torch') if self._model else '',
            'threads': json.dumps(self._threads_in_force(), sort_keys=True),
            'last_best': self._stats.last_best,
            'last_error': stats.last_error,
        }
        if conf.loop_closure.enabled:
            values.update(
                loop_closures=self._stats.loop_closures,
                last_loop_closure=self._stats.last_loop_closure,
                keyframes_added=self._stats.keyframes_added,
            )
        else:
            values.update(
                pose_policy=conf.outputs.pose_policy,
                poses_published=policy.published.total if policy is not None else 0,
                pose_publications=policy.published.summary() if policy is not None else 'none',
                last_pose=self._stats.last_pose,
            )
        if conf.optimized_path_topic:
            values.update(
                path_updates=self._stats.path_updates, places_moved=self._stats.places_moved
            )
        level, message = DiagnosticStatus.OK, 'relocalizing'
        if conf.loop_closure.enabled:
            message = 'mapping and detecting loop closures'
        if self._lifecycle != 'active':
            message = self._lifecycle
            if self._configure_error is not None:
                level, message = DiagnosticStatus.ERROR, stats.last_error
        elif not self._enabled:
            message = 'disabled'
        else:
            problems = transport + assess(
                recent,
                window_s=window,
                max_rate_hz=conf.max_rate_hz,
                expected_rate_hz=conf.health.expected_rate_hz,
                rate_tolerance=conf.health.rate_tolerance,
            )
            if self._frame_problem:
                problems.append(self._frame_problem)
            if unusable:
                problems.append(
                    f'{unusable} map places failed their integrity check and are not answered; '
                    'rebuild or restore the map'
                )
            if problems:
                level, message = DiagnosticStatus.WARN, '; '.join(problems)
        self._diagnostics_pub.publish(
            diagnostic_status(self, 'relocalization', level, message, values)
        )
        if self._places_dirty and self._active:
            self._publish_map_places()

    def _publish_map_places(self) -> None:
        publisher = self._outputs.get('map_places')
        if publisher is None:
            return
        self._places_dirty = False
        with self._map_lock:
            if self._model is None:
                return
            database = self._database()
            positions, traverses = database.poses[:, :3], database.places['traverse'].copy()
        header = Header(stamp=self.get_clock().now().to_msg(), frame_id=self._map_frame)
        publisher.publish(map_places_markers(positions, traverses, header))

    # -- worker -------------------------------------------------------------------------

    def _work(self) -> None:
        stop, frames = self._stop, self._frames
        # faiss's OpenMP threads are this thread's own setting: cap them here.
        set_num_threads(self._num_threads)
        self._thread_limits = thread_limits()
        last_start = -float('inf')
        while not stop.is_set():
            max_rate = self.conf.max_rate_hz
            min_interval = 1.0 / max_rate if max_rate > 0 else 0.0
            wait = last_start + min_interval - time.monotonic()
            if wait > 0 and stop.wait(wait):
                break
            pending = frames.take(timeout=0.5)
            if pending is None or not self._enabled or not self._active:
                continue  # a frame that raced ~/enable false or deactivate
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
            # Straight to the model's input size where no stage needs the full image.
            size = relocalizer.image_size if relocalizer is not None else None
            rgb = msg_to_rgb(msg, max_pixels=self.conf.max_image_pixels, size=size)
        except ImageDecodeError as err:
            self._stats.error(failure_reason(err), str(err))
            self.get_logger().warning(
                f'skipping a frame from {self._topics[pending.camera]!r}: {err}',
                throttle_duration_sec=_WARN_THROTTLE_S,
            )
            return
        decoded = time.monotonic()
        if self.conf.loop_closure.enabled:
            self._process_loop_closure(pending, rgb, started, decoded)
        else:
            self._process_relocalization(pending, rgb, started, decoded)

    def _process_relocalization(
        self, pending: _Pending, rgb: np.ndarray, started: float, decoded: float
    ) -> None:
        msg = pending.msg
        with self._map_lock:
            relocalizer, policy = self._relocalizer, self._policy
        if relocalizer is None or policy is None:
            return
        frame_stamp = stamp_ns(msg.header.stamp) * 1e-9
        result = relocalizer.relocalize(
            rgb,
            stream=self._topics[pending.camera],
            camera=self._intrinsics[pending.camera],
            stamp=frame_stamp if frame_stamp > 0 else None,
            odometry_xyz=self._odometry_at(frame_stamp, pending.received),
        )
        relocalized = time.monotonic()
        hypotheses = result.hypotheses
        header = Header(stamp=msg.header.stamp, frame_id=self._map_frame)
        self._outputs['hypotheses'].publish(hypotheses_to_cloud(hypotheses, header))
        published = time.monotonic()
        best = result.best
        decision = PoseDecision(False, 'map in an odometry frame')
        if not self._pose_blocked:
            decision = policy.decide(best, stamp_ns(msg.header.stamp))
        if decision.publish and best is not None:
            self._outputs['pose'].publish(
                pose_with_covariance(best, header, self.conf.pose_covariance)
            )
            self._note_pose(best, decision, header)
        self._outputs['hypothesis_poses'].publish(pose_array(hypotheses, header))
        self._record(pending, started, decoded, relocalized, published, result.timings)
        if best is not None:
            with self._stats.lock:
                self._stats.last_best = f'place {best.place_id} ({best.confidence:.2f})'

    def _note_pose(self, best: Hypothesis, decision: PoseDecision, header: Header) -> None:
        text = f'{describe_answer(best, header.frame_id)}: {decision.reason}'
        sec, nanosec = header.stamp.sec, header.stamp.nanosec
        with self._stats.lock:
            self._stats.last_pose = f'{sec}.{nanosec:09d} {text}'
        # Rare by design (except every_frame): worth a line in the log.
        log = self.get_logger().debug if decision.kind == EVERY_FRAME else self.get_logger().info
        log(f'published ~/pose for the frame at {sec}.{nanosec:09d}: {text}')

    def _frame_pose(self, stamp: int) -> tuple[Pose | None, str]:
        """Loop-closure mode: the frame's pose from the pose source, and its frame id."""
        max_gap_ns = round(self.conf.loop_closure.max_pose_gap_s * 1e9)
        with self._poses_lock:
            if not len(self._poses):
                return None, ''
            track, frame = self._poses.track(), self._poses.frame_id
        pose = track.interpolate(stamp, max_gap_ns)
        if pose is None:  # after the newest pose (or before the oldest): the nearest one
            nearest = int(np.argmin(np.abs(track.stamps_ns - stamp)))
            if abs(int(track.stamps_ns[nearest]) - stamp) <= max_gap_ns:
                pose = Pose(*track.positions[nearest], *track.quaternions[nearest])
        return pose, frame

    def _process_loop_closure(
        self, pending: _Pending, rgb: np.ndarray, started: float, decoded: float
    ) -> None:
        msg = pending.msg
        stamp = stamp_ns(msg.header.stamp)
        pose, pose_frame = self._frame_pose(stamp)
        with self._map_lock:
            detector = self._detector
            if detector is None:
                return
            result = detector.process(
                rgb,
                stamp,
                pose,
                confidence_threshold=self.conf.loop_closure.closure.confidence_threshold,
                frame_id=str(msg.header.frame_id),
                pose_frame_id=pose_frame,
                stream=self._topics[pending.camera],
                camera=self._intrinsics[pending.camera],
            )
        relocalized = time.monotonic()
        header = Header(stamp=msg.header.stamp, frame_id=self._map_frame)
        self._outputs['hypotheses'].publish(hypotheses_to_cloud(result.hypotheses, header))
        published = time.monotonic()
        if result.closures:
            self._outputs['loop_closures'].publish(loop_closures_to_cloud(result.closures, header))
            best = result.closures[0]
            place_sec, place_nanosec = divmod(best.place_stamp_ns, 1_000_000_000)
            text = (
                f'frame at {header.stamp.sec}.{header.stamp.nanosec:09d} closes a loop with '
                f'{describe_answer(best.hypothesis, self._map_frame)}, seen at '
                f'{place_sec}.{place_nanosec:09d} ({best.trajectory_gap_m:.0f} m driven since)'
            )
            self.get_logger().info(f'loop closure: {text}')
            with self._stats.lock:
                self._stats.loop_closures += 1
                self._stats.last_loop_closure = text
        self._outputs['hypothesis_poses'].publish(pose_array(result.hypotheses, header))
        if result.added:
            self._places_dirty = True
            with self._stats.lock:
                self._stats.keyframes_added += 1
        self._record(pending, started, decoded, relocalized, published, result.timings)

    def _record(
        self,
        pending: _Pending,
        started: float,
        decoded: float,
        relocalized: float,
        published: float,
        timings: dict[str, float],
    ) -> None:
        self._stats.record(
            {
                'wait': started - pending.received,
                'decode': decoded - started,
                **timings,
                'publish': published - relocalized,
                'latency': published - pending.received,
            }
        )

    def destroy_node(self) -> None:
        self._active = False
        self._stop.set()
        self._frames.close()
        if self._worker is not None:
            self._worker.join(timeout=5.0)
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    """Run the node; exit with code 1 if it cannot start (bad parameters, or, with
    ``autostart``, a bad map or model)."""
    run_node(RelocalizeNode, NODE_NAME, args, threads=4)


if __name__ == '__main__':
    main()
