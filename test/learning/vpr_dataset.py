"""Tiny VPR-format datasets written by the learning tests (``@east@north@`` file names)."""

from __future__ import annotations

from pathlib import Path

import cv2
from conftest import synthetic_place, viewed_again

SPACING_M = 30.0


def write_split(folder: Path, places: range) -> None:
    """One database and one query image per place, ``SPACING_M`` apart along east."""
    for kind in ('database', 'queries'):
        (folder / kind).mkdir(parents=True, exist_ok=True)
    for i in places:
        east, north = 500000.0 + SPACING_M * i, 4000000.0
        image = synthetic_place(i, (60, 80))
        db_name = f'@{east:.2f}@{north:.2f}@17@T@@@@@@@.png'
        q_name = f'@{east + 2:.2f}@{north + 1:.2f}@17@T@@@@@@@.png'
        cv2.imwrite(str(folder / 'database' / db_name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        query = cv2.cvtColor(viewed_again(image), cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(folder / 'queries' / q_name), query)


def write_dataset(root: Path) -> Path:
    """A dataset with 6 training places and 4 validation places."""
    write_split(root / 'train', range(6))
    write_split(root / 'val', range(100, 104))
    return root


def write_places(folder: Path, count: int = 6) -> Path:
    """Two views of ``count`` places, 100 m apart, in the VPR folder format."""
    folder.mkdir(parents=True)
    for i in range(count):
        image = synthetic_place(i, (48, 48))
        for view, img in enumerate([image, viewed_again(image)]):
            name = f'@{100.0 * i:.2f}@{view * 2.0:.2f}@view{view}.png'
            cv2.imwrite(str(folder / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return folder
