"""Structured pruning of CNN place-recognition models (Grainge et al., "Structured Pruning
for Efficient Visual Place Recognition").

Whole channels are removed with torch-pruning's dependency graph, so a filter pruned in
the backbone also goes from every layer that reads it: from the aggregation layer and,
where the descriptor is built from the final feature map (GeM), from the descriptor
itself. The model, the map (D floats per place), extraction and matching all shrink.

- **Schedule**: iterative; the backbone's channel sparsity rises linearly to
  ``sparsity`` over ``steps`` steps (``sparsity_schedule``).
- **Gamma**: the descriptor layers (the aggregation's convolutions / linear layers, or
  for GeM the backbone layer whose channels GeM pools) are pruned at ``gamma`` times the
  backbone's sparsity (``head_sparsity``): gamma 0 keeps D, gamma 1 prunes it like the
  backbone.
- **Importance**: L1 or L2 filter magnitude, or first-order Taylor (|w * dL/dw|, which
  needs a loss, so place-labelled images).
- **Fine-tuning** (optional, between steps): ``Finetuner`` trains on place-labelled
  images (VPR folder format, ``@east@north@`` in file names) with a multi-similarity
  loss, plus a relational distillation term that keeps the pruned model's similarity
  ranking close to the unpruned model's.
- **Export**: each step is a ``PrunedCnnVpr`` that ``models.save_model`` writes as
  ``model.json`` + ``model.safetensors`` and ``models.load_model(path)`` rebuilds.

``footprint``, ``extraction_latency_ms`` and ``matching_latency_ms`` measure what the
pruning buys; ``benchmarks/pruning_report.py`` turns them into the paper's trade-off plots.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import faiss
import numpy as np
import torch
import torch.nn.functional as F
import torch_pruning as tp
from scipy.spatial import cKDTree
from torch import nn

from vpr_ros import logger
from vpr_ros.errors import ConfigError
from vpr_ros.models.aggregation import FeatureMixer, RowProjection
from vpr_ros.models.base import VprModel
from vpr_ros.models.cnn import CnnVpr
from vpr_ros.models.preprocessing import Preprocessing
from vpr_ros.models.pruned import PrunedCnnVpr

IMPORTANCES = ('l1', 'l2', 'taylor')
# No layer loses more than this fraction of its channels, whatever gamma asks for.
MAX_SPARSITY = 0.95
# Modules that act on spatial positions only: channels pass through them unchanged.
PASS_THROUGH = (FeatureMixer, RowProjection)
PRUNABLE = (nn.modules.conv._ConvNd, nn.Linear)
NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
MB = 1e6  # bytes; all sizes here are decimal megabytes


# --------------------------------------------------------------------------------------
# Schedule, gamma, importance


def sparsity_schedule(final_sparsity: float, steps: int) -> list[float]:
    """Target sparsity after each step: rising linearly from ``final / steps`` to ``final``.

    Args:
        final_sparsity: fraction of channels removed after the last step, in [0, 1).
        steps: number of pruning steps, >= 1.

    Returns:
        ``steps`` values, the k-th being ``final_sparsity * k / steps``.
    """
    if not 0.0 <= final_sparsity < 1.0:
        msg = f'sparsity must be in [0, 1), got {final_sparsity!r}; 0.3 removes 30% of channels'
        raise ConfigError(msg)
    if int(steps) < 1:
        raise ConfigError(f'steps must be >= 1, got {steps!r}')
    return [final_sparsity * k / int(steps) for k in range(1, int(steps) + 1)]


def head_sparsity(sparsity: float, gamma: float) -> float:
    """Sparsity of the descriptor layers for a backbone sparsity: ``gamma * sparsity``,
    capped at ``MAX_SPARSITY``."""
    if gamma < 0:
        raise ConfigError(f'gamma must be >= 0, got {gamma!r}; 0 keeps the descriptor size')
    return min(gamma * sparsity, MAX_SPARSITY)


def make_importance(name: str) -> tp.importance.Importance:
    """The torch-pruning channel importance called ``name`` (see ``IMPORTANCES``)."""
    if name == 'l1':
        return tp.importance.MagnitudeImportance(p=1)
    if name == 'l2':
        return tp.importance.MagnitudeImportance(p=2)
    if name == 'taylor':
        return tp.importance.TaylorImportance()
    raise ConfigError(f'unknown importance {name!r}; choose one of {IMPORTANCES}')


@dataclass(frozen=True)
class PruneConf:
    """How to prune.

    Attributes:
        sparsity: final fraction of backbone channels removed, in [0, 1).
        steps: number of pruning steps (sparsity rises linearly).
        gamma: descriptor-layer sparsity relative to the backbone's (>= 0).
        importance: 'l1', 'l2' (filter magnitude) or 'taylor' (first order).
        round_to: keep channel counts multiples of this (None: exact ratios).
        trace_size: (height, width) of the dummy input that traces the graph.
    """

    sparsity: float = 0.3
    steps: int = 3
    gamma: float = 1.0
    importance: str = 'l2'
    round_to: int | None = None
    trace_size: tuple[int, int] = (64, 64)

    def __post_init__(self) -> None:
        sparsity_schedule(self.sparsity, self.steps)
        head_sparsity(self.sparsity, self.gamma)
        if self.importance not in IMPORTANCES:
            msg = f'unknown importance {self.importance!r}; choose one of {IMPORTANCES}'
            raise ConfigError(msg)
        if self.round_to is not None and int(self.round_to) < 1:
            raise ConfigError(f'round_to must be >= 1 or None, got {self.round_to!r}')

    def to_dict(self) -> dict:
        data = asdict(self)
        data['trace_size'] = list(self.trace_size)
        return data


@dataclass
class PruneStep:
    """The model after one pruning step (and its fine-tuning, if any)."""

    index: int
    sparsity: float
    head_sparsity: float
    model: PrunedCnnVpr
    finetune_loss: float | None = None


# --------------------------------------------------------------------------------------
# Which layers are which


class PassThroughPruner(tp.pruner.function.BasePruningFunc):
    """torch-pruning handler for modules that mix spatial positions only (MixVPR's feature
    mixers and row projection): channel pruning passes through them untouched."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        return layer

    prune_in_channels = prune_out_channels  # in and out channels are the same channels

    def get_out_channels(self, layer: nn.Module) -> None:
        return None

    def get_in_channels(self, layer: nn.Module) -> None:
        return None


def _inside_pass_through(model: nn.Module) -> set[int]:
    inside = set()
    for module in model.modules():
        if isinstance(module, PASS_THROUGH):
            inside.update(id(sub) for sub in module.modules())
    return inside


def head_layers(model: CnnVpr) -> list[nn.Module]:
    """The layers whose output channels make the descriptor, pruned at the gamma ratio.

    The aggregation's convolutions and linear layers (Conv-AP, MixVPR's channel
    projection); for an aggregation without such layers (GeM, D = final channels), the
    backbone's last convolution producing the final feature map, which takes with it
    every layer coupled to those channels (e.g. a ResNet stage's residual stream).
    """
    inside = _inside_pass_through(model.aggregation)
    layers = [
        m for m in model.aggregation.modules() if isinstance(m, PRUNABLE) and id(m) not in inside
    ]
    if layers:
        return layers
    final = [
        m
        for m in model.backbone.modules()
        if isinstance(m, nn.modules.conv._ConvNd) and m.out_channels == model._final_dim
    ]
    if not final:
        msg = f'no backbone convolution outputs the {model._final_dim} final channels'
        raise ConfigError(msg)
    return [final[-1]]


def _unwrapped_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters outside convolution, linear and norm layers (GeM's p): never pruned."""
    inside = _inside_pass_through(model)
    params = []
    for module in model.modules():
        if isinstance(module, (*PRUNABLE, *NORMS)) or id(module) in inside:
            continue
        params.extend(module.parameters(recurse=False))
    return params


def channel_counts(model: nn.Module) -> dict[str, int]:
    """Output channels of every convolution and linear layer, by module name."""
    return {
        name: int(m.weight.shape[0])
        for name, m in model.named_modules()
        if isinstance(m, PRUNABLE)
    }


# --------------------------------------------------------------------------------------
# Pruning


def prune_with_recovery(
    model: VprModel,
    conf: PruneConf,
    *,
    calibrator: Callable[[VprModel], None] | None = None,
    train_data: Path | None = None,
    finetune_conf: FinetuneConf | None = None,
) -> Iterator[PruneStep]:
    """``prune`` with the optional recoveries wired in: batch-norm re-estimation, and
    fine-tuning on the place-labelled images in ``train_data`` (which also give Taylor
    importance its gradients). Inputs are checked at the call, as ``prune`` does."""
    finetuner = None
    if train_data is not None:
        finetuner = Finetuner(train_data, model, finetune_conf or FinetuneConf())
    return prune(
        model,
        conf,
        gradients=finetuner.accumulate_gradients if finetuner else None,
        calibrate=calibrator,
        finetune=finetuner if finetuner and finetuner.conf.iterations else None,
    )


def prune(
    model: VprModel,
    conf: PruneConf,
    *,
    gradients: Callable[[VprModel], None] | None = None,
    calibrate: Callable[[VprModel], None] | None = None,
    finetune: Callable[[VprModel, int], float | None] | None = None,
) -> Iterator[PruneStep]:
    """Prune a copy of ``model`` step by step: an iterator of each step's exportable model.

    The inputs are checked here, at the call, before any step runs; the steps run as the
    returned iterator is consumed.

    Args:
        model: a CNN model (``CnnVpr`` or an already pruned one); it is not modified.
        conf: sparsity, steps, gamma, importance.
        gradients: fills ``.grad`` of the working model before each step (needed by
            Taylor importance; e.g. ``Finetuner.accumulate_gradients``).
        calibrate: re-estimates batch-norm statistics after each step (and after its
            fine-tuning), e.g. ``BatchNormCalibrator``: removing a layer's input channels
            shifts its outputs, so the stored statistics no longer fit.
        finetune: trains the working model in place after each step (e.g. a
            ``Finetuner``), returning its mean loss or None.

    Returns:
        An iterator of ``PruneStep`` for steps 1..``conf.steps``; each holds an
        independent ``PrunedCnnVpr`` (rebuilt from the state dict, as ``load_model`` would).

    Raises:
        ConfigError: the model is not a CNN, or Taylor importance has no gradients.
    """
    if not isinstance(model, CnnVpr):
        msg = (
            f'structured pruning supports the CNN models (backbone + GeM/Conv-AP/MixVPR), '
            f'not {type(model).__name__!r} ({model.name!r})'
        )
        raise ConfigError(msg)
    if conf.importance == 'taylor' and gradients is None:
        msg = (
            'Taylor importance needs gradients of a loss: give place-labelled images '
            '(--train-data), or use --importance l1 / l2'
        )
        raise ConfigError(msg)
    return _prune_steps(model, conf, gradients, calibrate, finetune)


def _prune_steps(
    model: CnnVpr,
    conf: PruneConf,
    gradients: Callable[[VprModel], None] | None,
    calibrate: Callable[[VprModel], None] | None,
    finetune: Callable[[VprModel, int], float | None] | None,
) -> Iterator[PruneStep]:
    """The steps of ``prune`` (inputs already checked)."""
    work = copy.deepcopy(model).eval()
    work.invalidate_identity()
    heads = head_layers(work)
    schedule = sparsity_schedule(conf.sparsity, conf.steps)
    with warnings.catch_warnings():  # GeM's p is ignored on purpose (ignored_layers)
        warnings.filterwarnings('ignore', message='Unwrapped parameters detected')
        pruner = _make_pruner(work, conf, heads)
    for index, sparsity in enumerate(schedule, start=1):
        if conf.importance == 'taylor':
            work.zero_grad(set_to_none=True)
            gradients(work)
        pruner.step()
        work.zero_grad(set_to_none=True)
        if calibrate is not None:
            calibrate(work)
        loss = None
        if finetune is not None:
            loss = finetune(work, index)
            if calibrate is not None:
                calibrate(work)
        work.eval()
        record = {
            'source': model.name,
            'source_config': model.export_conf(),
            **conf.to_dict(),
            'step': index,
            'step_sparsity': sparsity,
            'step_head_sparsity': head_sparsity(sparsity, conf.gamma),
            'finetuned': finetune is not None,
            'bn_recalibrated': calibrate is not None,
        }
        yield PruneStep(
            index=index,
            sparsity=sparsity,
            head_sparsity=head_sparsity(sparsity, conf.gamma),
            model=snapshot(work, record),
            finetune_loss=loss,
        )


def _make_pruner(work: CnnVpr, conf: PruneConf, heads: list[nn.Module]) -> tp.pruner.BasePruner:
    """torch-pruning's pruner: backbone at ``conf.sparsity``, ``heads`` at gamma times it."""
    return tp.pruner.BasePruner(
        work,
        torch.zeros(1, 3, *conf.trace_size),
        make_importance(conf.importance),
        pruning_ratio=conf.sparsity,
        pruning_ratio_dict={layer: head_sparsity(conf.sparsity, conf.gamma) for layer in heads},
        iterative_steps=conf.steps,
        iterative_pruning_ratio_scheduler=_with_start,
        ignored_layers=_unwrapped_parameters(work),
        round_to=conf.round_to,
        customized_pruners={cls: PassThroughPruner() for cls in PASS_THROUGH},
        forward_fn=lambda module, images: module(images),
        output_transform=lambda out: [out['global_descriptor'], out['local_features']],
    )


def _with_start(ratio: float, steps: int) -> list[float]:
    """torch-pruning's scheduler form: the sparsity before step 1 (0) and after each step."""
    return [0.0, *(ratio * k / steps for k in range(1, steps + 1))]


def snapshot(work: CnnVpr, record: dict) -> PrunedCnnVpr:
    """An independent ``PrunedCnnVpr`` with ``work``'s current (pruned) weights."""
    source_conf = record['source_config']
    conf = {
        **{k: v for k, v in source_conf.items() if k != 'pruning'},
        'model': 'pruned_cnn',
        'name': f'{record["source"]}-pruned-s{record["step_sparsity"]:.2f}-g{record["gamma"]:g}',
        'pruning': {k: v for k, v in record.items() if k != 'source_config'},
    }
    state = {k: v.detach().clone() for k, v in work.state_dict().items()}
    model = PrunedCnnVpr.from_export(conf, state)
    model.name = conf['name']
    return model.eval()


# --------------------------------------------------------------------------------------
# Recovery: batch-norm recalibration and fine-tuning


class BatchNormCalibrator:
    """Re-estimates batch-norm running statistics from unlabelled images (no gradients).

    Pruning a layer's input channels changes its outputs, so the following batch norm's
    stored mean and variance no longer match; re-estimating them on a few hundred images
    needs no labels or training. All statistics are re-estimated, so the images must
    come from the deployment domain (e.g. the map's own): here, 72 campus images made an
    ImageNet EfficientNet-Lite0 agree less with itself on Nordland than pruning did.

    Args:
        images: RGB uint8 images (any size; resized to the model's input size).
        batch_size: images per forward pass.
    """

    def __init__(self, images: Sequence[np.ndarray], batch_size: int = 16) -> None:
        if not len(images):
            raise ConfigError('batch-norm recalibration needs at least one image')
        self.images = list(images)
        self.batch_size = max(2, int(batch_size))

    @classmethod
    def from_folder(
        cls, folder: str | Path, limit: int = 512, **kwargs: int
    ) -> BatchNormCalibrator:
        """Up to ``limit`` images under ``folder`` (recursively, evenly spaced)."""
        from vpr_ros.imagefolders import list_images, load_image

        paths = list_images(folder)
        picks = np.unique(np.linspace(0, len(paths) - 1, min(limit, len(paths))).astype(int))
        return cls([load_image(paths[i]) for i in picks], **kwargs)

    @torch.no_grad()
    def __call__(self, model: VprModel) -> None:
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms:
            return
        saved = [(m, m.momentum) for m in norms]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average over all batches
        model.eval()
        for norm in norms:
            norm.train()
        for start in range(0, len(self.images), self.batch_size):
            model(model.preprocessing(self.images[start : start + self.batch_size]))
        for norm, momentum in saved:
            norm.momentum = momentum
        model.eval()


@dataclass(frozen=True)
class FinetuneConf:
    """Fine-tuning between pruning steps.

    Attributes:
        iterations: optimiser steps after each pruning step.
        batch_places: places per batch (two images each: an anchor and a positive).
        lr: Adam learning rate.
        positive_dist_m: images this close (metres) are the same place.
        negative_dist_m: images farther than this are different places (in between:
            ignored by the loss).
        size: (height, width) of training images; None: the model's preprocessing size.
        metric_weight: weight of the multi-similarity loss on place labels.
        distill_weight: weight of the relational distillation loss (KL between the
            unpruned and the pruned model's in-batch similarity distributions; 0: off).
        temperature: softmax temperature of the distillation.
        seed: sampling and augmentation seed.
    """

    iterations: int = 50
    batch_places: int = 8
    lr: float = 1e-4
    positive_dist_m: float = 10.0
    negative_dist_m: float = 25.0
    size: tuple[int, int] | None = None
    metric_weight: float = 1.0
    distill_weight: float = 1.0
    temperature: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if self.iterations < 0 or self.batch_places < 2:
            msg = (
                f'fine-tuning needs iterations >= 0 and batch_places >= 2, got '
                f'{self.iterations!r} and {self.batch_places!r}'
            )
            raise ConfigError(msg)
        if self.negative_dist_m < self.positive_dist_m:
            msg = (
                f'negative_dist_m ({self.negative_dist_m!r}) must be >= positive_dist_m '
                f'({self.positive_dist_m!r})'
            )
            raise ConfigError(msg)


def multi_similarity_loss(
    descriptors: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    *,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
) -> torch.Tensor:
    """Multi-similarity loss (Wang et al. 2019) over in-batch pairs.

    Args:
        descriptors: (B, D) L2-normalised.
        positive: (B, B) bool, pairs of the same place (diagonal excluded by the caller).
        negative: (B, B) bool, pairs of different places.

    Returns:
        The mean over anchors of the soft positive and negative terms.
    """
    sim = descriptors @ descriptors.T
    pos_term = _masked_softplus_lse(-alpha * (sim - base), positive) / alpha
    neg_term = _masked_softplus_lse(beta * (sim - base), negative) / beta
    return (pos_term + neg_term).mean()


def _masked_softplus_lse(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise log(1 + sum(exp(logits[mask]))), 0 for rows without a masked entry."""
    logits = logits.masked_fill(~mask, float('-inf'))
    zeros = torch.zeros(len(logits), 1, dtype=logits.dtype)
    return torch.logsumexp(torch.cat([zeros, logits], dim=1), dim=1)


def relational_distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 0.05
) -> torch.Tensor:
    """KL(teacher || student) between each image's softmax over its in-batch similarities.

    Works across descriptor sizes (only similarities are compared), so a pruned model
    with a smaller D can learn the unpruned model's ranking of places.
    """
    eye = torch.eye(len(student), dtype=torch.bool)
    s = (student @ student.T / temperature).masked_fill(eye, float('-inf'))
    t = (teacher @ teacher.T / temperature).masked_fill(eye, float('-inf'))
    log_s = F.log_softmax(s, dim=1).masked_fill(eye, 0.0)
    log_t = F.log_softmax(t, dim=1).masked_fill(eye, 0.0)
    return (log_t.exp() * (log_t - log_s)).sum(dim=1).mean()


@dataclass
class Finetuner:
    """Fine-tunes a pruning model in place on place-labelled images.

    Args:
        folder: images in the VPR folder format (``@east@north@`` in each file name),
            searched recursively; with ``conf.metric_weight`` 0, any images (the
            fine-tuning is then distillation only).
        teacher: the unpruned model, for the distillation term (frozen).
        conf: fine-tuning settings.
    """

    folder: Path
    teacher: VprModel | None
    conf: FinetuneConf = field(default_factory=FinetuneConf)

    def __post_init__(self) -> None:
        from vpr_ros.imagefolders import list_images, parse_utm

        self.paths = list_images(self.folder)
        self.rng = np.random.default_rng(self.conf.seed)
        self._cache: dict[tuple[int, tuple[int, int]], np.ndarray] = {}
        if self.teacher is not None:  # used under no_grad; often the model being pruned
            self.teacher = self.teacher.eval()
        self.utm = None
        if self.conf.metric_weight > 0:
            self._read_places(parse_utm)
        elif self.teacher is None or self.conf.distill_weight <= 0:
            msg = 'fine-tuning without place labels needs a teacher and distill_weight > 0'
            raise ConfigError(msg)
        logger.info(
            'fine-tuning data: %d images in %s (%s)',
            len(self.paths),
            self.folder,
            'place-labelled' if self.utm is not None else 'distillation only',
        )

    def _read_places(self, parse_utm: Callable[[Path], tuple[float, float]]) -> None:
        try:
            self.utm = np.array([parse_utm(p) for p in self.paths], np.float64).reshape(-1, 2)
        except ConfigError as err:
            msg = f'{err}; or fine-tune by distillation only (metric weight 0)'
            raise ConfigError(msg) from None
        near = cKDTree(self.utm).query_ball_point(self.utm, r=self.conf.positive_dist_m)
        self.positives = [np.array([j for j in r if j != i], np.int64) for i, r in enumerate(near)]
        self.anchors = np.array([i for i, p in enumerate(self.positives) if len(p)], np.int64)
        if len(self.anchors) < 2:
            msg = (
                f'{str(self.folder)!r} has {len(self.anchors)} images with another image within '
                f'{self.conf.positive_dist_m} m; fine-tuning needs places seen at least twice '
                '(raise --positive-dist-m or add images)'
            )
            raise ConfigError(msg)

    def sample(self) -> np.ndarray:
        """Indices of one batch: ``batch_places`` anchors, each followed by a positive
        (without place labels: ``2 * batch_places`` random images)."""
        if self.utm is None:
            count = min(2 * self.conf.batch_places, len(self.paths))
            return self.rng.choice(len(self.paths), size=count, replace=False)
        count = min(self.conf.batch_places, len(self.anchors))
        anchors = self.rng.choice(self.anchors, size=count, replace=False)
        pairs = [(a, self.rng.choice(self.positives[a])) for a in anchors]
        return np.array(pairs, np.int64).reshape(-1)

    def _image(self, index: int, size: tuple[int, int]) -> np.ndarray:
        key = (index, size)
        if key not in self._cache:
            from vpr_ros.imagefolders import load_image

            image = load_image(self.paths[index])
            self._cache[key] = Preprocessing(size=size).resize(image)
        return self._cache[key]

    def batch(self, model: VprModel, indices: np.ndarray) -> torch.Tensor:
        """Augmented, normalised images (random crop of 85-100 %, brightness, contrast)."""
        size = tuple(self.conf.size or model.preprocessing.size)
        out = []
        for index in indices:
            image = self._image(int(index), size).astype(np.float32)
            height, width = image.shape[:2]
            scale = self.rng.uniform(0.85, 1.0)
            h, w = max(1, int(height * scale)), max(1, int(width * scale))
            y, x = self.rng.integers(0, height - h + 1), self.rng.integers(0, width - w + 1)
            image = cv2.resize(image[y : y + h, x : x + w], (width, height))
            image = image * self.rng.uniform(0.7, 1.3) + self.rng.uniform(-25, 25)
            out.append(np.clip(image, 0, 255).astype(np.uint8))
        prep = Preprocessing(size=size, mean=model.preprocessing.mean, std=model.preprocessing.std)
        return prep(out)

    def loss(self, model: VprModel, indices: np.ndarray) -> torch.Tensor:
        """Metric loss on place labels plus relational distillation, for one batch."""
        images = self.batch(model, indices)
        desc = model(images)['global_descriptor']
        loss = desc.new_zeros(())
        if self.utm is not None:
            utm = torch.from_numpy(self.utm[indices])
            dist = torch.cdist(utm, utm)
            eye = torch.eye(len(indices), dtype=torch.bool)
            positive = (dist <= self.conf.positive_dist_m) & ~eye
            negative = dist > self.conf.negative_dist_m
            loss = self.conf.metric_weight * multi_similarity_loss(desc, positive, negative)
        if self.teacher is not None and self.conf.distill_weight > 0:
            with torch.no_grad():
                target = self.teacher(images)['global_descriptor']
            loss = loss + self.conf.distill_weight * relational_distillation_loss(
                desc, target, self.conf.temperature
            )
        return loss

    def accumulate_gradients(self, model: VprModel, batches: int = 4) -> None:
        """Fill ``.grad`` with the loss gradient over a few batches (Taylor importance)."""
        model.eval()
        for _ in range(batches):
            (self.loss(model, self.sample()) / batches).backward()

    def __call__(self, model: VprModel, step: int) -> float | None:
        """Train ``model`` in place for ``conf.iterations`` steps; return the mean loss.

        Batch-norm statistics stay frozen (batches of a few places are too small to
        estimate them); their affine parameters train.
        """
        if self.conf.iterations == 0:
            return None
        model.train()
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=self.conf.lr)
        losses = []
        for _ in range(self.conf.iterations):
            optimizer.zero_grad(set_to_none=True)
            loss = self.loss(model, self.sample())
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        model.zero_grad(set_to_none=True)
        model.eval()
        mean = float(np.mean(losses))
        logger.info('step %d: fine-tuned %d iterations, mean loss %.4f', step, len(losses), mean)
        return mean


# --------------------------------------------------------------------------------------
# What pruning buys


@dataclass(frozen=True)
class Footprint:
    """Sizes of a model and of its map (MB = 10^6 bytes).

    ``map_mb_per_1000`` counts the global descriptors only (float32, 1,000 places), as the
    paper does; ``local_mb_per_1000`` the local features a re-ranking map adds (float16,
    at the model's preprocessing size).
    """

    params: int
    model_mb_fp32: float
    model_mb_fp16: float
    global_dim: int
    local_dim: int
    map_mb_per_1000: float
    local_mb_per_1000: float


def footprint(model: VprModel) -> Footprint:
    """Parameters and memory of ``model`` and of a 1,000-place map it builds."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    elements = sum(t.numel() for t in tensors)
    params = sum(p.numel() for p in model.parameters())
    locations = _local_locations(model)
    return Footprint(
        params=int(params),
        model_mb_fp32=elements * 4 / MB,
        model_mb_fp16=elements * 2 / MB,
        global_dim=int(model.global_dim),
        local_dim=int(model.local_dim),
        map_mb_per_1000=1000 * model.global_dim * 4 / MB,
        local_mb_per_1000=1000 * locations * model.local_dim * 2 / MB,
    )


@torch.inference_mode()
def _local_locations(model: VprModel) -> int:
    """Locations (h * w) of the local map at the preprocessing size, from one forward
    pass: the map's size depends on the backbone stage, any pooling (``local_pool``) and
    the model family, so it is measured rather than derived."""
    was_training = model.training
    model.eval()
    try:
        local = model(torch.zeros(1, 3, *model.preprocessing.size))['local_features']
    finally:
        model.train(was_training)
    return int(local.shape[-2] * local.shape[-1])


@torch.inference_mode()
def extraction_latency_ms(
    model: VprModel,
    *,
    size: tuple[int, int] | None = None,
    runs: int = 20,
    warmup: int = 3,
    statistic: str = 'median',
) -> float:
    """Time of one forward pass at batch 1 on this CPU (preprocessing excluded).

    Args:
        model: the model (put in eval mode).
        size: input (height, width); None: the model's preprocessing size.
        runs: timed passes.
        warmup: untimed passes first.
        statistic: 'median', or 'min' (the least disturbed pass: steadier when other
            processes share the CPU).
    """
    model.eval()
    images = torch.randn(1, 3, *(size or model.preprocessing.size))
    for _ in range(warmup):
        model(images)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model(images)
        times.append(time.perf_counter() - start)
    return (min(times) if statistic == 'min' else statistics.median(times)) * 1000


def matching_latency_ms(
    dim: int, *, places: int = 10_000, queries: int = 100, seed: int = 0, statistic: str = 'median'
) -> float:
    """Time to find the top-1 place for one query in a ``places``-place map (exhaustive
    inner product, faiss ``IndexFlatIP``, random unit descriptors); median or min."""
    rng = np.random.default_rng(seed)
    database = _unit(rng.standard_normal((places, dim), dtype=np.float32))
    probes = _unit(rng.standard_normal((queries, dim), dtype=np.float32))
    index = faiss.IndexFlatIP(dim)
    index.add(database)
    index.search(probes[:3], 1)
    times = []
    for query in probes:
        start = time.perf_counter()
        index.search(query[None], 1)
        times.append(time.perf_counter() - start)
    return (min(times) if statistic == 'min' else statistics.median(times)) * 1000


def _unit(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True))


__all__ = [
    'IMPORTANCES',
    'Finetuner',
    'FinetuneConf',
    'Footprint',
    'PruneConf',
    'PruneStep',
    'channel_counts',
    'extraction_latency_ms',
    'footprint',
    'head_layers',
    'head_sparsity',
    'make_importance',
    'matching_latency_ms',
    'multi_similarity_loss',
    'prune',
    'relational_distillation_loss',
    'snapshot',
    'sparsity_schedule',
]
