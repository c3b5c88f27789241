"""map_builder: build a place database live from camera and pose topics.

Images wait (in a small bounded buffer) until a pose after their stamp has arrived, get
the pose interpolated at their stamp, pass the keyframe rule and are described by a
worker thread, so the executor never blocks on the model. The map is saved atomically on
``~/save`` (std_srvs/Trigger) and on shutdown.
"""

from __future__ import annotations

import math
import queue
import sys
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rclpy
from geometry_msgs.msg import PoseStamped, PoseWithCovarianceStamped
from nav_msgs.msg import Odometry
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image, NavSatFix
from std_srvs.srv import Trigger

from vpr_ros.bagio import (
    IDENTITY_QUATERNION,
    POSE_TYPES,
    NavSatOrigin,
    has_orientation,
    pose_sample,
)
from vpr_ros.config import Conf, nested, option
from vpr_ros.database import MANIFEST, PlaceDatabase
from vpr_ros.errors import ImageDecodeError, VprError
from vpr_ros.geometry import PoseTrack
from vpr_ros.images import msg_to_rgb
from vpr_ros.mapping import BuildConf, MapBuilder
from vpr_ros.models import DEFAULT_MODEL, load_model
from vpr_ros.nodes.conversions import stamp_ns
from vpr_ros.nodes.params import declare_conf
from vpr_ros.runtime import tune_malloc
from vpr_ros.types import Frame

POSE_MSG_CLASSES = {
    'odometry': Odometry,
    'pose_stamped': PoseStamped,
    'pose_cov': PoseWithCovarianceStamped,
    'navsat': NavSatFix,
}
POSE_HISTORY = 2000  # pose samples kept for interpolation
PENDING_IMAGES = 30  # images waiting for a later pose; the oldest is dropped beyond this

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
    image_topic: str = option('image', 'Camera topic')
    compressed: bool = option(False, 'The camera topic is sensor_msgs/CompressedImage')
    pose_topic: str = option('odom', 'Pose topic')
    pose_type: str = option(
        'odometry', 'Message type of the pose topic', choices=tuple(POSE_MSG_CLASSES)
    )
    pose_qos: str = option(
        'reliable',
        "Pose subscription QoS: 'reliable', or 'sensor_data' for best-effort pose publishers",
        choices=('reliable', 'sensor_data'),
    )
    build: BuildConf = nested(BuildConf, flatten=True, default=BuildConf(batch_size=1))
    append: bool = option(False, 'Extend an existing map at map_dir instead of refusing it')
    num_threads: int = option(2, 'Torch CPU threads', min=0)


class MapBuilderNode(Node):
    """Subscribes to a camera and a pose topic and grows a map."""

    def __init__(self) -> None:
        super().__init__('map_builder')
        conf = declare_conf(self, MapBuilderNodeConf)
        self.conf = conf
        self.pose_type = conf.pose_type
        self.max_gap_ns = int(conf.build.max_pose_gap_s * 1e9)
        image_topic, append = conf.image_topic, conf.append
        if not conf.map_dir:
            raise VprError('parameter map_dir is required (-p map_dir:=/path/to/map)')
        self.map_dir = str(Path(conf.map_dir).expanduser())
        if not append and (Path(self.map_dir) / MANIFEST).is_file():
            msg = (
                f'a map exists at {self.map_dir!r}; pass append:=true to extend it, or choose '
                'another map_dir (it would be replaced on save)'
            )
            raise VprError(msg)

        model = load_model(conf.model)
        database = None
        if append:
            database = PlaceDatabase.load(
                self.map_dir, expected_model=model.identity(), mmap=False
            )
        self.builder = MapBuilder(
            model, conf.build, database=database, num_threads=conf.num_threads or None
        )
        self.builder.start_traverse()
        self._lock = threading.Lock()  # guards the builder (worker vs. save)
        self._poses: deque = deque(maxlen=POSE_HISTORY)
        self._pending: deque = deque()
        self._navsat = NavSatOrigin(self.builder.database.enu_origin)
        self._pose_frame_id = ''
        self._image_topic = image_topic
        self._work: queue.Queue = queue.Queue(maxsize=64)
        self.counts = {'images': 0, 'dropped': 0, 'undecodable': 0, 'no_pose': 0, 'keyframes': 0}

        image_type = CompressedImage if conf.compressed else Image
        self.create_subscription(
            image_type, image_topic, self.image_callback, qos_profile_sensor_data
        )
        pose_qos = {'reliable': 100, 'sensor_data': qos_profile_sensor_data}[conf.pose_qos]
        self.create_subscription(
            POSE_MSG_CLASSES[self.pose_type], conf.pose_topic, self.pose_callback, pose_qos
        )
        self.create_service(Trigger, '~/save', self.save_callback)
        self._worker = threading.Thread(target=self._run_worker, daemon=True)
        self._worker.start()
        self.get_logger().info(
            f'building map {self.map_dir!r} from {image_topic!r} + {conf.pose_topic!r} '
            f'({self.pose_type}) with {model.identity().describe()}'
        )

    def pose_callback(self, msg) -> None:
        sample = pose_sample(msg, POSE_TYPES[self.pose_type], self._navsat)
        if sample is None or not all(math.isfinite(v) for v in sample[0]):
            return
        position, quaternion = sample
        if not has_orientation(quaternion):
            quaternion = IDENTITY_QUATERNION
        self._poses.append((stamp_ns(msg.header.stamp), position, quaternion))
        self._pose_frame_id = msg.header.frame_id
        self._resolve_pending()

    def image_callback(self, msg) -> None:
        self.counts['images'] += 1
        self._pending.append(msg)
        while len(self._pending) > PENDING_IMAGES:
            self._pending.popleft()
            self.counts['no_pose'] += 1
        self._resolve_pending()

    def _resolve_pending(self) -> None:
        """Give waiting images their pose once a pose at or after their stamp exists."""
        if not self._poses:
            return
        newest = self._poses[-1][0]
        ready = []
        while self._pending and stamp_ns(self._pending[0].header.stamp) <= newest:
            ready.append(self._pending.popleft())
        if not ready:
            return
        stamps, positions, quaternions = zip(*self._poses)
        track = PoseTrack(np.array(stamps), np.array(positions), np.array(quaternions))
        for msg in ready:
            stamp = stamp_ns(msg.header.stamp)
            pose = track.interpolate(stamp, self.max_gap_ns)
            if pose is None:
                self.counts['no_pose'] += 1
                continue
            try:
                image = msg_to_rgb(msg)
            except ImageDecodeError as err:
                self.counts['undecodable'] += 1
                self.get_logger().warning(f'skipping frame: {err}', throttle_duration_sec=5.0)
                continue
            frame = Frame(
                image,
                stamp,
                frame_id=msg.header.frame_id,
                pose=pose,
                pose_frame_id=self._pose_frame_id,
                topic=self._image_topic,
            )
            try:
                self._work.put_nowait(frame)
            except queue.Full:
                self.counts['dropped'] += 1

    def _run_worker(self) -> None:
        while True:
            frame = self._work.get()
            if frame is None:
                return
            try:
                with self._lock:
                    if self.builder.offer(frame):
                        self.counts['keyframes'] += 1
            except Exception as err:  # one bad frame must not stop the map
                self.counts['failed'] = self.counts.get('failed', 0) + 1
                self.get_logger().error(
                    f'could not add a frame: {type(err).__name__}: {err}',
                    throttle_duration_sec=5.0,
                )

    def save(self) -> str:
        with self._lock:
            self.builder.flush()
            if self._navsat.plane is not None:
                self.builder.database.enu_origin = self._navsat.plane.origin
            if not len(self.builder.database):
                return 'no keyframes yet; nothing saved'
            path = self.builder.save(self.map_dir)
            return f'saved {len(self.builder.database)} places to {str(path)!r} ({self.counts})'

    def save_callback(self, request, response):
        try:
            response.message = self.save()
            response.success = True
        except (VprError, OSError) as err:
            response.success, response.message = False, f'save failed: {err}'
        self.get_logger().info(response.message)
        return response

    def shutdown(self) -> None:
        try:
            self._work.put(None, timeout=30)
        except queue.Full:
            self.get_logger().error('the map worker is stuck; saving what it has')
        self._worker.join(timeout=30)
        message = self.save()
        self.get_logger().info(f'on shutdown: {message}')


def main(args=None) -> None:
    tune_malloc()
    rclpy.init(args=args)
    try:
        node = MapBuilderNode()
    except (VprError, FileNotFoundError, ParameterException) as err:
        rclpy.logging.get_logger('map_builder').fatal(f'cannot start: {err}')
        rclpy.try_shutdown()
        sys.exit(1)
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == '__main__':
    main()
