"""The bag_player node: a bag written by the test, played over real DDS into a subscriber."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ros_environment, synthetic_place

from vpr_ros.bagwriter import write_bag
from vpr_ros.images import msg_to_rgb
from vpr_ros.types import Frame, Pose

rclpy = pytest.importorskip('rclpy')
from nav_msgs.msg import Odometry  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from vpr_ros.nodes.bag_player import BagPlayerConf, main  # noqa: E402
from vpr_ros.nodes.conversions import stamp_ns  # noqa: E402

pytestmark = pytest.mark.ros

STAMPS = [10**9 + i * 10**8 for i in range(3)]


def bag_frames() -> list[Frame]:
    return [
        Frame(synthetic_place(i, (60, 80)), stamp, 'camera', Pose(float(i), 2.0, 0.0))
        for i, stamp in enumerate(STAMPS)
    ]


def test_bag_player_plays_a_bag_at_a_fixed_rate_under_remapped_names(tmp_path: Path) -> None:
    bag = write_bag(tmp_path / 'query_bag', bag_frames(), image_topic='/cam/raw')
    env = ros_environment()
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=int(env['ROS_DOMAIN_ID']))
    images: list[Image] = []
    arrivals: list[float] = []
    odometry: dict[int, Odometry] = {}
    try:
        node = rclpy.create_node('bag_listener', context=context)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)

        def on_odometry(msg: Odometry) -> None:
            odometry[stamp_ns(msg.header.stamp)] = msg

        def on_image(msg: Image) -> None:
            images.append(msg)
            arrivals.append(time.monotonic())

        node.create_subscription(Odometry, '/odom', on_odometry, 10)
        node.create_subscription(Image, '/image', on_image, 10)
        command = [sys.executable, '-m', 'vpr_ros.nodes.bag_player', str(bag)]
        command += ['--topic', '/cam/raw', '--pose-topic', '/odom', '--rate', '4']
        command += ['--wait-subscribers', '1', '--ros-args', '-r', '/cam/raw:=/image']
        player = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            deadline = time.monotonic() + 60
            while player.poll() is None and time.monotonic() < deadline:
                executor.spin_once(timeout_sec=0.02)
            output = player.communicate(timeout=30)[0]
        finally:
            if player.poll() is None:
                player.kill()
        end = time.monotonic() + 1.0
        while len(images) < len(STAMPS) and time.monotonic() < end:
            executor.spin_once(timeout_sec=0.02)
        node.destroy_node()
    finally:
        rclpy.shutdown(context=context)
    assert player.returncode == 0, output
    assert f"published 6 messages from '{bag}'" in output
    assert [stamp_ns(m.header.stamp) for m in images] == STAMPS
    for frame, msg in zip(bag_frames(), images):
        assert msg.header.frame_id == 'camera'
        np.testing.assert_array_equal(msg_to_rgb(msg), frame.image)
    assert np.diff(arrivals).min() > 0.15, arrivals  # 4 Hz: 0.25 s apart
    # Poses go out as they come; the first may beat the subscription's discovery.
    assert odometry and set(odometry) <= set(STAMPS)
    for stamp, msg in odometry.items():
        assert msg.pose.pose.position.x == STAMPS.index(stamp)
        assert msg.header.frame_id == 'map'


def test_bag_player_refuses_a_missing_topic(tmp_path: Path, capsys) -> None:
    frames = [Frame(image=synthetic_place(0), stamp_ns=10**9)]
    bag = write_bag(tmp_path / 'bag', frames, image_topic='/cam/raw', pose_topic=None)
    assert main([str(bag), '--topic', '/camera/missing']) == 1
    error = capsys.readouterr().err
    assert "no image topic '/camera/missing'" in error
    assert '/cam/raw' in error


def test_bag_player_options_come_from_its_settings_table(tmp_path: Path, capsys) -> None:
    assert BagPlayerConf(topic='/cam', rate=5.0).rate == 5.0
    assert main([str(tmp_path), '--topic', '/cam', '--rate', '5', '--speed', '2']) == 1
    assert 'give --rate (5) or --speed (2), not both' in capsys.readouterr().err
    assert main([str(tmp_path), '--topic', '/cam', '--speed', '0']) == 1
    assert 'speed must be > 0' in capsys.readouterr().err
    assert main([str(tmp_path), '--topic', '/cam', '--wait-subscribers', '-1']) == 1
    assert 'wait_subscribers must be >= 0' in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert 'the following arguments are required: --topic' in capsys.readouterr().err


@pytest.mark.parametrize(
    ('argv', 'code', 'text'),
    [
        (['--help'], 0, 'usage: bag_player'),
        (['bag', '--topic', '/cam', '--qos', 'fast'], 2, "invalid choice: 'fast'"),
        (['bag', '--topic', '/cam', '--rate', '-1'], 1, 'rate must be >= 0'),
    ],
    ids=['help', 'bad-choice', 'out-of-range'],
)
def test_bag_player_help_and_argument_errors_come_back_before_heavy_imports(
    argv: list[str], code: int, text: str
) -> None:
    # Speed itself is measured by benchmarks, not asserted here (CI machines are noisy):
    # what keeps --help fast is that nothing heavy is imported before it answers.
    result = subprocess.run(
        [sys.executable, '-X', 'importtime', '-m', 'vpr_ros.nodes.bag_player', *argv],
        env=ros_environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == code, result.stderr
    assert text in result.stdout + result.stderr
    imported = {line.rsplit('|', 1)[-1].strip() for line in result.stderr.splitlines()}
    assert not imported & {'torch', 'timm', 'faiss', 'cv2'}, sorted(imported & {'torch', 'faiss'})
