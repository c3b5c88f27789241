"""Does the place filter hold on places nobody tuned it for? Every shared dataset, defaults.

Runs the relocalization pipeline (``Relocalizer.relocalize_described``: each query
described once by the default model, fed to every method in the order it was taken) on:

- ``nordland``: nordland64 winter queries against a summer map (correct within +-2 frames);
- ``gardens_pairs`` / ``gardens_triplets``: view i0 is the map, the other views the queries
  (correct: the same place folder);
- ``campus``: campus_route even frames the map (with their poses), odd frames the queries
  (correct within 5 m), with odometry from ``data.csv`` for the filter;
- ``generated``: the campus queries re-timed into a route with stops (frames repeated) and
  speed changes (frames skipped), its odometry following;
- ``unvisited``: queries of one dataset against another dataset's map (nothing is correct;
  every accepted answer is a false accept).

Methods, side by side: ``single`` (retrieval + MNN re-ranking), ``sequence`` (patch),
``sequence_global``, ``filter`` (the shipped defaults, with odometry where the dataset has
it) and ``filter_no_odom``. For each: R@1, R@100%P and precision at 90 % recall (top-1
ranked by the published confidence), ECE, and false accepts (confidence >= the node's
``confidence_threshold``) on unvisited places.

Leave one dataset out. The filter's fitted constants (``patch_weight``,
``keyframe_motion``, ``switch_probability``) are chosen from a small grid on every dataset
but one (maximising mean R@1 + R@100%P; campus and generated count as one), then reported
on the one left out: the table's ``filter_lodo`` row, with the constants each fold chose.

    python benchmarks/generalization.py --datasets ../shared/datasets \\
        --output outputs/generalization

Writes ``generalization.json``, ``reliability.png`` (the filter's reliability diagram per
dataset) and ``pr_curves.png``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from vpr_ros.evaluation import build_reference_database
from vpr_ros.imagefolders import list_images, load_image
from vpr_ros.metrics import (
    expected_calibration_error,
    precision_recall_curve,
    recall_at_100_precision,
    reliability_bins,
)
from vpr_ros.pose_policy import PosePolicyConf
from vpr_ros.relocalization import RelocalizationConf, Relocalizer

GRID = {
    'filter.patch_weight': (0.25, 0.5, 1.0),
    'filter.keyframe_motion': ('viterbi', 'marginal'),
    'filter.switch_probability': (0.001, 0.05),
}
THRESHOLD = PosePolicyConf().confidence_threshold  # the node's default


class Dataset:
    """A map's images (and positions), queries in order, correctness, optional odometry."""

    def __init__(
        self,
        name: str,
        map_images: list[Path],
        query_images: list[Path],
        correct: Any,
        *,
        map_xy: np.ndarray | None = None,
        query_xyz: np.ndarray | None = None,
        group: str | None = None,
    ) -> None:
        self.name = name
        self.map_images = map_images
        self.query_images = query_images
        self.correct = correct  # (query index, place index) -> bool
        self.map_xy = map_xy
        self.query_xyz = query_xyz
        self.group = group or name


def load_datasets(root: Path) -> list[Dataset]:
    datasets = []
    summer = list_images(root / 'nordland64/summer')
    winter = list_images(root / 'nordland64/winter')
    datasets.append(
        Dataset('nordland', summer, winter, lambda q, p: abs(q - p) <= 2, group='nordland')
    )
    for kind in ('pairs', 'triplets'):
        images = list_images(root / 'gardens_sfu_places' / kind)
        views = [Path(i).parent.name for i in images]
        places = [Path(i).parent.parent.name for i in images]
        map_images = [i for i, v in zip(images, views, strict=True) if v == 'i0']
        map_places = [p for p, v in zip(places, views, strict=True) if v == 'i0']
        queries = [i for i, v in zip(images, views, strict=True) if v != 'i0']
        query_places = [p for p, v in zip(places, views, strict=True) if v != 'i0']
        datasets.append(
            Dataset(
                f'gardens_{kind}',
                map_images,
                queries,
                lambda q, p, qp=query_places, mp=map_places: qp[q] == mp[p],
                group='gardens',
            )
        )
    campus = root / 'campus_route'
    rows = [line.split(',') for line in (campus / 'data.csv').read_text().split()]
    files = [campus / r[0] for r in rows]
    xyz = np.array([[float(r[1]), float(r[2]), 0.0] for r in rows])
    map_xy, query_xyz = xyz[0::2, :2], xyz[1::2]

    def within_5m(q: int, p: int, queries: np.ndarray = query_xyz) -> bool:
        return bool(np.linalg.norm(queries[q, :2] - map_xy[p]) <= 5.0)

    datasets.append(
        Dataset('campus', files[0::2], files[1::2], within_5m, map_xy=map_xy, query_xyz=query_xyz)
    )
    # Stops (a frame repeated) and speed changes (frames skipped), odometry following.
    rng = np.random.default_rng(0)
    order: list[int] = []
    index = 0
    while index < len(query_xyz):
        order.extend([index] * (int(rng.integers(3, 7)) if rng.random() < 0.15 else 1))
        index += int(rng.choice([1, 1, 1, 2]))
    generated_xyz = query_xyz[order]

    def generated_correct(q: int, p: int, order: list[int] = order) -> bool:
        return within_5m(order[q], p)

    datasets.append(
        Dataset(
            'generated',
            files[0::2],
            [files[1::2][i] for i in order],
            generated_correct,
            map_xy=map_xy,
            query_xyz=generated_xyz,
            group='campus',
        )
    )
    return datasets


def method_confs() -> dict[str, RelocalizationConf]:
    base = RelocalizationConf()
    confs = {
        'single': base.replace(mode='single'),
        'sequence': base.replace(mode='sequence'),
        'sequence_global': base.replace(mode='sequence', **{'sequence.descriptor': 'global'}),
        'filter': base,
    }
    for values in itertools.product(*GRID.values()):
        overrides = dict(zip(GRID, values, strict=True))
        confs['grid:' + json.dumps(overrides)] = base.replace(**overrides)
    return confs


def run_dataset(model: Any, dataset: Dataset, *, progress: bool, limit: int | None) -> dict:
    """Every method on one dataset: per query, correctness and confidence of the top-1."""
    map_images = dataset.map_images
    queries = dataset.query_images[:limit] if limit else dataset.query_images
    database = build_reference_database(
        model, map_images, positions=dataset.map_xy, progress=progress
    )
    confs = method_confs()
    relocalizers = {name: Relocalizer(model, database, conf) for name, conf in confs.items()}
    odometry_methods = {'filter'} | {n for n in confs if n.startswith('grid:')}
    out: dict[str, dict[str, list]] = {
        name: {'correct': [], 'confidence': [], 'ms': []} for name in confs
    }
    out['filter_no_odom'] = {'correct': [], 'confidence': [], 'ms': []}
    no_odom = Relocalizer(model, database, confs['filter'])
    describer = relocalizers['single']
    for q, path in enumerate(queries):
        image = load_image(path)
        descriptors = describer.describe(image)
        odometry = None if dataset.query_xyz is None else dataset.query_xyz[q]
        runs = [(name, r, name in odometry_methods) for name, r in relocalizers.items()]
        runs.append(('filter_no_odom', no_odom, False))
        for name, relocalizer, with_odometry in runs:
            started = time.perf_counter()
            result = relocalizer.relocalize_described(
                image,
                descriptors,
                stamp=float(q),
                odometry_xyz=odometry if with_odometry else None,
            )
            elapsed = time.perf_counter() - started
            best = result.best
            record = out[name]
            record['ms'].append(1e3 * elapsed)
            if best is None:
                record['correct'].append(False)
                record['confidence'].append(float('nan'))
            else:
                record['correct'].append(bool(dataset.correct(q, best.place_index)))
                record['confidence'].append(float(best.confidence))
        if progress and q % 200 == 0:
            print(f'  {dataset.name}: {q}/{len(queries)}', flush=True)
    return out


def scores(record: dict[str, list], *, unvisited: bool = False) -> dict[str, float]:
    correct = np.array(record['correct'], bool)
    confidence = np.array(record['confidence'], np.float64)
    if unvisited:
        accepted = np.nan_to_num(confidence, nan=0.0) >= THRESHOLD
        return {'queries': len(correct), 'false_accepts': int(accepted.sum())}
    precision, recall, _ = precision_recall_curve(correct, confidence)
    reaching = recall >= 0.9
    return {
        'R@1': float(correct.mean()),
        'R@100%P': recall_at_100_precision(correct, confidence),
        'P@90%R': float(precision[reaching].max()) if reaching.any() else 0.0,
        'ECE': expected_calibration_error(correct, confidence),
        'ms_median': float(np.median(record['ms'])),
    }


def leave_one_out(results: dict[str, dict], groups: dict[str, str]) -> dict[str, dict]:
    """Per dataset: the grid constants chosen without its group, and its figures with them."""
    grid_names = [n for n in next(iter(results.values())) if n.startswith('grid:')]
    out = {}
    for name in results:
        others = [d for d in results if groups[d] != groups[name]]

        def objective(method: str, others: list[str] = others) -> float:
            figures = [scores(results[d][method]) for d in others]
            return float(np.mean([f['R@1'] + f['R@100%P'] for f in figures]))

        chosen = max(grid_names, key=objective)
        out[name] = {'chosen': json.loads(chosen[5:]), **scores(results[name][chosen])}
    return out


def plot(results: dict[str, dict], output: Path) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    names = list(results)
    figure, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 4), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        record = results[name]['filter']
        mean, accuracy, count = reliability_bins(
            np.array(record['correct']), np.array(record['confidence'])
        )
        filled = count > 0
        axis.plot([0, 1], [0, 1], 'k:', label='calibrated')
        axis.plot(mean[filled], accuracy[filled], 'o-', label='filter')
        ece = expected_calibration_error(
            np.array(record['correct']), np.array(record['confidence'])
        )
        axis.set_title(f'{name} (ECE {ece:.3f})')
        axis.set_xlabel('confidence')
        axis.set_ylabel('fraction correct')
        axis.legend()
    figure.tight_layout()
    figure.savefig(output / 'reliability.png', dpi=100)
    figure, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 4), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        for method in ('single', 'sequence', 'sequence_global', 'filter'):
            record = results[name][method]
            precision, recall, _ = precision_recall_curve(
                np.array(record['correct']), np.array(record['confidence'])
            )
            axis.plot(recall, precision, label=method)
        axis.set_title(name)
        axis.set_xlabel('recall')
        axis.set_ylabel('precision')
        axis.legend()
    figure.tight_layout()
    figure.savefig(output / 'pr_curves.png', dpi=100)


def per_frame_cost(num_places: int = 100_000, frames: int = 12) -> dict[str, float]:
    """Median milliseconds per frame at ``num_places`` generated places: today's sequence
    matcher on the patch descriptor (64 x 32: D = 2,048) against the filter on the same
    patch descriptor plus the default model's global one (D = 1,280), interleaved."""
    from vpr_ros.place_filter import PlaceFilter
    from vpr_ros.sequence import SequenceMatcher

    rng = np.random.default_rng(0)

    def unit_rows(count: int, dim: int) -> np.ndarray:
        rows = rng.standard_normal((count, dim)).astype(np.float32)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    patch, global_ = unit_rows(num_places, 2048), unit_rows(num_places, 1280)
    xyz = np.c_[3.0 * np.arange(num_places), np.zeros((num_places, 2))]
    matcher = SequenceMatcher(patch, None, {'descriptor': 'global'})
    place_filter = PlaceFilter({'patch': patch, 'global': global_}, np.zeros(num_places), xyz)
    sequence_s, filter_s = [], []
    for i in range(frames):
        started = time.perf_counter()
        matcher.update(patch[i])
        sequence_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        place_filter.update({'patch': patch[i], 'global': global_[i]})
        filter_s.append(time.perf_counter() - started)
    sequence_ms = 1e3 * float(np.median(sequence_s[2:]))
    filter_ms = 1e3 * float(np.median(filter_s[2:]))
    return {
        'places': num_places,
        'sequence_ms': sequence_ms,
        'filter_ms': filter_ms,
        'ratio': filter_ms / sequence_ms,
        'belief_bytes': float(place_filter._tracking.nbytes * 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--datasets', type=Path, default=Path('../shared/datasets'))
    parser.add_argument('--output', type=Path, default=Path('outputs/generalization'))
    parser.add_argument('--only', nargs='+', help='dataset names to run (default: all)')
    parser.add_argument('--limit', type=int, help='queries per dataset (a quick look)')
    parser.add_argument('--no-progress', action='store_true')
    parser.add_argument(
        '--cost-only', action='store_true', help='only the per-frame cost at 100,000 places'
    )
    args = parser.parse_args()
    cost = per_frame_cost()
    print(
        f'per frame at {cost["places"]:,} places: sequence matcher {cost["sequence_ms"]:.1f} ms, '
        f'filter {cost["filter_ms"]:.1f} ms ({cost["ratio"]:.2f}x); belief '
        f'{cost["belief_bytes"] / 1e6:.1f} MB (O(places))',
        flush=True,
    )
    if args.cost_only:
        return
    from vpr_ros.models import DEFAULT_MODEL, load_model

    args.output.mkdir(parents=True, exist_ok=True)
    model = load_model(DEFAULT_MODEL)
    datasets = load_datasets(args.datasets)
    by_name = {d.name: d for d in datasets}
    results: dict[str, dict] = {}
    for dataset in datasets:
        if args.only and dataset.name not in args.only:
            continue
        started = time.perf_counter()
        results[dataset.name] = run_dataset(
            model, dataset, progress=not args.no_progress, limit=args.limit
        )
        print(f'{dataset.name}: {time.perf_counter() - started:.0f} s', flush=True)
    # Unvisited places: another dataset's queries against a map (nothing is correct).
    unvisited: dict[str, dict] = {}
    pairs = [
        ('nordland', 'campus'),
        ('campus', 'gardens_triplets'),
        ('gardens_triplets', 'campus'),
    ]
    for query_name, map_name in pairs:
        if query_name not in by_name or map_name not in by_name:
            continue
        if args.only and (query_name not in args.only or map_name not in args.only):
            continue
        foreign = Dataset(
            f'{query_name}->{map_name}',
            by_name[map_name].map_images,
            by_name[query_name].query_images,
            lambda q, p: False,
            map_xy=by_name[map_name].map_xy,
        )
        run = run_dataset(model, foreign, progress=False, limit=args.limit)
        unvisited[foreign.name] = {
            method: scores(run[method], unvisited=True)
            for method in ('single', 'sequence', 'sequence_global', 'filter_no_odom')
        }
    groups = {name: by_name[name].group for name in results}
    table = {
        name: {
            method: scores(run[method])
            for method in ('single', 'sequence', 'sequence_global', 'filter', 'filter_no_odom')
        }
        for name, run in results.items()
    }
    lodo = leave_one_out(results, groups) if len({*groups.values()}) > 1 else {}
    header = (
        f'{"dataset":<18}{"method":<17}{"R@1":>7}{"R@100%P":>9}{"P@90%R":>8}{"ECE":>7}{"ms":>8}'
    )
    print(header)
    for name, methods in table.items():
        rows = dict(methods)
        if name in lodo:
            rows['filter_lodo'] = lodo[name]
        for method, f in rows.items():
            print(
                f'{name:<18}{method:<17}{100 * f["R@1"]:>6.1f}%{100 * f["R@100%P"]:>8.1f}%'
                f'{100 * f["P@90%R"]:>7.1f}%{f["ECE"]:>7.3f}{f["ms_median"]:>8.1f}'
            )
    for name in lodo:
        print(f'{name}: leave-one-out constants {lodo[name]["chosen"]}')
    print(f'unvisited places (accepted at confidence >= {THRESHOLD}):')
    for name, methods in unvisited.items():
        for method, f in methods.items():
            print(f'  {name:<28}{method:<17}{f["false_accepts"]:>5} / {f["queries"]}')
    (args.output / 'generalization.json').write_text(
        json.dumps({'table': table, 'lodo': lodo, 'unvisited': unvisited}, indent=1)
    )
    if results:
        plot(results, args.output)
    print(f'wrote {args.output}')


if __name__ == '__main__':
    main()
