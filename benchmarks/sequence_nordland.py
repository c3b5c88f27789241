"""Sequence matching on Nordland64: winter queries against a summer map, beside SeqSLAM.

Loads ``nordland64/summer`` (the map, one traverse in frame order) and
``nordland64/winter`` (the queries, in frame order) from their PNGs, describes every
image with ``patch_normalised_descriptor`` (64 x 32 grey, 8 x 8 patches) and scores, with
the frame-aligned ground truth (correct within +-2 frames):

- single-frame matching (top cosine similarity);
- a plain SeqSLAM-style baseline, implemented here: difference matrix, local contrast
  enhancement (z-score over +-5 map frames), and for each query the straight line of
  ``L`` frames ending at it with the best mean enhanced difference, over the velocities
  0.8..1.2 map frames per query frame (causal, like the online matcher: the sequence
  ends at the query);
- ``vpr_ros.sequence.match_traverse`` (the online matcher, frame by frame), with
  ``memory`` 'decay' and 'window', at the same sequence lengths.

For each: Recall@1 and the recall at 100 % precision (top-1 thresholded on the
confidence; for single frames and the baseline, the margin of the best score over the
best one more than 10 frames away, SeqSLAM's uniqueness test), with the strict +-2 frames
and again counting exact duplicate frames as the same place (see
``duplicate_aware_truth``). The precision-recall curves go to
``<output>/sequence_nordland_pr.png`` and every number to ``<output>/sequence_nordland.json``.

Then places never visited: the map without summer frames 1200..2199, the whole winter
traverse as queries; how many queries over the missing stretch the default configuration
accepts (confidence >= ``min_confidence``), against those on the map.

Finally the cost per frame of ``SequenceMatcher.update`` (median over frames after
warm-up; distances vs. sequence part) for maps of 3,576 and 100,000 generated places, for
the 64 x 32 (D = 2,048) and 32 x 16 (D = 512) descriptors. BLAS threads are whatever
numpy starts with; on a shared machine set them before Python starts::

    OPENBLAS_NUM_THREADS=1 python benchmarks/sequence_nordland.py \\
        --dataset ../shared/datasets/nordland64 --output outputs/sequence_nordland
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from vpr_ros.ground_truth import duplicate_runs, widen_over_duplicates
from vpr_ros.imagefolders import list_images, load_image
from vpr_ros.metrics import precision_recall_curve, recall_at_100_precision
from vpr_ros.results import plot_pr_curve
from vpr_ros.sequence import (
    SequenceConf,
    SequenceMatcher,
    match_traverse,
    patch_normalised_descriptor,
)

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 2  # frames
EXCLUSION = 10  # frames, for the margins of the single-frame and baseline answers
HELD_OUT = (1200, 2200)  # summer frames left out of the map for the never-visited test


def load_traverse(folder: Path) -> tuple[list[str], np.ndarray]:
    """The PNGs of one traverse, in frame order, as RGB uint8 (N, H, W, 3)."""
    paths = list_images(folder, '*.png')
    return [p.name for p in paths], np.stack([load_image(p) for p in paths])


def margin_to_elsewhere(scores: np.ndarray, best: np.ndarray, exclusion: int) -> np.ndarray:
    """best score minus the best score more than ``exclusion`` rows away; scores (N, Q)."""
    columns = np.arange(scores.shape[1])
    rows = np.arange(scores.shape[0])[:, None]
    elsewhere = np.where(np.abs(rows - best[None, :]) <= exclusion, -np.inf, scores).max(0)
    return scores[best, columns] - elsewhere


def single_frame(map_desc: np.ndarray, query_desc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 by cosine similarity; confidence: margin over the best elsewhere."""
    similarity = map_desc @ query_desc.T  # (N, Q)
    best = similarity.argmax(0)
    return best, margin_to_elsewhere(similarity, best, EXCLUSION)


def seqslam_baseline(
    map_desc: np.ndarray,
    query_desc: np.ndarray,
    length: int,
    *,
    contrast_radius: int = 5,
    velocities: tuple[float, float] = (0.8, 1.2),
) -> tuple[np.ndarray, np.ndarray]:
    """Plain SeqSLAM, causal: the best straight line of ``length`` frames ending at a query.

    Returns:
        best map index (Q,) and confidence (Q,): the line's mean enhanced difference below
        the best line ending more than ``EXCLUSION`` frames away.
    """
    num_map, num_queries = len(map_desc), len(query_desc)
    difference = np.sqrt(np.maximum(2.0 - 2.0 * (map_desc @ query_desc.T), 0.0))  # (N, Q)
    enhanced = _contrast_enhance(difference.astype(np.float64), contrast_radius)
    span = max(length - 1, 1)
    moves = range(round(velocities[0] * span), round(velocities[1] * span) + 1)
    frames = np.minimum(np.arange(num_queries) + 1, length).astype(np.float32)
    best_score = np.full((num_map, num_queries), np.inf, np.float32)
    for move in moves:
        total = np.zeros((num_map, num_queries), np.float32)
        for t in range(length):  # t frames before the query, round(t * v) places back
            back = round(t * move / span)
            if back >= num_map:
                total[:] = np.inf
                break
            total[back:, t:] += enhanced[: num_map - back, : num_queries - t]
            total[:back, t:] = np.inf  # the line would start before the map
        np.minimum(best_score, total / frames, out=best_score)
    best = best_score.argmin(0)
    return best, margin_to_elsewhere(-best_score, best, EXCLUSION)


def _contrast_enhance(difference: np.ndarray, radius: int) -> np.ndarray:
    """Each column z-scored over the rows within ``radius`` of each row (float32)."""
    num = difference.shape[0]
    padded = np.pad(difference, ((1, 0), (0, 0)))
    cumulative = np.cumsum(padded, 0)
    cumulative_sq = np.cumsum(padded * padded, 0)
    rows = np.arange(num)
    lo, hi = np.maximum(rows - radius, 0), np.minimum(rows + radius + 1, num)
    count = (hi - lo)[:, None]
    mean = (cumulative[hi] - cumulative[lo]) / count
    variance = (cumulative_sq[hi] - cumulative_sq[lo]) / count - mean * mean
    return ((difference - mean) / np.sqrt(np.maximum(variance, 1e-12))).astype(np.float32)


def duplicate_aware_truth(summer: np.ndarray, winter: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[lo, hi] of the map frames correct for each query, counting exact duplicates.

    Both traverses repeat frames where the train stood still (the first 17 frames of both,
    the last 15 of winter): a query that is an exact copy of other query frames may be
    matched to any of their places, and a map frame that is an exact copy of a correct
    one is correct (the dataset README: "a match on a neighbouring duplicate is fine").
    The rule is ``vpr_ros.ground_truth.widen_over_duplicates``, which ``evaluate
    --duplicate-frames`` applies too.
    """
    last = len(summer) - 1
    positives = [
        np.arange(min(max(i - TOLERANCE, 0), last), min(i + TOLERANCE, last) + 1)
        for i in range(len(winter))
    ]
    widened = widen_over_duplicates(positives, duplicate_runs(winter), duplicate_runs(summer))
    return np.array([p.min() for p in widened]), np.array([p.max() for p in widened])


def score(
    name: str,
    best: np.ndarray,
    confidence: np.ndarray,
    truth: np.ndarray,
    lenient: tuple[np.ndarray, np.ndarray],
) -> dict:
    correct = np.abs(best - truth) <= TOLERANCE
    precision, recall, _ = precision_recall_curve(correct, confidence)
    correct_lenient = (best >= lenient[0]) & (best <= lenient[1])
    return {
        'name': name,
        'recall_at_1': float(correct.mean()),
        'recall_at_100_precision': recall_at_100_precision(correct, confidence),
        'duplicates_ok_recall_at_1': float(correct_lenient.mean()),
        'duplicates_ok_recall_at_100_precision': recall_at_100_precision(
            correct_lenient, confidence
        ),
        'precision': precision,
        'recall': recall,
    }


def never_visited(map_desc: np.ndarray, query_desc: np.ndarray, conf: dict) -> dict:
    """Accepted queries with summer frames HELD_OUT missing from the map."""
    keep = np.r_[0 : HELD_OUT[0], HELD_OUT[1] : len(map_desc)]
    best, _, confidence = match_traverse(query_desc, map_desc[keep], conf=conf)
    threshold = SequenceMatcher(map_desc[:2], conf=conf).conf.min_confidence
    accepted = confidence >= threshold
    visited = np.zeros(len(query_desc), bool)
    visited[keep] = True
    # ``best`` indexes the reduced map: compare in original frame numbers (-1: no answer).
    answered = best >= 0
    original = keep[np.where(answered, best, 0)]
    correct = visited & answered & (np.abs(original - np.arange(len(query_desc))) <= TOLERANCE)
    lag = conf.get('length', SequenceConf().length)
    after_lag = ~visited
    after_lag[HELD_OUT[0] : HELD_OUT[0] + 2 * lag] = False
    return {
        'min_confidence': threshold,
        'unvisited_queries': int((~visited).sum()),
        'unvisited_accepted': int(accepted[~visited].sum()),
        'unvisited_accepted_after_2L': int(accepted[after_lag].sum()),
        'visited_queries': int(visited.sum()),
        'visited_accepted': int(accepted[visited].sum()),
        'visited_accepted_wrong': int((accepted & visited & ~correct).sum()),
    }


def time_per_frame(
    num_places: int, dim: int, conf: dict, frames: int, rng: np.random.Generator
) -> dict:
    """Median ms per ``update`` (after warm-up) on a generated map: total, distances, rest."""
    map_desc = rng.standard_normal((num_places, dim), dtype=np.float32)
    map_desc /= np.linalg.norm(map_desc, axis=1, keepdims=True)
    matcher = SequenceMatcher(map_desc, conf=conf)
    warm_up = 4 * conf['length'] if conf['memory'] == 'window' else 3
    route = np.arange(1000, 1000 + warm_up + frames) % num_places
    noise = rng.standard_normal((len(route), dim), dtype=np.float32) * 0.1
    times = []
    for i, place in enumerate(route):
        start = time.perf_counter()
        matcher.update(map_desc[place] + noise[i])
        if i >= warm_up:
            timings = matcher.last_timings
            times.append(
                (time.perf_counter() - start, timings['differences_s'], timings['sequence_s'])
            )
    total, differences, sequence = (1e3 * np.median(column) for column in zip(*times))
    return {
        'places': num_places,
        'dim': dim,
        'memory': conf['memory'],
        'length': conf['length'],
        'total_ms': float(total),
        'differences_ms': float(differences),
        'sequence_ms': float(sequence),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        '--dataset',
        type=Path,
        default=REPO.parent / 'shared' / 'datasets' / 'nordland64',
        help='nordland64 folder with summer/ and winter/',
    )
    parser.add_argument('--output', type=Path, default=REPO / 'outputs' / 'sequence_nordland')
    parser.add_argument('--lengths', type=int, nargs='+', default=[5, 10, 20, 30])
    parser.add_argument(
        '--timing-places', type=int, nargs='+', default=[3576, 100_000], help='map sizes'
    )
    parser.add_argument('--timing-frames', type=int, default=20, help='timed frames per size')
    args = parser.parse_args(argv)

    threads = os.environ.get('OPENBLAS_NUM_THREADS', 'unset')
    print(
        f'# sequence matching, nordland64 winter -> summer, +-{TOLERANCE} frames; '
        f'OPENBLAS_NUM_THREADS={threads}, {os.cpu_count()} cores, '
        f'load average {os.getloadavg()[0]:.1f}'
    )
    _, summer = load_traverse(args.dataset / 'summer')
    winter_names, winter = load_traverse(args.dataset / 'winter')
    map_desc = patch_normalised_descriptor(summer)
    query_desc = patch_normalised_descriptor(winter)
    truth = np.arange(len(query_desc))  # frame-aligned: same name, same place
    lenient = duplicate_aware_truth(summer, winter)
    print(
        f'map {len(map_desc)} summer frames, {len(query_desc)} winter queries, '
        f'D={map_desc.shape[1]}'
    )

    results = [score('single frame', *single_frame(map_desc, query_desc), truth, lenient)]
    runs: list[tuple[str, int]] = []
    for length in args.lengths:
        started = time.perf_counter()
        results.append(
            score(
                f'SeqSLAM L={length}',
                *seqslam_baseline(map_desc, query_desc, length),
                truth,
                lenient,
            )
        )
        runs.append(('baseline', time.perf_counter() - started))
        for memory in ('decay', 'window'):
            conf = {'memory': memory, 'length': length}
            started = time.perf_counter()
            best, _, confidence = match_traverse(query_desc, map_desc, conf=conf)
            runs.append((memory, time.perf_counter() - started))
            results.append(score(f'ours {memory} L={length}', best, confidence, truth, lenient))

    print(f'\n{"":24s} {"+-2 frames":>16s} {"duplicates equal":>18s}')
    print(f'{"method":24s} {"R@1":>7s} {"R@100%P":>8s} {"R@1":>8s} {"R@100%P":>8s}')
    for result in results:
        print(
            f'{result["name"]:24s} {100 * result["recall_at_1"]:6.1f}% '
            f'{100 * result["recall_at_100_precision"]:7.1f}% '
            f'{100 * result["duplicates_ok_recall_at_1"]:7.1f}% '
            f'{100 * result["duplicates_ok_recall_at_100_precision"]:7.1f}%'
        )
    by_name = {r['name']: r for r in results}
    for length in args.lengths:
        base = by_name[f'SeqSLAM L={length}']
        for memory in ('decay', 'window'):
            ours = by_name[f'ours {memory} L={length}']
            met = 'met' if ours['recall_at_1'] >= 0.95 else 'not met'
            ours_p100, base_p100 = ours['recall_at_100_precision'], base['recall_at_100_precision']
            better = 'better' if ours_p100 > base_p100 else 'not better'
            print(
                f'L={length:2d} {memory:6s}: R@1 {100 * ours["recall_at_1"]:.1f}% '
                f'(target >= 95 %: {met}), R@100%P {100 * ours_p100:.1f}% vs baseline '
                f'{100 * base_p100:.1f}% ({better})'
            )

    unvisited = never_visited(map_desc, query_desc, {})
    print(
        f'\nnever visited (summer {HELD_OUT[0]}..{HELD_OUT[1] - 1} left out of the map, '
        f'default conf, min_confidence {unvisited["min_confidence"]}): '
        f'{unvisited["unvisited_accepted"]}/{unvisited["unvisited_queries"]} unvisited queries '
        f'accepted ({unvisited["unvisited_accepted_after_2L"]} after the first 2L frames off '
        f'the map); {unvisited["visited_accepted"]}/{unvisited["visited_queries"]} visited '
        f'accepted, {unvisited["visited_accepted_wrong"]} of them wrong'
    )

    rng = np.random.default_rng(0)
    timing = []
    print(
        f'\n{"places":>8s} {"D":>5s} {"memory":>7s} {"L":>3s} {"ms/frame":>9s} '
        f'{"distances":>10s} {"sequence":>9s}'
    )
    for num_places in args.timing_places:
        for dim in (2048, 512):
            for memory, length in (('decay', 10), ('window', 30)):
                conf = {'memory': memory, 'length': length}
                row = time_per_frame(num_places, dim, conf, args.timing_frames, rng)
                timing.append(row)
                print(
                    f'{num_places:8d} {dim:5d} {memory:>7s} {length:3d} {row["total_ms"]:9.1f} '
                    f'{row["differences_ms"]:10.1f} {row["sequence_ms"]:9.1f}'
                )

    args.output.mkdir(parents=True, exist_ok=True)
    curves = {
        r['name']: (r['precision'], r['recall'])
        for r in results
        if r['name'] == 'single frame'
        or r['name'].endswith(f'L={max(args.lengths)}')
        or r['name'].endswith('L=10')
    }
    plot = plot_pr_curve(
        curves,
        args.output / 'sequence_nordland_pr.png',
        title=f'Nordland64 winter -> summer, top-1 PR (+-{TOLERANCE} frames)',
    )
    summary = {
        'dataset': str(args.dataset),
        'queries': len(winter_names),
        'tolerance_frames': TOLERANCE,
        'methods': [
            {k: v for k, v in r.items() if k not in ('precision', 'recall')} for r in results
        ],
        'never_visited': unvisited,
        'time_per_frame': timing,
        'match_seconds': [{'method': m, 'seconds': s} for m, s in runs],
    }
    (args.output / 'sequence_nordland.json').write_text(json.dumps(summary, indent=2))
    print(f'\nPR curves: {plot}\nnumbers: {args.output / "sequence_nordland.json"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
