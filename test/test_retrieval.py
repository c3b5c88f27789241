"""Retrieval: every faiss index kind finds planted matches; the index follows its settings."""

from __future__ import annotations

import numpy as np
import pytest

from vpr_ros.errors import ConfigError
from vpr_ros.retrieval import FaissIndex, IndexConf, make_index


def unit_rows(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((count, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize('kind', ['flat', 'hnsw'])
def test_each_index_kind_ranks_the_planted_match_first(kind: str) -> None:
    rng = np.random.default_rng(0)
    places = unit_rows(rng, 500, 32)
    index = make_index(IndexConf(type=kind), places)
    queries = places[[3, 250, 499]] + 0.01 * rng.standard_normal((3, 32)).astype(np.float32)
    scores, ids = index.search(queries, 5)
    assert ids[:, 0].tolist() == [3, 250, 499]
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first


def test_asking_for_more_than_the_map_holds_pads_with_minus_one() -> None:
    index = make_index(IndexConf(), unit_rows(np.random.default_rng(1), 3, 8))
    scores, ids = index.search(np.ones(8, np.float32), 5)
    assert ids[0, 3:].tolist() == [-1, -1] and np.isneginf(scores[0, 3:]).all()


def test_an_empty_index_answers_nothing() -> None:
    index = make_index(IndexConf(), np.zeros((0, 8), np.float32))
    scores, ids = index.search(np.ones((2, 8), np.float32), 3)
    assert (ids == -1).all() and np.isneginf(scores).all()


def test_an_approximate_index_grown_place_by_place_is_trained_when_finalized(tmp_path) -> None:
    rng = np.random.default_rng(2)
    places = unit_rows(rng, 2000, 32)
    index = make_index(IndexConf(type='ivfpq', ivf_nlist=8, pq_m=4), places[:0])
    for start in range(0, len(places), 500):
        index.add(places[start : start + 500])
    assert index.exact and index.faiss_index is None  # exact until it can be trained
    index.finalize()
    assert 'IVF' in type(index.faiss_index).__name__ and index.ntotal == 2000
    files = {name: (tmp_path / name).read_bytes() for name in index.write(tmp_path)}
    again = FaissIndex.read(index.conf, index.state(), files, index.descriptors, tmp_path)
    assert again.ntotal == 2000 and again.dim == 32 and not again.exact


def test_ivfpq_on_too_few_places_falls_back_to_exact_search() -> None:
    places = unit_rows(np.random.default_rng(3), 50, 16)
    index = make_index(IndexConf(type='ivfpq'), places)
    assert index.exact and index.faiss_index is None
    assert index.search(places[7], 1)[1][0, 0] == 7


def test_unknown_index_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match='type must be one of'):
        IndexConf.from_dict({'type': 'lsh'})
