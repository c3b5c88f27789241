"""The relocalize node on its default evidence, the place filter: a robot driving a mapped
route after a stretch the map does not know, and odometry carrying the belief through
frames that show nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import ros_environment  # noqa: F401  (sets up the loopback ROS environment)

rclpy = pytest.importorskip('rclpy')

from nav_msgs.msg import Odometry  # noqa: E402
from test_relocalize_node import raw_msg  # noqa: E402
from test_relocalize_node_outputs import (  # noqa: E402
    PARAMS,
    SPACING_M,
    T0,
    S,
    route_map,  # noqa: F401  (the fixture)
    route_pose,
    seen_at,
    spun_node,
    stamp_msg,
    unknown_view,
    wait_subscribed,
)

from vpr_ros.nodes.conversions import hypotheses_from_cloud, msg_to_pose, split_stamp  # noqa: E402
from vpr_ros.nodes.relocalize_node import RelocalizeNodeConf  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.slow]

# The node's defaults: mode filter, confidence_threshold a posterior probability.
FILTER_PARAMS = {
    key: value for key, value in PARAMS.items() if key not in ('mode', 'confidence_threshold')
}


def test_the_default_filter_accepts_only_once_the_route_agrees_and_never_the_unknown(
    route_map: Path,  # noqa: F811
) -> None:
    assert RelocalizeNodeConf().relocalization.mode == 'filter'
    threshold = RelocalizeNodeConf().outputs.confidence_threshold
    params = {**FILTER_PARAMS, 'map_dir': str(route_map), 'pose_policy': 'every_frame'}
    with spun_node(params) as (_, harness):
        wait_subscribed(harness)
        t = T0 + 100 * S
        lost = [unknown_view(k, t + k * S) for k in range(4)]
        t += 4 * S
        along = [seen_at(p, t + p * S) for p in range(10)]
        answers = []
        for image, stamp in lost + along:
            cloud = harness.ask(harness.raw, raw_msg(image, split_stamp(stamp)))
            answers.append(hypotheses_from_cloud(cloud))
        harness.spin_for(0.5)
        lost_answers, route_answers = answers[:4], answers[4:]
        # Nowhere known: no answer is trusted, no pose goes out.
        assert all(a[0].confidence < threshold for a in lost_answers if a)
        assert not any(stamp in harness.poses for _, stamp in lost)
        # Along the route: the belief locks on within a few frames and stays right and sure.
        for place, hypotheses in list(enumerate(route_answers))[3:]:
            assert hypotheses[0].place_id == place
            assert hypotheses[0].confidence >= threshold
            assert harness.poses[along[place][1]] is not None
        published = [place for place, (_, stamp) in enumerate(along) if stamp in harness.poses]
        assert published and all(
            msg_to_pose(harness.poses[along[p][1]].pose.pose) == route_pose(p) for p in published
        )


def odometry_at(x: float, stamp: int) -> Odometry:
    msg = Odometry()
    msg.header.stamp = stamp_msg(stamp)
    msg.header.frame_id = 'odom'
    msg.pose.pose.position.x = x
    msg.pose.pose.orientation.w = 1.0
    return msg


def test_odometry_holds_the_belief_while_the_robot_stands_and_sees_nothing(
    route_map: Path,  # noqa: F811
) -> None:
    params = {**FILTER_PARAMS, 'map_dir': str(route_map), 'odom_topic': 'odom'}
    with spun_node(params) as (_, harness):
        odometry = harness.node.create_publisher(Odometry, 'odom', 50)
        wait_subscribed(harness)
        assert harness.spin_until(lambda: odometry.get_subscription_count() > 0, 30)
        t = T0 + 100 * S
        frames = [(*seen_at(p, t + p * S), SPACING_M * p) for p in range(8)]
        # The camera is covered while the robot stands at place 7: frames that show nothing.
        t += 8 * S
        frames += [(*unknown_view(k, t + k * S), SPACING_M * 7) for k in range(5)]
        last = []
        for image, stamp, x in frames:
            odometry.publish(odometry_at(x, stamp))
            harness.spin_for(0.05)
            last = hypotheses_from_cloud(
                harness.ask(harness.raw, raw_msg(image, split_stamp(stamp)))
            )
        # Without odometry the keyframe-order motion would read the changing images as
        # driving on; odometry says the robot stood still.
        assert abs(last[0].place_id - 7) <= 1
        assert np.isfinite(last[0].confidence)
