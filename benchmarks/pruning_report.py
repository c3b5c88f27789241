"""Pruning report: what structured pruning buys the whole system, and what it costs.

For each model and each run (``--run SPARSITY,GAMMA,RECOVERY``: the final backbone
sparsity, the paper's gamma, i.e. the final descriptor sparsity, and the recovery), prunes
step by step (``vpr_ros.pruning``) and, for the unpruned model and every step, measures:

- **memory of the whole system**: the model (fp32); a map of ``--places`` places as
  ``build_map`` writes it (local features, sequence descriptors, index and place rows
  included: ``profiling.footprint``), and beside it the map as the pruning paper counts
  it (float32 global descriptors only); their totals; and the resident memory (RSS) of a
  fresh process that loads the model and a ``--rss-places`` map and relocalizes frames
  through the ``Relocalizer`` as the node does (``profiling.process_memory``; python,
  torch and faiss are most of it, and the map's local features are memory-mapped);
- **latency per query**: extraction (batch 1, the model's input size), retrieval of the
  top 20 in a ``--places`` map (faiss flat) and MNN re-ranking of the best 10 (the
  node's defaults), timed in interleaved rounds so that the load of a shared CPU hits
  every model alike (each figure is the fastest pass);
- **recall, per dataset on its own**: Gardens Point / SFU ``pairs`` and ``triplets`` are
  scored apart (18 of their images are the same files: pooled, they would compete as
  different places), and Nordland64 winter -> summer (every ``--nordland-db-stride``-th
  summer and ``--nordland-query-stride``-th winter frame, +-2 frames of the full
  sequence, at ``--nordland-size``). ``r1`` is R@1 after MNN re-ranking (the system's
  answer), ``r1_global`` R@1 of retrieval alone; both through the Relocalizer;
- **fidelity to the unpruned model**, per dataset: ``agree``, the fraction of queries
  whose retrieved top-1 place is the unpruned model's, and ``corr``, the Pearson
  correlation of all query-map similarities with the unpruned model's.

Recoveries: ``none``; ``bn``, batch-norm statistics re-estimated after each step on the
``--recovery-data`` images; ``distill``, ``--finetune-iters`` iterations of distillation
to the unpruned model on the same images (no labels) after each step; ``finetune``, both.
The recovery images must not be evaluation images: by default the campus route, which
this report does not score.

Writes ``report.csv`` (one row per model, run and step; step 0 is the unpruned model),
``summary.md`` (the efficiency and the recall tables; the memory, RSS and latency cuts at
equal fidelity budgets; the largest pruning whose R@1, after re-ranking and of
retrieval, stays within ``--max-loss`` of the unpruned model on every dataset, as a
prune command) and ``<model>_fidelity.png``. Example (the default runs; about 25 minutes
on 2 shared cores)::

    python benchmarks/pruning_report.py --model efficientnet_lite0_gem \\
        --model efficientnet_lite0_gem_linear --datasets ../shared/datasets \\
        --recovery-data ../shared/datasets/campus_route --out /tmp/prune_report
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from vpr_ros import logger
from vpr_ros.cli.common import run_cli
from vpr_ros.errors import ConfigError
from vpr_ros.evaluation import (
    RERANKED,
    RETRIEVAL,
    DescribedQuery,
    build_reference_database,
    make_relocalizers,
    method_confs,
    run_methods,
)
from vpr_ros.extraction import Descriptors, TorchExtractor
from vpr_ros.ground_truth import positives_frame_aligned
from vpr_ros.imagefolders import list_images, load_image, relative_names
from vpr_ros.learning.finetune import BatchNormCalibrator, FinetuneConf
from vpr_ros.models import available_models, load_model, save_model
from vpr_ros.models.base import VprModel
from vpr_ros.models.preprocessing import Preprocessing
from vpr_ros.profiling import (
    footprint,
    local_grid,
    process_memory,
    write_synthetic_map,
)
from vpr_ros.pruning import IMPORTANCES, PruneConf, PruneStep, prune_with_recovery
from vpr_ros.relocalization import RelocalizationConf
from vpr_ros.rerankers.mnn import mnn_scores

NORDLAND_TOLERANCE = 2
RECOVERIES = ('none', 'bn', 'distill', 'finetune')
DATASET_COLUMNS = ('r1', 'r1_global', 'agree', 'corr')


# --------------------------------------------------------------------------------------
# Data


@dataclass
class EvalSet:
    """Reference (map) and query image files with ground truth, scored on their own."""

    name: str
    database: list[Path]
    queries: list[Path]
    positives: list[np.ndarray]
    size: tuple[int, int] | None = None  # input size (None: the model's own)

    def __repr__(self) -> str:
        return f'< {self.name} - #q: {len(self.queries)}; #db: {len(self.database)} >'


def load_gardens(root: Path, subset: str) -> EvalSet:
    """One subset (``pairs`` or ``triplets``): each place's ``pK/i0`` view is the map, its
    other views query it."""
    paths = list_images(root / subset, '*/i*/*')
    names = relative_names(paths, root / subset)
    database, queries, places = [], [], {}
    for path, name in zip(paths, names):
        place, view = name.split('/')[:2]
        if view == 'i0':
            if place in places:
                raise ConfigError(f'{subset}: place {place!r} has more than one i0 view')
            places[place] = len(database)
            database.append(path)
    positives = []
    for path, name in zip(paths, names):
        place, view = name.split('/')[:2]
        if view != 'i0':
            queries.append(path)
            positives.append(np.array([places[place]], np.int64))
    return EvalSet(f'gardens_{subset}', database, queries, positives)


def load_nordland(
    root: Path, size: tuple[int, int] | None, db_stride: int, query_stride: int
) -> EvalSet:
    """Winter queries against the summer map, every ``db_stride``-th summer and
    ``query_stride``-th winter frame; positives within +-2 frames of the full sequence."""
    summer = list_images(root / 'summer', '*.png')
    winter = list_images(root / 'winter', '*.png')
    full = positives_frame_aligned(
        relative_names(summer, root / 'summer'),
        relative_names(winter, root / 'winter'),
        NORDLAND_TOLERANCE,
    )
    kept = np.arange(0, len(summer), db_stride)
    new_index = {int(old): new for new, old in enumerate(kept)}
    picked = np.arange(0, len(winter), query_stride)
    positives = [
        np.array([new_index[int(i)] for i in full[q] if int(i) in new_index], np.int64)
        for q in picked
    ]
    return EvalSet(
        'nordland',
        [summer[i] for i in kept],
        [winter[i] for i in picked],
        positives,
        size,
    )


@contextmanager
def input_size(model: VprModel, size: tuple[int, int] | None) -> Iterator[None]:
    """Run ``model`` at ``size`` (height, width) inside the block (None: unchanged)."""
    saved = model.preprocessing
    if size is not None:
        model.preprocessing = Preprocessing(size=tuple(size), mean=saved.mean, std=saved.std)
    try:
        yield
    finally:
        model.preprocessing = saved


# --------------------------------------------------------------------------------------
# Recall and fidelity


def described_queries(model: VprModel, paths: Sequence[Path]) -> Iterator[DescribedQuery]:
    """The queries described in batches (faster than one by one; the descriptors are the
    same), handed to the methods one at a time."""
    images = [load_image(p) for p in paths]
    out = TorchExtractor(model, batch_size=16).extract(images)
    for i, image in enumerate(images):
        one = Descriptors(
            out.global_descriptors[i : i + 1], out.local_features[i : i + 1], out.local_grid
        )
        yield DescribedQuery(image, one, 0.0)


def score_dataset(model: VprModel, data: EvalSet) -> tuple[dict[str, float], np.ndarray]:
    """R@1 after re-ranking and of retrieval alone (the Relocalizer with the node's
    default settings), and the query-map global similarities."""
    with input_size(model, data.size):
        database = build_reference_database(model, data.database, batch_size=16, progress=False)
        methods = method_confs(RelocalizationConf(), (RETRIEVAL, RERANKED), ns=(1,))
        relocalizers = make_relocalizers(model, database, methods)
        runs = run_methods(
            relocalizers,
            described_queries(model, data.queries),
            data.positives,
            num_db=len(database),
            ns=(1,),
        )
    recalls = {
        'r1': float(runs.methods[RERANKED].recalls[1]),
        'r1_global': float(runs.methods[RETRIEVAL].recalls[1]),
    }
    return recalls, runs.query_globals @ database.global_descriptors.T


class Evaluator:
    """Scores models on every dataset; the first model it measures is the reference
    (the unpruned one) for the fidelity figures."""

    def __init__(self, sets: Sequence[EvalSet]) -> None:
        self.sets = list(sets)
        self.reference: dict[str, np.ndarray] = {}

    def measure(self, model: VprModel) -> dict[str, float]:
        row: dict[str, float] = {}
        for data in self.sets:
            recalls, sims = score_dataset(model, data)
            reference = self.reference.setdefault(data.name, sims)
            row[f'{data.name}_r1'] = recalls['r1']
            row[f'{data.name}_r1_global'] = recalls['r1_global']
            row[f'{data.name}_agree'] = float(
                np.mean(sims.argmax(axis=1) == reference.argmax(axis=1))
            )
            row[f'{data.name}_corr'] = float(np.corrcoef(sims.ravel(), reference.ravel())[0, 1])
        return row


# --------------------------------------------------------------------------------------
# Memory and latency


def measure_memory(
    model: VprModel, places: int, rss_places: int, rss_queries: int, folder: Path | None
) -> dict[str, float]:
    """Model, map (whole and global-only) and total MB, and the process memory (with a
    ``folder`` to write the model and map in; None leaves it out)."""
    size = footprint(model)
    row: dict[str, float] = {
        'params': size.params,
        'global_dim': size.global_dim,
        'local_dim': size.local_dim,
        'model_mb': size.model_mb_fp32,
        'map_mb': size.map_mb_per_1000 * places / 1000,
        'map_global_mb': size.global_mb_per_1000 * places / 1000,
    }
    row['total_mb'] = row['model_mb'] + row['map_mb']
    row['gflops'] = extraction_gflops(model)
    row['paper_total_mb'] = row['model_mb'] + row['map_global_mb']
    if folder is None:
        return row
    save_model(model, folder / 'model')
    grid = local_grid(model)
    map_dir = write_synthetic_map(model.identity(), grid, rss_places, folder / 'map')
    memory = process_memory(folder / 'model', map_dir, queries=rss_queries)
    shutil.rmtree(map_dir)
    row.update(rss_mb=memory.rss_mb, peak_rss_mb=memory.peak_mb, runtime_rss_mb=memory.runtime_mb)
    return row


@torch.inference_mode()
def extraction_gflops(model: VprModel) -> float:
    """GFLOPs of one forward pass at the model's input size (a multiply-add counts 2):
    the extraction cost without the noise of a shared CPU."""
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, *model.preprocessing.size))
    return counter.get_total_flops() / 1e9


@torch.inference_mode()
def add_latencies(measured: list[tuple[dict[str, Any], VprModel]], runs: int, places: int) -> None:
    """Per query: extraction (batch 1), retrieval of the top ``top_k`` in a ``places`` map
    and MNN re-ranking of the best ``rerank_k`` (the node's defaults), for every model in
    rounds, one pass of each model per round; fills ``extraction_ms``, ``matching_ms``,
    ``rerank_ms`` (each the fastest pass) and their sum ``total_ms``."""
    defaults = RelocalizationConf()
    rng = np.random.default_rng(0)
    indexes: dict[int, tuple[faiss.IndexFlatIP, np.ndarray]] = {}
    work = []
    for row, model in measured:
        model.eval()
        dim = int(row['global_dim'])
        if dim not in indexes:
            index = faiss.IndexFlatIP(dim)
            index.add(_unit(rng.standard_normal((places, dim), dtype=np.float32)))
            indexes[dim] = (index, _unit(rng.standard_normal((1, dim), dtype=np.float32)))
        grid = local_grid(model)
        shape = (grid[0] * grid[1], int(row['local_dim']))
        query = _unit(rng.standard_normal(shape, dtype=np.float32))
        stored = rng.standard_normal((defaults.rerank_k, *shape), dtype=np.float32)
        stored = (stored / np.linalg.norm(stored, axis=2, keepdims=True)).astype(np.float16)
        images = torch.randn(1, 3, *model.preprocessing.size)
        model(images)
        work.append((model, images, *indexes[dim], query, stored))
    spent = [{'extraction': [], 'matching': [], 'rerank': []} for _ in work]
    for _ in tqdm(range(runs), desc='latency rounds', leave=False):
        for (model, images, index, probe, query, stored), times in zip(work, spent):
            start = time.perf_counter()
            model(images)
            middle = time.perf_counter()
            index.search(probe, defaults.top_k)
            after = time.perf_counter()
            mnn_scores(query, np.asarray(stored, np.float32))  # as the re-ranker reads a map
            times['extraction'].append(middle - start)
            times['matching'].append(after - middle)
            times['rerank'].append(time.perf_counter() - after)
    for (row, _), times in zip(measured, spent):
        for key, values in times.items():
            row[f'{key}_ms'] = 1000 * min(values)
        row['extraction_ms_median'] = 1000 * float(np.median(times['extraction']))
        row['total_ms'] = row['extraction_ms'] + row['matching_ms'] + row['rerank_ms']


def _unit(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=-1, keepdims=True))


# --------------------------------------------------------------------------------------
# The runs


@dataclass(frozen=True)
class Run:
    """One pruning curve: final backbone sparsity, gamma and recovery."""

    sparsity: float
    gamma: float
    recovery: str

    @classmethod
    def parse(cls, text: str) -> Run:
        """``SPARSITY,GAMMA,RECOVERY``, e.g. ``0.1,0.1,finetune``."""
        try:
            sparsity, gamma, recovery = text.split(',')
            run = cls(float(sparsity), float(gamma), recovery.strip())
        except ValueError:
            msg = f'--run {text!r} is not SPARSITY,GAMMA,RECOVERY (e.g. 0.1,0.1,finetune)'
            raise argparse.ArgumentTypeError(msg) from None
        if run.recovery not in RECOVERIES:
            msg = f'--run {text!r}: recovery must be one of {RECOVERIES}'
            raise argparse.ArgumentTypeError(msg)
        return run

    def __str__(self) -> str:
        return f's{self.sparsity:g}_g{self.gamma:g}_{self.recovery}'


DEFAULT_RUNS = (
    Run(0.0, 0.5, 'none'),  # the descriptor alone
    Run(0.1, 0.1, 'none'),  # backbone and descriptor
    Run(0.1, 0.1, 'bn'),  # ... with batch-norm re-estimation
    Run(0.1, 0.1, 'distill'),  # ... with distillation to the unpruned model
)


def prune_steps(
    model: VprModel,
    run: Run,
    args: argparse.Namespace,
    calibrator: BatchNormCalibrator | None,
) -> Iterator[PruneStep]:
    """The pruning steps of one run."""
    recovery = run.recovery
    conf = PruneConf(
        sparsity=run.sparsity,
        steps=args.steps,
        gamma=run.gamma,
        importance=args.importance,
        round_to=args.round_to,
    )
    finetune_conf = FinetuneConf(
        iterations=args.finetune_iters,
        size=list(args.finetune_size or []),
        batch_places=args.finetune_batch_places,
        metric_weight=0.0,  # the recovery images have no place labels: distillation only
        distill_weight=1.0,
    )
    steps = prune_with_recovery(
        model,
        conf,
        calibrator=calibrator if recovery in ('bn', 'finetune') else None,
        train_data=args.recovery_data if recovery in ('distill', 'finetune') else None,
        finetune_conf=finetune_conf,
    )
    label = f'{model.name} {run}'
    yield from tqdm(steps, total=args.steps, desc=label, leave=False)


def load_sets(args: argparse.Namespace) -> list[EvalSet]:
    sets = []
    gardens = args.datasets / 'gardens_sfu_places'
    for subset in ('pairs', 'triplets'):
        if (gardens / subset).is_dir():
            sets.append(load_gardens(gardens, subset))
    nordland = args.datasets / 'nordland64'
    if nordland.is_dir() and args.nordland_query_stride > 0:
        size = tuple(args.nordland_size) if args.nordland_size else None
        sets.append(
            load_nordland(nordland, size, args.nordland_db_stride, args.nordland_query_stride)
        )
    if not sets:
        raise ConfigError(f'no gardens_sfu_places/ or nordland64/ under {str(args.datasets)!r}')
    return sets


def run_report(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Prune and measure every model, gamma and recovery; write ``report.csv`` as rows come."""
    if not args.models:
        raise ConfigError('give at least one --model to prune (or --from-csv to replot)')
    runs = args.runs or list(DEFAULT_RUNS)
    for run in runs:
        PruneConf(sparsity=run.sparsity, steps=args.steps, gamma=run.gamma)  # check all first
    recovering = any(run.recovery != 'none' for run in runs)
    if recovering and not args.recovery_data.is_dir():
        raise FileNotFoundError(f'--recovery-data {str(args.recovery_data)!r} does not exist')
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    sets = load_sets(args)
    logger.info('evaluation sets, each scored on its own: %s', sets)
    calibrator = None
    if recovering:
        calibrator = BatchNormCalibrator.from_folder(args.recovery_data)
    measured = []
    for name in args.models:
        measured += measure_model(name, runs, sets, calibrator, args)
    # Every model is timed in the same rounds, so that a change in the load of the shared
    # CPU between models does not show as a speed-up.
    add_latencies(measured, args.rounds, args.places)
    columns = report_columns(sets)
    with (args.out / 'report.csv').open('w', newline='') as stream:
        writer = csv.DictWriter(stream, fieldnames=columns)
        writer.writeheader()
        for row, _ in measured:
            writer.writerow({k: _fmt(row.get(k, '')) for k in columns})
    return [row for row, _ in measured]


def measure_model(
    name: str,
    runs: Sequence[Run],
    sets: Sequence[EvalSet],
    calibrator: BatchNormCalibrator | None,
    args: argparse.Namespace,
) -> list[tuple[dict[str, Any], VprModel]]:
    """The unpruned model and every step of every gamma and recovery, measured (all but
    the latencies, which ``add_latencies`` times together)."""
    model = load_model(name)
    evaluator = Evaluator(sets)
    measured: list[tuple[dict[str, Any], VprModel]] = []
    with tempfile.TemporaryDirectory(prefix='prune_report_') as tmp:
        base = {
            'model': name,
            'run': 'unpruned',
            'final_sparsity': 0.0,
            'gamma': 0.0,
            'recovery': 'none',
            'step': 0,
        }
        row = {**base, 'sparsity': 0.0, 'descriptor_sparsity': 0.0}
        rss = Path(tmp) if args.rss_steps != 'none' else None
        measured.append(measure_one(model, row, evaluator, args, rss))
        for run in runs:
            for step in prune_steps(model, run, args, calibrator):
                row = _step_row(name, run, step)
                rss = None
                if args.rss_steps == 'all' or (
                    args.rss_steps == 'last' and step.index == args.steps
                ):
                    rss = Path(tmp)
                measured.append(measure_one(step.model, row, evaluator, args, rss))
                if args.save_models:
                    folder = args.out / 'models' / name / str(run) / f'step{step.index}'
                    save_model(step.model, folder)
    return measured


def measure_one(
    model: VprModel,
    row: dict[str, Any],
    evaluator: Evaluator,
    args: argparse.Namespace,
    folder: Path | None,
) -> tuple[dict[str, Any], VprModel]:
    """Recall, fidelity and memory of one model (process memory with a ``folder``),
    added to ``row``."""
    row.update(evaluator.measure(model))
    row.update(measure_memory(model, args.places, args.rss_places, args.rss_queries, folder))
    _log(row, evaluator.sets)
    return row, model


def _step_row(name: str, run: Run, step: PruneStep) -> dict[str, Any]:
    return {
        'model': name,
        'run': str(run),
        'final_sparsity': run.sparsity,
        'gamma': run.gamma,
        'recovery': run.recovery,
        'step': step.index,
        'sparsity': step.sparsity,
        'descriptor_sparsity': step.descriptor_sparsity,
        'finetune_loss': step.finetune_loss,
    }


def report_columns(sets: Sequence[EvalSet] | Sequence[str]) -> list[str]:
    names = [s if isinstance(s, str) else s.name for s in sets]
    return [
        'model',
        'run',
        'final_sparsity',
        'gamma',
        'recovery',
        'step',
        'sparsity',
        'descriptor_sparsity',
        'params',
        'global_dim',
        'local_dim',
        'model_mb',
        'map_mb',
        'map_global_mb',
        'total_mb',
        'paper_total_mb',
        'gflops',
        'rss_mb',
        'peak_rss_mb',
        'runtime_rss_mb',
        'extraction_ms',
        'extraction_ms_median',
        'matching_ms',
        'rerank_ms',
        'total_ms',
        *(f'{n}_{c}' for n in names for c in DATASET_COLUMNS),
        'finetune_loss',
    ]


def _log(row: dict[str, Any], sets: Sequence[EvalSet]) -> None:
    scores = ', '.join(
        f'{s.name} R@1 {100 * row[f"{s.name}_r1"]:.1f} agree {100 * row[f"{s.name}_agree"]:.1f}'
        for s in sets
    )
    logger.info(
        '%s %s step %d: D=%d, total %.1f MB, RSS %s MB; %s',
        row['model'],
        row['run'],
        row['step'],
        row['global_dim'],
        row['total_mb'],
        _fmt(row.get('rss_mb', '')),
        scores,
    )


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``report.csv`` written by ``run_report`` (numbers parsed back)."""
    text = ('model', 'run', 'recovery')
    rows = []
    with path.open(newline='') as stream:
        for raw in csv.DictReader(stream):
            row: dict[str, Any] = {
                k: (v if k in text or v == '' else float(v)) for k, v in raw.items()
            }
            row['step'] = int(row['step'])
            rows.append(row)
    return rows


def _fmt(value: object) -> object:
    if isinstance(value, float):
        return f'{value:.6g}'
    return '' if value is None else value


# --------------------------------------------------------------------------------------
# Summary and plots


def dataset_names(rows: Sequence[dict[str, Any]]) -> list[str]:
    return [k[: -len('_r1_global')] for k in rows[0] if k.endswith('_r1_global')]


def _base(rows: Sequence[dict[str, Any]], row: dict[str, Any]) -> dict[str, Any]:
    return next(r for r in rows if r['model'] == row['model'] and r['step'] == 0)


def _cut(row: dict[str, Any], base: dict[str, Any], key: str) -> float:
    """The fraction ``row`` saves against ``base`` (NaN where not measured)."""
    if row.get(key, '') == '' or base.get(key, '') == '':
        return float('nan')
    return 1.0 - float(row[key]) / float(base[key])


def _mb(row: dict[str, Any], key: str, digits: int = 0) -> str:
    """A figure of ``row`` that may not have been measured (blank then)."""
    return '' if row.get(key, '') == '' else f'{float(row[key]):.{digits}f}'


def _worst(row: dict[str, Any], names: Sequence[str], key: str) -> float:
    return min(float(row[f'{n}_{key}']) for n in names)


def _r1_loss(row: dict[str, Any], base: dict[str, Any], names: Sequence[str]) -> float:
    """The largest R@1 loss (points, fraction) over datasets, re-ranked or retrieval."""
    return max(
        float(base[f'{n}_{k}']) - float(row[f'{n}_{k}'])
        for n in names
        for k in ('r1', 'r1_global')
    )


def summarize(
    rows: list[dict[str, Any]],
    max_loss: float,
    budgets: dict[str, list[float]],
    agree_min_r1: float = 0.5,
) -> str:
    """Markdown: efficiency table, recall and fidelity table, cuts at fidelity budgets,
    and the recipe (largest pruning within ``max_loss`` of R@1 on every dataset).

    Agreement budgets count the datasets where the unpruned model's R@1 after re-ranking
    reaches ``agree_min_r1`` (where its top-1 is near chance, which place comes first is
    noise); correlation budgets count every dataset.
    """
    names = dataset_names(rows)
    lines = ['## Efficiency (whole system; cuts against the unpruned model)', '']
    lines.append(
        '| model | run | step | s | d | D | C | model MB | map MB | map MB (global '
        'only) | total MB | -total | paper total MB | -paper | RSS MB | -RSS | GFLOPs | -FLOPs '
        '| ms | -ms |'
    )
    lines.append('|' + '---|' * 20)
    for row in rows:
        base = _base(rows, row)
        lines.append(
            f'| {row["model"]} | {row["run"]} | {row["step"]} | {row["sparsity"]:.3g} | '
            f'{row["descriptor_sparsity"]:.3g} | {int(row["global_dim"])} | '
            f'{int(row["local_dim"])} | '
            f'{row["model_mb"]:.1f} | {row["map_mb"]:.0f} | {row["map_global_mb"]:.0f} | '
            f'{row["total_mb"]:.0f} | {_pct(_cut(row, base, "total_mb"))} | '
            f'{row["paper_total_mb"]:.0f} | {_pct(_cut(row, base, "paper_total_mb"))} | '
            f'{_mb(row, "rss_mb")} | {_pct(_cut(row, base, "rss_mb"))} | '
            f'{_mb(row, "gflops", 3)} | {_pct(_cut(row, base, "gflops"))} | '
            f'{row["total_ms"]:.1f} | {_pct(_cut(row, base, "total_ms"))} |'
        )
    lines += ['', '## Recall and fidelity per dataset (R@1 re-ranked / retrieval, %)', '']
    header = ' | '.join(f'{n} R@1 | {n} agree | {n} corr' for n in names)
    lines.append(f'| model | run | step | {header} |')
    lines.append('|' + '---|' * (3 + 3 * len(names)))
    for row in rows:
        cells = ' | '.join(
            f'{100 * row[f"{n}_r1"]:.1f} / {100 * row[f"{n}_r1_global"]:.1f} | '
            f'{100 * row[f"{n}_agree"]:.1f} | {row[f"{n}_corr"]:.3f}'
            for n in names
        )
        lines.append(f'| {row["model"]} | {row["run"]} | {row["step"]} | {cells} |')
    lines += ['', '## Cuts at equal descriptor-fidelity budgets', '']
    lines.append(
        'The pruned model with the largest total-memory cut whose fidelity meets the budget '
        'on every counted dataset: agree, the top-1 agreement with the unpruned model, on '
        f'the datasets where the unpruned model reaches R@1 {100 * agree_min_r1:g} % (named '
        'in the budget); corr, the correlation of the query-map similarities, on all.'
    )
    lines.append('')
    lines.append(
        '| model | budget | run | step | D | -total MB | -paper MB | -RSS | -FLOPs | -ms | '
        'worst R@1 loss (points) |'
    )
    lines.append('|' + '---|' * 11)
    for model in dict.fromkeys(r['model'] for r in rows):
        mine = [r for r in rows if r['model'] == model and r['step'] > 0]
        base = _base(rows, {'model': model})
        recognised = [n for n in names if float(base[f'{n}_r1']) >= agree_min_r1]
        for key, levels in budgets.items():
            counted = recognised if key == 'agree' else names
            for level in levels:
                meeting = [r for r in mine if counted and _worst(r, counted, key) >= level]
                label = f'{key} >= {level:g}' + (
                    f' ({", ".join(counted)})' if key == 'agree' else ''
                )
                if not meeting:
                    lines.append(f'| {model} | {label} | none meets it | | | | | | | | |')
                    continue
                best = max(meeting, key=lambda r: _cut(r, base, 'total_mb'))
                lines.append(
                    f'| {model} | {label} | {best["run"]} | '
                    f'{best["step"]} | {int(best["global_dim"])} | '
                    f'{_pct(_cut(best, base, "total_mb"))} | '
                    f'{_pct(_cut(best, base, "paper_total_mb"))} | '
                    f'{_pct(_cut(best, base, "rss_mb"))} | '
                    f'{_pct(_cut(best, base, "gflops"))} | '
                    f'{_pct(_cut(best, base, "total_ms"))} | '
                    f'{100 * _r1_loss(best, base, names):.1f} |'
                )
    lines += ['', f'## Recipe: R@1 within {100 * max_loss:g} point(s) on every dataset', '']
    lines.append(
        'The largest total-memory cut whose R@1 after re-ranking and of retrieval both stay '
        f'within {100 * max_loss:g} point(s) of the unpruned model on every dataset:'
    )
    for model in dict.fromkeys(r['model'] for r in rows):
        base = _base(rows, {'model': model})
        ok = [
            r
            for r in rows
            if r['model'] == model and r['step'] > 0 and _r1_loss(r, base, names) <= max_loss
        ]
        if not ok:
            lines.append(f'- {model}: none of the measured steps.')
            continue
        best = max(ok, key=lambda r: _cut(r, base, 'total_mb'))
        lines.append(
            f'- {model}: {best["run"]} step {best["step"]}, i.e. `prune --model {model} '
            f'--sparsity {best["sparsity"]:.4g} --steps {best["step"]} '
            f'--gamma {best["descriptor_sparsity"]:.4g}`{_recovery_flags(best)} '
            f'(D {int(best["global_dim"])}): '
            f'total memory {_pct(_cut(best, base, "total_mb"))} less '
            f'(paper count {_pct(_cut(best, base, "paper_total_mb"))}), RSS '
            f'{_pct(_cut(best, base, "rss_mb"))}, extraction FLOPs '
            f'{_pct(_cut(best, base, "gflops"))}, latency {_pct(_cut(best, base, "total_ms"))}; '
            f'top-1 agreement {_agreements(best, names)}'
        )
    return '\n'.join(lines) + '\n'


def _agreements(row: dict[str, Any], names: Sequence[str]) -> str:
    return ', '.join(f'{n} {100 * float(row[n + "_agree"]):.0f} %' for n in names)


def _recovery_flags(row: dict[str, Any]) -> str:
    if row['recovery'] == 'bn':
        return ' with `--calibration-data IMAGES`'
    if row['recovery'] == 'distill':
        return ' with `--train-data IMAGES --metric-weight 0`'
    if row['recovery'] == 'finetune':
        return ' with `--calibration-data IMAGES --train-data IMAGES --metric-weight 0`'
    return ''


def _pct(value: float) -> str:
    return '' if np.isnan(value) else f'{100 * value:.1f} %'


def plot(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """Per model: total memory and extraction FLOPs cuts against the worst top-1
    agreement, and the R@1 of each dataset against the total memory, one curve per run."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    names = dataset_names(rows)
    written = []
    for model in dict.fromkeys(r['model'] for r in rows):
        mine = [r for r in rows if r['model'] == model]
        base = _base(rows, {'model': model})
        panels = 2 + len(names)
        fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 4), squeeze=False)
        for label in dict.fromkeys(r['run'] for r in mine if r['step'] > 0):
            curve = [base] + sorted(
                (r for r in mine if r['run'] == label), key=lambda r: r['step']
            )
            agree = [100 * _worst(r, names, 'agree') for r in curve]
            axes[0, 0].plot(
                [100 * _cut(r, base, 'total_mb') for r in curve], agree, 'o-', label=label
            )
            axes[0, 1].plot(
                [100 * _cut(r, base, 'gflops') for r in curve], agree, 'o-', label=label
            )
            for ax, name in zip(axes[0, 2:], names):
                ax.plot(
                    [r['total_mb'] for r in curve],
                    [100 * r[f'{name}_r1'] for r in curve],
                    'o-',
                    label=label,
                )
                ax.set_title(f'{name}: R@1 after re-ranking (%)', fontsize=9)
                ax.set_xlabel('total memory, model + map (MB)', fontsize=8)
        axes[0, 0].set_xlabel('total memory cut (%)', fontsize=8)
        axes[0, 1].set_xlabel(
            'extraction FLOPs cut (%): the latency without the noise of a shared CPU', fontsize=8
        )
        for ax in axes[0, :2]:
            ax.set_ylabel('worst top-1 agreement with unpruned (%)', fontsize=8)
        for ax in axes.flat:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f'{model}: structured pruning, whole system')
        fig.tight_layout()
        path = out / f'{model}_fidelity.png'
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


# --------------------------------------------------------------------------------------
# Command line


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='pruning_report',
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        '--model',
        dest='models',
        action='append',
        default=[],
        help=f'CNN model to prune (repeat): a name {available_models()} or an exported path',
    )
    parser.add_argument(
        '--run',
        dest='runs',
        type=Run.parse,
        action='append',
        default=[],
        metavar='SPARSITY,GAMMA,RECOVERY',
        help='one curve (repeat): final backbone sparsity, final descriptor sparsity (the '
        "paper's gamma) and recovery (none, bn, finetune); default: "
        + ' '.join(f'{r.sparsity:g},{r.gamma:g},{r.recovery}' for r in DEFAULT_RUNS),
    )
    parser.add_argument('--steps', type=int, default=4, help='pruning steps (linear schedule)')
    parser.add_argument(
        '--importance', choices=IMPORTANCES[:2], default='l2', help='channel importance'
    )
    parser.add_argument('--round-to', type=int, default=0, help='channel count multiple')
    parser.add_argument(
        '--datasets',
        type=Path,
        default=Path('../shared/datasets'),
        help='folder with gardens_sfu_places/ and nordland64/',
    )
    parser.add_argument(
        '--recovery-data',
        type=Path,
        default=Path('../shared/datasets/campus_route'),
        help='images for batch-norm re-estimation and distillation (not evaluated)',
    )
    parser.add_argument(
        '--finetune-iters', type=int, default=20, help='distillation iterations per step'
    )
    parser.add_argument(
        '--finetune-size',
        type=int,
        nargs=2,
        default=[120, 160],
        metavar=('H', 'W'),
        help='distillation input size',
    )
    parser.add_argument(
        '--finetune-batch-places', type=int, default=8, help='distillation batch: 2x images'
    )
    parser.add_argument(
        '--nordland-size',
        type=int,
        nargs=2,
        default=[64, 128],
        metavar=('H', 'W'),
        help='input size for the 32x64 Nordland frames',
    )
    parser.add_argument(
        '--nordland-db-stride', type=int, default=4, help='every n-th summer frame is a place'
    )
    parser.add_argument(
        '--nordland-query-stride',
        type=int,
        default=8,
        help='every n-th winter frame is a query (0: no Nordland)',
    )
    parser.add_argument('--places', type=int, default=10_000, help='map size for MB and ms')
    parser.add_argument(
        '--rss-places', type=int, default=2000, help='map size of the process-memory run'
    )
    parser.add_argument(
        '--rss-queries', type=int, default=5, help='frames relocalized in that run'
    )
    parser.add_argument(
        '--rss-steps',
        choices=('all', 'last', 'none'),
        default='all',
        help='which steps get the process-memory run (about 10 s each; the unpruned model '
        'always does unless none)',
    )
    parser.add_argument('--rounds', type=int, default=40, help='latency rounds')
    parser.add_argument('--threads', type=int, default=1, help='torch and faiss CPU threads')
    parser.add_argument(
        '--max-loss', type=float, default=0.01, help='R@1 loss the recipe allows (fraction)'
    )
    parser.add_argument(
        '--agree-budgets',
        type=float,
        nargs='+',
        default=[0.95, 0.9, 0.8, 0.5],
        help='top-1 agreement budgets of the summary',
    )
    parser.add_argument(
        '--agree-min-r1',
        type=float,
        default=0.5,
        help='agreement budgets count the datasets where the unpruned R@1 reaches this',
    )
    parser.add_argument(
        '--corr-budgets',
        type=float,
        nargs='+',
        default=[0.99, 0.95, 0.9],
        help='similarity-correlation budgets of the summary',
    )
    parser.add_argument('--save-models', action='store_true', help='export every pruned step')
    parser.add_argument(
        '--from-csv', type=Path, help='only redo summary.md and the plots from this report.csv'
    )
    parser.add_argument('--out', type=Path, required=True, help='report folder (outside the repo)')
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)

    def body() -> int:
        start = time.perf_counter()
        rows = read_rows(args.from_csv) if args.from_csv else run_report(args)
        args.out.mkdir(parents=True, exist_ok=True)
        plots = plot(rows, args.out)
        budgets = {'agree': args.agree_budgets, 'corr': args.corr_budgets}
        summary = summarize(rows, args.max_loss, budgets, args.agree_min_r1)
        (args.out / 'summary.md').write_text(summary)
        if not args.from_csv:  # the measuring run's settings stay with its report
            (args.out / 'args.json').write_text(json.dumps(vars(args), default=str, indent=2))
        print(summary)
        logger.info(
            'wrote %s and %d plots in %.0f s', args.out, len(plots), time.perf_counter() - start
        )
        return 0

    return run_cli(body, argv)


if __name__ == '__main__':
    sys.exit(main())
