"""Launch the relocalize node with the package's parameters file.

    ros2 launch vpr_ros relocalize.launch.py map_dir:=/path/to/map camera_topic:=/camera/image_raw

Arguments:

* ``map_dir`` (required), ``params_file`` (default: the shipped ``config/relocalize.yaml``);
* ``namespace`` (the node's and its relative topics': ``/<ns>/relocalize/pose``, ...),
  ``use_sim_time`` (bag or simulator time), ``log_level`` (debug, info, warn, error);
* ``camera_topic``: the topic of the node's FIRST camera, whatever ``params_file`` calls it
  (default name ``image``); ``camera_remaps``: ``name:=topic`` pairs, comma-separated, for
  further cameras of a ``params_file`` that lists several (or their camera info topics).
  The launch logs every camera remap it applies, and refuses one the node cannot use;
* ``rviz`` (default false): start RViz with ``config/relocalize.rviz`` (hypotheses, pose and
  the map's places).

Composable: include it from another launch file with ``IncludeLaunchDescription`` and these
arguments; it sets no global state except the DDS profile below.

Processes of this launch use the package's Fast DDS profile (``config/fastdds.xml``: large
raw frames sent best effort arrive) unless FASTDDS_DEFAULT_PROFILES_FILE is set already.
A camera driver that publishes large raw images best effort needs the profile in ITS
environment too: include it in this launch, or export the variable before starting it.
"""

from __future__ import annotations

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, LogInfo, OpaqueFunction, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

from launch import LaunchContext, LaunchDescription
from vpr_ros.nodes.launch_args import camera_remappings

PROFILE_ENV = 'FASTDDS_DEFAULT_PROFILES_FILE'


def dds_actions(config_dir: str) -> list:
    """Use the shipped Fast DDS profile unless the user set one (and say which is used)."""
    if os.environ.get(PROFILE_ENV):
        return [LogInfo(msg=f'{PROFILE_ENV}={os.environ[PROFILE_ENV]} (yours, kept)')]
    profile = os.path.join(config_dir, 'fastdds.xml')
    return [
        SetEnvironmentVariable(PROFILE_ENV, profile),
        LogInfo(msg=f'{PROFILE_ENV}={profile} (large best-effort frames)'),
    ]


def relocalize_node(context: LaunchContext) -> list:
    """The node, with the camera remaps worked out from the parameters file it gets."""
    remappings = camera_remappings(
        LaunchConfiguration('params_file').perform(context),
        LaunchConfiguration('camera_topic').perform(context),
        LaunchConfiguration('camera_remaps').perform(context),
    )
    said = ', '.join(f'{name} -> {topic}' for name, topic in remappings) or 'none'
    return [
        LogInfo(msg=f'relocalize camera remaps: {said}'),
        Node(
            package='vpr_ros',
            executable='relocalize',
            name='relocalize',
            namespace=LaunchConfiguration('namespace'),
            output='screen',
            parameters=[
                LaunchConfiguration('params_file'),
                {
                    # As a string even if the path looks like a number.
                    'map_dir': ParameterValue(LaunchConfiguration('map_dir'), value_type=str),
                    'use_sim_time': ParameterValue(
                        LaunchConfiguration('use_sim_time'), value_type=bool
                    ),
                },
            ],
            remappings=remappings,
            arguments=['--ros-args', '--log-level', LaunchConfiguration('log_level')],
        ),
    ]


def generate_launch_description() -> LaunchDescription:
    share = get_package_share_directory('vpr_ros')
    params_file = os.path.join(share, 'config', 'relocalize.yaml')
    rviz_config = os.path.join(share, 'config', 'relocalize.rviz')
    return LaunchDescription(
        [
            *dds_actions(os.path.dirname(params_file)),
            DeclareLaunchArgument('map_dir', description='Map directory written by build_map.'),
            DeclareLaunchArgument(
                'params_file',
                default_value=params_file,
                description='Parameters file of the relocalize node.',
            ),
            DeclareLaunchArgument(
                'namespace', default_value='', description='Namespace of the node.'
            ),
            DeclareLaunchArgument(
                'use_sim_time',
                default_value='false',
                description='Use /clock (bag playback or a simulator).',
            ),
            DeclareLaunchArgument(
                'log_level',
                default_value='info',
                description='Log level of the node: debug, info, warn or error.',
            ),
            DeclareLaunchArgument(
                'camera_topic',
                default_value='/camera/image_raw',
                description="Topic of the node's first camera (as params_file names it).",
            ),
            DeclareLaunchArgument(
                'camera_remaps',
                default_value='',
                description='Further camera remaps, name:=topic pairs, comma-separated.',
            ),
            DeclareLaunchArgument(
                'rviz', default_value='false', description='Start RViz with the shipped config.'
            ),
            OpaqueFunction(function=relocalize_node),
            Node(
                package='rviz2',
                executable='rviz2',
                name='rviz2',
                namespace=LaunchConfiguration('namespace'),
                arguments=['-d', rviz_config],
                parameters=[
                    {
                        'use_sim_time': ParameterValue(
                            LaunchConfiguration('use_sim_time'), value_type=bool
                        )
                    }
                ],
                condition=IfCondition(LaunchConfiguration('rviz')),
            ),
        ]
    )
