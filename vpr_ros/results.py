"""Evaluation results: per-method scores, the text table, results.json, per_query.csv, PR plot.

Every method is scored the same way (``summarize``):

* **Recall@N**: a positive among the method's first N places; what those are depends on
  the method (``MethodResult.recall_counts``), and R@N is n/a when some query got fewer
  than N (a sequence matcher gives one answer per exclusion window, so a small map has
  few). Hard positives only, as VPR_Tutorial's ``recallAtK`` and gmberton's evaluation.
* **Precision-recall, two rankings of the same top-1 answers**, each with its recall at
  100 % precision and the area under its curve:

  - *by confidence* (``PR_BY_CONFIDENCE``): the confidence the node publishes, the margin
    of the answer over its best competitor, which is what a robot thresholds before it
    trusts an answer; every distinct confidence is a threshold;
  - *by similarity* (``PR_BY_SIMILARITY``), the figures the field's tools report
    (stschubert/VPR_Tutorial ``evaluation/metrics.py``, ``createPR`` and
    ``recallAt100precision`` with ``matching='single'``): the answer's similarity score
    (retrieval: cosine similarity; re-ranked: the re-ranking score; sequence: the sequence
    score), ``pr_thresholds`` thresholds evenly spaced from the highest to the lowest
    score, the curve starting at recall 0, precision 1; the area is VPR_Tutorial's
    ``np.trapz(P, R)``.

  An answer is accepted at a threshold when its value is >= it; an accepted answer that is
  a positive is a true positive, any other a false positive (also for a query without a
  positive). With soft ground truth, a top-1 answer that is a soft but not a hard positive
  is a near miss: neither a true nor a false positive, never accepted (the tutorial paper's
  TP = M & GThard, FP = M & ~GTsoft applied to the single best match; VPR_Tutorial's code
  refuses soft ground truth for single matching and suggests a dilated hard one, which here
  is a larger --tolerance / --radius-m).
* **The recall denominator** (``ScoringConf.recall_denominator``): the queries with a
  positive (VPR_Tutorial's GTP and ``recallAtK``), or all queries (gmberton/VPR-methods-
  evaluation and VPR-Bench divide Recall@N by every query).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import TYPE_CHECKING

import numpy as np

from vpr_ros.config import Conf, option
from vpr_ros.metrics import (
    DEFAULT_PR_THRESHOLDS,
    DEFAULT_RECALL_NS,
    _prediction_rows,
    area_under_pr_curve,
    first_hit_ranks,
    precision_recall_curve,
    recall_at_full_precision,
    recall_at_n,
    sampled_precision_recall,
)

if TYPE_CHECKING:
    from vpr_ros.database import PlaceDatabase

WITH_POSITIVE = 'with_positive'
ALL_QUERIES = 'all'

PR_BY_CONFIDENCE = 'confidence'
PR_BY_SIMILARITY = 'similarity'
PR_LABELS = {
    PR_BY_CONFIDENCE: "by confidence (the node's margin over the best competitor)",
    PR_BY_SIMILARITY: 'by similarity (standard: VPR_Tutorial, top-1 similarity)',
}
"""What each precision-recall curve ranks the top-1 answers by, as the reports say it."""


@dataclass(frozen=True)
class ScoringConf(Conf):
    """How methods are scored (evaluate's --recall-denominator and --pr-thresholds)."""

    recall_denominator: str = option(
        WITH_POSITIVE,
        'what Recall@N and the PR recall divide by: with_positive = the queries with a '
        'positive (VPR_Tutorial); all = every query, a query without a positive counting as '
        'a miss (gmberton/VPR-methods-evaluation, VPR-Bench Recall@N)',
        choices=(WITH_POSITIVE, ALL_QUERIES),
    )
    pr_thresholds: int = option(
        DEFAULT_PR_THRESHOLDS,
        'thresholds of the standard precision-recall curve, evenly spaced over the top-1 '
        'similarities (VPR_Tutorial: 100)',
        min=2,
    )


def plot_pr_curve(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str | os.PathLike,
    *,
    title: str = 'Top-1 precision-recall (threshold on confidence)',
    dashed: Iterable[str] = (),
    colour_of: Mapping[str, str] | None = None,
) -> Path:
    """Write a PNG with one precision-recall curve per label.

    Args:
        curves: {label: (precision, recall)}.
        path: the PNG to write (folders are created).
        title: the plot title.
        dashed: labels drawn dashed (the rest solid).
        colour_of: {label: an earlier label} whose colour it is drawn in (e.g. two curves
            of one method).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import to_hex
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dashed = set(dashed)
    figure = Figure(figsize=(7, 5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    colours: dict[str, str] = {}
    for label, (precision, recall) in curves.items():
        # Start at the origin of recall with the first precision, as the curve is a step.
        r = np.r_[0.0, np.asarray(recall, np.float64)]
        p = np.r_[precision[0] if len(precision) else 1.0, np.asarray(precision, np.float64)]
        same = (colour_of or {}).get(label)
        line = axes.step(
            r,
            p,
            where='post',
            label=label,
            linestyle='--' if label in dashed else '-',
            color=colours.get(same) if same else None,
        )[0]
        colours[label] = to_hex(line.get_color())
    axes.set_xlabel('recall (fraction of the recall denominator accepted and correct)')
    axes.set_ylabel('precision')
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.grid(True, alpha=0.3)
    axes.set_title(title, fontsize=9)
    axes.legend(loc='lower left', fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    return path


@dataclass
class PrecisionRecall:
    """A precision-recall curve of a method's top-1 answers, and its figures.

    ``ranked_by`` is ``PR_BY_CONFIDENCE`` or ``PR_BY_SIMILARITY``; ``thresholds`` go with
    the points (+inf for the start point of the standard curve).
    """

    ranked_by: str
    precision: np.ndarray
    recall: np.ndarray
    thresholds: np.ndarray
    recall_at_100_precision: float
    auc: float

    @classmethod
    def from_curve(
        cls, ranked_by: str, curve: tuple[np.ndarray, np.ndarray, np.ndarray]
    ) -> PrecisionRecall:
        precision, recall, thresholds = curve
        return cls(
            ranked_by,
            precision,
            recall,
            thresholds,
            recall_at_full_precision(precision, recall),
            area_under_pr_curve(precision, recall),
        )

    @property
    def label(self) -> str:
        return PR_LABELS.get(self.ranked_by, self.ranked_by)

    def summary(self) -> dict:
        """JSON-able figures and curve (non-finite thresholds as null)."""
        return {
            'ranked_by': self.label,
            'recall_at_100_precision': self.recall_at_100_precision,
            'auc': self.auc,
            'pr_curve': {
                'precision': self.precision.tolist(),
                'recall': self.recall.tolist(),
                'thresholds': [float(t) if math.isfinite(t) else None for t in self.thresholds],
            },
        }


@dataclass
class MethodResult:
    """Scores of one matching method (e.g. retrieval only, or re-ranked) on the queries.

    ``recalls`` maps N to Recall@N in [0, 1], or None when some query in the denominator got
    fewer than N places from a larger reference (unknown). ``by_confidence`` and
    ``by_similarity`` are the two precision-recall figures (``by_similarity`` None when the
    method gave no similarity scores). Per query: ``predictions`` (Q, K) the ranked places
    (-1 pads), ``confidences`` and ``scores`` the top-1 answer's confidence and similarity
    (NaN: no answer), ``correct`` whether the top-1 is a positive, ``near_miss`` whether it
    is only a soft positive (left out of the precision-recall figures). Latencies are in
    seconds.
    """

    name: str
    recalls: dict[int, float | None]
    by_confidence: PrecisionRecall
    by_similarity: PrecisionRecall | None
    predictions: np.ndarray
    confidences: np.ndarray
    scores: np.ndarray
    correct: np.ndarray
    near_miss: np.ndarray
    latencies_s: np.ndarray
    recall_counts: str = ''
    similarity: str = ''

    @property
    def latency_median_ms(self) -> float:
        return _percentile_ms(self.latencies_s, 50)

    @property
    def latency_p95_ms(self) -> float:
        return _percentile_ms(self.latencies_s, 95)

    @property
    def places_per_query(self) -> np.ndarray:
        """(Q,) how many places each query's ranking holds."""
        return np.asarray(np.count_nonzero(self.predictions >= 0, axis=1), np.int64)

    def summary(self) -> dict:
        """JSON-able scores (recalls as fractions, latencies in milliseconds)."""
        counts = self.places_per_query
        return {
            'recall_at_n': {f'R@{n}': r for n, r in self.recalls.items()},
            'recall_at_n_counts': self.recall_counts,
            'places_per_query': {
                'min': int(counts.min()) if len(counts) else 0,
                'max': int(counts.max()) if len(counts) else 0,
            },
            'similarity': self.similarity,
            'pr_by_confidence': self.by_confidence.summary(),
            'pr_by_similarity': None
            if self.by_similarity is None
            else self.by_similarity.summary(),
            'queries_near_miss': int(np.count_nonzero(self.near_miss)),
            'queries_without_an_answer': int(np.count_nonzero(np.isnan(self.confidences))),
            'latency_ms': {'median': self.latency_median_ms, 'p95': self.latency_p95_ms},
        }


def _percentile_ms(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q) * 1e3) if len(values) else float('nan')


def summarize(
    name: str,
    predictions: np.ndarray,
    confidences: np.ndarray | Sequence[float],
    positives: Sequence[Iterable[int]],
    latencies_s: np.ndarray | Sequence[float],
    *,
    num_db: int,
    ns: Sequence[int] = DEFAULT_RECALL_NS,
    scores: np.ndarray | Sequence[float] | None = None,
    soft_positives: Sequence[Iterable[int]] | None = None,
    scoring: ScoringConf | None = None,
    recall_counts: str = '',
    similarity: str = '',
) -> MethodResult:
    """Score one method from its rankings and top-1 answers (``vpr_ros.evaluation`` scores
    every method so; the module docstring says how).

    Every query the method was given is a row, in order, including queries without a
    positive (e.g. frames off the mapped route).

    Args:
        name: the method's label.
        predictions: (Q, K) reference indices, best first, -1 padded; the first is the
            method's answer.
        confidences: (Q,) the confidence of each answer (NaN: the method gave none).
        positives: for each query, its positive reference indices (may be empty).
        latencies_s: (Q,) per-query latency in seconds.
        num_db: the reference size (a ranking as long as the reference is complete).
        ns: the N of Recall@N.
        scores: (Q,) the similarity of each answer (None: no standard figures).
        soft_positives: for each query, its positives within the soft tolerance (None: no
            soft ground truth).
        scoring: the recall denominator and the standard curve's thresholds.
        recall_counts: what the method's ranked places are, for the report.
        similarity: what its similarity score is, for the report.
    """
    scoring = scoring or ScoringConf()
    positive_rows = [np.asarray(list(p), np.int64) for p in positives]
    count = len(positive_rows)
    predictions = _prediction_rows(predictions, count)
    confidences = np.asarray(confidences, np.float64).reshape(-1)
    if confidences.shape != (count,):
        raise ValueError(f'{confidences.shape!r} confidences for {count} queries')
    has_positive = np.array([len(p) > 0 for p in positive_rows], np.bool_).reshape(-1)
    counted = has_positive
    if scoring.recall_denominator == ALL_QUERIES:
        counted = np.ones(count, np.bool_)
    rows = np.flatnonzero(counted)
    recalls: dict[int, float | None] = dict(
        recall_at_n(predictions[rows], [positive_rows[q] for q in rows], ns)
    )
    fewest = int(np.count_nonzero(predictions[rows] >= 0, axis=1).min()) if len(rows) else 0
    for n in ns:
        if len(rows) and fewest < min(int(n), num_db):
            recalls[int(n)] = None
    top1 = predictions[:, 0] if predictions.shape[1] else np.full(count, -1, np.int64)
    correct = first_hit_ranks(top1, positive_rows) == 0  # -1 (no place): wrong
    near_miss = np.zeros(count, np.bool_)
    if soft_positives is not None:
        soft_rows = [np.asarray(list(p), np.int64) for p in soft_positives]
        if len(soft_rows) != count:
            raise ValueError(f'{len(soft_rows)} soft ground-truth entries for {count} queries')
        near_miss = ~correct & np.array(
            [bool(np.isin(a, p)) for a, p in zip(top1.tolist(), soft_rows)], np.bool_
        ).reshape(-1)
    judged = (top1 >= 0) & ~np.isnan(confidences) & ~near_miss
    relevant = int(counted.sum())
    by_confidence = PrecisionRecall.from_curve(
        PR_BY_CONFIDENCE,
        precision_recall_curve(correct[judged], confidences[judged], num_relevant=relevant),
    )
    by_similarity = None
    top1_scores = np.full(count, np.nan)
    if scores is not None:
        top1_scores = np.asarray(scores, np.float64).reshape(-1)
        if top1_scores.shape != (count,):
            raise ValueError(f'{top1_scores.shape!r} scores for {count} queries')
        with_score = judged & np.isfinite(top1_scores)
        by_similarity = PrecisionRecall.from_curve(
            PR_BY_SIMILARITY,
            sampled_precision_recall(
                correct[with_score],
                np.asarray(scores).reshape(-1)[with_score],  # float32 stays float32
                num_relevant=relevant,
                num_thresholds=scoring.pr_thresholds,
            ),
        )
    return MethodResult(
        name=name,
        recalls=recalls,
        by_confidence=by_confidence,
        by_similarity=by_similarity,
        predictions=predictions,
        confidences=confidences,
        scores=top1_scores,
        correct=correct,
        near_miss=near_miss,
        latencies_s=np.asarray(latencies_s, np.float64).reshape(-1),
        recall_counts=recall_counts,
        similarity=similarity,
    )


@dataclass
class EvaluationResult:
    """The scores of every method on one query set, and what they were computed from.

    ``query_names``/``positives``/``query_globals`` cover every query, in order; the
    queries without any positive are also listed in ``skipped_queries``: they are matched
    like the others, left out of Recall@N unless ``scoring`` divides by every query, and in
    the precision-recall curves an accepted answer to one is wrong.
    ``extract_latencies_s`` is each query's extraction time, which every method includes.
    ``soft_positives`` is the soft ground truth (None: none); ``notes`` are lines about the
    ground truth for the report.
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
    scoring: ScoringConf = field(default_factory=ScoringConf)
    soft_positives: list[np.ndarray] | None = None
    notes: list[str] = field(default_factory=list)

    def add_method(self, method: MethodResult) -> None:
        self.methods[method.name] = method

    @property
    def num_relevant(self) -> int:
        """The recall denominator: the queries with a positive, or all queries."""
        if self.scoring.recall_denominator == ALL_QUERIES:
            return len(self.query_names)
        return len(self.query_names) - len(self.skipped_queries)

    def denominator_text(self) -> str:
        """The recall denominator in words, e.g. '78 queries with a positive'."""
        if self.scoring.recall_denominator == ALL_QUERIES:
            return (
                f'all {len(self.query_names)} queries ({len(self.skipped_queries)} without '
                f'a positive count as misses)'
            )
        return (
            f'the {self.num_relevant} queries with a positive ({len(self.skipped_queries)} '
            f'without one left out of R@N; an accepted answer to one is wrong)'
        )

    def summary(self) -> dict:
        """JSON-able summary: counts, configuration and each method's scores."""
        return {
            'num_queries': len(self.query_names) - len(self.skipped_queries),
            'num_queries_matched': len(self.query_names),
            'num_queries_skipped_without_positive': len(self.skipped_queries),
            'num_db': self.num_db,
            'recall_denominator': {
                'kind': self.scoring.recall_denominator,
                'queries': self.num_relevant,
                'text': self.denominator_text(),
            },
            'pr_curves': {
                'by_confidence': PR_LABELS[PR_BY_CONFIDENCE],
                'by_similarity': PR_LABELS[PR_BY_SIMILARITY],
                'standard_thresholds': self.scoring.pr_thresholds,
            },
            'ground_truth_notes': self.notes,
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
        """The results as a fixed-width text table (percent and milliseconds), and what
        each column counts."""
        ns = sorted({n for m in self.methods.values() for n in m.recalls})
        head = [
            'method',
            *(f'R@{n}' for n in ns),
            'R@100%P conf',
            'R@100%P sim',
            'AUC conf',
            'AUC sim',
            'lat med ms',
            'lat p95 ms',
        ]
        rows = [head]
        for method in self.methods.values():
            standard = method.by_similarity
            rows.append(
                [
                    method.name,
                    *(_pct(method.recalls.get(n)) for n in ns),
                    _pct(method.by_confidence.recall_at_100_precision),
                    _pct(None if standard is None else standard.recall_at_100_precision),
                    _fraction(method.by_confidence.auc),
                    _fraction(None if standard is None else standard.auc),
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
        lines.append(
            f'{len(self.query_names)} queries ({len(self.skipped_queries)} without a positive) '
            f'vs {self.num_db} reference places; recalls in %; {latency}'
        )
        lines.append(f'recall denominator: {self.denominator_text()}')
        lines.append(
            'R@100%P/AUC conf: top-1 answers ranked by the confidence the node publishes (the '
            'margin over the best competitor; every distinct value a threshold)'
        )
        lines.append(
            f'R@100%P/AUC sim: the standard figures (VPR_Tutorial evaluation/metrics.py, single '
            f'best match): top-1 answers ranked by their similarity, '
            f'{self.scoring.pr_thresholds} thresholds from the highest to the lowest'
        )
        for method in self.methods.values():
            counts = method.places_per_query
            fewest = int(counts.min()) if len(counts) else 0
            counted = method.recall_counts or 'the first N places'
            lines.append(
                f'  {method.name}: R@N = a positive among {counted} (at least {fewest} per '
                f'query; n/a: fewer than N); similarity = {method.similarity or "n/a"}'
            )
            if self.soft_positives is not None:
                lines.append(
                    f'    {int(method.near_miss.sum())} top-1 answers are near misses (soft '
                    f'positives only): left out of both PR curves'
                )
        lines.extend(self.notes)
        return '\n'.join(lines)


def _pct(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return 'n/a'
    return f'{100.0 * value:.1f}'


def _fraction(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return 'n/a'
    return f'{value:.3f}'


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
        soft = result.soft_positives is not None
        header = ['query', 'positives']
        for m in methods:
            header += [f'{m.name}_top1', f'{m.name}_correct', f'{m.name}_confidence']
            header += [f'{m.name}_similarity', f'{m.name}_latency_ms']
            if soft:  # a top-1 that is only a soft positive: left out of the PR figures
                header += [f'{m.name}_near_miss']
        writer.writerow(header)
        for q, name in enumerate(result.query_names):
            row: list = [name, ' '.join(map(str, result.positives[q][:20]))]
            for m in methods:
                row += [int(m.predictions[q, 0]), int(m.correct[q])]
                row += [f'{m.confidences[q]:.4f}', f'{m.scores[q]:.4f}']
                row += [f'{m.latencies_s[q] * 1e3:.2f}']
                if soft:
                    row += [int(m.near_miss[q])]
            writer.writerow(row)
    curves, dashed, colour_of = labelled_curves(result.methods.values())
    png_path = plot_pr_curve(
        curves,
        out_dir / 'pr_curve.png',
        dashed=dashed,
        colour_of=colour_of,
        title='Top-1 precision-recall\nsolid: ranked by confidence (the node); dashed: ranked by '
        'similarity (standard, VPR_Tutorial)',
    )
    return {'json': json_path, 'csv': csv_path, 'png': png_path}


def labelled_curves(
    methods: Iterable[MethodResult],
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str], dict[str, str]]:
    """Both curves of every method, labelled with what they rank by and their figures;
    the labels drawn dashed; and which label shares its colour with which."""
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    dashed: list[str] = []
    colour_of: dict[str, str] = {}
    for m in methods:
        first = ''
        for figures in (m.by_confidence, m.by_similarity):
            if figures is None:
                continue
            label = (
                f'{m.name} {figures.label}: R@100%P {_pct(figures.recall_at_100_precision)} %, '
                f'AUC {_fraction(figures.auc)}'
            )
            curves[label] = (figures.precision, figures.recall)
            if figures.ranked_by == PR_BY_SIMILARITY:
                dashed.append(label)
            if first:
                colour_of[label] = first
            first = first or label
    return curves, dashed, colour_of


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, PurePath):
        return str(value)
    raise TypeError(f'{type(value).__name__} is not JSON serialisable')
