"""The live map builder node: topics in, a map saved on request and on shutdown."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ros_environment, synthetic_place

from vpr_ros.database import PlaceDatabase
from vpr_ros.geometry import LocalTangentPlane
from vpr_ros.images import rgb_to_compressed_bytes, rgb_to_image_fields

rclpy = pytest.importorskip('rclpy')
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from nav_msgs.msg import Odometry  # noqa: E402
from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image, NavSatFix, NavSatStatus  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

from vpr_ros.nodes.map_builder_node import MapBuilderNode  # noqa: E402

pytestmark = pytest.mark.ros

ORIGIN = (47.3769, 8.5417, 408.0)


def set_header(msg: Any, stamp_ns: int, frame_id: str) -> Any:
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 10**9)
    msg.header.frame_id = frame_id
    return msg


def image_msg(index: int, stamp_ns: int) -> Image:
    encoding, height, width, step, data = rgb_to_image_fields(synthetic_place(index, (60, 80)))
    msg = Image(encoding=encoding, height=height, width=width, step=step, data=data)
    return set_header(msg, stamp_ns, 'camera')


def compressed_msg(index: int, stamp_ns: int) -> CompressedImage:
    data = rgb_to_compressed_bytes(synthetic_place(index, (60, 80)), 'jpeg')
    return set_header(CompressedImage(format='jpeg', data=data), stamp_ns, 'camera')


def odom_msg(x: float, stamp_ns: int) -> Odometry:
    msg = set_header(Odometry(), stamp_ns, 'odom')
    msg.pose.pose.position.x = x
    # A position-only source: the orientation stays all zeros (taken as identity).
    return msg


def fix_msg(east_m: float, stamp_ns: int, *, fix: bool = True) -> NavSatFix:
    """A NavSatFix ``east_m`` metres east of ORIGIN."""
    lat, lon, alt = (float(v) for v in LocalTangentPlane(*ORIGIN).to_geodetic(east_m, 0.0, 0.0))
    msg = set_header(NavSatFix(latitude=lat, longitude=lon, altitude=alt), stamp_ns, 'gps')
    msg.status.status = NavSatStatus.STATUS_FIX if fix else NavSatStatus.STATUS_NO_FIX
    return msg


def test_map_builder_saves_keyframes_on_request_and_on_shutdown(tmp_path: Path) -> None:
    env = ros_environment()
    map_dir = tmp_path / 'live_map'
    node = subprocess.Popen(
        [
            sys.executable,
            '-m',
            'vpr_ros.nodes.map_builder_node',
            '--ros-args',
            '-p',
            f'map_dir:={map_dir}',
            '-p',
            'camera_topic:=cam',
            '-p',
            'pose_topic:=odom',
            '-p',
            'num_threads:=1',
        ],  # fmt: skip
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=int(env['ROS_DOMAIN_ID']))
    try:
        test_node = rclpy.create_node('feeder', context=context)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(test_node)
        images = test_node.create_publisher(Image, 'cam', 10)
        odom = test_node.create_publisher(Odometry, 'odom', 10)
        save = test_node.create_client(Trigger, 'map_builder/save')
        assert save.wait_for_service(timeout_sec=60), 'map_builder did not come up'
        deadline = time.monotonic() + 20
        while images.get_subscription_count() == 0 and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.1)
        # 6 frames 0.6 m apart; poses at the same stamps plus one later pose.
        for i in range(6):
            stamp = 10**9 + i * 100_000_000
            odom.publish(odom_msg(i * 0.6, stamp))
            images.publish(image_msg(i, stamp))
            executor.spin_once(timeout_sec=0.05)
        odom.publish(odom_msg(6 * 0.6, 10**9 + 6 * 100_000_000))
        time.sleep(3.0)  # the worker describes the keyframes
        future = save.call_async(Trigger.Request())
        executor.spin_until_future_complete(future, timeout_sec=30)
        assert future.result() is not None and future.result().success, future.result()
        database = PlaceDatabase.load(map_dir)
        # Keyframes at 0, 1.2, 2.4 m.
        assert len(database) == 3
        assert list(database.place_strings('frame_id')) == ['odom'] * 3
        assert database.enu_origin is None  # odometry poses
        test_node.destroy_node()
    finally:
        rclpy.shutdown(context=context)
        node.send_signal(signal.SIGINT)
        output = node.communicate(timeout=60)[0]
    assert node.returncode == 0, output
    assert 'on shutdown: saved 3 places' in output
    assert len(PlaceDatabase.load(map_dir)) == 3


class Feeder:
    """The test side of an in-process map_builder: publishers, /diagnostics, ~/save."""

    def __init__(self, domain_id: int, camera_type: type, pose_type: type) -> None:
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node('feeder', context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.camera = self.node.create_publisher(camera_type, 'cam', 10)
        self.poses = self.node.create_publisher(pose_type, 'fix', 10)
        self.save = self.node.create_client(Trigger, 'map_builder/save')
        self.diagnostics: dict[str, str] = {}
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_status, 10)

    def _on_status(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name.startswith('map_builder'):
                self.diagnostics = {kv.key: kv.value for kv in status.values}

    def spin_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                return False
            self.executor.spin_once(timeout_sec=0.02)
        return True

    def call_save(self) -> Trigger.Response:
        future = self.save.call_async(Trigger.Request())
        self.executor.spin_until_future_complete(future, timeout_sec=60)
        assert future.done(), 'map_builder/save did not answer'
        return future.result()

    def close(self) -> None:
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)


@contextlib.contextmanager
def map_builder_in_this_process(params: dict, camera_type: type) -> Iterator[Feeder]:
    """A map_builder spun in this process (its own domain), fed NavSatFix poses on 'fix'."""
    domain = int(ros_environment()['ROS_DOMAIN_ID'])
    feeder = Feeder(domain, camera_type, NavSatFix)
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain)
    overrides = [Parameter(k, value=v) for k, v in params.items()]
    node = MapBuilderNode(context=context, parameter_overrides=overrides)
    executor = MultiThreadedExecutor(num_threads=3, context=context)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        assert feeder.spin_until(
            lambda: (
                feeder.camera.get_subscription_count() > 0
                and feeder.poses.get_subscription_count() > 0
                and feeder.save.service_is_ready()
            ),
            30,
        ), 'map_builder did not come up'
        yield feeder
    finally:
        executor.shutdown()
        node.destroy_node()  # saves what it has
        rclpy.shutdown(context=context)
        feeder.close()


def feed_route(feeder: Feeder, east_m: list[float], start_ns: int, first_place: int) -> None:
    """One NavSatFix and one compressed image per position (plus a fix without a fix), then
    one later fix so that the last image has a pose after it."""
    stamps = [start_ns + i * 100_000_000 for i in range(len(east_m) + 1)]
    feeder.poses.publish(fix_msg(999.0, stamps[0] - 1, fix=False))
    for i, east in enumerate(east_m):
        feeder.poses.publish(fix_msg(east, stamps[i]))
        feeder.camera.publish(compressed_msg(first_place + i, stamps[i]))
        feeder.spin_until(lambda: False, 0.05)
    feeder.poses.publish(fix_msg(east_m[-1] + 0.1, stamps[-1]))


def test_navsat_maps_record_the_first_fix_and_appends_keep_that_origin(tmp_path: Path) -> None:
    map_dir = tmp_path / 'gps_map'
    params = {
        'map_dir': str(map_dir),
        'camera_topic': 'cam',
        'camera_transport': 'compressed',
        'camera_qos': 'reliable',
        'pose_topic': 'fix',
        'pose_type': 'navsat',
        'min_distance_m': 0.5,
        'num_threads': 1,
        'diagnostics_period_s': 0.2,
    }
    first_route = [10.0, 11.0, 12.0]  # metres east of ORIGIN; the first fix is the origin
    with map_builder_in_this_process(params, CompressedImage) as feeder:
        feed_route(feeder, first_route, 10**9, first_place=0)
        assert feeder.spin_until(lambda: feeder.diagnostics.get('keyframes') == '3', 30), (
            feeder.diagnostics
        )
        values = feeder.diagnostics
        assert values['frames_received'] == '3'
        assert values['frames_skipped'] == '0'
        assert "without a fix on 'fix'" in values['pose_issues']
        response = feeder.call_save()
        assert response.success, response.message
        assert 'saved 3 places' in response.message
    database = PlaceDatabase.load(map_dir)
    first_fix = LocalTangentPlane(*ORIGIN).to_geodetic(10.0, 0.0, 0.0)
    assert database.enu_origin == pytest.approx([float(v) for v in first_fix])
    np.testing.assert_allclose(database.places['x'], [0.0, 1.0, 2.0], atol=0.01)
    assert list(database.place_strings('frame_id')) == ['gps'] * 3

    with map_builder_in_this_process({**params, 'append': True}, CompressedImage) as feeder:
        feed_route(feeder, [20.0, 21.0], 5 * 10**9, first_place=3)
        assert feeder.spin_until(lambda: feeder.diagnostics.get('keyframes') == '2', 30), (
            feeder.diagnostics
        )
    # Saved on shutdown, in the map's ENU frame: 20 m east of ORIGIN is 10 m from the map's.
    database = PlaceDatabase.load(map_dir)
    assert database.enu_origin == pytest.approx([float(v) for v in first_fix])
    np.testing.assert_allclose(database.places['x'], [0.0, 1.0, 2.0, 10.0, 11.0], atol=0.01)
    assert sorted(set(database.places['traverse'])) == [0, 1]


def start_failing(*ros_args: str) -> str:
    """Start map_builder with these ROS arguments, expect exit code 1, return its output."""
    command = [sys.executable, '-m', 'vpr_ros.nodes.map_builder_node']
    if ros_args:
        command += ['--ros-args', *ros_args]
    result = subprocess.run(
        command, env=ros_environment(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert 'cannot start' in output and 'Traceback' not in output, output
    return output


def test_map_builder_refuses_to_replace_an_existing_map_without_append(tmp_path: Path) -> None:
    map_dir = tmp_path / 'existing'
    map_dir.mkdir()
    (map_dir / 'manifest.json').write_text('{}')
    assert 'append:=true' in start_failing('-p', f'map_dir:={map_dir}')


def test_map_builder_without_map_dir_exits_with_an_error() -> None:
    assert 'map_dir is required' in start_failing()


def test_map_builder_refuses_an_unknown_pose_type(tmp_path: Path) -> None:
    output = start_failing('-p', f'map_dir:={tmp_path / "m"}', '-p', 'pose_type:=twist')
    assert "pose_type must be one of ['odometry', 'pose_stamped', 'pose_cov', 'navsat']" in output
