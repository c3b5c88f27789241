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
from vpr_ros.runtime import tune_malloc


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

    Keys are the long option names, with ``_`` or ``-`` (``image_topic`` = ``--image-topic``,
    ``bag`` = ``--bag``).
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
        # Option names ('bag') and argparse destinations ('bags') both name an option.
        by_name = {action.dest: action for action in parser._actions}
        negated = set()  # 'no_progress' of --progress/--no-progress sets progress to False
        for action in parser._actions:
            for option in action.option_strings:
                name = option.lstrip('-').replace('-', '_')
                by_name.setdefault(name, action)
                if isinstance(action, argparse.BooleanOptionalAction) and option.startswith(
                    '--no-'
                ):
                    negated.add(name)
        unknown = sorted(set(values) - set(by_name))
        if unknown:
            msg = f'unknown options {unknown!r} in {str(known.params)!r}; see --help'
            raise ConfigError(msg)
        defaults = {}
        for key, value in values.items():
            action = by_name[key]
            if key in negated:
                if not isinstance(value, bool):
                    msg = f'{key} in {str(known.params)!r} must be true or false, got {value!r}'
                    raise ConfigError(msg)
                value = not value
            if isinstance(action, argparse._AppendAction):
                if any(option in argv for option in action.option_strings):
                    continue  # the command line's list replaces the file's
                items = value if isinstance(value, list) else [value]
                convert = action.type if callable(action.type) else None
                value = [convert(v) if convert else v for v in items]
            defaults[action.dest] = value
            # Required options given by the file are no longer required on the command line.
            action.required = False
        parser.set_defaults(**defaults)
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
