"""The relocalization pipeline, ROS-free: image in, re-ranked place hypotheses out.

Single-frame mode: retrieve top_k by global descriptor (faiss) -> re-rank the best
rerank_k by MNN local matches -> confidences. Sequence mode: every frame of a camera
stream updates a ``SequenceMatcher`` over the map's keyframe order, and its matches (with
the sequence evidence as confidence) are the hypotheses. The relocalize node and
``evaluate`` both run this class.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from vpr_ros.database import PlaceDatabase
from vpr_ros.errors import ConfigError
from vpr_ros.extraction import Descriptors, Extractor
from vpr_ros.models.base import VprModel
from vpr_ros.rerank import confidences, rerank
from vpr_ros.sequence import SequenceMatcher, check_sequence_conf, sequence_image_descriptors
from vpr_ros.types import Hypothesis, Pose

DEFAULT_RELOCALIZATION_CONF = {
    'top_k': 20,  # candidates retrieved by global descriptor
    'rerank_k': 10,  # of those, how many are re-ranked by local matches (0: no re-ranking)
    'min_similarity': -1.0,  # local matches below this cosine similarity do not count
    'competitor_radius_m': 10.0,  # candidates nearer than this to a hypothesis agree with it
    'noise_floor': 0.05,  # rerank score unrelated images reach (see rerank.confidences)
    'mode': 'single',  # 'single' (one frame) or 'sequence' (the last frames of a stream)
    'sequence': {},  # overrides of vpr_ros.sequence.DEFAULT_SEQUENCE_CONF
}
MODES = ('single', 'sequence')


@dataclass
class RelocalizationResult:
    """Hypotheses for one query, best first, with where the time went (seconds)."""

    hypotheses: list[Hypothesis]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def best(self) -> Hypothesis | None:
        return self.hypotheses[0] if self.hypotheses else None


class Relocalizer:
    """Matches query images against a place database.

    Args:
        model: the model; it must be the one the map was built with.
        database: the map.
        conf: overrides of ``DEFAULT_RELOCALIZATION_CONF``.
        num_threads: torch threads for the model.
    """

    def __init__(
        self,
        model: VprModel,
        database: PlaceDatabase,
        conf: dict | None = None,
        *,
        num_threads: int | None = None,
    ) -> None:
        self.conf = {**DEFAULT_RELOCALIZATION_CONF, **(conf or {})}
        unknown = set(self.conf) - set(DEFAULT_RELOCALIZATION_CONF)
        if unknown:
            raise ConfigError(f'unknown relocalization settings {sorted(unknown)!r}')
        if int(self.conf['top_k']) < 1:
            raise ConfigError(f'top_k must be >= 1, got {self.conf["top_k"]!r}')
        if self.conf['mode'] not in MODES:
            raise ConfigError(f'mode must be one of {MODES}, got {self.conf["mode"]!r}')
        database.check_model(model.identity())
        self.model = model
        self.database = database
        self.extractor = Extractor(model, batch_size=1, num_threads=num_threads)
        self._poses = database.poses
        self._matchers: dict[object, SequenceMatcher] = {}
        if self.conf['mode'] == 'sequence':
            self.sequence_conf, self._sequence_map = self._sequence_setup()

    def _sequence_setup(self) -> tuple[dict, np.ndarray]:
        """Sequence settings and map descriptors; patch-normalised descriptors must have
        been stored in the map with the same image settings."""
        db = self.database
        conf = check_sequence_conf(self.conf['sequence'])
        if conf['descriptor'] == 'global':
            return conf, db.global_descriptors
        if db.sequence_descriptors is None or db.sequence_conf is None:
            msg = (
                'sequence matching on patch-normalised pixels needs a map built with sequence '
                "descriptors (build_map stores them by default); or set descriptor: 'global'"
            )
            raise ConfigError(msg)
        # The map decides how its images were described; queries must be described alike.
        conf = check_sequence_conf({**conf, **db.sequence_conf})
        return conf, np.asarray(db.sequence_descriptors, np.float32)

    def reset_sequences(self) -> None:
        """Forget every stream's recent frames (after a jump, or a pause)."""
        self._matchers.clear()

    def _matcher(self, stream: object) -> SequenceMatcher:
        if stream not in self._matchers:
            positions = self._poses[:, :3]
            self._matchers[stream] = SequenceMatcher(
                self._sequence_map,
                self.database.places['traverse'],
                self.sequence_conf,
                place_xyz=positions,
            )
        return self._matchers[stream]

    def describe(self, image: np.ndarray) -> Descriptors:
        """Descriptors of one RGB image."""
        return self.extractor.extract([image])

    def relocalize(self, image: np.ndarray, stream: object = 0) -> RelocalizationResult:
        """Hypotheses for one RGB uint8 image, best first.

        ``stream`` names the camera the image comes from: in sequence mode each stream
        has its own history of frames.
        """
        start = time.perf_counter()
        descriptors = self.describe(image)
        extracted = time.perf_counter()
        if self.conf['mode'] == 'sequence':
            if self.sequence_conf['descriptor'] == 'global':
                query = descriptors.global_descriptors[0]
            else:
                query = sequence_image_descriptors([image], self.sequence_conf)[0]
            result = self.match_sequence(query, descriptors.global_descriptors[0], stream)
        else:
            result = self.match(descriptors.global_descriptors[0], descriptors.local_features[0])
        result.timings['extract'] = extracted - start
        return result

    def match_sequence(
        self, query: np.ndarray, query_global: np.ndarray, stream: object = 0
    ) -> RelocalizationResult:
        """Hypotheses from the sequence matcher of ``stream`` after this frame.

        ``rerank_score`` holds the trajectory's sequence score (mean enhanced similarity,
        higher is better) and ``confidence`` the sequence confidence.
        """
        start = time.perf_counter()
        matches = self._matcher(stream).update(query)
        db = self.database
        hypotheses = [
            Hypothesis(
                place_index=m.place_index,
                place_id=int(db.places['place_id'][m.place_index]),
                global_score=float(db.global_descriptors[m.place_index] @ query_global),
                rerank_score=float(m.score),
                confidence=float(m.confidence),
                pose=Pose.from_row(self._poses[m.place_index]),
            )
            for m in matches
        ]
        return RelocalizationResult(hypotheses, {'sequence': time.perf_counter() - start})

    def match(self, query_global: np.ndarray, query_local: np.ndarray) -> RelocalizationResult:
        """Hypotheses for one query's descriptors (global (D,), local (L, C))."""
        conf = self.conf
        start = time.perf_counter()
        scores, ids = self.database.search(query_global[None], int(conf['top_k']))
        scores, ids = scores[0], ids[0]
        valid = ids >= 0
        scores, ids = scores[valid], ids[valid]
        retrieved = time.perf_counter()
        rerank_k = min(int(conf['rerank_k']), len(ids))
        db = self.database
        poses = self._poses[ids]
        place_ids = db.places['place_id'][ids]
        if rerank_k > 0 and db.local_features is not None:
            head = ids[:rerank_k]
            hypotheses = rerank(
                query_local,
                head,
                scores[:rerank_k],
                np.asarray(db.local_features[head], np.float32),
                place_ids=place_ids[:rerank_k],
                poses=poses[:rerank_k],
                min_similarity=float(conf['min_similarity']),
                competitor_radius_m=float(conf['competitor_radius_m']),
                noise_floor=float(conf['noise_floor']),
            )
        else:
            # Without re-ranking, the global similarity is the score.
            conf_values = confidences(
                np.clip(scores, 0, None),
                poses[:, :3],
                competitor_radius_m=float(conf['competitor_radius_m']),
                noise_floor=float(conf['noise_floor']),
            )
            hypotheses = [
                Hypothesis(
                    place_index=int(ids[i]),
                    place_id=int(place_ids[i]),
                    global_score=float(scores[i]),
                    rerank_score=float('nan'),
                    confidence=float(conf_values[i]),
                    pose=Pose.from_row(poses[i]),
                )
                for i in range(len(ids))
            ]
        done = time.perf_counter()
        return RelocalizationResult(
            hypotheses, {'retrieve': retrieved - start, 'rerank': done - retrieved}
        )
