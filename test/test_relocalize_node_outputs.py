"""The relocalize node as SLAM stacks and Nav2 use it: ``/initialpose`` only when it carries
news (an AMCL-like consumer counts them), lifecycle transitions driven over the lifecycle
services, run-time parameters refused with a reason, place poses that follow an optimised
path, the map's pose frame on every output, the latched map places, and loop closures from
a bag played into the node.

Each test spins its own node in this process (its own ROS domain). The mapped route is
generated: synthetic places 3 m apart, one per second (a robot at 3 m/s).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import ros_environment, synthetic_place, viewed_again

from vpr_ros.database import PlaceDatabase, place_records
from vpr_ros.extraction import TorchExtractor
from vpr_ros.types import Frame, Pose

rclpy = pytest.importorskip('rclpy')
from diagnostic_msgs.msg import DiagnosticStatus  # noqa: E402
from geometry_msgs.msg import PoseStamped, PoseWithCovarianceStamped  # noqa: E402
from lifecycle_msgs.msg import State, Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState, GetState  # noqa: E402
from nav_msgs.msg import Path as PathMsg  # noqa: E402
from rcl_interfaces.srv import DescribeParameters, SetParameters  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import PointCloud2  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402
from test_relocalize_node import Harness, raw_msg  # noqa: E402
from visualization_msgs.msg import MarkerArray  # noqa: E402

from vpr_ros.nodes.conversions import (  # noqa: E402
    hypotheses_from_cloud,
    loop_closures_from_cloud,
    msg_to_pose,
    pose_to_msg,
    split_stamp,
    stamp_ns,
)
from vpr_ros.nodes.relocalize_node import RelocalizeNode  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.slow]

S = 1_000_000_000
T0 = 1_700_000_000 * S
PLACES = 16
SPACING_M = 3.0
PARAMS = {
    'camera_topics': ['cam/raw'],
    'camera_qos': 'reliable',
    'top_k': 5,
    'rerank_k': 4,
    'competitor_radius_m': 4.0,
    # Single frames: each frame's answer is checked on its own; the place filter (the
    # default mode) is tested in test_relocalize_filter.py.
    'mode': 'single',
    'confidence_threshold': 0.3,
    'max_rate_hz': 0.0,
    'num_threads': 1,
    'diagnostics_period_s': 0.2,
}


def route_pose(index: int) -> Pose:
    return Pose(SPACING_M * index, 5.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def place_stamp(index: int) -> int:
    return T0 + index * S


def save_route_map(model, directory: Path, frame: str = 'test_map') -> PlaceDatabase:
    """The mapped route: place i seen at T0 + i s, at x = 3 i m, poses in ``frame``."""
    images = [synthetic_place(i) for i in range(PLACES)]
    descriptors = TorchExtractor(model, batch_size=PLACES).extract(images)
    frames = [
        Frame(image, place_stamp(i), 'camera', route_pose(i), frame)
        for i, image in enumerate(images)
    ]
    database = PlaceDatabase(
        model.identity(),
        descriptors.global_descriptors,
        place_records(frames),
        descriptors.local_features,
    )
    database.save(directory)
    return database


@pytest.fixture(scope='module')
def route_map(tmp_path_factory: pytest.TempPathFactory, default_model) -> Path:
    directory = tmp_path_factory.mktemp('route') / 'map'
    save_route_map(default_model, directory)
    return directory


@contextlib.contextmanager
def spun_node(params: dict, cli_args: list[str] | None = None) -> Iterator[tuple]:
    """A relocalize node spun in this process, and a harness in the same domain."""
    domain = int(ros_environment()['ROS_DOMAIN_ID'])
    harness = Harness(domain)
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain)
    node = RelocalizeNode(
        context=context,
        parameter_overrides=[Parameter(k, value=v) for k, v in params.items()],
        cli_args=cli_args,
    )
    executor = MultiThreadedExecutor(num_threads=3, context=context)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        yield node, harness
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)
        harness.close()


def wait_subscribed(harness: Harness) -> None:
    assert harness.spin_until(lambda: harness.raw.get_subscription_count() > 0, 30)


def drive(harness: Harness, frames: list[tuple[np.ndarray, int]]) -> list[int]:
    """Publish frames (image, stamp) one by one, each once answered; their stamps."""
    stamps = []
    for image, stamp in frames:
        harness.ask(harness.raw, raw_msg(image, split_stamp(stamp)))
        stamps.append(stamp)
    return stamps


def seen_at(place: int, stamp: int) -> tuple[np.ndarray, int]:
    """A camera frame of ``place`` taken at ``stamp`` (the place viewed again)."""
    return viewed_again(synthetic_place(place)), stamp


def unknown_view(k: int, stamp: int) -> tuple[np.ndarray, int]:
    """A frame of somewhere the map does not know: plain noise."""
    rng = np.random.default_rng(k)
    return rng.integers(0, 255, (120, 160, 3), dtype=np.uint8), stamp


# -- pose policy: an AMCL-like consumer of /initialpose --------------------------------------


def test_on_change_sends_one_initialpose_when_relocalized_and_one_more_after_a_kidnap(
    route_map: Path,
) -> None:
    params = {**PARAMS, 'map_dir': str(route_map), 'pose_policy': 'on_change', 'jump_m': 10.0}
    remap = ['--ros-args', '-r', '/relocalize/pose:=/initialpose']
    with spun_node(params, remap) as (_, harness):
        initial_poses: list[PoseWithCovarianceStamped] = []
        # The consumer: AMCL restarts its particle filter on each of these.
        harness.node.create_subscription(
            PoseWithCovarianceStamped, '/initialpose', initial_poses.append, 100
        )
        wait_subscribed(harness)
        t = T0 + 100 * S
        # Lost: views of nowhere known, then the robot drives along places 0..6 at 3 m/s.
        lost = [unknown_view(k, t + k * S) for k in range(3)]
        t += 3 * S
        along = [seen_at(p, t + p * S) for p in range(7)]
        drive(harness, lost + along)
        harness.spin_for(0.5)
        assert len(initial_poses) == 1, [msg_to_pose(m.pose.pose) for m in initial_poses]
        first = initial_poses[0]
        assert stamp_ns(first.header.stamp) == along[0][1]
        assert first.header.frame_id == 'test_map'
        assert msg_to_pose(first.pose.pose) == route_pose(0)
        # Kidnapped to place 13 (39 m further on, in 1 s), then driving on from there.
        t = along[-1][1] + S
        kidnapped = [seen_at(p, t + (p - 13) * S) for p in (13, 14, 15)]
        drive(harness, kidnapped)
        harness.spin_for(0.5)
        assert len(initial_poses) == 2
        assert stamp_ns(initial_poses[1].header.stamp) == kidnapped[0][1]
        assert msg_to_pose(initial_poses[1].pose.pose) == route_pose(13)
        # /diagnostics says how many and why.
        assert harness.spin_until(lambda: harness.values().get('poses_published') == '2', 5.0), (
            harness.values()
        )
        assert harness.values()['pose_publications'] == '1 jump, 1 relocalized'


def localizer_pose(place: int, stamp: int) -> PoseWithCovarianceStamped:
    msg = PoseWithCovarianceStamped()
    msg.header.stamp = stamp_msg(stamp)
    msg.header.frame_id = 'test_map'
    msg.pose.pose = pose_to_msg(route_pose(place))
    return msg


def test_under_supervision_only_a_kidnap_the_localizer_missed_is_published(
    route_map: Path,
) -> None:
    params = {
        **PARAMS,
        'map_dir': str(route_map),
        'localizer_pose_topic': '/amcl_pose',
        'disagreement_m': 3.0,
    }
    with spun_node(params) as (_, harness):
        amcl = harness.node.create_publisher(PoseWithCovarianceStamped, '/amcl_pose', 10)
        wait_subscribed(harness)
        assert harness.spin_until(lambda: amcl.get_subscription_count() > 0, 10.0)
        t = T0 + 400 * S
        # The localizer tracks the robot along places 2..5: no reason to publish.
        for place in range(2, 6):
            amcl.publish(localizer_pose(place, t))
            harness.spin_for(0.1)
            drive(harness, [seen_at(place, t)])
            t += S
        harness.spin_for(0.3)
        assert not harness.poses
        # Kidnapped to place 13; the localizer still believes place 5.
        drive(harness, [seen_at(13, t)])
        assert harness.spin_until(lambda: t in harness.poses, 5.0)
        assert msg_to_pose(harness.poses[t].pose.pose) == route_pose(13)
        kidnap = t
        # The localizer takes the correction; the robot drives on: nothing more.
        for place in (14, 15):
            t += S
            amcl.publish(localizer_pose(place, t))
            harness.spin_for(0.1)
            drive(harness, [seen_at(place, t)])
        harness.spin_for(0.3)
        assert list(harness.poses) == [kidnap]
        assert harness.spin_until(
            lambda: harness.values().get('pose_publications') == '1 disagreement', 5.0
        ), harness.values()


def test_the_relocalize_service_publishes_the_next_confident_answer_and_says_which(
    route_map: Path,
) -> None:
    params = {**PARAMS, 'map_dir': str(route_map), 'pose_policy': 'on_request'}
    with spun_node(params) as (_, harness):
        wait_subscribed(harness)
        drive(harness, [seen_at(2, T0 + 200 * S)])
        harness.spin_for(0.3)
        assert not harness.poses  # on_request: nothing unasked
        client = harness.node.create_client(Trigger, 'relocalize/relocalize')
        assert client.wait_for_service(timeout_sec=10)
        future = client.call_async(Trigger.Request())
        stamp = T0 + 201 * S
        harness.ask(harness.raw, raw_msg(seen_at(5, stamp)[0], split_stamp(stamp)))
        harness.executor.spin_until_future_complete(future, timeout_sec=15)
        response = future.result()
        assert response.success, response.message
        assert 'place 5 (confidence' in response.message and "frame 'test_map'" in response.message
        assert harness.spin_until(lambda: stamp in harness.poses, 5.0)
        assert list(harness.poses) == [stamp]


# -- lifecycle ----------------------------------------------------------------------------


def lifecycle_clients(harness: Harness) -> tuple:
    change = harness.node.create_client(ChangeState, 'relocalize/change_state')
    get = harness.node.create_client(GetState, 'relocalize/get_state')
    assert change.wait_for_service(timeout_sec=10) and get.wait_for_service(timeout_sec=10)
    return change, get


def transition(harness: Harness, change, transition_id: int) -> bool:
    request = ChangeState.Request()
    request.transition.id = transition_id
    return bool(harness.call(change, request).success)


def state_of(harness: Harness, get) -> int:
    return int(harness.call(get, GetState.Request()).current_state.id)


def test_every_lifecycle_transition_and_a_failed_configure_that_stays_unconfigured(
    route_map: Path, tmp_path: Path
) -> None:
    broken = tmp_path / 'broken'
    broken.mkdir()
    (broken / 'manifest.json').write_text('{not json')
    params = {**PARAMS, 'autostart': False, 'map_dir': str(broken)}
    with spun_node(params) as (node, harness):
        change, get = lifecycle_clients(harness)
        assert state_of(harness, get) == State.PRIMARY_STATE_UNCONFIGURED
        # A bad map: configure fails, the node stays up and unconfigured, and says why.
        assert not transition(harness, change, Transition.TRANSITION_CONFIGURE)
        assert state_of(harness, get) == State.PRIMARY_STATE_UNCONFIGURED
        assert harness.spin_until(lambda: harness.status is not None, 5.0)
        assert harness.spin_until(lambda: harness.status.level == DiagnosticStatus.ERROR, 5.0)
        assert str(broken) in harness.status.message
        assert 'cannot configure' in harness.status.message
        # The map fixed, a lifecycle manager configures and activates.
        node.set_parameters([Parameter('map_dir', value=str(route_map))])
        assert transition(harness, change, Transition.TRANSITION_CONFIGURE)
        assert state_of(harness, get) == State.PRIMARY_STATE_INACTIVE
        assert harness.raw.get_subscription_count() == 0  # inactive: not subscribed yet
        assert transition(harness, change, Transition.TRANSITION_ACTIVATE)
        assert state_of(harness, get) == State.PRIMARY_STATE_ACTIVE
        wait_subscribed(harness)
        cloud = harness.ask(harness.raw, raw_msg(*[seen_at(4, T0)[0], split_stamp(T0)]))
        assert hypotheses_from_cloud(cloud)[0].place_id == 4
        # Deactivate: paused, the model stays loaded.
        assert transition(harness, change, Transition.TRANSITION_DEACTIVATE)
        assert state_of(harness, get) == State.PRIMARY_STATE_INACTIVE
        assert harness.spin_until(lambda: harness.raw.get_subscription_count() == 0, 5.0)
        assert node._model is not None
        assert transition(harness, change, Transition.TRANSITION_ACTIVATE)
        wait_subscribed(harness)
        stamp = T0 + S
        harness.ask(harness.raw, raw_msg(seen_at(6, stamp)[0], split_stamp(stamp)))
        assert transition(harness, change, Transition.TRANSITION_DEACTIVATE)
        # Cleanup frees the model and the map.
        assert transition(harness, change, Transition.TRANSITION_CLEANUP)
        assert state_of(harness, get) == State.PRIMARY_STATE_UNCONFIGURED
        assert node._model is None and node._relocalizer is None
        assert transition(harness, change, Transition.TRANSITION_UNCONFIGURED_SHUTDOWN)
        assert state_of(harness, get) == State.PRIMARY_STATE_FINALIZED


# -- parameters ---------------------------------------------------------------------------


def test_an_out_of_range_set_is_refused_with_a_reason_and_a_valid_one_applies(
    route_map: Path,
) -> None:
    with spun_node({**PARAMS, 'map_dir': str(route_map)}) as (node, harness):
        client = harness.node.create_client(SetParameters, 'relocalize/set_parameters')
        describe = harness.node.create_client(DescribeParameters, 'relocalize/describe_parameters')
        assert client.wait_for_service(timeout_sec=10)
        assert describe.wait_for_service(timeout_sec=10)

        def set_one(name: str, value) -> tuple[bool, str]:
            request = SetParameters.Request()
            request.parameters = [Parameter(name, value=value).to_parameter_msg()]
            result = harness.call(client, request).results[0]
            return bool(result.successful), str(result.reason)

        ok, reason = set_one('confidence_threshold', 1.5)
        assert not ok and 'confidence_threshold' in reason and '1.5' in reason
        ok, reason = set_one('pose_policy', 'sometimes')
        assert not ok and 'on_change' in reason
        ok, reason = set_one('rerank_k', 9)
        assert not ok and 'rerank_k' in reason
        assert node.conf.outputs.confidence_threshold == 0.3  # unchanged
        assert set_one('confidence_threshold', 0.6) == (True, '')
        assert set_one('pose_policy', 'every_frame') == (True, '')
        assert set_one('top_k', 8) == (True, '')
        assert node.conf.outputs.pose_policy == 'every_frame'
        assert node._relocalizer is not None and node._relocalizer.conf.top_k == 8
        # The descriptors carry the range, the allowed values and real text.
        request = DescribeParameters.Request(names=['confidence_threshold', 'pose_policy'])
        threshold, policy = harness.call(describe, request).descriptors
        assert threshold.floating_point_range[0].to_value == 1.0
        assert not threshold.read_only
        assert 'on_change' in policy.additional_constraints
        assert 'initialpose' in policy.description


# -- frames, the optimised path and the map places ----------------------------------------


def test_an_odom_frame_map_publishes_no_pose_and_says_why(tmp_path: Path, default_model) -> None:
    save_route_map(default_model, tmp_path / 'odom_map', frame='odom')
    params = {**PARAMS, 'map_dir': str(tmp_path / 'odom_map'), 'pose_policy': 'every_frame'}
    with spun_node(params) as (_, harness):
        wait_subscribed(harness)
        (stamp,) = drive(harness, [seen_at(3, T0)])
        assert harness.hypotheses[stamp].header.frame_id == 'odom'
        harness.spin_for(0.5)
        assert not harness.poses
        assert harness.spin_until(
            lambda: harness.status is not None and 'REP-105' in harness.status.message, 5.0
        )
        assert harness.status.level == DiagnosticStatus.WARN
    with spun_node({**params, 'allow_odom_frame_map': True}) as (_, harness):
        wait_subscribed(harness)
        (stamp,) = drive(harness, [seen_at(3, T0)])
        assert harness.spin_until(lambda: stamp in harness.poses, 5.0)
        assert harness.poses[stamp].header.frame_id == 'odom'


def shifted(pose: Pose, dx: float, dy: float) -> Pose:
    return Pose(pose.x + dx, pose.y + dy, pose.z, pose.qx, pose.qy, pose.qz, pose.qw)


def test_place_poses_follow_a_published_optimised_path(route_map: Path) -> None:
    params = {
        **PARAMS,
        'map_dir': str(route_map),
        'pose_policy': 'every_frame',
        'optimized_path_topic': '/slam/optimized_path',
        'path_max_gap_s': 0.0,
    }
    with spun_node(params) as (node, harness):
        markers: list[MarkerArray] = []
        latched = QoSProfile(
            depth=1,
            reliability=ReliabilityPolicy.RELIABLE,
            durability=DurabilityPolicy.TRANSIENT_LOCAL,
        )
        harness.node.create_subscription(
            MarkerArray, 'relocalize/map_places', markers.append, latched
        )
        publisher = harness.node.create_publisher(PathMsg, '/slam/optimized_path', 10)
        wait_subscribed(harness)
        assert harness.spin_until(lambda: bool(markers), 10.0), 'no latched map places'
        assert count_places(markers[-1]) == PLACES
        # The back end moves every keyframe: 2 m more per keyframe along x, 1 m up in y.
        path = PathMsg()
        path.header.frame_id = 'test_map'
        for i in range(PLACES):
            stamped = PoseStamped()
            stamped.header.stamp = stamp_msg(place_stamp(i))
            stamped.header.frame_id = 'test_map'
            stamped.pose = pose_to_msg(shifted(route_pose(i), 2.0 * i, 1.0))
            path.poses.append(stamped)
        assert harness.spin_until(lambda: publisher.get_subscription_count() > 0, 10.0)
        publisher.publish(path)
        assert harness.spin_until(
            lambda: harness.values().get('places_moved') == str(PLACES), 10.0
        ), harness.values()
        for place in (2, 9):
            stamp = T0 + (300 + place) * S
            harness.ask(harness.raw, raw_msg(seen_at(place, stamp)[0], split_stamp(stamp)))
            assert harness.spin_until(lambda stamp=stamp: stamp in harness.poses, 5.0)
            moved = shifted(route_pose(place), 2.0 * place, 1.0)
            assert msg_to_pose(harness.poses[stamp].pose.pose) == moved
        assert node._database().poses[15, 0] == pytest.approx(SPACING_M * 15 + 30.0)
        # The latched places follow too.
        assert harness.spin_until(lambda: any_marker_at(markers[-1], SPACING_M * 15 + 30.0), 5.0)


def stamp_msg(ns: int):
    from builtin_interfaces.msg import Time

    sec, nanosec = split_stamp(ns)
    return Time(sec=sec, nanosec=nanosec)


def count_places(markers: MarkerArray) -> int:
    return sum(len(m.points) for m in markers.markers if m.type == m.SPHERE_LIST)


def any_marker_at(markers: MarkerArray, x: float) -> bool:
    return any(
        math.isclose(p.x, x, abs_tol=1e-6)
        for m in markers.markers
        if m.type == m.SPHERE_LIST
        for p in m.points
    )


# -- loop closure from a bag ----------------------------------------------------------------


def test_a_route_bag_that_closes_on_itself_gets_its_loop_closures_with_both_stamps(
    tmp_path: Path,
) -> None:
    """The loop-closure route of test_loop_closure (22 frames around a circle, 4 back at its
    start) written to a bag with its odometry, played into a node in loop-closure mode."""
    from test_loop_closure import AROUND, BACK, closing_route, scene

    from vpr_ros.bagwriter import write_bag
    from vpr_ros.nodes.bag_player import read_messages, to_rclpy
    from vpr_ros.nodes.common import pose_message_class

    frames = closing_route()
    bag = write_bag(
        tmp_path / 'loop', frames, image_topic='/camera/image_raw', pose_frame_id='odom'
    )
    params = {
        **PARAMS,
        'camera_topics': ['cam/raw'],
        'loop_closure.enabled': True,
        'loop_closure.pose_topic': '/odom',
        'loop_closure.exclusion_s': 10.0,
        'loop_closure.exclusion_m': 20.0,
        'loop_closure.min_distance_m': 1.0,
        'confidence_threshold': 0.4,
    }
    with spun_node(params) as (_, harness):
        closures: dict[int, PointCloud2] = {}
        harness.node.create_subscription(
            PointCloud2,
            'relocalize/loop_closures',
            lambda m: closures.__setitem__(stamp_ns(m.header.stamp), m),
            100,
        )
        odometry = pose_message_class('odometry')
        odom = harness.node.create_publisher(odometry, '/odom', 100)
        wait_subscribed(harness)
        assert harness.spin_until(lambda: odom.get_subscription_count() > 0, 10.0)
        messages = list(read_messages(bag, ['/camera/image_raw', '/odom']))
        # A frame's pose first (the bag stamps both alike), as a SLAM stack's odometry leads.
        messages.sort(key=lambda m: (m[1], m[0] != '/odom'))
        for topic, _, msg in messages:
            if topic == '/odom':
                odom.publish(to_rclpy(msg, odometry))
            else:
                harness.ask(harness.raw, to_rclpy(msg, harness.raw.msg_type))
        harness.spin_for(0.5)
        index_of = {f.stamp_ns: i for i, f in enumerate(frames)}
        closed = sorted(index_of[s] for s in closures)
        assert closed == list(range(AROUND, AROUND + BACK)), closed
        for stamp, msg in closures.items():
            (best, *_) = loop_closures_from_cloud(msg)
            assert best.query_stamp_ns == stamp
            place = index_of[best.place_stamp_ns]
            assert scene(place) == scene(index_of[stamp]) and place < AROUND
            assert stamp - best.place_stamp_ns >= 10 * S  # never the recent past
            assert msg.header.frame_id == 'odom'
        assert harness.spin_until(lambda: harness.values().get('keyframes_added') == '26', 5.0)


# -- diagnostics ---------------------------------------------------------------------------


def test_one_bad_frame_warns_on_diagnostics_only_while_it_is_in_the_window(
    route_map: Path,
) -> None:
    params = {**PARAMS, 'map_dir': str(route_map), 'diagnostics_window_s': 1.5}
    with spun_node(params) as (_, harness):
        wait_subscribed(harness)
        drive(harness, [seen_at(1, T0)])
        assert harness.spin_until(
            lambda: harness.status is not None and harness.status.level == DiagnosticStatus.OK,
            5.0,
        )
        bad = raw_msg(seen_at(1, T0 + S)[0], split_stamp(T0 + S))
        bad.encoding = 'yuv422_weird'
        harness.raw.publish(bad)
        assert harness.spin_until(
            lambda: (
                harness.status.level == DiagnosticStatus.WARN
                and 'skipped' in harness.status.message
            ),
            5.0,
        ), harness.status
        assert harness.values()['frames_skipped'] == '1'
        # Once the bad frame is older than the window, the level is OK again; the count stays.
        assert harness.spin_until(lambda: harness.status.level == DiagnosticStatus.OK, 5.0)
        assert harness.values()['frames_skipped'] == '1'
        assert harness.values()['frames_skipped_recently'] == '0'
