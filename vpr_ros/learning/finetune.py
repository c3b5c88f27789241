"""Fine-tuning: the optimisation step every learning loop runs, the loop that recovers a
pruned model (``Finetuner``), and batch-norm re-estimation (``BatchNormCalibrator``).

Two loops train models here: SelaVPR training (``vpr_ros.learning.train``, epochs of
mined triplets) and ``Finetuner`` (a few iterations after each pruning step). Both choose
the parameters that learn with ``trainable_parameters`` (those with ``requires_grad``),
optimise them with ``make_optimizer`` (Adam), put the model in training mode with
``set_train_mode`` and run each batch through ``optimization_step`` (losses -> backward
-> optimizer step). What stays apart is what really differs:

* data: training re-mines (query, positive, hard negatives) triplets of a VPR dataset with
  the current model every round; fine-tuning samples (anchor, positive) pairs of one
  folder, or any images when it only distils;
* losses: the triplet + MNN local loss (global and local features) against the
  multi-similarity loss plus relational distillation to the unpruned model (global only);
* batch norm: fine-tuning freezes the running statistics (batches of a few places are
  too small to estimate them; ``BatchNormCalibrator`` re-estimates them instead), SelaVPR
  has none to freeze;
* the optimizer's life: training keeps one Adam across epochs and checkpoints it for
  resuming; fine-tuning makes a fresh one after each pruning step, whose parameters have
  new shapes;
* augmentation: a random horizontal flip of whole batches (training) against a random
  crop and brightness/contrast change per image (fine-tuning).

Importing this module does not import torch (``FinetuneConf`` builds the prune command's
flags); the functions do.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from vpr_ros import logger
from vpr_ros.config import Conf, option
from vpr_ros.errors import ConfigError, ModelError
from vpr_ros.imagefolders import list_images, load_image
from vpr_ros.learning.data import PlaceImages

if TYPE_CHECKING:
    import torch
    from torch import nn

    from vpr_ros.models.base import VprModel


# --------------------------------------------------------------------------------------
# The shared step


def trainable_parameters(model: VprModel) -> list[tuple[str, nn.Parameter]]:
    """The parameters that learn (``requires_grad``), by name, in the model's order.

    Raises:
        ModelError: the model has none.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ModelError(f'model {model.name!r} has no trainable parameters')
    return named


def make_optimizer(model: VprModel, lr: float) -> torch.optim.Optimizer:
    """Adam over the trainable parameters only (``trainable_parameters``)."""
    import torch

    return torch.optim.Adam([p for _, p in trainable_parameters(model)], lr=lr)


def set_train_mode(model: VprModel, *, freeze_batch_norm: bool = False) -> None:
    """Training mode; with ``freeze_batch_norm`` the batch norms keep their running
    statistics (their affine parameters still learn)."""
    from torch import nn

    model.train()
    if freeze_batch_norm:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def optimization_step(
    model: VprModel,
    optimizer: torch.optim.Optimizer,
    losses_of_batch: Callable[[], dict[str, torch.Tensor]],
) -> dict[str, float]:
    """One step: the batch's losses -> backward of their ``'loss'`` -> optimizer step.

    Args:
        model: the model the optimizer trains (its identity is invalidated: new weights).
        optimizer: over (some of) the model's parameters.
        losses_of_batch: runs the model on one batch and returns its losses: ``'loss'``,
            the total that is minimised, and any parts to report.

    Returns:
        The losses as numbers (before the step).
    """
    optimizer.zero_grad(set_to_none=True)
    losses = losses_of_batch()
    losses['loss'].backward()
    optimizer.step()
    model.invalidate_identity()
    return {key: float(value.detach()) for key, value in losses.items()}


# --------------------------------------------------------------------------------------
# Fine-tuning a pruned model


@dataclass(frozen=True)
class FinetuneConf(Conf):
    """Fine-tuning between pruning steps (the prune command's fine-tuning flags)."""

    iterations: int = option(
        50,
        'Fine-tuning iterations after each pruning step (0: none; Taylor importance still '
        'uses the data)',
        min=0,
    )
    batch_places: int = option(
        8, 'Places per fine-tuning batch (two images each: an anchor and a positive)', min=2
    )
    lr: float = option(1e-4, 'Fine-tuning Adam learning rate', min=0.0, min_exclusive=True)
    positive_dist_m: float = option(
        10.0, 'Images this close are the same place', unit='m', min=0.0
    )
    negative_dist_m: float = option(
        25.0,
        'Images farther apart are different places (pairs in between are ignored)',
        unit='m',
        min=0.0,
    )
    size: list[int] = option(
        [],
        "Fine-tuning input size: height width (empty: the model's preprocessing size)",
        unit='px',
        min=1,
    )
    metric_weight: float = option(
        1.0,
        'Weight of the multi-similarity loss on place labels (0: distillation only; then '
        'the fine-tuning images need no place names)',
        min=0.0,
    )
    distill_weight: float = option(
        1.0,
        'Weight of relational distillation to the unpruned model (KL between their in-batch '
        'similarity distributions; 0: off)',
        min=0.0,
    )
    temperature: float = option(
        0.05, 'Softmax temperature of the distillation', min=0.0, min_exclusive=True
    )
    seed: int = option(0, 'Fine-tuning sampling and augmentation seed')

    def validate(self) -> None:
        if len(self.size) not in (0, 2):
            msg = f'size must be two values, height and width, or none; got {self.size!r}'
            raise ConfigError(msg)
        if self.negative_dist_m < self.positive_dist_m:
            msg = (
                f'negative_dist_m ({self.negative_dist_m!r}) must be >= positive_dist_m '
                f'({self.positive_dist_m!r})'
            )
            raise ConfigError(msg)


class Finetuner:
    """Fine-tunes a pruning model in place on place-labelled images.

    The loss is ``metric_weight`` times the multi-similarity loss on place labels plus
    ``distill_weight`` times relational distillation to ``teacher``; images are augmented
    (random crop of 85-100 %, brightness, contrast).

    Args:
        folder: images in the VPR folder format (``@east@north@`` in each file name),
            searched recursively; with ``conf.metric_weight`` 0, any images (the
            fine-tuning is then distillation only).
        teacher: the unpruned model, for the distillation term (frozen).
        conf: fine-tuning settings.

    Raises:
        ConfigError: names without positions while the metric loss is on, fewer than two
            images with another image of the same place, or no loss at all.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        teacher: VprModel | None,
        conf: FinetuneConf | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.conf = conf or FinetuneConf()
        self.paths = list_images(self.folder)
        self.rng = np.random.default_rng(self.conf.seed)
        self._cache: dict[tuple[int, tuple[int, int]], np.ndarray] = {}
        # Used under no_grad; often the model being pruned.
        self.teacher = teacher.eval() if teacher is not None else None
        self.utm: np.ndarray | None = None
        self.positives: list[np.ndarray] = []
        self.anchors = np.zeros(0, np.int64)
        if self.conf.metric_weight > 0:
            self._read_places()
        elif self.teacher is None or self.conf.distill_weight <= 0:
            msg = 'fine-tuning without place labels needs a teacher and distill_weight > 0'
            raise ConfigError(msg)
        logger.info(
            'fine-tuning data: %d images in %s (%s)',
            len(self.paths),
            self.folder,
            'place-labelled' if self.utm is not None else 'distillation only',
        )

    def _read_places(self) -> None:
        try:
            images = PlaceImages.from_paths(self.paths)
        except ConfigError as err:
            msg = f'{err}; or fine-tune by distillation only (metric weight 0)'
            raise ConfigError(msg) from None
        self.utm = images.utm
        self.positives = images.same_place(self.conf.positive_dist_m)
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
        from vpr_ros.models.preprocessing import Preprocessing

        key = (index, size)
        if key not in self._cache:
            image = load_image(self.paths[index])
            self._cache[key] = Preprocessing(size=size).resize(image)
        return self._cache[key]

    def batch(self, model: VprModel, indices: np.ndarray) -> torch.Tensor:
        """Augmented, normalised images (random crop of 85-100 %, brightness, contrast)."""
        from vpr_ros.models.preprocessing import Preprocessing

        height, width = self.conf.size or model.preprocessing.size
        size = (int(height), int(width))
        out = []
        for index in indices:
            image = self._image(int(index), size).astype(np.float32)
            rows, cols = image.shape[:2]
            scale = self.rng.uniform(0.85, 1.0)
            h, w = max(1, int(rows * scale)), max(1, int(cols * scale))
            y, x = self.rng.integers(0, rows - h + 1), self.rng.integers(0, cols - w + 1)
            cropped = cv2.resize(image[y : y + h, x : x + w], (cols, rows))
            lit = cropped * self.rng.uniform(0.7, 1.3) + self.rng.uniform(-25, 25)
            out.append(np.clip(lit, 0, 255).astype(np.uint8))
        prep = Preprocessing(size=size, mean=model.preprocessing.mean, std=model.preprocessing.std)
        return prep(out)

    def loss(self, model: VprModel, indices: np.ndarray) -> torch.Tensor:
        """Metric loss on place labels plus relational distillation, for one batch."""
        import torch

        from vpr_ros.learning.losses import multi_similarity_loss, relational_distillation_loss

        images = self.batch(model, indices)
        desc: torch.Tensor = model(images)['global_descriptor']
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
        set_train_mode(model, freeze_batch_norm=True)
        optimizer = make_optimizer(model, self.conf.lr)
        losses = []
        for _ in range(self.conf.iterations):
            losses.append(
                optimization_step(
                    model, optimizer, lambda: {'loss': self.loss(model, self.sample())}
                )['loss']
            )
        model.zero_grad(set_to_none=True)
        model.eval()
        mean = float(np.mean(losses))
        logger.info('step %d: fine-tuned %d iterations, mean loss %.4f', step, len(losses), mean)
        return mean


# --------------------------------------------------------------------------------------
# Batch-norm re-estimation


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
        cls, folder: str | os.PathLike[str], limit: int = 512, batch_size: int = 16
    ) -> BatchNormCalibrator:
        """Up to ``limit`` images under ``folder`` (recursively, evenly spaced)."""
        paths = list_images(folder)
        picks = np.unique(np.linspace(0, len(paths) - 1, min(limit, len(paths))).astype(int))
        return cls([load_image(paths[i]) for i in picks], batch_size=batch_size)

    def __call__(self, model: VprModel) -> None:
        import torch
        from torch import nn

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
        with torch.no_grad():
            for start in range(0, len(self.images), self.batch_size):
                model(model.preprocessing(self.images[start : start + self.batch_size]))
        for norm, momentum in saved:
            norm.momentum = momentum
        model.eval()


__all__ = [
    'BatchNormCalibrator',
    'FinetuneConf',
    'Finetuner',
    'make_optimizer',
    'optimization_step',
    'set_train_mode',
    'trainable_parameters',
]
