"""Loop closure: one map that grows as the robot drives and is queried at the same time
(ROS-free).

A SLAM stack needs to know when the robot is back at a place it saw long ago. The
:class:`LoopClosureDetector` takes each camera frame with its pose from the SLAM stack (its
odometry or keyframe poses), and

1. describes it once (the model's forward pass);
2. matches it against the map's places, except the *recent past*: places younger than
   ``exclusion_s`` (camera stamps) or nearer along the trajectory than ``exclusion_m``
   (distance driven since). Those always look alike and close no loop;
3. reports the confident matches (:class:`LoopClosure`: the query's stamp, the matched
   place's stamp and id, the scores, and the relative pose when a verifier gives one), once
   at least ``min_places`` places lie outside the recent past (a confidence is a margin over
   competitors, and a handful of old places are too few to compete);
4. adds the frame to the map when the keyframe rule keeps it (with the same descriptors).

The map follows the SLAM back end's graph optimisation: :func:`update_place_poses` moves
places to the poses of an optimised trajectory (``nav_msgs/Path`` in the node), matched by
the places' stamps. Every place records the stamp of the image it came from
(``places.npy`` ``stamp_ns``), so a closure names both ends by stamp.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from vpr_ros.config import Conf, nested, option
from vpr_ros.database import POSE_FIELDS, PlaceDatabase
from vpr_ros.errors import ConfigError
from vpr_ros.evidence import RETRIEVAL
from vpr_ros.geometry import PoseTrack, distance_m
from vpr_ros.keyframes import KeyframeConf
from vpr_ros.mapping import BuildConf, MapBuilder
from vpr_ros.relocalization import RelocalizationConf, Relocalizer
from vpr_ros.rerankers import RERANKERS
from vpr_ros.types import CameraIntrinsics, Frame, Hypothesis, Pose

if TYPE_CHECKING:
    from vpr_ros.models.base import VprModel

_NS = 1_000_000_000


@dataclass(frozen=True)
class LoopClosureConf(Conf):
    """What counts as the recent past, and which frames join the growing map."""

    exclusion_s: float = option(
        30.0,
        'Places younger than this (camera stamps) are the recent past and never matched',
        unit='s',
        min=0.0,
        read_only=False,
    )
    exclusion_m: float = option(
        20.0,
        'Places nearer than this along the trajectory (the distance driven since the place) '
        'are the recent past and never matched',
        unit='m',
        min=0.0,
        read_only=False,
    )
    confidence_threshold: float = option(
        0.3,
        'A match at least this confident is a loop closure (single-frame confidence: the '
        'margin of its re-ranking score over the best competitor)',
        min=0.0,
        max=1.0,
        read_only=False,
    )
    min_places: int = option(
        10,
        'Loop closures are reported once at least this many places lie outside the recent '
        'past: against fewer, a match has too few competitors for its confidence to mean much',
        min=1,
        read_only=False,
    )
    keyframes: KeyframeConf = nested(KeyframeConf, flatten=True)


@dataclass(frozen=True)
class LoopClosure:
    """A query frame recognised as an old place.

    ``trajectory_gap_m``: the distance driven from the place to the query (NaN for places of
    a map loaded from disk, which were driven in another run).
    """

    query_stamp_ns: int
    place_stamp_ns: int
    hypothesis: Hypothesis
    trajectory_gap_m: float


@dataclass
class LoopClosureResult:
    """One frame: the hypotheses among the places it may close a loop with (best first),
    the confident ones as closures, whether the frame joined the map, and timings (s)."""

    hypotheses: list[Hypothesis]
    closures: list[LoopClosure]
    added: bool
    timings: dict[str, float] = field(default_factory=dict)


def single_frame(relocalization: RelocalizationConf) -> RelocalizationConf:
    """The matching settings loop closure runs: each frame on its own.

    The place filter (the default mode) tracks a robot on a fixed map; against a map that
    grows under it, loop closure matches each frame alone, so ``filter`` runs as ``single``.

    Raises:
        ConfigError: mode ``sequence`` (it assumes a fixed map's keyframe order).
    """
    if relocalization.mode == 'filter':
        return relocalization.replace(mode='single')
    if relocalization.mode != 'single':
        msg = (
            f"loop closure matches each frame on its own (mode 'single'), got mode "
            f'{relocalization.mode!r}; set mode: single'
        )
        raise ConfigError(msg)
    return relocalization


class LoopClosureDetector:
    """Maps and queries at once; see the module docstring.

    Args:
        model: the descriptor model.
        conf: exclusion and keyframe settings.
        relocalization: how frames are matched (its mode must retrieve: ``single``).
        database: a map to start from (same model), e.g. an earlier session; None: empty.
        num_threads: torch threads.

    Raises:
        ConfigError: a matching mode that does not retrieve (sequence matching assumes a
            fixed map).
        DatabaseError: ``database`` was built with another model.
    """

    def __init__(
        self,
        model: VprModel,
        conf: LoopClosureConf,
        relocalization: RelocalizationConf,
        *,
        database: PlaceDatabase | None = None,
        num_threads: int | None = None,
    ) -> None:
        from vpr_ros.extraction import as_extractor

        relocalization = single_frame(relocalization)
        stored = [name for name in relocalization.rerankers if RERANKERS[name].store]
        build = BuildConf(
            keyframes=conf.keyframes,
            batch_size=1,
            sequence_descriptors=False,
            verifiers=','.join(stored),
        )
        self.conf = conf
        self.relocalization = relocalization
        self.model = model
        self.builder = MapBuilder(model, build, database=database, num_threads=num_threads)
        self.builder.start_traverse()
        self.database = self.builder.database
        self.extractor = as_extractor(model, batch_size=1, num_threads=num_threads)
        self._num_threads = num_threads
        self._relocalizer: Relocalizer | None = None
        # Distance driven when each place was added (NaN: a place of a loaded map).
        self._odometer = np.full(len(self.database), np.nan)
        self.travelled_m = 0.0
        self._last_pose: Pose | None = None

    def set_conf(self, conf: LoopClosureConf, relocalization: RelocalizationConf) -> None:
        """New exclusion and matching settings (run-time parameters), from the next frame."""
        relocalization = single_frame(relocalization)
        self.conf = conf
        if relocalization != self.relocalization:
            self.relocalization, self._relocalizer = relocalization, None

    def excluded(self, stamp_ns: int) -> np.ndarray:
        """(N,) bool: the places that are the recent past of a query at ``stamp_ns``."""
        age_s = (stamp_ns - self.database.places['stamp_ns']) / _NS
        recent = age_s < self.conf.exclusion_s
        driven = self.travelled_m - self._odometer
        near: np.ndarray = np.isfinite(driven) & (driven < self.conf.exclusion_m)
        result: np.ndarray = recent | near
        return result

    def relocalizer(self) -> Relocalizer:
        """The matcher over the growing map (made once the map has a place)."""
        if self._relocalizer is None:
            self._relocalizer = Relocalizer(
                self.model, self.database, self.relocalization, num_threads=self._num_threads
            )
            if RETRIEVAL not in self._relocalizer.needs:  # pragma: no cover - mode checked
                raise ConfigError('loop closure needs a matching mode that retrieves')
        return self._relocalizer

    def process(
        self,
        image: np.ndarray,
        stamp_ns: int,
        pose: Pose | None,
        *,
        confidence_threshold: float,
        frame_id: str = '',
        pose_frame_id: str = '',
        stream: Hashable = 0,
        camera: CameraIntrinsics | None = None,
    ) -> LoopClosureResult:
        """Match one RGB frame against the map's older places, then offer it to the map.

        Args:
            image: RGB uint8 (H, W, 3).
            stamp_ns: the frame's stamp.
            pose: its pose from the SLAM stack (None: matched, but not added to the map).
            confidence_threshold: a hypothesis at least this confident is a loop closure.
            frame_id, pose_frame_id: the camera's and the pose's frame ids (kept per place).
            stream: the camera the frame came from.
            camera: its intrinsics, when known (verified closures then carry a relative pose).
        """
        timings: dict[str, float] = {}
        started = time.perf_counter()
        descriptors = self.extractor.extract([image])
        timings['extract'] = time.perf_counter() - started
        if pose is not None:
            if self._last_pose is not None:
                self.travelled_m += distance_m(pose, self._last_pose)
            self._last_pose = pose
        hypotheses: list[Hypothesis] = []
        excluded = self.excluded(stamp_ns)
        matchable = len(excluded) - int(np.count_nonzero(excluded))
        if matchable:
            result = self.relocalizer().relocalize_described(
                image, descriptors, stream, camera, exclude=excluded
            )
            hypotheses = [h for h in result.hypotheses if not excluded[h.place_index]]
            timings.update(result.timings)
        closures = [
            LoopClosure(
                query_stamp_ns=stamp_ns,
                place_stamp_ns=int(self.database.places['stamp_ns'][h.place_index]),
                hypothesis=h,
                trajectory_gap_m=float(self.travelled_m - self._odometer[h.place_index]),
            )
            for h in hypotheses
            if h.confidence >= confidence_threshold and matchable >= self.conf.min_places
        ]
        added = False
        if pose is not None:
            begun = time.perf_counter()
            frame = Frame(image, stamp_ns, frame_id, pose, pose_frame_id)
            added = self.builder.offer(frame, descriptors)
            if added:
                self._odometer = np.append(self._odometer, self.travelled_m)
            timings['add'] = time.perf_counter() - begun
        return LoopClosureResult(hypotheses, closures, added, timings)


def update_place_poses(
    database: PlaceDatabase,
    stamps_ns: Sequence[int] | np.ndarray,
    poses: Sequence[Pose] | np.ndarray,
    *,
    max_gap_ns: int,
) -> np.ndarray:
    """Move places to the poses of an optimised trajectory, matched by stamp.

    Each place whose stamp is one of ``stamps_ns``, or lies between two of them at most
    ``max_gap_ns`` apart, takes the trajectory's pose there (positions interpolated linearly,
    orientations by slerp). Places outside the trajectory keep their poses.

    Args:
        database: the map; its place poses change in place.
        stamps_ns: (M,) stamps of the optimised poses (e.g. the SLAM keyframes).
        poses: (M,) poses, or an (M, 7) array x y z qx qy qz qw.
        max_gap_ns: largest gap between two trajectory poses a place may be interpolated in.

    Returns:
        The indices of the places that moved.

    Raises:
        ValueError: mismatched lengths, or a quaternion without a norm.
    """
    values = np.array(
        [p.as_array() if isinstance(p, Pose) else np.asarray(p, np.float64) for p in poses],
        np.float64,
    ).reshape(-1, 7)
    if len(values) == 0 or len(database) == 0:
        return np.zeros(0, np.int64)
    track = PoseTrack(stamps_ns, values[:, :3], values[:, 3:])
    positions, quaternions, valid = track.interpolate_many(
        database.places['stamp_ns'], max_gap_ns=max_gap_ns
    )
    moved = np.flatnonzero(valid)
    new = np.concatenate([positions, quaternions], axis=1)
    for column, name in enumerate(POSE_FIELDS):
        database.places[name][moved] = new[moved, column]
    return moved
