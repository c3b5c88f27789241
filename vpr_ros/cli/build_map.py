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
from vpr_ros.config import add_arguments, conf_from_args
from vpr_ros.database import check_map_target, map_lock
from vpr_ros.extraction import AUTO, BACKENDS
from vpr_ros.mapping import BuildConf
from vpr_ros.models import DEFAULT_MODEL, available_models, check_model_source


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
        '--backend',
        default=AUTO,
        choices=BACKENDS,
        help="how the model runs: 'auto' takes ONNX Runtime when an export of the model "
        'exists (export_onnx), else torch',
    )
    parser.add_argument(
        '--append',
        action='store_true',
        help='add the bags to an existing map at --out (same model) instead of replacing it',
    )
    add_arguments(
        parser,
        BuildConf,
        flags={
            'index.type': '--index',
            'local_features': '--local-features',
            'sequence_descriptors': '--sequence-descriptors',
        },
    )
    parser.add_argument(
        '--lock-timeout-s',
        type=float,
        default=0.0,
        help='wait this long for another build_map or map_builder writing the same map '
        '(0: fail at once with its PID)',
    )
    parser.add_argument(
        '--threads', type=int, default=None, help='CPU threads of the model and BLAS'
    )
    parser.add_argument(
        '--workers',
        type=int,
        default=1,
        help='build the bags in parallel on a local Ray instance with this many workers '
        '(one shard map per bag, merged; 1: in this process)',
    )
    parser.add_argument(
        '--ray-address',
        default=None,
        help="build on a running Ray cluster ('auto', 'ray://host:10001'); the --out "
        'directory must be on a file system the cluster nodes share',
    )
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()

    def body() -> int:
        args = parse_with_params_file(parser, argv, 'build_map')
        conf = conf_from_args(BuildConf, args)
        logger.info('build_map conf: %s', conf.to_dict())
        # Everything that can be refused is checked before the slow part: where the map
        # goes, the model name, the bags and topics; then the map's writer lock is held
        # from the model load to the save.
        check_map_target(args.out, what='--out')
        check_model_source(args.model)
        from vpr_ros.bagio import check_bags

        check_bags(args.bags, args.image_topic, args.pose_topic)
        from vpr_ros.extraction import open_extractor
        from vpr_ros.mapping import build_map

        if args.workers > 1 or args.ray_address:
            from vpr_ros.distributed import build_map_ray

            summary = build_map_ray(
                args.model,
                args.bags,
                args.image_topic,
                args.pose_topic,
                args.out,
                conf=conf,
                append=args.append,
                workers=args.workers,
                ray_address=args.ray_address,
                threads_per_worker=args.threads or 1,
                lock_timeout_s=args.lock_timeout_s,
            )
            print(summary.report())
            print(f'map written to {args.out}')
            return 0
        with map_lock(args.out, timeout_s=args.lock_timeout_s):
            model = open_extractor(
                args.model,
                backend=args.backend,
                batch_size=conf.batch_size,
                num_threads=args.threads,
            )
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
        print(f'model:              {model.name} on {model.backend}')
        print(f'map written to {args.out}')
        return 0

    return run_cli(body, argv)


if __name__ == '__main__':
    raise SystemExit(main())
