"""Image folders: listing in frame order, the one image loader, names with UTM positions.

Evaluation, training, pruning and the demo all read image files through this module.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path, PurePath

import cv2
import numpy as np

from vpr_ros.errors import ConfigError, ImageDecodeError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.ppm', '.pgm', '.tif', '.tiff', '.webp')


def natural_key(name: str | os.PathLike) -> tuple[list[int | str], str]:
    """Sort key that orders the digit runs of a name by value: ``f2`` before ``f10``.

    Frame numbers are rarely zero-padded the same way across datasets, and a plain string
    sort would put ``10`` between ``1`` and ``2``, scrambling traverses and sequences.
    """
    text = PurePath(name).as_posix() if isinstance(name, PurePath) else os.fspath(name)
    parts = [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', text)]
    return parts, text


def list_images(root: str | os.PathLike, pattern: str = '**/*') -> list[Path]:
    """Image files under ``root`` matching ``pattern`` (a ``Path.glob`` pattern).

    Sorted naturally (``natural_key``: ``2.png`` before ``10.png``), which is the frame
    order of traverses and sequences and the index order of VPR-Bench ground truth.

    Raises:
        FileNotFoundError: ``root`` is not a directory.
        ConfigError: nothing matches.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f'image folder {str(root)!r} does not exist')
    paths = sorted(
        (p for p in root.glob(pattern) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
        key=lambda p: natural_key(p.relative_to(root)),
    )
    if not paths:
        msg = (
            f'no images ({", ".join(IMAGE_EXTENSIONS)}) match {pattern!r} under {str(root)!r}; '
            f'check the folder and the glob pattern'
        )
        raise ConfigError(msg)
    return paths


def relative_names(paths: Sequence[Path], root: str | os.PathLike) -> list[str]:
    """``paths`` relative to ``root`` as POSIX strings (the names ground truth compares)."""
    return [PurePath(os.path.relpath(p, root)).as_posix() for p in paths]


def load_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as an RGB uint8 array (H, W, 3); greyscale is expanded to 3 channels.

    Raises:
        ImageDecodeError: the file is missing or cannot be decoded.
    """
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ImageDecodeError(f'unreadable image file: {str(path)!r} is missing or corrupt')
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def parse_utm(name: str | os.PathLike) -> tuple[float, float]:
    """(east, north) in metres from a file name ``...@east@north@...`` (gmberton convention).

    The coordinates are the first two ``@``-separated fields of the file name (the VPR
    dataset format ``@utm_east@utm_north@utm_zone@...@.jpg``); both must be finite numbers.
    Training and evaluation read names with this one function.

    Raises:
        ConfigError: the name has no ``@east@north@`` part, or its fields are not numbers.
    """
    base = PurePath(name).name
    parts = base.split('@')
    if len(parts) < 4:
        msg = (
            f'file name {base!r} has no UTM coordinates; name images '
            f"'@<east>@<north>@....jpg' (metres) or use another ground truth (--gt)"
        )
        raise ConfigError(msg)
    try:
        east, north = float(parts[1]), float(parts[2])
    except ValueError:
        east = north = math.nan
    if not (math.isfinite(east) and math.isfinite(north)):
        msg = (
            f'file name {base!r}: UTM coordinates {parts[1]!r}, {parts[2]!r} are not finite '
            f"numbers; name images '@<east>@<north>@....jpg' (metres)"
        )
        raise ConfigError(msg)
    return east, north
