"""Per-image SelaVPR extraction time on this CPU for the ViT-S/B/L variants at 224 x 224.

Weights are random (no DINOv2 weights ship here); the time does not depend on them.
Prints the FLOPs (multiply-adds count 2) and time of the whole model (backbone with
adapters, local head, GeM), of the plain DINOv2 backbone without adapters (timm) and of the
local head alone, per image: the minimum and the median over
``--repeats`` runs after one warm-up (the machine is shared; the minimum is the least
disturbed run)::

    python benchmarks/selavpr_extraction.py --threads 1
    python benchmarks/selavpr_extraction.py --variants selavpr_vits14 --batch-size 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from vpr_ros.models import load_model

VARIANTS = ['selavpr_vits14', 'selavpr_vitb14', 'selavpr_vitl14']


def time_call(fn, repeats: int) -> tuple[float, float]:
    """Minimum and median seconds of ``fn()`` over ``repeats`` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def _per_image(times: tuple[float, float], args: argparse.Namespace) -> str:
    return f'{times[0] / args.batch_size:.3f} / {times[1] / args.batch_size:.3f}'


def measure(name: str, args: argparse.Namespace) -> str:
    """One table row: sizes and per-image times of ``name``."""
    overrides = {'backbone_weights': 'random', 'preprocessing': {'size': [args.size] * 2}}
    model = load_model(name, overrides)
    plain = timm.create_model(
        model.conf['backbone'], num_classes=0, global_pool='', img_size=args.size
    ).eval()
    images = torch.randn(args.batch_size, 3, args.size, args.size)
    with torch.inference_mode():
        full = time_call(lambda: model(images), args.repeats)
        backbone = time_call(lambda: plain.forward_features(images), args.repeats)
        tokens = model.patch_tokens(images)
        head = time_call(lambda: model.local_head(tokens), args.repeats)
        with FlopCounterMode(display=False) as counter:
            shape = tuple(model(images)['local_features'].shape[1:])
    gflops = counter.get_total_flops() / 1e9 / args.batch_size
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.trainable_parameters())
    map_text = 'x'.join(str(s) for s in (*shape[1:], shape[0]))
    return (
        f'{name:<16} {params / 1e6:>7.1f}M {trainable / 1e6:>6.2f}M {model.global_dim:>5} '
        f'{map_text:>12} {gflops:>7.1f} {_per_image(full, args):>16} '
        f'{_per_image(backbone, args):>16} {_per_image(head, args):>16}'
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument('--variants', nargs='+', default=VARIANTS)
    parser.add_argument('--size', type=int, default=224, help='input side in pixels')
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--threads', type=int, default=1, help='torch CPU threads')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f'# SelaVPR extraction, {args.size}x{args.size}, batch {args.batch_size}, '
        f'{args.threads} thread(s), {os.cpu_count()} cores, load average '
        f'{os.getloadavg()[0]:.2f}, torch {torch.__version__}'
    )
    header = (
        f'{"variant":<16} {"params":>8} {"train":>7} {"D":>5} {"local map":>12} '
        f'{"GFLOP":>7} {"model s/img":>16} {"plain ViT s/img":>16} {"local head s/img":>16}'
    )
    print(header)
    print(f'{"":<60} {"(min / median)":>16}')
    for name in args.variants:
        print(measure(name, args), flush=True)


if __name__ == '__main__':
    main()
