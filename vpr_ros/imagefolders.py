"""Image folders: listing in frame order, the one image loader, where each image was taken.

Evaluation, training, pruning and the demo all read image files through this module. An
image's position comes from its name (``parse_utm``, ``@east@north@``) or from a pose table
beside the images (``read_pose_table``, ``file,x,y[,yaw]`` as in campus_route's data.csv).
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath
from typing import NamedTuple

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


@dataclass(frozen=True)
class ImageFolder:
    """Image files listed from one folder, in frame order, and the folder they are named
    relative to (ground truth compares those names)."""

    root: Path
    paths: list[Path]

    @classmethod
    def from_glob(cls, root: str | os.PathLike, pattern: str = '**/*') -> ImageFolder:
        """The images under ``root`` matching ``pattern`` (see ``list_images``)."""
        return cls(Path(root), list_images(root, pattern))

    def __len__(self) -> int:
        return len(self.paths)

    def names(self) -> list[str]:
        """The files relative to ``root``, as POSIX strings."""
        return relative_names(self.paths, self.root)

    def subset(self, indices: Iterable[int]) -> ImageFolder:
        """The same folder with only the images at ``indices`` (in that order)."""
        return ImageFolder(self.root, [self.paths[int(i)] for i in indices])


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


class PoseRow(NamedTuple):
    """Where one image was taken: x, y in metres and the heading in radians (None when the
    table has no yaw column), in the table's planar frame."""

    x: float
    y: float
    yaw: float | None


def read_pose_table(path: str | os.PathLike) -> dict[str, PoseRow]:
    """Positions of image files from a CSV table with one row ``file,x,y[,yaw]`` per image.

    This is campus_route's ``data.csv`` (metres, radians, a planar map frame). A first row
    naming the columns is optional: with it the columns ``file``, ``x``, ``y`` (and ``yaw``)
    may come in any order and others are ignored; without it they are file, x, y and
    optionally yaw, in that order. Blank lines and lines starting with ``#`` are skipped.

    Returns:
        {file as written in the table (POSIX, ``./`` dropped): its row}, in table order.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ConfigError: a row lacks a column, a value is not a finite number, or a file is
            listed twice.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'pose table {str(path)!r} does not exist')
    try:
        with path.open(newline='') as stream:
            lines = [
                (number, row)
                for number, row in enumerate(csv.reader(stream), start=1)
                if row and any(cell.strip() for cell in row) and not row[0].startswith('#')
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ConfigError(f'cannot read pose table {str(path)!r}: {err}') from err
    columns = {'file': 0, 'x': 1, 'y': 2, 'yaw': 3}
    if lines and 'file' in {cell.strip().lower() for cell in lines[0][1]}:
        header = [cell.strip().lower() for cell in lines.pop(0)[1]]
        missing = [c for c in ('file', 'x', 'y') if c not in header]
        if missing:
            msg = (
                f'pose table {str(path)!r}: the header {header!r} lacks {missing!r}; name the '
                f'columns file,x,y[,yaw]'
            )
            raise ConfigError(msg)
        columns = {c: header.index(c) for c in columns if c in header}
    table: dict[str, PoseRow] = {}
    for number, row in lines:
        where = f'pose table {str(path)!r} line {number}'
        needed = max(columns['file'], columns['x'], columns['y']) + 1
        if len(row) < needed:
            msg = f'{where} has {len(row)} columns, expected file,x,y[,yaw]: {row!r}'
            raise ConfigError(msg)
        name = PurePosixPath(row[columns['file']].strip()).as_posix()
        if not name or name == '.':
            raise ConfigError(f'{where} names no file: {row!r}')
        if name in table:
            raise ConfigError(f'{where} lists {name!r} a second time; one row per image')
        x = _finite(row[columns['x']], where, 'x (metres)')
        y = _finite(row[columns['y']], where, 'y (metres)')
        yaw = None
        if 'yaw' in columns and len(row) > columns['yaw'] and row[columns['yaw']].strip():
            yaw = _finite(row[columns['yaw']], where, 'yaw (radians)')
        table[name] = PoseRow(x, y, yaw)
    if not table:
        raise ConfigError(f'pose table {str(path)!r} has no rows; expected file,x,y[,yaw]')
    return table


def _finite(text: str, where: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ConfigError(f'{where}: {what} {text.strip()!r} is not a finite number')
    return value


def positions_from_table(
    table: Mapping[str, PoseRow], images: ImageFolder, source: str | os.PathLike
) -> np.ndarray:
    """(N, 2) x, y in metres of each image of ``images`` from a pose table.

    An image's row is the one named by its path relative to ``images.root``, else the only
    one with its file name (basename).

    Args:
        table: ``read_pose_table`` output.
        images: the images.
        source: the table's file, for messages.

    Raises:
        ConfigError: an image has no row, or its file name is in several rows.
    """
    by_basename: dict[str, list[str]] = {}
    for name in table:
        by_basename.setdefault(PurePosixPath(name).name, []).append(name)
    out = np.zeros((len(images), 2), np.float64)
    missing: list[str] = []
    for i, name in enumerate(images.names()):
        row = table.get(name)
        if row is None:
            candidates = by_basename.get(PurePosixPath(name).name, [])
            if len(candidates) > 1:
                msg = (
                    f'pose table {str(source)!r}: image {name!r} of {str(images.root)!r} has '
                    f'no row of its own and its file name is in {len(candidates)} rows '
                    f'({candidates[:3]!r}); name it by its path relative to the image folder'
                )
                raise ConfigError(msg)
            row = table[candidates[0]] if candidates else None
        if row is None:
            missing.append(name)
            continue
        out[i] = row.x, row.y
    if missing:
        msg = (
            f'pose table {str(source)!r} has no row for {len(missing)} of {len(images)} '
            f'images in {str(images.root)!r} (e.g. {missing[0]!r}); add rows file,x,y named '
            f'by the path relative to the image folder or by file name, or narrow the glob'
        )
        raise ConfigError(msg)
    return out
