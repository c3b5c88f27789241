"""convert_selavpr: turn a published SelaVPR checkpoint into a vpr_ros model directory.

The official checkpoints (github.com/Lu-Feng/SelaVPR, e.g. ``SelaVPR_msls.pth``) hold a
DataParallel state dict under ``model_state_dict`` (keys ``module.backbone.*`` with the
adapters inside the blocks, ``module.LocalAdapt.*``, ``module.aggregation.1.p``); they are
read with ``torch.load(weights_only=True)``. Example::

    convert_selavpr SelaVPR_msls.pth models/selavpr_msls
    build_map ... --model models/selavpr_msls

OUT gets ``model.json`` + ``model.safetensors`` (adapters, local head, GeM p) and, unless
``--backbone-weights`` names an existing DINOv2 file, ``dinov2_backbone.safetensors`` with
the frozen backbone taken from the checkpoint (official DINOv2 layout).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from vpr_ros import logger
from vpr_ros.cli.common import run_cli, strip_ros_args
from vpr_ros.models import load_model, save_model

BACKBONE_FILE = 'dinov2_backbone.safetensors'


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='convert_selavpr',
        description='Convert an official SelaVPR checkpoint (.pth) to a vpr_ros model folder.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument('checkpoint', type=Path, help='SelaVPR .pth checkpoint')
    parser.add_argument('out', type=Path, help='model folder to write')
    parser.add_argument(
        '--name', help='model name recorded in maps (default: the output folder name)'
    )
    parser.add_argument(
        '--backbone-weights',
        type=Path,
        help='use this DINOv2 weights file instead of writing the backbone from the checkpoint',
    )
    parser.add_argument(
        '--image-size',
        type=int,
        nargs=2,
        default=[224, 224],
        metavar=('H', 'W'),
        help='input size in pixels (multiples of 14; the published models use 224 x 224)',
    )
    parser.add_argument(
        '--no-verify', action='store_true', help='do not load the result back to check it'
    )
    return parser


def convert(
    checkpoint: Path,
    out: Path,
    *,
    name: str | None = None,
    backbone_weights: Path | None = None,
    image_size: Sequence[int] = (224, 224),
    verify: bool = True,
) -> Path:
    """Convert ``checkpoint`` into the model folder ``out``; return ``out``."""
    if not checkpoint.is_file():
        raise FileNotFoundError(f'checkpoint {str(checkpoint)!r} does not exist')
    if backbone_weights is not None and not backbone_weights.is_file():
        raise FileNotFoundError(f'backbone weights {str(backbone_weights)!r} do not exist')
    from safetensors.torch import save_file

    from vpr_ros.models.selavpr import SelaVpr, convert_selavpr_state, read_selavpr_checkpoint

    conf, trainable, backbone = convert_selavpr_state(read_selavpr_checkpoint(checkpoint))
    out.mkdir(parents=True, exist_ok=True)
    if backbone_weights is None:
        backbone_weights = out / BACKBONE_FILE
        save_file({k: v.contiguous() for k, v in backbone.items()}, str(backbone_weights))
    elif not backbone_weights.is_file():
        raise FileNotFoundError(f'backbone weights {str(backbone_weights)!r} do not exist')
    conf['backbone_weights'] = str(backbone_weights.resolve())
    conf['preprocessing'] = {'size': [int(s) for s in image_size]}
    model = SelaVpr.from_export({**conf, 'name': name or out.name}, trainable)
    save_model(model, out)
    _store_backbone_relative(out)
    logger.info('converted %s -> %s (%s)', checkpoint, out, model.identity().describe())
    if verify:
        loaded = load_model(out)
        if loaded.identity() != model.identity():
            raise AssertionError('the converted model does not load back identically')
    return out


def _store_backbone_relative(out: Path) -> None:
    """Name a backbone file inside ``out`` relative to it in model.json, so that the
    folder can be moved (models.load_exported resolves it against the folder)."""
    conf_file = out / 'model.json'
    conf = json.loads(conf_file.read_text())
    source = Path(conf['backbone_weights'])
    if not source.is_relative_to(out.resolve()):
        return
    conf['backbone_weights'] = source.relative_to(out.resolve()).as_posix()
    tmp = conf_file.with_suffix('.json.tmp')
    tmp.write_text(json.dumps(conf, indent=2, sort_keys=True))
    os.replace(tmp, conf_file)


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(strip_ros_args(sys.argv[1:] if argv is None else argv))

    def body() -> int:
        out = convert(
            args.checkpoint,
            args.out,
            name=args.name,
            backbone_weights=args.backbone_weights,
            image_size=args.image_size,
            verify=not args.no_verify,
        )
        conf = json.loads((out / 'model.json').read_text())
        print(f'wrote {out} ({conf["backbone"]}); use it with --model {out}')
        return 0

    return run_cli(body, argv)


if __name__ == '__main__':
    raise SystemExit(main())
