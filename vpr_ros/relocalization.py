"""The relocalization pipeline, ROS-free: image in, ranked place hypotheses out.

Per frame: describe the image (the model) -> retrieve ``top_k`` candidates by global
descriptor (the map's ``Index``) -> re-score the best ``rerank_k`` (a ``Reranker``) ->
optionally verify the best ``verify_k`` of those with a second, stronger re-ranker (the
``verifier``, e.g. top-20 -> MNN -> top-3 verified by XFeat + LighterGlue) -> the mode's
``PlaceEvidence`` turns that into hypotheses with confidences. Each stage runs only when
the evidence needs it (``PlaceEvidence.needs``): sequence matching on patch-normalised
pixels runs no model at all. The model runs behind the ``extraction.Extractor`` seam (torch
or ONNX Runtime). With the camera's intrinsics, verifying
re-rankers also give each verified place the query's relative pose. The relocalize node,
``evaluate``, training's validation and the benchmarks all run this class.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from vpr_ros.config import Conf, nested, option
from vpr_ros.database import PlaceDatabase
from vpr_ros.errors import ConfigError
from vpr_ros.evidence import (
    EVIDENCE,
    GLOBAL,
    RERANK,
    RETRIEVAL,
    SEQUENCE,
    Observation,
    PlaceEvidence,
)
from vpr_ros.place_filter import FilterConf
from vpr_ros.priors import PositionPrior
from vpr_ros.rerankers import RERANKERS, Reranked, Reranker, make_reranker
from vpr_ros.rerankers.verification import VerificationConf
from vpr_ros.sequence import SequenceConf, sequence_image_descriptors
from vpr_ros.types import CameraIntrinsics, Hypothesis

# torch-heavy modules are imported where they are used, so that RelocalizationConf is cheap
# to import (command-line --help, settings tables).
if TYPE_CHECKING:
    from vpr_ros.extraction import Descriptors, Extractor
    from vpr_ros.models.base import VprModel

MODES = tuple(EVIDENCE)
NO_VERIFIER = 'none'


@dataclass(frozen=True)
class RelocalizationConf(Conf):
    """Settings of the relocalization pipeline (the node's parameters of the same names)."""

    top_k: int = option(20, 'Places retrieved by global descriptor', min=1, read_only=False)
    rerank_k: int = option(
        10,
        'Best retrieved places re-ranked by the re-ranker and published (0: no re-ranking; '
        'then all top_k are published, ranked by global similarity)',
        min=0,
        read_only=False,
    )
    reranker: str = option(
        'mnn',
        "How candidates are re-ranked: 'mnn' (local-feature matches, SelaVPR), 'mnn_ransac' "
        "(the same, verified by RANSAC), 'xfeat_lighterglue' / 'aliked_lightglue' (trained "
        'keypoints and matcher, verified by RANSAC; the map must store them: build_map '
        '--verifiers)',
        choices=tuple(RERANKERS),
    )
    verifier: str = option(
        NO_VERIFIER,
        "A second re-ranker for the best verify_k places after the first ('none': no second "
        'stage); the published hypotheses are then the verified places',
        choices=(NO_VERIFIER, *RERANKERS),
    )
    verify_k: int = option(
        3, 'Best re-ranked places the verifier re-scores (with a verifier)', min=1
    )
    min_similarity: float = option(
        -1.0,
        'Local matches below this cosine similarity do not count in re-ranking (-1: all count)',
        min=-1.0,
        max=1.0,
        read_only=False,
    )
    competitor_radius_m: float = option(
        10.0,
        'Hypotheses nearer than this to each other agree instead of competing for confidence',
        unit='m',
        min=0.0,
        read_only=False,
    )
    noise_floor: float = option(
        0.05,
        'Re-ranking score unrelated images reach anyway; a best score near it is not trusted',
        min=0.0,
        max=1.0,
        read_only=False,
    )
    mode: str = option(
        'filter',
        "'filter': one belief over the map's places and off-map, moved by odometry or the "
        'keyframe order and weighed by every frame (settings filter.*; confidence is the '
        "posterior probability); 'single': each frame on its own (retrieval, then "
        "re-ranking); 'sequence': each camera's recent frames matched along the map's "
        'keyframe order (settings sequence.*; rerank_score then holds the sequence score)',
        choices=MODES,
    )
    filter: FilterConf = nested(FilterConf)
    sequence: SequenceConf = nested(SequenceConf)
    verification: VerificationConf = nested(VerificationConf)

    @property
    def rerankers(self) -> tuple[str, ...]:
        """The re-rankers this pipeline runs (none without re-ranking)."""
        if self.mode == 'sequence' or self.rerank_k == 0:
            return ()
        if self.verifier == NO_VERIFIER:
            return (self.reranker,)
        return (self.reranker, self.verifier)

    def validate(self) -> None:
        if self.rerank_k > self.top_k:
            msg = (
                f'rerank_k must be in 0..top_k ({self.top_k}), got {self.rerank_k}; only '
                'retrieved places can be re-ranked'
            )
            raise ConfigError(msg)
        if self.verifier != NO_VERIFIER and 0 < self.rerank_k < self.verify_k:
            msg = (
                f'verify_k must be in 1..rerank_k ({self.rerank_k}), got {self.verify_k}; '
                'only re-ranked places can be verified'
            )
            raise ConfigError(msg)


@dataclass
class RelocalizationResult:
    """Hypotheses for one query, best first, with where the time went (seconds).

    ``candidates`` are the place indices retrieval found, best first (empty when the mode
    does not retrieve; with a verifier, the re-ranked head in its re-ranked order):
    evaluation ranks them after the hypotheses, so Recall@N reaches beyond the re-ranked
    head.
    """

    hypotheses: list[Hypothesis]
    timings: dict[str, float] = field(default_factory=dict)
    candidates: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def best(self) -> Hypothesis | None:
        return self.hypotheses[0] if self.hypotheses else None


class Relocalizer:
    """Matches query images against a place database.

    Args:
        model: the model, or an extractor running it (``vpr_ros.extraction``); it must be
            the one the map was built with.
        database: the map.
        conf: the settings, or a mapping of overrides of the defaults.
        num_threads: threads for a model given as such (torch, faiss, BLAS).

    Raises:
        DatabaseError: the map was built by another model, or lacks what the re-ranker reads.
        ConfigError: bad settings, or a mode the map cannot serve.
    """

    def __init__(
        self,
        model: VprModel | Extractor,
        database: PlaceDatabase,
        conf: RelocalizationConf | Mapping[str, Any] | None = None,
        *,
        num_threads: int | None = None,
    ) -> None:
        from vpr_ros.extraction import as_extractor

        if not isinstance(conf, RelocalizationConf):
            conf = RelocalizationConf.from_dict(conf)
        self.conf = conf
        self.extractor = as_extractor(model, batch_size=1, num_threads=num_threads)
        database.check_model(self.extractor.identity())
        self.database = database
        self.evidence: PlaceEvidence = EVIDENCE[conf.mode](database, conf)
        self.reranker: Reranker | None = None
        self.verifier: Reranker | None = None
        if RERANK in self.evidence.needs and conf.rerank_k > 0:
            for name in conf.rerankers:  # refuse a map that cannot serve one before loading
                RERANKERS[name].check_map(database)
            self.reranker, *verifiers = [
                make_reranker(
                    name,
                    database,
                    min_similarity=conf.min_similarity,
                    verification=conf.verification,
                )
                for name in conf.rerankers
            ]
            self.verifier = verifiers[0] if verifiers else None

    @property
    def needs(self) -> frozenset[str]:
        """What each frame's observation holds (see ``vpr_ros.evidence``)."""
        return self.evidence.needs

    @property
    def describes(self) -> bool:
        """Whether a frame runs the model: retrieval, re-ranking or the evidence need its
        descriptors."""
        return self.reranker is not None or bool({RETRIEVAL, GLOBAL} & self.evidence.needs)

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(height, width) a frame may be decoded to straight away, or None when a stage
        reads the full-resolution image (keypoint re-rankers)."""
        rerankers = [r for r in (self.reranker, self.verifier) if r is not None]
        if any(r.needs_image for r in rerankers):
            return None
        return self.extractor.input_size

    def reset_sequences(self) -> None:
        """Forget every stream's recent frames (after a jump, or a pause)."""
        self.evidence.reset()

    def describe(self, image: np.ndarray) -> Descriptors:
        """Descriptors of one RGB image."""
        return self.extractor.extract([image])

    def relocalize(
        self,
        image: np.ndarray,
        stream: Hashable = 0,
        camera: CameraIntrinsics | None = None,
        *,
        prior: PositionPrior | None = None,
        stamp: float | None = None,
        odometry_xyz: np.ndarray | None = None,
    ) -> RelocalizationResult:
        """Hypotheses for one RGB uint8 image, best first.

        ``stream`` names the camera the image comes from: modes with a history keep one
        per stream. ``camera``: its intrinsics, when known (verified places then carry the
        query's relative pose). ``prior``: retrieve only places within its radius (a GPS
        fix, or a localizer's pose and covariance; ``vpr_ros.priors``). ``stamp`` (s) and
        ``odometry_xyz`` (the robot's odometry position when the image was taken) feed the
        filter's motion model.
        """
        start = time.perf_counter()
        descriptors = self.describe(image) if self.describes else None
        extracted = time.perf_counter()
        result = self.relocalize_described(
            image,
            descriptors,
            stream,
            camera,
            prior=prior,
            stamp=stamp,
            odometry_xyz=odometry_xyz,
        )
        if descriptors is not None:
            result.timings['extract'] = extracted - start
        return result

    def relocalize_described(
        self,
        image: np.ndarray | None,
        descriptors: Descriptors | None,
        stream: Hashable = 0,
        camera: CameraIntrinsics | None = None,
        *,
        exclude: np.ndarray | None = None,
        prior: PositionPrior | None = None,
        stamp: float | None = None,
        odometry_xyz: np.ndarray | None = None,
    ) -> RelocalizationResult:
        """Hypotheses for a query already described (a batch of one), e.g. when one
        description serves several pipelines; ``image`` feeds image-based stages.

        ``exclude``: (N,) bool over the map's places; retrieval never returns the places it
        marks (e.g. the recent past, for loop closure). ``descriptors`` may be None when the
        pipeline does not describe frames (``describes``).
        """
        timings: dict[str, float] = {}
        started = time.perf_counter()
        needs = self.evidence.needs
        candidates = np.zeros(0, np.int64)
        global_scores = np.zeros(0, np.float32)
        if descriptors is None and self.describes:
            raise ValueError('this pipeline needs the query descriptors (describes is True)')
        query_global = None if descriptors is None else descriptors.global_descriptors[0]
        if RETRIEVAL in needs:
            assert query_global is not None
            candidates, global_scores = self.retrieve(query_global, exclude, prior=prior)
            timings['retrieve'] = time.perf_counter() - started
        reranked: Reranked | None = None
        if self.reranker is not None:
            assert descriptors is not None
            begun = time.perf_counter()
            head = candidates[: self.conf.rerank_k]
            query = self.reranker.query_features(image, descriptors, camera)
            reranked = self.reranker.rerank(query, head)
            timings['rerank'] = time.perf_counter() - begun
            if self.verifier is not None:
                begun = time.perf_counter()
                # The re-ranked head in its new order, then the rest as retrieved.
                order = np.lexsort((-global_scores[: len(head)], -reranked.scores))
                candidates = np.concatenate([head[order], candidates[len(head) :]])
                global_scores = np.concatenate(
                    [global_scores[: len(head)][order], global_scores[len(head) :]]
                )
                query = self.verifier.query_features(image, descriptors, camera)
                reranked = self.verifier.rerank(query, candidates[: self.conf.verify_k])
                timings['verify'] = time.perf_counter() - begun
        sequence_descriptor = None
        if SEQUENCE in needs:
            if image is None:
                raise ConfigError('patch-normalised sequence matching needs the query image')
            sequence_descriptor = sequence_image_descriptors(
                [image], getattr(self.evidence, 'sequence_conf', None)
            )[0]
        observation = Observation(
            stream=stream,
            candidates=candidates,
            global_scores=global_scores,
            rerank_scores=None if reranked is None else reranked.scores,
            rerank_inliers=None if reranked is None else reranked.inliers,
            relative_poses=None if reranked is None else reranked.relative_poses,
            global_descriptor=query_global if GLOBAL in needs else None,
            sequence_descriptor=sequence_descriptor,
            stamp=stamp,
            odometry_xyz=odometry_xyz,
            allowed=None if prior is None else self._allowed(prior),
        )
        begun = time.perf_counter()
        hypotheses = self.evidence.update(observation)
        timings[self.conf.mode] = time.perf_counter() - begun
        return RelocalizationResult(hypotheses, timings, candidates)

    def _allowed(self, prior: PositionPrior) -> np.ndarray:
        """(N,) bool: the places within ``prior``'s radius (places without a pose are not),
        found through the map's tiles as retrieval finds them."""
        allowed = np.zeros(len(self.database), bool)
        allowed[self.database.tile_grid().places_within(prior)] = True
        return allowed

    def retrieve(
        self,
        query_global: np.ndarray,
        exclude: np.ndarray | None = None,
        *,
        prior: PositionPrior | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``top_k`` candidates (place indices) and their global similarities: only
        places within ``prior``'s radius, when given; places marked in ``exclude`` (N,)
        bool are passed over (the search reaches past them)."""
        top_k = self.conf.top_k
        excluded = int(np.count_nonzero(exclude)) if exclude is not None else 0
        scores, ids = self.database.search(query_global[None], top_k + excluded, prior=prior)
        valid = ids[0] >= 0
        ids, scores = ids[0][valid], scores[0][valid]
        if exclude is not None:
            keep = ~np.asarray(exclude, bool)[ids]
            ids, scores = ids[keep], scores[keep]
        return ids[:top_k], scores[:top_k]

    def match(self, query_global: np.ndarray, query_local: np.ndarray) -> RelocalizationResult:
        """Single-frame hypotheses for one query's descriptors (global (D,), local (L, C))."""
        from vpr_ros.extraction import Descriptors

        descriptors = Descriptors(query_global[None], query_local[None])
        return self.relocalize_described(None, descriptors)
