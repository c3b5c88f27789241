"""The ``bag_player`` node: play a bag's camera topic (and its pose topic) without ros2 bag.

    python -m vpr_ros.nodes.bag_player BAG --topic /camera/image_raw [--pose-topic /odom]
        [--rate HZ | --speed FACTOR] [--restamp] [--wait-subscribers N]
        [--ros-args -r /camera/image_raw:=/image]

Bags are read with rosbags (ROS 1 ``.bag``, rosbag2 sqlite3 or mcap), so this works where
``rosbag2_py`` is not installed. Messages are published under their bag topic names (remap
them with ``--ros-args -r``) at the recorded timing scaled by ``--speed``, or with images at a
fixed ``--rate``. The options are the settings table :class:`BagPlayerConf`. ``main``
returns 0 on success and 1 on a bad bag, topic or option.
"""

from __future__ import annotations

import argparse
import array
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import rclpy
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data

from vpr_ros.config import Conf, add_arguments, conf_from_args, option
from vpr_ros.dds import use_shipped_profile
from vpr_ros.errors import ConfigError, VprError
from vpr_ros.nodes.common import message_class

if TYPE_CHECKING:
    from rclpy.publisher import Publisher

# numpy and the bag reader load when a bag is played: --help and bad options stay fast.
NODE_NAME = 'bag_player'
QOS: dict[str, QoSProfile] = {
    'reliable': QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE),
    'sensor_data': qos_profile_sensor_data,
}
"""Publisher QoS choices."""


@dataclass(frozen=True)
class BagPlayerConf(Conf):
    """What bag_player plays and how; the command-line flags come from this table."""

    topic: str = option(
        '', 'Camera topic to play (sensor_msgs/Image or CompressedImage); required'
    )
    pose_topic: str = option(
        '', 'Pose topic to play too (Odometry, PoseStamped, ..., NavSatFix); empty: none'
    )
    rate: float = option(
        0.0, 'Publish images at this fixed rate (0: the recorded timing)', unit='Hz', min=0.0
    )
    speed: float = option(
        1.0, 'Factor on the recorded timing (2: twice as fast)', min=0.0, min_exclusive=True
    )
    restamp: bool = option(False, 'Stamp headers with the time of publishing')
    qos: str = option('reliable', 'Publisher QoS', choices=tuple(QOS))
    wait_subscribers: int = option(
        0, 'Wait until the camera topic has this many subscribers before playing', min=0
    )
    wait_timeout: float = option(30.0, 'Longest wait for subscribers', unit='s', min=0.0)

    def validate(self) -> None:
        if self.rate and self.speed != 1.0:
            msg = f'give --rate ({self.rate:g}) or --speed ({self.speed:g}), not both'
            raise ConfigError(msg)


def _element_type(field_type: str) -> str:
    """``'sequence<geometry_msgs/Pose, 5>'`` or ``'geometry_msgs/Pose[3]'`` -> the element."""
    inner = field_type.removeprefix('sequence<').removesuffix('>')
    return inner.split(',')[0].split('[')[0].strip()


def to_rclpy(value: Any, msg_class: type) -> Any:
    """Copy a rosbags message into a new rclpy message of ``msg_class``, field by field.

    Fields rclpy does not know (e.g. the ``seq`` of ROS 1 headers) are left out; primitive
    arrays are copied in one block.
    """
    import numpy as np

    msg = msg_class()
    fields: dict[str, str] = msg_class.get_fields_and_field_types()  # type: ignore[attr-defined]
    for name, field_type in fields.items():
        source = getattr(value, name)
        current = getattr(msg, name)
        if hasattr(current, 'get_fields_and_field_types'):
            setattr(msg, name, to_rclpy(source, type(current)))
        elif isinstance(current, array.array):
            data = np.asarray(source, np.dtype(current.typecode))
            setattr(msg, name, array.array(current.typecode, data.tobytes()))
        elif isinstance(current, np.ndarray):
            setattr(msg, name, np.asarray(source, current.dtype))
        elif isinstance(current, list) and '/' in field_type:
            element = message_class(_element_type(field_type))
            setattr(msg, name, [to_rclpy(item, element) for item in source])
        elif isinstance(current, list):
            setattr(msg, name, list(source))
        else:
            setattr(msg, name, source)
    return msg


def check_topics(bag: str | Path, image_topic: str, pose_topic: str | None) -> dict[str, str]:
    """The bag's names and types of the topics to play, checked.

    Raises:
        FileNotFoundError: the bag does not exist.
        BagReadError: the bag is unreadable, lacks a topic, or a topic has the wrong type.
    """
    from vpr_ros.bagio import open_bag, topic_connections
    from vpr_ros.images import IMAGE_TYPES
    from vpr_ros.poses import POSE_MSGTYPES

    wanted = [(image_topic, IMAGE_TYPES, 'image')]
    if pose_topic:
        wanted.append((pose_topic, POSE_MSGTYPES, 'pose'))
    with open_bag(bag) as reader:
        return {
            connection.topic: connection.msgtype
            for topic, allowed, role in wanted
            for connection in topic_connections(reader, Path(bag), topic, allowed, role)
        }


def read_messages(bag: str | Path, topics: Sequence[str]) -> Iterator[tuple[str, int, Any]]:
    """``(topic, receive_ns, rosbags message)`` of ``topics`` (exact bag names), in bag order."""
    from vpr_ros.bagio import iter_messages, open_bag

    with open_bag(bag) as reader:
        connections = [c for c in reader.connections if c.topic in topics]
        for connection, receive_ns, msg in iter_messages(reader, connections, bag):
            yield connection.topic, receive_ns, msg


class BagPlayer(Node):
    """Publishes bag messages on their topics, paced like the recording or at a fixed rate.

    Args:
        topics: topic -> message type (``'sensor_msgs/msg/Image'``), as in the bag.
        qos: QoS of every publisher.
    """

    def __init__(self, topics: dict[str, str], qos: QoSProfile, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        self._types = {topic: message_class(kind) for topic, kind in topics.items()}
        self._publishers_by_topic: dict[str, Publisher] = {
            topic: self.create_publisher(cls, topic, qos) for topic, cls in self._types.items()
        }

    def wait_for_subscribers(self, topic: str, count: int, timeout_s: float) -> bool:
        """Wait until ``topic`` has ``count`` subscribers; False on timeout."""
        publisher = self._publishers_by_topic[topic]
        deadline = time.monotonic() + timeout_s
        while publisher.get_subscription_count() < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def play(
        self,
        messages: Iterator[tuple[str, int, Any]],
        *,
        image_topic: str,
        rate_hz: float | None = None,
        speed: float = 1.0,
        restamp: bool = False,
    ) -> int:
        """Publish ``messages``; returns how many were published.

        Args:
            messages: from :func:`read_messages`.
            image_topic: the topic that ``rate_hz`` paces.
            rate_hz: publish images at this fixed rate (other messages go out as they come);
                None to keep the recorded timing.
            speed: factor on the recorded timing (2.0: twice as fast).
            restamp: replace header stamps with the current time.
        """
        start = time.monotonic()
        first_ns: int | None = None
        images = published = 0
        for topic, receive_ns, value in messages:
            if rate_hz is not None:
                due = start + images / rate_hz if topic == image_topic else 0.0
            else:
                first_ns = receive_ns if first_ns is None else first_ns
                due = start + (receive_ns - first_ns) / 1e9 / speed
            time.sleep(max(0.0, due - time.monotonic()))
            if not rclpy.ok(context=self.context):
                break
            msg = to_rclpy(value, self._types[topic])
            if restamp and hasattr(msg, 'header'):
                msg.header.stamp = self.get_clock().now().to_msg()
            self._publishers_by_topic[topic].publish(msg)
            published += 1
            images += topic == image_topic
        return published


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='bag_player',
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument('bag', type=Path, help='rosbag2 directory, .mcap/.db3 or ROS 1 .bag')
    add_arguments(parser, BagPlayerConf)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Play a bag (see the module docstring); returns the exit code."""
    from rclpy.executors import ExternalShutdownException
    from rclpy.utilities import remove_ros_args

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    args = parser.parse_args(remove_ros_args(['bag_player', *argv])[1:])
    try:
        conf = conf_from_args(BagPlayerConf, args)
    except ConfigError as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    if not conf.topic:
        parser.error('the following arguments are required: --topic')
    try:
        topics = check_topics(args.bag, conf.topic, conf.pose_topic or None)
    except (FileNotFoundError, VprError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    image_topic = next(iter(topics))
    print(use_shipped_profile(), file=sys.stderr)  # a publisher of large frames needs it
    with rclpy.init(args=['bag_player', *argv]):
        node = BagPlayer(topics, QOS[conf.qos])
        try:
            if conf.wait_subscribers and not node.wait_for_subscribers(
                image_topic, conf.wait_subscribers, conf.wait_timeout
            ):
                msg = (
                    f'error: {node.resolve_topic_name(image_topic)} has fewer than '
                    f'{conf.wait_subscribers} subscribers after {conf.wait_timeout:g} s'
                )
                print(msg, file=sys.stderr)
                return 1
            count = node.play(
                read_messages(args.bag, list(topics)),
                image_topic=image_topic,
                rate_hz=conf.rate or None,
                speed=conf.speed,
                restamp=conf.restamp,
            )
        except (KeyboardInterrupt, ExternalShutdownException):
            return 0
        except VprError as err:
            print(f'error: {err}', file=sys.stderr)
            return 1
        finally:
            node.destroy_node()
    print(f'published {count} messages from {str(args.bag)!r}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
