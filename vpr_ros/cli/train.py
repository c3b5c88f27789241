"""train: fine-tune a SelaVPR model on place-labelled images (VPR folder format).

Example::

    train --dataset datasets/pitts30k --model selavpr_vitl14 \\
        --backbone-weights weights/dinov2_vitl14_pretrain.pth --out runs/selavpr_pitts
    train --dataset datasets/pitts30k --model selavpr_vitl14 \\
        --backbone-weights weights/dinov2_vitl14_pretrain.pth --out runs/selavpr_pitts --resume
    build_map ... --model runs/selavpr_pitts/best

The dataset holds ``train/`` and ``val/``, each with ``database/`` and ``queries/`` images
named ``@<utm_east>@<utm_north>@...@.jpg``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from vpr_ros import logger
from vpr_ros.cli.common import parse_with_params_file, run_cli
from vpr_ros.models import available_models, load_model
from vpr_ros.training import TrainConfig, train

_DEFAULTS = TrainConfig()


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='train',
        description=(
            'Train a SelaVPR model (adapters, local head and GeM p; the DINOv2 backbone stays '
            'frozen) with a triplet loss on global descriptors plus the MNN local loss, '
            'partial hard-negative mining and validation Recall@N every epoch. Writes '
            'OUT/best and OUT/last (load either with --model OUT/best).'
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument('--params', type=Path, help='YAML file with any of these options')
    parser.add_argument(
        '--dataset',
        type=Path,
        required=True,
        help='VPR-format dataset folder with train/ and val/ (database/ and queries/ each)',
    )
    parser.add_argument('--out', type=Path, required=True, help='output folder')
    parser.add_argument(
        '--model',
        default='selavpr_vitl14',
        help=f'model name {available_models()} or an exported model directory',
    )
    parser.add_argument(
        '--backbone-weights',
        help="DINOv2 weights file (official or timm layout), 'download' or 'random' "
        '(registry names need one)',
    )
    parser.add_argument(
        '--image-size',
        type=int,
        nargs=2,
        metavar=('H', 'W'),
        help='input size in pixels, multiples of 14 (default: the model configuration)',
    )
    parser.add_argument('--resume', action='store_true', help='continue from OUT/last')
    parser.add_argument('--epochs', type=int, default=_DEFAULTS.epochs)
    parser.add_argument(
        '--batch-size', type=int, default=_DEFAULTS.batch_size, help='queries per step'
    )
    parser.add_argument('--negs-per-query', type=int, default=_DEFAULTS.negs_per_query)
    parser.add_argument('--lr', type=float, default=_DEFAULTS.lr, help='Adam learning rate')
    parser.add_argument(
        '--margin', type=float, default=_DEFAULTS.margin, help='global triplet margin'
    )
    parser.add_argument(
        '--local-weight',
        type=float,
        default=_DEFAULTS.local_weight,
        help='weight (lambda) of the MNN local loss',
    )
    parser.add_argument(
        '--pos-dist-m',
        type=float,
        default=_DEFAULTS.pos_dist_m,
        help='training positives lie within this distance (metres)',
    )
    parser.add_argument(
        '--neg-dist-m',
        type=float,
        default=_DEFAULTS.neg_dist_m,
        help='negatives lie beyond this distance (metres)',
    )
    parser.add_argument(
        '--val-pos-dist-m',
        type=float,
        default=_DEFAULTS.val_pos_dist_m,
        help='a validation retrieval within this distance (metres) is correct',
    )
    parser.add_argument('--queries-per-epoch', type=int, default=_DEFAULTS.queries_per_epoch)
    parser.add_argument(
        '--cache-refresh-rate',
        type=int,
        default=_DEFAULTS.cache_refresh_rate,
        help='queries per mining round (triplets are re-mined with the current model)',
    )
    parser.add_argument(
        '--neg-samples',
        type=int,
        default=_DEFAULTS.neg_samples,
        help='database images sampled per mining round (partial mining)',
    )
    parser.add_argument(
        '--recall-values', type=int, nargs='+', default=list(_DEFAULTS.recall_values)
    )
    parser.add_argument(
        '--select-recall',
        type=int,
        default=_DEFAULTS.select_recall,
        help='the best checkpoint is the one with the highest R@N for this N',
    )
    parser.add_argument(
        '--patience',
        type=int,
        default=_DEFAULTS.patience,
        help='stop after this many epochs without improvement',
    )
    parser.add_argument(
        '--val-rerank-topk',
        type=int,
        default=_DEFAULTS.val_rerank_topk,
        help='validate after MNN re-ranking of this many candidates (0: global only)',
    )
    parser.add_argument('--horizontal-flip', action='store_true', help='flip batches at random')
    parser.add_argument('--eval-batch-size', type=int, default=_DEFAULTS.eval_batch_size)
    parser.add_argument('--seed', type=int, default=_DEFAULTS.seed)
    parser.add_argument('--num-threads', type=int, help='torch CPU threads (default: torch)')
    parser.add_argument('--no-progress', action='store_true', help='hide progress bars')
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()

    def body() -> int:
        return _run(parse_with_params_file(parser, argv, 'train'))

    return run_cli(body, argv)


def _run(args: argparse.Namespace) -> int:
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    args.out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(args.out / 'train.log')
    handler.setFormatter(logging.Formatter('[%(asctime)s %(levelname)s] %(message)s'))
    logger.addHandler(handler)
    try:
        logger.info('arguments: %s', vars(args))
        overrides = {}
        if args.backbone_weights:
            overrides['backbone_weights'] = args.backbone_weights
        if args.image_size:
            overrides['preprocessing'] = {'size': list(args.image_size)}
        model = load_model(args.model, overrides or None)
        if overrides and Path(str(args.model)).exists():
            logger.warning('--backbone-weights/--image-size apply to registry names only')
        config = TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            negs_per_query=args.negs_per_query,
            lr=args.lr,
            margin=args.margin,
            local_weight=args.local_weight,
            pos_dist_m=args.pos_dist_m,
            neg_dist_m=args.neg_dist_m,
            val_pos_dist_m=args.val_pos_dist_m,
            queries_per_epoch=args.queries_per_epoch,
            cache_refresh_rate=args.cache_refresh_rate,
            neg_samples=args.neg_samples,
            recall_values=tuple(args.recall_values),
            select_recall=args.select_recall,
            patience=args.patience,
            val_rerank_topk=args.val_rerank_topk,
            horizontal_flip=args.horizontal_flip,
            eval_batch_size=args.eval_batch_size,
            seed=args.seed,
            progress=not args.no_progress,
        )
        logger.info('training configuration: %s', config.to_dict())
        result = train(model, args.dataset, args.out, config, resume=args.resume)
        recalls = ', '.join(f'{k}: {v:.1f}' for k, v in result.best_recalls.items())
        print(f'best model (epoch {result.best_epoch}): {result.best_dir} ({recalls})')
        return 0
    finally:
        logger.removeHandler(handler)
        handler.close()


if __name__ == '__main__':
    raise SystemExit(main())
