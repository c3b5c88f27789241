"""Pruning report: memory, latency and recall of pruned CNN models, per step and gamma.

For each model and each gamma, prunes step by step (``vpr_ros.pruning.prune``) and, for
the unpruned model and every step, measures (sizes with ``vpr_ros.profiling.footprint``):

- parameters, model MB (fp32 and fp16), descriptor dimension D, map MB per 1,000 places;
- extraction latency (batch 1, this CPU, the model's input size): ``extraction_ms`` is
  the fastest of ``--runs`` passes (steadiest on a CPU shared with other processes),
  ``extraction_ms_median`` the median;
- matching latency per query on a 10,000-place map (faiss IndexFlatIP, top-1, fastest
  of 100 queries);
- recall on real data when ``--datasets`` holds it:
  ``nordland_r1``: winter queries against the summer map, Recall@1 with +-2 frames;
  ``nordland_agree``: fidelity, the fraction of all 3,576 winter queries whose top-1
  summer frame is the same as the unpruned model's (``nordland_agree_pm2``: within +-2
  frames of it); ``nordland_sim_corr``: the Pearson correlation of all query-map
  similarities with the unpruned model's (a steadier fidelity figure where the unpruned
  model's own top-1 is close to chance);
  ``gardens_r1``: Gardens Point / SFU places, Recall@1 of each place's other views
  against its first view (``i0``), same folder = same place.

Writes ``report.csv`` (one row per model, gamma and step; step 0 is the unpruned model),
``summary.md`` and, per model, ``<model>_memory.png`` (total memory = model fp32 + a
10,000-place map, against each recall figure) and ``<model>_latency.png`` (extraction +
matching), one curve per gamma, like the paper's figures.

Example::

    python benchmarks/pruning_report.py --model efficientnet_lite0_gem \\
        --model efficientnet_lite0_mixvpr --gamma 0 0.5 1 --sparsity 0.5 --steps 4 \\
        --datasets ../shared/datasets --out /tmp/prune_report
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import faiss
import numpy as np
import torch
from tqdm import tqdm

from vpr_ros import logger
from vpr_ros.cli.common import run_cli
from vpr_ros.errors import ConfigError
from vpr_ros.ground_truth import positives_frame_aligned
from vpr_ros.imagefolders import list_images, load_image, relative_names
from vpr_ros.learning.finetune import BatchNormCalibrator, FinetuneConf
from vpr_ros.metrics import recall_at_n
from vpr_ros.models import available_models, load_model, save_model
from vpr_ros.models.base import VprModel
from vpr_ros.models.preprocessing import Preprocessing
from vpr_ros.profiling import footprint
from vpr_ros.pruning import IMPORTANCES, PruneConf, PruneStep, prune_with_recovery

MAP_PLACES = 10_000
NORDLAND_TOLERANCE = 2
RECALL_COLUMNS = (
    'nordland_agree',
    'nordland_agree_pm2',
    'nordland_sim_corr',
    'nordland_r1',
    'gardens_r1',
)
RECALL_LABELS = {
    'nordland_agree': 'Nordland top-1 agreement with unpruned (fidelity)',
    'nordland_agree_pm2': 'Nordland top-1 within 2 frames of unpruned',
    'nordland_sim_corr': 'Nordland query-map similarity correlation with unpruned',
    'nordland_r1': 'Nordland winter->summer R@1 (+-2 frames)',
    'gardens_r1': 'Gardens/SFU R@1',
}


# --------------------------------------------------------------------------------------
# Data


class EvalSet:
    """Database and query images (RGB uint8) with ground truth."""

    def __init__(
        self,
        name: str,
        database: list[np.ndarray],
        queries: list[np.ndarray],
        positives: list[np.ndarray],
        size: tuple[int, int] | None,
    ) -> None:
        self.name = name
        self.database = database
        self.queries = queries
        self.positives = positives
        self.size = size

    def __repr__(self) -> str:
        return f'< {self.name} - #q: {len(self.queries)}; #db: {len(self.database)} >'


def load_nordland(root: Path, size: tuple[int, int] | None) -> EvalSet:
    """Winter queries against the summer map, frame-aligned (+-2 frames)."""
    summer = list_images(root / 'summer', '*.png')
    winter = list_images(root / 'winter', '*.png')
    db_names = relative_names(summer, root / 'summer')
    q_names = relative_names(winter, root / 'winter')
    positives = positives_frame_aligned(db_names, q_names, NORDLAND_TOLERANCE)
    return EvalSet(
        'nordland64',
        [load_image(p) for p in summer],
        [load_image(p) for p in winter],
        positives,
        size,
    )


def load_gardens(root: Path) -> EvalSet:
    """Each subset's ``pK/i0`` views are the map; its other views ``pK/i1..`` query it."""
    database, queries, positives = [], [], []
    for subset in ('pairs', 'triplets'):
        paths = list_images(root / subset, '*/i*/*')
        names = relative_names(paths, root / subset)
        places = sorted({n.split('/')[0] for n in names})
        first = len(database)
        place_index = {}
        for path, name in zip(paths, names):
            place, view = name.split('/')[:2]
            if view == 'i0':
                place_index[place] = len(database)
                database.append(load_image(path))
        for path, name in zip(paths, names):
            place, view = name.split('/')[:2]
            if view != 'i0':
                queries.append(load_image(path))
                positives.append(np.array([place_index[place]], np.int64))
        if len(database) - first != len(places):
            raise ConfigError(f'{subset}: every place needs exactly one i0 view')
    return EvalSet('gardens_sfu_places', database, queries, positives, None)


@torch.inference_mode()
def describe(
    model: VprModel, images: Sequence[np.ndarray], size: tuple[int, int] | None, batch: int = 32
) -> np.ndarray:
    """Global descriptors (N, D) of RGB images at ``size`` (None: the model's own)."""
    prep = model.preprocessing
    if size is not None:
        prep = Preprocessing(size=tuple(size), mean=prep.mean, std=prep.std)
    out = []
    for start in range(0, len(images), batch):
        out.append(model(prep(images[start : start + batch]))['global_descriptor'].numpy())
    return np.concatenate(out).astype(np.float32)


def top1(database: np.ndarray, queries: np.ndarray) -> np.ndarray:
    index = faiss.IndexFlatIP(database.shape[1])
    index.add(np.ascontiguousarray(database))
    return index.search(np.ascontiguousarray(queries), 1)[1][:, 0]


# --------------------------------------------------------------------------------------
# Measurements


class Evaluator:
    """Measures one model; remembers the unpruned model's Nordland top-1 for fidelity."""

    def __init__(self, sets: dict[str, EvalSet]) -> None:
        self.sets = sets
        self.reference_top1: np.ndarray | None = None
        self.reference_similarity: np.ndarray | None = None

    def measure(self, model: VprModel) -> dict:
        """Sizes and recall; the latencies are timed later, interleaved (``add_latencies``)."""
        fp = footprint(model)
        row = {
            'params': fp.params,
            'model_mb_fp32': fp.model_mb_fp32,
            'model_mb_fp16': fp.model_mb_fp16,
            'global_dim': fp.global_dim,
            'local_dim': fp.local_dim,
            'map_mb_per_1000': fp.map_mb_per_1000,
        }
        row['total_mb'] = row['model_mb_fp32'] + row['map_mb_per_1000'] * MAP_PLACES / 1000
        for key in RECALL_COLUMNS:
            row[key] = ''
        if 'nordland' in self.sets:
            data = self.sets['nordland']
            database = describe(model, data.database, data.size)
            queries = describe(model, data.queries, data.size)
            hits = top1(database, queries)
            similarity = (queries @ database.T).ravel()
            if self.reference_similarity is None:
                self.reference_similarity = similarity
            row['nordland_sim_corr'] = float(
                np.corrcoef(similarity, self.reference_similarity)[0, 1]
            )
            row['nordland_r1'] = recall_at_n(hits[:, None], data.positives, (1,))[1]
            if self.reference_top1 is None:
                self.reference_top1 = hits
            row['nordland_agree'] = float(np.mean(hits == self.reference_top1))
            row['nordland_agree_pm2'] = float(
                np.mean(np.abs(hits - self.reference_top1) <= NORDLAND_TOLERANCE)
            )
        if 'gardens' in self.sets:
            data = self.sets['gardens']
            hits = top1(describe(model, data.database, None), describe(model, data.queries, None))
            row['gardens_r1'] = recall_at_n(hits[:, None], data.positives, (1,))[1]
        return row


@torch.inference_mode()
def add_latencies(measured: list[tuple[dict, VprModel]], runs: int) -> None:
    """Time extraction (batch 1) and matching (top-1 in a 10,000-place map) for every
    model in rounds, one pass of each model per round, so that a change in the load of a
    shared CPU hits all models alike; fills ``extraction_ms`` (fastest pass),
    ``extraction_ms_median``, ``matching_ms`` (fastest query) and ``total_ms``."""
    models = [model.eval() for _, model in measured]
    inputs = [torch.randn(1, 3, *model.preprocessing.size) for model in models]
    dims = sorted({row['global_dim'] for row, _ in measured})
    rng = np.random.default_rng(0)
    indexes, queries = {}, {}
    for dim in dims:
        indexes[dim] = faiss.IndexFlatIP(dim)
        indexes[dim].add(_unit(rng.standard_normal((MAP_PLACES, dim), dtype=np.float32)))
        queries[dim] = _unit(rng.standard_normal((1, dim), dtype=np.float32))
    for model, images in zip(models, inputs):
        model(images)
        model(images)
    extraction = [[] for _ in models]
    matching = {dim: [] for dim in dims}
    for _ in tqdm(range(runs), desc='latency rounds', leave=False):
        for times, model, images in zip(extraction, models, inputs):
            start = time.perf_counter()
            model(images)
            times.append(time.perf_counter() - start)
        for _ in range(5):
            for dim in dims:
                start = time.perf_counter()
                indexes[dim].search(queries[dim], 1)
                matching[dim].append(time.perf_counter() - start)
    for (row, _), times in zip(measured, extraction):
        row['extraction_ms'] = 1000 * min(times)
        row['extraction_ms_median'] = 1000 * float(np.median(times))
        row['matching_ms'] = 1000 * min(matching[row['global_dim']])
        row['total_ms'] = row['extraction_ms'] + row['matching_ms']


def _unit(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True))


COLUMNS = (
    'model',
    'gamma',
    'step',
    'sparsity',
    'head_sparsity',
    'params',
    'model_mb_fp32',
    'model_mb_fp16',
    'global_dim',
    'local_dim',
    'map_mb_per_1000',
    'extraction_ms',
    'extraction_ms_median',
    'matching_ms',
    'total_mb',
    'total_ms',
    *RECALL_COLUMNS,
    'finetune_loss',
)


def run_report(args: argparse.Namespace) -> list[dict]:
    """Prune and measure every model and gamma; write rows to ``report.csv`` as they come."""
    if not args.models:
        raise ConfigError('give at least one --model to prune (or --from-csv to replot)')
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    sets = {}
    if args.datasets is not None:
        nordland = args.datasets / 'nordland64'
        gardens = args.datasets / 'gardens_sfu_places'
        if nordland.is_dir():
            sets['nordland'] = load_nordland(
                nordland, tuple(args.nordland_size) if args.nordland_size else None
            )
        if gardens.is_dir():
            sets['gardens'] = load_gardens(gardens)
    logger.info('evaluation sets: %s', list(sets.values()) or 'none (efficiency only)')
    rows: list[dict] = []
    csv_path = args.out / 'report.csv'
    with csv_path.open('w', newline='') as stream:
        writer = csv.DictWriter(stream, fieldnames=COLUMNS)
        writer.writeheader()

        def emit(row: dict) -> None:
            rows.append(row)
            writer.writerow({k: _fmt(row.get(k, '')) for k in COLUMNS})
            stream.flush()

        calibrator = None
        if args.calibration_data is not None:
            calibrator = BatchNormCalibrator.from_folder(args.calibration_data)
        for name in args.models:
            model = load_model(name)
            evaluator = Evaluator(sets)
            base = {'model': name, 'step': 0, 'sparsity': 0.0, 'head_sparsity': 0.0}
            measured = [({**base, **evaluator.measure(model)}, model)]
            _log(measured[-1][0])
            for gamma in args.gammas:
                for step in prune_steps(model, gamma, args, calibrator):
                    row = {
                        'model': name,
                        'gamma': gamma,
                        'step': step.index,
                        'sparsity': step.sparsity,
                        'head_sparsity': step.head_sparsity,
                        **evaluator.measure(step.model),
                        'finetune_loss': step.finetune_loss,
                    }
                    measured.append((row, step.model))
                    _log(row)
                    if args.save_models:
                        folder = args.out / 'models' / name / f'g{gamma:g}' / f'step{step.index}'
                        save_model(step.model, folder)
            add_latencies(measured, args.runs)
            for gamma in args.gammas:  # the unpruned model starts every gamma's curve
                emit({**measured[0][0], 'gamma': gamma})
            for row, _ in measured[1:]:
                emit(row)
    return rows


def prune_steps(
    model: VprModel,
    gamma: float,
    args: argparse.Namespace,
    calibrator: BatchNormCalibrator | None,
) -> Iterator[PruneStep]:
    """The pruning steps of one gamma, with the command line's recovery options."""
    conf = PruneConf(
        sparsity=args.sparsity,
        steps=args.steps,
        gamma=gamma,
        importance=args.importance,
        round_to=args.round_to or 0,
    )
    finetune_conf = FinetuneConf(
        iterations=args.finetune_iters,
        size=list(args.finetune_size or []),
        distill_weight=args.distill_weight,
        metric_weight=args.metric_weight,
    )
    steps = prune_with_recovery(
        model,
        conf,
        calibrator=calibrator,
        train_data=args.train_data,
        finetune_conf=finetune_conf,
    )
    yield from tqdm(steps, total=args.steps, desc=f'{model.name} gamma={gamma:g}')


def _log(row: dict) -> None:
    logger.info(
        '%s gamma=%s step=%s: %.1f MB, D=%d, agree=%s, sim corr=%s, R@1 nordland=%s gardens=%s',
        row['model'],
        row.get('gamma', '-'),
        row['step'],
        row['total_mb'],
        row['global_dim'],
        _fmt(row['nordland_agree']),
        _fmt(row['nordland_sim_corr']),
        _fmt(row['nordland_r1']),
        _fmt(row['gardens_r1']),
    )


def read_rows(path: Path) -> list[dict]:
    """Rows of a ``report.csv`` written by ``run_report`` (numbers parsed back)."""
    rows = []
    with path.open(newline='') as stream:
        for raw in csv.DictReader(stream):
            row = {k: (v if k == 'model' or v == '' else float(v)) for k, v in raw.items()}
            row['step'] = int(row['step'])
            rows.append(row)
    return rows


def _fmt(value: object) -> object:
    if isinstance(value, float):
        return f'{value:.6g}'
    return '' if value is None else value


# --------------------------------------------------------------------------------------
# Plots and summary


def plot(rows: list[dict], out: Path) -> list[Path]:
    """Per model: total memory and total latency against each recall figure, per gamma."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    written = []
    for name in dict.fromkeys(r['model'] for r in rows):
        mine = [r for r in rows if r['model'] == name]
        measures = [k for k in RECALL_COLUMNS if any(r[k] != '' for r in mine)]
        if not measures:
            continue
        for axis, label, stem in (
            ('total_mb', f'total memory (MB): model fp32 + {MAP_PLACES:,}-place map', 'memory'),
            ('total_ms', 'total latency (ms): extraction (batch 1) + matching', 'latency'),
        ):
            cols = min(3, len(measures))
            rows_ = -(-len(measures) // cols)
            fig, axes = plt.subplots(rows_, cols, figsize=(5 * cols, 4 * rows_), squeeze=False)
            for ax in axes.flat[len(measures) :]:
                ax.set_visible(False)
            for ax, measure in zip(axes.flat, measures):
                scale = 1 if measure == 'nordland_sim_corr' else 100
                for gamma in dict.fromkeys(r['gamma'] for r in mine):
                    curve = sorted(
                        (r for r in mine if r['gamma'] == gamma), key=lambda r: r['step']
                    )
                    ax.plot(
                        [r[axis] for r in curve],
                        [scale * r[measure] for r in curve],
                        marker='o',
                        label=f'gamma={gamma:g}',
                    )
                ax.set_title(RECALL_LABELS[measure], fontsize=9)
                ax.set_xlabel(label, fontsize=8)
                ax.set_ylabel('correlation' if scale == 1 else '%')
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)
            fig.suptitle(f'{name}: structured pruning, {stem} vs recall')
            fig.tight_layout()
            path = out / f'{name}_{stem}.png'
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def summarize(rows: list[dict], max_loss: float) -> str:
    """A markdown table of reductions against the unpruned model, per row."""
    lines = [
        '| model | gamma | step | D | params | total MB | total ms | -mem | -lat | '
        'agree | sim corr | d R@1 nordland | d R@1 gardens |',
        '|' + '---|' * 13,
    ]
    best: dict[str, tuple[float, dict]] = {}
    for row in rows:
        base = next(r for r in rows if r['model'] == row['model'] and r['step'] == 0)
        mem = 1 - row['total_mb'] / base['total_mb']
        lat = 1 - row['total_ms'] / base['total_ms']
        d_n = _delta(row, base, 'nordland_r1')
        d_g = _delta(row, base, 'gardens_r1')
        lines.append(
            f'| {row["model"]} | {row["gamma"]:g} | {row["step"]} | {row["global_dim"]} | '
            f'{row["params"] / 1e6:.2f}M | {row["total_mb"]:.1f} | {row["total_ms"]:.1f} | '
            f'{100 * mem:.0f}% | {100 * lat:.0f}% | {_pct(row["nordland_agree"])} | '
            f'{_corr(row["nordland_sim_corr"])} | '
            f'{_pct(d_n)} | {_pct(d_g)} |'
        )
        losses = [-d for d in (d_n, d_g) if d != '']
        if row['step'] and losses and max(losses) < max_loss:
            score = min(mem, lat)
            if row['model'] not in best or score > best[row['model']][0]:
                best[row['model']] = (score, {**row, 'mem': mem, 'lat': lat})
    lines.append('')
    lines.append(f'Largest pruning with every recall loss under {100 * max_loss:.0f} point(s):')
    for name, (_, row) in best.items():
        lines.append(
            f'- {name}: gamma {row["gamma"]:g}, step {row["step"]} '
            f'(sparsity {row["sparsity"]:.3g}): '
            f'{100 * row["mem"]:.0f}% less memory, {100 * row["lat"]:.0f}% less latency, '
            f'top-1 agreement {_pct(row["nordland_agree"])}%, '
            f'similarity correlation {_corr(row["nordland_sim_corr"])}'
        )
    return '\n'.join(lines) + '\n'


def _corr(value: float | str) -> str:
    return '' if value == '' else f'{value:.3f}'


def _delta(row: dict, base: dict, key: str) -> float | str:
    if row[key] == '' or base[key] == '':
        return ''
    return row[key] - base[key]


def _pct(value: float | str) -> str:
    return '' if value == '' else f'{100 * value:+.1f}' if value < 0 else f'{100 * value:.1f}'


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
        '--gamma',
        dest='gammas',
        type=float,
        nargs='+',
        default=[0.0, 0.5, 1.0],
        help='descriptor-layer sparsity relative to the backbone, one curve each',
    )
    parser.add_argument(
        '--sparsity', type=float, default=0.5, help='final backbone channel sparsity'
    )
    parser.add_argument('--steps', type=int, default=4, help='pruning steps (linear schedule)')
    parser.add_argument(
        '--importance', choices=IMPORTANCES, default='l2', help='channel importance'
    )
    parser.add_argument('--round-to', type=int, help='keep channel counts multiples of this')
    parser.add_argument(
        '--datasets', type=Path, help='folder with nordland64/ and gardens_sfu_places/'
    )
    parser.add_argument(
        '--nordland-size',
        type=int,
        nargs=2,
        metavar=('H', 'W'),
        help="input size for the 64x32 Nordland frames (default: the model's own)",
    )
    parser.add_argument(
        '--calibration-data',
        type=Path,
        help='unlabelled images to re-estimate batch-norm statistics on after each step',
    )
    parser.add_argument('--train-data', type=Path, help='place-labelled images to fine-tune on')
    parser.add_argument(
        '--metric-weight',
        type=float,
        default=1.0,
        help='weight of the place-label metric loss (0: distillation only, any images)',
    )
    parser.add_argument(
        '--finetune-iters', type=int, default=0, help='fine-tuning iterations per step'
    )
    parser.add_argument(
        '--finetune-size',
        type=int,
        nargs=2,
        metavar=('H', 'W'),
        help="fine-tuning input size (default: the model's own)",
    )
    parser.add_argument(
        '--distill-weight',
        type=float,
        default=1.0,
        help='weight of relational distillation to the unpruned model',
    )
    parser.add_argument('--runs', type=int, default=20, help='timed passes per latency figure')
    parser.add_argument('--threads', type=int, default=1, help='torch and faiss CPU threads')
    parser.add_argument(
        '--max-loss', type=float, default=0.01, help='recall loss the summary allows'
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
        summary = summarize(rows, args.max_loss)
        (args.out / 'summary.md').write_text(summary)
        (args.out / 'args.json').write_text(json.dumps(vars(args), default=str, indent=2))
        print(summary)
        logger.info(
            'wrote %s, summary.md and %d plots in %.0f s',
            args.out / 'report.csv',
            len(plots),
            time.perf_counter() - start,
        )
        return 0

    return run_cli(body, argv)


if __name__ == '__main__':
    sys.exit(main())
