"""Image preprocessing: the one place where resize policy and normalisation live.

Importing it does not import torch: the resize (OpenCV) serves every extraction backend,
and only the torch normalisation imports torch, when it runs. The ONNX exports
(``vpr_ros.models.onnx_export``) hold the same normalisation in their graph and take the
resized ``uint8`` batch that :meth:`Preprocessing.batch` makes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_to(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``image`` (H, W[, C]) resized to ``size`` = (height, width): ``cv2.INTER_AREA`` when
    shrinking (no aliasing), linear when growing; the image itself when it has that size."""
    height, width = size
    if image.shape[:2] == (height, width):
        return image
    shrinking = image.shape[0] > height or image.shape[1] > width
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interpolation)


@dataclass(frozen=True)
class Preprocessing:
    """Turns RGB ``uint8`` images into a normalised float batch.

    Every image is resized to ``size`` = (height, width) so that a batch has one shape
    and the local feature map one size; ``cv2.INTER_AREA`` when shrinking avoids aliasing.
    """

    size: tuple[int, int] = (240, 320)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def from_conf(cls, conf: dict) -> Preprocessing:
        return cls(
            size=tuple(conf.get('size', cls.size)),
            mean=tuple(conf.get('mean', cls.mean)),
            std=tuple(conf.get('std', cls.std)),
        )

    def to_conf(self) -> dict:
        return {'size': list(self.size), 'mean': list(self.mean), 'std': list(self.std)}

    def resize(self, image: np.ndarray) -> np.ndarray:
        """Resize one RGB image (H, W, 3) to ``size``."""
        if image.ndim != 3 or image.shape[2] != 3 or image.size == 0:
            raise ValueError(f'expected an RGB image (H, W, 3), got shape {image.shape!r}')
        return resize_to(image, self.size)

    def batch(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """RGB uint8 images -> a uint8 batch (B, H, W, 3) at ``size``; one image that already
        has the size is not copied."""
        if len(images) == 1:
            resized = np.ascontiguousarray(self.resize(images[0]))
            return resized[None]
        return np.stack([self.resize(np.ascontiguousarray(im)) for im in images])

    def normalise(self, batch: np.ndarray) -> torch.Tensor:
        """A uint8 batch (B, H, W, 3) -> float tensor (B, 3, H, W), normalised."""
        import torch

        tensor = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (tensor - mean) / std

    def __call__(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """RGB uint8 images -> float tensor (B, 3, H, W), normalised."""
        return self.normalise(self.batch(images))
