"""Helpers shared by the command-line tools: YAML parameter files, ROS args, exit codes."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from vpr_ros import logger
from vpr_ros.errors import ConfigError, VprError
from vpr_ros.extraction import tune_malloc


def strip_ros_args(argv: Sequence[str]) -> list[str]:
    """Drop ``--ros-args ... [--]`` that ``ros2 run`` may append."""
    out, skipping = [], False
    for arg in argv:
        if arg == '--ros-args':
            skipping = True
        elif skipping and arg == '--':
            skipping = False
        elif not skipping:
            out.append(arg)
    return out


def read_params_file(path: Path, section: str) -> dict:
    """Options from a YAML file: a plain mapping, or ROS style ``section: ros__parameters:``.

    Keys use the long option names with ``_`` or ``-`` (``image_topic`` = ``--image-topic``).
    """
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f'cannot read parameters file {str(path)!r}: {err}') from err
    if section in data and isinstance(data[section], dict):
        data = data[section]
    if 'ros__parameters' in data:
        data = data['ros__parameters']
    if not isinstance(data, dict):
        raise ConfigError(f'parameters file {str(path)!r} must hold a mapping of options')
    return {str(k).replace('-', '_'): v for k, v in data.items()}


def parse_with_params_file(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, section: str
) -> argparse.Namespace:
    """Parse ``argv``; values from ``--params FILE`` are defaults that flags override."""
    argv = strip_ros_args(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('--params', type=Path)
    known, _ = pre.parse_known_args(argv)
    if known.params is not None:
        values = read_params_file(known.params, section)
        dests = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - dests)
        if unknown:
            msg = f'unknown options {unknown!r} in {str(known.params)!r}; see --help'
            raise ConfigError(msg)
        parser.set_defaults(**values)
        # Required options given by the file are no longer required on the command line.
        for action in parser._actions:
            if action.dest in values:
                action.required = False
    return parser.parse_args(argv)


def run_cli(body: Callable[[], int], argv: Sequence[str] | None) -> int:
    """Run a command body: log the command line, turn VprError into exit code 1."""
    tune_malloc()  # the commands run a model per image
    shown = sys.argv[1:] if argv is None else list(argv)
    logger.info('command: %s', shlex.join([Path(sys.argv[0]).name, *map(str, shown)]))
    try:
        return body()
    except (VprError, FileNotFoundError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130
