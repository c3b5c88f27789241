"""The ``map_builder`` node: a place database built live from a camera and a pose topic.

Subscription callbacks only bookkeep: pose messages go into a bounded pose history
(:class:`~vpr_ros.poses.PoseTrackBuilder`, the same filtering as ``build_map``), and images
wait (in a small bounded buffer) until a pose at or after their stamp has arrived. Then each
image gets the pose interpolated at its stamp and is handed to one worker thread through a
bounded queue (frames beyond it are dropped and counted); the worker applies the keyframe
rule and describes keyframes, so the executor never blocks on the model.

Outputs:

* the map at ``map_dir``, saved atomically on ``~/save`` (``std_srvs/Trigger``) and on
  shutdown; an existing map is refused unless ``append:=true``. The node holds the map's
  writer lock from start to shutdown, so a build_map or another map_builder on the same
  map is refused instead of losing places;
* ``/diagnostics``: frames received, kept, skipped (by reason) and dropped, describe
  latency, poses ignored, places in the map, last error.

NavSatFix poses become ENU metres around the map's origin (a new map: the first fix), which
the saved map records.

Run: ``map_builder --ros-args --params-file config/map_builder.yaml -p map_dir:=/path/to/map``.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from std_srvs.srv import Trigger

from vpr_ros.config import Conf, nested, option
from vpr_ros.database import PlaceDatabase, check_map_target, map_lock
from vpr_ros.errors import ConfigError, ImageDecodeError, VprError
from vpr_ros.extraction import AUTO, BACKENDS, open_extractor
from vpr_ros.images import failure_reason, msg_to_rgb
from vpr_ros.mapping import BuildConf, MapBuilder
from vpr_ros.models import DEFAULT_MODEL
from vpr_ros.nodes.common import (
    CAMERA_QOS,
    POSE_QOS,
    STATUS_WINDOW_PERIODS,
    TRANSPORTS,
    NodeStats,
    diagnostic_status,
    pose_message_class,
    run_node,
)
from vpr_ros.nodes.params import declare_conf
from vpr_ros.poses import POSE_TYPES, PoseTrackBuilder, message_stamp_ns
from vpr_ros.types import Frame

NODE_NAME = 'map_builder'
NO_POSE_REASON = 'no pose within max gap'  # as vpr_ros.bagio, which this node need not load
QUEUE_FULL_REASON = 'model queue full'
POSE_HISTORY = 2000  # pose samples kept for interpolation
PENDING_IMAGES = 30  # images waiting for a later pose; the oldest is dropped beyond this
_WARN_THROTTLE_S = 5.0
_SHUTDOWN_TIMEOUT_S = 60.0

PARAMS_HEADER = (
    'Parameters of the map_builder node (vpr_ros/nodes/map_builder_node.py).',
    'Start:  map_builder --ros-args --params-file config/map_builder.yaml -p map_dir:=/path',
    "Generated from the node's settings table: python -m vpr_ros.nodes.params",
)


@dataclass(frozen=True)
class MapBuilderNodeConf(Conf):
    """The map_builder node's parameters: its own, then the map build's (same names)."""

    map_dir: str = option('', 'Directory the map is saved to (required)')
    model: str = option(DEFAULT_MODEL, 'Model registry name or exported model directory')
    backend: str = option(
        AUTO,
        "How the model runs: 'auto' (ONNX Runtime when an export of the model exists "
        "(export_onnx), else torch), 'onnxruntime' or 'torch'",
        choices=BACKENDS,
    )
    camera_topic: str = option('image', 'Camera topic (a relative name, so it can be remapped)')
    camera_transport: str = option(
        'raw',
        'Camera message type: raw is sensor_msgs/Image, compressed is sensor_msgs/CompressedImage',
        choices=tuple(TRANSPORTS),
    )
    camera_qos: str = option(
        'sensor_data',
        "Camera subscription QoS: 'sensor_data' (best effort; matches any camera publisher) "
        "or 'reliable' (only reliable publishers match)",
        choices=tuple(CAMERA_QOS),
    )
    pose_topic: str = option('odom', 'Pose topic')
    pose_type: str = option(
        'odometry', 'Message type of the pose topic', choices=tuple(POSE_TYPES)
    )
    pose_qos: str = option(
        'reliable',
        "Pose subscription QoS: 'reliable', or 'sensor_data' for best-effort pose publishers",
        choices=tuple(POSE_QOS),
    )
    build: BuildConf = nested(BuildConf, flatten=True, default=BuildConf(batch_size=1))
    append: bool = option(False, 'Extend an existing map at map_dir instead of refusing it')
    num_threads: int = option(
        2, 'CPU threads of the model (ONNX Runtime or torch) and BLAS (0: their default)', min=0
    )
    queue_size: int = option(
        64,
        'Frames with a pose waiting for the model; beyond this, new frames are dropped '
        '(counted on /diagnostics)',
        min=1,
    )
    diagnostics_period_s: float = option(
        1.0, 'Period of the status on /diagnostics', unit='s', min=0.05
    )


class MapBuilderNode(Node):
    """Grows a map from a camera and a pose topic; see the module docstring."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        self._worker: threading.Thread | None = None  # started last, once all else is ready
        self._saved_on_shutdown = False
        self._writer_lock = contextlib.ExitStack()
        conf = declare_conf(self, MapBuilderNodeConf)
        conf = conf.replace(map_dir=os.path.expanduser(conf.map_dir))  # '~' after ':='
        self.conf = conf
        self.map_dir = conf.map_dir
        if not self.map_dir:
            raise ConfigError('parameter map_dir is required (-p map_dir:=/path/to/map)')
        if not conf.append and PlaceDatabase.is_map(self.map_dir):
            msg = (
                f'a map exists at {self.map_dir!r}; pass append:=true to extend it, or choose '
                'another map_dir (it would be replaced on save)'
            )
            raise VprError(msg)
        check_map_target(self.map_dir, what='map_dir')
        # This node writes the map until it shuts down: hold the writer lock all along.
        self._writer_lock.enter_context(map_lock(self.map_dir))
        try:
            model = open_extractor(
                conf.model,
                backend=conf.backend,
                batch_size=conf.build.batch_size,
                num_threads=conf.num_threads or None,
            )
            database = None
            if conf.append and PlaceDatabase.is_map(self.map_dir):
                database = PlaceDatabase.load(self.map_dir, expected_model=model.identity())
        except BaseException:
            self._writer_lock.close()
            raise
        self._model_name = model.name
        self.builder = MapBuilder(model, conf.build, database=database)
        self.builder.start_traverse()
        self._builder_lock = threading.Lock()  # the worker offers, ~/save saves

        # The pose history and the waiting images: the camera and pose callbacks (one exclusive
        # group) change them, diagnostics and ~/save read them.
        self._inputs_lock = threading.Lock()
        self._pose_type = POSE_TYPES[conf.pose_type]
        self._poses = PoseTrackBuilder(
            conf.pose_topic,
            enu_origin=self.builder.database.enu_origin,  # the map's, if it has one
            max_samples=POSE_HISTORY,
            on_issue=self._warn,
        )
        self._pending: deque[Any] = deque()
        self._max_gap_ns = round(conf.build.max_pose_gap_s * 1e9)
        self._work: queue.Queue[Frame | None] = queue.Queue(maxsize=conf.queue_size)
        self._stats = NodeStats()
        self._received = 0
        self._keyframes = 0

        self._diagnostics_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        inputs = MutuallyExclusiveCallbackGroup()
        self.create_subscription(
            TRANSPORTS[conf.camera_transport],
            conf.camera_topic,
            self.image_callback,
            CAMERA_QOS[conf.camera_qos],
            callback_group=inputs,
        )
        self.create_subscription(
            pose_message_class(conf.pose_type),
            conf.pose_topic,
            self.pose_callback,
            POSE_QOS[conf.pose_qos],
            callback_group=inputs,
        )
        self.create_service(
            Trigger, '~/save', self.save_callback, callback_group=MutuallyExclusiveCallbackGroup()
        )
        self.create_timer(
            conf.diagnostics_period_s,
            self.diagnostics_callback,
            callback_group=MutuallyExclusiveCallbackGroup(),
        )
        self._worker = threading.Thread(target=self._run_worker, name='map-worker', daemon=True)
        self._worker.start()
        self.get_logger().info(
            f'building map {self.map_dir!r} from {self.resolve_topic_name(conf.camera_topic)} '
            f'({conf.camera_transport}) + {self.resolve_topic_name(conf.pose_topic)} '
            f'({conf.pose_type}) with {model.identity().describe()}'
        )

    def _warn(self, text: str) -> None:
        self.get_logger().warning(text)

    # -- callbacks ----------------------------------------------------------------------

    def pose_callback(self, msg: Any) -> None:
        with self._inputs_lock:
            if self._poses.add(msg, self._pose_type):
                self._resolve_pending()

    def image_callback(self, msg: Any) -> None:
        with self._inputs_lock:
            self._received += 1
            self._pending.append(msg)
            while len(self._pending) > PENDING_IMAGES:
                self._pending.popleft()
                self._stats.error(NO_POSE_REASON, 'no pose arrived after an image in time')
            self._resolve_pending()

    def _resolve_pending(self) -> None:
        """Give waiting images their pose once a pose at or after their stamp exists."""
        newest = self._poses.newest_stamp_ns
        if newest is None:
            return
        ready = []
        while self._pending and message_stamp_ns(self._pending[0]) <= newest:
            ready.append(self._pending.popleft())
        if not ready:
            return
        track = self._poses.track()
        for msg in ready:
            stamp = message_stamp_ns(msg)
            pose = track.interpolate(stamp, self._max_gap_ns)
            if pose is None:
                self._stats.error(NO_POSE_REASON, f'no pose within the max gap of {stamp} ns')
                continue
            try:
                image = msg_to_rgb(msg, max_pixels=self.conf.build.max_image_pixels)
            except ImageDecodeError as err:
                self._stats.error(failure_reason(err), str(err))
                self.get_logger().warning(
                    f'skipping frame: {err}', throttle_duration_sec=_WARN_THROTTLE_S
                )
                continue
            frame = Frame(
                image,
                stamp,
                frame_id=str(msg.header.frame_id),
                pose=pose,
                pose_frame_id=self._poses.frame_id,
                topic=self.conf.camera_topic,
            )
            try:
                self._work.put_nowait(frame)
            except queue.Full:
                self._stats.error(QUEUE_FULL_REASON, 'the model fell behind; frame dropped')

    def save_callback(
        self, request: Trigger.Request, response: Trigger.Response
    ) -> Trigger.Response:
        try:
            response.message = self.save()
            response.success = True
        except (VprError, OSError) as err:
            response.success, response.message = False, f'save failed: {err}'
        self.get_logger().info(response.message)
        return response

    def diagnostics_callback(self) -> None:
        stats = self._stats.snapshot(STATUS_WINDOW_PERIODS * self.conf.diagnostics_period_s)
        with self._builder_lock:
            places = len(self.builder.database)
        with self._inputs_lock:
            waiting, poses_received = len(self._pending), self._poses.received
            pose_issues, enu_origin = self._poses.issues(), self._poses.enu_origin
        values = {
            'map_dir': self.map_dir,
            'map_places': places,
            'model': self._model_name,
            'processing_rate_hz': stats.rate_hz,
            **stats.timing_values('offer'),
            'frames_received': self._received,
            'frames_processed': stats.processed,
            'keyframes': self._keyframes,
            'frames_waiting_for_pose': waiting,
            'frames_queued': self._work.qsize(),
            'frames_skipped': stats.skipped_total,
            'skipped_reasons': stats.skipped_summary,
            'frames_skipped_recently': stats.recent_skipped.total,
            'poses_received': poses_received,
            'pose_issues': '; '.join(pose_issues) or 'none',
            'enu_origin': enu_origin or 'none',
            'last_error': stats.last_error,
        }
        level, message = DiagnosticStatus.OK, 'building map'
        if stats.recent_skipped.total:
            summary = stats.recent_skipped.summary()
            level, message = DiagnosticStatus.WARN, f'skipped frames recently: {summary}'
        self._diagnostics_pub.publish(
            diagnostic_status(self, 'map building', level, message, values)
        )

    # -- worker -------------------------------------------------------------------------

    def _run_worker(self) -> None:
        while True:
            frame = self._work.get()
            if frame is None:
                return
            started = time.monotonic()
            try:
                with self._builder_lock:
                    kept = self.builder.offer(frame)
            except Exception as err:  # one bad frame must not stop the map
                self._stats.error('internal error', f'{type(err).__name__}: {err}')
                self.get_logger().error(
                    f'could not add a frame: {type(err).__name__}: {err}',
                    throttle_duration_sec=_WARN_THROTTLE_S,
                )
                continue
            self._keyframes += kept
            self._stats.record({'offer': time.monotonic() - started})

    # -- saving -------------------------------------------------------------------------

    def save(self) -> str:
        """Describe the pending keyframes and save the map; returns what happened."""
        with self._inputs_lock:
            enu_origin = self._poses.enu_origin
        with self._builder_lock:
            self.builder.flush()
            self.builder.record_enu_origin(enu_origin)
            if not len(self.builder.database):
                return 'no keyframes yet; nothing saved'
            path = self.builder.save(self.map_dir)
            stats = self._stats.snapshot()
            return (
                f'saved {len(self.builder.database)} places to {str(path)!r} '
                f'({self._received} frames received, {self._keyframes} keyframes, '
                f'skipped: {stats.skipped_summary})'
            )

    def destroy_node(self) -> None:
        """Let the worker finish the queued frames, save the map, then destroy the node."""
        if self._worker is not None and not self._saved_on_shutdown:
            self._saved_on_shutdown = True
            try:
                self._work.put(None, timeout=_SHUTDOWN_TIMEOUT_S)
            except queue.Full:
                self.get_logger().error('the map worker is stuck; saving what it has')
            self._worker.join(timeout=_SHUTDOWN_TIMEOUT_S)
            try:
                self.get_logger().info(f'on shutdown: {self.save()}')
            except (VprError, OSError) as err:
                self.get_logger().error(f'on shutdown: save failed: {err}')
        self._writer_lock.close()
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    """Run the node; exit with code 1 if it cannot start (bad parameters, map or model)."""
    run_node(MapBuilderNode, NODE_NAME, args, threads=3)


if __name__ == '__main__':
    main()
