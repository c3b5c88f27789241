"""How many raw camera frames cross Fast DDS on one host, with and without the shipped profile.

    .venv/bin/python benchmarks/dds_frames.py [--frames 60] [--rate-hz 30]

For each frame size (640x480, 1280x720 rgb8) and publisher reliability (best effort,
reliable), a publisher process sends ``--frames`` frames at ``--rate-hz`` to a subscriber
process with the relocalize node's default camera QoS (``sensor_data``: best effort), once
with ``config/fastdds.xml`` in both processes and once with Fast DDS defaults in the
publisher (the subscriber keeps the profile, as the node does). Prints the frames received
and the frames the subscriber's DDS reports lost. Not a test.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import textwrap

from vpr_ros.dds import PROFILE_ENV, dds_environment

PUBLISHER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from sensor_msgs.msg import Image
    width, height, frames, rate, reliable = sys.argv[1:6]
    width, height, frames, rate = int(width), int(height), int(frames), float(rate)
    rclpy.init()
    node = rclpy.create_node('dds_frames_camera')
    qos = qos_profile_sensor_data
    if reliable == 'reliable':
        qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
    publisher = node.create_publisher(Image, 'image', qos)
    deadline = time.monotonic() + 20
    while publisher.get_subscription_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    msg = Image(height=height, width=width, encoding='rgb8', step=3 * width)
    msg.data = np.random.default_rng(0).integers(0, 255, height * width * 3, np.uint8).tobytes()
    start = time.monotonic()
    for i in range(frames):
        msg.header.frame_id = str(i)
        publisher.publish(msg)
        time.sleep(max(0.0, start + (i + 1) / rate - time.monotonic()))
    time.sleep(1.0)
    rclpy.shutdown()
    """
)

SUBSCRIBER = textwrap.dedent(
    """
    import signal, sys, time
    import rclpy
    from rclpy.event_handler import SubscriptionEventCallbacks
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image
    rclpy.init()
    node = rclpy.create_node('dds_frames_node')
    received, lost = [], []
    events = SubscriptionEventCallbacks(message_lost=lambda e: lost.append(e.total_count_change))
    node.create_subscription(
        Image, 'image', lambda m: received.append(1), qos_profile_sensor_data,
        event_callbacks=events,
    )
    done = []
    signal.signal(signal.SIGUSR1, lambda *_: done.append(1))  # the publisher has finished
    print('ready', flush=True)
    deadline = time.monotonic() + float(sys.argv[1])
    while time.monotonic() < deadline and not done:
        rclpy.spin_once(node, timeout_sec=0.05)
    print(len(received), sum(lost), flush=True)
    rclpy.shutdown()
    """
)


def run(width: int, height: int, reliability: str, profile: bool, args) -> tuple[int, int]:  # noqa: ANN001
    base, _ = dds_environment()
    base.update(ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST', ROS_DOMAIN_ID=str(args.domain_id))
    publisher_env = dict(base)
    if not profile:
        publisher_env.pop(PROFILE_ENV, None)
    seconds = args.frames / args.rate_hz + 60
    subscriber = subprocess.Popen(
        [sys.executable, '-c', SUBSCRIBER, str(seconds)],
        env=base,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert subscriber.stdout is not None
    subscriber.stdout.readline()
    publisher = subprocess.run(
        [sys.executable, '-c', PUBLISHER, str(width), str(height), str(args.frames)]
        + [str(args.rate_hz), reliability],
        env=publisher_env,
        capture_output=True,
        timeout=120,
    )
    subscriber.send_signal(signal.SIGUSR1)
    out, _ = subscriber.communicate(timeout=30)
    if publisher.returncode != 0 or not out.strip():
        return -1, -1
    received, lost = (int(v) for v in out.split())
    return received, lost


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument('--frames', type=int, default=60)
    parser.add_argument('--rate-hz', type=float, default=30.0)
    args = parser.parse_args(argv)
    args.domain_id = int(os.environ.get('ROS_DOMAIN_ID') or 1 + os.getpid() % 100)
    print(f'{args.frames} frames at {args.rate_hz:g} Hz to a sensor_data (best effort) subscriber')
    header = ('frame', 'publisher', 'profile in publisher', 'received', 'lost')
    print('{:>10s} {:>12s} {:>22s} {:>9s} {:>6s}'.format(*header))
    for width, height in ((640, 480), (1280, 720)):
        for reliability in ('best_effort', 'reliable'):
            for profile in (True, False):
                received, lost = run(width, height, reliability, profile, args)
                used = 'fastdds.xml' if profile else 'none'
                print(
                    f'{width:>5d}x{height:<4d} {reliability:>12s} {used:>22s} '
                    f'{received:>9d} {lost:>6d}'
                )
    return 0


if __name__ == '__main__':
    sys.exit(main())
