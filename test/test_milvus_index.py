"""The milvus engine, against Milvus Lite: real collections, filters in the engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vpr_ros.database import PlaceDatabase, place_records
from vpr_ros.models.identity import ModelIdentity
from vpr_ros.priors import PositionPrior
from vpr_ros.types import Frame, Pose

pytest.importorskip('pymilvus')

IDENTITY = ModelIdentity('test_model', 'c0ffee', 'beef', global_dim=32, local_dim=4)
MILVUS = {'backend': 'milvus', 'milvus_index': 'FLAT', 'tile_m': 20.0}


def places(count: int, seed: int, first_id: int = 0, traverse: int = 0):
    rng = np.random.default_rng(seed)
    descriptors = rng.standard_normal((count, IDENTITY.global_dim)).astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    frames = [
        Frame(np.zeros((1, 1, 3), np.uint8), 10**9 * (first_id + i),
              pose=Pose(10.0 * (first_id + i), 0.0, 0.0))
        for i in range(count)
    ]  # fmt: skip
    rows = place_records(frames, first_id=first_id, traverse=traverse)
    return descriptors, rows, rng.standard_normal((count, 6, 4)).astype(np.float32)


def test_a_milvus_map_answers_like_exact_search_and_filters_in_the_engine(
    tmp_path: Path,
) -> None:
    database = PlaceDatabase.empty(IDENTITY, index_conf=MILVUS)
    descriptors, rows, local = places(60, seed=1)
    database.add(descriptors, rows, local)
    assert database.search(descriptors[[7]], 1)[1][0, 0] == 7  # before a save: exact
    database.save(tmp_path / 'map')
    assert (tmp_path / 'map' / 'milvus.db').exists()
    loaded = PlaceDatabase.load(tmp_path / 'map')
    assert type(loaded.index).__name__ == 'MilvusIndex' and loaded.index.inserted == 60
    query = descriptors[[7]] + 0.5 * descriptors[[40]]
    query /= np.linalg.norm(query)
    exact = np.argsort(-(descriptors @ query[0]))[:5]
    scores, ids = loaded.search(query, 5)
    np.testing.assert_array_equal(ids[0], exact)
    np.testing.assert_allclose(scores[0], descriptors[exact] @ query[0], atol=1e-5)
    # Only places within 25 m of x = 400 m (places 38..42): 40 is the best of them.
    near = loaded.search(query, 5, prior=PositionPrior(400.0, 0.0, 25.0))[1][0]
    assert near[0] == 40 and set(near[near >= 0]) <= {38, 39, 40, 41, 42}
    late = loaded.search(query, 3, since_ns=30 * 10**9)[1][0]
    assert (late >= 30).all()
    loaded.index.close()


def test_appending_inserts_only_the_new_traverse_and_filters_by_traverse(
    tmp_path: Path,
) -> None:
    database = PlaceDatabase.empty(IDENTITY, index_conf=MILVUS)
    first = places(30, seed=2)
    database.add(*first)
    database.save(tmp_path / 'map')
    loaded = PlaceDatabase.load(tmp_path / 'map')
    second = places(20, seed=3, first_id=30, traverse=1)
    loaded.add(*second)
    # Not saved yet: the new places are searched exactly beside the collection.
    assert loaded.search(second[0][[4]], 1)[1][0, 0] == 34
    loaded.save(tmp_path / 'map')
    loaded.index.close()
    again = PlaceDatabase.load(tmp_path / 'map')
    assert again.index.inserted == 50
    assert again.search(second[0][[4]], 1)[1][0, 0] == 34
    assert again.search(first[0][[3]], 1)[1][0, 0] == 3
    only_first = again.search(second[0][[4]], 5, traverses=[0])[1][0]
    assert (only_first >= 0).all() and (only_first < 30).all()
    again.index.close()


def test_a_map_whose_collection_is_gone_is_a_clear_error(tmp_path: Path) -> None:
    database = PlaceDatabase.empty(IDENTITY, index_conf=MILVUS)
    database.add(*places(10, seed=4))
    database.save(tmp_path / 'map')
    database.index.close()
    from vpr_ros.errors import DatabaseError

    with pytest.raises(DatabaseError, match="no collection 'elsewhere'; rebuild"):
        PlaceDatabase.load(tmp_path / 'map', index_overrides={'milvus_collection': 'elsewhere'})


def test_the_relocalize_node_answers_through_a_milvus_map(tmp_path: Path, default_model) -> None:
    pytest.importorskip('rclpy')
    from test_relocalize_node import (
        PARAMS,
        build_map,
        next_stamp,
        node_in_this_process,
        place_pose,
        query_image,
        raw_msg,
    )

    from vpr_ros.nodes.conversions import hypotheses_from_cloud

    built = build_map(default_model)
    served = PlaceDatabase(
        built.model,
        built.global_descriptors,
        built.places,
        built.local_features,
        strings=built.strings,
        index_conf={'backend': 'milvus', 'milvus_index': 'FLAT'},
    )
    served.save(tmp_path / 'map')
    served.index.close()  # the node opens Milvus Lite itself
    manifest = PlaceDatabase.read_manifest(tmp_path / 'map')
    assert manifest['index_state']['type'] == 'milvus' and manifest['index_files'] == []
    with node_in_this_process({**PARAMS, 'map_dir': str(tmp_path / 'map')}) as harness:
        for place in (2, 6):
            cloud = harness.ask(harness.raw, raw_msg(query_image(place), next_stamp()))
            hypotheses = hypotheses_from_cloud(cloud)
            assert hypotheses[0].place_id == place
            assert hypotheses[0].pose == place_pose(place)
            assert len(hypotheses) == PARAMS['rerank_k']  # re-ranked locally, in the node
