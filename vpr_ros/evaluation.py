"""The evaluation runner: every method through the relocalization pipeline, then scored.

A reference (a map, or reference image files that ``build_reference_database`` turns into
an in-memory map the way build_map makes maps) is matched with query images. A *method* is
a name and the ``RelocalizationConf`` it runs with. Each query image is described once
(the model, a batch of one, as in the node) and that one description is fed to every
method's ``Relocalizer.relocalize_described``, query after query in the given order: a
sequence method sees every frame, including the queries without a positive. A method's
ranking is its hypotheses followed by the other places retrieval found (so that Recall@N
reaches past a re-ranked head), at most ``ranking_depth`` places.

Each method is scored by ``vpr_ros.results.summarize``: Recall@N (unknown where a query got
fewer than N places; ``recall_counts`` says what a method's places are), two
precision-recall curves of its top-1 answer, one ranked by the confidence the node
publishes and the standard one ranked by the answer's similarity (``answer_similarity``,
as stschubert/VPR_Tutorial ranks it), each with its recall at 100 % precision, and
latency = the query's extraction + the method's matching. Ground truth (positives, soft
positives) comes from ``vpr_ros.ground_truth``; ``ScoringConf`` picks the recall
denominator.

Adding a method (the hook). ``METHODS`` maps each name to a function that derives the
method's settings from the run's base settings (None: the method does not apply, e.g. no
re-ranking when ``rerank_k`` is 0); ``method_confs`` resolves names, ``evaluate`` takes
names or a ready ``{name: RelocalizationConf}``, and ``evaluate --methods`` offers every
name. Anything the pipeline runs can be evaluated this way:

* another re-ranker: register it in ``vpr_ros.rerankers.RERANKERS``, then
  ``METHODS['reranked-x'] = lambda conf: conf.replace(reranker='x')`` (or simply run
  ``evaluate --reranker x``);
* another mode: register its evidence in ``vpr_ros.evidence.EVIDENCE`` (a new
  ``RelocalizationConf.mode``), then ``METHODS['x'] = lambda conf: conf.replace(mode='x')``
  (as ``filter`` is); if it answers with a
  depth other than ``top_k``, say so in ``ranking_depth``, and say in ``recall_counts``
  and ``similarity_name`` what its places and its hypotheses' scores are (the report
  prints both).

The text table, ``results.json``, ``per_query.csv`` and the PR plot cover every method run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from tqdm import tqdm

from vpr_ros import logger
from vpr_ros.database import PlaceDatabase
from vpr_ros.errors import ConfigError, DatabaseError
from vpr_ros.ground_truth import require_a_positive
from vpr_ros.imagefolders import load_image
from vpr_ros.metrics import DEFAULT_RECALL_NS
from vpr_ros.relocalization import RelocalizationConf, RelocalizationResult, Relocalizer
from vpr_ros.results import ALL_QUERIES, EvaluationResult, MethodResult, ScoringConf, summarize
from vpr_ros.runtime import set_num_threads
from vpr_ros.sequence import SequenceConf, as_sequence_conf
from vpr_ros.types import Frame, Hypothesis, Pose

if TYPE_CHECKING:
    from vpr_ros.extraction import Descriptors, Extractor
    from vpr_ros.models.base import VprModel

RETRIEVAL = 'retrieval'
RERANKED = 'reranked'
SEQUENCE = 'sequence'
FILTER = 'filter'


def _retrieval(conf: RelocalizationConf) -> RelocalizationConf:
    """Single frames ranked by global similarity alone."""
    return conf.replace(mode='single', rerank_k=0, verifier='none')


def _reranked(conf: RelocalizationConf) -> RelocalizationConf | None:
    """Single frames, the best ``rerank_k`` re-ranked by ``conf.reranker``."""
    return conf.replace(mode='single') if conf.rerank_k > 0 else None


def _sequence(conf: RelocalizationConf) -> RelocalizationConf:
    """Sequence matching along the reference's keyframe order (``conf.sequence``)."""
    return conf.replace(mode='sequence')


def _filter(conf: RelocalizationConf) -> RelocalizationConf:
    """The place filter over every query in order (``conf.filter``)."""
    return conf.replace(mode='filter')


METHODS: dict[str, Callable[[RelocalizationConf], RelocalizationConf | None]] = {
    RETRIEVAL: _retrieval,
    RERANKED: _reranked,
    SEQUENCE: _sequence,
    FILTER: _filter,
}
"""Methods by name: base settings -> the method's settings (None: not applicable)."""

SINGLE_FRAME_METHODS = (RETRIEVAL, RERANKED)


def method_confs(
    conf: RelocalizationConf | Mapping[str, Any] | None,
    names: Iterable[str] = SINGLE_FRAME_METHODS,
    *,
    ns: Sequence[int] = DEFAULT_RECALL_NS,
) -> dict[str, RelocalizationConf]:
    """The settings of each named method (``METHODS``), derived from ``conf``.

    Methods that do not apply are left out. A sequence matcher is asked for ``max(ns)``
    answers, so that Recall@N is known up to the largest N.

    Raises:
        ConfigError: an unknown name, or bad settings.
    """
    if not isinstance(conf, RelocalizationConf):
        conf = RelocalizationConf.from_dict(conf)
    base = conf.replace(**{'sequence.top_k': int(max(ns))})
    out: dict[str, RelocalizationConf] = {}
    for name in names:
        if name not in METHODS:
            raise ConfigError(f'unknown evaluation method {name!r}; known: {list(METHODS)}')
        derived = METHODS[name](base)
        if derived is not None:
            out[name] = derived
    return out


def stored_verifiers(confs: Iterable[RelocalizationConf]) -> list[str]:
    """The keypoint verifiers some method runs: a reference made from images stores their
    keypoints."""
    from vpr_ros.rerankers import STORED_VERIFIERS

    names = [name for conf in confs for name in conf.rerankers if name in STORED_VERIFIERS]
    return list(dict.fromkeys(names))


def ranking_depth(conf: RelocalizationConf) -> int:
    """How many places a method asks for: ``top_k``, or ``sequence.top_k`` in sequence mode
    (Recall@N beyond it is unknown unless the reference is that small)."""
    return conf.sequence.top_k if conf.mode == 'sequence' else conf.top_k


def recall_counts(conf: RelocalizationConf) -> str:
    """What a method's Recall@N counts among: its first N places, in words."""
    if conf.mode == 'sequence':
        return (
            f'the N best sequence matches, one per +-{conf.sequence.exclusion_window} '
            f'keyframes (distinct stretches of the route)'
        )
    if conf.mode == 'single' and conf.rerank_k > 0:
        return (
            f'the first N places after {conf.reranker} re-ranking of the top {conf.rerank_k} '
            f'(then the retrieval order)'
        )
    if conf.mode == 'single':
        return 'the N places most similar by global descriptor'
    if conf.mode == 'filter':
        return (
            'the N most probable places of the filter, one per region (then the retrieval order)'
        )
    return f'the first N places of mode {conf.mode!r}'


def similarity_name(conf: RelocalizationConf) -> str:
    """What ``answer_similarity`` is for a method's answers, in words."""
    if conf.mode == 'sequence':
        return 'the sequence score (mean enhanced similarity of the trajectory)'
    if conf.mode == 'single' and conf.rerank_k > 0:
        return f'the {conf.reranker} re-ranking score'
    return 'the global cosine similarity'


def answer_similarity(hypothesis: Hypothesis) -> float:
    """The score a method ranks its answers by: the re-ranking (or sequence) score where
    the method computed one, else the global similarity."""
    if np.isfinite(hypothesis.rerank_score):
        return hypothesis.rerank_score
    return hypothesis.global_score


def ranking(result: RelocalizationResult, depth: int) -> list[int]:
    """A method's ranked place indices: its hypotheses, then the other retrieved places."""
    head = [h.place_index for h in result.hypotheses]
    seen = set(head)
    tail = [int(i) for i in result.candidates if int(i) not in seen]
    return (head + tail)[:depth]


# -- the reference --------------------------------------------------------------------------


def build_reference_database(
    model: VprModel | Extractor,
    images: Sequence[str | os.PathLike],
    *,
    positions: np.ndarray | None = None,
    sequence: SequenceConf | Mapping[str, Any] | None = None,
    verifiers: Sequence[str] = (),
    batch_size: int = 8,
    num_threads: int | None = None,
    progress: bool = True,
) -> PlaceDatabase:
    """An in-memory map of reference images, one place per image, in the given order.

    Made by ``mapping.MapBuilder``, as build_map makes maps: global descriptors, local
    features and patch-normalised sequence descriptors, one traverse in image order (the
    keyframe order sequence matching follows).

    Args:
        model: the model, or an extractor running it.
        images: image files.
        positions: (N, 2) x, y metres (e.g. east/north), or None (the map then has no
            poses and every other candidate competes in the confidences).
        sequence: sequence settings whose image settings (``image_size``, ``patch``) the
            sequence descriptors are made with (None: the defaults).
        verifiers: keypoint verifiers whose feature stores the map gets (build_map
            ``--verifiers``).
        batch_size: images per forward pass.
        num_threads: torch threads.
        progress: show a progress bar.
    """
    from vpr_ros.mapping import BuildConf, MapBuilder

    count = len(images)
    if positions is not None:
        positions = np.asarray(positions, np.float64).reshape(count, 2)
    sequence = as_sequence_conf(sequence)
    conf = BuildConf.from_dict(
        {
            # Every image is a place: the frames are 1 s apart and a keyframe is due every
            # second (and every posed frame has moved >= 0 m).
            'max_interval_s': 1.0,
            'min_distance_m': 0.0,
            'batch_size': batch_size,
            'sequence_image_size': sequence.image_size,
            'sequence_patch': sequence.patch,
            'verifiers': ','.join(verifiers),
        }
    )
    builder = MapBuilder(model, conf, num_threads=num_threads)
    for i, path in enumerate(tqdm(images, desc='reference', unit='img', disable=not progress)):
        pose = None
        if positions is not None:
            pose = Pose(float(positions[i, 0]), float(positions[i, 1]), 0.0)
        frame = Frame(load_image(path), i * 10**9, pose=pose, source=str(path), msg_index=i)
        kept = builder.offer(frame)
        assert kept, 'every reference image is a keyframe'
    builder.flush()
    return builder.database


# -- running the methods --------------------------------------------------------------------


class DescribedQuery(NamedTuple):
    """One query as every method receives it: the RGB image (None when only descriptors
    are known), its descriptors (a batch of one) and the seconds describing it took."""

    image: np.ndarray | None
    descriptors: Descriptors
    extract_s: float


def describe_queries(
    relocalizer: Relocalizer, paths: Iterable[str | os.PathLike]
) -> Iterator[DescribedQuery]:
    """Each query image loaded (decoding not timed) and described once."""
    for path in paths:
        image = load_image(path)
        started = time.perf_counter()
        descriptors = relocalizer.describe(image)
        yield DescribedQuery(image, descriptors, time.perf_counter() - started)


def make_relocalizers(
    model: VprModel | Extractor,
    database: PlaceDatabase,
    methods: Mapping[str, RelocalizationConf],
    *,
    num_threads: int | None = None,
) -> dict[str, Relocalizer]:
    """One ``Relocalizer`` per method; a method whose re-ranker the map cannot serve (e.g.
    a map without local features) is left out with a warning.

    Raises:
        DatabaseError: the map was built by another model.
        ConfigError: no method is left, or a method's mode cannot run on the map.
    """
    database.check_model(model.identity())
    relocalizers: dict[str, Relocalizer] = {}
    for name, conf in methods.items():
        try:
            relocalizers[name] = Relocalizer(model, database, conf, num_threads=num_threads)
        except DatabaseError as err:
            logger.warning('not evaluating %r: %s', name, err)
    if not relocalizers:
        raise ConfigError(f'none of the methods {list(methods)!r} can run on this reference')
    return relocalizers


class MethodRuns(NamedTuple):
    """What ``run_methods`` measured: each method's scores, and per query the extraction
    seconds and the global descriptor (every method used the same description)."""

    methods: dict[str, MethodResult]
    extract_latencies_s: np.ndarray
    query_globals: np.ndarray


def run_methods(
    relocalizers: Mapping[str, Relocalizer],
    queries: Iterable[DescribedQuery],
    positives: Sequence[Iterable[int]],
    *,
    num_db: int,
    ns: Sequence[int] = DEFAULT_RECALL_NS,
    soft_positives: Sequence[Iterable[int]] | None = None,
    scoring: ScoringConf | None = None,
    progress: bool = False,
) -> MethodRuns:
    """Feed every query, in order, to every method, and score each method.

    Args:
        relocalizers: the methods.
        queries: the described queries, in the order they were taken (one per positives
            entry).
        positives: for each query, its positive reference indices (may be empty).
        num_db: the reference size.
        ns: the N of Recall@N.
        soft_positives: for each query, its soft positives (None: no soft ground truth).
        scoring: the recall denominator and the standard curve's thresholds.
        progress: show a progress bar.
    """
    count = len(positives)
    rankings: dict[str, list[list[int]]] = {name: [] for name in relocalizers}
    # The confidence and similarity of each query's answer (NaN: the method gave none).
    confidences = {name: np.full(count, np.nan) for name in relocalizers}
    scores = {name: np.full(count, np.nan) for name in relocalizers}
    latencies = {name: np.zeros(count) for name in relocalizers}
    extract_s = np.zeros(count)
    query_globals = np.zeros((count, 0), np.float32)
    row = -1
    bar = tqdm(queries, total=count, desc='queries', unit='img', disable=not progress)
    for row, query in enumerate(bar):
        if row >= count:
            raise ValueError(f'more queries than the {count} ground-truth entries')
        query_global = query.descriptors.global_descriptors[0]
        if row == 0:
            query_globals = np.zeros((count, len(query_global)), np.float32)
        query_globals[row] = query_global
        extract_s[row] = query.extract_s
        for name, relocalizer in relocalizers.items():
            started = time.perf_counter()
            result = relocalizer.relocalize_described(query.image, query.descriptors)
            latencies[name][row] = query.extract_s + time.perf_counter() - started
            rankings[name].append(ranking(result, ranking_depth(relocalizer.conf)))
            best = result.best
            if best is not None:
                confidences[name][row] = best.confidence
                scores[name][row] = answer_similarity(best)
    if row + 1 != count:
        raise ValueError(f'{row + 1} queries for {count} ground-truth entries')
    methods = {}
    for name, relocalizer in relocalizers.items():
        depth = max([ranking_depth(relocalizer.conf), *(len(r) for r in rankings[name])])
        predictions = np.full((count, depth), -1, np.int64)
        for q, ranked in enumerate(rankings[name]):
            predictions[q, : len(ranked)] = ranked
        methods[name] = summarize(
            name,
            predictions,
            confidences[name],
            positives,
            latencies[name],
            num_db=num_db,
            ns=ns,
            scores=scores[name],
            soft_positives=soft_positives,
            scoring=scoring,
            recall_counts=recall_counts(relocalizer.conf),
            similarity=similarity_name(relocalizer.conf),
        )
    return MethodRuns(methods, extract_s, query_globals)


def evaluate(
    model: VprModel | Extractor,
    reference: PlaceDatabase | Sequence[str | os.PathLike],
    queries: Sequence[str | os.PathLike],
    positives: Sequence[Iterable[int]],
    conf: RelocalizationConf | Mapping[str, Any] | None = None,
    *,
    methods: Iterable[str] | Mapping[str, RelocalizationConf] = SINGLE_FRAME_METHODS,
    query_names: Sequence[str] | None = None,
    reference_positions: np.ndarray | None = None,
    ns: Sequence[int] = DEFAULT_RECALL_NS,
    soft_positives: Sequence[Iterable[int]] | None = None,
    scoring: ScoringConf | Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
    batch_size: int = 8,
    num_threads: int | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """Match ``queries`` against ``reference`` with every method and score each.

    Args:
        model: the model, or an extractor running it (``vpr_ros.extraction``; for a map:
            the one it was built with).
        reference: a map, or reference image files (made into an in-memory map,
            ``build_reference_database``).
        queries: query image files, in the order they were taken.
        positives: for each query, its positive reference indices (map place indices).
            Queries without a positive are matched like the others (so a sequence sees
            the whole run) but left out of Recall@N unless ``scoring`` divides by every
            query; in the precision-recall curves their answer is wrong if accepted (see
            ``summarize``).
        conf: the base relocalization settings (or a mapping of overrides of the defaults).
        methods: ``METHODS`` names, derived from ``conf`` (``method_confs``), or ready
            settings by name.
        query_names: names for the report (default: the paths).
        reference_positions: (N, 2) metres for reference images (ignored for a map).
        ns: the N of Recall@N.
        soft_positives: for each query, its positives within the soft tolerance (None: no
            soft ground truth; see ``vpr_ros.ground_truth``).
        scoring: the recall denominator and the standard curve's thresholds (or a mapping
            of overrides of the defaults).
        notes: lines about the ground truth for the report.
        batch_size: images per forward pass for the reference images.
        num_threads: torch (and faiss) threads.
        progress: show progress bars.

    Raises:
        ConfigError: no query has a positive (checked before any extraction), an unknown
            method, or a method the reference cannot serve.
    """
    if not isinstance(conf, RelocalizationConf):
        conf = RelocalizationConf.from_dict(conf)
    if isinstance(methods, Mapping):
        confs = dict(methods)
    else:
        confs = method_confs(conf, methods, ns=ns)
    if not isinstance(scoring, ScoringConf):
        scoring = ScoringConf.from_dict(scoring)
    positive_rows = [np.asarray(sorted(set(int(i) for i in p)), np.int64) for p in positives]
    if len(positive_rows) != len(queries):
        msg = f'{len(positive_rows)} ground-truth entries for {len(queries)} queries'
        raise ValueError(msg)
    soft_rows = None
    if soft_positives is not None:
        soft_rows = [np.asarray(sorted(set(int(i) for i in p)), np.int64) for p in soft_positives]
        if len(soft_rows) != len(queries):
            msg = f'{len(soft_rows)} soft ground-truth entries for {len(queries)} queries'
            raise ValueError(msg)
    names = [str(n) for n in (query_names if query_names is not None else queries)]
    set_num_threads(num_threads)
    shallow = [n for n, c in confs.items() if ranking_depth(c) < max(ns)]
    if shallow:
        logger.warning(
            '%s rank fewer than %d places (top_k): Recall@N for larger N is only known when '
            'the reference is that small; raise top_k to report it',
            shallow,
            max(ns),
        )
    require_a_positive(positive_rows)
    skipped = [names[q] for q, p in enumerate(positive_rows) if not len(p)]
    if skipped:
        logger.warning(
            '%d of %d queries have no positive in the reference: matched, %s, and wrong if '
            'accepted in the PR curves (e.g. %r)',
            len(skipped),
            len(queries),
            'misses in Recall@N'
            if scoring.recall_denominator == ALL_QUERIES
            else 'left out of Recall@N',
            skipped[0],
        )
    from vpr_ros.extraction import as_extractor

    # One extractor for the reference (in batches) and the queries (one at a time).
    model = as_extractor(model, batch_size=batch_size, num_threads=num_threads)
    reference_seconds = 0.0
    if isinstance(reference, PlaceDatabase):
        database = reference
    else:
        started = time.perf_counter()
        database = build_reference_database(
            model,
            list(reference),
            positions=reference_positions,
            sequence=conf.sequence,
            verifiers=stored_verifiers(confs.values()),
            batch_size=batch_size,
            num_threads=num_threads,
            progress=progress,
        )
        reference_seconds = time.perf_counter() - started
    relocalizers = make_relocalizers(model, database, confs, num_threads=num_threads)
    describer = next(iter(relocalizers.values()))
    runs = run_methods(
        relocalizers,
        describe_queries(describer, queries),
        positive_rows,
        num_db=len(database),
        ns=ns,
        soft_positives=soft_rows,
        scoring=scoring,
        progress=progress,
    )
    rerank_k = conf.rerank_k if RERANKED in relocalizers else 0
    return EvaluationResult(
        methods=runs.methods,
        query_names=names,
        positives=positive_rows,
        num_db=len(database),
        conf={
            **conf.to_dict(),
            'rerank_k': rerank_k,
            'methods': {name: r.conf.to_dict() for name, r in relocalizers.items()},
        },
        database=database,
        query_globals=runs.query_globals,
        extract_latencies_s=runs.extract_latencies_s,
        reference_extraction_s=reference_seconds,
        skipped_queries=skipped,
        info={'model': database.model.to_dict()},
        scoring=scoring,
        soft_positives=soft_rows,
        notes=list(notes),
    )


def evenly_spaced(count: int, limit: int | None) -> np.ndarray:
    """Indices of ``limit`` items spread evenly over ``count`` (all when limit is None)."""
    if limit is None or limit >= count:
        return np.arange(count)
    if limit < 1:
        raise ValueError(f'limit must be >= 1, got {limit!r}')
    return np.unique(np.linspace(0, count - 1, limit).round().astype(np.int64))
