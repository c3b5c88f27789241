"""Evaluation results: per-method scores, the text table, results.json, per_query.csv, PR plot."""

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

from vpr_ros.metrics import (
    DEFAULT_RECALL_NS,
    _prediction_rows,
    first_hit_ranks,
    precision_recall_curve,
    recall_at_100_precision,
    recall_at_n,
)

if TYPE_CHECKING:
    from vpr_ros.database import PlaceDatabase


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
    """Score one method from its predictions (``vpr_ros.evaluation`` scores every method so).

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
    positive_rows = [np.asarray(list(p), np.int64) for p in positives]
    predictions = _prediction_rows(predictions, len(positive_rows))
    confidences = np.asarray(confidences, np.float64).reshape(-1)
    width = predictions.shape[1]
    has_positive = np.array([len(p) > 0 for p in positive_rows], np.bool_).reshape(-1)
    scored = [p for p, has in zip(positive_rows, has_positive) if has]
    recalls: dict[int, float | None] = dict(recall_at_n(predictions[has_positive], scored, ns))
    for n in ns:
        if n > width and width < num_db:
            recalls[int(n)] = None
    correct = first_hit_ranks(predictions[:, :1], positive_rows) == 0  # -1: wrong
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
