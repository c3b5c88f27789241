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

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from vpr_ros import logger
from vpr_ros.database import PLACE_DTYPE, PlaceDatabase
from vpr_ros.extraction import Extractor
from vpr_ros.ground_truth import require_a_positive
from vpr_ros.imagefolders import load_image
from vpr_ros.metrics import DEFAULT_RECALL_NS
from vpr_ros.models.base import VprModel
from vpr_ros.relocalization import RelocalizationConf, Relocalizer
from vpr_ros.results import EvaluationResult, MethodResult, summarize
from vpr_ros.runtime import set_num_threads

RETRIEVAL = 'retrieval'
RERANKED = 'reranked'
SEQUENCE = 'sequence'


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
