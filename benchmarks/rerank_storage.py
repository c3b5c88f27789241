"""What the stored local features cost, and what shrinking them does to re-ranking.

Local features are big: a SelaVPR map is 61 x 61 x 128 float32 per place (1.9 MB). The
choices measured here, applied alike to the map and the query:

- ``fp32`` / ``fp16``: every location, float32 or float16;
- ``poolF``: average-pool the map F x F (before L2 normalisation), float16;
- ``topN/F``: keep the 1/F locations with the largest feature norm before normalisation
  ("strongest"), float16 (MNN re-ranking needs no positions, so nothing else is stored).

Table 1: bytes per place and re-ranking time (MNN scores of one query against the top-20
and top-100 candidates, ``vpr_ros.rerankers.mnn.mnn_scores`` on float32 after reading the stored
dtype, as the relocalizer does; the minimum of repeated runs, as the machine is shared) for
SelaVPR-sized maps (a 224 x 224 input; random weights, which do not change the time).

Table 2: the effect on R@1 with real images. SelaVPR's weights are not available here
(a random SelaVPR recognises nothing), so the choices are applied to the default model's
local features instead (EfficientNet-Lite0, ImageNet, its unpooled stride-16 map:
``local_pool`` 1, where the registry conf pools by 2), on
gardens_sfu_places (database: view i0 of each place; queries: the other views; re-rank
all candidates) and on the first ``--nordland-frames`` frames of nordland64 (winter
queries against summer, correct within +-2 frames; re-rank the top 20)::

    python benchmarks/rerank_storage.py --data ../shared/datasets --threads 1
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vpr_ros.imagefolders import load_image
from vpr_ros.models import load_model
from vpr_ros.rerankers.mnn import mnn_scores

EFFICIENTNET = 'efficientnet_lite0_gem'  # its unpooled stride-16 local map
CHOICES = ['fp32', 'fp16', 'pool2', 'pool4', 'top4', 'top8', 'top16']


def compress(raw: torch.Tensor, choice: str) -> np.ndarray:
    """Stored local features of one place: raw (C, h, w) -> (L, C) in the stored dtype."""
    if choice.startswith('pool'):
        factor = int(choice[4:])
        raw = F.avg_pool2d(raw[None], factor, factor, ceil_mode=True)[0]
    sets = raw.flatten(1).T  # (h * w, C)
    if choice.startswith('top'):
        keep = max(1, sets.shape[0] // int(choice[3:]))
        strongest = sets.norm(dim=1).topk(keep).indices.sort().values
        sets = sets[strongest]
    sets = F.normalize(sets, dim=1)
    dtype = np.float32 if choice == 'fp32' else np.float16
    return sets.numpy().astype(dtype)


@torch.inference_mode()
def describe(model, images: list[np.ndarray], batch_size: int = 8):
    """Global descriptors (N, D) and raw (un-normalised) local maps (N, C, h, w)."""
    globals_, locals_ = [], []
    for start in range(0, len(images), batch_size):
        out = model._forward(model.preprocessing(images[start : start + batch_size]))
        globals_.append(F.normalize(out['global_descriptor'], dim=-1).numpy())
        locals_.append(out['local_features'].float())
    return np.concatenate(globals_), torch.cat(locals_)


def rerank_seconds(query: np.ndarray, stored: np.ndarray, k: int, repeats: int) -> float:
    """Minimum seconds to score one query against ``k`` stored candidates (the machine is
    shared; the minimum is the least disturbed run)."""
    candidates = stored[np.arange(k) % len(stored)]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mnn_scores(query.astype(np.float32), np.asarray(candidates, np.float32))
        times.append(time.perf_counter() - start)
    return min(times)


def timing_table(data: Path, args: argparse.Namespace) -> None:
    model = load_model('selavpr_vits14', {'backbone_weights': 'random'})
    paths = sorted((data / 'gardens_sfu_places').rglob('*.jpg'))[:6]
    images = [load_image(p) for p in paths]
    _, raw = describe(model, images)
    c, h, w = raw.shape[1:]
    print(f'\n## Table 1: SelaVPR-sized local maps ({h}x{w}x{c} per place, 224x224 input)')
    print(f'{"choice":<7} {"locations":>9} {"bytes/place":>12} {"MB/1000 places":>15} '
          f'{"top-20 ms":>10} {"top-100 ms":>11}')  # fmt: skip
    for choice in CHOICES:
        stored = np.stack([compress(r, choice) for r in raw])
        query = compress(raw[0], choice)
        per_place = stored[0].nbytes
        small = stored.shape[1] < 2000
        t20 = rerank_seconds(query, stored, 20, 5 if small else 2)
        t100 = rerank_seconds(query, stored, 100, 5 if small else 2)
        print(f'{choice:<7} {stored.shape[1]:>9} {per_place:>12,} {per_place / 1e3:>15.1f} '
              f'{1e3 * t20:>10.1f} {1e3 * t100:>11.1f}', flush=True)  # fmt: skip


def recall_at_1(
    q_global: np.ndarray,
    db_global: np.ndarray,
    q_local: list[np.ndarray] | None,
    db_local: list[np.ndarray] | None,
    correct,
    top_k: int,
) -> float:
    """R@1 (percent) of global retrieval, re-ranked by MNN over the top ``top_k`` if given."""
    sims = q_global @ db_global.T
    hits = 0
    for i, row in enumerate(sims):
        order = np.argsort(-row)[:top_k]
        if q_local is not None:
            scores = mnn_scores(
                q_local[i].astype(np.float32), np.stack([db_local[j] for j in order])
            )
            order = order[np.lexsort((-row[order], -scores))]
        hits += bool(correct(i, int(order[0])))
    return 100.0 * hits / len(sims)


def gardens_sets(root: Path) -> tuple[list[np.ndarray], list[int], list[np.ndarray], list[int]]:
    """Database (view i0 of each place) and queries (the other views), with place ids."""
    db, db_ids, queries, q_ids = [], [], [], []
    places = sorted(p for group in ('pairs', 'triplets') for p in (root / group).glob('p*'))
    for place_id, place in enumerate(places):
        for view in sorted(place.glob('i*')):
            for path in sorted(view.glob('*.jpg')):
                target = (db, db_ids) if view.name == 'i0' else (queries, q_ids)
                target[0].append(load_image(path))
                target[1].append(place_id)
    return db, db_ids, queries, q_ids


def recall_table(data: Path, args: argparse.Namespace) -> None:
    # The registry conf pools the local map by 2; local_pool 1 keeps the stride-16 map that
    # the fp32/stride-16 row stands for (the pooled variants are computed from it).
    model = load_model(EFFICIENTNET, {'local_pool': 1})
    db, db_ids, queries, q_ids = gardens_sets(data / 'gardens_sfu_places')
    datasets = {}
    db_g, db_raw = describe(model, db)
    q_g, q_raw = describe(model, queries)
    datasets['gardens'] = (
        q_g, q_raw, db_g, db_raw, lambda i, j: q_ids[i] == db_ids[j], len(db),
        f'{len(queries)} q / {len(db)} db, re-rank all',
    )  # fmt: skip
    if args.nordland_frames > 0:
        root = data / 'nordland64'
        names = sorted(p.name for p in (root / 'summer').glob('*.png'))[: args.nordland_frames]
        summer = [load_image(root / 'summer' / n) for n in names]
        winter = [load_image(root / 'winter' / n) for n in names]
        s_g, s_raw = describe(model, summer)
        w_g, w_raw = describe(model, winter)
        datasets['nordland'] = (
            w_g, w_raw, s_g, s_raw, lambda i, j: abs(i - j) <= 2, 20,
            f'{len(names)} winter q / summer db, re-rank top 20',
        )  # fmt: skip
    c, h, w = db_raw.shape[1:]
    size = f'{h}x{w}x{c} per place'
    print(f'\n## Table 2: R@1 with {EFFICIENTNET} (local_pool 1) local features ({size})')
    for name, value in datasets.items():
        print(f'# {name}: {value[-1]}')
    names = list(datasets)
    print(f'{"choice":<7} {"locations":>9} {"bytes/place":>12} {"top-20 ms":>10} '
          + ' '.join(f'{"R@1 " + n:>13}' for n in names))  # fmt: skip
    row = [
        recall_at_1(q_g, d_g, None, None, correct, 1)
        for q_g, _, d_g, _, correct, _, _ in datasets.values()
    ]
    print(f'{"global":<7} {"-":>9} {"-":>12} {"-":>10} ' + ' '.join(f'{r:>13.1f}' for r in row))
    for choice in CHOICES:
        recalls = []
        for q_g, q_raw, d_g, d_raw, correct, top_k, _ in datasets.values():
            q_local = [compress(r, choice) for r in q_raw]
            d_local = [compress(r, choice) for r in d_raw]
            recalls.append(recall_at_1(q_g, d_g, q_local, d_local, correct, top_k))
        stored = np.stack(d_local[:20])
        t20 = rerank_seconds(q_local[0], stored, 20, 5)
        print(f'{choice:<7} {stored.shape[1]:>9} {stored[0].nbytes:>12,} {1e3 * t20:>10.2f} '
              + ' '.join(f'{r:>13.1f}' for r in recalls), flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        '--data',
        type=Path,
        default=Path(__file__).resolve().parents[2] / 'shared' / 'datasets',
        help='folder with gardens_sfu_places/ and nordland64/',
    )
    parser.add_argument('--nordland-frames', type=int, default=1000, help='0 skips nordland64')
    parser.add_argument('--threads', type=int, default=1, help='torch CPU threads')
    parser.add_argument('--skip-timing', action='store_true', help='only table 2')
    parser.add_argument('--skip-recall', action='store_true', help='only table 1')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f'# re-ranking storage, {args.threads} thread(s), {os.cpu_count()} cores, load average '
        f'{os.getloadavg()[0]:.2f}, torch {torch.__version__}'
    )
    if not args.skip_timing:
        timing_table(args.data, args)
    if not args.skip_recall:
        recall_table(args.data, args)


if __name__ == '__main__':
    main()
