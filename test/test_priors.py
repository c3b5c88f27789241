"""Position priors: discs in the map frame, tiles, and retrieval restricted to them."""

from __future__ import annotations

import numpy as np
import pytest

from vpr_ros.database import PlaceDatabase, place_records
from vpr_ros.geometry import LocalTangentPlane
from vpr_ros.models.identity import ModelIdentity
from vpr_ros.priors import PositionPrior, TileGrid, within
from vpr_ros.types import Frame, Pose

IDENTITY = ModelIdentity('test_model', 'c0ffee', 'beef', global_dim=32, local_dim=4)


def test_places_within_a_prior_are_exactly_those_a_brute_force_finds() -> None:
    rng = np.random.default_rng(0)
    xy = rng.uniform(-500, 500, (5000, 2))
    xy[::97] = np.nan  # places without a position are never selected
    grid = TileGrid(xy, tile_m=50.0)
    for _ in range(20):
        prior = PositionPrior(*rng.uniform(-550, 550, 2), radius_m=float(rng.uniform(1, 300)))
        expected = np.flatnonzero(np.hypot(*(xy - [prior.x, prior.y]).T) <= prior.radius_m)
        np.testing.assert_array_equal(grid.places_within(prior), expected)
    huge = PositionPrior(0.0, 0.0, radius_m=1e6)  # more tiles than worth listing
    assert len(grid.places_within(huge)) == int(np.isfinite(xy[:, 0]).sum())


def test_the_radius_grows_with_the_covariance_and_has_a_floor() -> None:
    assert PositionPrior.from_covariance(1, 2, None, sigmas=3, min_radius_m=10).radius_m == 10
    wide = PositionPrior.from_covariance(1, 2, np.diag([100.0, 4.0]), sigmas=3, min_radius_m=10)
    assert wide.radius_m == pytest.approx(30.0) and (wide.x, wide.y) == (1.0, 2.0)
    unknown = PositionPrior.from_covariance(
        0, 0, np.full((2, 2), np.nan), sigmas=3, min_radius_m=7
    )
    assert unknown.radius_m == 7


def test_a_navsat_fix_becomes_a_prior_in_the_maps_enu_frame() -> None:
    origin = (48.1, 11.5, 500.0)
    lat, lon, alt = LocalTangentPlane(*origin).to_geodetic(120.0, -40.0, 0.0)
    covariance = [16.0, 0, 0, 0, 16.0, 0, 0, 0, 100.0]
    prior = PositionPrior.from_navsat(lat, lon, alt, covariance, origin, sigmas=3)
    assert (prior.x, prior.y) == pytest.approx((120.0, -40.0), abs=1e-3)
    assert prior.radius_m == pytest.approx(25.0)  # 3 sigma = 12 m < the 25 m floor
    with pytest.raises(ValueError, match='not a fix'):
        PositionPrior.from_navsat(float('nan'), 0, 0, None, origin)


def grid_map(count: int, index: dict) -> tuple[PlaceDatabase, np.ndarray]:
    rng = np.random.default_rng(1)
    descriptors = rng.standard_normal((count, IDENTITY.global_dim)).astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    frames = [
        Frame(
            np.zeros((1, 1, 3), np.uint8), i, pose=Pose(float(i % 100) * 10, (i // 100) * 10.0, 0)
        )
        for i in range(count)
    ]
    database = PlaceDatabase.empty(IDENTITY, with_local=False, index_conf=index)
    database.add(descriptors, place_records(frames))
    return database, descriptors


@pytest.mark.parametrize(
    'index', [{'type': 'flat'}, {'type': 'hnsw'}, {'type': 'ivfpq', 'ivf_nlist': 16, 'pq_m': 8}]
)
def test_search_with_a_prior_returns_only_places_within_it_best_first(tmp_path, index) -> None:
    database, descriptors = grid_map(3_200, index)
    database.save(tmp_path / 'map')
    loaded = PlaceDatabase.load(tmp_path / 'map')
    assert loaded.index.exact == (index['type'] == 'flat')
    prior = PositionPrior(500.0, 300.0, radius_m=60.0)
    query = descriptors[[1234]] + 0.8 * descriptors[[30 * 100 + 50]]
    query /= np.linalg.norm(query)
    scores, ids = loaded.search(query, 10, prior=prior)
    xy = np.stack([loaded.places['x'], loaded.places['y']], axis=1)
    assert (ids >= 0).all() and within(xy[ids[0]], prior).all()
    assert ids[0, 0] == 3050  # the place at (500, 300) is the best one within reach
    assert (np.diff(scores[0]) <= 1e-6).all()
    np.testing.assert_allclose(scores[0], descriptors[ids[0]] @ query[0], atol=1e-5)  # exact
    unrestricted = loaded.search(query, 1)[1][0, 0]
    assert unrestricted == 1234  # outside the prior: it only wins without one
