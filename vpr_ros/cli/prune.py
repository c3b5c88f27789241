"""prune: structured pruning of a CNN place-recognition model, exported for load_model.

Example::

    # The descriptor only (D 1280 -> 1120): R@1 kept on the shared data (README).
    prune --model efficientnet_lite0_gem --sparsity 0 --steps 1 --gamma 0.125 \\
        --out models/lite0_d1120
    # Backbone and descriptor, with distillation to the unpruned model between steps.
    prune --model efficientnet_lite0_gem --sparsity 0.3 --steps 3 --gamma 0.3 \\
        --train-data IMAGES/ --metric-weight 0 --out models/lite0_pruned
    build_map --model models/lite0_pruned ...    # a smaller map, a faster model

Writes ``OUT/model.json`` + ``OUT/model.safetensors`` (the last step), ``OUT/steps.csv``
(parameters, model MB, descriptor dimension, map MB per 1,000 places: global descriptors
only and the whole map with local features, and latencies; step 0 being the unpruned
model), ``OUT/prune.json`` (the options) and, with ``--save-steps``, every step under
``OUT/steps/stepK/``.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vpr_ros import logger
from vpr_ros.cli.common import parse_with_params_file, run_cli
from vpr_ros.config import add_arguments, conf_from_args
from vpr_ros.learning.finetune import FinetuneConf
from vpr_ros.models import DEFAULT_MODEL, available_models, check_model_source
from vpr_ros.pruning import PruneConf

if TYPE_CHECKING:
    from vpr_ros.models.base import VprModel

# Fine-tuning settings whose flags predate the settings table.
FINETUNE_FLAGS = {'iterations': '--finetune-iters', 'size': '--finetune-size'}

STEP_COLUMNS = (
    'step',
    'sparsity',
    'descriptor_sparsity',
    'params',
    'model_mb_fp32',
    'model_mb_fp16',
    'global_dim',
    'local_dim',
    'global_mb_per_1000',
    'map_mb_per_1000',
    'extraction_ms',
    'matching_ms_10k',
    'rerank_ms_20',
    'finetune_loss',
)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='prune',
        description=(
            'Structured pruning (Grainge et al.): remove whole channels from a CNN model '
            'with torch-pruning, so the backbone, the aggregation and the descriptor shrink '
            'together. The backbone sparsity rises linearly over --steps to --sparsity, and '
            'the descriptor layers on the same schedule to --gamma (so D ends at '
            '(1 - gamma) D). Optionally re-estimates batch-norm statistics and fine-tunes '
            'between steps. The result loads by path '
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
    add_arguments(parser.add_argument_group('pruning'), PruneConf)
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
        help='images to fine-tune on between steps: place-labelled (VPR folder format, '
        '@east@north@ in file names) for the metric loss, or any images with '
        '--metric-weight 0 (distillation to the unpruned model only)',
    )
    add_arguments(
        parser.add_argument_group('fine-tuning (with --train-data)'),
        FinetuneConf,
        flags=FINETUNE_FLAGS,
    )
    parser.add_argument(
        '--save-steps', action='store_true', help='also export every step to OUT/steps/stepK'
    )
    parser.add_argument(
        '--runs', type=int, default=20, help='timed forward passes per latency figure'
    )
    parser.add_argument(
        '--threads', type=int, help='torch and faiss CPU threads (unset: their defaults)'
    )
    return parser


def measure(model: VprModel, runs: int) -> dict[str, Any]:
    """The efficiency figures of one model (no dataset needed): the map with its local
    features, re-ranking of the top 20 (the default pipeline) included."""
    from vpr_ros.profiling import (
        extraction_latency_ms,
        footprint,
        matching_latency_ms,
        rerank_latency_ms,
    )

    fp = footprint(model)
    rerank_ms = rerank_latency_ms(fp.local_locations, fp.local_dim, runs=runs, statistic='min')
    return {
        'params': fp.params,
        'model_mb_fp32': round(fp.model_mb_fp32, 3),
        'model_mb_fp16': round(fp.model_mb_fp16, 3),
        'global_dim': fp.global_dim,
        'local_dim': fp.local_dim,
        'global_mb_per_1000': round(fp.global_mb_per_1000, 3),
        'map_mb_per_1000': round(fp.map_mb_per_1000, 3),
        'extraction_ms': round(extraction_latency_ms(model, runs=runs, statistic='min'), 2),
        'matching_ms_10k': round(matching_latency_ms(fp.global_dim, k=20, statistic='min'), 3),
        'rerank_ms_20': round(rerank_ms, 3),
    }


def check_inputs(args: argparse.Namespace) -> tuple[PruneConf, FinetuneConf]:
    """The settings, and the model and folders checked, before anything heavy is imported."""
    conf = conf_from_args(PruneConf, args)
    finetune_conf = conf_from_args(FinetuneConf, args)
    check_model_source(args.model)
    for flag, folder in (
        ('--calibration-data', args.calibration_data),
        ('--train-data', args.train_data),
    ):
        if folder is not None and not folder.is_dir():
            raise FileNotFoundError(f'{flag} folder {str(folder)!r} does not exist')
    return conf, finetune_conf


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from vpr_ros.learning.finetune import BatchNormCalibrator
    from vpr_ros.models import load_model, save_model
    from vpr_ros.pruning import prune_with_recovery
    from vpr_ros.runtime import set_num_threads

    conf, finetune_conf = check_inputs(args)
    set_num_threads(args.threads)
    model = load_model(args.model)
    logger.info('pruning %s: %s', model.identity().describe(), conf)
    calibrator = None
    if args.calibration_data is not None:
        calibrator = BatchNormCalibrator.from_folder(args.calibration_data)
    # The model and options are checked here, before the output folder and the timing.
    steps = prune_with_recovery(
        model,
        conf,
        calibrator=calibrator,
        train_data=args.train_data,
        finetune_conf=finetune_conf,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [{'step': 0, 'sparsity': 0.0, 'descriptor_sparsity': 0.0, **measure(model, args.runs)}]
    last = None
    for step in tqdm(steps, total=conf.steps, desc='pruning', unit='step'):
        rows.append(
            {
                'step': step.index,
                'sparsity': round(step.sparsity, 4),
                'descriptor_sparsity': round(step.descriptor_sparsity, 4),
                **measure(step.model, args.runs),
                'finetune_loss': step.finetune_loss,
            }
        )
        if args.save_steps:
            save_model(step.model, args.out / 'steps' / f'step{step.index}')
        last = step
    assert last is not None, 'PruneConf.steps >= 1'
    save_model(last.model, args.out)
    with (args.out / 'steps.csv').open('w', newline='') as stream:
        writer = csv.DictWriter(stream, fieldnames=STEP_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    record = {'options': options, 'prune': conf.to_dict()}
    if args.train_data is not None:
        record['finetune'] = finetune_conf.to_dict()
    (args.out / 'prune.json').write_text(json.dumps(record, indent=2))
    first, final = rows[0], rows[-1]
    print(_table(rows))
    logger.info(
        'wrote %s: %s; params %d -> %d, D %d -> %d, model %.1f -> %.1f MB, '
        'map (with local features) %.2f -> %.2f MB per 1,000 places',
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


def _table(rows: list[dict[str, Any]]) -> str:
    header = (
        'step  sparsity  D-sparsity  params     MB fp32  D      map MB/1k  extract ms  '
        'match ms  rerank ms'
    )
    lines = [header]
    for r in rows:
        lines.append(
            f'{r["step"]:<5} {r["sparsity"]:<9.3f} {r["descriptor_sparsity"]:<11.3f} '
            f'{r["params"]:<10} {r["model_mb_fp32"]:<8.2f} {r["global_dim"]:<6} '
            f'{r["map_mb_per_1000"]:<10.2f} {r["extraction_ms"]:<11.1f} '
            f'{r["matching_ms_10k"]:<9.3f} {r["rerank_ms_20"]:.3f}'
        )
    return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()

    def body() -> int:
        return run(parse_with_params_file(parser, argv, 'prune'))

    return run_cli(body, argv)


if __name__ == '__main__':
    raise SystemExit(main())
