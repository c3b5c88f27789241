"""Place evidence: single-frame ordering and confidences, hypotheses built from the map."""

from __future__ import annotations

import numpy as np

from vpr_ros.database import PLACE_DTYPE, PlaceDatabase
from vpr_ros.evidence import Observation, SingleFrameEvidence, confidences, make_hypotheses
from vpr_ros.models.identity import ModelIdentity
from vpr_ros.relocalization import RelocalizationConf
from vpr_ros.rerankers.mnn import mnn_scores


def unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def small_map(count: int, dim: int = 8) -> PlaceDatabase:
    rng = np.random.default_rng(0)
    identity = ModelIdentity('test', 'c', 'w', global_dim=dim, local_dim=dim)
    places = np.zeros(count, PLACE_DTYPE)
    places['place_id'] = np.arange(count) + 100
    for key in ('x', 'y', 'z', 'qx', 'qy', 'qz'):
        places[key] = 0.0
    places['qw'] = 1.0
    places['x'] = 20.0 * np.arange(count)  # far apart: every candidate competes
    return PlaceDatabase(identity, unit(rng, count, dim), places, unit(rng, count, 6, dim))


def test_single_frame_evidence_orders_by_rerank_score_and_breaks_ties_by_global_score() -> None:
    rng = np.random.default_rng(3)
    query = unit(rng, 6, 8)
    half = np.concatenate([query[:3], unit(rng, 3, 8)])
    candidates = np.stack([unit(rng, 6, 8), query, half, query.copy()])
    global_scores = np.array([0.95, 0.4, 0.9, 0.7], np.float32)
    indices = np.array([10, 11, 12, 13])
    scores = mnn_scores(query, candidates)
    assert scores[1] == scores[3] == 1.0 and scores[2] < 1.0
    database = small_map(14)
    evidence = SingleFrameEvidence(database, RelocalizationConf(top_k=4, rerank_k=4))

    hypotheses = evidence.update(Observation(0, indices, global_scores, scores))

    expected = sorted(range(4), key=lambda i: (-scores[i], -global_scores[i]))
    assert [h.place_index for h in hypotheses] == [int(indices[i]) for i in expected]
    # The two perfect candidates tie on the re-ranking score: the higher global score first.
    assert [h.place_index for h in hypotheses[:2]] == [13, 11]
    assert [h.place_id for h in hypotheses[:2]] == [113, 111]
    assert hypotheses[0].pose is not None and hypotheses[0].pose.x == 20.0 * 13


def test_single_frame_evidence_without_re_ranking_keeps_the_retrieval_order() -> None:
    database = small_map(5)
    evidence = SingleFrameEvidence(database, RelocalizationConf(top_k=3, rerank_k=0))
    hypotheses = evidence.update(
        Observation(0, np.array([4, 1, 2]), np.array([0.9, 0.5, 0.2], np.float32))
    )
    assert [h.place_index for h in hypotheses] == [4, 1, 2]
    assert all(np.isnan(h.rerank_score) for h in hypotheses)
    assert hypotheses[0].confidence > hypotheses[1].confidence


def test_confidence_is_the_margin_over_the_best_competitor_beyond_the_radius() -> None:
    scores = np.array([0.8, 0.6, 0.4])
    positions = np.array([[0.0, 0, 0], [5.0, 0, 0], [50.0, 0, 0]])
    near = confidences(scores, positions, competitor_radius_m=10.0, noise_floor=0.05)
    # Place 1 is within 10 m of place 0: it agrees; place 2 is the competitor.
    np.testing.assert_allclose(near[0], (0.8 - 0.4) / 0.8, rtol=1e-6)
    everywhere = confidences(scores, None, noise_floor=0.05)
    np.testing.assert_allclose(everywhere[0], (0.8 - 0.6) / 0.8, rtol=1e-6)
    lonely = confidences(np.array([0.04]), None, noise_floor=0.05)
    assert lonely[0] == 0.0  # below the noise floor


def test_hypotheses_of_places_without_a_pose_have_none() -> None:
    database = small_map(3)
    database.places['x'][1] = np.nan
    hypotheses = make_hypotheses(database, [1, 2], [0.5, 0.4], None, [0.3, 0.1])
    assert hypotheses[0].pose is None and hypotheses[1].pose is not None
    assert np.isnan(hypotheses[0].rerank_score)
