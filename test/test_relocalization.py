"""The ROS-free relocalization pipeline: single frames and sequences, on a known route."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import synthetic_place, viewed_again

from vpr_ros.database import PlaceDatabase
from vpr_ros.errors import ConfigError, DatabaseError
from vpr_ros.extraction import Descriptors, TorchExtractor
from vpr_ros.mapping import MapBuilder
from vpr_ros.models import load_model
from vpr_ros.priors import PositionPrior
from vpr_ros.relocalization import Relocalizer
from vpr_ros.types import Frame, Pose

ROUTE = 24
SIZE = (60, 80)


@pytest.fixture(scope='module')
def route_map(default_model):
    builder = MapBuilder(default_model, {'keyframes': {'min_distance_m': 0.0}})
    builder.start_traverse()
    for i in range(ROUTE):
        frame = Frame(synthetic_place(i, SIZE), i * 10**8, pose=Pose(5.0 * i, 0.0, 0.0))
        assert builder.offer(frame)
    builder.flush()
    return builder.database


def test_single_frame_hypotheses_are_re_ranked_best_first(default_model, route_map) -> None:
    relocalizer = Relocalizer(default_model, route_map, {'top_k': 8, 'rerank_k': 5})
    result = relocalizer.relocalize(viewed_again(synthetic_place(7, SIZE)))
    assert len(result.hypotheses) == 5
    assert result.best.place_index == 7
    assert result.best.pose == Pose(35.0, 0.0, 0.0)
    scores = [h.rerank_score for h in result.hypotheses]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= h.confidence <= 1.0 for h in result.hypotheses)
    assert result.best.confidence > max(h.confidence for h in result.hypotheses[1:])
    assert {'extract', 'retrieve', 'rerank'} <= set(result.timings)


def test_excluded_places_are_passed_over_and_retrieval_reaches_past_them(
    default_model, route_map
) -> None:
    relocalizer = Relocalizer(
        default_model, route_map, {'mode': 'single', 'top_k': 4, 'rerank_k': 2}
    )
    query = viewed_again(synthetic_place(7, SIZE))
    exclude = np.zeros(ROUTE, bool)
    exclude[[7, *relocalizer.relocalize(query).candidates[1:3]]] = True
    described = relocalizer.describe(query)
    result = relocalizer.relocalize_described(query, described, exclude=exclude)
    assert len(result.candidates) == 4  # still top_k, from further down the ranking
    assert not exclude[result.candidates].any()
    assert all(not exclude[h.place_index] for h in result.hypotheses)


def test_without_re_ranking_the_global_similarity_orders(default_model, route_map) -> None:
    relocalizer = Relocalizer(
        default_model, route_map, {'mode': 'single', 'top_k': 6, 'rerank_k': 0}
    )
    result = relocalizer.relocalize(viewed_again(synthetic_place(3, SIZE)))
    assert len(result.hypotheses) == 6
    scores = [h.global_score for h in result.hypotheses]
    assert scores == sorted(scores, reverse=True)
    assert np.isnan(result.best.rerank_score)


def test_a_position_prior_keeps_the_answer_within_its_radius(default_model, route_map) -> None:
    relocalizer = Relocalizer(
        default_model, route_map, {'mode': 'single', 'top_k': 8, 'rerank_k': 5}
    )
    image = viewed_again(synthetic_place(7, SIZE))
    assert relocalizer.relocalize(image).best.place_index == 7
    # The robot says it is near place 15 (75 m): place 7 (35 m) is out of reach.
    near = PositionPrior(75.0, 0.0, radius_m=12.0)
    result = relocalizer.relocalize(image, prior=near)
    assert {h.place_index for h in result.hypotheses} <= {13, 14, 15, 16, 17}
    assert len(result.hypotheses) == 5
    # The place filter (the default mode) keeps its belief inside the prior too.
    tracking = Relocalizer(default_model, route_map)
    assert tracking.relocalize(image).best.place_index == 7
    answer = tracking.relocalize(image, prior=near)
    assert all(13 <= h.place_index <= 17 for h in answer.hypotheses)


def test_another_models_map_is_refused(route_map) -> None:
    other = load_model('efficientnet_lite0_gem', {'weights': None})
    with pytest.raises(DatabaseError, match='built with'):
        Relocalizer(other, route_map)


def test_sequence_mode_locks_on_to_the_route_and_is_confident(default_model, route_map) -> None:
    relocalizer = Relocalizer(default_model, route_map, {'mode': 'sequence'})
    results = [
        relocalizer.relocalize(viewed_again(synthetic_place(i, SIZE))) for i in range(4, 4 + 12)
    ]
    late = results[6:]
    assert all(abs(r.best.place_index - (4 + 6 + k)) <= 1 for k, r in enumerate(late))
    assert all(r.best.confidence >= 0.6 for r in late)
    # The sequence score is carried in rerank_score; confidence is 0 for all but the best.
    assert all(h.confidence == 0.0 for h in late[-1].hypotheses[1:])


def test_sequence_mode_does_not_accept_a_route_outside_the_map(default_model, route_map) -> None:
    relocalizer = Relocalizer(default_model, route_map, {'mode': 'sequence'})
    confidences = [
        relocalizer.relocalize(synthetic_place(500 + i, SIZE)).best.confidence for i in range(15)
    ]
    assert max(confidences[5:]) < 0.6


def test_each_camera_stream_has_its_own_sequence(default_model, route_map) -> None:
    relocalizer = Relocalizer(default_model, route_map, {'mode': 'sequence'})
    for i in range(8):
        relocalizer.relocalize(viewed_again(synthetic_place(i, SIZE)), stream='front')
    fresh = relocalizer.relocalize(viewed_again(synthetic_place(20, SIZE)), stream='rear')
    tracked = relocalizer.relocalize(viewed_again(synthetic_place(8, SIZE)), stream='front')
    assert tracked.best.place_index == 8
    assert tracked.best.confidence > fresh.best.confidence


def test_sequence_mode_on_pixels_needs_a_map_with_sequence_descriptors(default_model) -> None:
    builder = MapBuilder(default_model, {'sequence_descriptors': False})
    builder.offer(Frame(synthetic_place(0, SIZE), 0, pose=Pose(0, 0, 0)))
    builder.flush()
    with pytest.raises(ConfigError, match='sequence descriptors'):
        Relocalizer(default_model, builder.database, {'mode': 'sequence'})
    # With the model's global descriptors it works on any map.
    Relocalizer(
        default_model, builder.database, {'mode': 'sequence', 'sequence': {'descriptor': 'global'}}
    )


def test_one_place_without_a_pose_does_not_hide_the_others_poses(default_model, route_map) -> None:
    places = route_map.places.copy()
    places['x'][0] = np.nan  # e.g. appended from a bag without a pose topic
    database = PlaceDatabase(
        route_map.model, route_map.global_descriptors, places, route_map.local_features
    )
    for mode in ('single', 'sequence'):
        relocalizer = Relocalizer(
            default_model, database, {'mode': mode, 'sequence': {'descriptor': 'global'}}
        )
        result = relocalizer.relocalize(viewed_again(synthetic_place(9, SIZE)))
        assert result.best.place_index == 9
        assert result.best.pose == Pose(45.0, 0.0, 0.0)
        unknown = relocalizer.relocalize(viewed_again(synthetic_place(0, SIZE)))
        assert all(h.pose is None for h in unknown.hypotheses if h.place_index == 0)


def test_a_verifier_re_scores_the_best_re_ranked_places_and_publishes_them(
    default_model, route_map
) -> None:
    query = viewed_again(synthetic_place(7, SIZE))
    plain = Relocalizer(
        default_model, route_map, {'mode': 'single', 'top_k': 8, 'rerank_k': 6}
    ).relocalize(query)
    conf = {'mode': 'single', 'top_k': 8, 'rerank_k': 6, 'verifier': 'mnn_ransac', 'verify_k': 2}
    result = Relocalizer(default_model, route_map, conf).relocalize(query)
    assert len(result.hypotheses) == 2 and result.best.place_index == 7
    assert all(h.inliers >= 0 for h in result.hypotheses)
    assert result.best.inliers > result.hypotheses[1].inliers
    # The verified places are the best two by MNN; the rest follow in MNN order.
    mnn_order = [h.place_index for h in plain.hypotheses]
    assert {h.place_index for h in result.hypotheses} == set(mnn_order[:2])
    assert result.candidates[:6].tolist() == mnn_order
    assert {'rerank', 'verify'} <= set(result.timings)


def test_verifier_settings_and_maps_are_checked_before_any_network_loads(
    default_model, route_map
) -> None:
    with pytest.raises(ConfigError, match=r'verify_k must be in 1..rerank_k \(4\)'):
        Relocalizer(default_model, route_map, {'rerank_k': 4, 'verifier': 'mnn', 'verify_k': 5})
    with pytest.raises(DatabaseError, match='--verifiers aliked_lightglue'):
        Relocalizer(default_model, route_map, {'verifier': 'aliked_lightglue'})


class CountingExtractor(TorchExtractor):
    """The real torch extractor, counting the images it describes."""

    def __init__(self, model) -> None:
        super().__init__(model, batch_size=1)
        self.described = 0

    def extract(self, images) -> Descriptors:
        self.described += len(images)
        return super().extract(images)


def test_sequence_matching_on_pixels_never_runs_the_model(default_model, route_map) -> None:
    counting = CountingExtractor(default_model)
    relocalizer = Relocalizer(counting, route_map, {'mode': 'sequence'})
    assert not relocalizer.describes
    for i in range(6, 14):
        result = relocalizer.relocalize(viewed_again(synthetic_place(i, SIZE)))
    assert counting.described == 0
    assert result.best.place_index == 13
    assert all(np.isnan(h.global_score) for h in result.hypotheses)
    assert 'extract' not in result.timings


def test_sequence_matching_on_global_descriptors_runs_the_model_per_frame(
    default_model, route_map
) -> None:
    counting = CountingExtractor(default_model)
    conf = {'mode': 'sequence', 'sequence': {'descriptor': 'global'}}
    relocalizer = Relocalizer(counting, route_map, conf)
    for i in range(6, 14):
        result = relocalizer.relocalize(viewed_again(synthetic_place(i, SIZE)))
    assert counting.described == 8
    assert np.isfinite(result.best.global_score)


def test_single_frame_matching_describes_each_frame_once(default_model, route_map) -> None:
    counting = CountingExtractor(default_model)
    relocalizer = Relocalizer(counting, route_map, {'top_k': 8, 'rerank_k': 5})
    relocalizer.relocalize(viewed_again(synthetic_place(7, SIZE)))
    assert counting.described == 1
    assert relocalizer.image_size == default_model.preprocessing.size
