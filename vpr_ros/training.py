"""Training place-recognition models (SelaVPR) on place-labelled images.

Data: the common VPR folder format (gmberton/VPR-datasets-downloader, also used by SelaVPR
and CosPlace): ``<dataset>/{train,val}/{database,queries}/`` holding images whose file
names carry UTM coordinates in metres, ``@<east>@<north>@...@.jpg``.

Training follows SelaVPR: for each query, its best positive (the most similar database
image within ``pos_dist_m``) and hard negatives (the most similar database images beyond
``neg_dist_m``, among a random subset of the database plus the query's previous hard
negatives: "partial" mining) from a cache that is re-mined every ``cache_refresh_rate``
queries with the current model. The loss is a triplet margin loss on the global
descriptors plus ``local_weight`` times the MNN local loss: a hinge between the mean
similarity of the mutual-nearest-neighbour matches of the (query, negative) local feature
maps and that of the (query, positive) maps. Only parameters with ``requires_grad`` train
(SelaVPR: adapters, local head, GeM's p), with Adam.

Each epoch ends with a validation Recall@N; ``<out>/best`` keeps the best model and
``<out>/last`` the latest one with the optimizer state and ``train_state.json``, from
which training resumes. Both are ``save_model`` directories, so ``load_model(<out>/best)``
(and build_map/relocalize/evaluate ``--model <out>/best``) use the trained model.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import cv2
import faiss
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from scipy.spatial import cKDTree
from tqdm import tqdm

from vpr_ros import logger
from vpr_ros.errors import ConfigError, ModelError
from vpr_ros.imagefolders import list_images, parse_utm
from vpr_ros.metrics import recall_at_n
from vpr_ros.models import save_model
from vpr_ros.models.base import VprModel, conf_hash
from vpr_ros.rerank import mnn_scores, mutual_nn_mask

LAST_DIR = 'last'
BEST_DIR = 'best'
STATE_FILE = 'train_state.json'
OPTIMIZER_FILE = 'optimizer.safetensors'


# --------------------------------------------------------------------------------------
# Data


@dataclass
class PlaceImages:
    """Images with their UTM positions: ``paths`` and ``utm`` (N, 2) metres."""

    paths: list[Path]
    utm: np.ndarray

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> PlaceImages:
        """All images under ``folder`` (recursively), in ``list_images`` order.

        Raises:
            FileNotFoundError: ``folder`` is not a directory.
            ConfigError: no images, or a name without ``@east@north@`` (``parse_utm``).
        """
        paths = list_images(folder)
        utm = np.array([parse_utm(p) for p in paths], np.float64).reshape(-1, 2)
        return cls(paths, utm)

    def __len__(self) -> int:
        return len(self.paths)


class VprSplit:
    """One split of a VPR-format dataset: ``database`` and ``queries`` image sets.

    Args:
        folder: the split folder, holding ``database/`` and ``queries/``.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.name = f'{self.folder.parent.name}/{self.folder.name}'
        self.database = PlaceImages.from_folder(self.folder / 'database')
        self.queries = PlaceImages.from_folder(self.folder / 'queries')
        self._tree = cKDTree(self.database.utm)

    def __repr__(self) -> str:
        return f'< {self.name} - #q: {len(self.queries)}; #db: {len(self.database)} >'

    def positives(self, radius_m: float) -> list[np.ndarray]:
        """For each query, the database indices within ``radius_m`` metres (sorted)."""
        found = self._tree.query_ball_point(self.queries.utm, r=radius_m)
        return [np.array(sorted(f), np.int64) for f in found]


def load_rgb(path: Path) -> np.ndarray:
    """An image file as RGB uint8 (H, W, 3)."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ConfigError(f'cannot read image {str(path)!r}; is it a valid jpg/png?')
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def load_batch(model: VprModel, paths: Sequence[Path]) -> torch.Tensor:
    """Images at ``paths`` as the model's normalised input batch (B, 3, H, W)."""
    return model.preprocessing([load_rgb(p) for p in paths])


# --------------------------------------------------------------------------------------
# Losses


def mnn_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean similarity of the mutual-nearest-neighbour matches between local feature sets.

    Differentiable through the similarities (the matching itself is not). The matching is
    the one of ``vpr_ros.rerank.mutual_nn_matches``.

    Args:
        a: (B, L1, C) L2-normalised local features.
        b: (B, L2, C) L2-normalised local features.

    Returns:
        (B,) mean cosine similarity over the MNN matches of each pair (0 without matches).
    """
    sim = a @ b.transpose(1, 2)  # (B, L1, L2)
    mutual, nn12 = mutual_nn_mask(sim.detach())
    best = torch.gather(sim, 2, nn12.unsqueeze(-1)).squeeze(-1)  # (B, L1)
    count = mutual.sum(dim=1).clamp(min=1)
    return (best * mutual).sum(dim=1) / count


def mnn_local_loss(
    query: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float = 0.0
) -> torch.Tensor:
    """SelaVPR's local loss: mean of ``max(0, s(q, n) - s(q, p) + margin)``.

    Args:
        query, positive, negative: (B, L, C) local features of matching triplets.
        margin: hinge margin (0 in the paper).
    """
    sim_pos = mnn_similarity(query, positive)
    sim_neg = mnn_similarity(query, negative)
    return torch.clamp(sim_neg - sim_pos + margin, min=0.0).mean()


def _as_local_sets(local: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N, h * w, C)."""
    return local.flatten(2).transpose(1, 2)


def triplet_losses(
    out: dict[str, torch.Tensor],
    negs_per_query: int,
    *,
    margin: float,
    local_weight: float,
    local_margin: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Global triplet + MNN local losses of a batch laid out as ``[q, p, n1..nk] * B``.

    Returns:
        ``{'loss', 'global', 'local'}``: the total and its two parts, each a mean over the
        B * k triplets.
    """
    group = 2 + negs_per_query
    glob = out['global_descriptor'].reshape(-1, group, out['global_descriptor'].shape[-1])
    local = _as_local_sets(out['local_features'])
    local = local.reshape(-1, group, *local.shape[1:])
    k = negs_per_query
    q = glob[:, :1].expand(-1, k, -1).reshape(-1, glob.shape[-1])
    p = glob[:, 1:2].expand(-1, k, -1).reshape(-1, glob.shape[-1])
    n = glob[:, 2:].reshape(-1, glob.shape[-1])
    global_loss = F.triplet_margin_loss(q, p, n, margin=margin, p=2)
    lq = local[:, :1].expand(-1, k, -1, -1).reshape(-1, *local.shape[2:])
    lp = local[:, 1:2].expand(-1, k, -1, -1).reshape(-1, *local.shape[2:])
    ln = local[:, 2:].reshape(-1, *local.shape[2:])
    local_loss = mnn_local_loss(lq, lp, ln, local_margin)
    return {
        'loss': global_loss + local_weight * local_loss,
        'global': global_loss,
        'local': local_loss,
    }


# --------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    """Training settings (SelaVPR's defaults where the paper gives them).

    Distances are metres; ``queries_per_epoch`` queries are trained per epoch, in loops of
    ``cache_refresh_rate`` queries, each loop re-mining its triplets with the current model.
    """

    epochs: int = 20
    batch_size: int = 4
    negs_per_query: int = 2
    lr: float = 1e-5
    margin: float = 0.1
    local_weight: float = 1.0
    local_margin: float = 0.0
    pos_dist_m: float = 10.0
    neg_dist_m: float = 25.0
    val_pos_dist_m: float = 25.0
    queries_per_epoch: int = 5000
    cache_refresh_rate: int = 1000
    neg_samples: int = 1000
    recall_values: tuple[int, ...] = (1, 5, 10, 20)
    select_recall: int = 5
    patience: int = 3
    val_rerank_topk: int = 0
    horizontal_flip: bool = False
    eval_batch_size: int = 8
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        self.recall_values = tuple(int(n) for n in self.recall_values)
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
        for name in ('epochs', 'batch_size', 'negs_per_query', 'cache_refresh_rate'):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f'{name} must be at least 1, got {getattr(self, name)!r}')

    def to_dict(self) -> dict:
        data = asdict(self)
        data['recall_values'] = list(self.recall_values)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class TrainResult:
    """What ``train`` produced: directories, the best validation recall and the history."""

    best_dir: Path
    last_dir: Path
    best_recalls: dict[str, float]
    best_epoch: int
    epochs_run: int
    history: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------------------
# Descriptors, mining, validation


@torch.inference_mode()
def extract(
    model: VprModel,
    paths: Sequence[Path],
    *,
    batch_size: int = 8,
    local: bool = False,
    desc: str = 'extract',
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Global descriptors (N, D) float32 and, if ``local``, local features (N, L, C) float16."""
    was_training = model.training
    model.eval()
    globals_, locals_ = [], []
    starts = range(0, len(paths), batch_size)
    for start in tqdm(starts, desc=desc, leave=False, disable=not progress):
        out = model(load_batch(model, paths[start : start + batch_size]))
        globals_.append(out['global_descriptor'].float().numpy())
        if local:
            locals_.append(_as_local_sets(out['local_features']).half().numpy())
    model.train(was_training)
    glob = np.concatenate(globals_) if globals_ else np.zeros((0, model.global_dim), np.float32)
    return glob, (np.concatenate(locals_) if local else None)


class TripletMiner:
    """Partial hard-negative mining with a per-query negative cache (SelaVPR/NetVLAD style).

    Args:
        split: the training split.
        config: training settings (distances, negatives per query, database sample size).
        rng: random generator for the query and database samples.
    """

    def __init__(self, split: VprSplit, config: TrainConfig, rng: np.random.Generator) -> None:
        self.split = split
        self.config = config
        self.rng = rng
        self.positives = split.positives(config.pos_dist_m)
        self.not_negatives = split.positives(config.neg_dist_m)
        self.trainable_queries = np.array(
            [i for i, pos in enumerate(self.positives) if len(pos)], np.int64
        )
        if len(self.trainable_queries) == 0:
            msg = (
                f'no training query of {split!r} has a database image within '
                f'{config.pos_dist_m} m; check the UTM coordinates in the file names'
            )
            raise ConfigError(msg)
        self.neg_cache: dict[int, np.ndarray] = {}

    def sample_queries(self, count: int) -> np.ndarray:
        pool = self.trainable_queries
        return self.rng.choice(pool, size=min(count, len(pool)), replace=False)

    def mine(self, model: VprModel, queries: np.ndarray) -> list[tuple[int, int, list[int]]]:
        """Triplets ``(query, best positive, hard negatives)`` for ``queries`` (indices)."""
        cfg = self.config
        n_db = len(self.split.database)
        sample = self.rng.choice(n_db, size=min(cfg.neg_samples, n_db), replace=False)
        candidates = {}
        needed = set()
        for q in queries:
            cand = np.union1d(sample, self.neg_cache.get(int(q), np.zeros(0, np.int64)))
            cand = np.setdiff1d(cand, self.not_negatives[q], assume_unique=True)
            candidates[int(q)] = cand
            needed.update(cand.tolist())
            needed.update(self.positives[q].tolist())
        db_index = np.array(sorted(needed), np.int64)
        db_paths = [self.split.database.paths[i] for i in db_index]
        q_paths = [self.split.queries.paths[i] for i in queries]
        kwargs = {'batch_size': cfg.eval_batch_size, 'progress': cfg.progress}
        db_desc, _ = extract(model, db_paths, desc='mining: database', **kwargs)
        q_desc, _ = extract(model, q_paths, desc='mining: queries', **kwargs)
        row = {int(i): r for r, i in enumerate(db_index)}
        triplets = []
        for qd, q in zip(q_desc, queries):
            pos = self.positives[q]
            best_pos = int(pos[np.argmax(db_desc[[row[int(i)] for i in pos]] @ qd)])
            cand = candidates[int(q)]
            if len(cand) == 0:
                continue
            sims = db_desc[[row[int(i)] for i in cand]] @ qd
            hard = cand[np.argsort(-sims)[: cfg.negs_per_query]]
            self.neg_cache[int(q)] = hard
            if len(hard) < cfg.negs_per_query:
                hard = self.rng.choice(hard, size=cfg.negs_per_query, replace=True)
            triplets.append((int(q), best_pos, [int(n) for n in hard]))
        return triplets


def recall_percent(recalls: dict[int, float]) -> dict[str, float]:
    """``evaluation.recall_at_n`` output as training logs and checkpoints it: {'R@N': %}."""
    return {f'R@{n}': 100.0 * r for n, r in recalls.items()}


def validate(model: VprModel, split: VprSplit, config: TrainConfig) -> dict[str, float]:
    """Recall@N on ``split`` (global retrieval, then MNN re-ranking of the top
    ``val_rerank_topk`` candidates if that is above 0)."""
    rerank_k = int(config.val_rerank_topk)
    kwargs = {'batch_size': config.eval_batch_size, 'progress': config.progress}
    db_g, db_l = extract(
        model, split.database.paths, local=rerank_k > 0, desc='val: database', **kwargs
    )
    q_g, q_l = extract(
        model, split.queries.paths, local=rerank_k > 0, desc='val: queries', **kwargs
    )
    k = min(len(db_g), max(max(config.recall_values), rerank_k))
    index = faiss.IndexFlatIP(db_g.shape[1])
    index.add(np.ascontiguousarray(db_g, np.float32))
    scores, pred = index.search(np.ascontiguousarray(q_g, np.float32), k)
    positives = split.positives(config.val_pos_dist_m)
    if rerank_k > 0:
        for i in range(len(pred)):
            top = pred[i, :rerank_k]
            mnn = mnn_scores(q_l[i], db_l[top])
            order = np.lexsort((-scores[i, :rerank_k], -mnn))
            pred[i, :rerank_k] = top[order]
    return recall_percent(recall_at_n(pred, positives, config.recall_values))


# --------------------------------------------------------------------------------------
# Optimisation and checkpoints


def trainable_named_parameters(model: VprModel) -> list[tuple[str, torch.nn.Parameter]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ModelError(f'model {model.name!r} has no trainable parameters')
    return named


def make_optimizer(model: VprModel, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam over the trainable parameters only."""
    return torch.optim.Adam([p for _, p in trainable_named_parameters(model)], lr=config.lr)


def train_step(
    model: VprModel,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    config: TrainConfig,
) -> dict[str, float]:
    """One optimisation step on a batch laid out as ``[q, p, n1..nk] * B``.

    Returns:
        The losses (``loss``, ``global``, ``local``) before the step.
    """
    model.train()
    out = model(images)
    losses = triplet_losses(
        out,
        config.negs_per_query,
        margin=config.margin,
        local_weight=config.local_weight,
        local_margin=config.local_margin,
    )
    optimizer.zero_grad(set_to_none=True)
    losses['loss'].backward()
    optimizer.step()
    model.invalidate_identity()
    return {k: float(v.detach()) for k, v in losses.items()}


def save_optimizer(optimizer: torch.optim.Optimizer, names: Sequence[str], out_dir: Path) -> dict:
    """Write the optimizer's tensors to ``optimizer.safetensors`` keyed by parameter name;
    return the rest (param groups, scalars) for the JSON state."""
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
    optimizer: torch.optim.Optimizer, names: Sequence[str], in_dir: Path, meta: dict
) -> None:
    """Restore what ``save_optimizer`` wrote."""
    tensors = load_file(str(in_dir / OPTIMIZER_FILE))
    entries: dict[int, dict] = {}
    position = {name: i for i, name in enumerate(names)}
    for key, value in [*tensors.items(), *meta['scalars'].items()]:
        name, _, slot = key.rpartition('/')
        if name not in position:
            msg = f'optimizer state in {str(in_dir)!r} is for another model ({name!r})'
            raise ModelError(msg)
        entries.setdefault(position[name], {})[slot] = value
    optimizer.load_state_dict({'state': entries, 'param_groups': meta['param_groups']})


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix('.tmp')
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _resume(
    model: VprModel,
    optimizer: torch.optim.Optimizer,
    names: Sequence[str],
    last_dir: Path,
) -> dict:
    """Load the trainable weights and optimizer of ``last_dir``; return the saved state."""
    try:
        state = json.loads((last_dir / STATE_FILE).read_text())
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
    dataset: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    *,
    resume: bool = False,
) -> TrainResult:
    """Train ``model`` on ``<dataset>/train``, validating on ``<dataset>/val`` each epoch.

    Args:
        model: the model; its parameters with ``requires_grad`` train.
        dataset: a VPR-format dataset folder with ``train/`` and ``val/`` splits.
        out_dir: where ``best/`` and ``last/`` are written.
        config: training settings.
        resume: continue from ``<out_dir>/last`` (weights, optimizer, epoch, best recall).

    Returns:
        The best and last model directories, the best recalls and the per-epoch history.
    """
    config = config or TrainConfig()
    out_dir = Path(out_dir)
    dataset = Path(dataset)
    train_split = VprSplit(dataset / 'train')
    val_split = VprSplit(dataset / 'val')
    logger.info('train set %r, val set %r', train_split, val_split)
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    named = trainable_named_parameters(model)
    names = [n for n, _ in named]
    optimizer = make_optimizer(model, config)
    n_train = sum(p.numel() for _, p in named)
    n_all = sum(p.numel() for p in model.parameters())
    logger.info('model %r: %d of %d parameters train', model.name, n_train, n_all)

    last_dir, best_dir = out_dir / LAST_DIR, out_dir / BEST_DIR
    start_epoch, best_score, best_epoch, not_improved = 0, -1.0, -1, 0
    best_recalls: dict[str, float] = {}
    history: list[dict] = []
    miner = TripletMiner(train_split, config, rng)
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
            config.select_recall,
            best_score,
        )
    if start_epoch >= config.epochs:
        logger.info('already trained for %d epochs; nothing to do', start_epoch)
    select = f'R@{config.select_recall}'
    epoch = start_epoch
    for epoch in range(start_epoch, config.epochs):
        if not_improved >= config.patience:
            logger.info('no improvement for %d epochs: stopping', not_improved)
            break
        started = time.monotonic()
        losses = _train_epoch(model, optimizer, miner, train_split, config, rng, epoch)
        recalls = validate(model, val_split, config)
        entry = {'epoch': epoch + 1, 'seconds': round(time.monotonic() - started, 1)}
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
            'config': config.to_dict(),
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
    config: TrainConfig,
    rng: np.random.Generator,
    epoch: int,
) -> dict[str, float]:
    totals = {'loss': 0.0, 'global': 0.0, 'local': 0.0}
    steps = 0
    loops = math.ceil(config.queries_per_epoch / config.cache_refresh_rate)
    for loop in range(loops):
        queries = miner.sample_queries(config.cache_refresh_rate)
        triplets = miner.mine(model, queries)
        rng.shuffle(triplets)
        batches = range(0, len(triplets), config.batch_size)
        bar = tqdm(
            batches,
            desc=f'epoch {epoch + 1} ({loop + 1}/{loops})',
            leave=False,
            disable=not config.progress,
        )
        for start in bar:
            paths = []
            for q, p, negs in triplets[start : start + config.batch_size]:
                paths.append(split.queries.paths[q])
                paths.append(split.database.paths[p])
                paths.extend(split.database.paths[n] for n in negs)
            images = load_batch(model, paths)
            if config.horizontal_flip and rng.random() < 0.5:
                images = images.flip(-1)
            losses = train_step(model, optimizer, images, config)
            for key in totals:
                totals[key] += losses[key]
            steps += 1
            bar.set_postfix(loss=f'{losses["loss"]:.4f}')
    return {key: value / max(1, steps) for key, value in totals.items()}
