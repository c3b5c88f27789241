"""``mnn``: SelaVPR's re-ranking by mutual-nearest-neighbour (MNN) local matches.

No RANSAC and no geometry: a candidate's score is the fraction of the query's local
features whose nearest neighbour in the candidate points back to them. It is a few dense
matrix products per candidate, which is why it runs at a few percent of the cost of
RANSAC-based re-ranking. The MNN matching functions here also serve ``mnn_ransac`` and the
training loss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np

from vpr_ros.errors import DatabaseError
from vpr_ros.rerankers.base import Reranked

# torch is imported where it is used: the settings tables list RERANKERS, and --help of
# the commands must not wait for torch.
if TYPE_CHECKING:
    import torch

    from vpr_ros.database import PlaceDatabase
    from vpr_ros.extraction import Descriptors
    from vpr_ros.rerankers.verification import VerificationConf
    from vpr_ros.types import CameraIntrinsics

# Similarity matrices are computed for this many (query x candidate) entries at a time.
_MAX_ENTRIES_PER_CHUNK = 32_000_000


def mutual_nn_mask(sim: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mutual nearest neighbours of a similarity matrix (or a batch of them).

    Args:
        sim: (..., L1, L2) similarities between L1 and L2 features.

    Returns:
        ``mask`` (..., L1) bool: row i's nearest column is one whose nearest row is i;
        ``nn12`` (..., L1) int64: the nearest column of each row (ties: the first).
    """
    import torch

    nn12 = sim.argmax(dim=-1)
    nn21 = sim.argmax(dim=-2)
    rows = torch.arange(sim.shape[-2], device=sim.device)
    return torch.gather(nn21, -1, nn12) == rows, nn12


def _mutual_nn(sim: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``mutual_nn_mask`` in numpy: the re-rankers run without torch."""
    nn12 = sim.argmax(axis=-1)
    nn21 = sim.argmax(axis=-2)
    rows = np.arange(sim.shape[-2])
    return np.take_along_axis(nn21, nn12, axis=-1) == rows, nn12


def mutual_nn_matches(
    query: np.ndarray | torch.Tensor,
    candidate: np.ndarray | torch.Tensor,
    min_similarity: float = -1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j) where query[i] and candidate[j] are each other's nearest neighbour.

    Args:
        query: (L1, C) L2-normalised local features.
        candidate: (L2, C) L2-normalised local features.
        min_similarity: matches whose cosine similarity is below this are dropped.
    """
    sim = _as_array(query) @ _as_array(candidate).T
    mutual, nn12 = _mutual_nn(sim)
    rows = np.arange(sim.shape[0])
    keep = mutual & (sim[rows, nn12] >= min_similarity)
    return rows[keep], nn12[keep]


def mnn_matches_batch(
    query: np.ndarray | torch.Tensor,
    candidates: np.ndarray | torch.Tensor,
    min_similarity: float = -1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """MNN matches of one query with each of K candidates, as masks over query locations.

    Args:
        query: (L1, C) local features of the query.
        candidates: (K, L2, C) local features of K candidate places.
        min_similarity: matches whose cosine similarity is below this do not count.

    Returns:
        ``matched`` (K, L1) bool: query location i has an MNN match in candidate k;
        ``nn12`` (K, L1) int64: the candidate location each query location matches.
    """
    q = _as_array(query)
    count, length = len(candidates), q.shape[0]
    matched = np.zeros((count, length), bool)
    nearest = np.zeros((count, length), np.int64)
    if count == 0 or length == 0:
        return matched, nearest
    per_chunk = max(1, _MAX_ENTRIES_PER_CHUNK // (length * max(1, candidates.shape[1])))
    for start in range(0, count, per_chunk):
        c = _as_array(candidates[start : start + per_chunk])
        sim = np.matmul(q, c.transpose(0, 2, 1))  # (k, L1, L2)
        mutual, nn12 = _mutual_nn(sim)  # (k, L1)
        best12 = np.take_along_axis(sim, nn12[..., None], axis=2)[..., 0]
        matched[start : start + len(c)] = mutual & (best12 >= min_similarity)
        nearest[start : start + len(c)] = nn12
    return matched, nearest


def mnn_scores(
    query: np.ndarray | torch.Tensor,
    candidates: np.ndarray | torch.Tensor,
    min_similarity: float = -1.0,
) -> np.ndarray:
    """Fraction of query locations with an MNN match, for each candidate.

    Args:
        query: (L1, C) local features of the query.
        candidates: (K, L2, C) local features of K candidate places.
        min_similarity: matches whose cosine similarity is below this do not count.

    Returns:
        (K,) float32 scores in [0, 1].
    """
    matched, _ = mnn_matches_batch(query, candidates, min_similarity)
    if matched.shape[1] == 0:
        return np.zeros(len(matched), np.float32)
    scores: np.ndarray = matched.mean(axis=1, dtype=np.float64).astype(np.float32)
    return scores


def _as_array(array: np.ndarray | torch.Tensor) -> np.ndarray:
    """float32 numpy features (a torch tensor is detached and copied to the CPU)."""
    if hasattr(array, 'detach'):
        array = array.detach().cpu().float().numpy()
    return np.asarray(array, np.float32)


def stored_local_features(database: PlaceDatabase, candidates: np.ndarray) -> np.ndarray:
    """(K, L, C) float32 local features of the map places ``candidates``."""
    assert database.local_features is not None
    return np.asarray(database.local_features[np.asarray(candidates, np.int64)], np.float32)


class MnnReranker:
    """SelaVPR's re-ranking: the fraction of query locations with an MNN local match.

    Args:
        database: the map (with local features).
        min_similarity: matches below this cosine similarity do not count.
        verification: unused (no geometry).
    """

    name: ClassVar[str] = 'mnn'
    store: ClassVar[str | None] = None
    needs_image: ClassVar[bool] = False

    def __init__(
        self,
        database: PlaceDatabase,
        *,
        min_similarity: float = -1.0,
        verification: VerificationConf | None = None,
    ) -> None:
        self.database = database
        self.min_similarity = float(min_similarity)

    @classmethod
    def check_map(cls, database: PlaceDatabase) -> None:
        if database.local_features is None:
            msg = (
                f"re-ranker {cls.name!r} needs the map's local features, and this map has none "
                '(built with --no-local-features); rebuild it with local features, or set '
                'rerank_k to 0'
            )
            raise DatabaseError(msg)

    def query_features(
        self,
        image: np.ndarray | None,
        descriptors: Descriptors,
        camera: CameraIntrinsics | None = None,
    ) -> np.ndarray:
        local: np.ndarray = descriptors.local_features[0]
        return local

    def rerank(self, query: np.ndarray, candidates: np.ndarray) -> Reranked:
        stored = stored_local_features(self.database, candidates)
        return Reranked(mnn_scores(query, stored, self.min_similarity))
