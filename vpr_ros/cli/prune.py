"""prune: structured pruning of a CNN place-recognition model, exported for load_model.

Example::

    prune --model efficientnet_lite0_gem --sparsity 0.2 --steps 4 --gamma 2 \\
        --out models/lite0_pruned
    build_map --model models/lite0_pruned ...    # a smaller map, a faster model

Writes ``OUT/model.json`` + ``OUT/model.safetensors`` (the last step), ``OUT/steps.csv``
(parameters, model MB, descriptor dimension, map MB per 1,000 places and latencies, step
0 being the unpruned model), ``OUT/prune.json`` (the options) and, with
``--save-steps``, every step under ``OUT/steps/stepK/``.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from vpr_ros import logger
from vpr_ros.cli.common import parse_with_params_file, run_cli
from vpr_ros.models import DEFAULT_MODEL, available_models, load_model, save_model
from vpr_ros.models.base import VprModel
from vpr_ros.pruning import (
    IMPORTANCES,
    BatchNormCalibrator,
    FinetuneConf,
    PruneConf,
    extraction_latency_ms,
    footprint,
    matching_latency_ms,
    prune_with_recovery,
)

STEP_COLUMNS = (
    'step',
    'sparsity',
    'head_sparsity',
    'params',
    'model_mb_fp32',
    'model_mb_fp16',
    'global_dim',
    'local_dim',
    'map_mb_per_1000',
    'extraction_ms',
    'matching_ms_10k',
    'finetune_loss',
)


def make_parser() -> argparse.ArgumentParser:
    defaults, ft = PruneConf(), FinetuneConf()
    parser = argparse.ArgumentParser(
        prog='prune',
        description=(
            'Structured pruning (Grainge et al.): remove whole channels from a CNN model '
            'with torch-pruning, so the backbone, the aggregation and the descriptor shrink '
            'together. Sparsity rises linearly over --steps; the descriptor layers are '
            'pruned at --gamma times the backbone sparsity. Optionally re-estimates '
            'batch-norm statistics and fine-tunes between steps. The result loads by path '
            'wherever a model name is accepted (build_map, relocalize, evaluate); maps '
            'built with it are smaller and are not interchangeable with the unpruned model.'
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        '--params', type=Path, help='YAML file with any of these options (flags override it)'
    )
    parser.add_argument(
        '--model',
        default=DEFAULT_MODEL,
        help=f'CNN model to prune: a name {available_models()} or an exported model path',
    )
    parser.add_argument('--out', type=Path, required=True, help='directory for the pruned model')
    parser.add_argument(
        '--sparsity',
        type=float,
        default=defaults.sparsity,
        help='fraction of backbone channels removed after the last step, in [0, 1)',
    )
    parser.add_argument(
        '--steps', type=int, default=defaults.steps, help='pruning steps (linear schedule)'
    )
    parser.add_argument(
        '--gamma',
        type=float,
        default=defaults.gamma,
        help='descriptor-layer sparsity relative to the backbone: 0 keeps the descriptor '
        'dimension D, 1 prunes it like the backbone',
    )
    parser.add_argument(
        '--importance',
        choices=IMPORTANCES,
        default=defaults.importance,
        help='channel importance: filter L1/L2 magnitude, or first-order Taylor (needs '
        '--train-data)',
    )
    parser.add_argument(
        '--round-to', type=int, help='keep channel counts multiples of this (e.g. 8 for SIMD)'
    )
    parser.add_argument(
        '--calibration-data',
        type=Path,
        help="unlabelled images of the deployment domain (e.g. the map's own) to "
        're-estimate batch-norm statistics on after each step (images of another domain '
        'can hurt more than they help)',
    )
    parser.add_argument(
        '--train-data',
        type=Path,
        help='place-labelled images (VPR folder format, @east@north@ in file names) to '
        'fine-tune on between steps',
    )
    parser.add_argument(
        '--finetune-iters',
        type=int,
        default=ft.iterations,
        help='fine-tuning iterations after each step (0: none; Taylor still uses the data)',
    )
    parser.add_argument(
        '--batch-places', type=int, default=ft.batch_places, help='places per fine-tuning batch'
    )
    parser.add_argument('--lr', type=float, default=ft.lr, help='fine-tuning learning rate')
    parser.add_argument(
        '--positive-dist-m',
        type=float,
        default=ft.positive_dist_m,
        help='images this close (metres) are the same place',
    )
    parser.add_argument(
        '--negative-dist-m',
        type=float,
        default=ft.negative_dist_m,
        help='images farther apart (metres) are different places',
    )
    parser.add_argument(
        '--metric-weight',
        type=float,
        default=ft.metric_weight,
        help='weight of the multi-similarity loss on place labels (0: distillation only, '
        'then --train-data may be any images)',
    )
    parser.add_argument(
        '--distill-weight',
        type=float,
        default=ft.distill_weight,
        help='weight of relational distillation to the unpruned model (0: off)',
    )
    parser.add_argument(
        '--finetune-size',
        type=int,
        nargs=2,
        metavar=('H', 'W'),
        help="fine-tuning input size (default: the model's own)",
    )
    parser.add_argument(
        '--save-steps', action='store_true', help='also export every step to OUT/steps/stepK'
    )
    parser.add_argument(
        '--runs', type=int, default=20, help='timed forward passes per latency figure'
    )
    parser.add_argument('--threads', type=int, help="torch CPU threads (default: torch's)")
    return parser


def measure(model: VprModel, runs: int) -> dict:
    """The efficiency figures of one model (no dataset needed)."""
    fp = footprint(model)
    return {
        'params': fp.params,
        'model_mb_fp32': round(fp.model_mb_fp32, 3),
        'model_mb_fp16': round(fp.model_mb_fp16, 3),
        'global_dim': fp.global_dim,
        'local_dim': fp.local_dim,
        'map_mb_per_1000': round(fp.map_mb_per_1000, 3),
        'extraction_ms': round(extraction_latency_ms(model, runs=runs, statistic='min'), 2),
        'matching_ms_10k': round(matching_latency_ms(fp.global_dim, statistic='min'), 3),
    }


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    conf = PruneConf(
        sparsity=args.sparsity,
        steps=args.steps,
        gamma=args.gamma,
        importance=args.importance,
        round_to=args.round_to,
    )
    model = load_model(args.model)
    logger.info('pruning %s: %s', model.identity().describe(), conf)
    calibrator = None
    if args.calibration_data is not None:
        calibrator = BatchNormCalibrator.from_folder(args.calibration_data)
    finetune_conf = FinetuneConf(
        iterations=args.finetune_iters,
        batch_places=args.batch_places,
        lr=args.lr,
        positive_dist_m=args.positive_dist_m,
        negative_dist_m=args.negative_dist_m,
        size=tuple(args.finetune_size) if args.finetune_size else None,
        metric_weight=args.metric_weight,
        distill_weight=args.distill_weight,
    )
    # The model and options are checked here, before the output folder and the timing.
    steps = prune_with_recovery(
        model,
        conf,
        calibrator=calibrator,
        train_data=args.train_data,
        finetune_conf=finetune_conf,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [{'step': 0, 'sparsity': 0.0, 'head_sparsity': 0.0, **measure(model, args.runs)}]
    last = None
    for step in tqdm(steps, total=conf.steps, desc='pruning', unit='step'):
        rows.append(
            {
                'step': step.index,
                'sparsity': round(step.sparsity, 4),
                'head_sparsity': round(step.head_sparsity, 4),
                **measure(step.model, args.runs),
                'finetune_loss': step.finetune_loss,
            }
        )
        if args.save_steps:
            save_model(step.model, args.out / 'steps' / f'step{step.index}')
        last = step
    save_model(last.model, args.out)
    with (args.out / 'steps.csv').open('w', newline='') as stream:
        writer = csv.DictWriter(stream, fieldnames=STEP_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    record = {'options': options, 'prune': conf.to_dict()}
    if args.train_data is not None:
        record['finetune'] = asdict(finetune_conf)
    (args.out / 'prune.json').write_text(json.dumps(record, indent=2))
    first, final = rows[0], rows[-1]
    print(_table(rows))
    logger.info(
        'wrote %s: %s; params %d -> %d, D %d -> %d, model %.1f -> %.1f MB, '
        'map %.2f -> %.2f MB per 1,000 places',
        args.out,
        last.model.identity().describe(),
        first['params'],
        final['params'],
        first['global_dim'],
        final['global_dim'],
        first['model_mb_fp32'],
        final['model_mb_fp32'],
        first['map_mb_per_1000'],
        final['map_mb_per_1000'],
    )
    return 0


def _table(rows: list[dict]) -> str:
    header = 'step  sparsity  head   params     MB fp32  D      map MB/1k  extract ms  match ms'
    lines = [header]
    for r in rows:
        lines.append(
            f'{r["step"]:<5} {r["sparsity"]:<9.3f} {r["head_sparsity"]:<6.3f} '
            f'{r["params"]:<10} {r["model_mb_fp32"]:<8.2f} {r["global_dim"]:<6} '
            f'{r["map_mb_per_1000"]:<10.2f} {r["extraction_ms"]:<11.1f} {r["matching_ms_10k"]:.3f}'
        )
    return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()

    def body() -> int:
        return run(parse_with_params_file(parser, argv, 'prune'))

    return run_cli(body, argv)


if __name__ == '__main__':
    raise SystemExit(main())
