"""ROS parameters from the settings tables of ``vpr_ros.config``.

A node declares one parameter per setting of its ``Conf`` class, with a descriptor that
carries the description (unit, allowed values), the type, the range
(``FloatingPointRange``/``IntegerRange``) and whether it is read-only; it then reads them
back as a validated ``Conf``. The shipped ``config/<node>.yaml`` files are rendered from
the same tables (``python -m vpr_ros.nodes.params`` rewrites them; a test checks them).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    ParameterType,
    SetParametersResult,
)
from rclpy.exceptions import InvalidParameterValueException
from rclpy.node import Node
from rclpy.parameter import Parameter

from vpr_ros.config import Conf, OptionSpec, yaml_lines
from vpr_ros.errors import ConfigError

C = TypeVar('C', bound=Conf)

_TYPES = {
    'bool': ParameterType.PARAMETER_BOOL,
    'int': ParameterType.PARAMETER_INTEGER,
    'float': ParameterType.PARAMETER_DOUBLE,
    'str': ParameterType.PARAMETER_STRING,
    'list[int]': ParameterType.PARAMETER_INTEGER_ARRAY,
    'list[float]': ParameterType.PARAMETER_DOUBLE_ARRAY,
    'list[str]': ParameterType.PARAMETER_STRING_ARRAY,
}
_INT64 = (-(2**63), 2**63 - 1)


def descriptor(spec: OptionSpec) -> ParameterDescriptor:
    """The ``ParameterDescriptor`` of one setting (type, text, range, choices, read-only)."""
    result = ParameterDescriptor(
        name=spec.name,
        type=_TYPES[spec.kind],
        description=spec.describe(),
        read_only=spec.read_only,
    )
    if spec.choices:
        result.additional_constraints = 'one of ' + ', '.join(repr(c) for c in spec.choices)
    if spec.min is not None or spec.max is not None:
        if spec.kind in ('float', 'list[float]'):
            low = -sys.float_info.max if spec.min is None else float(spec.min)
            high = sys.float_info.max if spec.max is None else float(spec.max)
            result.floating_point_range = [
                FloatingPointRange(from_value=low, to_value=high, step=0.0)
            ]
        elif spec.kind in ('int', 'list[int]'):
            low_i = _INT64[0] if spec.min is None else int(spec.min)
            high_i = _INT64[1] if spec.max is None else int(spec.max)
            result.integer_range = [IntegerRange(from_value=low_i, to_value=high_i, step=0)]
    return result


def declare_conf(node: Node, conf_class: type[C]) -> C:
    """Declare every setting of ``conf_class`` as a parameter of ``node``; return the values.

    Raises:
        ConfigError: a value out of its range or one the settings table refuses (with what
            is allowed).
        rclpy.exceptions.ParameterException: a value of the wrong type.
    """
    for spec in conf_class.specs():
        try:
            node.declare_parameter(spec.name, spec.default, descriptor(spec))
        except InvalidParameterValueException as err:  # out of the descriptor's range
            value = re.search(r'value \((.*?)\) for parameter', str(err))
            got = f', got {value.group(1)}' if value else ''
            msg = f'{spec.name} must be {spec.range_text()}{got}'
            raise ConfigError(msg) from err
    return conf_class.from_dict(
        {spec.name: node.get_parameter(spec.name).value for spec in conf_class.specs()}
    )


def validate_changes(
    conf_class: type[C], current: Callable[[], C], apply: Callable[[C], None]
) -> Callable[[list[Parameter]], SetParametersResult]:
    """A set-parameters callback: a change is applied only if the whole new ``Conf`` is
    valid; otherwise it is refused with the reason."""

    def callback(parameters: list[Parameter]) -> SetParametersResult:
        changes = {p.name: p.value for p in parameters if p.name in conf_class.flat_names()}
        if not changes:
            return SetParametersResult(successful=True)
        try:
            new = current().replace(**changes)
        except ConfigError as err:
            return SetParametersResult(successful=False, reason=str(err))
        apply(new)
        return SetParametersResult(successful=True)

    return callback


def render_params_file(node_name: str, header: Sequence[str], conf_class: type[Conf]) -> str:
    """The commented ``config/<node>.yaml`` text of ``conf_class``'s defaults."""
    lines = [f'# {line}' if line else '#' for line in header]
    lines += [f'{node_name}:', '  ros__parameters:']
    lines += list(yaml_lines(conf_class.specs()))
    return '\n'.join(lines) + '\n'


def shipped_params_files() -> dict[str, str]:
    """File name in ``config/`` -> its text, for every node."""
    from vpr_ros.nodes.map_builder_node import PARAMS_HEADER as BUILDER_HEADER
    from vpr_ros.nodes.map_builder_node import MapBuilderNodeConf
    from vpr_ros.nodes.relocalize_node import PARAMS_HEADER as RELOCALIZE_HEADER
    from vpr_ros.nodes.relocalize_node import RelocalizeNodeConf

    return {
        'relocalize.yaml': render_params_file('relocalize', RELOCALIZE_HEADER, RelocalizeNodeConf),
        'map_builder.yaml': render_params_file('map_builder', BUILDER_HEADER, MapBuilderNodeConf),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write the nodes' parameter files (config/*.yaml) from their settings "
        'tables, or check that they are up to date.'
    )
    parser.add_argument('--config-dir', type=Path, default=Path('config'))
    parser.add_argument('--check', action='store_true', help='only check; exit 1 if stale')
    args = parser.parse_args(argv)
    stale = []
    for name, text in shipped_params_files().items():
        path = args.config_dir / name
        if path.exists() and path.read_text() == text:
            continue
        stale.append(name)
        if not args.check:
            path.write_text(text)
            print(f'wrote {path}')
    if args.check and stale:
        print(f'stale: {stale}; run python -m vpr_ros.nodes.params', file=sys.stderr)
        return 1
    return 0


def parameter_value(value: Any) -> Any:
    """A setting's value as rclpy takes it (lists of numbers stay lists)."""
    return list(value) if isinstance(value, tuple) else value


if __name__ == '__main__':
    raise SystemExit(main())
