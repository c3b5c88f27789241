"""vpr_ros.pose_policy: when ~/pose is published, against which belief."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from vpr_ros.errors import ConfigError
from vpr_ros.pose_policy import (
    DISAGREEMENT,
    EVERY_FRAME,
    JUMP,
    RELOCALIZED,
    REQUESTED,
    KeyframeOrderBelief,
    LocalizerBelief,
    OdometryBelief,
    PosePolicy,
    PosePolicyConf,
)
from vpr_ros.types import Hypothesis, Pose

S = 1_000_000_000
SPACING_M = 4.0
PLACES = 40
# A straight route along x, places 4 m apart, then a second traverse of the same route.
POSITIONS = np.array([[SPACING_M * i, 0.0, 0.0] for i in range(PLACES)] * 2)
TRAVERSES = np.repeat([0, 1], PLACES)


def answer(place: int, confidence: float = 0.8, *, yaw: float = 0.0) -> Hypothesis:
    x, y, z = POSITIONS[place]
    pose = Pose(x, y, z, 0.0, 0.0, math.sin(yaw / 2), math.cos(yaw / 2))
    return Hypothesis(place, place, 0.9, 0.5, confidence, pose)


def keyframe_belief(max_speed_mps: float = 3.0) -> KeyframeOrderBelief:
    return KeyframeOrderBelief(POSITIONS, TRAVERSES, max_speed_mps=max_speed_mps)


def policy(belief=None, **conf) -> PosePolicy:
    return PosePolicy(PosePolicyConf(**conf), belief or keyframe_belief())


def drive(policy: PosePolicy, places, start_s: float = 0.0, dt_s: float = 2.0) -> list:
    """Answers for ``places`` at 2 s intervals (4 m apart: 2 m/s); the decisions."""
    return [
        policy.decide(answer(place), round((start_s + i * dt_s) * S))
        for i, place in enumerate(places)
    ]


def published(decisions) -> list[str]:
    return [d.kind for d in decisions if d.publish]


def test_a_robot_that_starts_lost_and_drives_along_the_map_is_published_once() -> None:
    pose_policy = policy()
    unknown = [pose_policy.decide(answer(5, confidence=0.1), i * S) for i in range(3)]
    assert published(unknown) == []
    decisions = drive(pose_policy, range(0, 20), start_s=10)
    assert published(decisions) == [RELOCALIZED]
    assert decisions[0].publish and decisions[0].reason == 'relocalized (was lost)'
    assert all('consistent' in d.reason for d in decisions[1:])
    assert pose_policy.published.counts == {RELOCALIZED: 1}


def test_a_kidnap_to_another_part_of_the_route_is_published_once_as_a_jump() -> None:
    pose_policy = policy()
    drive(pose_policy, range(0, 10))
    after = drive(pose_policy, [30, 31, 32, 33], start_s=20)
    assert published(after) == [JUMP]
    assert after[0].reason.startswith('jump of 80.0 m')
    assert pose_policy.published.counts == {RELOCALIZED: 1, JUMP: 1}


def test_standing_still_and_driving_back_are_no_jumps() -> None:
    pose_policy = policy()
    decisions = drive(pose_policy, [10, 11, 12, 12, 12, 12, 11, 10, 9, 8])
    assert published(decisions) == [RELOCALIZED]


def test_an_answer_on_another_traverse_of_the_same_place_is_no_jump() -> None:
    pose_policy = policy()
    decisions = drive(pose_policy, [3, 4, 5, PLACES + 6, PLACES + 7, 8])
    assert published(decisions) == [RELOCALIZED]


def test_a_jump_within_what_the_robot_could_drive_is_no_jump_without_odometry() -> None:
    pose_policy = policy(max_speed_mps=3.0, jump_m=10.0)
    drive(pose_policy, [5, 6])
    # 20 s later, 40 m further along the route (2 m/s): reachable, so not a jump.
    assert not pose_policy.decide(answer(16), 22 * S).publish
    # 2 s later, 60 m further: out of reach.
    decision = pose_policy.decide(answer(31), 24 * S)
    assert decision.publish and decision.kind == JUMP


def test_after_lost_after_s_without_a_confident_answer_the_next_is_published() -> None:
    pose_policy = policy(lost_after_s=5.0)
    drive(pose_policy, [1, 2, 3])
    assert not pose_policy.decide(answer(4), 8 * S).publish  # 4 s after the last
    for t in range(9, 20):
        assert not pose_policy.decide(answer(4, confidence=0.05), t * S).publish
    decision = pose_policy.decide(answer(5), 20 * S)
    assert decision.publish and decision.kind == RELOCALIZED


def test_every_frame_publishes_every_confident_answer_and_nothing_else() -> None:
    pose_policy = policy(pose_policy='every_frame', confidence_threshold=0.5)
    decisions = [pose_policy.decide(answer(i, c), i * S) for i, c in enumerate([0.9, 0.4, 0.5])]
    assert [d.publish for d in decisions] == [True, False, True]
    assert pose_policy.published.counts == {EVERY_FRAME: 2}
    assert not pose_policy.decide(None, 5 * S).publish


def test_on_request_publishes_only_the_next_confident_answer_after_a_request() -> None:
    pose_policy = policy(pose_policy='on_request')
    assert published(drive(pose_policy, [1, 2, 3])) == []
    request = pose_policy.request()
    assert not request.wait(0.01)
    assert not pose_policy.decide(answer(4, confidence=0.1), 10 * S).publish
    decision = pose_policy.decide(answer(5), 11 * S)
    assert decision.publish and decision.kind == REQUESTED
    assert request.wait(0) and request.hypothesis.place_id == 5 and request.stamp_ns == 11 * S
    assert not pose_policy.decide(answer(6), 12 * S).publish  # one shot


def test_a_request_waits_across_threads_and_a_timed_out_one_is_withdrawn() -> None:
    pose_policy = policy(pose_policy='on_request')
    stale = pose_policy.request()
    assert not stale.wait(0.05)
    pose_policy.cancel(stale)
    request = pose_policy.request()
    worker = threading.Timer(0.1, lambda: pose_policy.decide(answer(7), S))
    worker.start()
    assert request.wait(5.0)
    worker.join()
    assert request.hypothesis.place_id == 7 and stale.hypothesis is None


def test_a_request_under_on_change_publishes_even_a_consistent_answer() -> None:
    pose_policy = policy()
    drive(pose_policy, [1, 2])
    request = pose_policy.request()
    decision = pose_policy.decide(answer(3), 4 * S)
    assert decision.publish and decision.kind == REQUESTED and request.wait(0)


def test_reset_makes_the_node_lost_again() -> None:
    pose_policy = policy()
    drive(pose_policy, [1, 2])
    pose_policy.reset()
    assert pose_policy.decide(answer(3), 4 * S).kind == RELOCALIZED


def odometry(belief: OdometryBelief, stamps_s, xs, ys=None, yaw: float = 0.0) -> None:
    ys = ys if ys is not None else [0.0] * len(xs)
    for t, x, y in zip(stamps_s, xs, ys):
        belief.add_odometry(
            round(t * S), Pose(x, y, 0.0, 0.0, 0.0, math.sin(yaw / 2), math.cos(yaw / 2))
        )


def test_with_odometry_a_kidnap_within_driving_reach_is_still_a_jump() -> None:
    """Odometry says the robot stood still; the keyframe-order belief alone would allow it
    to have driven 30 m in those 10 s."""
    belief = OdometryBelief(keyframe_belief(max_speed_mps=3.0))
    pose_policy = policy(belief, jump_m=10.0)
    odometry(belief, range(0, 13), [0.0] * 13)
    assert pose_policy.decide(answer(5), 0).kind == RELOCALIZED
    decision = pose_policy.decide(answer(10), 10 * S)  # 20 m away, robot stood still
    assert decision.publish and decision.kind == JUMP
    without = policy(keyframe_belief(max_speed_mps=3.0), jump_m=10.0)
    without.decide(answer(5), 0)
    assert not without.decide(answer(10), 10 * S).publish


def test_dead_reckoning_turns_the_odometry_into_the_answers_heading() -> None:
    """The odometry frame is turned against the map: the robot heads along odometry's +y
    (yaw 90 deg there) and along the map's +x at the answer; its 12 m forward in odometry
    are 12 m along the map's x."""
    belief = OdometryBelief(keyframe_belief(max_speed_mps=0.0))
    pose_policy = policy(belief, jump_m=3.0)
    yaw = math.pi / 2
    odometry(belief, [0.0, 3.0], [5.0, 5.0], [1.0, 13.0], yaw=yaw)
    pose_policy.decide(answer(2), 0)  # at x = 8, heading +x in the map
    np.testing.assert_allclose(belief.position_now(3 * S), [20.0, 0.0, 0.0], atol=1e-9)
    assert not pose_policy.decide(answer(5), 3 * S).publish  # x = 20: where it drove


def test_without_odometry_at_a_stamp_the_belief_falls_back_to_keyframe_order() -> None:
    belief = OdometryBelief(keyframe_belief(max_speed_mps=3.0), max_gap_s=0.5)
    pose_policy = policy(belief)
    odometry(belief, [0.0], [0.0])
    pose_policy.decide(answer(5), 0)
    assert belief.odometry_at(10 * S) is None
    assert belief.distance_m(POSITIONS[10], 10 * S) == pytest.approx(0.0)  # reachable
    odometry(belief, [-1.0], [0.0])
    assert belief.out_of_order == 1


def supervised(**conf) -> tuple[PosePolicy, LocalizerBelief]:
    belief = LocalizerBelief(keyframe_belief())
    return PosePolicy(PosePolicyConf(**conf), belief, supervised=True), belief


def test_supervision_publishes_only_when_the_localizer_disagrees() -> None:
    pose_policy, belief = supervised(disagreement_m=3.0)
    belief.add_localizer_pose(0, np.array([8.5, 0.0, 0.0]))
    assert not pose_policy.decide(answer(2), 2 * S).publish  # 0.5 m: agrees, although "lost"
    belief.add_localizer_pose(3 * S, np.array([30.0, 0.0, 0.0]))  # the localizer went astray
    decision = pose_policy.decide(answer(3), 4 * S)
    assert decision.publish and decision.kind == DISAGREEMENT
    assert decision.reason == 'disagrees with the localizer by 18.0 m'
    # Until the localizer reports after the correction, its stale pose is not held against us.
    belief.add_localizer_pose(4 * S - 1, np.array([32.0, 0.0, 0.0]))
    assert not pose_policy.decide(answer(4), 6 * S).publish
    belief.add_localizer_pose(6 * S, np.array([16.2, 0.0, 0.0]))  # it took the correction
    assert not pose_policy.decide(answer(4), 7 * S).publish
    assert pose_policy.published.counts == {DISAGREEMENT: 1}


def test_supervision_without_a_localizer_pose_publishes_the_first_answer() -> None:
    pose_policy, _ = supervised()
    decision = pose_policy.decide(answer(2), S)
    assert decision.kind == RELOCALIZED and 'no localizer pose' in decision.reason
    assert not pose_policy.decide(answer(3), 3 * S).publish


def test_the_keyframe_belief_advances_with_the_speed_it_saw() -> None:
    belief = keyframe_belief(max_speed_mps=5.0)
    pose_policy = policy(belief)
    drive(pose_policy, [0, 1, 2, 3, 4])  # 2 m/s
    ahead = belief.position_now(round(8 * S + 2 * S))
    assert 16.0 < ahead[0] <= 20.0 and ahead[1] == 0.0


def test_moved_places_keep_the_belief_on_the_same_place() -> None:
    belief = keyframe_belief()
    pose_policy = policy(belief)
    drive(pose_policy, [4, 5])
    belief.set_map(POSITIONS + [100.0, 0.0, 0.0], TRAVERSES)
    assert belief.distance_m(POSITIONS[5] + [100.0, 0.0, 0.0], 2 * S) == pytest.approx(0.0)


@pytest.mark.parametrize(
    ('changes', 'expected'),
    [
        ({'pose_policy': 'always'}, "pose_policy must be one of ['on_change'"),
        ({'jump_m': 0.0}, 'jump_m must be > 0'),
        ({'confidence_threshold': 1.5}, 'confidence_threshold must be in [0, 1]'),
        ({'request_timeout_s': -1.0}, 'request_timeout_s must be > 0'),
        ({'disagreement_m': math.nan}, 'disagreement_m must be'),
    ],
)
def test_bad_policy_settings_are_refused_with_the_reason(changes: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        PosePolicyConf(**changes)
    assert expected in str(error.value)
