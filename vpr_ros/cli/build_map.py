"""build_map: read rosbags (camera + pose topics), pick keyframes, write a place database.

Example::

    build_map --bag run1/ --bag run2.mcap --image-topic /camera/image_raw \\
        --pose-topic /odom --out maps/office
    build_map --params config/build_map.yaml --bag run3/ --out maps/office --append
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from vpr_ros import logger
from vpr_ros.cli.common import parse_with_params_file, run_cli
from vpr_ros.mapping import DEFAULT_BUILD_CONF, build_map
from vpr_ros.models import DEFAULT_MODEL, available_models, load_model
from vpr_ros.retrieval import INDEX_TYPES


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='build_map',
        description=(
            'Build a place database (map) for relocalization from rosbags (rosbag2 sqlite3 or '
            'mcap, or ROS 1 .bag). Each bag is one traverse; every image gets the pose '
            'interpolated at its stamp, keyframes are picked by travelled distance, rotation '
            'and time, and their descriptors are written to MAP_DIR atomically.'
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        '--params', type=Path, help='YAML file with any of these options (flags override it)'
    )
    parser.add_argument(
        '--bag',
        dest='bags',
        action='append',
        type=Path,
        required=True,
        help='bag to read (repeat for several traverses)',
    )
    parser.add_argument(
        '--image-topic',
        required=True,
        help='sensor_msgs/Image or sensor_msgs/CompressedImage topic',
    )
    parser.add_argument(
        '--pose-topic',
        help='nav_msgs/Odometry, geometry_msgs/PoseStamped, PoseWithCovarianceStamped or '
        'sensor_msgs/NavSatFix topic (NavSatFix becomes local ENU metres); omit for a map '
        'without poses',
    )
    parser.add_argument('--out', type=Path, required=True, help='map directory to write')
    parser.add_argument(
        '--model',
        default=DEFAULT_MODEL,
        help=f'model name {available_models()} or a path to an exported model',
    )
    parser.add_argument(
        '--append',
        action='store_true',
        help='add the bags to an existing map at --out (same model) instead of replacing it',
    )
    kf = DEFAULT_BUILD_CONF['keyframes']
    parser.add_argument(
        '--min-distance-m',
        type=float,
        default=kf['min_distance_m'],
        help='new keyframe after travelling this far (metres)',
    )
    parser.add_argument(
        '--min-rotation-deg',
        type=float,
        default=kf['min_rotation_deg'],
        help='new keyframe after turning this much (degrees)',
    )
    parser.add_argument(
        '--max-interval-s',
        type=float,
        default=kf['max_interval_s'],
        help='new keyframe after this many seconds regardless of motion (default: off)',
    )
    parser.add_argument(
        '--max-pose-gap-s',
        type=float,
        default=DEFAULT_BUILD_CONF['max_pose_gap_s'],
        help='skip images whose bracketing poses are further apart than this (seconds)',
    )
    parser.add_argument(
        '--index',
        choices=INDEX_TYPES,
        default='flat',
        help='faiss index: exact inner product, or approximate HNSW / IVF-PQ for large maps',
    )
    parser.add_argument(
        '--no-local-features',
        action='store_true',
        help='do not store local features (smaller map, no re-ranking)',
    )
    parser.add_argument(
        '--no-sequence-descriptors',
        action='store_true',
        help='do not store patch-normalised pixels per place (about 4 KB a place; sequence '
        'matching then needs its global-descriptor variant)',
    )
    parser.add_argument('--batch-size', type=int, default=DEFAULT_BUILD_CONF['batch_size'])
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()

    def body() -> int:
        args = parse_with_params_file(parser, argv, 'build_map')
        conf = {
            'keyframes': {
                'min_distance_m': args.min_distance_m,
                'min_rotation_deg': args.min_rotation_deg,
                'max_interval_s': args.max_interval_s,
            },
            'max_pose_gap_s': args.max_pose_gap_s,
            'batch_size': args.batch_size,
            'store_local_features': not args.no_local_features,
            'sequence_descriptors': (
                None
                if args.no_sequence_descriptors
                else DEFAULT_BUILD_CONF['sequence_descriptors']
            ),
            'index': {'type': args.index},
        }
        logger.info('build_map conf: %s', conf)
        model = load_model(args.model)
        summary = build_map(
            model,
            args.bags,
            args.image_topic,
            args.pose_topic,
            args.out,
            conf=conf,
            append=args.append,
            num_threads=args.threads,
            progress=not args.no_progress,
        )
        print(summary.report())
        print(f'map written to {args.out}')
        return 0

    return run_cli(body, argv)


if __name__ == '__main__':
    raise SystemExit(main())
