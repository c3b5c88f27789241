"""The place filter on generated routes: convergence, kidnaps, off-map, fusion, odometry."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from vpr_ros.database import PLACE_DTYPE, PlaceDatabase
from vpr_ros.evidence import FilterEvidence, Observation
from vpr_ros.models.identity import ModelIdentity
from vpr_ros.place_filter import FilterConf, PlaceFilter
from vpr_ros.relocalization import RelocalizationConf

SPACING_M = 3.0
NUM_PLACES = 80


def route_descriptors(rng: np.random.Generator, count: int, dim: int = 32) -> np.ndarray:
    """Descriptors that change smoothly along a route, as images of a drive do."""
    walk = np.cumsum(rng.standard_normal((count, dim)), axis=0)
    walk += 4.0 * rng.standard_normal((count, dim))
    walk -= walk.mean(axis=0)
    return (walk / np.linalg.norm(walk, axis=1, keepdims=True)).astype(np.float32)


def seen_again(
    rng: np.random.Generator, descriptors: np.ndarray, noise: float = 0.04
) -> np.ndarray:
    """The same places under another condition: the descriptors, perturbed."""
    noisy = descriptors + noise * rng.standard_normal(descriptors.shape)
    return (noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32)


def varying_speed_walk(count: int, rng: np.random.Generator) -> np.ndarray:
    """Fractional place positions: stops, slow stretches and fast ones."""
    speeds = np.concatenate(
        [
            np.full(8, 1.0),
            np.zeros(6),  # a stop
            np.full(10, 0.5),
            np.full(8, 2.0),
            np.zeros(4),
            np.full(30, 1.0),
        ]
    )
    positions = np.cumsum(speeds) + 2.0
    return np.minimum(positions + 0.1 * rng.standard_normal(len(positions)), count - 1)


def make_filter(descriptors: dict[str, np.ndarray], **overrides: object) -> PlaceFilter:
    count = len(next(iter(descriptors.values())))
    xyz = np.zeros((count, 3))
    xyz[:, 0] = SPACING_M * np.arange(count)
    return PlaceFilter(
        descriptors,
        np.zeros(count, np.int64),
        xyz,
        FilterConf.from_dict(overrides),
        competitor_radius_m=5.0,
    )


def interpolate(descriptors: np.ndarray, position: float) -> np.ndarray:
    low = int(np.floor(position))
    high = min(low + 1, len(descriptors) - 1)
    weight = position - low
    mixed = (1 - weight) * descriptors[low] + weight * descriptors[high]
    return mixed / np.linalg.norm(mixed)


def test_the_belief_converges_on_a_route_walked_at_varying_speed_with_stops() -> None:
    rng = np.random.default_rng(1)
    places = route_descriptors(rng, NUM_PLACES)
    queries = seen_again(rng, places, noise=0.05)
    walk = varying_speed_walk(NUM_PLACES, rng)
    place_filter = make_filter({'global': places})
    errors, confidences = [], []
    for position in walk:
        place_filter.update({'global': interpolate(queries, position)})
        best, confidence = place_filter.best_places(1)
        errors.append(abs(int(best[0]) - position))
        confidences.append(confidence[0])
    later = np.array(errors[10:])
    assert np.mean(later <= 1.5) >= 0.95  # within the spacing of the truth
    assert np.mean(confidences[10:]) > 0.7  # and sure of it


def test_the_filter_recovers_after_a_kidnap() -> None:
    rng = np.random.default_rng(2)
    places = route_descriptors(rng, NUM_PLACES)
    queries = seen_again(rng, places, noise=0.05)
    place_filter = make_filter({'global': places})
    for index in range(5, 25):
        place_filter.update({'global': queries[index]})
    assert abs(int(place_filter.best_places(1)[0][0]) - 24) <= 1
    recovered_after = None
    for frame, index in enumerate(range(55, 75)):  # carried to another part of the route
        place_filter.update({'global': queries[index]})
        if abs(int(place_filter.best_places(1)[0][0]) - index) <= 1 and recovered_after is None:
            recovered_after = frame
    assert recovered_after is not None and recovered_after <= 6
    assert abs(int(place_filter.best_places(1)[0][0]) - 74) <= 1


def test_an_unvisited_route_is_off_the_map_and_never_accepted() -> None:
    rng = np.random.default_rng(3)
    places = route_descriptors(rng, NUM_PLACES)
    elsewhere = route_descriptors(np.random.default_rng(99), 120)
    place_filter = make_filter({'global': places})
    best_confidence = 0.0
    off_map = []
    for query in elsewhere:
        state = place_filter.update({'global': query})
        best_confidence = max(best_confidence, float(place_filter.best_places(1)[1][0]))
        off_map.append(state.off_map)
    assert best_confidence < 0.5
    assert np.median(off_map) > 0.5


def run_route(descriptors: dict[str, np.ndarray], queries: dict[str, np.ndarray]) -> float:
    place_filter = make_filter(descriptors)
    hits = []
    for index in range(len(next(iter(queries.values())))):
        place_filter.update({name: values[index] for name, values in queries.items()})
        hits.append(abs(int(place_filter.best_places(1)[0][0]) - index) <= 1)
    return float(np.mean(hits))


@pytest.mark.parametrize('seed', [4, 5, 6])
def test_fusing_a_pure_noise_source_is_never_worse_than_the_best_source(seed: int) -> None:
    rng = np.random.default_rng(seed)
    places = route_descriptors(rng, NUM_PLACES)
    queries = seen_again(rng, places, noise=0.08)
    noise_map = route_descriptors(rng, NUM_PLACES)
    noise_queries = route_descriptors(rng, NUM_PLACES)  # unrelated to the places
    alone = run_route({'global': places}, {'global': queries})
    fused = run_route(
        {'global': places, 'patch': noise_map}, {'global': queries, 'patch': noise_queries}
    )
    assert alone >= 0.8
    assert fused >= alone - 0.0125  # at most one frame in 80
    place_filter = make_filter({'global': places, 'patch': noise_map}, patch_weight=1.0)
    for index in range(NUM_PLACES):
        place_filter.update({'global': queries[index], 'patch': noise_queries[index]})
    assert place_filter.signal('patch') < 0.5 * place_filter.signal('global')


def test_odometry_moves_the_belief_and_gaps_or_disorder_fall_back_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rng = np.random.default_rng(7)
    places = route_descriptors(rng, NUM_PLACES)
    queries = seen_again(rng, places, noise=0.05)
    place_filter = make_filter({'global': places})
    caplog.set_level(logging.WARNING, logger='vpr_ros.place_filter')
    stamp = 0.0
    for index in range(5, 60):
        stamp += 0.5
        odometry = np.array([SPACING_M * index, 0.0, 0.0])
        if 30 <= index < 36:
            place_filter.note_odometry_gap()  # the odometry stopped for a while
            odometry = None
        if index == 45:  # one frame arrives late
            place_filter.update({'global': queries[index]}, stamp=stamp - 5.0)
        state = place_filter.update({'global': queries[index]}, odometry_xyz=odometry, stamp=stamp)
        assert state.used_odometry == (odometry is not None and index not in (5, 36))
        assert abs(int(place_filter.best_places(1)[0][0]) - index) <= 1 or index < 10
    messages = ' '.join(record.getMessage() for record in caplog.records)
    assert 'odometry gap' in messages
    assert 'out of order' in messages


def test_odometry_alone_carries_the_belief_through_frames_that_show_nothing() -> None:
    rng = np.random.default_rng(8)
    places = route_descriptors(rng, NUM_PLACES)
    queries = seen_again(rng, places, noise=0.05)
    blank = route_descriptors(np.random.default_rng(50), NUM_PLACES)  # a dark tunnel
    place_filter = make_filter({'global': places})
    for index in range(5, 20):
        place_filter.update(
            {'global': queries[index]}, odometry_xyz=np.array([SPACING_M * index, 0.0, 0.0])
        )
    for index in range(20, 26):
        place_filter.update(
            {'global': blank[index]}, odometry_xyz=np.array([SPACING_M * index, 0.0, 0.0])
        )
    assert abs(int(place_filter.best_places(1)[0][0]) - 25) <= 2


def small_route_map(descriptors: np.ndarray) -> PlaceDatabase:
    count, dim = descriptors.shape
    identity = ModelIdentity('test', 'c', 'w', global_dim=dim, local_dim=dim)
    places = np.zeros(count, PLACE_DTYPE)
    places['place_id'] = np.arange(count)
    places['qw'] = 1.0
    places['x'] = SPACING_M * np.arange(count)
    local = np.repeat(descriptors[:, None, :], 4, axis=1)
    return PlaceDatabase(identity, descriptors, places, local)


def test_two_cameras_update_one_belief() -> None:
    rng = np.random.default_rng(9)
    places = route_descriptors(rng, NUM_PLACES)
    front = seen_again(rng, places, noise=0.12)
    rear = seen_again(rng, places, noise=0.12)
    database = small_route_map(places)
    conf = RelocalizationConf.from_dict({'rerank_k': 0, 'competitor_radius_m': 5.0})
    evidence = FilterEvidence(database, conf)
    one_camera = FilterEvidence(database, conf)
    both_right = one_right = 0
    for index in range(3, 40):
        for stream, query in (('front', front[index]), ('rear', rear[index])):
            observation = Observation(
                stream=stream,
                candidates=np.zeros(0, np.int64),
                global_scores=np.zeros(0),
                global_descriptor=query,
            )
            hypotheses = evidence.update(observation)
        both_right += abs(hypotheses[0].place_index - index) <= 1
        nothing_retrieved = (np.zeros(0, np.int64), np.zeros(0))
        single = one_camera.update(
            Observation('front', *nothing_retrieved, global_descriptor=front[index])
        )
        one_right += abs(single[0].place_index - index) <= 1
    # Both cameras' evidence lands on the same belief: it is at least as right, and surer.
    assert both_right >= one_right
    assert evidence.filter.state is not None and one_camera.filter.state is not None
    assert hypotheses[0].confidence >= single[0].confidence - 1e-6
    assert both_right >= 30
