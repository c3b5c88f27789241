"""What the launch file's camera arguments mean, worked out without ``launch`` (ROS-free, so
it is testable where ``launch`` is not installed).

The node subscribes to the ``camera_topics`` its parameters file names (relative names, by
default ``image``). The launch arguments map them onto real topics:

* ``camera_topic``: the topic of the FIRST camera of the parameters file (whatever the file
  calls it), so a ``params_file`` that sets ``camera_topics`` does not silently defeat it;
* ``camera_remaps``: ``name:=topic`` pairs, comma-separated, for the other cameras (or
  their ``camera_info_topics``).

A remap of a name the node does not subscribe to is an error, not a silent no-op.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from vpr_ros.errors import ConfigError

NODE_NAME = 'relocalize'  # the relocalize node's name (relocalize_node.NODE_NAME; no rclpy here)
DEFAULT_CAMERA_TOPICS = ['image']


def node_parameters(params_file: str | Path, node_name: str = NODE_NAME) -> dict[str, Any]:
    """The ``ros__parameters`` a parameters file gives the node (its own section, under any
    namespace, merged over a ``/**`` wildcard section), flattened to dotted names."""
    path = Path(params_file)
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f'params_file {str(path)!r} cannot be read: {err}') from err
    if not isinstance(content, dict):
        raise ConfigError(f'params_file {str(path)!r} is not a mapping of node names')
    merged: dict[str, Any] = {}
    keys = sorted(content, key=lambda key: str(key) != '/**')  # the wildcard first
    for key in keys:
        name = str(key).rstrip('/').rsplit('/', 1)[-1]
        if key == '/**' or name == node_name:
            section = content[key] or {}
            merged.update(_flatten(section.get('ros__parameters', {}) or {}))
    return merged


def _flatten(values: dict[str, Any], prefix: str = '') -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = value
    return flat


def parse_remaps(text: str) -> list[tuple[str, str]]:
    """``'front:=/cam/front, rear:=/cam/rear'`` -> ``[('front', '/cam/front'), ...]``."""
    pairs = []
    for item in (part.strip() for part in text.split(',')):
        if not item:
            continue
        name, sep, topic = (s.strip() for s in item.partition(':='))
        if not sep or not name or not topic:
            msg = f"camera_remaps entry {item!r} is not 'name:=topic' (e.g. front:=/cam/front)"
            raise ConfigError(msg)
        pairs.append((name, topic))
    return pairs


def camera_remappings(
    params_file: str | Path, camera_topic: str, camera_remaps: str = ''
) -> list[tuple[str, str]]:
    """The node's remappings for the launch arguments (see the module docstring).

    Raises:
        ConfigError: an unreadable ``params_file``, a malformed ``camera_remaps`` entry, or
            a remap of a name the node does not subscribe to (naming what it subscribes to).
    """
    parameters = node_parameters(params_file)
    topics = [str(t) for t in parameters.get('camera_topics', DEFAULT_CAMERA_TOPICS)]
    infos = [str(t) for t in parameters.get('camera_info_topics', []) if t]
    remaps: dict[str, str] = {}
    if camera_topic and topics:
        remaps[topics[0]] = camera_topic
    for name, topic in parse_remaps(camera_remaps):
        if name not in topics and name not in infos:
            msg = (
                f'camera_remaps names {name!r}, but the node subscribes to the cameras '
                f'{topics} (and camera infos {infos}) of params_file {str(params_file)!r}'
            )
            raise ConfigError(msg)
        remaps[name] = topic
    return list(remaps.items())
