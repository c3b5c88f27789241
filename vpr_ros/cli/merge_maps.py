"""merge_maps: combine maps built by different robots (same model) into one map.

Example::

    merge_maps --out fleet_map robot_a_map robot_b_map --transform 2:12.5,-3,0,90

The first map's frame is the merged map's frame. ``--transform I:x,y,z,yaw_deg`` moves the
poses of the I-th input map (1-based) into it: a rotation of ``yaw_deg`` about z, then the
translation. Places keep their traverse (renumbered so traverses stay distinct), stamp and
source; each traverse records where it came from and when it joined. Stored columns are
hard-linked, not copied, when ``--out`` is on the same file system as the inputs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from vpr_ros.cli.common import run_cli, strip_ros_args
from vpr_ros.errors import ConfigError


def parse_transform(text: str, inputs: int) -> tuple[int, tuple[float, float, float, float]]:
    """``'I:x,y,z,yaw_deg'`` -> (0-based map index, (x, y, z, yaw_deg)).

    Raises:
        ConfigError: malformed, or I names no input map.
    """
    where, _, values = text.partition(':')
    try:
        index = int(where)
        numbers = tuple(float(v) for v in values.split(','))
    except ValueError:
        numbers = ()
        index = 0
    if len(numbers) != 4 or not 1 <= index <= inputs:
        msg = (
            f'--transform {text!r}: expected I:x,y,z,yaw_deg with I the position of an input '
            f'map (1..{inputs}), e.g. 2:12.5,-3,0,90'
        )
        raise ConfigError(msg)
    x, y, z, yaw = numbers
    return index - 1, (x, y, z, yaw)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='merge_maps',
        description='Combine maps built with the same model into one map.',
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument('maps', nargs='+', type=Path, help='input map directories')
    parser.add_argument('--out', type=Path, required=True, help='the merged map directory')
    parser.add_argument(
        '--transform',
        action='append',
        default=[],
        metavar='I:x,y,z,yaw_deg',
        help='move the poses of input map I (1-based) into the first map frame (repeatable)',
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(strip_ros_args(sys.argv[1:] if argv is None else argv))

    def body() -> int:
        transforms = dict(parse_transform(t, len(args.maps)) for t in args.transform)
        from vpr_ros.database import PlaceDatabase, check_map_target
        from vpr_ros.geometry import rigid_transform

        check_map_target(args.out)
        if any(args.out.resolve() == m.resolve() for m in args.maps):
            raise ConfigError(f'--out {str(args.out)!r} is one of the inputs; choose a new map')
        if 0 in transforms:
            msg = '--transform 1:...: the first map defines the frame; move the others'
            raise ConfigError(msg)
        merged = PlaceDatabase.load(args.maps[0])
        for position, path in enumerate(args.maps[1:], start=1):
            other = PlaceDatabase.load(path)
            move = None
            if position in transforms:
                x, y, z, yaw = transforms[position]
                move = rigid_transform((x, y, z), yaw)
            merged.extend(other, transform=move)
        merged.save(args.out)
        traverses = len(merged.traverses) or len(set(merged.places['traverse'].tolist()))
        print(f'merged {len(args.maps)} maps: {len(merged)} places, {traverses} traverses')
        print(f'map written to {args.out}')
        return 0

    return run_cli(body, argv)


if __name__ == '__main__':
    raise SystemExit(main())
