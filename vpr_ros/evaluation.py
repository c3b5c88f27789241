"""Evaluation of place recognition against ground truth, ROS-free.

A reference (a map, or a folder of reference images that is turned into an in-memory map)
is matched with query images through the shipped pipeline (``Relocalizer.match``), once
with retrieval only (``rerank_k = 0``) and once with the configured re-ranking, and each
of those *methods* is scored:

* Recall@N (cumulative): a query counts at N if any of its first N predictions is a
  positive (a reference place that shows the same place); over the queries that have a
  positive;
* the precision-recall curve of the top-1 answer thresholded on its confidence, and the
  recall at 100 % precision (the fraction of the queries with a positive accepted, all
  correctly, at the best threshold that accepts no wrong answer). Queries without a
  positive (e.g. off the mapped route) count here too: accepting one is a wrong answer;
* per-query latency (query extraction + matching; image decoding excluded), median and
  95th percentile.

Ground truth is a list with, for each query, the array of positive reference indices. It
comes from one of:

* ``positives_from_utm``: ``@east@north@`` in the file names (the gmberton/VPR-methods
  convention), positives within ``radius_m`` (25 m as in the common benchmarks);
  ``positives_within_radius`` does the same from coordinates (e.g. map poses);
* ``positives_from_vprbench``: VPR-Bench style ground truth, read without pickle;
* ``positives_frame_aligned``: frame-aligned traverses (same name = same place, +-k frames);
* ``positives_same_folder``: same leading folder(s) = same place.

Sequence matching (``vpr_ros.sequence``) is a third method: ``evaluate_sequence`` feeds
the queries, in their order, to a ``SequenceMatcher`` over the reference's keyframe order
(``traverse`` ids of a map) and scores its answers the same way; descriptors are either
the model's global descriptors (``result.query_globals`` and the map's) or the cheap
patch-normalised images (``sequence_descriptors``). Any other mode plugs in the same way:
produce top-K predictions (Q, K), a top-1 confidence (Q,) and per-query latencies (Q,),
then ``result.add_method(summarize(name, predictions, confidences, result.positives,
latencies_s, num_db=result.num_db))``; the table, ``results.json`` and the PR plot then
include it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import cv2
import numpy as np
from scipy.spatial import cKDTree
from tqdm import tqdm

from vpr_ros import logger
from vpr_ros.database import PLACE_DTYPE, PlaceDatabase
from vpr_ros.errors import ConfigError, ImageDecodeError
from vpr_ros.extraction import Extractor
from vpr_ros.models.base import VprModel
from vpr_ros.relocalization import RelocalizationConf, Relocalizer
from vpr_ros.runtime import set_num_threads

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.ppm', '.pgm', '.tif', '.tiff', '.webp')
DEFAULT_RECALL_NS = (1, 5, 10, 20)
DEFAULT_RADIUS_M = 25.0
DEFAULT_TOLERANCE = 2

RETRIEVAL = 'retrieval'
RERANKED = 'reranked'
SEQUENCE = 'sequence'

# Turns a VPR-Bench ``ground_truth_new.npy`` (an object array of [query_index, [db indices]],
# which needs pickle) into the pickle-free .npz that ``positives_from_vprbench`` reads. It
# unpickles the input, so run it only on a file from a source you trust.
VPRBENCH_CONVERSION = (
    "python -c \"import numpy as np; g = np.load('ground_truth_new.npy', allow_pickle=True); "
    'p = [(int(r[0]), int(d)) for r in g for d in np.atleast_1d(r[1])]; '
    "np.savez('ground_truth.npz', query_index=np.array([q for q, _ in p], int), "
    'db_index=np.array([d for _, d in p], int), num_queries=len(g))"'
)

# -- images ---------------------------------------------------------------------------------


def natural_key(name: str | os.PathLike) -> tuple[list[int | str], str]:
    """Sort key that orders the digit runs of a name by value: ``f2`` before ``f10``.

    Frame numbers are rarely zero-padded the same way across datasets, and a plain string
    sort would put ``10`` between ``1`` and ``2``, scrambling traverses and sequences.
    """
    text = PurePath(name).as_posix() if isinstance(name, PurePath) else os.fspath(name)
    parts = [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', text)]
    return parts, text


def list_images(root: str | os.PathLike, pattern: str = '**/*') -> list[Path]:
    """Image files under ``root`` matching ``pattern`` (a ``Path.glob`` pattern).

    Sorted naturally (``natural_key``: ``2.png`` before ``10.png``), which is the frame
    order of traverses and sequences and the index order of VPR-Bench ground truth.

    Raises:
        FileNotFoundError: ``root`` is not a directory.
        ConfigError: nothing matches.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f'image folder {str(root)!r} does not exist')
    paths = sorted(
        (p for p in root.glob(pattern) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
        key=lambda p: natural_key(p.relative_to(root)),
    )
    if not paths:
        msg = (
            f'no images ({", ".join(IMAGE_EXTENSIONS)}) match {pattern!r} under {str(root)!r}; '
            f'check the folder and the glob pattern'
        )
        raise ConfigError(msg)
    return paths


def relative_names(paths: Sequence[Path], root: str | os.PathLike) -> list[str]:
    """``paths`` relative to ``root`` as POSIX strings (the names ground truth compares)."""
    return [PurePath(os.path.relpath(p, root)).as_posix() for p in paths]


def load_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as an RGB uint8 array (H, W, 3); greyscale is expanded to 3 channels.

    Raises:
        ImageDecodeError: the file is missing or cannot be decoded.
    """
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ImageDecodeError(f'unreadable image file: {str(path)!r} is missing or corrupt')
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


# -- ground truth ---------------------------------------------------------------------------


def parse_utm(name: str | os.PathLike) -> tuple[float, float]:
    """(east, north) in metres from a file name ``...@east@north@...`` (gmberton convention).

    The coordinates are the first two ``@``-separated fields of the file name (the VPR
    dataset format ``@utm_east@utm_north@utm_zone@...@.jpg``); both must be finite numbers.
    Training and evaluation read names with this one function.

    Raises:
        ConfigError: the name has no ``@east@north@`` part, or its fields are not numbers.
    """
    base = PurePath(name).name
    parts = base.split('@')
    if len(parts) < 4:
        msg = (
            f'file name {base!r} has no UTM coordinates; name images '
            f"'@<east>@<north>@....jpg' (metres) or use another ground truth (--gt)"
        )
        raise ConfigError(msg)
    try:
        east, north = float(parts[1]), float(parts[2])
    except ValueError:
        east = north = math.nan
    if not (math.isfinite(east) and math.isfinite(north)):
        msg = (
            f'file name {base!r}: UTM coordinates {parts[1]!r}, {parts[2]!r} are not finite '
            f"numbers; name images '@<east>@<north>@....jpg' (metres)"
        )
        raise ConfigError(msg)
    return east, north


def positives_within_radius(
    db_xy: np.ndarray, query_xy: np.ndarray, radius_m: float = DEFAULT_RADIUS_M
) -> list[np.ndarray]:
    """For each query, the sorted indices of reference positions within ``radius_m``.

    Args:
        db_xy: (N, 2) reference positions (metres, e.g. east/north).
        query_xy: (Q, 2) query positions in the same frame.
        radius_m: positive radius in metres (inclusive).
    """
    db_xy = np.asarray(db_xy, np.float64).reshape(-1, 2)
    query_xy = np.asarray(query_xy, np.float64).reshape(-1, 2)
    if radius_m < 0:
        raise ValueError(f'radius_m must be >= 0, got {radius_m!r}')
    if not np.isfinite(db_xy).all():
        raise ConfigError('reference positions contain NaN/inf; every place needs a position')
    if len(db_xy) == 0:
        return [np.zeros(0, np.int64) for _ in range(len(query_xy))]
    tree = cKDTree(db_xy)
    neighbours = tree.query_ball_point(query_xy, r=radius_m) if len(query_xy) else []
    return [np.array(sorted(n), np.int64) for n in neighbours]


def positives_from_utm(
    db_paths: Sequence[str | os.PathLike],
    query_paths: Sequence[str | os.PathLike],
    radius_m: float = DEFAULT_RADIUS_M,
) -> list[np.ndarray]:
    """Positives from ``@east@north@`` file names: reference images within ``radius_m``."""
    db_xy = np.array([parse_utm(p) for p in db_paths], np.float64).reshape(-1, 2)
    query_xy = np.array([parse_utm(p) for p in query_paths], np.float64).reshape(-1, 2)
    return positives_within_radius(db_xy, query_xy, radius_m)


def positives_from_vprbench(
    path: str | os.PathLike, *, num_queries: int | None = None, num_db: int | None = None
) -> list[np.ndarray]:
    """Positives from a VPR-Bench style ground-truth file, read with ``allow_pickle=False``.

    Query i is the i-th query image in ``list_images`` order; reference j the j-th reference image
    (or map place). Accepted files:

    * ``.npy`` bool (Q, N): ``gt[i, j]`` is True when reference j is a positive of query i
      (an integer 0/1 matrix works too when N != 2);
    * ``.npy`` integer (Q, 2): inclusive index ranges ``[first, last]`` per query
      (``first > last`` or negative = no positive);
    * ``.npz`` with ``positives`` (a bool matrix as above) or ``ranges`` (as above), or the
      pairs ``query_index`` (M,) + ``db_index`` (M,) with an optional ``num_queries``.

    VPR-Bench's own ``ground_truth_new.npy`` is an object array of
    ``[query_index, [db indices]]`` that only pickle can read; convert it once with
    ``VPRBENCH_CONVERSION`` (printed in the error).

    Args:
        path: the file.
        num_queries: if given, the number of queries the file must describe.
        num_db: if given, every index must be below it.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ConfigError: the file is an object array, or its layout or indices are invalid.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'ground-truth file {str(path)!r} does not exist')
    try:
        data = np.load(path, allow_pickle=False)
    except ValueError as err:
        if 'allow_pickle' in str(err) or 'Object arrays' in str(err):
            msg = (
                f'ground truth {str(path)!r} is a pickled object array (VPR-Bench '
                f'ground_truth_new.npy), which is not loaded for safety; convert it once, '
                f'from a trusted source, with: {VPRBENCH_CONVERSION} and pass the .npz'
            )
            raise ConfigError(msg) from None
        raise ConfigError(f'cannot read ground truth {str(path)!r}: {err}') from err
    except OSError as err:
        raise ConfigError(f'cannot read ground truth {str(path)!r}: {err}') from err
    if isinstance(data, np.lib.npyio.NpzFile):
        with data:
            positives = _positives_from_npz(path, {k: data[k] for k in data.files})
    else:
        positives = _positives_from_array(path, data)
    if num_queries is not None and len(positives) != num_queries:
        msg = (
            f'ground truth {str(path)!r} describes {len(positives)} queries, but there are '
            f'{num_queries} query images; check the query folder or glob'
        )
        raise ConfigError(msg)
    if num_db is not None:
        top = max((int(p.max()) for p in positives if len(p)), default=-1)
        if top >= num_db:
            msg = (
                f'ground truth {str(path)!r} names reference index {top}, but there are only '
                f'{num_db} reference images/places; check the reference folder or map'
            )
            raise ConfigError(msg)
    return positives


def _positives_from_array(path: Path, data: np.ndarray) -> list[np.ndarray]:
    if data.ndim != 2:
        msg = f'ground truth {str(path)!r} has shape {data.shape!r}; expected (Q, N) or (Q, 2)'
        raise ConfigError(msg)
    if data.dtype == bool:
        return [np.flatnonzero(row).astype(np.int64) for row in data]
    if not np.issubdtype(data.dtype, np.integer):
        msg = f'ground truth {str(path)!r} has dtype {data.dtype}; expected bool or integers'
        raise ConfigError(msg)
    if data.shape[1] == 2:
        return _positives_from_ranges(data)
    if data.size and not np.isin(data, (0, 1)).all():
        msg = (
            f'ground truth {str(path)!r}: an integer (Q, N) matrix must hold only 0/1; '
            f'for index lists use the .npz pairs format'
        )
        raise ConfigError(msg)
    return [np.flatnonzero(row).astype(np.int64) for row in data]


def _positives_from_ranges(ranges: np.ndarray) -> list[np.ndarray]:
    out = []
    for first, last in np.asarray(ranges, np.int64):
        if first < 0 or last < first:
            out.append(np.zeros(0, np.int64))
        else:
            out.append(np.arange(first, last + 1, dtype=np.int64))
    return out


def _positives_from_npz(path: Path, arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
    if 'positives' in arrays:
        matrix = arrays['positives']
        if matrix.ndim != 2:
            raise ConfigError(f'{str(path)!r}: positives must be a (Q, N) matrix')
        return [np.flatnonzero(row).astype(np.int64) for row in matrix]
    if 'ranges' in arrays:
        ranges = arrays['ranges']
        if ranges.ndim != 2 or ranges.shape[1] != 2:
            raise ConfigError(f'{str(path)!r}: ranges must have shape (Q, 2)')
        return _positives_from_ranges(ranges)
    if 'query_index' in arrays and 'db_index' in arrays:
        queries = np.asarray(arrays['query_index'], np.int64).reshape(-1)
        refs = np.asarray(arrays['db_index'], np.int64).reshape(-1)
        if len(queries) != len(refs) or (queries < 0).any() or (refs < 0).any():
            msg = f'{str(path)!r}: query_index and db_index must be equal-length, >= 0'
            raise ConfigError(msg)
        count = int(arrays['num_queries']) if 'num_queries' in arrays else 0
        count = max(count, int(queries.max()) + 1 if len(queries) else 0)
        out: list[list[int]] = [[] for _ in range(count)]
        for q, d in zip(queries.tolist(), refs.tolist()):
            out[q].append(d)
        return [np.unique(np.array(p, np.int64)) for p in out]
    msg = (
        f'{str(path)!r} holds {sorted(arrays)!r}; expected positives (Q, N), ranges (Q, 2) '
        f'or query_index + db_index'
    )
    raise ConfigError(msg)


def positives_frame_aligned(
    db_names: Sequence[str], query_names: Sequence[str], tolerance: int = DEFAULT_TOLERANCE
) -> list[np.ndarray]:
    """Positives for frame-aligned traverses: the reference with the query's name +- k frames.

    Reference frames are ordered by name, naturally (``natural_key``: ``2`` before ``10``);
    the positives of a query are the references within ``tolerance`` positions of the one
    with the same name. A query whose name has no reference gets no positive.

    Args:
        db_names: reference names (e.g. file names relative to the reference folder).
        query_names: query names, compared with ``db_names`` exactly.
        tolerance: k, in frames.

    Returns:
        For each query, indices into ``db_names``, sorted.
    """
    if tolerance < 0:
        raise ValueError(f'tolerance must be >= 0 frames, got {tolerance!r}')
    order = sorted(range(len(db_names)), key=lambda i: natural_key(db_names[i]))
    rank = {db_names[i]: r for r, i in enumerate(order)}
    if len(rank) != len(db_names):
        raise ConfigError('reference names repeat; frame-aligned ground truth needs unique names')
    order = np.array(order, np.int64)
    out = []
    for name in query_names:
        r = rank.get(name)
        if r is None:
            out.append(np.zeros(0, np.int64))
        else:
            out.append(np.sort(order[max(0, r - tolerance) : r + tolerance + 1]))
    return out


def positives_same_folder(
    db_names: Sequence[str], query_names: Sequence[str], depth: int = 1
) -> list[np.ndarray]:
    """Positives by folder: same first ``depth`` path components = same place.

    Names are paths relative to their folders, e.g. ``p3/i0/a.jpg`` (reference) and
    ``p3/i1/b.jpg`` (query) share the place ``p3`` with ``depth=1``.
    """
    if depth < 1:
        raise ValueError(f'depth must be >= 1, got {depth!r}')

    def key(name: str) -> tuple[str, ...]:
        parts = PurePath(name).parts
        if len(parts) <= depth:
            msg = (
                f'{name!r} has no folder at depth {depth}; lay images out as '
                f'<place>/.../<image> below the given folder, or lower --folder-depth'
            )
            raise ConfigError(msg)
        return parts[:depth]

    groups: dict[tuple[str, ...], list[int]] = {}
    for i, name in enumerate(db_names):
        groups.setdefault(key(name), []).append(i)
    return [np.array(groups.get(key(name), []), np.int64) for name in query_names]


def require_a_positive(positives: Sequence[Sequence[int] | np.ndarray]) -> None:
    """Fail early, before any extraction, when no query has a positive to score against.

    Raises:
        ConfigError: every query's positives are empty (or there are no queries).
    """
    if not any(len(p) for p in positives):
        msg = (
            f'none of {len(positives)} queries has a positive in the reference; check '
            f'--gt/--radius-m/--tolerance and that the queries and the reference show the '
            f'same area'
        )
        raise ConfigError(msg)


# -- metrics --------------------------------------------------------------------------------


def first_hit_ranks(predictions: np.ndarray, positives: Sequence[Iterable[int]]) -> np.ndarray:
    """For each query the 0-based rank of its first positive prediction (-1 if none)."""
    predictions = _prediction_rows(predictions, len(positives))
    ranks = np.full(len(predictions), -1, np.int64)
    for q, (row, pos) in enumerate(zip(predictions, positives)):
        hits = np.flatnonzero(np.isin(row, np.asarray(list(pos), np.int64)) & (row >= 0))
        if len(hits):
            ranks[q] = hits[0]
    return ranks


def _prediction_rows(predictions: np.ndarray, count: int) -> np.ndarray:
    """``predictions`` as (count, K) int64; a 1-D array is one prediction per query."""
    predictions = np.asarray(predictions, np.int64)
    if predictions.ndim < 2:
        predictions = predictions.reshape(-1, 1)
    return predictions.reshape(count, predictions.shape[-1])


def recall_at_n(
    predictions: np.ndarray,
    positives: Sequence[Iterable[int]],
    ns: Sequence[int] = DEFAULT_RECALL_NS,
) -> dict[int, float]:
    """Cumulative Recall@N: the fraction of queries with a positive among the first N.

    Args:
        predictions: (Q, K) reference indices, best first; -1 pads.
        positives: for each query, its positive reference indices.
        ns: the N to report; for N > K all K predictions count.

    Returns:
        {N: recall in [0, 1]}.
    """
    if len(positives) == 0:
        return {int(n): float('nan') for n in ns}
    ranks = first_hit_ranks(predictions, positives)
    return {int(n): float(np.mean((ranks >= 0) & (ranks < n))) for n in ns}


def precision_recall_curve(
    is_correct: np.ndarray, confidence: np.ndarray, *, num_relevant: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision and recall of the top-1 answers accepted at each confidence threshold.

    A query is accepted when its confidence is >= the threshold. Precision = correct
    accepted / accepted; recall = correct accepted / ``num_relevant`` (so a perfect system
    reaches recall 1 only if it accepts every query that has a positive, correctly).
    Queries without a positive belong in ``is_correct`` as False: accepting one is a wrong
    answer that lowers precision, and rejecting it costs no recall.

    Args:
        is_correct: (Q,) whether each query's top-1 answer is a positive.
        confidence: (Q,) its confidence.
        num_relevant: the queries that have a positive (the recall denominator; default
            all Q).

    Returns:
        precision, recall, thresholds: each (T,), thresholds decreasing (recall increasing),
        one entry per distinct confidence.
    """
    is_correct = np.asarray(is_correct, bool).reshape(-1)
    confidence = np.asarray(confidence, np.float64).reshape(-1)
    if is_correct.shape != confidence.shape:
        msg = f'{is_correct.shape!r} correctness flags for {confidence.shape!r} confidences'
        raise ValueError(msg)
    if len(confidence) == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    confidence = np.where(np.isnan(confidence), -np.inf, confidence)
    order = np.argsort(-confidence, kind='stable')
    scores = confidence[order]
    true_positives = np.cumsum(is_correct[order])
    accepted = np.arange(1, len(scores) + 1)
    last_of_threshold = np.r_[scores[1:] != scores[:-1], True]
    true_positives = true_positives[last_of_threshold]
    accepted = accepted[last_of_threshold]
    precision = true_positives / accepted
    relevant = len(scores) if num_relevant is None else int(num_relevant)
    recall = true_positives / relevant if relevant > 0 else np.zeros(len(true_positives))
    return precision, recall, scores[last_of_threshold]


def recall_at_100_precision(
    is_correct: np.ndarray, confidence: np.ndarray, *, num_relevant: int | None = None
) -> float:
    """The largest recall at a confidence threshold where every accepted answer is correct.

    0 when the most confident answer is already wrong. ``num_relevant`` as in
    ``precision_recall_curve``.
    """
    precision, recall, _ = precision_recall_curve(
        is_correct, confidence, num_relevant=num_relevant
    )
    perfect = precision >= 1.0 - 1e-12
    return float(recall[perfect].max()) if perfect.any() else 0.0


def plot_pr_curve(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str | os.PathLike,
    *,
    title: str = 'Top-1 precision-recall (threshold on confidence)',
) -> Path:
    """Write a PNG with one precision-recall curve per label.

    Args:
        curves: {label: (precision, recall)}.
        path: the PNG to write (folders are created).
        title: the plot title.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(6, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, (precision, recall) in curves.items():
        # Start at the origin of recall with the first precision, as the curve is a step.
        r = np.r_[0.0, np.asarray(recall, np.float64)]
        p = np.r_[precision[0] if len(precision) else 1.0, np.asarray(precision, np.float64)]
        axes.step(r, p, where='post', label=label)
    axes.set_xlabel('recall (fraction of queries with a positive accepted and correct)')
    axes.set_ylabel('precision')
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.grid(True, alpha=0.3)
    axes.set_title(title, fontsize=10)
    axes.legend(loc='lower left', fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return path


# -- results --------------------------------------------------------------------------------


@dataclass
class MethodResult:
    """Scores of one matching method (e.g. retrieval only, or re-ranked) on the queries.

    ``recalls`` maps N to Recall@N in [0, 1], or None when the method returned fewer than
    N predictions from a larger reference (unknown). Latencies are in seconds.
    """

    name: str
    recalls: dict[int, float | None]
    recall_at_100_precision: float
    precision: np.ndarray
    recall: np.ndarray
    thresholds: np.ndarray
    predictions: np.ndarray
    confidences: np.ndarray
    correct: np.ndarray
    latencies_s: np.ndarray

    @property
    def latency_median_ms(self) -> float:
        return _percentile_ms(self.latencies_s, 50)

    @property
    def latency_p95_ms(self) -> float:
        return _percentile_ms(self.latencies_s, 95)

    def summary(self) -> dict:
        """JSON-able scores (recalls as fractions, latencies in milliseconds)."""
        return {
            'recall_at_n': {f'R@{n}': r for n, r in self.recalls.items()},
            'recall_at_100_precision': self.recall_at_100_precision,
            'latency_ms': {'median': self.latency_median_ms, 'p95': self.latency_p95_ms},
            'pr_curve': {
                'precision': self.precision.tolist(),
                'recall': self.recall.tolist(),
                'thresholds': self.thresholds.tolist(),
            },
        }


def _percentile_ms(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q) * 1e3) if len(values) else float('nan')


def summarize(
    name: str,
    predictions: np.ndarray,
    confidences: np.ndarray,
    positives: Sequence[Iterable[int]],
    latencies_s: np.ndarray,
    *,
    num_db: int,
    ns: Sequence[int] = DEFAULT_RECALL_NS,
) -> MethodResult:
    """Score one method from its predictions; the hook other modes (sequences) plug into.

    Every query the method answered is a row, in order, including queries without a
    positive (e.g. frames off the mapped route):

    * Recall@N is over the queries with a positive only;
    * the precision-recall curve and recall at 100 % precision count every query: an
      accepted answer to a query without a positive is wrong (lowers precision), while
      recall's denominator is the number of queries with a positive.

    Args:
        name: the method's label.
        predictions: (Q, K) reference indices, best first, -1 padded.
        confidences: (Q,) confidence of each top-1 answer.
        positives: for each query, its positive reference indices (may be empty).
        latencies_s: (Q,) per-query latency in seconds.
        num_db: the reference size (Recall@N with N > K is known only when K >= num_db).
        ns: the N of Recall@N.
    """
    positives = [np.asarray(list(p), np.int64) for p in positives]
    predictions = _prediction_rows(predictions, len(positives))
    confidences = np.asarray(confidences, np.float64).reshape(-1)
    width = predictions.shape[1]
    has_positive = np.array([len(p) > 0 for p in positives], bool).reshape(-1)
    scored = [p for p, has in zip(positives, has_positive) if has]
    recalls: dict[int, float | None] = dict(recall_at_n(predictions[has_positive], scored, ns))
    for n in ns:
        if n > width and width < num_db:
            recalls[int(n)] = None
    correct = first_hit_ranks(predictions[:, :1], positives) == 0  # -1: wrong
    relevant = int(has_positive.sum())
    precision, recall, thresholds = precision_recall_curve(
        correct, confidences, num_relevant=relevant
    )
    return MethodResult(
        name=name,
        recalls=recalls,
        recall_at_100_precision=recall_at_100_precision(
            correct, confidences, num_relevant=relevant
        ),
        precision=precision,
        recall=recall,
        thresholds=thresholds,
        predictions=predictions,
        confidences=confidences,
        correct=correct,
        latencies_s=np.asarray(latencies_s, np.float64).reshape(-1),
    )


@dataclass
class EvaluationResult:
    """The scores of every method on one query set, and what they were computed from.

    ``query_names``/``positives``/``query_globals`` cover every query, in order; the
    queries without any positive are also listed in ``skipped_queries``: they are left out
    of Recall@N, and in the precision-recall curve an accepted answer to one is wrong.
    ``extract_latencies_s`` is each query's extraction time, which every method includes.
    """

    methods: dict[str, MethodResult]
    query_names: list[str]
    positives: list[np.ndarray]
    num_db: int
    conf: dict
    database: PlaceDatabase | None = None
    query_globals: np.ndarray | None = None
    extract_latencies_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    reference_extraction_s: float = 0.0
    skipped_queries: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def add_method(self, method: MethodResult) -> None:
        self.methods[method.name] = method

    def summary(self) -> dict:
        """JSON-able summary: counts, configuration and each method's scores."""
        return {
            'num_queries': len(self.query_names) - len(self.skipped_queries),
            'num_queries_matched': len(self.query_names),
            'num_queries_skipped_without_positive': len(self.skipped_queries),
            'num_db': self.num_db,
            'conf': self.conf,
            'info': self.info,
            'extract_latency_ms': {
                'median': _percentile_ms(self.extract_latencies_s, 50),
                'p95': _percentile_ms(self.extract_latencies_s, 95),
            }
            if len(self.extract_latencies_s)
            else None,
            'reference_extraction_s': self.reference_extraction_s,
            'methods': {name: m.summary() for name, m in self.methods.items()},
        }

    def table(self) -> str:
        """The results as a fixed-width text table (percent and milliseconds)."""
        ns = sorted({n for m in self.methods.values() for n in m.recalls})
        head = ['method', *(f'R@{n}' for n in ns), 'R@100%P', 'lat med ms', 'lat p95 ms']
        rows = [head]
        for method in self.methods.values():
            recalls = [_pct(method.recalls.get(n)) for n in ns]
            rows.append(
                [
                    method.name,
                    *recalls,
                    _pct(method.recall_at_100_precision),
                    f'{method.latency_median_ms:.1f}',
                    f'{method.latency_p95_ms:.1f}',
                ]
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = [
            '  '.join(
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths))
            )
            for row in rows
        ]
        latency = 'latency = query description + matching'
        if len(self.extract_latencies_s):
            extract = _percentile_ms(self.extract_latencies_s, 50)
            latency = f'latency = query extraction (median {extract:.1f} ms) + matching'
        scored = len(self.query_names) - len(self.skipped_queries)
        lines.append(
            f'{scored} queries ({len(self.skipped_queries)} skipped without a '
            f'positive) vs {self.num_db} reference places; recalls in %; {latency}'
        )
        if self.skipped_queries:
            lines.append(
                'queries without a positive were still matched (sequences see every frame); '
                'R@N leaves them out, R@100%P counts an accepted answer to one as wrong'
            )
        return '\n'.join(lines)


def _pct(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return 'n/a'
    return f'{100.0 * value:.1f}'


def write_results(
    result: EvaluationResult, out_dir: str | os.PathLike, *, extra: dict | None = None
) -> dict[str, Path]:
    """Write ``results.json``, ``per_query.csv`` and ``pr_curve.png`` into ``out_dir``.

    Args:
        result: the evaluation.
        out_dir: the folder (created).
        extra: more JSON-able entries for ``results.json`` (e.g. the command line).

    Returns:
        {'json': ..., 'csv': ..., 'png': ...} paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {**(extra or {}), **result.summary()}
    summary['skipped_queries'] = result.skipped_queries
    json_path = out_dir / 'results.json'
    tmp = json_path.with_suffix('.json.tmp')
    tmp.write_text(json.dumps(summary, indent=2, default=_json_default))
    os.replace(tmp, json_path)
    csv_path = out_dir / 'per_query.csv'
    with csv_path.open('w', newline='') as stream:
        writer = csv.writer(stream)
        methods = list(result.methods.values())
        header = ['query', 'positives']
        for m in methods:
            header += [f'{m.name}_top1', f'{m.name}_correct', f'{m.name}_confidence']
            header += [f'{m.name}_latency_ms']
        writer.writerow(header)
        for q, name in enumerate(result.query_names):
            row: list = [name, ' '.join(map(str, result.positives[q][:20]))]
            for m in methods:
                row += [int(m.predictions[q, 0]), int(m.correct[q])]
                row += [f'{m.confidences[q]:.4f}', f'{m.latencies_s[q] * 1e3:.2f}']
            writer.writerow(row)
    curves = {
        f'{m.name} (R@100%P {_pct(m.recall_at_100_precision)} %)': (m.precision, m.recall)
        for m in result.methods.values()
    }
    png_path = plot_pr_curve(curves, out_dir / 'pr_curve.png')
    return {'json': json_path, 'csv': csv_path, 'png': png_path}


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, PurePath):
        return str(value)
    raise TypeError(f'{type(value).__name__} is not JSON serialisable')


# -- running the pipeline -------------------------------------------------------------------


def build_reference_database(
    model: VprModel,
    images: Sequence[str | os.PathLike],
    *,
    positions: np.ndarray | None = None,
    batch_size: int = 8,
    num_threads: int | None = None,
    progress: bool = True,
) -> PlaceDatabase:
    """An in-memory map of reference images, one place per image, in the given order.

    Args:
        model: the model.
        images: image files.
        positions: (N, 2) east/north metres, or None (the map then has no poses and every
            other candidate competes in the confidences).
        batch_size: images per forward pass.
        num_threads: torch threads.
        progress: show a progress bar.
    """
    extractor = Extractor(model, batch_size=batch_size, num_threads=num_threads)
    count = len(images)
    identity = model.identity()
    places = np.zeros(count, PLACE_DTYPE)
    places['place_id'] = np.arange(count)
    places['msg_index'] = np.arange(count)
    places['source'] = [str(p) for p in images]
    for key in ('x', 'y', 'z', 'qx', 'qy', 'qz', 'qw'):
        places[key] = np.nan
    if positions is not None:
        positions = np.asarray(positions, np.float64).reshape(count, 2)
        places['x'], places['y'] = positions[:, 0], positions[:, 1]
        places['z'], places['qx'], places['qy'], places['qz'], places['qw'] = 0, 0, 0, 0, 1
    globals_ = np.zeros((count, identity.global_dim), np.float32)
    locals_: np.ndarray | None = None
    bar = tqdm(total=count, desc='reference', unit='img', disable=not progress)
    start = 0
    for batch in extractor.extract_stream(load_image(p) for p in images):
        end = start + len(batch)
        globals_[start:end] = batch.global_descriptors
        if locals_ is None:
            locals_ = np.zeros((count, *batch.local_features.shape[1:]), np.float16)
        locals_[start:end] = batch.local_features
        start = end
        bar.update(len(batch))
    bar.close()
    if locals_ is None:
        locals_ = np.zeros((0, 0, identity.local_dim), np.float16)
    return PlaceDatabase(identity, globals_, places, locals_)


def evaluate(
    model: VprModel,
    reference: PlaceDatabase | Sequence[str | os.PathLike],
    queries: Sequence[str | os.PathLike],
    positives: Sequence[Iterable[int]],
    conf: RelocalizationConf | Mapping[str, Any] | None = None,
    *,
    query_names: Sequence[str] | None = None,
    reference_positions: np.ndarray | None = None,
    ns: Sequence[int] = DEFAULT_RECALL_NS,
    batch_size: int = 8,
    num_threads: int | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """Match ``queries`` against ``reference`` with the shipped pipeline and score it.

    Each query is extracted once (batch of one, as the node does) and matched twice with
    ``Relocalizer.match``: retrieval only (``rerank_k = 0``) and with the configured
    re-ranking (skipped when ``rerank_k`` is 0 or the map has no local features). The
    re-ranked method's predictions are the re-ranked head followed by the rest of the
    retrieval list.

    Args:
        model: the model (for a map: the one it was built with).
        reference: a map, or reference image files (extracted into an in-memory map).
        queries: query image files.
        positives: for each query, its positive reference indices (map place indices).
            Queries without a positive are matched like the others (so a sequence sees
            the whole run) but left out of Recall@N; in the precision-recall curve their
            answer is wrong if accepted (see ``summarize``).
        conf: relocalization settings (or a mapping of overrides of the defaults).
        query_names: names for the report (default: the paths).
        reference_positions: (N, 2) metres for reference images (ignored for a map).
        ns: the N of Recall@N.
        batch_size: images per forward pass for the reference images.
        num_threads: torch (and faiss) threads.
        progress: show progress bars.

    Raises:
        ConfigError: no query has a positive (checked before any extraction).
    """
    if not isinstance(conf, RelocalizationConf):
        conf = RelocalizationConf.from_dict(conf)
    positives = [np.asarray(sorted(set(int(i) for i in p)), np.int64) for p in positives]
    if len(positives) != len(queries):
        raise ValueError(f'{len(positives)} ground-truth entries for {len(queries)} queries')
    names = [str(n) for n in (query_names if query_names is not None else queries)]
    set_num_threads(num_threads)
    if conf.top_k < max(ns):
        logger.warning(
            'top_k=%d < %d: Recall@N for larger N is only known when the reference is '
            'that small; raise top_k to report it',
            conf.top_k,
            max(ns),
        )
    require_a_positive(positives)
    skipped = [names[q] for q, p in enumerate(positives) if not len(p)]
    if skipped:
        logger.warning(
            '%d of %d queries have no positive in the reference: matched, left out of '
            'Recall@N, and wrong if accepted in the PR curve (e.g. %r)',
            len(skipped),
            len(queries),
            skipped[0],
        )
    reference_seconds = 0.0
    if isinstance(reference, PlaceDatabase):
        database = reference
    else:
        started = time.perf_counter()
        database = build_reference_database(
            model,
            list(reference),
            positions=reference_positions,
            batch_size=batch_size,
            num_threads=num_threads,
            progress=progress,
        )
        reference_seconds = time.perf_counter() - started
    top_k = conf.top_k
    plain = Relocalizer(
        model, database, conf.replace(rerank_k=0, mode='single'), num_threads=num_threads
    )
    rerank_k = min(conf.rerank_k, top_k)
    reranker = None
    if rerank_k > 0 and database.local_features is not None and len(database):
        reranker = Relocalizer(
            model, database, conf.replace(mode='single'), num_threads=num_threads
        )
    elif rerank_k > 0:
        logger.warning('the map has no local features: reporting retrieval only')
    count = len(queries)
    predictions = {RETRIEVAL: np.full((count, top_k), -1, np.int64)}
    confidences = {RETRIEVAL: np.zeros(count)}
    latencies = {RETRIEVAL: np.zeros(count)}
    if reranker is not None:
        predictions[RERANKED] = np.full((count, top_k), -1, np.int64)
        confidences[RERANKED] = np.zeros(count)
        latencies[RERANKED] = np.zeros(count)
    extract_s = np.zeros(count)
    query_globals = np.zeros((count, database.model.global_dim), np.float32)
    for row, path in enumerate(tqdm(queries, desc='queries', unit='img', disable=not progress)):
        image = load_image(path)
        started = time.perf_counter()
        descriptors = plain.describe(image)
        extracted = time.perf_counter()
        g, local = descriptors.global_descriptors[0], descriptors.local_features[0]
        retrieved = plain.match(g, local).hypotheses
        matched = time.perf_counter()
        extract_s[row] = extracted - started
        query_globals[row] = g
        ids = [h.place_index for h in retrieved]
        predictions[RETRIEVAL][row, : len(ids)] = ids
        confidences[RETRIEVAL][row] = retrieved[0].confidence if retrieved else 0.0
        latencies[RETRIEVAL][row] = matched - started
        if reranker is not None:
            started = time.perf_counter()
            reranked = reranker.match(g, local).hypotheses
            latencies[RERANKED][row] = extract_s[row] + time.perf_counter() - started
            head = [h.place_index for h in reranked]
            in_head = set(head)
            ordered = head + [i for i in ids if i not in in_head]
            predictions[RERANKED][row, : len(ordered)] = ordered
            confidences[RERANKED][row] = reranked[0].confidence if reranked else 0.0
    methods = {
        name: summarize(
            name,
            predictions[name],
            confidences[name],
            positives,
            latencies[name],
            num_db=len(database),
            ns=ns,
        )
        for name in predictions
    }
    return EvaluationResult(
        methods=methods,
        query_names=names,
        positives=positives,
        num_db=len(database),
        conf={**conf.to_dict(), 'rerank_k': rerank_k if reranker is not None else 0},
        database=database,
        query_globals=query_globals,
        extract_latencies_s=extract_s,
        reference_extraction_s=reference_seconds,
        skipped_queries=skipped,
        info={'model': database.model.to_dict()},
    )


def evenly_spaced(count: int, limit: int | None) -> np.ndarray:
    """Indices of ``limit`` items spread evenly over ``count`` (all when limit is None)."""
    if limit is None or limit >= count:
        return np.arange(count)
    if limit < 1:
        raise ValueError(f'limit must be >= 1, got {limit!r}')
    return np.unique(np.linspace(0, count - 1, limit).round().astype(np.int64))


# -- sequence matching ----------------------------------------------------------------------


def sequence_descriptors(
    images: Sequence[str | os.PathLike],
    conf: dict | None = None,
    *,
    desc: str = 'sequence descriptors',
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Patch-normalised image descriptors (``vpr_ros.sequence``) of image files, one by one.

    Args:
        images: image files.
        conf: sequence settings (``DEFAULT_SEQUENCE_CONF`` keys; ``descriptor`` must be
            ``'patch_norm'``).
        desc: progress bar label.
        progress: show a progress bar.

    Returns:
        descriptors (N, D) float32 and the time each took (N,) in seconds (decoding
        excluded).
    """
    from vpr_ros.sequence import sequence_image_descriptors

    out: np.ndarray | None = None
    seconds = np.zeros(len(images))
    for i, path in enumerate(tqdm(images, desc=desc, unit='img', disable=not progress)):
        image = load_image(path)
        started = time.perf_counter()
        descriptor = sequence_image_descriptors([image], conf)[0]
        seconds[i] = time.perf_counter() - started
        if out is None:
            out = np.zeros((len(images), len(descriptor)), np.float32)
        out[i] = descriptor
    return (out if out is not None else np.zeros((0, 0), np.float32)), seconds


def evaluate_sequence(
    query_descriptors: np.ndarray,
    map_descriptors: np.ndarray,
    positives: Sequence[Iterable[int]],
    conf: dict | None = None,
    *,
    traverse_ids: np.ndarray | None = None,
    place_xyz: np.ndarray | None = None,
    descriptor_latencies_s: np.ndarray | None = None,
    ns: Sequence[int] = DEFAULT_RECALL_NS,
    name: str = SEQUENCE,
    progress: bool = True,
) -> MethodResult:
    """Score sequence matching: the queries, in order, through one ``SequenceMatcher``.

    Every query is scored as the matcher answers it online (causal: from the frames up to
    it), so the first frames of the run have little sequence to go on. Predictions are the
    matcher's top matches, one per exclusion window (``top_k`` defaults to ``max(ns)``).

    Args:
        query_descriptors: (Q, D) query descriptors, in the order they were taken.
        map_descriptors: (N, D) reference descriptors of the same kind, in keyframe order
            within each traverse.
        positives: for each query, its positive reference indices.
        conf: sequence settings (``vpr_ros.sequence.DEFAULT_SEQUENCE_CONF`` keys).
        traverse_ids: (N,) traverse of each place (default: one traverse).
        place_xyz: (N, 2 or 3) place positions in metres, or None.
        descriptor_latencies_s: (Q,) time to describe each query, added to its latency.
        ns: the N of Recall@N.
        name: the method's label.
        progress: show a progress bar.
    """
    from vpr_ros.sequence import SequenceMatcher, as_sequence_conf

    conf = as_sequence_conf(conf).replace(top_k=int(max(ns)))
    matcher = SequenceMatcher(map_descriptors, traverse_ids, conf, place_xyz=place_xyz)
    count = len(query_descriptors)
    predictions = np.full((count, matcher.conf.top_k), -1, np.int64)
    confidences = np.zeros(count)
    latencies = np.zeros(count)
    for i, query in enumerate(tqdm(query_descriptors, desc=name, disable=not progress)):
        started = time.perf_counter()
        matches = matcher.update(query)
        latencies[i] = time.perf_counter() - started
        predictions[i, : len(matches)] = [m.place_index for m in matches]
        confidences[i] = matches[0].confidence if matches else 0.0
    if descriptor_latencies_s is not None:
        latencies += np.asarray(descriptor_latencies_s, np.float64).reshape(-1)
    return summarize(
        name,
        predictions,
        confidences,
        positives,
        latencies,
        num_db=len(map_descriptors),
        ns=ns,
    )
