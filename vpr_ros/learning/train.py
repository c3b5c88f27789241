"""Training place-recognition models (SelaVPR) on a VPR-format dataset.

Training follows SelaVPR: for each query, its best positive (the most similar database
image within ``pos_dist_m``) and hard negatives (the most similar database images beyond
``neg_dist_m``, among a random subset of the database plus the query's previous hard
negatives: "partial" mining) from a cache that is re-mined every ``cache_refresh_rate``
queries with the current model. The loss is ``vpr_ros.learning.losses.triplet_losses``:
a triplet margin loss on the global descriptors plus ``local_weight`` times the MNN local
loss. Only parameters with ``requires_grad`` train (SelaVPR: adapters, local head, GeM's
p), with Adam, through the step fine-tuning also runs (``vpr_ros.learning.finetune``).

Each epoch ends with a validation Recall@N, computed by the shipped pipeline
(``vpr_ros.evaluation.evaluate``: an in-memory map of the val database, matched by the
``Relocalizer`` with MNN re-ranking of the top ``val_rerank_topk``, 100 by default).
As in the official code, the best checkpoint is the one with the highest re-ranked R@5
(``select_recall``) and training stops after ``patience`` epochs without improvement.
``<out>/best`` keeps the best model and ``<out>/last`` the latest one with the optimizer
state and ``train_state.json``, from which training resumes. Both are ``save_model``
directories, so ``load_model(<out>/best)`` (and build_map/relocalize/evaluate
``--model <out>/best``) use the trained model.

Importing this module does not import torch (``TrainConf`` builds the train command's
flags); the functions do.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from vpr_ros import logger
from vpr_ros.config import Conf, option
from vpr_ros.errors import ConfigError, ModelError
from vpr_ros.imagefolders import load_image
from vpr_ros.learning.data import VprSplit, load_batch, load_splits
from vpr_ros.learning.finetune import (
    make_optimizer,
    optimization_step,
    set_train_mode,
    trainable_parameters,
)

if TYPE_CHECKING:
    import torch

    from vpr_ros.models.base import VprModel

LAST_DIR = 'last'
BEST_DIR = 'best'
STATE_FILE = 'train_state.json'
OPTIMIZER_FILE = 'optimizer.safetensors'


# --------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class TrainConf(Conf):
    """Training settings (SelaVPR's defaults where the paper gives them).

    ``queries_per_epoch`` queries are trained per epoch, in rounds of ``cache_refresh_rate``
    queries, each round re-mining its triplets with the current model.
    """

    epochs: int = option(20, 'Training epochs (each ends with a validation)', min=1)
    batch_size: int = option(
        4, 'Queries per optimisation step (each with its positive and negatives)', min=1
    )
    negs_per_query: int = option(2, 'Hard negatives per query', min=1)
    lr: float = option(1e-5, 'Adam learning rate', min=0.0, min_exclusive=True)
    margin: float = option(0.1, 'Global triplet margin', min=0.0)
    local_weight: float = option(1.0, 'Weight (lambda) of the MNN local loss', min=0.0)
    local_margin: float = option(0.0, 'Margin of the MNN local hinge (0 in the paper)', min=0.0)
    pos_dist_m: float = option(
        10.0, 'Training positives lie within this distance', unit='m', min=0.0
    )
    neg_dist_m: float = option(25.0, 'Negatives lie beyond this distance', unit='m', min=0.0)
    val_pos_dist_m: float = option(
        25.0, 'A validation retrieval within this distance is correct', unit='m', min=0.0
    )
    queries_per_epoch: int = option(5000, 'Training queries per epoch', min=1)
    cache_refresh_rate: int = option(
        1000, 'Queries per mining round (triplets are re-mined with the current model)', min=1
    )
    neg_samples: int = option(
        1000, 'Database images sampled per mining round (partial mining)', min=1
    )
    recall_values: list[int] = option([1, 5, 10, 20], 'The N of validation Recall@N', min=1)
    select_recall: int = option(
        5,
        'The best checkpoint is the one with the highest validation R@N for this N (after '
        're-ranking, see val_rerank_topk)',
        min=1,
    )
    patience: int = option(3, 'Stop after this many epochs without improvement', min=1)
    val_rerank_topk: int = option(
        100,
        'Validate after MNN re-ranking of this many retrieved candidates, as SelaVPR '
        'selects its checkpoint (0: global retrieval only)',
        min=0,
    )
    horizontal_flip: bool = option(False, 'Flip training batches horizontally at random')
    eval_batch_size: int = option(8, 'Images per forward pass when mining and validating', min=1)
    seed: int = option(0, 'Seed of the query and database samples and of torch')
    progress: bool = option(True, 'Show progress bars')

    def validate(self) -> None:
        if self.select_recall not in self.recall_values:
            msg = (
                f'select_recall {self.select_recall!r} is not among recall_values '
                f'{list(self.recall_values)!r}; add it or pick one of them'
            )
            raise ConfigError(msg)
        if self.neg_dist_m < self.pos_dist_m:
            msg = (
                f'neg_dist_m {self.neg_dist_m!r} is below pos_dist_m {self.pos_dist_m!r}: '
                'negatives must lie farther away than positives'
            )
            raise ConfigError(msg)


@dataclass
class TrainResult:
    """What ``train`` produced: directories, the best validation recall and the history."""

    best_dir: Path
    last_dir: Path
    best_recalls: dict[str, float]
    best_epoch: int
    epochs_run: int
    history: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------------------
# Descriptors, mining, validation


def describe_images(
    model: VprModel,
    paths: Sequence[Path],
    *,
    batch_size: int = 8,
    desc: str = 'describe',
    progress: bool = True,
) -> np.ndarray:
    """Global descriptors (N, D) float32 of image files, by ``extraction.TorchExtractor``; the
    model's training mode is restored afterwards."""
    from vpr_ros.extraction import TorchExtractor

    was_training = model.training
    extractor = TorchExtractor(model, batch_size=batch_size)
    out = np.zeros((len(paths), model.global_dim), np.float32)
    start = 0
    with tqdm(total=len(paths), desc=desc, leave=False, disable=not progress) as bar:
        for batch in extractor.extract_stream(load_image(p) for p in paths):
            out[start : start + len(batch)] = batch.global_descriptors
            start += len(batch)
            bar.update(len(batch))
    model.train(was_training)
    return out


class TripletMiner:
    """Partial hard-negative mining with a per-query negative cache (SelaVPR/NetVLAD style).

    Args:
        split: the training split.
        conf: training settings (distances, negatives per query, database sample size).
        rng: random generator for the query and database samples.
    """

    def __init__(self, split: VprSplit, conf: TrainConf, rng: np.random.Generator) -> None:
        self.split = split
        self.conf = conf
        self.rng = rng
        self.positives = split.positives(conf.pos_dist_m)
        self.not_negatives = split.positives(conf.neg_dist_m)
        self.trainable_queries = np.array(
            [i for i, pos in enumerate(self.positives) if len(pos)], np.int64
        )
        if len(self.trainable_queries) == 0:
            msg = (
                f'no training query of {split!r} has a database image within '
                f'{conf.pos_dist_m} m; check the UTM coordinates in the file names'
            )
            raise ConfigError(msg)
        self.neg_cache: dict[int, np.ndarray] = {}

    def sample_queries(self, count: int) -> np.ndarray:
        pool = self.trainable_queries
        return self.rng.choice(pool, size=min(count, len(pool)), replace=False)

    def mine(self, model: VprModel, queries: np.ndarray) -> list[tuple[int, int, list[int]]]:
        """Triplets ``(query, best positive, hard negatives)`` for ``queries`` (indices)."""
        conf = self.conf
        n_db = len(self.split.database)
        sample = self.rng.choice(n_db, size=min(conf.neg_samples, n_db), replace=False)
        candidates = {}
        needed: set[int] = set()
        for q in queries:
            cand = np.union1d(sample, self.neg_cache.get(int(q), np.zeros(0, np.int64)))
            cand = np.setdiff1d(cand, self.not_negatives[q], assume_unique=True)
            candidates[int(q)] = cand
            needed.update(cand.tolist())
            needed.update(self.positives[q].tolist())
        db_index = np.array(sorted(needed), np.int64)
        db_paths = [self.split.database.paths[i] for i in db_index]
        q_paths = [self.split.queries.paths[i] for i in queries]
        db_desc = describe_images(
            model,
            db_paths,
            batch_size=conf.eval_batch_size,
            desc='mining: database',
            progress=conf.progress,
        )
        q_desc = describe_images(
            model,
            q_paths,
            batch_size=conf.eval_batch_size,
            desc='mining: queries',
            progress=conf.progress,
        )
        row = {int(i): r for r, i in enumerate(db_index)}
        triplets = []
        for qd, q in zip(q_desc, queries):
            pos = self.positives[q]
            best_pos = int(pos[np.argmax(db_desc[[row[int(i)] for i in pos]] @ qd)])
            cand = candidates[int(q)]
            if len(cand) == 0:
                continue
            sims = db_desc[[row[int(i)] for i in cand]] @ qd
            hard = cand[np.argsort(-sims)[: conf.negs_per_query]]
            self.neg_cache[int(q)] = hard
            if len(hard) < conf.negs_per_query:
                hard = self.rng.choice(hard, size=conf.negs_per_query, replace=True)
            triplets.append((int(q), best_pos, [int(n) for n in hard]))
        return triplets


def recall_percent(recalls: Mapping[int, float | None]) -> dict[str, float]:
    """Recall@N fractions as training logs and checkpoints them: {'R@N': %} (NaN: unknown)."""
    return {f'R@{n}': math.nan if r is None else 100.0 * r for n, r in recalls.items()}


def validate(model: VprModel, split: VprSplit, conf: TrainConf) -> dict[str, float]:
    """Recall@N on ``split`` by the shipped pipeline (``evaluation.evaluate``).

    The database images become an in-memory map and each query is matched by the
    ``Relocalizer``: retrieval of the top ``max(recall_values, val_rerank_topk)`` places,
    then, if ``val_rerank_topk`` is above 0, MNN re-ranking of that many. A query is
    correct at N when one of its first N places lies within ``val_pos_dist_m``; queries
    with no database image that near are left out (as in ``evaluate``).

    Raises:
        ConfigError: no query has a database image within ``val_pos_dist_m``.
    """
    from vpr_ros.evaluation import RERANKED, RETRIEVAL, evaluate

    rerank_k = conf.val_rerank_topk
    relocalization = {'top_k': max(*conf.recall_values, rerank_k), 'rerank_k': rerank_k}
    result = evaluate(
        model,
        split.database.paths,
        split.queries.paths,
        split.positives(conf.val_pos_dist_m),
        relocalization,
        reference_positions=split.database.utm,
        ns=conf.recall_values,
        batch_size=conf.eval_batch_size,
        progress=conf.progress,
    )
    method = result.methods[RERANKED if RERANKED in result.methods else RETRIEVAL]
    return recall_percent(method.recalls)


# --------------------------------------------------------------------------------------
# Optimisation and checkpoints


def train_step(
    model: VprModel,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    conf: TrainConf,
) -> dict[str, float]:
    """One optimisation step on a batch laid out as ``[q, p, n1..nk] * B``.

    Returns:
        The losses (``loss``, ``global``, ``local``) before the step.
    """
    from vpr_ros.learning.losses import triplet_losses

    set_train_mode(model)

    def losses_of_batch() -> dict[str, torch.Tensor]:
        return triplet_losses(
            model(images),
            conf.negs_per_query,
            margin=conf.margin,
            local_weight=conf.local_weight,
            local_margin=conf.local_margin,
        )

    return optimization_step(model, optimizer, losses_of_batch)


def save_optimizer(
    optimizer: torch.optim.Optimizer, names: Sequence[str], out_dir: Path
) -> dict[str, Any]:
    """Write the optimizer's tensors to ``optimizer.safetensors`` keyed by parameter name;
    return the rest (param groups, scalars) for the JSON state."""
    import torch
    from safetensors.torch import save_file

    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state['state'].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f'{names[index]}/{key}'] = value.detach().contiguous()
            else:
                scalars[f'{names[index]}/{key}'] = value
    save_file(tensors, str(out_dir / OPTIMIZER_FILE))
    return {'param_groups': state['param_groups'], 'scalars': scalars}


def load_optimizer(
    optimizer: torch.optim.Optimizer, names: Sequence[str], in_dir: Path, meta: dict[str, Any]
) -> None:
    """Restore what ``save_optimizer`` wrote."""
    from safetensors.torch import load_file

    tensors = load_file(str(in_dir / OPTIMIZER_FILE))
    entries: dict[int, dict[str, Any]] = {}
    position = {name: i for i, name in enumerate(names)}
    for key, value in [*tensors.items(), *meta['scalars'].items()]:
        name, _, slot = key.rpartition('/')
        if name not in position:
            msg = f'optimizer state in {str(in_dir)!r} is for another model ({name!r})'
            raise ModelError(msg)
        entries.setdefault(position[name], {})[slot] = value
    optimizer.load_state_dict({'state': entries, 'param_groups': meta['param_groups']})


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix('.tmp')
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _resume(
    model: VprModel,
    optimizer: torch.optim.Optimizer,
    names: Sequence[str],
    last_dir: Path,
) -> dict[str, Any]:
    """Load the trainable weights and optimizer of ``last_dir``; return the saved state."""
    from safetensors.torch import load_file

    from vpr_ros.models.base import conf_hash

    try:
        state: dict[str, Any] = json.loads((last_dir / STATE_FILE).read_text())
        saved_conf = json.loads((last_dir / 'model.json').read_text())
    except (OSError, json.JSONDecodeError) as err:
        msg = f'cannot resume from {str(last_dir)!r}: {err}; start without --resume'
        raise ConfigError(msg) from err
    skip = {'name', *model.weight_source_keys}
    saved_arch = {k: v for k, v in saved_conf.items() if k not in skip}
    if conf_hash(saved_arch) != conf_hash(model.architecture_conf()):
        msg = (
            f'cannot resume from {str(last_dir)!r}: it was trained with another model '
            f'configuration than {model.name!r}; pass the same --model or a new --out'
        )
        raise ConfigError(msg)
    weights = load_file(str(last_dir / 'model.safetensors'))
    missing = sorted(set(names) - set(weights))
    if missing:
        raise ModelError(f'{str(last_dir)!r} lacks trained tensors {missing[:3]}')
    model.load_state_dict(weights, strict=False)
    model.invalidate_identity()
    load_optimizer(optimizer, names, last_dir, state['optimizer'])
    return state


def train(
    model: VprModel,
    dataset: str | os.PathLike[str] | tuple[VprSplit, VprSplit],
    out_dir: str | os.PathLike[str],
    conf: TrainConf | None = None,
    *,
    resume: bool = False,
) -> TrainResult:
    """Train ``model`` on ``<dataset>/train``, validating on ``<dataset>/val`` each epoch.

    Args:
        model: the model; its parameters with ``requires_grad`` train.
        dataset: a VPR-format dataset folder with ``train/`` and ``val/`` splits, or the
            two splits (``learning.data.load_splits``).
        out_dir: where ``best/`` and ``last/`` are written.
        conf: training settings.
        resume: continue from ``<out_dir>/last`` (weights, optimizer, epoch, best recall).

    Returns:
        The best and last model directories, the best recalls and the per-epoch history.
    """
    import torch

    from vpr_ros.models import save_model

    conf = conf or TrainConf()
    out_dir = Path(out_dir)
    if isinstance(dataset, tuple):
        train_split, val_split = dataset
    else:
        train_split, val_split = load_splits(dataset)
    logger.info('train set %r, val set %r', train_split, val_split)
    rng = np.random.default_rng(conf.seed)
    torch.manual_seed(conf.seed)
    named = trainable_parameters(model)
    names = [n for n, _ in named]
    optimizer = make_optimizer(model, conf.lr)
    n_train = sum(p.numel() for _, p in named)
    n_all = sum(p.numel() for p in model.parameters())
    logger.info('model %r: %d of %d parameters train', model.name, n_train, n_all)

    last_dir, best_dir = out_dir / LAST_DIR, out_dir / BEST_DIR
    start_epoch, best_score, best_epoch, not_improved = 0, -1.0, -1, 0
    best_recalls: dict[str, float] = {}
    history: list[dict[str, Any]] = []
    miner = TripletMiner(train_split, conf, rng)
    if resume:
        state = _resume(model, optimizer, names, last_dir)
        start_epoch = int(state['epoch'])
        best_score, best_epoch = float(state['best_score']), int(state['best_epoch'])
        best_recalls = state['best_recalls']
        not_improved, history = int(state['not_improved']), state['history']
        rng.bit_generator.state = state['rng']
        miner.neg_cache = {int(k): np.array(v, np.int64) for k, v in state['neg_cache'].items()}
        logger.info(
            'resuming after epoch %d (best R@%d %.1f)',
            start_epoch,
            conf.select_recall,
            best_score,
        )
    if start_epoch >= conf.epochs:
        logger.info('already trained for %d epochs; nothing to do', start_epoch)
    select = f'R@{conf.select_recall}'
    for epoch in range(start_epoch, conf.epochs):
        if not_improved >= conf.patience:
            logger.info('no improvement for %d epochs: stopping', not_improved)
            break
        started = time.monotonic()
        losses = _train_epoch(model, optimizer, miner, train_split, conf, rng, epoch)
        recalls = validate(model, val_split, conf)
        entry: dict[str, Any] = {
            'epoch': epoch + 1,
            'seconds': round(time.monotonic() - started, 1),
        }
        entry.update(losses)
        entry.update(recalls)
        history.append(entry)
        text = ', '.join(f'{k}: {v:.1f}' for k, v in recalls.items())
        logger.info('epoch %d: loss %.4f; val %s', epoch + 1, losses['loss'], text)
        if recalls[select] > best_score:
            best_score, best_epoch, best_recalls = recalls[select], epoch + 1, recalls
            not_improved = 0
            save_model(model, best_dir)
            logger.info('new best %s = %.1f: saved %s', select, best_score, best_dir)
        else:
            not_improved += 1
        save_model(model, last_dir)
        state = {
            'epoch': epoch + 1,
            'best_score': best_score,
            'best_epoch': best_epoch,
            'best_recalls': best_recalls,
            'not_improved': not_improved,
            'history': history,
            'config': conf.to_dict(),
            'rng': rng.bit_generator.state,
            'neg_cache': {str(k): v.tolist() for k, v in miner.neg_cache.items()},
            'optimizer': save_optimizer(optimizer, names, last_dir),
        }
        _write_json(last_dir / STATE_FILE, state)
    epochs_run = history[-1]['epoch'] if history else start_epoch
    logger.info('best %s = %.1f at epoch %d (%s)', select, best_score, best_epoch, best_dir)
    return TrainResult(best_dir, last_dir, best_recalls, best_epoch, epochs_run, history)


def _train_epoch(
    model: VprModel,
    optimizer: torch.optim.Optimizer,
    miner: TripletMiner,
    split: VprSplit,
    conf: TrainConf,
    rng: np.random.Generator,
    epoch: int,
) -> dict[str, float]:
    totals = {'loss': 0.0, 'global': 0.0, 'local': 0.0}
    steps = 0
    rounds = math.ceil(conf.queries_per_epoch / conf.cache_refresh_rate)
    for round_ in range(rounds):
        queries = miner.sample_queries(conf.cache_refresh_rate)
        triplets = miner.mine(model, queries)
        rng.shuffle(triplets)
        batches = range(0, len(triplets), conf.batch_size)
        bar = tqdm(
            batches,
            desc=f'epoch {epoch + 1} ({round_ + 1}/{rounds})',
            leave=False,
            disable=not conf.progress,
        )
        for start in bar:
            paths = []
            for q, p, negs in triplets[start : start + conf.batch_size]:
                paths.append(split.queries.paths[q])
                paths.append(split.database.paths[p])
                paths.extend(split.database.paths[n] for n in negs)
            images = load_batch(model, paths)
            if conf.horizontal_flip and rng.random() < 0.5:
                images = images.flip(-1)
            losses = train_step(model, optimizer, images, conf)
            for key in totals:
                totals[key] += losses[key]
            steps += 1
            bar.set_postfix(loss=f'{losses["loss"]:.4f}')
    return {key: value / max(1, steps) for key, value in totals.items()}


__all__ = [
    'TrainConf',
    'TrainResult',
    'TripletMiner',
    'describe_images',
    'load_optimizer',
    'recall_percent',
    'save_optimizer',
    'train',
    'train_step',
    'validate',
]
