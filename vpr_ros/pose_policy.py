"""When the relocalize node publishes ``~/pose``: the pose policy and the belief it tests
answers against (ROS-free).

A localizer such as AMCL restarts its particle filter on every ``/initialpose``, so ``~/pose``
must be published when it carries news, not on every frame. :meth:`PosePolicy.decide` takes
each frame's best hypothesis and says whether to publish it, and why:

* ``on_change`` (the default): when the node goes from lost to localized (its first
  confident answer, or the first after ``lost_after_s`` without one), or on a *jump*: a
  confident answer more than ``jump_m`` from where the tracked belief says the robot may be
  now. A robot that drives along the map makes no jumps;
* ``every_frame``: every confident answer;
* ``on_request``: only the answers a request asked for.

Under any policy, :meth:`PosePolicy.request` (the node's ``~/relocalize`` service) arms a
one-shot publication of the next confident answer.

The *belief* (:class:`Belief`) says where the robot may be now, given the answers taken so
far. A belief is told every confident answer the policy takes (:meth:`Belief.accept`) and
answers how far a position is from it (:meth:`Belief.distance_m`):

* :class:`KeyframeOrderBelief` (no odometry): the last answer, advanced along the map's
  keyframe order as far as the robot can have driven since (``max_speed_mps``);
* :class:`OdometryBelief`: the last answer moved by the odometry since (dead reckoning); it
  falls back to keyframe order where odometry is missing;
* :class:`LocalizerBelief` (localizer supervision): the localizer's own pose (e.g. AMCL's
  ``amcl_pose``). ``on_change`` then publishes only when a confident answer disagrees with
  the localizer by more than ``disagreement_m``: the kidnapped-robot recovery.

A recursive place filter plugs in by implementing :class:`Belief` over its posterior.
Stamps are int nanoseconds of the camera frames, so a bag or simulated time behaves like a
live run; positions are metres in the map's frame.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from scipy.spatial.transform import Rotation

from vpr_ros.config import Conf, option
from vpr_ros.types import Hypothesis, Pose, SkipCounter

POLICIES = ('on_change', 'every_frame', 'on_request')

# What a publication was for (the counters on /diagnostics and in the demo).
RELOCALIZED = 'relocalized'
JUMP = 'jump'
DISAGREEMENT = 'disagreement'
REQUESTED = 'requested'
EVERY_FRAME = 'every_frame'

_NS = 1_000_000_000


@dataclass(frozen=True)
class PosePolicyConf(Conf):
    """When ``~/pose`` is published (the relocalize node's parameters of the same names)."""

    pose_policy: str = option(
        'on_change',
        "When ~/pose is published: 'on_change' (going from lost to localized, or a jump of "
        "more than jump_m from the tracked belief; what /initialpose needs), 'every_frame' "
        "(every answer that reaches confidence_threshold) or 'on_request' (only the answer a "
        '~/relocalize call asks for)',
        choices=POLICIES,
        read_only=False,
    )
    confidence_threshold: float = option(
        0.8,
        'An answer is confident when its confidence reaches this: only confident answers are '
        'published on ~/pose or reported as loop closures (in filter mode the confidence is '
        'the probability that the robot is at the place; single-mode confidences are margins, '
        'for which about 0.3 suits)',
        min=0.0,
        max=1.0,
        read_only=False,
    )
    jump_m: float = option(
        10.0,
        'on_change: a confident answer further than this from where the tracked belief says '
        'the robot may be now is a jump (e.g. a kidnapped robot), and is published',
        unit='m',
        min=0.0,
        min_exclusive=True,
        read_only=False,
    )
    max_speed_mps: float = option(
        3.0,
        'Without odometry: the fastest the robot drives; since the last answer the belief may '
        "have advanced this far per second along the map's keyframe order",
        unit='m/s',
        min=0.0,
        read_only=False,
    )
    lost_after_s: float = option(
        30.0,
        'After this long without a confident answer (camera time) the node counts as lost, '
        'and on_change publishes its next confident answer',
        unit='s',
        min=0.0,
        min_exclusive=True,
        read_only=False,
    )
    request_timeout_s: float = option(
        10.0,
        '~/relocalize waits this long for an answer that reaches confidence_threshold, and '
        'publishes that one answer',
        unit='s',
        min=0.0,
        min_exclusive=True,
        read_only=False,
    )
    disagreement_m: float = option(
        3.0,
        'With localizer_pose_topic: on_change publishes only a confident answer further than '
        "this from the localizer's pose",
        unit='m',
        min=0.0,
        min_exclusive=True,
        read_only=False,
    )


class Belief(Protocol):
    """Where the robot may be now, from the answers the policy took (and whatever else the
    belief listens to: odometry, a localizer, a filter's posterior)."""

    def accept(self, hypothesis: Hypothesis, stamp_ns: int, *, published: bool) -> None:
        """A confident answer the policy took at ``stamp_ns`` (``published``: on ``~/pose``)."""

    def distance_m(self, position: np.ndarray, stamp_ns: int) -> float | None:
        """How far ``position`` (3,) is from where the robot may be at ``stamp_ns``; None
        when there is no belief (nothing accepted yet, or it was reset)."""

    def position_now(self, stamp_ns: int) -> np.ndarray | None:
        """The belief's best single position (3,) at ``stamp_ns``, or None."""

    def reset(self) -> None:
        """Forget the answers taken (the node is lost, paused or has a new map)."""


def _position(pose: Pose) -> np.ndarray:
    return np.array([pose.x, pose.y, pose.z], np.float64)


def _rotation(pose: Pose) -> Rotation:
    quaternion = np.array([pose.qx, pose.qy, pose.qz, pose.qw], np.float64)
    norm = float(np.linalg.norm(quaternion))
    if not np.isfinite(norm) or norm < 1e-9:
        return Rotation.identity()
    return Rotation.from_quat(quaternion / norm)


class KeyframeOrderBelief:
    """The last answer advanced along the map's keyframe order.

    Places of one traverse are stored in keyframe order, so a robot that drives along the
    map moves along that chain. Since the last accepted answer (place ``p`` at time ``t``),
    the robot may be anywhere on ``p``'s traverse within ``max_speed_mps * (now - t)`` of
    ``p`` along the chain; :meth:`distance_m` is the distance to the nearest such place (or
    to the answer itself). :meth:`position_now` advances the answer by the speed seen
    between the last two answers.

    Args:
        positions: (N, 3) place positions in map order (NaN: unknown).
        traverses: (N,) traverse of each place.
        max_speed_mps: how fast the robot may drive.
    """

    def __init__(
        self, positions: np.ndarray, traverses: np.ndarray, *, max_speed_mps: float
    ) -> None:
        self.max_speed_mps = float(max_speed_mps)
        self.set_map(positions, traverses)
        self.reset()

    def set_map(self, positions: np.ndarray, traverses: np.ndarray) -> None:
        """New place positions (e.g. moved by an optimised path); the answers taken stay,
        their place indices must still name the same places."""
        positions = np.asarray(positions, np.float64).reshape(-1, 3)
        traverses = np.asarray(traverses).reshape(-1)
        steps = np.zeros(len(positions))
        if len(positions) > 1:
            same = traverses[1:] == traverses[:-1]
            step = np.linalg.norm(np.diff(positions, axis=0), axis=1)
            steps[1:] = np.where(same & np.isfinite(step), step, 0.0)
        # Arc length along each traverse: cumulative steps, restarted at each traverse.
        cumulative = np.cumsum(steps)
        starts = np.ones(len(positions), bool)
        starts[1:] = traverses[1:] != traverses[:-1]
        start_index = np.maximum.accumulate(np.where(starts, np.arange(len(positions)), 0))
        self._arc = cumulative - cumulative[start_index] if len(positions) else cumulative
        self._positions = positions
        self._traverses = traverses
        self._known = np.isfinite(positions).all(axis=1)

    def reset(self) -> None:
        self._anchor: tuple[int, np.ndarray, int] | None = None  # (place, position, stamp)
        self._speed = 0.0  # along the chain, metres per second (signed)

    def accept(self, hypothesis: Hypothesis, stamp_ns: int, *, published: bool) -> None:
        if hypothesis.pose is None:
            return
        index = hypothesis.place_index
        if not 0 <= index < len(self._positions):
            index = -1
        previous, speed = self._anchor, 0.0
        # A published answer (lost -> localized, a jump) starts a new track at rest.
        if previous is not None and index >= 0 and previous[0] >= 0 and not published:
            dt = (stamp_ns - previous[2]) / _NS
            if dt > 0 and self._traverses[index] == self._traverses[previous[0]]:
                observed = (self._arc[index] - self._arc[previous[0]]) / dt
                limit = self.max_speed_mps
                speed = 0.5 * self._speed + 0.5 * float(np.clip(observed, -limit, limit))
        self._speed = speed
        self._anchor = (index, _position(hypothesis.pose), stamp_ns)

    def _reachable(self, stamp_ns: int) -> np.ndarray:
        """(M, 3) positions the robot may have reached since the last answer."""
        assert self._anchor is not None
        index, position, then = self._anchor
        if index < 0:
            return position[None]
        reach = self.max_speed_mps * max(0.0, (stamp_ns - then) / _NS)
        mask = (
            (self._traverses == self._traverses[index])
            & (np.abs(self._arc - self._arc[index]) <= reach)
            & self._known
        )
        return np.concatenate([position[None], self._positions[mask]])

    def distance_m(self, position: np.ndarray, stamp_ns: int) -> float | None:
        if self._anchor is None:
            return None
        reachable = self._reachable(stamp_ns)
        return float(np.linalg.norm(reachable - np.asarray(position)[None, :3], axis=1).min())

    def position_now(self, stamp_ns: int) -> np.ndarray | None:
        if self._anchor is None:
            return None
        index, position, then = self._anchor
        if index < 0 or self._speed == 0.0:
            return position
        chain = (self._traverses == self._traverses[index]) & self._known
        arc = self._arc[chain]
        target = self._arc[index] + self._speed * max(0.0, (stamp_ns - then) / _NS)
        target = float(np.clip(target, arc.min(), arc.max()))
        points = self._positions[chain]
        return np.array([np.interp(target, arc, points[:, axis]) for axis in range(3)])


class OdometryBelief:
    """The last answer moved by the odometry since (dead reckoning).

    The odometry's motion between the answer's stamp and now, taken in the robot's frame at
    the answer, is applied to the answer's map pose. Where odometry is missing (none within
    ``max_gap_s`` of a stamp), the ``fallback`` belief answers.

    Args:
        fallback: the belief without odometry (keyframe order).
        max_gap_s: an odometry sample further than this from a stamp does not describe it.
        history: odometry samples kept.
    """

    def __init__(
        self, fallback: KeyframeOrderBelief, *, max_gap_s: float = 1.0, history: int = 5000
    ) -> None:
        self.fallback = fallback
        self._max_gap_ns = round(max_gap_s * _NS)
        self._lock = threading.Lock()  # odometry arrives on another thread than answers
        self._stamps: deque[int] = deque(maxlen=history)
        self._poses: deque[Pose] = deque(maxlen=history)
        self.out_of_order = 0
        self.reset()

    def add_odometry(self, stamp_ns: int, pose: Pose) -> None:
        """One odometry sample (odometry frame); samples older than the newest are counted
        in ``out_of_order`` and dropped."""
        with self._lock:
            if self._stamps and stamp_ns < self._stamps[-1]:
                self.out_of_order += 1
                return
            self._stamps.append(stamp_ns)
            self._poses.append(pose)

    def odometry_at(self, stamp_ns: int) -> Pose | None:
        """The odometry sample nearest ``stamp_ns``, if within ``max_gap_s``."""
        with self._lock:
            if not self._stamps:
                return None
            stamps = self._stamps
            i = bisect_left(stamps, stamp_ns)
            best = min(
                (j for j in (i - 1, i) if 0 <= j < len(stamps)),
                key=lambda j: abs(stamps[j] - stamp_ns),
            )
            near = abs(stamps[best] - stamp_ns) <= self._max_gap_ns
            return self._poses[best] if near else None

    def reset(self) -> None:
        self._anchor: tuple[Pose, Pose | None] | None = None  # (map pose, odometry there)
        self.fallback.reset()

    def accept(self, hypothesis: Hypothesis, stamp_ns: int, *, published: bool) -> None:
        self.fallback.accept(hypothesis, stamp_ns, published=published)
        if hypothesis.pose is not None:
            self._anchor = (hypothesis.pose, self.odometry_at(stamp_ns))

    def _dead_reckoned(self, stamp_ns: int) -> np.ndarray | None:
        if self._anchor is None:
            return None
        answer, odometry_then = self._anchor
        odometry_now = self.odometry_at(stamp_ns)
        if odometry_then is None or odometry_now is None:
            return None
        moved = (
            _rotation(odometry_then)
            .inv()
            .apply(_position(odometry_now) - _position(odometry_then))
        )
        result: np.ndarray = _position(answer) + _rotation(answer).apply(moved)
        return result

    def distance_m(self, position: np.ndarray, stamp_ns: int) -> float | None:
        now = self._dead_reckoned(stamp_ns)
        if now is None:
            return self.fallback.distance_m(position, stamp_ns)
        return float(np.linalg.norm(now - np.asarray(position)[:3]))

    def position_now(self, stamp_ns: int) -> np.ndarray | None:
        now = self._dead_reckoned(stamp_ns)
        return now if now is not None else self.fallback.position_now(stamp_ns)


class LocalizerBelief:
    """The localizer's own pose (localizer supervision).

    After the node publishes a pose, the localizer needs a moment to take it: until the
    localizer reports a pose stamped at or after that publication, the ``fallback`` belief
    (anchored at the published answer) answers instead, so the same correction is not
    published twice.

    Args:
        fallback: the node's own belief (keyframe order or odometry).
    """

    def __init__(self, fallback: KeyframeOrderBelief | OdometryBelief) -> None:
        self.fallback = fallback
        self._lock = threading.Lock()  # the localizer's poses arrive on another thread
        self._localizer: tuple[int, np.ndarray] | None = None
        self.reset()

    def add_localizer_pose(self, stamp_ns: int, position: np.ndarray) -> None:
        """The localizer's newest estimate (map frame)."""
        with self._lock:
            if self._localizer is None or stamp_ns >= self._localizer[0]:
                self._localizer = (stamp_ns, np.asarray(position, np.float64).reshape(-1)[:3])

    def reset(self) -> None:
        self._published_ns: int | None = None
        self.fallback.reset()

    def accept(self, hypothesis: Hypothesis, stamp_ns: int, *, published: bool) -> None:
        self.fallback.accept(hypothesis, stamp_ns, published=published)
        if published:
            self._published_ns = stamp_ns

    def localizer_position(self) -> np.ndarray | None:
        """The localizer's pose, unless it predates the node's last publication."""
        with self._lock:
            localizer = self._localizer
        if localizer is None:
            return None
        stamp, position = localizer
        if self._published_ns is not None and stamp < self._published_ns:
            return None
        return position

    def distance_m(self, position: np.ndarray, stamp_ns: int) -> float | None:
        localizer = self.localizer_position()
        if localizer is None:
            return self.fallback.distance_m(position, stamp_ns)
        return float(np.linalg.norm(localizer - np.asarray(position)[:3]))

    def position_now(self, stamp_ns: int) -> np.ndarray | None:
        localizer = self.localizer_position()
        return localizer if localizer is not None else self.fallback.position_now(stamp_ns)


@dataclass(frozen=True)
class PoseDecision:
    """Whether one frame's best hypothesis is published on ``~/pose``, and why.

    ``kind`` names the cause of a publication (``relocalized``, ``jump``, ``disagreement``,
    ``requested``, ``every_frame``) and is empty when nothing is published; ``reason`` says
    it in words (with the distance for a jump).
    """

    publish: bool
    reason: str
    kind: str = ''


class PoseRequest:
    """A one-shot request for the next confident answer (``~/relocalize``)."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self.hypothesis: Hypothesis | None = None
        self.stamp_ns = 0

    def fulfil(self, hypothesis: Hypothesis, stamp_ns: int) -> None:
        self.hypothesis, self.stamp_ns = hypothesis, stamp_ns
        self._done.set()

    def wait(self, timeout_s: float) -> bool:
        """Wait until an answer came; False after ``timeout_s``."""
        return self._done.wait(timeout_s)


@dataclass
class _State:
    last_confident_ns: int | None = None
    requests: list[PoseRequest] = field(default_factory=list)


class PosePolicy:
    """Decides, frame by frame, whether the best hypothesis goes out on ``~/pose``.

    Thread-safe: the node's worker decides while services request and parameters change.

    Args:
        conf: the settings (``PosePolicyConf``).
        belief: where the robot may be now (see the module docstring).
        supervised: the belief is a localizer's (``LocalizerBelief``): ``on_change``
            publishes on disagreement with it instead of on lost-to-localized and jumps.
    """

    def __init__(self, conf: PosePolicyConf, belief: Belief, *, supervised: bool = False) -> None:
        self.conf = conf
        self.belief = belief
        self.supervised = supervised
        self._lock = threading.Lock()
        self._state = _State()
        self.published = SkipCounter()
        """Publications by kind (``PoseDecision.kind``)."""

    def set_conf(self, conf: PosePolicyConf) -> None:
        """New settings (a run-time parameter change), from the next frame."""
        with self._lock:
            self.conf = conf

    def reset(self) -> None:
        """The node is lost again (a pause, a new map): forget the belief; pending requests
        stay armed."""
        with self._lock:
            self._state.last_confident_ns = None
            self.belief.reset()

    def request(self) -> PoseRequest:
        """Arm a one-shot publication of the next confident answer."""
        request = PoseRequest()
        with self._lock:
            self._state.requests.append(request)
        return request

    def cancel(self, request: PoseRequest) -> None:
        """Withdraw a request (it timed out)."""
        with self._lock:
            if request in self._state.requests:
                self._state.requests.remove(request)

    def is_confident(self, best: Hypothesis | None) -> bool:
        return (
            best is not None
            and best.pose is not None
            and best.confidence >= self.conf.confidence_threshold
        )

    def decide(self, best: Hypothesis | None, stamp_ns: int) -> PoseDecision:
        """Whether to publish ``best`` (a frame's best hypothesis, or None) on ``~/pose``."""
        with self._lock:
            conf, state = self.conf, self._state
            if best is None or not self.is_confident(best):
                return PoseDecision(False, 'no confident answer')
            assert best.pose is not None  # is_confident
            lost = (
                state.last_confident_ns is None
                or stamp_ns - state.last_confident_ns > conf.lost_after_s * _NS
            )
            if state.last_confident_ns is None or stamp_ns > state.last_confident_ns:
                state.last_confident_ns = stamp_ns
            decision = self._by_policy(conf, best, stamp_ns, lost)
            if state.requests:
                requests, state.requests = state.requests, []
                for request in requests:
                    request.fulfil(best, stamp_ns)
                if not decision.publish:
                    decision = PoseDecision(True, 'requested on ~/relocalize', REQUESTED)
            self.belief.accept(best, stamp_ns, published=decision.publish)
            if decision.publish:
                self.published.add(decision.kind)
            return decision

    def _by_policy(
        self, conf: PosePolicyConf, best: Hypothesis, stamp_ns: int, lost: bool
    ) -> PoseDecision:
        if conf.pose_policy == 'every_frame':
            return PoseDecision(True, 'every confident frame (every_frame)', EVERY_FRAME)
        if conf.pose_policy == 'on_request':
            return PoseDecision(False, 'not requested (on_request)')
        assert best.pose is not None
        distance = self.belief.distance_m(_position(best.pose), stamp_ns)
        if self.supervised:
            if distance is None:
                return PoseDecision(True, 'relocalized (no localizer pose yet)', RELOCALIZED)
            if distance > conf.disagreement_m:
                return PoseDecision(
                    True, f'disagrees with the localizer by {distance:.1f} m', DISAGREEMENT
                )
            return PoseDecision(False, f'agrees with the localizer ({distance:.1f} m)')
        if lost or distance is None:
            return PoseDecision(True, 'relocalized (was lost)', RELOCALIZED)
        if distance > conf.jump_m:
            return PoseDecision(True, f'jump of {distance:.1f} m from the tracked belief', JUMP)
        return PoseDecision(False, f'consistent with the tracked belief ({distance:.1f} m)')
