"""Place evidence: what turns one frame's scores into ranked, confident hypotheses.

The relocalization pipeline (``vpr_ros.relocalization``) describes a frame, retrieves and
re-ranks candidates, and hands what it found to the *evidence* of its mode as an
``Observation``. The evidence keeps whatever history it needs (per camera stream) and
answers with hypotheses, best first, each with a confidence in [0, 1]. This is the seam
where single-frame confidence, sequence matching and filters over places plug in:

* ``single``: each frame on its own; the confidence is the margin of a candidate's score
  over its best competitor (``confidences``);
* ``sequence``: each stream's recent frames matched along the map's keyframe order
  (``vpr_ros.sequence.SequenceMatcher``);
* ``filter`` (the default): one belief over the map's places and off-map, moved by
  odometry or the keyframe order and weighed by every source a frame gives
  (``vpr_ros.place_filter``); the confidence is the posterior probability of the place.

An evidence class says in ``needs`` what the pipeline must compute per frame, so that a
mode that does not use, say, re-ranking does not pay for it. ``EVIDENCE`` maps mode names
to factories.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from vpr_ros.errors import ConfigError
from vpr_ros.types import Hypothesis, Pose, RelativePose

if TYPE_CHECKING:
    from vpr_ros.database import PlaceDatabase
    from vpr_ros.relocalization import RelocalizationConf
    from vpr_ros.sequence import SequenceConf, SequenceMatcher

# What a frame can give the evidence; the pipeline computes only what ``needs`` lists.
RETRIEVAL = 'retrieval'  # candidates and their global similarities (faiss)
RERANK = 'rerank'  # re-ranking scores of the best rerank_k candidates
GLOBAL = 'global'  # the query's global descriptor
SEQUENCE = 'sequence'  # the query's patch-normalised sequence descriptor


@dataclass
class Observation:
    """What one frame gave, for the evidence of the pipeline's mode.

    Attributes:
        stream: the camera stream the frame came from (each has its own history).
        candidates: (K,) map place indices from retrieval, best first (may be empty).
        global_scores: (K,) their global similarities.
        rerank_scores: (R,) re-ranking scores of ``candidates[:R]``, or None.
        rerank_inliers: (R,) their RANSAC inliers (verifying re-rankers), or None.
        relative_poses: (R,) the query's pose relative to each of them, where known, or None.
        global_descriptor: (D,) the query's global descriptor, or None.
        sequence_descriptor: (S,) the query's patch-normalised descriptor, or None.
        stamp: when the frame was taken (s), or None.
        allowed: (N,) bool, the places a position prior allows (None: all).
        odometry_xyz: the robot's odometry position at the frame (any fixed frame), or None.
    """

    stream: Hashable
    candidates: np.ndarray
    global_scores: np.ndarray
    rerank_scores: np.ndarray | None = None
    rerank_inliers: np.ndarray | None = None
    relative_poses: Sequence[RelativePose | None] | None = None
    global_descriptor: np.ndarray | None = None
    sequence_descriptor: np.ndarray | None = None
    stamp: float | None = None
    odometry_xyz: np.ndarray | None = None
    allowed: np.ndarray | None = None


class PlaceEvidence(Protocol):
    """Turns observations into hypotheses, best first, with confidences in [0, 1]."""

    needs: frozenset[str]

    def update(self, observation: Observation) -> list[Hypothesis]:
        """Take one frame's observation; the hypotheses after it."""

    def reset(self) -> None:
        """Forget every stream's history (after a pause or a jump)."""


def make_hypotheses(
    database: PlaceDatabase,
    indices: Sequence[int] | np.ndarray,
    global_scores: Sequence[float] | np.ndarray,
    rerank_scores: Sequence[float] | np.ndarray | None,
    confidence: Sequence[float] | np.ndarray,
    *,
    inliers: Sequence[int] | np.ndarray | None = None,
    relative_poses: Sequence[RelativePose | None] | None = None,
) -> list[Hypothesis]:
    """Hypotheses for map places ``indices``, in the given order (the one constructor).

    ``rerank_scores`` None gives NaN re-ranking scores; poses come from the map (None where a
    place has no pose); ``inliers`` None gives -1 (not verified), ``relative_poses`` None
    gives None.
    """
    indices = np.asarray(indices, np.int64).reshape(-1)
    place_ids = database.places['place_id'][indices]
    poses = database.poses_of(indices)  # O(K): database.poses would build all N per frame
    rerank = np.full(len(indices), np.nan) if rerank_scores is None else np.asarray(rerank_scores)
    return [
        Hypothesis(
            place_index=int(indices[i]),
            place_id=int(place_ids[i]),
            global_score=float(global_scores[i]),
            rerank_score=float(rerank[i]),
            confidence=float(confidence[i]),
            pose=Pose.from_row(poses[i]),
            inliers=-1 if inliers is None else int(inliers[i]),
            relative_pose=None if relative_poses is None else relative_poses[i],
        )
        for i in range(len(indices))
    ]


def confidences(
    scores: np.ndarray,
    positions: np.ndarray | None = None,
    *,
    competitor_radius_m: float = 10.0,
    noise_floor: float = 0.05,
) -> np.ndarray:
    """Confidence in [0, 1] for each scored candidate of one frame.

    A place is trusted when it beats its best competitor clearly. The competitor of the
    candidate i is the best other candidate more than ``competitor_radius_m`` away
    (neighbouring keyframes of the same place are not competitors); without positions,
    every other candidate competes. ``noise_floor`` is the score unrelated images reach
    anyway, so a weak best candidate with no competitor is not trusted either.
    confidence_i = clip((s_i - max(s_competitor, noise_floor)) / s_i, 0, 1).
    """
    scores = np.asarray(scores, np.float64)
    out = np.zeros(len(scores), np.float32)
    for i, score in enumerate(scores):
        others = np.ones(len(scores), bool)
        others[i] = False
        if positions is not None:
            # A place with an unknown position may be anywhere: it competes.
            dist = np.linalg.norm(positions - positions[i], axis=1)
            others &= ~(dist <= competitor_radius_m)
        competitor = max(scores[others].max(initial=0.0), noise_floor)
        out[i] = np.clip((score - competitor) / score, 0.0, 1.0) if score > 0 else 0.0
    return out


class SingleFrameEvidence:
    """Each frame on its own: re-ranked candidates first (ties broken by the global
    similarity), then confidences from the margin over competitors (``confidences``).
    Without re-ranking the global similarity is the score."""

    def __init__(self, database: PlaceDatabase, conf: RelocalizationConf) -> None:
        self.database = database
        self.competitor_radius_m = conf.competitor_radius_m
        self.noise_floor = conf.noise_floor
        self.needs = frozenset({RETRIEVAL, RERANK} if conf.rerank_k > 0 else {RETRIEVAL})

    def update(self, observation: Observation) -> list[Hypothesis]:
        ids, global_scores = observation.candidates, observation.global_scores
        rerank_scores = observation.rerank_scores
        if rerank_scores is not None:
            head = len(rerank_scores)
            ids, global_scores = ids[:head], global_scores[:head]
            scores = np.asarray(rerank_scores, np.float64)
        else:
            scores = np.clip(global_scores, 0, None)
        # Read from the map each frame: a live map grows, and an optimised path moves places.
        conf = confidences(
            scores,
            self.database.poses_of(ids)[:, :3],
            competitor_radius_m=self.competitor_radius_m,
            noise_floor=self.noise_floor,
        )
        if rerank_scores is not None:
            # Ties in the re-ranking score fall back to the global similarity.
            order = np.lexsort((-np.asarray(global_scores), -scores))
        else:
            order = np.arange(len(ids))
        inliers, poses = observation.rerank_inliers, observation.relative_poses
        return make_hypotheses(
            self.database,
            ids[order],
            global_scores[order],
            None if rerank_scores is None else scores[order],
            conf[order],
            inliers=None if inliers is None else np.asarray(inliers)[order],
            relative_poses=None if poses is None else [poses[i] for i in order],
        )

    def reset(self) -> None:
        """Nothing to forget: every frame stands alone."""


class SequenceEvidence:
    """Each camera stream's recent frames matched along the map's keyframe order.

    ``rerank_score`` holds the trajectory's sequence score (mean enhanced similarity,
    higher is better), ``confidence`` the sequence confidence (0 for all but the best).
    ``global_score`` is the query's global similarity to the place when matching on global
    descriptors; on patch-normalised pixels it is NaN: the model does not run at all then.

    Raises:
        ConfigError: patch-normalised matching on a map that stores no sequence descriptors.
    """

    def __init__(self, database: PlaceDatabase, conf: RelocalizationConf) -> None:
        self.database = database
        self.conf, self._map_descriptors = sequence_setup(database, conf.sequence)
        self.sequence_conf = self.conf
        # Patch-normalised pixels need no model: the frame is never described.
        self.needs = frozenset({GLOBAL if self.conf.descriptor == 'global' else SEQUENCE})
        self._matchers: dict[Hashable, SequenceMatcher] = {}

    def update(self, observation: Observation) -> list[Hypothesis]:
        query = (
            observation.global_descriptor
            if self.conf.descriptor == 'global'
            else observation.sequence_descriptor
        )
        assert query is not None, 'the pipeline computes what needs lists'
        matches = self._matcher(observation.stream).update(query)
        indices = np.array([m.place_index for m in matches], np.int64)
        query_global = observation.global_descriptor
        if query_global is not None and len(indices):
            global_scores = self.database.global_descriptors[indices] @ query_global
        else:
            global_scores = np.full(len(indices), np.nan)
        return make_hypotheses(
            self.database,
            indices,
            global_scores,
            [m.score for m in matches],
            [m.confidence for m in matches],
        )

    def reset(self) -> None:
        self._matchers.clear()

    def _matcher(self, stream: Hashable) -> SequenceMatcher:
        from vpr_ros.sequence import SequenceMatcher

        if stream not in self._matchers:
            self._matchers[stream] = SequenceMatcher(
                self._map_descriptors,
                self.database.places['traverse'],
                self.conf,
                place_xyz=self.database.poses[:, :3],
            )
        return self._matchers[stream]


def sequence_setup(database: PlaceDatabase, conf: SequenceConf) -> tuple[SequenceConf, np.ndarray]:
    """Sequence settings and the map descriptors they match against.

    Patch-normalised descriptors must have been stored in the map; the map decides how its
    images were described, so its image settings override ``conf``'s.

    Raises:
        ConfigError: ``patch_norm`` on a map without sequence descriptors.
    """
    if conf.descriptor == 'global':
        return conf, np.asarray(database.global_descriptors, np.float32)
    if database.sequence_descriptors is None or database.sequence_conf is None:
        msg = (
            'sequence matching on patch-normalised pixels needs a map built with sequence '
            "descriptors (build_map stores them by default); or set descriptor: 'global'"
        )
        raise ConfigError(msg)
    conf = conf.replace(**database.sequence_conf)
    return conf, np.asarray(database.sequence_descriptors, np.float32)


class FilterEvidence:
    """One place filter (``vpr_ros.place_filter``) fed by every camera stream.

    Without odometry the first stream seen drives the keyframe-order motion and the others
    add their evidence where the belief is (two cameras on one robot see one place). The
    hypotheses are the most probable places, one per region, with the posterior mass of
    their region as ``confidence``; ``rerank_score`` is the place's re-ranking score where
    it was re-ranked this frame (NaN elsewhere).
    """

    def __init__(self, database: PlaceDatabase, conf: RelocalizationConf) -> None:
        from vpr_ros.place_filter import (
            GLOBAL_SOURCE,
            PATCH_SOURCE,
            RERANK_SOURCE,
            PlaceFilter,
        )

        self.database = database
        self.conf = conf.filter
        self.count = conf.rerank_k or conf.top_k
        sources = set(self.conf.sources)
        descriptors: dict[str, np.ndarray] = {}
        needs = {RETRIEVAL, GLOBAL}  # retrieval: candidates to re-rank and to rank after
        # The patch source first: its keyframe steps are the cleaner motion cue.
        self.sequence_conf: SequenceConf | None = None
        if PATCH_SOURCE in sources and database.sequence_descriptors is not None:
            self.sequence_conf, descriptors[PATCH_SOURCE] = sequence_setup(
                database, conf.sequence.replace(descriptor='patch_norm')
            )
            needs.add(SEQUENCE)
        descriptors[GLOBAL_SOURCE] = np.asarray(database.global_descriptors, np.float32)
        if RERANK_SOURCE in sources and conf.rerank_k > 0:
            needs.add(RERANK)
        self.needs = frozenset(needs)
        self.filter = PlaceFilter(
            descriptors,
            database.places['traverse'],
            database.poses[:, :3],
            self.conf,
            competitor_radius_m=conf.competitor_radius_m,
        )
        self._driving_stream: Hashable | None = None

    def update(self, observation: Observation) -> list[Hypothesis]:
        from vpr_ros.place_filter import GLOBAL_SOURCE, PATCH_SOURCE

        queries: dict[str, np.ndarray] = {}
        if observation.sequence_descriptor is not None:
            queries[PATCH_SOURCE] = observation.sequence_descriptor
        if observation.global_descriptor is not None:
            queries[GLOBAL_SOURCE] = observation.global_descriptor
        rerank = None
        if observation.rerank_scores is not None:
            head = observation.candidates[: len(observation.rerank_scores)]
            rerank = (head, np.asarray(observation.rerank_scores))
        if self._driving_stream is None:
            self._driving_stream = observation.stream
        odometry = observation.odometry_xyz
        # With odometry every frame moves the belief by what the robot travelled since the
        # last one; without, only the driving stream's image steps do.
        move = odometry is not None or observation.stream == self._driving_stream
        self.filter.update(
            queries,
            rerank=rerank,
            odometry_xyz=odometry,
            stamp=observation.stamp,
            move=move,
            allowed=observation.allowed,
        )
        places, confidence = self.filter.best_places(self.count)
        global_scores = np.full(len(places), np.nan)
        query_global = observation.global_descriptor
        if query_global is not None and len(places):
            global_scores = self.database.global_descriptors[places] @ query_global
        rerank_scores = np.full(len(places), np.nan)
        if rerank is not None:
            scored = dict(zip(rerank[0].tolist(), rerank[1].tolist(), strict=True))
            rerank_scores = np.array([scored.get(int(p), np.nan) for p in places])
        return make_hypotheses(self.database, places, global_scores, rerank_scores, confidence)

    def reset(self) -> None:
        self.filter.reset()
        self._driving_stream = None


EVIDENCE: dict[str, Callable[[PlaceDatabase, RelocalizationConf], PlaceEvidence]] = {
    'filter': FilterEvidence,
    'single': SingleFrameEvidence,
    'sequence': SequenceEvidence,
}
"""Evidence by mode name (``RelocalizationConf.mode``)."""
