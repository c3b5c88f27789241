"""The ``demo_client`` node: the demo's query side, over real DDS.

It publishes a query bag's camera frames to a running ``relocalize`` node one at a time,
waits for each frame's hypotheses (matched by the camera stamp), notes whether a ``~/pose``
came too and how long the answer took, and writes all answers to a JSON file that
``vpr_ros.cli.demo`` (which stays ROS-free) reads::

    python -m vpr_ros.nodes.demo_client QUERY_BAG --out answers.json \\
        [--topic /camera/image_raw] [--node relocalize]

The JSON holds ``{"answers": [{"stamp_ns", "latency_s", "pose_published", "hypotheses":
[Hypothesis fields, pose as a dict or null]}]}`` in the order the frames were sent.
``main`` returns 0 when every frame was answered, 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rclpy
from geometry_msgs.msg import PoseWithCovarianceStamped
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from rclpy.utilities import remove_ros_args
from sensor_msgs.msg import CompressedImage, Image, PointCloud2

from vpr_ros.bagio import iter_messages, open_bag, topic_connections
from vpr_ros.config import Conf, add_arguments, conf_from_args, option
from vpr_ros.dds import use_shipped_profile
from vpr_ros.errors import ConfigError, VprError
from vpr_ros.images import IMAGE_TYPES
from vpr_ros.nodes.bag_player import to_rclpy
from vpr_ros.nodes.conversions import hypotheses_from_cloud, stamp_ns
from vpr_ros.poses import message_stamp_ns

NODE_NAME = 'vpr_demo_client'
_RESEND_S = 5.0  # a frame not answered in this time was probably lost: send it again


@dataclass(frozen=True)
class DemoClientConf(Conf):
    """What the demo client plays and where it listens."""

    topic: str = option('/camera/image_raw', 'Camera topic: in the bag, and published on')
    node: str = option('relocalize', 'Name of the relocalize node whose outputs are read')
    subscribe_timeout_s: float = option(
        120.0, 'Longest wait for the node to subscribe to the camera', unit='s', min=0.0
    )
    answer_timeout_s: float = option(
        30.0, 'Longest wait for the hypotheses of one frame', unit='s', min=0.0
    )


class DemoClient(Node):
    """Publishes frames and collects the relocalize node's answers to them."""

    def __init__(self, conf: DemoClientConf, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        self.conf = conf
        self._message_types = dict(zip(IMAGE_TYPES, (Image, CompressedImage)))
        self._publisher: Any = None
        self.answers: dict[int, dict[str, Any]] = {}
        self.poses: set[int] = set()
        self.sent: dict[int, float] = {}
        """Camera stamp -> when it was published (``time.perf_counter``)."""
        self.create_subscription(
            PointCloud2, f'/{conf.node}/hypotheses', self.hypotheses_callback, 10
        )
        self.create_subscription(
            PoseWithCovarianceStamped, f'/{conf.node}/pose', self.pose_callback, 10
        )

    def hypotheses_callback(self, msg: PointCloud2) -> None:
        stamp = stamp_ns(msg.header.stamp)
        if stamp in self.sent and stamp not in self.answers:
            self.answers[stamp] = {
                'stamp_ns': stamp,
                'latency_s': time.perf_counter() - self.sent[stamp],
                'hypotheses': [dataclasses.asdict(h) for h in hypotheses_from_cloud(msg)],
            }

    def pose_callback(self, msg: PoseWithCovarianceStamped) -> None:
        self.poses.add(stamp_ns(msg.header.stamp))

    def spin_until(self, done: Callable[[], bool], timeout_s: float) -> bool:
        """Spin until ``done()``; False if ``timeout_s`` passed first."""
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                return False
            rclpy.spin_once(self, timeout_sec=0.05)
        return True

    def send_until_answered(self, stamp: int, msg: Any) -> bool:
        """Publish ``msg`` until its hypotheses come (best effort may lose a frame); False
        after the answer timeout. The latency counts from the last send."""
        deadline = time.monotonic() + self.conf.answer_timeout_s
        while time.monotonic() < deadline:
            self.sent[stamp] = time.perf_counter()
            self._publisher.publish(msg)
            if self.spin_until(
                lambda: stamp in self.answers, min(_RESEND_S, self.conf.answer_timeout_s)
            ):
                return True
        return stamp in self.answers

    def play(self, bag: Path) -> list[dict[str, Any]]:
        """Publish the bag's camera frames one by one, each once the previous is answered;
        returns the answers in sending order (frames without an answer are left out)."""
        order: list[int] = []
        with open_bag(bag) as reader:
            connections = topic_connections(reader, bag, self.conf.topic, IMAGE_TYPES, 'image')
            msgtype = connections[0].msgtype
            # Best effort, as cameras publish; a lost frame is sent again.
            self._publisher = self.create_publisher(
                self._message_types[msgtype], self.conf.topic, qos_profile_sensor_data
            )
            if not self.spin_until(
                lambda: self._publisher.get_subscription_count() > 0,
                self.conf.subscribe_timeout_s,
            ):
                msg = f'node {self.conf.node!r} did not subscribe to {self.conf.topic!r}'
                raise VprError(msg)
            self.spin_until(lambda: False, 0.5)  # let the node's publishers match ours
            for _, receive_ns, value in iter_messages(reader, connections, bag):
                stamp = message_stamp_ns(value, receive_ns)
                msg = to_rclpy(value, self._message_types[msgtype])
                msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp, 10**9)
                order.append(stamp)
                self.send_until_answered(stamp, msg)
        self.spin_until(lambda: False, 0.5)  # late ~/pose messages
        return [
            {**self.answers[s], 'pose_published': s in self.poses}
            for s in order
            if s in self.answers
        ]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='demo_client',
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument('bag', type=Path, help='query bag (rosbag2 directory, .mcap, .bag)')
    parser.add_argument('--out', type=Path, required=True, help='JSON file of the answers')
    add_arguments(parser, DemoClientConf)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Play the bag into the node and write the answers; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = make_parser().parse_args(remove_ros_args(['demo_client', *argv])[1:])
    try:
        conf = conf_from_args(DemoClientConf, args)
    except ConfigError as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    print(use_shipped_profile())  # before the first participant
    with rclpy.init(args=['demo_client', *argv]):
        node = DemoClient(conf)
        try:
            answers = node.play(args.bag)
        except (VprError, FileNotFoundError) as err:
            print(f'error: {err}', file=sys.stderr)
            return 1
        finally:
            node.destroy_node()
    args.out.write_text(json.dumps({'answers': answers}))
    print(f'{len(answers)} of {len(node.sent)} frames answered')
    return 0 if len(answers) == len(node.sent) else 1


if __name__ == '__main__':
    sys.exit(main())
