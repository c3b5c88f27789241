"""train: fine-tune a SelaVPR model on place-labelled images (VPR folder format).

Example::

    train --dataset datasets/pitts30k --model selavpr_vitl14 \\
        --backbone-weights weights/dinov2_vitl14_pretrain.pth --out runs/selavpr_pitts
    train --dataset datasets/pitts30k --model selavpr_vitl14 \\
        --backbone-weights weights/dinov2_vitl14_pretrain.pth --out runs/selavpr_pitts --resume
    build_map ... --model runs/selavpr_pitts/best

The dataset holds ``train/`` and ``val/``, each with ``database/`` and ``queries/`` images
named ``@<utm_east>@<utm_north>@...@.jpg``. The training flags come from
``vpr_ros.learning.train.TrainConf``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vpr_ros import logger
from vpr_ros.cli.common import parse_with_params_file, run_cli
from vpr_ros.config import add_arguments, conf_from_args
from vpr_ros.learning.data import VprSplit, load_splits
from vpr_ros.learning.train import TrainConf
from vpr_ros.models import available_models, check_model_source


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
    add_arguments(parser.add_argument_group('training'), TrainConf)
    parser.add_argument('--num-threads', type=int, help='torch CPU threads (default: torch)')
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()

    def body() -> int:
        args = parse_with_params_file(parser, argv, 'train')
        conf = conf_from_args(TrainConf, args)
        # The data and the model name are checked before anything heavy is imported.
        splits = load_splits(args.dataset)
        check_model_source(args.model)
        return _run(args, conf, splits)

    return run_cli(body, argv)


def _run(args: argparse.Namespace, conf: TrainConf, splits: tuple[VprSplit, VprSplit]) -> int:
    from vpr_ros.learning.train import train
    from vpr_ros.models import load_model
    from vpr_ros.runtime import set_num_threads

    set_num_threads(args.num_threads)
    args.out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(args.out / 'train.log')
    handler.setFormatter(logging.Formatter('[%(asctime)s %(levelname)s] %(message)s'))
    logger.addHandler(handler)
    try:
        logger.info('arguments: %s', vars(args))
        overrides: dict[str, Any] = {}
        if args.backbone_weights:
            overrides['backbone_weights'] = args.backbone_weights
        if args.image_size:
            overrides['preprocessing'] = {'size': list(args.image_size)}
        model = load_model(args.model, overrides or None)
        if overrides and Path(str(args.model)).exists():
            logger.warning('--backbone-weights/--image-size apply to registry names only')
        logger.info('training configuration: %s', conf.to_dict())
        result = train(model, splits, args.out, conf, resume=args.resume)
        recalls = ', '.join(f'{k}: {v:.1f}' for k, v in result.best_recalls.items())
        print(f'best model (epoch {result.best_epoch}): {result.best_dir} ({recalls})')
        return 0
    finally:
        logger.removeHandler(handler)
        handler.close()


if __name__ == '__main__':
    raise SystemExit(main())
