"""Launch the relocalize node with the package's parameters file.

    ros2 launch vpr_ros relocalize.launch.py map_dir:=/path/to/map camera_topic:=/camera/image_raw

``camera_topic`` is remapped onto the node's camera topic ``image`` (the default of
``camera_topics``); for several cameras or compressed input, pass your own ``params_file``.

Processes of this launch use the package's Fast DDS profile (``config/fastdds.xml``: large
raw frames sent best effort arrive) unless FASTDDS_DEFAULT_PROFILES_FILE is set already.
A camera driver that publishes large raw images best effort needs the profile in ITS
environment too: include it in this launch, or export the variable before starting it.
"""

from __future__ import annotations

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, LogInfo, SetEnvironmentVariable
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

from launch import LaunchDescription

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


def generate_launch_description() -> LaunchDescription:
    params_file = os.path.join(get_package_share_directory('vpr_ros'), 'config', 'relocalize.yaml')
    return LaunchDescription(
        [
            *dds_actions(os.path.dirname(params_file)),
            DeclareLaunchArgument('map_dir', description='Map directory written by build_map.'),
            DeclareLaunchArgument(
                'camera_topic',
                default_value='/camera/image_raw',
                description='Camera topic (sensor_msgs/Image) to relocalize.',
            ),
            DeclareLaunchArgument(
                'params_file',
                default_value=params_file,
                description='Parameters file of the relocalize node.',
            ),
            Node(
                package='vpr_ros',
                executable='relocalize',
                name='relocalize',
                output='screen',
                parameters=[
                    LaunchConfiguration('params_file'),
                    # As a string even if the path looks like a number.
                    {'map_dir': ParameterValue(LaunchConfiguration('map_dir'), value_type=str)},
                ],
                remappings=[('image', LaunchConfiguration('camera_topic'))],
            ),
        ]
    )
