"""evaluate: score place recognition on query images with ground truth.

Runs the shipped relocalization pipeline against a map or a folder of reference images,
once per method (retrieval only, re-ranked, sequence matching; ``vpr_ros.evaluation``), and
reports Recall@1/5/10/20, recall at 100 % precision and the area under the precision-recall
curve of the top-1 answer, ranked both by the node's confidence and by the similarity (the
standard figures, as stschubert/VPR_Tutorial computes them; ``vpr_ros.results``), and
per-query latency. This module only parses flags: the relocalization flags come from the
``RelocalizationConf`` table, the ground-truth ones from ``GroundTruthConf``
(``vpr_ros.ground_truth``: soft ground truth, duplicate frames), the scoring ones from
``ScoringConf`` (the recall denominator); torch and the model load inside the command, so
``--help`` and mistakes in the flags answer at once.

Examples::

    evaluate --db-images nordland64/summer --queries nordland64/winter --gt aligned \\
        --tolerance 2 --out /tmp/eval_nordland
    evaluate --db-images gardens_sfu_places/pairs --db-glob '*/i0/*' \\
        --queries gardens_sfu_places/pairs --query-glob '*/i1/*' --gt folder
    evaluate --db-images pitts/database --queries pitts/queries --gt utm --radius-m 25
    evaluate --map maps/campus --queries campus_queries --gt utm
    evaluate --map maps/campus --queries campus_route --gt csv:campus_route/data.csv
    evaluate --db-images db --queries q --gt vprbench:ground_truth.npz
    evaluate --db-images nordland64/summer --queries nordland64/winter --gt aligned \\
        --mode both --sequence-length 20 --soft-tolerance 10 --duplicate-frames
    evaluate --db-images pitts/database --queries pitts/queries --gt utm \\
        --soft-radius-m 50 --recall-denominator all
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vpr_ros import logger
from vpr_ros.cli.common import parse_with_params_file, run_cli
from vpr_ros.config import add_arguments, conf_from_args
from vpr_ros.errors import ConfigError
from vpr_ros.evaluation import FILTER, METHODS, RERANKED, RETRIEVAL, SEQUENCE, method_confs
from vpr_ros.extraction import AUTO, BACKENDS
from vpr_ros.ground_truth import (
    GROUND_TRUTHS,
    GroundTruthConf,
    check_refinements,
    ground_truth_choices,
    parse_ground_truth,
)
from vpr_ros.models import CONFS, DEFAULT_MODEL, available_models
from vpr_ros.relocalization import RelocalizationConf
from vpr_ros.results import ScoringConf

# --mode names groups of methods.
MODES = {
    'default': (RETRIEVAL, RERANKED, FILTER),
    'filter': (FILTER,),
    'single': (RETRIEVAL, RERANKED),
    'sequence': (SEQUENCE,),
    'both': (RETRIEVAL, RERANKED, SEQUENCE),
    'all': (RETRIEVAL, RERANKED, SEQUENCE, FILTER),
}
# Settings the command decides: the mode by --mode/--methods, the sequence matcher's answers
# by the largest N of Recall@N; min_confidence does not matter to a PR curve over all
# thresholds.
NOT_FLAGS = ('mode', 'sequence.top_k', 'sequence.min_confidence')


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='evaluate',
        description=(
            'Evaluate place recognition: match query images against a map or a folder of '
            'reference images with the shipped pipeline and report Recall@N with and without '
            're-ranking, recall at 100 % precision and the area under the precision-recall '
            "curve of the top-1 answer ranked by the node's confidence (conf) and by its "
            'similarity (sim: the standard figures, as VPR_Tutorial computes them), and '
            'per-query latency. Images are ordered by name with numbers by value (2 before '
            '10). Queries without a positive in the reference are still matched and left out '
            'of Recall@N (unless --recall-denominator all); in the precision-recall curves an '
            'accepted answer to one is wrong.'
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
        help=f'map directory written by build_map (ground truth: '
        f'{", ".join(ground_truth_choices(with_map=True))})',
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
    choices = ground_truth_choices()
    parser.add_argument(
        '--gt',
        required=True,
        metavar='{' + ','.join(choices) + '}',
        help='ground truth. '
        + ' '.join(f'{c}: {GROUND_TRUTHS[c.split(":")[0]].help}.' for c in choices),
    )
    add_arguments(parser.add_argument_group('ground truth'), GroundTruthConf)
    add_arguments(parser.add_argument_group('scoring (vpr_ros.results)'), ScoringConf)
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
        'exists (export_onnx) and no --image-size is given, else torch',
    )
    parser.add_argument(
        '--image-size',
        type=int,
        nargs=2,
        metavar=('H', 'W'),
        help='override the model input size (pixels; registry models only; None: the '
        "model's own); a --map must have been built with the same size",
    )
    methods = parser.add_argument_group('methods')
    methods.add_argument(
        '--mode',
        choices=list(MODES),
        default='default',
        help="default: the place filter over every query in name order (the node's default) "
        'beside retrieval and re-ranked single frames; filter: the filter alone; single: '
        'retrieval and re-ranked single frames; sequence: sequence matching over every query '
        'in name order; both: single and sequence; all: all four',
    )
    methods.add_argument(
        '--methods',
        nargs='+',
        choices=list(METHODS),
        metavar='METHOD',
        help=f'the methods to run, instead of --mode: any of {list(METHODS)}',
    )
    add_arguments(
        parser.add_argument_group('relocalization (vpr_ros.relocalization)'),
        RelocalizationConf,
        exclude=NOT_FLAGS,
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
        '--threads',
        type=int,
        default=None,
        help='CPU threads of the model, faiss and BLAS (None: all cores)',
    )
    parser.add_argument('--no-progress', action='store_true', help='no progress bars')
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()

    def body() -> int:
        return run(parse_with_params_file(parser, argv, 'evaluate'), argv)

    return run_cli(body, argv)


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """The command: check the flags, then list, load, match, score and report."""
    gt_kind, _ = parse_ground_truth(args.gt, with_map=args.map is not None)
    gt_conf = conf_from_args(GroundTruthConf, args)
    check_refinements(gt_kind, gt_conf, with_map=args.map is not None)
    scoring = conf_from_args(ScoringConf, args)
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f'--limit must be >= 1, got {args.limit!r}')
    # --rerank-k is at most --top-k: only retrieved places can be re-ranked.
    conf = conf_from_args(
        RelocalizationConf, args, mode='single', rerank_k=min(args.rerank_k, args.top_k)
    )
    confs = method_confs(conf, args.methods or MODES[args.mode])
    # The filter takes spread-out queries as a robot's jumps (it relocalizes frame by frame
    # then); the sequence matcher needs consecutive frames.
    sequential = [name for name, c in confs.items() if c.mode == 'sequence']
    if args.limit is not None and sequential:
        msg = (
            f'--limit {args.limit!r} spreads the queries over the route, which breaks '
            f'sequences ({sequential!r}); omit --limit (or pick a query folder/glob)'
        )
        raise ConfigError(msg)
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
    settings: dict[str, Any] = {
        'reference': str(args.map or args.db_images),
        'reference_kind': 'map' if args.map else 'images',
        'queries': str(args.queries),
        'db_glob': args.db_glob,
        'query_glob': args.query_glob,
        'gt': args.gt,
        **gt_conf.to_dict(),
        **scoring.to_dict(),
        'model': args.model,
        'image_size': args.image_size,
        'limit': args.limit,
        'mode': args.mode,
        'methods': list(confs),
        'relocalization': conf.to_dict(),
        'sequence': confs[SEQUENCE].sequence.to_dict() if SEQUENCE in confs else None,
    }
    logger.info('evaluate conf: %s', settings)

    from vpr_ros.database import PlaceDatabase
    from vpr_ros.ground_truth import MapPlaces, load_ground_truth, require_a_positive
    from vpr_ros.imagefolders import ImageFolder

    queries = ImageFolder.from_glob(args.queries, args.query_glob)
    reference: ImageFolder | MapPlaces
    matched_against: PlaceDatabase | list[Path]
    if args.map is not None:
        # The model is checked against the map when matching starts.
        matched_against = PlaceDatabase.load(args.map)
        from vpr_ros.rerankers import check_map

        # A re-ranker the map cannot serve is refused before the model loads.
        check_map(sorted({n for c in confs.values() for n in c.rerankers}), matched_against)
        reference = MapPlaces(args.map, matched_against.poses[:, :2])
    else:
        reference = ImageFolder.from_glob(args.db_images, args.db_glob)
        matched_against = reference.paths
    logger.info(
        '%d query images, %d reference places, ground truth %r',
        len(queries),
        len(reference),
        gt_kind,
    )
    truth = load_ground_truth(args.gt, queries, reference, gt_conf)

    from vpr_ros.evaluation import evaluate, evenly_spaced

    selected = evenly_spaced(len(queries), args.limit)
    if len(selected) < len(queries):
        logger.info('--limit: %d of %d queries, evenly spaced', len(selected), len(queries))
    queries = queries.subset(selected)
    positives = [truth.positives[i] for i in selected]
    soft_positives = None
    if truth.soft_positives is not None:
        soft_positives = [truth.soft_positives[i] for i in selected]
    require_a_positive(positives)  # before the model and any extraction

    from vpr_ros.extraction import open_extractor
    from vpr_ros.results import write_results

    extractor = open_extractor(
        args.model,
        backend=args.backend,
        batch_size=args.batch_size,
        num_threads=args.threads,
        overrides=overrides,
        # 'auto' passes over an export that is not the model the map was built with.
        expected=matched_against.model if isinstance(matched_against, PlaceDatabase) else None,
    )
    settings['backend'] = extractor.backend
    result = evaluate(
        extractor,
        matched_against,
        queries.paths,
        positives,
        conf,
        methods=confs,
        query_names=queries.names(),
        reference_positions=truth.reference_positions,
        soft_positives=soft_positives,
        scoring=scoring,
        notes=truth.notes,
        batch_size=args.batch_size,
        num_threads=args.threads,
        progress=not args.no_progress,
    )
    print(result.table())
    if args.out is not None:
        command = ['evaluate', *(sys.argv[1:] if argv is None else list(argv))]
        paths = write_results(result, args.out, extra={'command': command, 'args': settings})
        print(f'results written to {paths["json"]} (PR curve: {paths["png"]})')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
