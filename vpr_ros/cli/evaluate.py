"""evaluate: score place recognition on query images with ground truth.

Runs the shipped relocalization pipeline (retrieval, then MNN re-ranking) against a map or
a folder of reference images and reports Recall@1/5/10/20 with and without re-ranking,
recall at 100 % precision of the top-1 answer, and per-query latency.

Examples::

    evaluate --db-images nordland64/summer --queries nordland64/winter --gt aligned \\
        --tolerance 2 --out /tmp/eval_nordland
    evaluate --db-images gardens_sfu_places/pairs --db-glob '*/i0/*' \\
        --queries gardens_sfu_places/pairs --query-glob '*/i1/*' --gt folder
    evaluate --db-images pitts/database --queries pitts/queries --gt utm --radius-m 25
    evaluate --map maps/campus --queries campus_queries --gt utm
    evaluate --db-images db --queries q --gt vprbench:ground_truth.npz
    evaluate --db-images nordland64/summer --queries nordland64/winter --gt aligned \\
        --mode both --sequence-length 20
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from vpr_ros import logger
from vpr_ros.cli.common import parse_with_params_file, run_cli
from vpr_ros.database import PlaceDatabase
from vpr_ros.errors import ConfigError
from vpr_ros.evaluation import evaluate, evaluate_sequence, evenly_spaced, sequence_descriptors
from vpr_ros.ground_truth import (
    DEFAULT_RADIUS_M,
    DEFAULT_TOLERANCE,
    positives_frame_aligned,
    positives_from_utm,
    positives_from_vprbench,
    positives_same_folder,
    positives_within_radius,
    require_a_positive,
)
from vpr_ros.imagefolders import list_images, parse_utm, relative_names
from vpr_ros.models import CONFS, DEFAULT_MODEL, available_models, load_model
from vpr_ros.relocalization import RelocalizationConf
from vpr_ros.results import EvaluationResult, MethodResult, write_results
from vpr_ros.sequence import SequenceConf

GT_MODES = ('utm', 'vprbench:FILE', 'aligned', 'folder')
MODES = ('single', 'sequence', 'both')
# --gt utm with --map: map poses farther than this from every query are in another frame.
FRAME_CHECK_M = 10_000.0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='evaluate',
        description=(
            'Evaluate place recognition: match query images against a map or a folder of '
            'reference images with the shipped pipeline and report Recall@N with and without '
            're-ranking, recall at 100 % precision and per-query latency. Images are ordered by '
            'name with numbers by value (2 before 10). Queries without a positive in the '
            'reference are still matched but left out of Recall@N; in the precision-recall '
            'curve an accepted answer to one is wrong.'
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        '--params', type=Path, help='YAML file with any of these options (flags override it)'
    )
    reference = parser.add_mutually_exclusive_group(required=True)
    reference.add_argument(
        '--map',
        type=Path,
        metavar='MAP_DIR',
        help='map directory written by build_map (ground truth: utm/vprbench)',
    )
    reference.add_argument(
        '--db-images',
        type=Path,
        metavar='DIR',
        help='folder of reference images (one place per image; extracted in memory)',
    )
    parser.add_argument(
        '--queries', type=Path, required=True, metavar='DIR', help='folder of query images'
    )
    parser.add_argument(
        '--db-glob',
        default='**/*',
        help='glob pattern, relative to --db-images, selecting the reference images',
    )
    parser.add_argument(
        '--query-glob',
        default='**/*',
        help='glob pattern, relative to --queries, selecting the query images',
    )
    parser.add_argument(
        '--gt',
        required=True,
        metavar='{utm,vprbench:FILE,aligned,folder}',
        help=(
            'ground truth. utm: "@east@north@" in the file names (metres), positives within '
            '--radius-m (with --map: against the map poses, x = east, y = north). '
            'vprbench:FILE: a pickle-free VPR-Bench style .npy/.npz (bool (Q, N) matrix, '
            '(Q, 2) inclusive index ranges, or query_index + db_index pairs; indices follow '
            'the sorted file lists or the map order). aligned: frame-aligned traverses, the '
            'reference with the same relative file name +- --tolerance frames. folder: same '
            'first --folder-depth folders below --db-images/--queries = same place'
        ),
    )
    parser.add_argument(
        '--radius-m',
        type=float,
        default=DEFAULT_RADIUS_M,
        help='utm: a reference within this distance of the query is a positive (metres)',
    )
    parser.add_argument(
        '--tolerance',
        type=int,
        default=DEFAULT_TOLERANCE,
        help='aligned: positives are the same-name reference +- this many frames (frames)',
    )
    parser.add_argument(
        '--folder-depth',
        type=int,
        default=1,
        help='folder: how many leading folders name the place (e.g. 1 for pK/i0/x.jpg)',
    )
    parser.add_argument(
        '--model',
        default=DEFAULT_MODEL,
        help=f'model name {available_models()} or a path to an exported model',
    )
    parser.add_argument(
        '--image-size',
        type=int,
        nargs=2,
        metavar=('H', 'W'),
        help='override the model input size (pixels; registry models only; None: the '
        "model's own); a --map must have been built with the same size",
    )
    parser.add_argument(
        '--top-k',
        type=int,
        default=RelocalizationConf().top_k,
        help='candidates retrieved per query by global descriptor (Recall@N needs N <= this)',
    )
    parser.add_argument(
        '--rerank-k',
        type=int,
        default=RelocalizationConf().rerank_k,
        help='of those, how many are re-ranked by local features (0: retrieval only)',
    )
    parser.add_argument(
        '--mode',
        choices=MODES,
        default='single',
        help='single: single-frame retrieval and re-ranking; sequence: sequence matching '
        'over every query in name order (vpr_ros.sequence); both: all three',
    )
    parser.add_argument(
        '--sequence-length',
        type=int,
        help='sequence: length in query frames (None: the sequence module default)',
    )
    parser.add_argument(
        '--sequence-descriptor',
        choices=('patch_norm', 'global'),
        default='patch_norm',
        help='sequence: patch-normalised downsampled images (needs --db-images) or the '
        "model's global descriptors",
    )
    parser.add_argument(
        '--limit',
        type=int,
        help='evaluate only this many queries, spread evenly over the sorted list (None: all)',
    )
    parser.add_argument(
        '--out',
        type=Path,
        help='folder for results.json, per_query.csv and pr_curve.png (None: print only)',
    )
    parser.add_argument(
        '--batch-size', type=int, default=8, help='reference images per forward pass'
    )
    parser.add_argument(
        '--threads', type=int, default=None, help='torch and faiss CPU threads (None: all cores)'
    )
    parser.add_argument('--no-progress', action='store_true', help='no progress bars')
    return parser


def _parse_gt(value: str) -> tuple[str, Path | None]:
    kind, _, file = value.partition(':')
    if kind == 'vprbench':
        if not file:
            raise ConfigError('--gt vprbench needs a file: --gt vprbench:ground_truth.npz')
        return kind, Path(file)
    if kind not in ('utm', 'aligned', 'folder') or file:
        raise ConfigError(f'unknown --gt {value!r}; choose one of {list(GT_MODES)}')
    return kind, None


def _sequence_conf(args: argparse.Namespace) -> SequenceConf | None:
    """The validated sequence settings, or None in single-frame mode."""
    if args.mode == 'single':
        return None
    if args.limit is not None:
        msg = (
            f'--limit {args.limit!r} spreads the queries over the route, which breaks '
            f'sequences; omit --limit with --mode {args.mode!r} (or pick a query folder/glob)'
        )
        raise ConfigError(msg)
    if args.map is not None and args.sequence_descriptor == 'patch_norm':
        msg = (
            'a map stores model descriptors, not images; use --sequence-descriptor global '
            'with --map, or evaluate against --db-images'
        )
        raise ConfigError(msg)
    conf = {'descriptor': args.sequence_descriptor}
    if args.sequence_length is not None:
        conf['length'] = args.sequence_length
    return SequenceConf.from_dict(conf)


def _check_same_frame(map_dir: Path, map_xy: np.ndarray, query_xy: np.ndarray) -> None:
    """Refuse map poses and UTM query names that are clearly not in the same frame.

    Raises:
        ConfigError: no query is within ``FRAME_CHECK_M`` of any map place.
    """
    if not len(map_xy) or not len(query_xy):
        return
    distance, _ = cKDTree(map_xy).query(query_xy)
    if (distance <= FRAME_CHECK_M).any():
        return
    msg = (
        f'no query is within {FRAME_CHECK_M / 1000:.0f} km of any place of map '
        f'{str(map_dir)!r} (the closest is {distance.min() / 1000:.0f} km away); --gt utm '
        f'needs the map poses in the same (UTM east/north) frame as the query names, not '
        f'odometry or a local ENU frame; rebuild the map with UTM poses or use '
        f'--gt vprbench:FILE'
    )
    raise ConfigError(msg)


def _ground_truth(
    args: argparse.Namespace,
    gt: str,
    gt_file: Path | None,
    queries: list[Path],
    query_names: list[str],
    reference: PlaceDatabase | list[Path],
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Positives of every query, and reference positions (metres) when the names give them."""
    if gt == 'utm':
        if isinstance(reference, PlaceDatabase):
            xy = reference.poses[:, :2]
            if np.isnan(xy).any():
                msg = (
                    f'map {str(args.map)!r} has places without poses; --gt utm needs a '
                    f'map built with a pose topic in the frame of the query names'
                )
                raise ConfigError(msg)
            query_xy = np.array([parse_utm(p) for p in queries]).reshape(-1, 2)
            _check_same_frame(args.map, xy, query_xy)
            return positives_within_radius(xy, query_xy, args.radius_m), None
        positions = np.array([parse_utm(p) for p in reference]).reshape(-1, 2)
        return positives_from_utm(reference, queries, args.radius_m), positions
    if gt == 'vprbench':
        count = len(reference)
        return positives_from_vprbench(gt_file, num_queries=len(queries), num_db=count), None
    db_names = relative_names(reference, args.db_images)
    if gt == 'aligned':
        return positives_frame_aligned(db_names, query_names, args.tolerance), None
    return positives_same_folder(db_names, query_names, args.folder_depth), None


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()

    def body() -> int:
        args = parse_with_params_file(parser, argv, 'evaluate')
        gt, gt_file = _parse_gt(args.gt)
        if args.limit is not None and args.limit < 1:
            raise ConfigError(f'--limit must be >= 1, got {args.limit!r}')
        if args.map is not None and gt not in ('utm', 'vprbench'):
            msg = (
                f'--gt {gt!r} needs reference file names; with --map use --gt utm or '
                f'vprbench:FILE, or evaluate against --db-images'
            )
            raise ConfigError(msg)
        sequence_conf = _sequence_conf(args)
        overrides = None
        if args.image_size is not None:
            if args.model not in CONFS:
                msg = (
                    f'--image-size works with registry models {available_models()}, not '
                    f'{args.model!r}; for an exported model set preprocessing.size in its '
                    f'model.json'
                )
                raise ConfigError(msg)
            overrides = {'preprocessing': {'size': list(args.image_size)}}
        conf = {
            'reference': str(args.map or args.db_images),
            'reference_kind': 'map' if args.map else 'images',
            'queries': str(args.queries),
            'db_glob': args.db_glob,
            'query_glob': args.query_glob,
            'gt': args.gt,
            'radius_m': args.radius_m,
            'tolerance': args.tolerance,
            'folder_depth': args.folder_depth,
            'model': args.model,
            'image_size': args.image_size,
            'limit': args.limit,
            'mode': args.mode,
            'relocalization': {
                **RelocalizationConf().to_dict(),
                'top_k': args.top_k,
                'rerank_k': min(args.rerank_k, args.top_k),
            },
            'sequence': sequence_conf.to_dict() if sequence_conf is not None else None,
        }
        logger.info('evaluate conf: %s', conf)

        queries = list_images(args.queries, args.query_glob)
        query_names = relative_names(queries, args.queries)
        if args.map is not None:
            # The model is checked against the map when matching starts.
            reference = PlaceDatabase.load(args.map)
        else:
            reference = list_images(args.db_images, args.db_glob)
        logger.info('%d query images, %d reference places', len(queries), len(reference))
        positives, positions = _ground_truth(args, gt, gt_file, queries, query_names, reference)

        selected = evenly_spaced(len(queries), args.limit)
        if len(selected) < len(queries):
            logger.info('--limit: %d of %d queries, evenly spaced', len(selected), len(queries))
        queries = [queries[i] for i in selected]
        query_names = [query_names[i] for i in selected]
        positives = [positives[i] for i in selected]
        progress = not args.no_progress

        patch_norm = sequence_conf is not None and sequence_conf.descriptor == 'patch_norm'
        require_a_positive(positives)  # before the model and any extraction
        skipped = [n for n, p in zip(query_names, positives) if not len(p)]
        if args.mode == 'sequence' and patch_norm:
            # No model needed: the result only carries the queries and their ground truth.
            result = EvaluationResult(
                methods={},
                query_names=list(query_names),
                positives=[np.asarray(p, np.int64) for p in positives],
                num_db=len(reference),
                conf={},
                skipped_queries=skipped,
            )
        else:
            relocalization = dict(conf['relocalization'])
            if args.mode == 'sequence':
                relocalization['rerank_k'] = 0  # only the query descriptors are needed
            result = evaluate(
                load_model(args.model, overrides),
                reference,
                queries,
                positives,
                relocalization,
                query_names=query_names,
                reference_positions=positions,
                batch_size=args.batch_size,
                num_threads=args.threads,
                progress=progress,
            )
            if args.mode == 'sequence':
                result.methods.clear()
        if sequence_conf is not None:
            result.add_method(
                _run_sequence(result, sequence_conf, args, queries, reference, positions)
            )
        print(result.table())
        if args.out is not None:
            command = ['evaluate', *(sys.argv[1:] if argv is None else list(argv))]
            paths = write_results(result, args.out, extra={'command': command, 'args': conf})
            print(f'results written to {paths["json"]} (PR curve: {paths["png"]})')
        return 0

    return run_cli(body, argv)


def _run_sequence(
    result: EvaluationResult,
    conf: SequenceConf,
    args: argparse.Namespace,
    queries: list[Path],
    reference: PlaceDatabase | list[Path],
    positions: np.ndarray | None,
) -> MethodResult:
    """Sequence matching over every query, in (natural) name order.

    The matcher sees every query frame, with or without a positive, so the ground truth
    does not splice the route it follows; rows without a positive are dropped only when
    scoring (``summarize``).
    """
    progress = not args.no_progress
    if conf.descriptor == 'patch_norm':
        query_descriptors, latencies = sequence_descriptors(
            queries, conf, desc='query sequence descriptors', progress=progress
        )
        map_descriptors, _ = sequence_descriptors(
            reference, conf, desc='reference sequence descriptors', progress=progress
        )
        return evaluate_sequence(
            query_descriptors,
            map_descriptors,
            result.positives,
            conf,
            place_xyz=positions,
            descriptor_latencies_s=latencies,
            progress=progress,
        )
    database = result.database
    poses = database.poses[:, :3]
    return evaluate_sequence(
        result.query_globals,
        database.global_descriptors,
        result.positives,
        conf,
        traverse_ids=database.places['traverse'],
        place_xyz=None if np.isnan(poses).any() else poses,
        descriptor_latencies_s=result.extract_latencies_s,
        progress=progress,
    )


if __name__ == '__main__':
    raise SystemExit(main())
