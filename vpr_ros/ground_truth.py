"""Ground truth: which reference places are positives of each query.

Ground truth is a list with, for each query, the array of positive reference indices
(reference images in listing order, or map places in map order). ``GROUND_TRUTHS`` maps
the kinds ``evaluate --gt`` offers to their loaders; ``load_ground_truth`` runs one. The
kinds and the functions behind them:

* ``utm``: ``@east@north@`` in the file names (the gmberton/VPR-methods convention),
  positives within ``radius_m`` (25 m as in the common benchmarks; ``positives_from_utm``);
* ``csv:FILE``: a pose table ``file,x,y[,yaw]`` (``imagefolders.read_pose_table``),
  positives within ``radius_m``;
* ``vprbench:FILE``: VPR-Bench style ground truth, read without pickle
  (``positives_from_vprbench``);
* ``aligned``: frame-aligned traverses, same name = same place +-k frames
  (``positives_frame_aligned``);
* ``folder``: same leading folder(s) = same place (``positives_same_folder``).

Against a map, the position kinds (utm, csv) compare the query positions with the map's
place poses (``positives_within_radius``); vprbench indexes the map's places.

Two refinements (``GroundTruthConf``):

* soft ground truth (the ``GTsoft`` of stschubert/VPR_Tutorial and its paper): the same
  kind with a wider tolerance (``soft_radius_m`` for utm/csv, ``soft_tolerance`` for
  aligned). A top-1 answer that is a soft but not a hard positive is a near miss, neither
  right nor wrong: the precision-recall figures leave it out (``vpr_ros.results``);
* duplicate frames (``duplicate_runs``, ``widen_over_duplicates``): where the camera
  stood still, consecutive frames are identical; a query may then be matched to the place
  of any frame of its run, and a reference identical to a positive is a positive
  (Nordland: "a match on a neighbouring duplicate is fine"). The Nordland benchmark uses
  the same functions.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import NamedTuple, TypeAlias

import numpy as np

from vpr_ros.config import Conf, option
from vpr_ros.errors import ConfigError
from vpr_ros.imagefolders import (
    ImageFolder,
    load_image,
    natural_key,
    parse_utm,
    positions_from_table,
    read_pose_table,
)

DEFAULT_RADIUS_M = 25.0
DEFAULT_TOLERANCE = 2
# Map poses farther than this from every query position are in another frame.
FRAME_CHECK_M = 10_000.0

# Turns a VPR-Bench ``ground_truth_new.npy`` (an object array of [query_index, [db indices]],
# which needs pickle) into the pickle-free .npz that ``positives_from_vprbench`` reads. It
# unpickles the input, so run it only on a file from a source you trust.
VPRBENCH_CONVERSION = (
    "python -c \"import numpy as np; g = np.load('ground_truth_new.npy', allow_pickle=True); "
    'p = [(int(r[0]), int(d)) for r in g for d in np.atleast_1d(r[1])]; '
    "np.savez('ground_truth.npz', query_index=np.array([q for q, _ in p], int), "
    'db_index=np.array([d for _, d in p], int), num_queries=len(g))"'
)


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
    from scipy.spatial import cKDTree  # a third of a second to import: only when needed

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
    sorted_indices = sorted(range(len(db_names)), key=lambda i: natural_key(db_names[i]))
    rank = {db_names[i]: r for r, i in enumerate(sorted_indices)}
    if len(rank) != len(db_names):
        raise ConfigError('reference names repeat; frame-aligned ground truth needs unique names')
    order = np.array(sorted_indices, np.int64)
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


def duplicate_runs(frames: Iterable[np.ndarray]) -> np.ndarray:
    """Label each frame with its run of identical consecutive frames (0, 1, ...).

    A frame equal, pixel for pixel, to the one before it (a camera standing still) gets
    that frame's label; any other frame starts a new run.
    """
    labels: list[int] = []
    previous: np.ndarray | None = None
    run = -1
    for frame in frames:
        if previous is None or not np.array_equal(frame, previous):
            run += 1
        labels.append(run)
        previous = frame
    return np.array(labels, np.int64)


def duplicate_runs_of_files(paths: Sequence[str | os.PathLike]) -> np.ndarray:
    """``duplicate_runs`` of image files, in the given order (decoded, so the same pixels
    stored twice count as the same frame)."""
    return duplicate_runs(load_image(p) for p in paths)


def widen_over_duplicates(
    positives: Sequence[np.ndarray], query_runs: np.ndarray, reference_runs: np.ndarray
) -> list[np.ndarray]:
    """Positives that treat identical consecutive frames as one place.

    A query that repeats its neighbours' frame cannot tell which of them it is: it gets the
    positives of every query of its run. A reference identical to a positive shows the same
    view: every reference of a positive's run is a positive too.

    Args:
        positives: for each query, its positive reference indices.
        query_runs: (Q,) ``duplicate_runs`` of the queries, in query order.
        reference_runs: (N,) ``duplicate_runs`` of the references, in reference order.

    Returns:
        For each query, sorted reference indices.
    """
    query_runs = np.asarray(query_runs, np.int64).reshape(-1)
    reference_runs = np.asarray(reference_runs, np.int64).reshape(-1)
    if len(query_runs) != len(positives):
        raise ValueError(f'{len(query_runs)} query run labels for {len(positives)} queries')
    members: dict[int, list[int]] = {}
    for q, run in enumerate(query_runs.tolist()):
        members.setdefault(run, []).append(q)
    widened: dict[int, np.ndarray] = {}
    for run, queries in members.items():
        union = np.unique(np.concatenate([np.asarray(positives[q], np.int64) for q in queries]))
        if len(union) and (union.min() < 0 or union.max() >= len(reference_runs)):
            raise ValueError(f'positives outside the {len(reference_runs)} reference run labels')
        runs = np.unique(reference_runs[union])
        widened[run] = np.flatnonzero(np.isin(reference_runs, runs)).astype(np.int64)
    return [widened[run] for run in query_runs.tolist()]


# -- the kinds evaluate offers ----------------------------------------------------------------


@dataclass(frozen=True)
class GroundTruthConf(Conf):
    """How positives are decided (evaluate's --radius-m, --tolerance, --folder-depth, and the
    soft and duplicate-frame refinements)."""

    radius_m: float = option(
        DEFAULT_RADIUS_M,
        'utm, csv: a reference within this distance of the query is a positive',
        unit='m',
        min=0.0,
    )
    tolerance: int = option(
        DEFAULT_TOLERANCE,
        'aligned: positives are the same-name reference +- this many frames',
        unit='frames',
        min=0,
    )
    folder_depth: int = option(
        1, 'folder: how many leading folders name the place (e.g. 1 for pK/i0/x.jpg)', min=1
    )
    soft_radius_m: float = option(
        0.0,
        'utm, csv: soft ground truth (VPR_Tutorial GTsoft); a top-1 answer within this '
        'distance that is not a positive is a near miss, left out of the precision-recall '
        'figures instead of counted wrong (0: none; else >= radius-m)',
        unit='m',
        min=0.0,
    )
    soft_tolerance: int = option(
        0,
        'aligned: soft ground truth (VPR_Tutorial GTsoft); a top-1 answer within this many '
        'frames that is not a positive is a near miss, left out of the precision-recall '
        'figures instead of counted wrong (0: none; else >= tolerance)',
        unit='frames',
        min=0,
    )
    duplicate_frames: bool = option(
        False,
        'treat runs of identical consecutive images (a camera standing still, e.g. '
        "Nordland's stops) as one place: a query gets the positives of its whole run, and a "
        'reference identical to a positive is one (reads every image once; needs '
        '--db-images)',
    )

    def validate(self) -> None:
        if 0.0 < self.soft_radius_m < self.radius_m:
            msg = (
                f'soft_radius_m {self.soft_radius_m!r} is inside radius_m {self.radius_m!r}; '
                f'soft ground truth widens the positives: use 0 (none) or >= radius_m'
            )
            raise ConfigError(msg)
        if 0 < self.soft_tolerance < self.tolerance:
            msg = (
                f'soft_tolerance {self.soft_tolerance!r} is inside tolerance '
                f'{self.tolerance!r}; soft ground truth widens the positives: use 0 (none) '
                f'or >= tolerance'
            )
            raise ConfigError(msg)


@dataclass(frozen=True)
class MapPlaces:
    """A map as ground truth sees it: where it was read from and its places' (x, y)
    positions in metres (NaN where a place has no pose), in map order."""

    directory: Path
    positions: np.ndarray

    def __len__(self) -> int:
        return len(self.positions)


Reference: TypeAlias = ImageFolder | MapPlaces
"""What queries are matched against: reference images, or a map's places."""


class GroundTruth(NamedTuple):
    """Positives of each query, and the reference images' (x, y) positions in metres when
    the ground truth knows them (None otherwise, and for a map, which has its own).

    ``soft_positives``: for each query, its positives within the wider soft tolerance (a
    superset of ``positives``), or None without soft ground truth. ``notes``: one line per
    refinement applied, for the report.
    """

    positives: list[np.ndarray]
    reference_positions: np.ndarray | None = None
    soft_positives: list[np.ndarray] | None = None
    notes: tuple[str, ...] = ()


GroundTruthLoader = Callable[[Path | None, ImageFolder, Reference, GroundTruthConf], GroundTruth]


@dataclass(frozen=True)
class GroundTruthKind:
    """One kind of ground truth.

    Attributes:
        load: ``load(file, queries, reference, conf)``; ``file`` is None unless
            ``takes_file``, and ``reference`` is an ``ImageFolder`` unless ``with_map``.
        help: what it reads, for ``--help``.
        takes_file: given as ``kind:FILE``.
        file_example: a file name for messages.
        with_map: it also works against a map (by place poses or place indices).
        soft: the ``GroundTruthConf`` option that widens it into soft ground truth ('' if
            it has none).
    """

    load: GroundTruthLoader
    help: str
    takes_file: bool = False
    file_example: str = ''
    with_map: bool = False
    soft: str = ''


def _by_position(
    kind: str,
    query_xy: np.ndarray,
    reference: Reference,
    reference_xy: Callable[[ImageFolder], np.ndarray],
    conf: GroundTruthConf,
    frame: str,
) -> GroundTruth:
    """Positives within ``conf.radius_m`` (soft ones within ``conf.soft_radius_m``): of
    reference images (positions from ``reference_xy``) or of map places (their poses, which
    must be in ``frame``)."""
    if isinstance(reference, MapPlaces):
        xy = reference.positions
        if np.isnan(xy).any():
            msg = (
                f'map {str(reference.directory)!r} has places without poses; --gt {kind} '
                f'needs a map built with a pose topic in {frame}'
            )
            raise ConfigError(msg)
        check_same_frame(reference.directory, xy, query_xy, kind=kind, frame=frame)
        positions = None
    else:
        xy = positions = reference_xy(reference)
    soft = None
    if conf.soft_radius_m > 0:
        soft = positives_within_radius(xy, query_xy, conf.soft_radius_m)
    return GroundTruth(positives_within_radius(xy, query_xy, conf.radius_m), positions, soft)


def _utm_positions(images: ImageFolder) -> np.ndarray:
    return np.array([parse_utm(p) for p in images.paths], np.float64).reshape(-1, 2)


def _load_utm(
    file: Path | None, queries: ImageFolder, reference: Reference, conf: GroundTruthConf
) -> GroundTruth:
    frame = 'the same (UTM east/north) frame as the query names'
    return _by_position('utm', _utm_positions(queries), reference, _utm_positions, conf, frame)


def _load_csv(
    file: Path | None, queries: ImageFolder, reference: Reference, conf: GroundTruthConf
) -> GroundTruth:
    assert file is not None, 'csv takes a file'
    table = read_pose_table(file)
    query_xy = positions_from_table(table, queries, file)
    frame = f'the same frame as the positions in {str(file)!r}'

    def reference_xy(images: ImageFolder) -> np.ndarray:
        return positions_from_table(table, images, file)

    return _by_position('csv', query_xy, reference, reference_xy, conf, frame)


def _load_vprbench(
    file: Path | None, queries: ImageFolder, reference: Reference, conf: GroundTruthConf
) -> GroundTruth:
    assert file is not None, 'vprbench takes a file'
    count = len(reference)
    return GroundTruth(positives_from_vprbench(file, num_queries=len(queries), num_db=count))


def _load_aligned(
    file: Path | None, queries: ImageFolder, reference: Reference, conf: GroundTruthConf
) -> GroundTruth:
    assert isinstance(reference, ImageFolder), 'aligned needs reference file names'
    names, query_names = reference.names(), queries.names()
    soft = None
    if conf.soft_tolerance > 0:
        soft = positives_frame_aligned(names, query_names, conf.soft_tolerance)
    return GroundTruth(positives_frame_aligned(names, query_names, conf.tolerance), None, soft)


def _load_folder(
    file: Path | None, queries: ImageFolder, reference: Reference, conf: GroundTruthConf
) -> GroundTruth:
    assert isinstance(reference, ImageFolder), 'folder needs reference file names'
    names = reference.names()
    return GroundTruth(positives_same_folder(names, queries.names(), conf.folder_depth))


GROUND_TRUTHS: dict[str, GroundTruthKind] = {
    'utm': GroundTruthKind(
        _load_utm,
        '"@east@north@" in the file names (metres), positives within --radius-m (with --map: '
        'against the map poses, x = east, y = north)',
        with_map=True,
        soft='soft_radius_m',
    ),
    'csv': GroundTruthKind(
        _load_csv,
        'FILE is a pose table with a row file,x,y[,yaw] per image (metres; a header row is '
        "optional; campus_route's data.csv), positives within --radius-m (with --map: "
        'against the map poses, in the same frame); a row names its image by the path '
        'relative to the image folder or by file name',
        takes_file=True,
        file_example='data.csv',
        with_map=True,
        soft='soft_radius_m',
    ),
    'vprbench': GroundTruthKind(
        _load_vprbench,
        'FILE is a pickle-free VPR-Bench style .npy/.npz (bool (Q, N) matrix, (Q, 2) '
        'inclusive index ranges, or query_index + db_index pairs; indices follow the sorted '
        'file lists or the map order)',
        takes_file=True,
        file_example='ground_truth.npz',
        with_map=True,
    ),
    'aligned': GroundTruthKind(
        _load_aligned,
        'frame-aligned traverses, the reference with the same relative file name +- '
        '--tolerance frames',
        soft='soft_tolerance',
    ),
    'folder': GroundTruthKind(
        _load_folder,
        'same first --folder-depth folders below --db-images/--queries = same place',
    ),
}
"""Ground-truth kinds by name (``evaluate --gt NAME`` or ``--gt NAME:FILE``)."""


def ground_truth_choices(*, with_map: bool = False) -> list[str]:
    """The ``--gt`` values, e.g. ``['utm', 'csv:FILE', ...]`` (``with_map``: those that
    work against a map)."""
    return [
        f'{name}:FILE' if kind.takes_file else name
        for name, kind in GROUND_TRUTHS.items()
        if kind.with_map or not with_map
    ]


def parse_ground_truth(value: str, *, with_map: bool = False) -> tuple[str, Path | None]:
    """The kind and file of a ``--gt`` value (``utm``, ``csv:data.csv``, ...).

    Args:
        value: the value.
        with_map: the reference is a map (only kinds that work with one are accepted).

    Raises:
        ConfigError: an unknown kind, a file missing or given where none is taken, or a kind
            that needs reference file names against a map.
    """
    name, colon, file = value.partition(':')
    kind = GROUND_TRUTHS.get(name)
    if kind is None or (colon and not kind.takes_file):
        raise ConfigError(f'unknown --gt {value!r}; choose one of {ground_truth_choices()}')
    if kind.takes_file and not file:
        raise ConfigError(f'--gt {name} needs a file: --gt {name}:{kind.file_example}')
    if with_map and not kind.with_map:
        usable = ' or '.join(ground_truth_choices(with_map=True))
        msg = (
            f'--gt {name!r} needs reference file names; with --map use --gt {usable}, or '
            f'evaluate against --db-images'
        )
        raise ConfigError(msg)
    return name, Path(file) if file else None


def load_ground_truth(
    value: str,
    queries: ImageFolder,
    reference: Reference,
    conf: GroundTruthConf | None = None,
) -> GroundTruth:
    """Positives of every query from a ``--gt`` value (see ``GROUND_TRUTHS``), with the soft
    and duplicate-frame refinements ``conf`` asks for.

    Raises:
        ConfigError: a bad value (``parse_ground_truth``), bad ground-truth data, a soft
            option the kind has none of, or duplicate frames against a map.
        FileNotFoundError: its file does not exist.
    """
    conf = conf or GroundTruthConf()
    name, file = parse_ground_truth(value, with_map=isinstance(reference, MapPlaces))
    kind = GROUND_TRUTHS[name]
    check_refinements(name, conf, with_map=isinstance(reference, MapPlaces))
    truth = kind.load(file, queries, reference, conf)
    notes: list[str] = []
    if truth.soft_positives is not None:
        width = (
            f'{conf.soft_radius_m:g} m'
            if kind.soft == 'soft_radius_m'
            else f'+-{conf.soft_tolerance} frames'
        )
        notes.append(
            f'soft ground truth: a top-1 answer within {width} that is not a positive is a '
            f'near miss, neither right nor wrong in the PR figures (VPR_Tutorial GTsoft); R@N '
            f'counts positives only'
        )
    if conf.duplicate_frames:
        assert isinstance(reference, ImageFolder), 'check_refinements refuses a map'
        query_runs = duplicate_runs_of_files(queries.paths)
        reference_runs = duplicate_runs_of_files(reference.paths)
        positives = widen_over_duplicates(truth.positives, query_runs, reference_runs)
        soft = truth.soft_positives
        if soft is not None:
            soft = widen_over_duplicates(soft, query_runs, reference_runs)
        notes.append(
            f'duplicate frames: {len(queries) - len(np.unique(query_runs))} queries and '
            f'{len(reference) - len(np.unique(reference_runs))} references repeat the frame '
            f'before them; each run of identical frames counts as one place'
        )
        truth = truth._replace(positives=positives, soft_positives=soft)
    return truth._replace(notes=truth.notes + tuple(notes))


def check_refinements(name: str, conf: GroundTruthConf, *, with_map: bool = False) -> None:
    """Refuse soft or duplicate-frame options the ground-truth kind ``name`` cannot use.

    Raises:
        ConfigError: e.g. ``soft_tolerance`` with ``--gt utm`` (which widens by
            ``soft_radius_m``), or ``duplicate_frames`` against a map.
    """
    kind = GROUND_TRUTHS[name]
    for option_name in ('soft_radius_m', 'soft_tolerance'):
        if getattr(conf, option_name) and kind.soft != option_name:
            users = [n for n, k in GROUND_TRUTHS.items() if k.soft == option_name]
            instead = ''
            if kind.soft:
                instead = f'; --gt {name} widens with --{kind.soft.replace("_", "-")}'
            msg = (
                f'--{option_name.replace("_", "-")} applies to --gt {" or ".join(users)}, not '
                f'{name!r}{instead}'
            )
            raise ConfigError(msg)
    if conf.duplicate_frames and with_map:
        msg = (
            '--duplicate-frames compares the reference images, which a map does not keep; '
            'evaluate against --db-images, or leave it off'
        )
        raise ConfigError(msg)


def check_same_frame(
    map_dir: str | os.PathLike,
    map_xy: np.ndarray,
    query_xy: np.ndarray,
    *,
    kind: str = 'utm',
    frame: str = 'the same (UTM east/north) frame as the query names',
) -> None:
    """Refuse map poses and query positions that are clearly not in the same frame.

    Raises:
        ConfigError: no query is within ``FRAME_CHECK_M`` of any map place.
    """
    if not len(map_xy) or not len(query_xy):
        return
    from scipy.spatial import cKDTree

    distance, _ = cKDTree(map_xy).query(query_xy)
    if (distance <= FRAME_CHECK_M).any():
        return
    msg = (
        f'no query is within {FRAME_CHECK_M / 1000:.0f} km of any place of map '
        f'{str(map_dir)!r} (the closest is {distance.min() / 1000:.0f} km away); --gt {kind} '
        f'needs the map poses in {frame}, not odometry or a local ENU frame; rebuild the map '
        f'with such poses or use --gt vprbench:FILE'
    )
    raise ConfigError(msg)
