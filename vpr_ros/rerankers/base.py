"""What every re-ranker returns for one query (``Reranked``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from vpr_ros.types import RelativePose


@dataclass
class Reranked:
    """What a re-ranker found for the candidates of one query, in the candidates' order.

    Attributes:
        scores: (K,) float32 scores in [0, 1]; higher is better.
        inliers: (K,) int64 RANSAC inliers of a verifying re-ranker, or None.
        relative_poses: per candidate, the query camera relative to the place's (when the
            intrinsics were known and the matches determined it), or None.
    """

    scores: np.ndarray
    inliers: np.ndarray | None = None
    relative_poses: list[RelativePose | None] | None = None
