"""verify_map: check every chunk of a map's files against the SHA-256 its manifest lists.

Loading a map checks sizes and npy headers only when started with checksums off (the node
verifies the rest in the background); this command reads every file once, as a cron job
or after copying a map. Exit code 0: sound; 1: damaged (the places it makes unusable are
listed) or not a map. Example::

    verify_map maps/campus
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from vpr_ros.cli.common import run_cli, strip_ros_args


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='verify_map',
        description="Check a map's files against its manifest's chunk checksums.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument('map', type=Path, help='the map directory')
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(strip_ros_args(sys.argv[1:] if argv is None else argv))

    def body() -> int:
        from vpr_ros.database import PlaceDatabase

        started = time.perf_counter()
        database = PlaceDatabase.load(args.map, verify_checksums=False)
        integrity = database.verify()
        bad = database.unusable_places()
        print(
            f'{args.map}: {len(database)} places, {integrity.chunks_checked} chunks checked, '
            f'{integrity.chunks_failed} failed, in {time.perf_counter() - started:.1f} s'
        )
        for failure in integrity.failures:
            print(f'  {failure}')
        if len(bad):
            ids = database.places['place_id'][bad]
            shown = ', '.join(str(int(i)) for i in ids[:20]) + (' ...' if len(ids) > 20 else '')
            print(f'{len(bad)} places unusable (place ids {shown}); rebuild or restore the map')
            return 1
        print('map is sound')
        return 0

    return run_cli(body, argv)


if __name__ == '__main__':
    raise SystemExit(main())
