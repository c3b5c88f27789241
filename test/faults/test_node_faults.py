"""Faults around the relocalize node: large raw frames over DDS, a map rewritten under a
running node, oversized images, the diagnostics window, and parameters refused at start-up
and at run time."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ros_environment
from test_build_map_faults import png_bomb
from test_relocalize_node import (
    PLACES,
    Harness,
    build_map,
    compressed_msg,
    next_stamp,
    ns,
    query_image,
    raw_msg,
    running_node,
    start_node,
)

from vpr_ros.database import column_files, current_generation
from vpr_ros.dds import PROFILE_ENV
from vpr_ros.errors import ConfigError, DatabaseError

rclpy = pytest.importorskip('rclpy')
from diagnostic_msgs.msg import DiagnosticStatus  # noqa: E402
from rcl_interfaces.msg import Parameter as ParameterMsg  # noqa: E402
from rcl_interfaces.srv import SetParameters  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

from vpr_ros.nodes.conversions import hypotheses_from_cloud, stamp_ns  # noqa: E402
from vpr_ros.nodes.relocalize_node import RelocalizeNode  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.slow]

PARAMS = {
    'camera_topics': ['cam/raw', 'cam/compressed'],
    'camera_transports': ['raw', 'compressed'],
    # camera_qos: the default, sensor_data (best effort)
    'top_k': 5,
    'rerank_k': 4,
    'mode': 'single',  # each fault's frame is answered on its own
    'max_rate_hz': 0.0,
    'num_threads': 1,
    'diagnostics_period_s': 0.2,
    'diagnostics_window_s': 2.0,  # a WARN clears 2 s after its cause
}


@pytest.fixture(scope='module')
def served(tmp_path_factory: pytest.TempPathFactory, default_model) -> Iterator[dict]:
    """A node (own process, default camera QoS) serving map A (ids 0..7)."""
    root = tmp_path_factory.mktemp('served')
    map_a = build_map(default_model)
    map_a.save(root / 'map')
    log = root / 'node.log'
    with running_node({**PARAMS, 'map_dir': str(root / 'map')}, log) as (process, harness):
        yield {'process': process, 'harness': harness, 'root': root, 'a': map_a, 'log': log}


@pytest.mark.parametrize(
    ('size', 'reliability'),
    [
        ((480, 640), ReliabilityPolicy.BEST_EFFORT),
        ((720, 1280), ReliabilityPolicy.BEST_EFFORT),
        ((720, 1280), ReliabilityPolicy.RELIABLE),
    ],
    ids=['640x480-best-effort', '1280x720-best-effort', '1280x720-reliable'],
)
def test_large_raw_frames_at_30_hz_reach_the_node_with_the_default_qos(
    served: dict, size: tuple[int, int], reliability: ReliabilityPolicy
) -> None:
    """Without the shipped Fast DDS profile none of these frames arrived (0 of 60)."""
    harness: Harness = served['harness']
    qos = QoSProfile(depth=5, reliability=reliability)
    if reliability == ReliabilityPolicy.BEST_EFFORT:
        qos = qos_profile_sensor_data
    camera = harness.node.create_publisher(Image, 'cam/raw', qos)
    try:
        assert harness.spin_until(lambda: camera.get_subscription_count() > 0, 10)
        harness.spin_for(0.5)
        before = harness.counter('frames_received')
        messages = [raw_msg(query_image(i, size), (0, 0)) for i in range(PLACES)]
        frames, stamps = 60, []
        start = time.monotonic()
        for i in range(frames):
            msg = messages[i % PLACES]
            stamp = next_stamp()
            msg.header.stamp.sec, msg.header.stamp.nanosec = stamp
            stamps.append(ns(stamp))
            camera.publish(msg)
            harness.spin_until(lambda i=i: time.monotonic() >= start + (i + 1) / 30, 1.0)
        harness.spin_until(lambda: harness.counter('frames_received') >= before + frames, 5.0)
        received = harness.counter('frames_received') - before
        print(f'{size[1]}x{size[0]} {reliability.name}: {received} of {frames} frames received')
        counters = {k: v for k, v in harness.values().items() if 'frame' in k}
        # The node keeps only the newest frame: while its worker runs the model on a 2-core
        # machine, the camera callback may see a frame replaced by the next one in the
        # subscription's queue (KEEP_LAST 5), which is not a transport loss. What the
        # profile fixes is the loss in transport: without it none of these frames arrive.
        assert harness.counter('frames_lost_in_transport') == 0, counters
        assert received >= frames / 4, counters
        assert harness.spin_until(lambda: stamps[-1] in harness.hypotheses, 10.0)
        best = hypotheses_from_cloud(harness.hypotheses[stamps[-1]])[0]
        assert best.place_id == (frames - 1) % PLACES
    finally:
        harness.node.destroy_publisher(camera)


def test_a_map_overwritten_in_place_is_still_served_and_its_reload_refused(
    served: dict, default_model
) -> None:
    """``cp`` over a live map once truncated the memory-mapped local features: SIGBUS, no
    log. Now the rewritten file's places are unusable and reported; the node goes on."""
    harness: Harness = served['harness']
    map_dir = served['root'] / 'map'
    generation = current_generation(map_dir)
    other = build_map(default_model, id_offset=100)
    extra = other.places[:2].copy()
    extra['place_id'] = [108, 109]
    # 10 places: other file sizes than the served map's
    other.add(other.global_descriptors[:2], extra, other.local_features[:2], strings=other.strings)
    other.save(served['root'] / 'other')
    other_files = current_generation(served['root'] / 'other')
    served_local = column_files(map_dir, 'local')[0]
    shutil.copyfile(column_files(served['root'] / 'other', 'local')[0], served_local)
    for place in (2, 5):
        stamp = next_stamp()
        cloud = harness.ask(harness.raw, raw_msg(query_image(place), stamp))
        assert all(h.place_id != place for h in hypotheses_from_cloud(cloud))  # unusable now
    assert served['process'].poll() is None
    response = harness.call(harness.reload, Trigger.Request())
    assert not response.success
    assert (
        'kept the current map' in response.message
        and 'truncated or overwritten' in response.message
    )
    assert harness.spin_until(lambda: 'map reload failed' in harness.values()['last_error'], 5)
    for file in other_files.iterdir():  # the rest of the copy: now a whole map again
        shutil.copyfile(file, generation / file.name)
    response = harness.call(harness.reload, Trigger.Request())
    assert response.success and '10 places' in response.message, response.message
    assert harness.spin_until(lambda: harness.values().get('last_error') == '', 5)
    stamp = next_stamp()
    cloud = harness.ask(harness.raw, raw_msg(query_image(3), stamp))
    assert hypotheses_from_cloud(cloud)[0].place_id == 103
    with pytest.raises(DatabaseError, match='changed or was damaged after it was read'):
        served['a'].save(map_dir)  # its files were overwritten: never link them again
    served['a'] = build_map(default_model)
    served['a'].save(map_dir)
    assert harness.call(harness.reload, Trigger.Request()).success


def test_the_diagnostics_level_returns_to_ok_once_skipped_frames_age_out(served: dict) -> None:
    harness: Harness = served['harness']
    bad = raw_msg(query_image(1), next_stamp())
    bad.encoding = 'bayer_rggb8'
    before = harness.counter('frames_skipped')
    harness.compressed.publish(compressed_msg(query_image(1), next_stamp()))  # keep it lively
    harness.raw.publish(bad)
    assert harness.spin_until(lambda: harness.counter('frames_skipped') > before, 10)
    assert harness.spin_until(lambda: harness.status.level == DiagnosticStatus.WARN, 5)
    assert 'skipped frames recently' in harness.status.message
    deadline = time.monotonic() + 15
    while harness.status.level != DiagnosticStatus.OK and time.monotonic() < deadline:
        harness.ask(harness.raw, raw_msg(query_image(2), next_stamp()))
        harness.spin_for(0.3)
    assert harness.status.level == DiagnosticStatus.OK, harness.status.message
    assert harness.status.message == 'relocalizing'
    assert harness.counter('frames_skipped') > before  # the total still counts it


def test_an_image_over_the_pixel_cap_is_skipped_before_decoding(served: dict) -> None:
    harness: Harness = served['harness']
    before = harness.counter('frames_skipped')
    bomb = compressed_msg(query_image(0), next_stamp(), 'png')
    bomb.data = png_bomb(8000, 6000)
    started = time.monotonic()
    harness.compressed.publish(bomb)
    assert harness.spin_until(lambda: harness.counter('frames_skipped') > before, 10)
    assert time.monotonic() - started < 3  # decoding 48 MP took seconds
    assert 'image too large' in harness.values()['skipped_reasons']
    assert '8000x6000' in harness.values()['last_error']
    stamp = next_stamp()
    cloud = harness.ask(harness.raw, raw_msg(query_image(4), stamp))
    assert hypotheses_from_cloud(cloud)[0].place_id == 4


@contextlib.contextmanager
def node_in_this_process(params: dict) -> Iterator[Harness]:
    """A relocalize node spun in this process (its own domain), with a test harness whose
    node it waits to see."""
    domain = int(ros_environment()['ROS_DOMAIN_ID'])
    harness = Harness(domain)
    harness.domain_id = domain
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
        assert harness.spin_until(lambda: harness.status is not None, 30)
        yield harness
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)
        harness.close()


def set_parameters(harness: Harness, **values: object) -> list:
    client = harness.node.create_client(SetParameters, 'relocalize/set_parameters')
    try:
        assert client.wait_for_service(timeout_sec=10)
        request = SetParameters.Request(
            parameters=[
                ParameterMsg(name=k, value=Parameter(k, value=v).get_parameter_value())
                for k, v in values.items()
            ]
        )
        return list(harness.call(client, request).results)
    finally:
        harness.node.destroy_client(client)


def test_run_time_parameter_changes_are_checked_by_the_table_and_applied(served: dict) -> None:
    harness: Harness = served['harness']
    (result,) = set_parameters(harness, rerank_k=9)
    assert not result.successful and 'rerank_k must be in 0..top_k (5)' in result.reason
    (result,) = set_parameters(harness, top_k=0)
    assert not result.successful
    (result,) = set_parameters(harness, min_similarity=math.nan)
    assert not result.successful  # fixed at start-up, and NaN besides
    (result,) = set_parameters(harness, top_k=3, rerank_k=2)[-1:]
    assert result.successful, result.reason
    try:
        stamp = next_stamp()
        cloud = harness.ask(harness.raw, raw_msg(query_image(6), stamp))
        hypotheses = hypotheses_from_cloud(cloud)
        assert len(hypotheses) == 2 and hypotheses[0].place_id == 6
    finally:
        assert all(r.successful for r in set_parameters(harness, top_k=5, rerank_k=4))


@pytest.mark.parametrize(
    ('name', 'value', 'expected'),
    [
        ('pose_covariance', [1.0, 1.0, math.nan, 0.1, 0.1, 0.1], 'pose_covariance must be'),
        ('min_similarity', math.nan, 'min_similarity must be in'),
        ('competitor_radius_m', math.nan, 'competitor_radius_m must be >= 0'),
        ('diagnostics_period_s', 1e-9, 'diagnostics_period_s must be >= 0.05'),
    ],
)
def test_a_node_refuses_to_start_on_nan_or_flooding_parameters(
    tmp_path: Path, name: str, value: object, expected: str
) -> None:
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=int(ros_environment()['ROS_DOMAIN_ID']))
    try:
        overrides = [Parameter('map_dir', value=str(tmp_path)), Parameter(name, value=value)]
        with pytest.raises(ConfigError, match=expected):
            RelocalizeNode(context=context, parameter_overrides=overrides)
    finally:
        rclpy.shutdown(context=context)


def test_the_node_process_exits_1_with_one_line_on_a_flooding_period(tmp_path: Path) -> None:
    log = tmp_path / 'node.log'
    process = start_node(
        {'map_dir': str(tmp_path), 'diagnostics_period_s': 1e-9}, ros_environment(), log
    )
    assert process.wait(timeout=60) == 1
    output = log.read_text()
    assert 'cannot start: diagnostics_period_s must be >= 0.05' in output, output
    assert 'Traceback' not in output


UNTUNED_CAMERA = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import rclpy
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image
    rclpy.init()
    node = rclpy.create_node('untuned_camera')
    publisher = node.create_publisher(Image, sys.argv[1], qos_profile_sensor_data)
    msg = Image(height=720, width=1280, encoding='rgb8', step=3 * 1280)
    msg.data = np.random.default_rng(0).integers(0, 255, 720 * 1280 * 3, np.uint8).tobytes()
    print('publishing', flush=True)
    while True:
        publisher.publish(msg)
        time.sleep(1 / 30)
    """
)


def test_a_camera_whose_frames_never_arrive_gets_a_warning_naming_the_cause(
    tmp_path: Path, default_model
) -> None:
    """A camera driver without the profile publishing large raw frames best effort."""
    build_map(default_model).save(tmp_path / 'map')
    params = {**PARAMS, 'map_dir': str(tmp_path / 'map'), 'camera_topics': ['cam/untuned']}
    params['camera_transports'] = ['raw']
    with node_in_this_process(params) as harness:
        env = {k: v for k, v in ros_environment().items() if k != PROFILE_ENV}
        env['ROS_DOMAIN_ID'] = str(harness.domain_id)
        camera = subprocess.Popen(
            [sys.executable, '-c', UNTUNED_CAMERA, 'cam/untuned'], env=env, stdout=subprocess.PIPE
        )
        try:
            assert camera.stdout is not None and camera.stdout.readline() == b'publishing\n'
            assert harness.spin_until(
                lambda: harness.status is not None and PROFILE_ENV in harness.status.message, 20
            ), harness.status
            assert harness.status.level == DiagnosticStatus.WARN
            assert 'has publishers but its frames do not arrive' in harness.status.message
            values = harness.values()
            lost, received = (
                int(values['frames_lost_in_transport']),
                int(values['frames_received']),
            )
            assert lost > 2 * received, values
        finally:
            camera.kill()
            camera.wait()


def test_a_camera_whose_qos_does_not_match_gets_a_warning(tmp_path: Path, default_model) -> None:
    build_map(default_model).save(tmp_path / 'map')
    params = {**PARAMS, 'map_dir': str(tmp_path / 'map'), 'camera_qos': 'reliable'}
    params.update(camera_topics=['cam/best_effort'], camera_transports=['raw'])
    with node_in_this_process(params) as harness:
        harness.node.create_publisher(Image, 'cam/best_effort', qos_profile_sensor_data)
        assert harness.spin_until(
            lambda: harness.status is not None and 'QoS does not match' in harness.status.message,
            10,
        ), harness.status
        assert "camera_qos 'reliable'" in harness.status.message


def test_rss_stays_flat_when_frames_keep_coming(served: dict) -> None:
    """No growth from frames or reloads (the soak benchmark runs this for 10 minutes)."""
    from test_relocalize_node import rss_mb

    harness: Harness = served['harness']
    process = served['process']
    for place in range(PLACES):
        harness.ask(harness.raw, raw_msg(query_image(place, (480, 640)), next_stamp()))
    before = rss_mb(process.pid)
    for _ in range(3):
        assert harness.call(harness.reload, Trigger.Request()).success
        for place in range(PLACES):
            harness.ask(harness.raw, raw_msg(query_image(place, (480, 640)), next_stamp()))
    after = rss_mb(process.pid)
    assert after - before < 40, (before, after)
    assert os.path.exists(f'/proc/{process.pid}')
    assert stamp_ns is not None


def test_a_map_builder_node_holds_its_maps_writer_lock_until_it_stops(tmp_path: Path) -> None:
    """Without it, a build_map into the live map was overwritten by the node's last save."""
    from conftest import make_frames

    from vpr_ros.bagwriter import write_bag
    from vpr_ros.database import LOCK_FILE
    from vpr_ros.nodes.map_builder_node import MapBuilderNode

    map_dir = tmp_path / 'live'
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=int(ros_environment()['ROS_DOMAIN_ID']))
    try:
        node = MapBuilderNode(
            context=context, parameter_overrides=[Parameter('map_dir', value=str(map_dir))]
        )
        try:
            assert (map_dir / LOCK_FILE).read_text().strip() == str(os.getpid())
            bag = write_bag(tmp_path / 'bag', make_frames(3))
            command = [sys.executable, '-m', 'vpr_ros.cli.build_map', '--bag', str(bag)]
            command += ['--image-topic', '/camera/image_raw', '--pose-topic', '/odom']
            command += ['--out', str(map_dir), '--no-progress']
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
            assert result.returncode == 1
            assert f'is being written by PID {os.getpid()}' in result.stderr, result.stderr
        finally:
            node.destroy_node()
    finally:
        rclpy.shutdown(context=context)
    assert not map_dir.exists()  # nothing was saved: the lock's directory is gone again
