"""vpr_ros.nodes.params: parameters declared from the settings tables, as real nodes show them.

The descriptors are read back the way ``ros2 param describe`` reads them: through a running
node's ``describe_parameters`` service (map_builder) or ``Node.describe_parameter``.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ros_environment

from vpr_ros.errors import ConfigError

rclpy = pytest.importorskip('rclpy')
from rcl_interfaces.msg import ParameterDescriptor, ParameterType  # noqa: E402
from rcl_interfaces.srv import DescribeParameters  # noqa: E402
from rclpy.exceptions import ParameterException  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402

from vpr_ros.nodes.map_builder_node import MapBuilderNode  # noqa: E402
from vpr_ros.nodes.params import declare_conf  # noqa: E402
from vpr_ros.nodes.relocalize_node import RelocalizeNodeConf  # noqa: E402

pytestmark = pytest.mark.ros

FLOAT_MAX = sys.float_info.max
INT64_MAX = 2**63 - 1


@pytest.fixture
def context() -> Iterator[rclpy.Context]:
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=int(ros_environment()['ROS_DOMAIN_ID']))
    try:
        yield context
    finally:
        rclpy.shutdown(context=context)


def describe_over_the_service(
    context: rclpy.Context, node_name: str, names: list[str]
) -> dict[str, ParameterDescriptor]:
    """The descriptors of ``names`` from ``<node_name>/describe_parameters``."""
    client_node = rclpy.create_node('describer', context=context)
    try:
        client = client_node.create_client(DescribeParameters, f'{node_name}/describe_parameters')
        assert client.wait_for_service(timeout_sec=30), 'no describe_parameters service'
        future = client.call_async(DescribeParameters.Request(names=names))
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(client_node)
        executor.spin_until_future_complete(future, timeout_sec=30)
        assert future.done(), 'describe_parameters did not answer'
        return {d.name: d for d in future.result().descriptors}
    finally:
        client_node.destroy_node()


def test_map_builder_describes_ranges_allowed_values_and_read_only_over_its_service(
    context: rclpy.Context, tmp_path: Path
) -> None:
    overrides = [Parameter('map_dir', value=str(tmp_path / 'map'))]
    node = MapBuilderNode(context=context, parameter_overrides=overrides)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        names = ['max_pose_gap_s', 'num_threads', 'pose_type', 'camera_transport', 'map_dir']
        described = describe_over_the_service(context, 'map_builder', names)
    finally:
        executor.shutdown()
        node.destroy_node()

    gap = described['max_pose_gap_s']
    assert gap.type == ParameterType.PARAMETER_DOUBLE
    assert [(r.from_value, r.to_value) for r in gap.floating_point_range] == [(0.0, FLOAT_MAX)]
    assert not gap.integer_range
    assert 'unit: s' in gap.description and 'range > 0' in gap.description
    threads = described['num_threads']
    assert threads.type == ParameterType.PARAMETER_INTEGER
    assert [(r.from_value, r.to_value) for r in threads.integer_range] == [(0, INT64_MAX)]
    pose_type = described['pose_type']
    assert pose_type.type == ParameterType.PARAMETER_STRING
    assert pose_type.additional_constraints == (
        "one of 'odometry', 'pose_stamped', 'pose_cov', 'navsat'"
    )
    assert described['camera_transport'].additional_constraints == "one of 'raw', 'compressed'"
    assert all(d.read_only for d in described.values())


def test_relocalize_parameters_carry_their_ranges_and_choices(context: rclpy.Context) -> None:
    node = rclpy.create_node('relocalize_table', context=context)
    try:
        conf = declare_conf(node, RelocalizeNodeConf)
        assert conf == RelocalizeNodeConf()
        threshold = node.describe_parameter('confidence_threshold')
        assert [(r.from_value, r.to_value) for r in threshold.floating_point_range] == [(0.0, 1.0)]
        top_k = node.describe_parameter('top_k')
        assert top_k.integer_range[0].from_value == 1
        covariance = node.describe_parameter('pose_covariance')
        assert covariance.type == ParameterType.PARAMETER_DOUBLE_ARRAY
        assert covariance.floating_point_range[0].from_value == 0.0
        transports = node.describe_parameter('camera_transports')
        assert transports.additional_constraints == "one of 'raw', 'compressed'"
        assert transports.read_only
        assert not node.describe_parameter('map_dir').read_only  # ~/reload_map reads it anew
    finally:
        node.destroy_node()


@pytest.mark.parametrize(
    ('name', 'value', 'error', 'expected'),
    [
        ('confidence_threshold', 1.5, ConfigError, 'must be in [0, 1], got 1.5'),
        ('top_k', 0, ConfigError, 'top_k must be >= 1, got 0'),
        ('pose_covariance', [1.0, -1.0, 1.0, 0.1, 0.1, 0.1], ConfigError, 'must be >= 0'),
        ('camera_qos', 'fast', ConfigError, "must be one of ['sensor_data', 'reliable']"),
        ('max_rate_hz', 10, ParameterException, "expecting type 'DOUBLE'"),
    ],
)
def test_an_override_the_table_refuses_fails_the_declaration(
    context: rclpy.Context, name: str, value: object, error: type, expected: str
) -> None:
    node = rclpy.create_node(
        'relocalize_table', context=context, parameter_overrides=[Parameter(name, value=value)]
    )
    try:
        with pytest.raises(error) as raised:
            declare_conf(node, RelocalizeNodeConf)
        assert expected in str(raised.value)
    finally:
        node.destroy_node()


@pytest.mark.parametrize(
    ('module', 'override', 'expected'),
    [
        ('map_builder_node', 'max_pose_gap_s:=-1.0', 'max_pose_gap_s must be > 0, got -1.0'),
        ('map_builder_node', 'max_pose_gap_s:=0.0', 'max_pose_gap_s must be > 0, got 0.0'),
        ('map_builder_node', 'queue_size:=0', 'queue_size must be >= 1, got 0'),
        ('relocalize_node', 'confidence_threshold:=2.0', 'confidence_threshold must be in [0, 1]'),
    ],
)
def test_an_out_of_range_override_stops_the_node_at_start_up_with_a_clear_error(
    module: str, override: str, expected: str, tmp_path: Path
) -> None:
    command = [sys.executable, '-m', f'vpr_ros.nodes.{module}', '--ros-args']
    command += ['-p', f'map_dir:={tmp_path / "map"}', '-p', override]
    result = subprocess.run(
        command, env=ros_environment(), capture_output=True, text=True, timeout=120
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f'cannot start: {expected}' in output
    assert 'Traceback' not in output
