"""vpr_ros.loop_closure: a map that grows and is queried at once, the recent past excluded,
and place poses that follow an optimised trajectory.

The route is generated: 22 frames 3 m apart around a circle, then 4 more back at its start,
so it closes on itself. Each scene is seen by two consecutive frames (as a camera sees a
place twice while it drives past), so without the exclusion every frame would "close a loop"
with the frame before it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_place, viewed_again

from vpr_ros.errors import ConfigError
from vpr_ros.loop_closure import LoopClosureConf, LoopClosureDetector, update_place_poses
from vpr_ros.relocalization import RelocalizationConf
from vpr_ros.types import Frame, Pose

S = 1_000_000_000
T0 = 1_700_000_000 * S
AROUND = 22  # frames once around the loop
BACK = 4  # frames back at its start
SPACING_M = 3.0
RADIUS_M = SPACING_M * AROUND / (2 * math.pi)
EXCLUSION = {'exclusion_s': 10.0, 'exclusion_m': 20.0, 'min_distance_m': 1.0}


def scene(i: int) -> int:
    """The scene frame ``i`` sees: two consecutive frames per scene, and the frames back at
    the start see the first scenes again."""
    return (i if i < AROUND else i - AROUND) // 2


def loop_pose(i: int) -> Pose:
    angle = 2 * math.pi * (i % AROUND) / AROUND
    yaw = angle + math.pi / 2
    offset = 0.4 if i >= AROUND else 0.0  # not quite on the same spot
    return Pose(
        (RADIUS_M + offset) * math.cos(angle),
        (RADIUS_M + offset) * math.sin(angle),
        0.0,
        0.0,
        0.0,
        math.sin(yaw / 2),
        math.cos(yaw / 2),
    )


def loop_image(i: int, size: tuple[int, int] = (120, 160)) -> np.ndarray:
    place = synthetic_place(300 + scene(i), size)
    if i >= AROUND:
        return viewed_again(place, shift_px=3, gain=0.9)
    return viewed_again(place, shift_px=6 * (i % 2), gain=1.0 + 0.1 * (i % 2))


def closing_route() -> list[Frame]:
    """The generated route, frames 1 s apart (3 m/s), poses in the frame 'odom'."""
    return [
        Frame(loop_image(i), T0 + i * S, 'camera', loop_pose(i), 'odom')
        for i in range(AROUND + BACK)
    ]


def detector(model, **conf) -> LoopClosureDetector:
    return LoopClosureDetector(
        model,
        LoopClosureConf.from_dict({**EXCLUSION, **conf}),
        RelocalizationConf(top_k=5, rerank_k=4, competitor_radius_m=4.0),
        num_threads=1,
    )


def run(lc: LoopClosureDetector, frames: list[Frame], threshold: float = 0.4) -> list:
    return [
        lc.process(
            f.image,
            f.stamp_ns,
            f.pose,
            confidence_threshold=threshold,
            frame_id=f.frame_id,
            pose_frame_id=f.pose_frame_id,
        )
        for f in frames
    ]


@pytest.fixture(scope='module')
def driven(default_model):
    """The detector after the whole route, and each frame's result."""
    lc = detector(default_model)
    frames = closing_route()
    return lc, frames, run(lc, frames)


def test_the_loop_is_reported_with_the_stamps_of_both_ends(driven) -> None:
    _, frames, results = driven
    index_of = {f.stamp_ns: i for i, f in enumerate(frames)}
    steps = [
        math.dist(a.pose.as_array()[:3], b.pose.as_array()[:3]) for a, b in zip(frames, frames[1:])
    ]
    driven_m = np.concatenate([[0.0], np.cumsum(steps)])
    for i in range(AROUND, AROUND + BACK):
        closures = results[i].closures
        assert closures, f'frame {i} back at the start closed no loop'
        best = closures[0]
        assert best.query_stamp_ns == frames[i].stamp_ns
        place = index_of[best.place_stamp_ns]
        assert scene(place) == scene(i) and place < AROUND
        assert best.hypothesis.confidence >= 0.4
        assert best.hypothesis.pose == frames[place].pose
        assert best.trajectory_gap_m == pytest.approx(driven_m[i] - driven_m[place])


def test_no_closure_is_reported_against_the_recent_past(driven) -> None:
    lc, frames, results = driven
    for i, result in enumerate(results):
        for closure in result.closures:
            assert closure.query_stamp_ns - closure.place_stamp_ns >= 10 * S
            assert closure.trajectory_gap_m >= 20.0
        for hypothesis in result.hypotheses:
            place_stamp = lc.database.places['stamp_ns'][hypothesis.place_index]
            assert frames[i].stamp_ns - place_stamp >= 10 * S
    # Before the route comes back, nothing is old and far enough to close a loop with.
    assert not any(r.closures for r in results[:AROUND])


def test_without_the_exclusion_the_recent_past_would_close_loops(default_model) -> None:
    lc = detector(default_model, exclusion_s=0.0, exclusion_m=0.0, min_places=1)
    results = run(lc, closing_route()[:4])
    (closure,) = results[1].closures[:1]
    assert closure.place_stamp_ns == T0  # frame 1 "closes a loop" with frame 0, 1 s before


def test_every_frame_with_a_pose_joins_the_map_with_its_source_stamp(driven) -> None:
    lc, frames, results = driven
    assert all(r.added for r in results)
    places = lc.database.places
    assert places['stamp_ns'].tolist() == [f.stamp_ns for f in frames]
    assert set(lc.database.place_strings('frame_id')) == {'odom'}
    np.testing.assert_allclose(lc.database.poses[5], frames[5].pose.as_array())


def test_a_frame_without_a_pose_is_matched_but_not_added(default_model) -> None:
    lc = detector(default_model, exclusion_s=0.0, exclusion_m=0.0)
    frames = closing_route()
    run(lc, frames[:2])
    result = lc.process(frames[2].image, frames[2].stamp_ns, None, confidence_threshold=0.3)
    assert not result.added and len(lc.database) == 2
    assert result.hypotheses


def test_loop_closure_needs_single_frame_matching(default_model) -> None:
    with pytest.raises(ConfigError, match="mode 'single'"):
        LoopClosureDetector(default_model, LoopClosureConf(), RelocalizationConf(mode='sequence'))


def moved(pose: Pose, yaw: float = math.radians(10), shift=(5.0, -3.0)) -> Pose:
    """``pose`` after a rigid correction of the whole trajectory (a graph optimisation)."""
    c, s = math.cos(yaw), math.sin(yaw)
    half = math.atan2(pose.qz, pose.qw) + yaw / 2
    return Pose(
        c * pose.x - s * pose.y + shift[0],
        s * pose.x + c * pose.y + shift[1],
        pose.z,
        0.0,
        0.0,
        math.sin(half),
        math.cos(half),
    )


def test_an_optimised_path_moves_every_place_and_later_closures_carry_it(default_model) -> None:
    lc = detector(default_model)
    frames = closing_route()
    run(lc, frames[:AROUND])
    stamps = lc.database.places['stamp_ns'].copy()
    path = [moved(f.pose) for f in frames[:AROUND]]
    before = lc.database.poses.copy()
    updated = update_place_poses(lc.database, stamps, path, max_gap_ns=0)
    assert updated.tolist() == list(range(AROUND))
    after = lc.database.poses
    assert np.all(np.linalg.norm(after[:, :3] - before[:, :3], axis=1) > 1.0)
    np.testing.assert_allclose(after, [p.as_array() for p in path], atol=1e-9)
    (result,) = run(lc, frames[AROUND : AROUND + 1])
    best = result.closures[0].hypothesis
    assert best.pose == Pose.from_array(after[best.place_index])


def test_places_between_two_optimised_poses_are_interpolated_and_others_kept(
    default_model,
) -> None:
    lc = detector(default_model)
    frames = closing_route()
    run(lc, frames[:8])
    before = lc.database.poses.copy()
    # Keyframes 2 and 4 of the back end, 2 s apart; place 3 lies between them.
    path_stamps = [frames[2].stamp_ns, frames[4].stamp_ns]
    path = [Pose(100.0, 0.0, 0.0), Pose(104.0, 2.0, 0.0)]
    updated = update_place_poses(lc.database, path_stamps, path, max_gap_ns=2 * S)
    assert updated.tolist() == [2, 3, 4]
    np.testing.assert_allclose(lc.database.poses[3, :3], [102.0, 1.0, 0.0])
    np.testing.assert_allclose(lc.database.poses[[0, 1, 5, 6, 7]], before[[0, 1, 5, 6, 7]])
    # Too far apart for interpolation: only the exact stamps move.
    again = update_place_poses(lc.database, path_stamps, path, max_gap_ns=S)
    assert again.tolist() == [2, 4]


# -- a real route, bagged with its poses ------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def campus_route() -> Path | None:
    """../shared/datasets/campus_route (beside the project, or beside its worktree), or the
    folder VPR_DATASETS names; None where the dataset is absent (tests must run without)."""
    candidates = [Path(os.environ['VPR_DATASETS'])] if os.environ.get('VPR_DATASETS') else []
    candidates += [ROOT.parent / 'shared' / 'datasets', ROOT.parents[1] / 'shared' / 'datasets']
    return next((c / 'campus_route' for c in candidates if (c / 'campus_route').is_dir()), None)


def test_campus_route_driven_twice_closes_each_frame_with_its_first_lap_stamp(
    default_model, tmp_path
) -> None:
    """campus_route (72 real frames about 3 m apart) in a bag with its odometry, driven twice:
    the second lap sees every place again (a small shift and a lighting change)."""
    dataset = campus_route()
    if dataset is None:
        pytest.skip('../shared/datasets/campus_route is not here')
    from vpr_ros.bagio import read_frames
    from vpr_ros.bagwriter import write_bag
    from vpr_ros.cli.demo import dataset_frames

    lap = dataset_frames(dataset)  # stamped as a robot at 2 m/s sees them
    lap_ns = lap[-1].stamp_ns - lap[0].stamp_ns + 2 * S
    second = [
        Frame(viewed_again(f.image, shift_px=4, gain=1.1), f.stamp_ns + lap_ns, 'camera', f.pose)
        for f in lap
    ]
    bag = write_bag(tmp_path / 'campus', lap + second, compressed=True, pose_frame_id='map')
    frames = list(read_frames([bag], '/camera/image_raw', '/odom'))
    assert len(frames) == 2 * len(lap)
    lc = LoopClosureDetector(default_model, LoopClosureConf(), RelocalizationConf(), num_threads=1)
    conf = lc.conf
    closed: dict[int, int] = {}  # query frame -> the frame its best closure names
    index_of = {f.stamp_ns: i for i, f in enumerate(frames)}
    for i, frame in enumerate(frames):
        result = lc.process(frame.image, frame.stamp_ns, frame.pose, confidence_threshold=0.3)
        for closure in result.closures:
            assert closure.query_stamp_ns == frame.stamp_ns
            age_ns = closure.query_stamp_ns - closure.place_stamp_ns
            assert age_ns >= conf.exclusion_s * S  # never the recent past
            assert closure.trajectory_gap_m >= conf.exclusion_m
        if result.closures:
            closed[i] = index_of[result.closures[0].place_stamp_ns]
    first_lap = len(lap)
    second_lap = {i: place for i, place in closed.items() if i >= first_lap}
    # Most of the second lap closes, each with the first lap's frame of the same place.
    assert len(second_lap) >= 0.8 * first_lap, sorted(closed)
    assert all(abs(place - (i - first_lap)) <= 1 for i, place in second_lap.items()), second_lap
    # The first lap closes nothing wrong (its own end is 5.5 m from its start).
    for i, place in closed.items():
        if i < first_lap:
            assert math.dist(frames[i].pose.as_array()[:2], frames[place].pose.as_array()[:2]) < 15
