"""The live map builder node: topics in, a map saved on request and on shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ros_environment, synthetic_place

from vpr_ros.database import PlaceDatabase
from vpr_ros.images import rgb_to_image_fields

rclpy = pytest.importorskip('rclpy')
from nav_msgs.msg import Odometry  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

pytestmark = pytest.mark.ros


def image_msg(index: int, stamp_ns: int) -> Image:
    encoding, height, width, step, data = rgb_to_image_fields(synthetic_place(index, (60, 80)))
    msg = Image(encoding=encoding, height=height, width=width, step=step, data=data)
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 10**9)
    msg.header.frame_id = 'camera'
    return msg


def odom_msg(x: float, stamp_ns: int) -> Odometry:
    msg = Odometry()
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 10**9)
    msg.header.frame_id = 'odom'
    msg.pose.pose.position.x = x
    # A position-only source: the orientation stays all zeros (taken as identity).
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
            'image_topic:=cam',
            '-p',
            'pose_topic:=odom',
            '-p',
            'num_threads:=1',
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    old_domain = os.environ.get('ROS_DOMAIN_ID')
    os.environ['ROS_DOMAIN_ID'] = env['ROS_DOMAIN_ID']
    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        test_node = rclpy.create_node('feeder', context=context)
        executor = rclpy.executors.SingleThreadedExecutor(context=context)
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
        assert list(database.places['frame_id']) == ['odom'] * 3
        test_node.destroy_node()
    finally:
        rclpy.shutdown(context=context)
        if old_domain is None:
            os.environ.pop('ROS_DOMAIN_ID', None)
        else:
            os.environ['ROS_DOMAIN_ID'] = old_domain
        node.send_signal(signal.SIGINT)
        output = node.communicate(timeout=60)[0]
    assert node.returncode == 0, output
    assert 'on shutdown: saved 3 places' in output
    assert len(PlaceDatabase.load(map_dir)) == 3


def start_failing(*ros_args: str) -> str:
    """Start map_builder with these ROS arguments, expect exit code 1, return its output."""
    command = [sys.executable, '-m', 'vpr_ros.nodes.map_builder_node']
    if ros_args:
        command += ['--ros-args', *ros_args]
    result = subprocess.run(
        command, env=ros_environment(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    return result.stdout + result.stderr


def test_map_builder_refuses_to_replace_an_existing_map_without_append(tmp_path: Path) -> None:
    map_dir = tmp_path / 'existing'
    map_dir.mkdir()
    (map_dir / 'manifest.json').write_text('{}')
    assert 'append:=true' in start_failing('-p', f'map_dir:={map_dir}')


def test_map_builder_without_map_dir_exits_with_an_error() -> None:
    assert 'map_dir is required' in start_failing()
