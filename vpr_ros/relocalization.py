"""The relocalization pipeline, ROS-free: image in, re-ranked place hypotheses out.

retrieve top_k by global descriptor (faiss) -> re-rank the best rerank_k by MNN local
matches -> confidences. The relocalize node and ``evaluate`` both run this class.
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
from vpr_ros.types import Hypothesis, Pose

DEFAULT_RELOCALIZATION_CONF = {
    'top_k': 20,  # candidates retrieved by global descriptor
    'rerank_k': 10,  # of those, how many are re-ranked by local matches (0: no re-ranking)
    'min_similarity': -1.0,  # local matches below this cosine similarity do not count
    'competitor_radius_m': 10.0,  # candidates nearer than this to a hypothesis agree with it
    'noise_floor': 0.05,  # rerank score unrelated images reach (see rerank.confidences)
}


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
        database.check_model(model.identity())
        self.model = model
        self.database = database
        self.extractor = Extractor(model, batch_size=1, num_threads=num_threads)
        self._poses = database.poses
        self._has_poses = bool(len(database)) and not np.isnan(self._poses[:, 0]).any()

    def describe(self, image: np.ndarray) -> Descriptors:
        """Descriptors of one RGB image."""
        return self.extractor.extract([image])

    def relocalize(self, image: np.ndarray) -> RelocalizationResult:
        """Hypotheses for one RGB uint8 image, best first."""
        start = time.perf_counter()
        descriptors = self.describe(image)
        extracted = time.perf_counter()
        result = self.match(descriptors.global_descriptors[0], descriptors.local_features[0])
        result.timings['extract'] = extracted - start
        return result

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
        poses = self._poses[ids] if self._has_poses else None
        place_ids = db.places['place_id'][ids]
        if rerank_k > 0 and db.local_features is not None:
            head = ids[:rerank_k]
            hypotheses = rerank(
                query_local,
                head,
                scores[:rerank_k],
                np.asarray(db.local_features[head], np.float32),
                place_ids=place_ids[:rerank_k],
                poses=poses[:rerank_k] if poses is not None else None,
                min_similarity=float(conf['min_similarity']),
                competitor_radius_m=float(conf['competitor_radius_m']),
                noise_floor=float(conf['noise_floor']),
            )
        else:
            # Without re-ranking, the global similarity is the score.
            conf_values = confidences(
                np.clip(scores, 0, None),
                poses[:, :3] if poses is not None else None,
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
                    pose=Pose.from_array(poses[i]) if poses is not None else None,
                )
                for i in range(len(ids))
            ]
        done = time.perf_counter()
        return RelocalizationResult(
            hypotheses, {'retrieve': retrieved - start, 'rerank': done - retrieved}
        )
