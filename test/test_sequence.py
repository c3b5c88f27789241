"""Tests of the sequence matcher on generated routes (no dataset, no ROS)."""

from __future__ import annotations

import numpy as np
import pytest

from vpr_ros.errors import ConfigError
from vpr_ros.sequence import (
    SequenceConf,
    SequenceMatcher,
    match_traverse,
    null_evidence,
    patch_normalised_descriptor,
    sequence_image_descriptors,
)

DIM = 64
MEMORIES = ('decay', 'window')


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def _noise(rng: np.random.Generator, shape: tuple[int, ...], size: float) -> np.ndarray:
    """Gaussian noise whose rows have a norm of about ``size``."""
    return rng.standard_normal(shape) * size / np.sqrt(shape[-1])


def _observe(
    rng: np.random.Generator,
    map_descriptors: np.ndarray,
    places: np.ndarray,
    *,
    condition: float = 0.5,
    camera: float = 0.02,
) -> np.ndarray:
    """Query descriptors of a route through ``places`` of the map, seen in other conditions.

    Each place looks different from the map by a fixed amount (``condition``: season,
    light), and each frame by a little camera noise, so a robot standing still sees
    nearly the same descriptor frame after frame.
    """
    changed = map_descriptors + _noise(rng, map_descriptors.shape, condition)
    return _unit(changed[places] + _noise(rng, (len(places), map_descriptors.shape[1]), camera))


def _random_map(rng: np.random.Generator, num_places: int) -> np.ndarray:
    return _unit(rng.standard_normal((num_places, DIM)))


@pytest.mark.parametrize('memory', MEMORIES)
def test_repeated_looking_places_are_told_apart_by_the_sequence(memory: str) -> None:
    rng = np.random.default_rng(0)
    # 300 places that each look like 9 others: 30 appearances in a random order.
    appearances = _random_map(rng, 30)
    pattern = rng.integers(0, 30, 300)
    map_descriptors = _unit(appearances[pattern] + _noise(rng, (300, DIM), 0.02))
    places = np.arange(60, 200)
    queries = _observe(rng, map_descriptors, places, condition=0.5)

    single = np.argmax(queries @ map_descriptors.T, axis=1)
    assert np.mean(single == places) < 0.3  # one frame cannot tell the copies apart

    conf = {'memory': memory, 'length': 10}
    best, _, confidence = match_traverse(queries, map_descriptors, conf=conf)
    settled = slice(10, None)  # once a sequence of `length` frames has been seen
    assert np.mean(np.abs(best[settled] - places[settled]) <= 1) >= 0.97
    accepted = confidence[settled] >= SequenceConf().min_confidence
    assert accepted.mean() >= 0.9
    assert np.all(np.abs(best[settled][accepted] - places[settled][accepted]) <= 1)


@pytest.mark.parametrize('memory', MEMORIES)
def test_a_query_route_that_leaves_the_map_is_not_accepted(memory: str) -> None:
    rng = np.random.default_rng(1)
    map_descriptors = _random_map(rng, 200)
    on_map = _observe(rng, map_descriptors, np.arange(20, 80))
    never_visited = _observe(rng, _random_map(rng, 80), np.arange(80))
    queries = np.concatenate([on_map, never_visited])
    conf = {'memory': memory, 'length': 10}
    best, _, confidence = match_traverse(queries, map_descriptors, conf=conf)
    accepted = confidence >= SequenceConf().min_confidence

    assert accepted[10:60].all()
    assert np.all(np.abs(best[10:60] - np.arange(30, 80)) <= 1)
    # The sequence remembers the map for a while after leaving it (up to about one
    # sequence length for the window, two for decay); from then on nothing is accepted
    # (off the map, about 1 frame in 1,000 reaches the default threshold by chance).
    assert accepted[60 + 2 * 10 :].sum() <= 1


@pytest.mark.parametrize('memory', MEMORIES)
def test_a_small_map_does_not_accept_a_route_it_never_saw(memory: str) -> None:
    rng = np.random.default_rng(10)
    # An office floor: 24 keyframes, so an exclusion window of 10 leaves 3 to 13 places to
    # compete with any match.
    map_descriptors = _random_map(rng, 24)
    never_visited = _observe(rng, _random_map(rng, 60), np.arange(60))
    threshold = SequenceConf().min_confidence
    conf = {'memory': memory, 'length': 10}
    _, _, confidence = match_traverse(never_visited, map_descriptors, conf=conf)
    assert np.sum(confidence[5:] >= threshold) <= 1

    # The best of 24 trajectories beats the best of those few by chance: compared with
    # them alone (the relative confidence), many of these frames would be accepted.
    relative_only = {**conf, 'null_quantile': 0.0}
    _, _, relative = match_traverse(never_visited, map_descriptors, conf=relative_only)
    assert np.mean(relative[5:] >= threshold) > 0.3

    # The route the map knows is still accepted once a few frames are in.
    places = np.arange(24)
    best, _, confidence = match_traverse(_observe(rng, map_descriptors, places), map_descriptors)
    assert np.all(confidence[6:] >= threshold)
    assert np.all(np.abs(best[6:] - places[6:]) <= 1)


def test_a_map_within_one_exclusion_window_is_judged_by_chance_level_alone() -> None:
    rng = np.random.default_rng(11)
    map_descriptors = _random_map(rng, 11)  # no place is outside any match's window
    threshold = SequenceConf().min_confidence
    places = np.arange(11)
    best, _, confidence = match_traverse(_observe(rng, map_descriptors, places), map_descriptors)
    assert np.all(confidence[4:] >= threshold)
    assert np.all(np.abs(best[4:] - places[4:]) <= 1)
    never_visited = _observe(rng, _random_map(rng, 60), np.arange(60))
    _, _, confidence = match_traverse(never_visited, map_descriptors)
    assert np.all(confidence < threshold)
    # Without the chance level there is nothing to compare with, and no confidence.
    _, _, relative = match_traverse(never_visited, map_descriptors, conf={'null_quantile': 0.0})
    assert not relative.any()


def test_null_evidence_is_the_quantile_of_the_best_of_n_standard_normals() -> None:
    best_of_21 = np.random.default_rng(12).standard_normal((20_000, 21)).max(axis=1)
    for quantile in (0.5, 0.9):
        expected = np.quantile(best_of_21, quantile)
        assert null_evidence(21, quantile) == pytest.approx(expected, abs=0.03)
    assert null_evidence(1) == pytest.approx(0.0)
    assert null_evidence(100_000) > null_evidence(3576) > null_evidence(21)
    assert null_evidence(21, 0.0) == -np.inf


@pytest.mark.parametrize('memory', MEMORIES)
def test_stopping_and_resuming_keeps_the_match(memory: str) -> None:
    rng = np.random.default_rng(2)
    map_descriptors = _random_map(rng, 200)
    # Drive through places 20..59, stand still at 60 for 25 frames, drive on to 99.
    places = np.r_[np.arange(20, 60), np.full(25, 60), np.arange(61, 100)]
    queries = _observe(rng, map_descriptors, places)
    matcher = SequenceMatcher(map_descriptors, conf={'memory': memory, 'length': 10})
    for i, query in enumerate(queries):
        best = matcher.update(query)[0]
        if i >= 10:
            assert abs(best.place_index - places[i]) <= 1, f'frame {i}'
            assert best.confidence >= matcher.conf.min_confidence, f'frame {i}'


@pytest.mark.parametrize('memory', MEMORIES)
def test_online_updates_give_what_match_traverse_gives(memory: str) -> None:
    rng = np.random.default_rng(3)
    map_descriptors = _random_map(rng, 150)
    traverse_ids = np.repeat([0, 1, 2], 50)
    places = np.r_[np.arange(55, 90), np.full(5, 90), np.arange(92, 99)]
    queries = _observe(rng, map_descriptors, places, condition=0.8)
    conf = {'memory': memory, 'length': 8}

    best, score, confidence = match_traverse(queries, map_descriptors, traverse_ids, conf)
    matcher = SequenceMatcher(map_descriptors, traverse_ids, conf)
    online = [matcher.update(query)[0] for query in queries]
    assert np.array_equal(best, [m.place_index for m in online])
    assert np.array_equal(score, [m.score for m in online])
    assert np.array_equal(confidence, [m.confidence for m in online])

    matcher.reset()
    again = [matcher.update(query)[0] for query in queries]
    assert again == online


def test_traverses_may_be_interleaved_in_the_map() -> None:
    rng = np.random.default_rng(4)
    map_descriptors = _random_map(rng, 120)
    traverse_ids = np.repeat([0, 1], 60)
    queries = _observe(rng, map_descriptors, np.arange(70, 110))
    contiguous = match_traverse(queries, map_descriptors, traverse_ids)

    # The same places stored interleaved: row i of the new map is place stored[i].
    stored = np.column_stack([np.arange(60), np.arange(60, 120)]).ravel()
    interleaved = match_traverse(queries, map_descriptors[stored], traverse_ids[stored])
    assert np.array_equal(stored[interleaved[0]], contiguous[0])
    np.testing.assert_allclose(interleaved[1], contiguous[1], rtol=1e-5)
    np.testing.assert_allclose(interleaved[2], contiguous[2], rtol=1e-5, atol=1e-6)


def test_trajectories_do_not_run_from_one_traverse_into_the_next() -> None:
    rng = np.random.default_rng(5)
    map_descriptors = _random_map(rng, 100)
    # A route along the end of places 30..49 that continues onto places 50..69.
    places = np.arange(30, 70)
    queries = _observe(rng, map_descriptors, places)
    conf = {'memory': 'window', 'length': 10}
    joined = SequenceMatcher(map_descriptors, np.zeros(100, int), conf)
    split = SequenceMatcher(map_descriptors, np.repeat([0, 1], 50), conf)
    for query in queries[:23]:  # up to place 52
        joined.update(query)
        split.update(query)
    # One traverse: the trajectory 43..52 matches all 10 frames. Two traverses (places
    # 50.. are another one): a trajectory ending at 52 cannot come from 49, so its
    # first frames must sit on place 50 and pay for it.
    assert split.last_costs[52] > joined.last_costs[52] + 10
    # Once the window lies in the second traverse, it is matched there as well.
    for query in queries[23:]:
        best = split.update(query)[0]
    assert best.place_index == 69


def test_another_traverse_of_the_same_route_does_not_compete_when_positions_are_known() -> None:
    rng = np.random.default_rng(6)
    route = _random_map(rng, 80)
    # Two traverses of one route: the second looks like the first, a little changed.
    map_descriptors = np.concatenate([route, _unit(route + _noise(rng, route.shape, 0.3))])
    traverse_ids = np.repeat([0, 1], 80)
    xyz = np.zeros((160, 3))
    xyz[:, 0] = np.tile(np.arange(80) * 2.0, 2)  # places 2 m apart along x
    queries = _observe(rng, route, np.arange(10, 60))

    _, _, blind = match_traverse(queries, map_descriptors, traverse_ids)
    _, _, aware = match_traverse(queries, map_descriptors, traverse_ids, place_xyz=xyz)
    assert np.median(blind[10:]) < 0.5  # the twin place competes with the match
    assert np.all(aware[10:] >= SequenceConf().min_confidence)


def test_patch_normalised_descriptor_ignores_brightness_and_contrast() -> None:
    rng = np.random.default_rng(7)
    image = rng.integers(0, 200, (32, 64, 3), dtype=np.uint8)
    grey_shift = np.clip(image.astype(np.float64) * 0.5 + 40, 0, 255).astype(np.uint8)
    descriptors = patch_normalised_descriptor([image, grey_shift], size=(64, 32), patch=8)
    assert descriptors.shape == (2, 64 * 32)
    assert descriptors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(descriptors, axis=1), 1.0, rtol=1e-5)
    assert float(descriptors[0] @ descriptors[1]) > 0.99
    np.testing.assert_allclose(patch_normalised_descriptor(image), descriptors[:1], atol=1e-6)
    # A larger image is resized first; a flat image gives a zero vector, not NaNs.
    big = patch_normalised_descriptor(np.zeros((2, 240, 320, 3), np.uint8), size=(32, 16))
    assert big.shape == (2, 512)
    assert not big.any()


def test_patch_normalised_descriptor_rejects_a_size_that_is_not_a_multiple_of_the_patch() -> None:
    with pytest.raises(ValueError, match='multiples of patch'):
        patch_normalised_descriptor(np.zeros((32, 64, 3), np.uint8), size=(60, 32), patch=8)


def test_sequence_image_descriptors_follow_the_configuration() -> None:
    images = np.random.default_rng(8).integers(0, 255, (3, 48, 96, 3), dtype=np.uint8)
    conf = {'image_size': [32, 16], 'patch': 4}
    assert sequence_image_descriptors(images, conf).shape == (3, 512)
    with pytest.raises(ConfigError, match='global descriptors'):
        sequence_image_descriptors(images, {'descriptor': 'global'})


@pytest.mark.parametrize(
    ('conf', 'match'),
    [
        ({'lenght': 10}, 'unknown SequenceConf setting'),
        ({'memory': 'forever'}, 'memory must be one of'),
        ({'length': 0}, 'length must be >= 1'),
        ({'length': 2.5}, 'length must be an integer'),
        ({'stop_penalty': -1.0}, 'stop_penalty must be >= 0'),
        ({'min_confidence': 1.5}, r'min_confidence must be in \[0, 1\]'),
        ({'null_quantile': 1.0}, r'null_quantile must be in \[0, 0.999999\]'),
        ({'image_size': [30, 16]}, 'image_size must be'),
        ({'confidence_scale': float('nan')}, 'confidence_scale must be a finite number'),
    ],
)
def test_bad_settings_are_rejected_with_the_offending_value(conf: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SequenceConf.from_dict(conf)


def test_a_query_of_the_wrong_size_is_rejected() -> None:
    matcher = SequenceMatcher(_random_map(np.random.default_rng(9), 30))
    with pytest.raises(ValueError, match='query descriptor has 3 values'):
        matcher.update(np.ones(3))
