"""Every re-ranker side by side: recall, re-ranking time, bytes per place, the seed's ratio.

Re-rankers (``vpr_ros.rerankers``): ``mnn`` (SelaVPR), ``mnn_ransac`` (the same matches,
RANSAC on the local-feature grid), ``xfeat_lighterglue`` and ``aliked_lightglue`` (trained
keypoints, shipped matcher, RANSAC), and the cascades ``mnn>xfeat`` / ``mnn>aliked``
(top-20 re-ranked by MNN, the best 3 verified). Every method is a ``RelocalizationConf``
run by the evaluate runner (``vpr_ros.evaluation.evaluate``, i.e. through
``Relocalizer``) with the default model, top_k 100 and rerank_k ``--rerank-k``, on

* ``gardens_pairs`` / ``gardens_triplets``: gardens_sfu_places (day/night, dry/wet); view
  i0 of each place is the map, the other views the queries; the two folders share
  identical images, so each is scored on its own and never pooled;
* ``campus``: campus_route, even frames the map, odd frames the queries, positives within
  ``--radius-m`` (data.csv positions);
* ``nordland64``: winter queries against the summer map as they are (64 x 32), correct
  within +-2 frames; ``--nordland-queries`` evenly spaced queries (0: all 3,576);
* ``generated``: a viewpoint and lighting route: campus_route's odd frames, each warped by
  a random homography (rotation, scale, shift, perspective) and relit (darkened by a
  gamma, a colour cast, sensor noise; seeded), against the even frames; positives within
  ``--radius-m``.

Printed per set and method: R@1, R@5, R@100%P (top-1 thresholded on the confidence), the
re-ranking time per query (the re-ranker's query description + scoring, median over
``--timing-queries`` queries after a warm-up) for top-10 and top-100 candidates (the same
candidates for every re-ranker: the query's top 100 by global similarity, repeated when the
map is smaller), and bytes per place of what the re-ranker reads (the global descriptor,
which every method uses, is listed apart). Then the seed's ratio, MNN time / verification
time on the same candidates, the default pipeline's added time at top-10 on 640 x 480, and
the issue's targets. Nothing here was fitted; the default settings are used throughout::

    python benchmarks/reranking.py --data ../shared/datasets --threads 1 \\
        --out outputs/reranking.json
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from vpr_ros.evaluation import evaluate, evenly_spaced
from vpr_ros.extraction import TorchExtractor
from vpr_ros.imagefolders import list_images, load_image
from vpr_ros.models import DEFAULT_MODEL, load_model
from vpr_ros.relocalization import RelocalizationConf, Relocalizer
from vpr_ros.rerankers import RERANKERS, make_reranker
from vpr_ros.runtime import set_num_threads

RERANKER_NAMES = tuple(RERANKERS)
CASCADES = {'mnn>xfeat': 'xfeat_lighterglue', 'mnn>aliked': 'aliked_lightglue'}
DAY_NIGHT_AND_VIEWPOINT = ('gardens_pairs', 'gardens_triplets', 'generated')


@dataclass
class EvalSet:
    """Reference and query image files, positives per query, reference positions."""

    name: str
    references: list[Path]
    queries: list[Path]
    positives: list[list[int]]
    positions: np.ndarray | None = None


def method_confs(rerank_k: int) -> dict[str, RelocalizationConf]:
    base = RelocalizationConf(top_k=100, rerank_k=rerank_k)
    confs = {'retrieval': base.replace(rerank_k=0)}
    confs.update({name: base.replace(reranker=name) for name in RERANKER_NAMES})
    for name, verifier in CASCADES.items():
        confs[name] = base.replace(rerank_k=20, reranker='mnn', verifier=verifier, verify_k=3)
    return confs


# -- the sets ---------------------------------------------------------------------------------


def gardens(root: Path, folder: str) -> EvalSet:
    places = sorted(p for p in (root / 'gardens_sfu_places' / folder).iterdir() if p.is_dir())
    references, queries, positives = [], [], []
    for index, place in enumerate(places):
        views = sorted(v for v in place.iterdir() if v.is_dir())
        references.append(list_images(views[0])[0])
        for view in views[1:]:
            queries.extend(list_images(view))
            positives.extend([[index]] * len(list_images(view)))
    return EvalSet(f'gardens_{folder}', references, queries, positives)


def campus_positions(root: Path) -> tuple[list[Path], np.ndarray]:
    folder = root / 'campus_route'
    with (folder / 'data.csv').open() as stream:
        rows = [row for row in csv.reader(stream) if row and row[0].endswith('.png')]
    rows.sort(key=lambda row: int(row[0].split('_')[1].split('.')[0]))
    return [folder / row[0] for row in rows], np.array([[float(r[1]), float(r[2])] for r in rows])


def within(query_xy: np.ndarray, reference_xy: np.ndarray, radius_m: float) -> list[list[int]]:
    distances = np.linalg.norm(query_xy[:, None] - reference_xy[None], axis=2)
    return [np.flatnonzero(row <= radius_m).tolist() for row in distances]


def campus(root: Path, radius_m: float) -> EvalSet:
    paths, xy = campus_positions(root)
    even, odd = slice(0, None, 2), slice(1, None, 2)
    return EvalSet(
        'campus', paths[even], paths[odd], within(xy[odd], xy[even], radius_m), xy[even]
    )


def nordland(root: Path, queries: int) -> EvalSet:
    summer = list_images(root / 'nordland64' / 'summer')
    winter = list_images(root / 'nordland64' / 'winter')
    chosen = evenly_spaced(len(winter), queries or None)
    positives = [list(range(max(0, i - 2), min(len(summer), i + 3))) for i in chosen]
    return EvalSet('nordland64', summer, [winter[i] for i in chosen], positives)


def viewpoint_and_lighting(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The image seen from elsewhere in other light: a random homography, then a darkening
    gamma, a colour cast and sensor noise."""
    height, width = image.shape[:2]
    angle = np.deg2rad(rng.uniform(-8, 8))
    scale = rng.uniform(0.85, 1.0)
    shift = rng.uniform(-0.08, 0.08, 2) * (width, height)
    centre = np.array([width / 2, height / 2])
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    homography = np.eye(3)
    homography[:2, :2] = rotation
    homography[:2, 2] = centre - rotation @ centre + shift
    homography[2, :2] = rng.uniform(-3e-4, 3e-4, 2)
    warped = cv2.warpPerspective(image, homography, (width, height), borderMode=cv2.BORDER_REFLECT)
    light = (warped.astype(np.float32) / 255) ** rng.uniform(1.8, 2.6)
    light *= rng.uniform(0.8, 1.2, 3) * rng.uniform(0.6, 0.9)
    light = light * 255 + rng.normal(0, 4, light.shape)
    return np.clip(light, 0, 255).astype(np.uint8)


def generated(root: Path, radius_m: float, folder: Path) -> EvalSet:
    paths, xy = campus_positions(root)
    rng = np.random.default_rng(12)
    queries = []
    for path in paths[1::2]:
        out = folder / f'generated_{path.stem}.png'
        image = viewpoint_and_lighting(load_image(path), rng)
        cv2.imwrite(str(out), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        queries.append(out)
    return EvalSet(
        'generated', paths[0::2], queries, within(xy[1::2], xy[0::2], radius_m), xy[0::2]
    )


# -- measuring --------------------------------------------------------------------------------


def rerank_seconds(
    model, database, eval_set: EvalSet, count: int, ks: tuple[int, ...]
) -> dict[str, dict[int, float]]:
    """Median seconds per query of each re-ranker (query description + scoring) on the same
    candidates: the top 100 by global similarity, repeated to ``k``."""
    extractor = TorchExtractor(model, batch_size=1)
    rerankers = {name: make_reranker(name, database) for name in RERANKER_NAMES}
    picks = evenly_spaced(len(eval_set.queries), count + 1)
    times: dict[str, dict[int, list[float]]] = {n: {k: [] for k in ks} for n in rerankers}
    times.update({name: {ks[0]: []} for name in CASCADES})
    for number, q in enumerate(picks):
        image = load_image(eval_set.queries[q])
        descriptors = extractor.extract([image])
        _, ids = database.search(descriptors.global_descriptors, 100)
        found = ids[0][ids[0] >= 0]
        for name, reranker in rerankers.items():
            for k in ks:
                candidates = found[np.arange(k) % len(found)]
                started = time.perf_counter()
                reranker.rerank(reranker.query_features(image, descriptors), candidates)
                if number > 0:  # the first query warms up
                    times[name][k].append(time.perf_counter() - started)
        for name, verifier in CASCADES.items():
            started = time.perf_counter()
            head = found[:20]
            mnn = rerankers['mnn']
            order = np.argsort(-mnn.rerank(mnn.query_features(image, descriptors), head).scores)
            second = rerankers[verifier]
            second.rerank(second.query_features(image, descriptors), head[order][:3])
            if number > 0:
                times[name][ks[0]].append(time.perf_counter() - started)
    return {n: {k: float(np.median(v)) for k, v in by_k.items()} for n, by_k in times.items()}


def bytes_per_place(database) -> dict[str, int]:
    """Bytes per place each re-ranker reads (besides the global descriptor)."""
    local = database.local_features
    local_bytes = int(local.shape[1] * local.shape[2] * 2) if local is not None else 0
    out = {}
    for name, cls in RERANKERS.items():
        out[name] = local_bytes
        if cls.store is not None:
            out[name] = int(database.feature_stores[cls.store].dtype.itemsize)
    for name, verifier in CASCADES.items():
        out[name] = local_bytes + out[verifier]
    out['retrieval'] = 0
    return out


def grid_sweep(grids: list[tuple[int, int]], dim: int, repeats: int) -> dict[str, dict]:
    """MNN vs mnn_ransac time on the same candidates for local-feature grids of several sizes
    (the default model's 8 x 10 up to SelaVPR's 61 x 61 at 224 px): synthetic unit features,
    each candidate the query's shifted by a cell and perturbed, so that MNN finds real
    matches for RANSAC to verify."""
    from vpr_ros.database import PlaceDatabase, place_records
    from vpr_ros.models.identity import ModelIdentity
    from vpr_ros.rerankers.mnn import MnnReranker
    from vpr_ros.rerankers.mnn_ransac import MnnRansacReranker
    from vpr_ros.types import Frame

    rng = np.random.default_rng(0)
    out = {}
    for grid in grids:
        length = grid[0] * grid[1]
        query = rng.standard_normal((length, dim)).astype(np.float32)
        query /= np.linalg.norm(query, axis=1, keepdims=True)
        places = []
        for _ in range(100):
            shifted = np.roll(query.reshape(grid[0], grid[1], dim), 1, axis=1).reshape(length, dim)
            noisy = shifted + rng.normal(0, 0.08, shifted.shape)
            places.append(noisy / np.linalg.norm(noisy, axis=1, keepdims=True))
        local = np.stack(places).astype(np.float16)
        identity = ModelIdentity('synthetic', '0', '0', global_dim=4, local_dim=dim)
        frames = [Frame(np.zeros((1, 1, 3), np.uint8), i) for i in range(100)]
        database = PlaceDatabase(
            identity,
            np.eye(100, 4, dtype=np.float32),
            place_records(frames),
            local,
            local_grid=grid,
        )
        rerankers = {'mnn': MnnReranker(database), 'mnn_ransac': MnnRansacReranker(database)}
        row: dict[str, float] = {}
        for k in (10, 100):
            for name, reranker in rerankers.items():
                times = []
                for _ in range(repeats + 1):
                    started = time.perf_counter()
                    reranker.rerank(query, np.arange(k))
                    times.append(time.perf_counter() - started)
                row[f'{name}_ms_top{k}'] = 1e3 * float(np.median(times[1:]))
            row[f'ratio_top{k}'] = row[f'mnn_ms_top{k}'] / row[f'mnn_ransac_ms_top{k}']
        out[f'{grid[0]}x{grid[1]}x{dim}'] = row
        print(
            f'grid {grid[0]:>2}x{grid[1]:<2} ({length:>4} locations, {dim}-d): MNN / mnn_ransac '
            f'time {row["ratio_top10"]:.3f} at top-10 ({row["mnn_ms_top10"]:.1f} / '
            f'{row["mnn_ransac_ms_top10"]:.1f} ms), {row["ratio_top100"]:.3f} at top-100 '
            f'({row["mnn_ms_top100"]:.1f} / {row["mnn_ransac_ms_top100"]:.1f} ms)'
        )
    return out


def default_pipeline_ms(model, database, image: np.ndarray, repeats: int) -> dict[str, float]:
    """Median milliseconds the re-ranking stages add per 640 x 480 query at top-10, for the
    default settings and each cascade."""
    confs = {
        'default (mnn)': RelocalizationConf(rerank_k=10),
        **{
            name: RelocalizationConf(rerank_k=20, verifier=verifier, verify_k=3)
            for name, verifier in CASCADES.items()
        },
        **{name: RelocalizationConf(rerank_k=10, reranker=name) for name in RERANKER_NAMES[1:]},
    }
    out = {}
    for name, conf in confs.items():
        relocalizer = Relocalizer(model, database, conf)
        added = []
        for repeat in range(repeats + 1):
            timings = relocalizer.relocalize(image).timings
            if repeat:
                added.append(timings.get('rerank', 0.0) + timings.get('verify', 0.0))
        out[name] = 1e3 * float(np.median(added))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument('--data', type=Path, required=True, help='the datasets folder')
    parser.add_argument('--threads', type=int, default=1, help='torch and faiss threads')
    parser.add_argument('--rerank-k', type=int, default=10, help='places re-ranked')
    parser.add_argument('--radius-m', type=float, default=5.0, help='campus/generated positives')
    parser.add_argument('--nordland-queries', type=int, default=300, help='0: all 3,576')
    parser.add_argument('--timing-queries', type=int, default=3, help='queries timed per set')
    parser.add_argument(
        '--grid-sweep',
        action=argparse.BooleanOptionalAction,
        default=True,
        help='also time MNN vs mnn_ransac on synthetic grids up to SelaVPR size',
    )
    parser.add_argument(
        '--sets',
        nargs='*',
        default=['gardens_pairs', 'gardens_triplets', 'campus', 'nordland64', 'generated'],
    )
    parser.add_argument('--out', type=Path, help='JSON file for every number')
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # each set's table as soon as it is done
    set_num_threads(args.threads)
    model = load_model(DEFAULT_MODEL)
    confs = method_confs(args.rerank_k)
    workdir = Path(tempfile.mkdtemp(prefix='reranking-'))
    makers: dict[str, Callable[[], EvalSet]] = {
        'gardens_pairs': lambda: gardens(args.data, 'pairs'),
        'gardens_triplets': lambda: gardens(args.data, 'triplets'),
        'campus': lambda: campus(args.data, args.radius_m),
        'nordland64': lambda: nordland(args.data, args.nordland_queries),
        'generated': lambda: generated(args.data, args.radius_m, workdir),
    }
    report: dict = {'args': {k: str(v) for k, v in vars(args).items()}, 'sets': {}}
    database = None
    for set_name in args.sets:
        eval_set = makers[set_name]()
        started = time.perf_counter()
        result = evaluate(
            model,
            eval_set.references,
            eval_set.queries,
            eval_set.positives,
            confs['mnn'],
            methods=confs,
            reference_positions=eval_set.positions,
            num_threads=args.threads,
            progress=False,
        )
        database = result.database
        seconds = rerank_seconds(model, database, eval_set, args.timing_queries, (10, 100))
        sizes = bytes_per_place(database)
        rows = {}
        for name, method in result.methods.items():
            rows[name] = {
                'R@1': method.recalls.get(1),
                'R@5': method.recalls.get(5),
                'R@100%P': method.recall_at_100_precision,
                'ms_top10': 1e3 * seconds[name][10] if name in seconds else None,
                'ms_top100': 1e3 * seconds[name][100] if 100 in seconds.get(name, {}) else None,
                'bytes_per_place': sizes.get(name),
            }
        report['sets'][set_name] = {
            'queries': len(eval_set.queries),
            'places': len(eval_set.references),
            'global_bytes_per_place': int(database.global_descriptors.shape[1] * 4),
            'seconds': time.perf_counter() - started,
            'methods': rows,
            'ratio_mnn_over': {
                verifier: {k: seconds['mnn'][k] / seconds[verifier][k] for k in (10, 100)}
                for verifier in RERANKER_NAMES[1:]
            },
        }
        print_set(set_name, report['sets'][set_name])
    if database is not None:
        image = cv2.resize(load_image(makers_first_image(args.data)), (640, 480))
        report['added_ms_640x480_top10'] = default_pipeline_ms(model, database, image, 5)
    if args.grid_sweep:
        print('\n## MNN vs mnn_ransac time by grid size (synthetic features)')
        report['grid_sweep'] = grid_sweep([(8, 10), (16, 16), (32, 32), (61, 61)], 128, 3)
    if report['sets']:
        print_summary(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f'\nwritten to {args.out}')


def makers_first_image(root: Path) -> Path:
    return list_images(root / 'gardens_sfu_places' / 'pairs' / 'p0' / 'i1')[0]


def fmt(value: float | None, scale: float = 100.0, digits: int = 1) -> str:
    return '-' if value is None else f'{value * scale:.{digits}f}'


def print_set(name: str, entry: dict) -> None:
    print(
        f'\n## {name}: {entry["queries"]} queries, {entry["places"]} places '
        f'(global descriptor {entry["global_bytes_per_place"]} B/place; '
        f'{entry["seconds"]:.0f} s)'
    )
    print(
        f'{"method":<20}{"R@1":>7}{"R@5":>7}{"R@100%P":>9}{"ms top10":>10}{"ms top100":>11}'
        f'{"B/place":>9}'
    )
    for method, row in entry['methods'].items():
        print(
            f'{method:<20}{fmt(row["R@1"]):>7}{fmt(row["R@5"]):>7}{fmt(row["R@100%P"]):>9}'
            f'{fmt(row["ms_top10"], 1):>10}{fmt(row["ms_top100"], 1):>11}'
            f'{row["bytes_per_place"] if row["bytes_per_place"] is not None else "-":>9}'
        )
    print('(cascades: top-20 by MNN, the best 3 verified, under "ms top10")')
    ratios = ', '.join(
        f'{v}: {r[10]:.3f} (top-10) / {r[100]:.3f} (top-100)'
        for v, r in entry['ratio_mnn_over'].items()
    )
    print(f'MNN time / verification time on the same candidates: {ratios}')


def print_summary(report: dict) -> None:
    sets = report['sets']
    print('\n## Targets')
    verifiers = [m for m in next(iter(sets.values()))['methods'] if m not in ('retrieval', 'mnn')]
    for verifier in verifiers:
        gains, worst = [], 0.0
        for name, entry in sets.items():
            mnn_r1 = entry['methods']['mnn']['R@1'] or 0.0
            r1 = entry['methods'][verifier]['R@1'] or 0.0
            if name in DAY_NIGHT_AND_VIEWPOINT:
                gains.append((name, r1 > mnn_r1))
            else:
                worst = min(worst, r1 - mnn_r1)
        beats = all(ok for _, ok in gains)
        print(
            f'{verifier:<20} beats mnn R@1 on day/night + viewpoint: '
            f'{"yes" if beats else "no"} ({", ".join(f"{n}: {ok}" for n, ok in gains)}); '
            f'worst elsewhere {100 * worst:+.1f} points ({"ok" if worst >= -0.01 else "NOT met"})'
        )
    for k in (10, 100):
        ratios = [e['ratio_mnn_over']['mnn_ransac'][k] for e in sets.values()]
        print(
            f'MNN / mnn_ransac time at top-{k}: median {np.median(ratios):.3f} over the sets '
            f'({"met" if np.median(ratios) <= 0.05 else "NOT met"}: target <= 0.05)'
        )
    added = report.get('added_ms_640x480_top10', {})
    for name, ms in added.items():
        print(f'added per 640x480 query, {name}: {ms:.1f} ms')
    if 'default (mnn)' in added:
        ok = added['default (mnn)'] <= 100
        print(f'default pipeline adds <= 100 ms: {"met" if ok else "NOT met"}')


if __name__ == '__main__':
    main()
