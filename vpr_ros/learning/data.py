"""Place-labelled images for learning: the VPR folder format, its splits and positives.

The common VPR dataset format (gmberton/VPR-datasets-downloader, also used by SelaVPR and
CosPlace): ``<dataset>/{train,val}/{database,queries}/`` holding images whose file names
carry UTM coordinates in metres, ``@<east>@<north>@...@.jpg``. Images are listed, read and
their names parsed with ``vpr_ros.imagefolders``; positives are the ground truth's
(``vpr_ros.ground_truth.positives_within_radius``), so training, fine-tuning and evaluation
agree on what the same place is.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vpr_ros.ground_truth import positives_within_radius
from vpr_ros.imagefolders import list_images, load_image, parse_utm

if TYPE_CHECKING:
    import torch

    from vpr_ros.models.base import VprModel

TRAIN_SPLIT = 'train'
VAL_SPLIT = 'val'


@dataclass
class PlaceImages:
    """Images with their UTM positions: ``paths`` and ``utm`` (N, 2) east/north metres."""

    paths: list[Path]
    utm: np.ndarray

    @classmethod
    def from_paths(cls, paths: Sequence[Path]) -> PlaceImages:
        """``paths`` with the positions in their names.

        Raises:
            ConfigError: a name without ``@east@north@`` (``parse_utm``).
        """
        utm = np.array([parse_utm(p) for p in paths], np.float64).reshape(-1, 2)
        return cls(list(paths), utm)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str]) -> PlaceImages:
        """All images under ``folder`` (recursively), in ``list_images`` order.

        Raises:
            FileNotFoundError: ``folder`` is not a directory.
            ConfigError: no images, or a name without ``@east@north@`` (``parse_utm``).
        """
        return cls.from_paths(list_images(folder))

    def __len__(self) -> int:
        return len(self.paths)

    def same_place(self, radius_m: float) -> list[np.ndarray]:
        """For each image, the other images of this set within ``radius_m`` metres (sorted):
        the same place seen again."""
        near = positives_within_radius(self.utm, self.utm, radius_m)
        return [others[others != i] for i, others in enumerate(near)]


class VprSplit:
    """One split of a VPR-format dataset: ``database`` and ``queries`` image sets.

    Args:
        folder: the split folder, holding ``database/`` and ``queries/``.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.name = f'{self.folder.parent.name}/{self.folder.name}'
        self.database = PlaceImages.from_folder(self.folder / 'database')
        self.queries = PlaceImages.from_folder(self.folder / 'queries')

    def __repr__(self) -> str:
        return f'< {self.name} - #q: {len(self.queries)}; #db: {len(self.database)} >'

    def positives(self, radius_m: float) -> list[np.ndarray]:
        """For each query, the database indices within ``radius_m`` metres (sorted)."""
        return positives_within_radius(self.database.utm, self.queries.utm, radius_m)


def load_splits(dataset: str | os.PathLike[str]) -> tuple[VprSplit, VprSplit]:
    """The ``train`` and ``val`` splits of a VPR-format dataset folder.

    Raises:
        FileNotFoundError: the dataset or one of its split folders does not exist.
        ConfigError: a split without images, or an image name without UTM coordinates.
    """
    folder = Path(dataset)
    if not folder.is_dir():
        msg = (
            f'dataset folder {str(folder)!r} does not exist; give a VPR-format dataset with '
            f'{TRAIN_SPLIT}/ and {VAL_SPLIT}/, each holding database/ and queries/'
        )
        raise FileNotFoundError(msg)
    return VprSplit(folder / TRAIN_SPLIT), VprSplit(folder / VAL_SPLIT)


def load_batch(model: VprModel, paths: Sequence[Path]) -> torch.Tensor:
    """Images at ``paths`` as the model's normalised input batch (B, 3, H, W)."""
    return model.preprocessing([load_image(p) for p in paths])


__all__ = ['PlaceImages', 'VprSplit', 'load_batch', 'load_splits']
