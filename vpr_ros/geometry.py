"""Pose tracks, interpolation, local ENU coordinates from GNSS fixes and small pose helpers.

Stamps are int nanoseconds, positions metres, quaternions ``(x, y, z, w)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeAlias

import numpy as np
from scipy.spatial.transform import Rotation, Slerp

from vpr_ros.types import Pose

# WGS84 ellipsoid
_WGS84_A = 6378137.0
_WGS84_F = 1.0 / 298.257223563
_WGS84_E2 = _WGS84_F * (2.0 - _WGS84_F)

PositionLike: TypeAlias = 'Pose | Sequence[float] | np.ndarray'
QuaternionLike: TypeAlias = 'Pose | Sequence[float] | np.ndarray'


class PoseTrack:
    """A time-ordered sequence of poses that can be interpolated at arbitrary stamps.

    Positions are interpolated linearly and orientations by spherical linear interpolation
    (``scipy.spatial.transform.Slerp``) between the two samples that bracket a stamp.
    Samples with a duplicate stamp keep the first one.

    Args:
        stamps_ns: Sample stamps, int nanoseconds, shape (N,), any order.
        positions: Positions in metres, shape (N, 3).
        quaternions: Orientations as ``(x, y, z, w)``, shape (N, 4); normalised here.

    Raises:
        ValueError: Mismatched shapes, or a quaternion of zero (or non-finite) norm.
    """

    def __init__(
        self,
        stamps_ns: Sequence[int] | np.ndarray,
        positions: Sequence[Sequence[float]] | np.ndarray,
        quaternions: Sequence[Sequence[float]] | np.ndarray,
    ) -> None:
        stamps = np.asarray(stamps_ns, dtype=np.int64).reshape(-1)
        pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
        quat = np.asarray(quaternions, dtype=np.float64).reshape(-1, 4)
        if not len(stamps) == len(pos) == len(quat):
            msg = (
                f'stamps_ns, positions and quaternions must have the same length, got '
                f'{len(stamps)}, {len(pos)} and {len(quat)}'
            )
            raise ValueError(msg)
        norms = np.linalg.norm(quat, axis=1)
        if len(norms) and not np.all(np.isfinite(norms) & (norms > 1e-9)):
            bad = int(np.flatnonzero(~(np.isfinite(norms) & (norms > 1e-9)))[0])
            msg = (
                f'quaternion {quat[bad].tolist()!r} at index {bad} has no valid norm; '
                'use (0, 0, 0, 1) for an unknown orientation'
            )
            raise ValueError(msg)
        order = np.argsort(stamps, kind='stable')
        stamps, pos, quat = stamps[order], pos[order], quat[order] / norms[order, None]
        keep = np.ones(len(stamps), dtype=bool)
        keep[1:] = stamps[1:] != stamps[:-1]
        self.stamps_ns: np.ndarray = stamps[keep]
        self.positions: np.ndarray = pos[keep]
        self.quaternions: np.ndarray = quat[keep]
        self._slerp: Slerp | None = None
        if len(self.stamps_ns) >= 2:
            rel = (self.stamps_ns - self.stamps_ns[0]).astype(np.float64)
            self._slerp = Slerp(rel, Rotation.from_quat(self.quaternions))

    def __len__(self) -> int:
        return len(self.stamps_ns)

    def interpolate_many(
        self, stamps_ns: Sequence[int] | np.ndarray, max_gap_ns: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Interpolate the track at many stamps at once.

        Args:
            stamps_ns: Query stamps, int nanoseconds, shape (M,).
            max_gap_ns: Largest allowed distance in time between the two bracketing samples;
                ``None`` for no limit. A stamp that hits a sample exactly is always valid.

        Returns:
            ``(positions (M, 3), quaternions (M, 4), valid (M,) bool)``. Rows that are not
            valid (stamp outside the track, or bracketing samples too far apart) are NaN.
        """
        query = np.asarray(stamps_ns, dtype=np.int64).reshape(-1)
        positions = np.full((len(query), 3), np.nan)
        quaternions = np.full((len(query), 4), np.nan)
        valid = np.zeros(len(query), dtype=bool)
        n = len(self.stamps_ns)
        if n == 0 or len(query) == 0:
            return positions, quaternions, valid

        lower = np.searchsorted(self.stamps_ns, query, side='right') - 1
        inside = lower >= 0
        exact = inside & (self.stamps_ns[np.clip(lower, 0, n - 1)] == query)
        between = inside & ~exact & (lower < n - 1)
        if max_gap_ns is not None and n >= 2:
            gaps = np.diff(self.stamps_ns)[np.clip(lower, 0, n - 2)]
            between &= gaps <= max_gap_ns
        valid = exact | between

        hit = lower[exact]
        positions[exact] = self.positions[hit]
        quaternions[exact] = self.quaternions[hit]
        if np.any(between):
            i0 = lower[between]
            t0, t1 = self.stamps_ns[i0], self.stamps_ns[i0 + 1]
            frac = ((query[between] - t0) / (t1 - t0))[:, None]
            positions[between] = (1.0 - frac) * self.positions[i0] + frac * self.positions[i0 + 1]
            assert self._slerp is not None
            rel = (query[between] - self.stamps_ns[0]).astype(np.float64)
            quaternions[between] = self._slerp(rel).as_quat()
        return positions, quaternions, valid

    def interpolate(self, stamp_ns: int, max_gap_ns: int | None = None) -> Pose | None:
        """Interpolate the track at one stamp.

        Args:
            stamp_ns: Query stamp, int nanoseconds.
            max_gap_ns: Largest allowed distance in time between the two bracketing samples;
                ``None`` for no limit. A stamp that hits a sample exactly is always valid.

        Returns:
            The interpolated pose, or ``None`` if the stamp is outside the track or the
            bracketing samples are more than ``max_gap_ns`` apart.
        """
        positions, quaternions, valid = self.interpolate_many([stamp_ns], max_gap_ns)
        if not valid[0]:
            return None
        return Pose(*positions[0].tolist(), *quaternions[0].tolist())


def _geodetic_to_ecef(lat_deg: np.ndarray, lon_deg: np.ndarray, alt_m: np.ndarray) -> np.ndarray:
    lat, lon = np.radians(lat_deg), np.radians(lon_deg)
    sin_lat = np.sin(lat)
    n = _WGS84_A / np.sqrt(1.0 - _WGS84_E2 * sin_lat**2)
    return np.stack(
        [
            (n + alt_m) * np.cos(lat) * np.cos(lon),
            (n + alt_m) * np.cos(lat) * np.sin(lon),
            (n * (1.0 - _WGS84_E2) + alt_m) * sin_lat,
        ],
        axis=-1,
    )


def _ecef_to_geodetic(ecef: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, y, z = ecef[..., 0], ecef[..., 1], ecef[..., 2]
    lon = np.arctan2(y, x)
    p = np.hypot(x, y)
    lat = np.arctan2(z, p * (1.0 - _WGS84_E2))
    for _ in range(6):  # converges to < 1 mm after 3 iterations near the surface
        sin_lat = np.sin(lat)
        n = _WGS84_A / np.sqrt(1.0 - _WGS84_E2 * sin_lat**2)
        alt = p * np.cos(lat) + (z + _WGS84_E2 * n * sin_lat) * sin_lat - n
        lat = np.arctan2(z, p * (1.0 - _WGS84_E2 * n / (n + alt)))
    sin_lat = np.sin(lat)
    n = _WGS84_A / np.sqrt(1.0 - _WGS84_E2 * sin_lat**2)
    alt = p * np.cos(lat) + (z + _WGS84_E2 * n * sin_lat) * sin_lat - n
    return np.degrees(lat), np.degrees(lon), alt


class LocalTangentPlane:
    """A local East-North-Up (ENU) frame in metres, tangent to the WGS84 ellipsoid at an origin.

    Converts ``sensor_msgs/NavSatFix`` latitude/longitude/altitude to local metric coordinates
    (through Earth-centred, Earth-fixed coordinates) and back. Accurate to millimetres within a
    few kilometres of the origin.

    Args:
        lat0: Origin latitude in degrees.
        lon0: Origin longitude in degrees.
        alt0: Origin altitude above the ellipsoid in metres.

    Raises:
        ValueError: The origin is not finite or the latitude is outside [-90, 90].
    """

    def __init__(self, lat0: float, lon0: float, alt0: float = 0.0) -> None:
        if not np.all(np.isfinite([lat0, lon0, alt0])) or abs(lat0) > 90.0:
            msg = f'invalid ENU origin (lat, lon, alt) = {(lat0, lon0, alt0)!r}'
            raise ValueError(msg)
        self.origin = (float(lat0), float(lon0), float(alt0))
        lat, lon = np.radians(lat0), np.radians(lon0)
        self._origin_ecef = _geodetic_to_ecef(np.asarray(lat0), np.asarray(lon0), np.asarray(alt0))
        # rows: east, north, up unit vectors in ECEF
        self._rotation = np.array(
            [
                [-np.sin(lon), np.cos(lon), 0.0],
                [-np.sin(lat) * np.cos(lon), -np.sin(lat) * np.sin(lon), np.cos(lat)],
                [np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)],
            ]
        )

    def to_enu(
        self, lat: float | np.ndarray, lon: float | np.ndarray, alt: float | np.ndarray
    ) -> np.ndarray:
        """Convert geodetic coordinates to local ENU metres.

        Args:
            lat: Latitude(s) in degrees.
            lon: Longitude(s) in degrees.
            alt: Altitude(s) above the ellipsoid in metres.

        Returns:
            ``(east, north, up)`` with shape (3,) for scalars or (N, 3) for arrays.
        """
        ecef = _geodetic_to_ecef(
            np.asarray(lat, dtype=np.float64),
            np.asarray(lon, dtype=np.float64),
            np.asarray(alt, dtype=np.float64),
        )
        enu: np.ndarray = (ecef - self._origin_ecef) @ self._rotation.T
        return enu

    def to_geodetic(
        self, east: float | np.ndarray, north: float | np.ndarray, up: float | np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Convert local ENU metres back to geodetic coordinates (inverse of :meth:`to_enu`).

        Args:
            east: East offset(s) in metres.
            north: North offset(s) in metres.
            up: Up offset(s) in metres.

        Returns:
            ``(lat_deg, lon_deg, alt_m)``, each a scalar array or shape (N,).
        """
        enu = np.stack(
            np.broadcast_arrays(
                np.asarray(east, dtype=np.float64),
                np.asarray(north, dtype=np.float64),
                np.asarray(up, dtype=np.float64),
            ),
            axis=-1,
        )
        return _ecef_to_geodetic(enu @ self._rotation + self._origin_ecef)


def _position(p: PositionLike) -> np.ndarray:
    if isinstance(p, Pose):
        return np.array([p.x, p.y, p.z])
    return np.asarray(p, dtype=np.float64).reshape(-1)[:3]


def _quaternion(q: QuaternionLike) -> np.ndarray:
    if isinstance(q, Pose):
        return np.array([q.qx, q.qy, q.qz, q.qw])
    return np.asarray(q, dtype=np.float64).reshape(4)


def distance_m(p1: PositionLike, p2: PositionLike) -> float:
    """Euclidean distance in metres between two positions (``Pose`` or ``(x, y, z)``)."""
    return float(np.linalg.norm(_position(p1) - _position(p2)))


def rotation_angle_deg(q1: QuaternionLike, q2: QuaternionLike) -> float:
    """Angle in degrees (0..180) of the rotation between two orientations.

    Args:
        q1: A ``Pose`` or a quaternion ``(x, y, z, w)``; need not be normalised.
        q2: Same as ``q1``.

    Returns:
        The magnitude of ``q1^-1 * q2`` in degrees.
    """
    r1 = Rotation.from_quat(_quaternion(q1))
    r2 = Rotation.from_quat(_quaternion(q2))
    return float(np.degrees((r1.inv() * r2).magnitude()))


def rigid_transform(
    translation: Sequence[float], yaw_deg: float = 0.0
) -> Callable[[np.ndarray], np.ndarray]:
    """A function moving (K, 7) poses x y z qx qy qz qw by a rotation of ``yaw_deg`` about
    z followed by ``translation`` (x y z, metres); NaN poses stay NaN, and a pose without
    orientation keeps none."""
    rotation = Rotation.from_euler('z', float(yaw_deg), degrees=True)
    shift = np.asarray(translation, np.float64).reshape(3)

    def move(poses: np.ndarray) -> np.ndarray:
        poses = np.asarray(poses, np.float64).reshape(-1, 7)
        out = poses.copy()
        out[:, :3] = rotation.apply(np.nan_to_num(poses[:, :3])) + shift
        out[np.isnan(poses[:, 0]), :3] = np.nan
        oriented = np.isfinite(poses[:, 3:]).all(axis=1) & (
            np.linalg.norm(np.nan_to_num(poses[:, 3:]), axis=1) > 0
        )
        if oriented.any():
            out[oriented, 3:] = (rotation * Rotation.from_quat(poses[oriented, 3:])).as_quat()
        return out

    return move
