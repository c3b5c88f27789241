"""The relocalize node across processes: real rclpy, a map with known answers.

One node process serves most tests (its model load costs seconds); it listens to a raw and a
compressed camera. Map places are synthetic images 20 m apart; a query is a place viewed
again (shifted, brighter), so the right answer is known.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from conftest import ros_environment, synthetic_place, viewed_again

from vpr_ros.database import PlaceDatabase, current_generation, place_records
from vpr_ros.errors import ConfigError, DatabaseError
from vpr_ros.extraction import TorchExtractor
from vpr_ros.images import rgb_to_compressed_bytes, rgb_to_image_fields
from vpr_ros.mapping import MapBuilder
from vpr_ros.models.base import ModelIdentity
from vpr_ros.types import Frame, Pose

rclpy = pytest.importorskip('rclpy')
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402
from geometry_msgs.msg import PoseArray, PoseWithCovarianceStamped  # noqa: E402
from rcl_interfaces.srv import ListParameters  # noqa: E402
from rclpy.exceptions import ParameterException  # noqa: E402
from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2  # noqa: E402
from std_srvs.srv import SetBool, Trigger  # noqa: E402

from vpr_ros.nodes.conversions import (  # noqa: E402
    HYPOTHESIS_DTYPE,
    hypotheses_from_cloud,
    msg_to_pose,
    stamp_ns,
)
from vpr_ros.nodes.relocalize_node import (  # noqa: E402
    RelocalizeNode,
    RelocalizeNodeConf,
)

pytestmark = [pytest.mark.ros, pytest.mark.slow]

PLACES = 8
COVARIANCE = [0.5, 0.5, 0.5, 0.05, 0.05, 0.05]
THRESHOLD = 0.3
PARAMS = {
    'camera_topics': ['cam/raw', 'cam/compressed'],
    'camera_transports': ['raw', 'compressed'],
    # Reliable, so that a burst's newest frame cannot be lost in transport; the sequence-mode
    # node below runs on the default, sensor_data.
    'camera_qos': 'reliable',
    'top_k': 5,
    'rerank_k': 4,
    'confidence_threshold': THRESHOLD,
    # Single frames: each frame's answer is checked on its own; the place filter (the
    # default mode) is tested in test_relocalize_filter.py.
    'mode': 'single',
    # Every confident frame gets its ~/pose here, so each answer's pose can be checked; the
    # default policy (on_change) is tested in test_relocalize_node_outputs.py.
    'pose_policy': 'every_frame',
    'pose_covariance': COVARIANCE,
    'map_frame_id': 'test_map',
    'max_rate_hz': 0.0,
    'num_threads': 1,
    'diagnostics_period_s': 0.2,
}
_stamps = itertools.count(1)


def place_pose(index: int, offset: float = 0.0) -> Pose:
    yaw = index / 4
    return Pose(20.0 * index + offset, 5.0, 0.0, 0.0, 0.0, np.sin(yaw / 2), np.cos(yaw / 2))


def build_map(model, *, id_offset: int = 0, pose_offset: float = 0.0) -> PlaceDatabase:
    images = [synthetic_place(i) for i in range(PLACES)]
    descriptors = TorchExtractor(model, batch_size=PLACES).extract(images)
    frames = [
        Frame(image=image, stamp_ns=i, pose=place_pose(i, pose_offset), pose_frame_id='test_map')
        for i, image in enumerate(images)
    ]
    return PlaceDatabase(
        model.identity(),
        descriptors.global_descriptors,
        place_records(frames, first_id=id_offset),
        descriptors.local_features,
    )


def query_image(index: int, size: tuple[int, int] | None = None) -> np.ndarray:
    image = viewed_again(synthetic_place(index))
    return image if size is None else cv2.resize(image, size[::-1])


def next_stamp() -> tuple[int, int]:
    """A fresh (sec, nanosec) for one frame."""
    return 1000 + next(_stamps), 500


def raw_msg(image: np.ndarray, stamp: tuple[int, int], encoding: str = 'rgb8') -> Image:
    encoding, height, width, step, data = rgb_to_image_fields(image, encoding)
    msg = Image(encoding=encoding, height=height, width=width, step=step, data=data)
    msg.header.stamp.sec, msg.header.stamp.nanosec = stamp
    msg.header.frame_id = 'camera'
    return msg


def compressed_msg(
    image: np.ndarray, stamp: tuple[int, int], fmt: str = 'jpeg'
) -> CompressedImage:
    msg = CompressedImage(format=fmt, data=rgb_to_compressed_bytes(image, fmt))
    msg.header.stamp.sec, msg.header.stamp.nanosec = stamp
    msg.header.frame_id = 'camera'
    return msg


def ns(stamp: tuple[int, int]) -> int:
    return stamp[0] * 1_000_000_000 + stamp[1]


def start_node(params: dict, env: dict[str, str], log: Path) -> subprocess.Popen:
    params_file = log.with_suffix('.yaml')
    params_file.write_text(yaml.safe_dump({'relocalize': {'ros__parameters': params}}))
    command = [sys.executable, '-m', 'vpr_ros.nodes.relocalize_node', '--ros-args']
    command += ['--params-file', str(params_file)]
    with log.open('w') as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


class Harness:
    """The test side: camera publishers, output subscribers and service clients."""

    def __init__(self, domain_id: int) -> None:
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node('relocalize_test', context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        node = self.node
        self.raw = node.create_publisher(Image, 'cam/raw', 10)
        self.compressed = node.create_publisher(CompressedImage, 'cam/compressed', 10)
        self.hypotheses: dict[int, PointCloud2] = {}
        self.answer_order: list[int] = []
        self.poses: dict[int, PoseWithCovarianceStamped] = {}
        self.pose_arrays: dict[int, PoseArray] = {}
        self.status: DiagnosticStatus | None = None
        node.create_subscription(PointCloud2, 'relocalize/hypotheses', self._on_hypotheses, 300)
        node.create_subscription(
            PoseWithCovarianceStamped,
            'relocalize/pose',
            lambda m: self.poses.__setitem__(stamp_ns(m.header.stamp), m),
            300,
        )
        node.create_subscription(
            PoseArray,
            'relocalize/hypothesis_poses',
            lambda m: self.pose_arrays.__setitem__(stamp_ns(m.header.stamp), m),
            300,
        )
        node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diagnostics, 10)
        self.reload = node.create_client(Trigger, 'relocalize/reload_map')
        self.enable = node.create_client(SetBool, 'relocalize/enable')
        self.list_parameters = node.create_client(ListParameters, 'relocalize/list_parameters')

    def _on_hypotheses(self, msg: PointCloud2) -> None:
        stamp = stamp_ns(msg.header.stamp)
        self.hypotheses[stamp] = msg
        self.answer_order.append(stamp)

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name.startswith('relocalize'):
                self.status = status

    def values(self) -> dict[str, str]:
        return {kv.key: kv.value for kv in self.status.values} if self.status else {}

    def spin_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                return False
            self.executor.spin_once(timeout_sec=0.02)
        return True

    def spin_for(self, seconds: float) -> None:
        self.spin_until(lambda: False, seconds)

    def call(self, client, request, timeout: float = 60.0):
        future = client.call_async(request)
        self.executor.spin_until_future_complete(future, timeout_sec=timeout)
        assert future.done(), f'{client.srv_name} did not answer'
        return future.result()

    def ask(self, publisher, msg, timeout: float = 20.0) -> PointCloud2:
        """Publish ``msg`` until the node answers its stamp (best-effort input may be lost)."""
        stamp = stamp_ns(msg.header.stamp)
        deadline = time.monotonic() + timeout
        while stamp not in self.hypotheses and time.monotonic() < deadline:
            publisher.publish(msg)
            self.spin_until(lambda: stamp in self.hypotheses, 2.0)
        assert stamp in self.hypotheses, f'no hypotheses for stamp {stamp}'
        return self.hypotheses[stamp]

    def counter(self, key: str) -> int:
        return int(self.values().get(key, -1))

    def close(self) -> None:
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)


@pytest.fixture(scope='module')
def maps(tmp_path_factory: pytest.TempPathFactory, default_model) -> dict:
    """Map A (ids 0..7) saved as the node's map_dir, and map B (ids 100..107, moved 3 m)."""
    root = tmp_path_factory.mktemp('relocalize_maps')
    map_a, map_b = build_map(default_model), build_map(default_model, id_offset=100, pose_offset=3)
    map_a.save(root / 'map')
    return {'dir': root / 'map', 'a': map_a, 'b': map_b, 'root': root}


@contextlib.contextmanager
def running_node(
    params: dict, log: Path, *, cameras: tuple[str, ...] = ('raw',)
) -> Iterator[tuple[subprocess.Popen, Harness]]:
    """A relocalize node in its own process, up and subscribed to ``cameras`` (harness
    publisher names), and a harness; on exit it must stop cleanly on SIGINT."""
    env = ros_environment()
    process = start_node(params, env, log)
    harness = Harness(int(env['ROS_DOMAIN_ID']))
    try:
        ready = harness.reload.wait_for_service(timeout_sec=90) and harness.spin_until(
            lambda: (
                all(getattr(harness, c).get_subscription_count() > 0 for c in cameras)
                and harness.status is not None
            ),
            30,
        )
        assert ready, f'the node did not come up:\n{log.read_text()}'
        yield process, harness
    finally:
        harness.close()
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    output = log.read_text()
    assert process.returncode == 0, output
    assert 'Traceback' not in output, output


@pytest.fixture(scope='module')
def node(maps: dict) -> Iterator[tuple[subprocess.Popen, Harness]]:
    params = {**PARAMS, 'map_dir': str(maps['dir'])}
    with running_node(params, maps['root'] / 'node.log', cameras=('raw', 'compressed')) as up:
        yield up


def check_answer(harness: Harness, stamp: tuple[int, int], place: int) -> None:
    """Hypotheses, pose and pose array for ``stamp`` are right for a query of ``place``."""
    cloud = harness.hypotheses[ns(stamp)]
    assert (cloud.header.stamp.sec, cloud.header.stamp.nanosec) == stamp
    assert cloud.header.frame_id == 'test_map'
    assert [f.name for f in cloud.fields] == list(HYPOTHESIS_DTYPE.names)
    hypotheses = hypotheses_from_cloud(cloud)
    assert len(hypotheses) == PARAMS['rerank_k']
    assert len({h.place_id for h in hypotheses}) == len(hypotheses)
    scores = [h.rerank_score for h in hypotheses]
    assert scores == sorted(scores, reverse=True), 'hypotheses are not best first'
    assert all(0.0 <= h.confidence <= 1.0 for h in hypotheses)
    assert all(-1.0 <= h.global_score <= 1.0 + 1e-5 for h in hypotheses)
    best = hypotheses[0]
    assert best.place_id == place
    np.testing.assert_allclose(best.pose.as_array(), place_pose(place).as_array())
    for h in hypotheses:
        np.testing.assert_allclose(h.pose.as_array(), place_pose(h.place_id).as_array())
    assert best.confidence >= THRESHOLD

    assert harness.spin_until(lambda: ns(stamp) in harness.poses, 5.0), 'no ~/pose'
    assert harness.spin_until(lambda: ns(stamp) in harness.pose_arrays, 5.0), 'no PoseArray'
    pose = harness.poses[ns(stamp)]
    assert (pose.header.stamp.sec, pose.header.stamp.nanosec) == stamp
    assert pose.header.frame_id == 'test_map'
    assert msg_to_pose(pose.pose.pose) == best.pose
    covariance = np.asarray(pose.pose.covariance).reshape(6, 6)
    np.testing.assert_allclose(covariance, np.diag(COVARIANCE) / best.confidence, rtol=1e-5)
    poses = harness.pose_arrays[ns(stamp)]
    assert (poses.header.stamp.sec, poses.header.frame_id) == (stamp[0], 'test_map')
    assert [msg_to_pose(p) for p in poses.poses] == [h.pose for h in hypotheses]


@pytest.mark.parametrize(
    ('place', 'transport', 'encoding'),
    [
        (0, 'raw', 'rgb8'),
        (1, 'raw', 'bgr8'),
        (2, 'raw', 'bgra8'),
        (3, 'compressed', 'jpeg'),
        (4, 'compressed', 'png'),
    ],
)
def test_frames_get_ranked_hypotheses_pose_and_pose_array_with_the_camera_stamp(
    node, place: int, transport: str, encoding: str
) -> None:
    _, harness = node
    stamp = next_stamp()
    if transport == 'raw':
        harness.ask(harness.raw, raw_msg(query_image(place), stamp, encoding))
    else:
        harness.ask(harness.compressed, compressed_msg(query_image(place), stamp, encoding))
    check_answer(harness, stamp, place)


def test_unknown_place_gets_hypotheses_but_no_pose(node) -> None:
    _, harness = node
    stamp = next_stamp()
    cloud = harness.ask(harness.raw, raw_msg(synthetic_place(50), stamp))
    hypotheses = hypotheses_from_cloud(cloud)
    assert len(hypotheses) == PARAMS['rerank_k']
    assert hypotheses[0].confidence < THRESHOLD
    assert harness.spin_until(lambda: ns(stamp) in harness.pose_arrays, 5.0)
    harness.spin_for(0.5)
    assert ns(stamp) not in harness.poses


def bad_frames() -> list[tuple[str, object, str]]:
    """(camera, message, skip reason) for every kind of broken input."""
    good = query_image(5)
    unknown = raw_msg(good, next_stamp())
    unknown.encoding = 'bayer_rggb8'
    short_step = raw_msg(good, next_stamp())
    short_step.step = short_step.width * 2
    long_step = raw_msg(good, next_stamp())
    long_step.step += 16  # data no longer step * height
    empty = raw_msg(good, next_stamp())
    empty.height, empty.width, empty.step, empty.data = 0, 0, 0, b''
    corrupt = compressed_msg(good, next_stamp())
    corrupt.data = bytes(corrupt.data)[:200] + bytes(300)
    no_bytes = compressed_msg(good, next_stamp())
    no_bytes.data = b''
    return [
        ('raw', unknown, 'unknown encoding bayer_rggb8'),
        ('raw', short_step, 'step too small'),
        ('raw', long_step, 'data size mismatch'),
        ('raw', empty, 'zero image size'),
        ('compressed', corrupt, 'corrupt compressed image'),
        ('compressed', no_bytes, 'empty compressed image'),
    ]


def test_bad_frames_are_skipped_and_counted_while_good_frames_are_answered(node) -> None:
    process, harness = node
    before = harness.counter('frames_skipped')
    bad_stamps = []
    for count, (camera, msg, reason) in enumerate(bad_frames(), start=1):
        bad_stamps.append(stamp_ns(msg.header.stamp))
        publisher = harness.raw if camera == 'raw' else harness.compressed
        publisher.publish(msg)
        # Wait until it is counted, so that the next frame cannot replace it unprocessed.
        assert harness.spin_until(
            lambda count=count: harness.counter('frames_skipped') >= before + count, 10.0
        ), f'{reason!r} frame not counted: {harness.values()}'
        assert reason in harness.values()['skipped_reasons']
        good = next_stamp()
        harness.ask(harness.raw, raw_msg(query_image(6), good))
        check_answer(harness, good, 6)
    assert process.poll() is None
    assert not set(bad_stamps) & set(harness.hypotheses)
    assert harness.counter('frames_skipped') == before + len(bad_stamps)
    assert harness.status.level == DiagnosticStatus.WARN
    assert 'empty compressed image' in harness.values()['last_error']


def rss_mb(pid: int) -> float:
    for line in Path(f'/proc/{pid}/status').read_text().splitlines():
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024
    raise AssertionError('no VmRSS')


def test_burst_of_200_frames_at_100_hz_answers_the_newest_frame_with_bounded_memory(
    node,
) -> None:
    process, harness = node
    size = (480, 640)
    messages = [raw_msg(query_image(i % PLACES, size), (0, 0)) for i in range(PLACES)]
    harness.ask(harness.raw, raw_msg(query_image(2, size), next_stamp()))  # sizes warmed up
    harness.spin_for(0.5)
    rss_before = rss_mb(process.pid)
    dropped_before = harness.counter('frames_dropped')
    stamps = []
    start = time.monotonic()
    for i in range(200):
        msg = messages[i % PLACES]
        stamp = next_stamp()
        msg.header.stamp.sec, msg.header.stamp.nanosec = stamp
        stamps.append(ns(stamp))
        harness.raw.publish(msg)
        harness.spin_until(lambda i=i: time.monotonic() >= start + (i + 1) / 100, 1.0)
    burst_s = time.monotonic() - start
    newest = stamps[-1]
    assert harness.spin_until(lambda: newest in harness.hypotheses, 10.0), (
        f'the newest frame was not answered; diagnostics {harness.values()}'
    )
    best = hypotheses_from_cloud(harness.hypotheses[newest])[0]
    assert best.place_id == 199 % PLACES
    answered = [s for s in harness.answer_order if s in set(stamps)]
    assert answered == sorted(answered), 'an older frame was answered after a newer one'
    assert len(answered) < len(stamps), 'no frame was dropped: the burst was not a burst'
    harness.spin_for(1.0)
    assert newest == max(harness.hypotheses)  # nothing stale arrives later
    assert harness.counter('frames_dropped') > dropped_before
    rss_after = rss_mb(process.pid)
    # 200 frames of 0.9 MB would be 180 MB if they queued up.
    assert rss_after - rss_before < 60, (rss_before, rss_after)
    print(
        f'burst of 200 frames in {burst_s:.2f} s: {len(answered)} answered, '
        f'RSS {rss_before:.0f} -> {rss_after:.0f} MB, diagnostics {harness.values()}'
    )


def test_enable_false_pauses_processing_and_true_resumes_it(node) -> None:
    _, harness = node
    response = harness.call(harness.enable, SetBool.Request(data=False))
    assert response.success and response.message == 'disabled'
    paused = next_stamp()
    for _ in range(3):
        harness.raw.publish(raw_msg(query_image(1), paused))
        harness.spin_for(0.3)
    harness.spin_for(1.0)
    assert ns(paused) not in harness.hypotheses
    assert harness.spin_until(lambda: harness.values().get('enabled') == 'False', 5.0)
    response = harness.call(harness.enable, SetBool.Request(data=True))
    assert response.success and response.message == 'enabled'
    resumed = next_stamp()
    harness.ask(harness.raw, raw_msg(query_image(1), resumed))
    check_answer(harness, resumed, 1)
    assert ns(paused) not in harness.hypotheses


def test_reload_map_swaps_a_rebuilt_map_and_keeps_the_old_one_if_the_new_is_broken(
    node, maps: dict
) -> None:
    _, harness = node
    maps['b'].save(maps['dir'])  # rebuilt in place, as build_map does
    try:
        response = harness.call(harness.reload, Trigger.Request())
        assert response.success, response.message
        assert f'{PLACES} places' in response.message
        stamp = next_stamp()
        best = hypotheses_from_cloud(harness.ask(harness.raw, raw_msg(query_image(2), stamp)))[0]
        assert best.place_id == 102
        assert best.pose == place_pose(2, 3.0)

        (current_generation(maps['dir']) / 'manifest.json').write_text('{not json')
        response = harness.call(harness.reload, Trigger.Request())
        assert not response.success
        assert 'kept the current map' in response.message
        assert 'unreadable' in response.message
        assert harness.spin_until(
            lambda: harness.values()['last_error'].startswith('map reload failed'), 5.0
        )
        stamp = next_stamp()
        best = hypotheses_from_cloud(harness.ask(harness.raw, raw_msg(query_image(3), stamp)))[0]
        assert best.place_id == 103
    finally:
        maps['a'].save(maps['dir'])
        assert harness.call(harness.reload, Trigger.Request()).success
    stamp = next_stamp()
    harness.ask(harness.raw, raw_msg(query_image(3), stamp))
    check_answer(harness, stamp, 3)


def test_node_declares_exactly_the_documented_parameters(node) -> None:
    _, harness = node
    response = harness.call(harness.list_parameters, ListParameters.Request())
    names = set(response.result.names) - {'use_sim_time', 'start_type_description_service'}
    assert names == set(RelocalizeNodeConf.flat_names())


@contextlib.contextmanager
def node_in_this_process(params: dict) -> Iterator[Harness]:
    """A relocalize node spun in this process (its own domain), with a test harness."""
    domain = int(ros_environment()['ROS_DOMAIN_ID'])
    harness = Harness(domain)
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain)
    node = RelocalizeNode(
        context=context, parameter_overrides=[Parameter(k, value=v) for k, v in params.items()]
    )
    executor = MultiThreadedExecutor(num_threads=3, context=context)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        assert harness.spin_until(lambda: harness.raw.get_subscription_count() > 0, 30)
        yield harness
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)
        harness.close()


def test_sequence_mode_follows_a_camera_along_the_map(maps: dict) -> None:
    """The node in sequence mode on global descriptors."""
    params = {
        **PARAMS,
        'map_dir': str(maps['dir']),
        'camera_qos': 'sensor_data',
        'mode': 'sequence',
        'sequence.descriptor': 'global',
        'sequence.length': 3,
    }
    with node_in_this_process(params) as harness:
        for place in range(PLACES):
            stamp = next_stamp()
            cloud = harness.ask(harness.raw, raw_msg(query_image(place), stamp))
            assert cloud.header.frame_id == 'test_map'
        hypotheses = hypotheses_from_cloud(cloud)
        assert hypotheses[0].place_id == PLACES - 1
        assert hypotheses[0].pose == place_pose(PLACES - 1)
        assert harness.spin_until(lambda: 'sequence_median_ms' in harness.values(), 5.0)
        assert harness.values()['mode'] == 'sequence'


def camera_info(width: int = 160, height: int = 120) -> CameraInfo:
    msg = CameraInfo(width=width, height=height)
    msg.k = [200.0, 0.0, width / 2, 0.0, 200.0, height / 2, 0.0, 0.0, 1.0]
    return msg


def test_the_reranker_parameter_selects_a_keypoint_verifier_end_to_end(
    tmp_path: Path, default_model
) -> None:
    """A map built with XFeat keypoints, a node whose reranker is xfeat_lighterglue and which
    knows the raw camera's intrinsics: verified hypotheses with inliers and relative poses."""
    conf = {'min_distance_m': 0.0, 'verifiers': 'xfeat_lighterglue', 'verifier_keypoints': 96}
    builder = MapBuilder(default_model, conf)
    for i in range(PLACES):
        frame = Frame(synthetic_place(i), i * 10**9, pose=place_pose(i), pose_frame_id='test_map')
        assert builder.offer(frame)
    builder.save(tmp_path / 'map')
    params = {
        **PARAMS,
        'map_dir': str(tmp_path / 'map'),
        'reranker': 'xfeat_lighterglue',
        'camera_info_topics': ['cam/raw_info', ''],
    }
    with node_in_this_process(params) as harness:
        info = harness.node.create_publisher(CameraInfo, 'cam/raw_info', 10)
        assert harness.spin_until(lambda: info.get_subscription_count() > 0, 30)
        info.publish(camera_info())
        harness.spin_for(0.3)
        warped = cv2.warpPerspective(
            synthetic_place(5),
            np.array([[0.97, 0.03, 5.0], [-0.02, 0.98, 3.0], [2e-4, 1e-4, 1.0]]),
            (160, 120),
        )
        stamp = next_stamp()
        cloud = harness.ask(harness.raw, raw_msg(warped, stamp))
        hypotheses = hypotheses_from_cloud(cloud)
        assert hypotheses[0].place_id == 5 and hypotheses[0].inliers > 10
        assert all(h.inliers >= 0 for h in hypotheses)
        assert hypotheses[0].inliers > max(h.inliers for h in hypotheses[1:])
        assert hypotheses[0].relative_pose is not None
        assert hypotheses[0].relative_pose.inliers >= 15
        # The compressed camera has no intrinsics: verified, but no relative pose.
        stamp = next_stamp()
        cloud = harness.ask(harness.compressed, compressed_msg(warped, stamp, 'png'))
        hypotheses = hypotheses_from_cloud(cloud)
        assert hypotheses[0].place_id == 5 and hypotheses[0].relative_pose is None


def fake_model_map(directory: Path, model, name: str | None = None) -> None:
    """A map that claims other weights than ``model``'s, and the name ``name`` (or its)."""
    real = model.identity()
    other = ModelIdentity(
        name or real.name, real.config_hash, '0' * 16, real.global_dim, real.local_dim
    )
    PlaceDatabase.empty(other).save(directory)


def test_start_up_on_a_missing_map_exits_with_code_1_and_a_clear_message(tmp_path: Path) -> None:
    log = tmp_path / 'node.log'
    params = {'map_dir': str(tmp_path / 'no_such_map'), 'num_threads': 1}
    process = start_node(params, ros_environment(), log)
    try:
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    output = log.read_text()
    assert process.returncode == 1, output
    assert 'cannot start' in output and 'no_such_map' in output and 'does not exist' in output
    assert 'Traceback' not in output


@pytest.mark.parametrize(
    ('case', 'error', 'expected'),
    [
        ('corrupt', DatabaseError, 'unreadable'),
        ('other_model', DatabaseError, 'this map was built with'),
        ('unregistered_model', ConfigError, 'set the parameter model to its exported model'),
        ('no_map_dir', ConfigError, 'map_dir is empty'),
        ('integer_for_a_double', ParameterException, "'max_rate_hz'.*expecting type 'DOUBLE'"),
        ('no_verifier_data', DatabaseError, 'build_map ... --verifiers aliked_lightglue'),
    ],
)
def test_node_construction_fails_clearly_on_a_bad_map_or_parameters(
    case: str, error: type, expected: str, tmp_path: Path, maps: dict, default_model
) -> None:
    """The errors ``main`` turns into exit code 1 (as for the missing map above)."""
    params = {'map_dir': str(maps['dir']), 'num_threads': 1}
    if case == 'corrupt':
        maps['a'].save(tmp_path / 'corrupt')
        (current_generation(tmp_path / 'corrupt') / 'manifest.json').write_text('{not json')
        params['map_dir'] = str(tmp_path / 'corrupt')
    elif case == 'other_model':
        fake_model_map(tmp_path / 'other', default_model)
        params.update(map_dir=str(tmp_path / 'other'), model='efficientnet_lite0_gem')
    elif case == 'unregistered_model':
        fake_model_map(tmp_path / 'exported', default_model, name='my_finetuned_model')
        params['map_dir'] = str(tmp_path / 'exported')
    elif case == 'no_map_dir':
        params['map_dir'] = ''
    elif case == 'no_verifier_data':
        params['reranker'] = 'aliked_lightglue'
    else:
        params['max_rate_hz'] = 10  # rclpy refuses 10 for a double; main exits with code 1
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=int(ros_environment()['ROS_DOMAIN_ID']))
    try:
        overrides = [Parameter(name, value=value) for name, value in params.items()]
        with pytest.raises(error, match=expected):
            RelocalizeNode(context=context, parameter_overrides=overrides)
    finally:
        rclpy.shutdown(context=context)


@pytest.mark.parametrize(
    ('changes', 'expected'),
    [
        ({'camera_transports': ['udp']}, "camera_transports must be one of ['raw', 'compressed']"),
        ({'camera_transports': ['raw', 'raw', 'raw']}, 'has 3 values for 2 camera topics'),
        ({'camera_topics': []}, 'at least one topic'),
        ({'camera_topics': ['a', 'a']}, 'lists a topic twice'),
        ({'camera_qos': 'fast'}, "camera_qos must be one of ['sensor_data', 'reliable']"),
        ({'camera_info_topics': ['a', 'b', 'c']}, 'has 3 values for 2 camera topics'),
        ({'verifier': 'mnn', 'verify_k': 5}, 'verify_k must be in 1..rerank_k (4)'),
        ({'top_k': 0}, 'top_k must be >= 1'),
        ({'rerank_k': 9}, 'rerank_k must be in 0..top_k (5)'),
        ({'confidence_threshold': 1.5}, 'confidence_threshold must be in [0, 1]'),
        ({'pose_covariance': [1.0, 2.0]}, 'pose_covariance must have 6 values'),
        ({'pose_covariance': [1.0, 1.0, float('nan'), 0.1, 0.1, 0.1]}, 'finite'),
        ({'max_rate_hz': -1.0}, 'max_rate_hz must be >= 0'),
        ({'num_threads': -2}, 'num_threads must be >= 0'),
        ({'diagnostics_period_s': 0.0}, 'diagnostics_period_s must be >= 0.05'),
        ({'min_similarity': float('nan')}, 'min_similarity must be a finite number'),
    ],
)
def test_invalid_parameters_are_refused_with_the_reason(changes: dict, expected: str) -> None:
    params = {**PARAMS, **changes}
    with pytest.raises(ConfigError) as error:
        RelocalizeNodeConf.from_dict(params)
    assert expected in str(error.value)


def test_the_default_parameters_are_valid() -> None:
    assert RelocalizeNodeConf().relocalization.top_k >= 1


def test_the_node_runs_the_model_on_onnxruntime_when_an_export_fits_the_map(
    maps: dict, default_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vpr_ros.extraction import CACHE_ENV, onnx_export_path
    from vpr_ros.models.onnx_export import export_onnx

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / 'cache'))
    name = default_model.name
    export_onnx(default_model, onnx_export_path(name), registry_name=name)
    with node_in_this_process({**PARAMS, 'map_dir': str(maps['dir'])}) as harness:
        stamp = next_stamp()
        harness.ask(harness.raw, raw_msg(query_image(2), stamp))
        check_answer(harness, stamp, 2)
        assert harness.spin_until(lambda: 'backend' in harness.values(), 5.0)
        assert harness.values()['backend'] == 'onnxruntime'
        # num_threads 1 reaches ONNX Runtime's session and faiss in the worker thread.
        threads = json.loads(harness.values()['threads'])
        assert threads['onnxruntime'] == threads['faiss'] == 1, threads
