"""Position priors: where the robot could be, and the map tiles that restrict retrieval to it.

A prior is a disc in the map frame: a GPS fix (``sensor_msgs/NavSatFix``, through the map's
ENU origin) or a localizer's pose with its covariance, widened to ``sigmas`` standard
deviations and to at least a minimum radius. Retrieval then answers "which places within the
disc look most like this", which is what fleets and GPS-equipped robots ask.

The map is partitioned into square tiles of ``tile_m`` metres (``IndexConf.tile_m``). A
prior selects the tiles its disc overlaps, then the places in them within its radius:
``TileGrid`` does this in memory for the faiss engine; the Milvus engine filters by the
tile keys (a field of each place) itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_NO_TILE = np.iinfo(np.int64).min  # the tile key of a place without a position


@dataclass(frozen=True)
class PositionPrior:
    """A disc in the map frame where the robot is (metres).

    Attributes:
        x: centre east / x.
        y: centre north / y.
        radius_m: radius; places further away are not retrieved.
    """

    x: float
    y: float
    radius_m: float

    @classmethod
    def from_covariance(
        cls,
        x: float,
        y: float,
        covariance_xy: np.ndarray | None,
        *,
        sigmas: float,
        min_radius_m: float,
    ) -> PositionPrior:
        """A prior from a position and its 2x2 covariance (m^2; None: unknown): radius
        ``sigmas`` standard deviations along the widest axis, at least ``min_radius_m``.
        An unknown or non-finite covariance gives ``min_radius_m``."""
        radius = float(min_radius_m)
        if covariance_xy is not None:
            cov = np.asarray(covariance_xy, np.float64).reshape(2, 2)
            if np.isfinite(cov).all():
                widest = float(np.linalg.eigvalsh((cov + cov.T) / 2.0).max())
                radius = max(radius, sigmas * math.sqrt(max(widest, 0.0)))
        return cls(float(x), float(y), radius)

    @classmethod
    def from_navsat(
        cls,
        latitude: float,
        longitude: float,
        altitude: float,
        position_covariance: Sequence[float] | None,
        enu_origin: Sequence[float],
        *,
        sigmas: float = 3.0,
        min_radius_m: float = 25.0,
    ) -> PositionPrior:
        """A prior from a ``sensor_msgs/NavSatFix`` (degrees, metres; its row-major 3x3 ENU
        ``position_covariance`` in m^2, or None when unknown) in the frame of a map whose
        poses came from NavSatFix (``PlaceDatabase.enu_origin``).

        Raises:
            ValueError: a fix or origin that is not finite.
        """
        from vpr_ros.geometry import LocalTangentPlane  # scipy: only when priors are used

        if not np.isfinite([latitude, longitude, altitude]).all():
            raise ValueError(f'NavSatFix {(latitude, longitude, altitude)!r} is not a fix')
        east, north, _ = LocalTangentPlane(*enu_origin).to_enu(latitude, longitude, altitude)
        covariance = None
        if position_covariance is not None:
            covariance = np.asarray(position_covariance, np.float64).reshape(3, 3)[:2, :2]
        return cls.from_covariance(
            float(east), float(north), covariance, sigmas=sigmas, min_radius_m=min_radius_m
        )


def tile_keys(x: np.ndarray, y: np.ndarray, tile_m: float) -> np.ndarray:
    """The tile key of each position (int64; one value per ``tile_m`` square; positions
    that are NaN get a key no prior selects)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    finite = np.isfinite(x) & np.isfinite(y)
    tx = np.floor(np.where(finite, x, 0.0) / tile_m).astype(np.int64)
    ty = np.floor(np.where(finite, y, 0.0) / tile_m).astype(np.int64)
    keys = (tx << 32) | (ty & 0xFFFFFFFF)
    return np.where(finite, keys, _NO_TILE)


MAX_TILES = 4096
"""A prior over more tiles than this selects its places by distance alone."""


def tiles_near(prior: PositionPrior, tile_m: float) -> np.ndarray | None:
    """Keys of the tiles that the prior's disc overlaps (its bounding square's tiles), or
    None when they are more than ``MAX_TILES``."""
    lo_x = math.floor((prior.x - prior.radius_m) / tile_m)
    hi_x = math.floor((prior.x + prior.radius_m) / tile_m)
    lo_y = math.floor((prior.y - prior.radius_m) / tile_m)
    hi_y = math.floor((prior.y + prior.radius_m) / tile_m)
    if (hi_x - lo_x + 1) * (hi_y - lo_y + 1) > MAX_TILES:
        return None
    tx, ty = np.meshgrid(np.arange(lo_x, hi_x + 1), np.arange(lo_y, hi_y + 1), indexing='ij')
    keys: np.ndarray = (tx.astype(np.int64) << 32) | (ty.astype(np.int64) & 0xFFFFFFFF)
    return np.unique(keys.reshape(-1))


class TileGrid:
    """Places by tile, for selecting the places within a prior's radius.

    Args:
        xy: (N, 2) place positions (NaN where unknown).
        tile_m: tile side in metres.
    """

    def __init__(self, xy: np.ndarray, tile_m: float) -> None:
        self.xy = np.asarray(xy, np.float64).reshape(-1, 2)
        self.tile_m = float(tile_m)
        keys = tile_keys(self.xy[:, 0], self.xy[:, 1], self.tile_m)
        self._order = np.argsort(keys, kind='stable')
        self._keys = keys[self._order]

    def __len__(self) -> int:
        return len(self.xy)

    def places_within(self, prior: PositionPrior) -> np.ndarray:
        """Sorted indices of the places within the prior's radius."""
        wanted = tiles_near(prior, self.tile_m)
        if wanted is None:
            return np.flatnonzero(within(self.xy, prior))
        starts = np.searchsorted(self._keys, wanted, side='left')
        stops = np.searchsorted(self._keys, wanted, side='right')
        spans = [self._order[a:b] for a, b in zip(starts, stops) if b > a]
        if not spans:
            return np.zeros(0, np.int64)
        candidates = np.concatenate(spans)
        return np.sort(candidates[within(self.xy[candidates], prior)])


def within(xy: np.ndarray, prior: PositionPrior) -> np.ndarray:
    """Which positions (K, 2) lie within the prior's radius (NaN: no)."""
    distance = np.hypot(xy[:, 0] - prior.x, xy[:, 1] - prior.y)
    inside: np.ndarray = np.nan_to_num(distance, nan=np.inf) <= prior.radius_m
    return inside
