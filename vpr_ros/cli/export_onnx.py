"""export_onnx: export a model to ONNX, so that build_map, evaluate and the relocalize node
run it on ONNX Runtime (their default backend 'auto' takes an export when there is one).

Example::

    export_onnx                                     # the default model, into the cache
    export_onnx --model models/lite0_d1120          # beside the model: .../model.onnx
    export_onnx --model efficientnet_lite0_gem --out /robot/models/lite0.onnx
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from vpr_ros import logger
from vpr_ros.cli.common import run_cli
from vpr_ros.extraction import INT8_SUFFIX, onnx_export_path
from vpr_ros.models import CONFS, DEFAULT_MODEL, available_models, check_model_source


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='export_onnx',
        description=(
            'Export a model to ONNX (both heads, the normalisation inside, the model identity '
            'in the metadata) for ONNX Runtime. Registry models go to the cache '
            '($VPR_ROS_CACHE_DIR, else ~/.cache/vpr_ros/onnx/NAME.onnx), exported model '
            'directories get DIR/model.onnx; build_map, evaluate and the node find them there.'
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        '--model',
        default=DEFAULT_MODEL,
        help=f'model name {available_models()} or a path to an exported model',
    )
    parser.add_argument(
        '--out', type=Path, help='the .onnx file (default: where the commands look for it)'
    )
    parser.add_argument(
        '--dynamic-size',
        action='store_true',
        help='let the image height and width vary (default: the model input size, fixed)',
    )
    parser.add_argument(
        '--quantize',
        action='store_true',
        help=f'also write an int8 dynamically quantised copy (suffix {INT8_SUFFIX}.onnx) to '
        'measure (evaluate --model FILE.int8.onnx); no command picks it: on the shipped CNN it '
        'ran 8-10x slower than float32 and moved R@1 by 10-20 points (README)',
    )
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()

    def body() -> int:
        args = parser.parse_args(argv)
        check_model_source(args.model)
        out = args.out or onnx_export_path(args.model)
        if out.suffix != '.onnx':
            parser.error(f'--out must name an .onnx file, got {str(out)!r}')
        from vpr_ros.models import load_model
        from vpr_ros.models.onnx_export import export_onnx, quantize_int8
        from vpr_ros.runtime import set_num_threads

        set_num_threads(args.threads)
        model = load_model(args.model)
        registry = args.model if args.model in CONFS else None
        export_onnx(model, out, registry_name=registry, dynamic_size=args.dynamic_size)
        logger.info('exported %s', model.identity().describe())
        print(f'ONNX model written to {out}')
        if args.quantize:
            int8 = out.with_name(out.stem + INT8_SUFFIX + out.suffix)
            quantize_int8(out, int8)
            print(f'int8 ONNX model written to {int8}')
        return 0

    return run_cli(body, argv)


if __name__ == '__main__':
    raise SystemExit(main())
