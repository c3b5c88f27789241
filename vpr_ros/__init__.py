"""vpr_ros: visual place recognition and relocalization for ROS 2.

The package is layered: everything outside ``vpr_ros.nodes`` is ROS-free (it imports
and runs without rclpy); ``vpr_ros.nodes`` holds thin rclpy nodes over that core.
"""

from __future__ import annotations

import logging

__version__ = '0.1.0'

logger = logging.getLogger('vpr_ros')
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(
        logging.Formatter('[%(asctime)s %(name)s %(levelname)s] %(message)s', '%H:%M:%S')
    )
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

__all__ = ['__version__', 'logger']
