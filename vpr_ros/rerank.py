"""Re-ranking: the ``Reranker`` seam, and mutual-nearest-neighbour (MNN) matching (SelaVPR).

A re-ranker scores the candidates that retrieval found, from what the query image gives
and what the map stores per place; higher is better. ``RERANKERS`` maps the names that
``RelocalizationConf.reranker`` (the node parameter ``reranker``, evaluate's ``--reranker``)
selects to their classes; a re-ranker that needs per-place data says so in ``check_map``,
which refuses a map that cannot serve it.

``mnn`` (the default): no RANSAC and no geometry: a candidate's score is the fraction of
the query's local features whose nearest neighbour in the candidate points back to them.
It is a few dense matrix products per candidate, which is why it runs at a few percent of
the cost of RANSAC-based re-ranking.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from vpr_ros.errors import ConfigError, DatabaseError

# torch is imported where it is used: the settings tables list RERANKERS, and --help of
# the commands must not wait for torch.
if TYPE_CHECKING:
    import torch

    from vpr_ros.database import PlaceDatabase
    from vpr_ros.extraction import Descriptors

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
    import torch

    sim = _as_tensor(query) @ _as_tensor(candidate).T
    mutual, nn12 = mutual_nn_mask(sim)
    rows = torch.arange(sim.shape[0])
    keep = mutual & (sim[rows, nn12] >= min_similarity)
    return rows[keep].numpy(), nn12[keep].numpy()


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
    import torch

    q = _as_tensor(query)
    count, length = len(candidates), q.shape[0]
    scores = np.zeros(count, np.float32)
    if count == 0 or length == 0:
        return scores
    per_chunk = max(1, _MAX_ENTRIES_PER_CHUNK // (length * max(1, candidates.shape[1])))
    for start in range(0, count, per_chunk):
        c = _as_tensor(candidates[start : start + per_chunk])
        sim = torch.einsum('lc,kmc->klm', q, c)  # (k, L1, L2)
        mutual, nn12 = mutual_nn_mask(sim)  # (k, L1)
        best12 = torch.gather(sim, 2, nn12.unsqueeze(-1)).squeeze(-1)
        matched = mutual & (best12 >= min_similarity)
        scores[start : start + len(c)] = matched.float().mean(dim=1).numpy()
    return scores


def _as_tensor(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    import torch

    tensor = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.asarray(array))
    return tensor.float()


class Reranker(Protocol):
    """Scores retrieved candidates for one query; higher is better."""

    name: str

    def check_map(self, database: PlaceDatabase) -> None:
        """Raise ``DatabaseError`` (saying how to rebuild) when the map lacks what this
        re-ranker reads."""

    def query_features(self, image: np.ndarray | None, descriptors: Descriptors) -> Any:
        """What the re-ranker needs of one query: from its RGB image (None when the caller
        has only descriptors) or from the model's descriptors (a batch of one)."""

    def scores(self, query: Any, candidates: np.ndarray, database: PlaceDatabase) -> np.ndarray:
        """(K,) float32 scores of the map places ``candidates`` (K,) for ``query``."""


class MnnReranker:
    """SelaVPR's re-ranking: the fraction of query locations with an MNN local match.

    Args:
        min_similarity: matches below this cosine similarity do not count.
    """

    name = 'mnn'

    def __init__(self, *, min_similarity: float = -1.0) -> None:
        self.min_similarity = float(min_similarity)

    def check_map(self, database: PlaceDatabase) -> None:
        if database.local_features is None:
            msg = (
                "re-ranker 'mnn' needs the map's local features, and this map has none "
                '(built with --no-local-features); rebuild it with local features, or set '
                'rerank_k to 0'
            )
            raise DatabaseError(msg)

    def query_features(self, image: np.ndarray | None, descriptors: Descriptors) -> np.ndarray:
        local: np.ndarray = descriptors.local_features[0]
        return local

    def scores(
        self, query: np.ndarray, candidates: np.ndarray, database: PlaceDatabase
    ) -> np.ndarray:
        assert database.local_features is not None
        stored = np.asarray(database.local_features[np.asarray(candidates)], np.float32)
        scores: np.ndarray = mnn_scores(query, stored, self.min_similarity)
        return scores


RERANKERS: dict[str, type[MnnReranker]] = {'mnn': MnnReranker}
"""Re-rankers by name (``RelocalizationConf.reranker``)."""


def make_reranker(name: str, *, min_similarity: float = -1.0) -> Reranker:
    """The re-ranker called ``name``.

    Raises:
        ConfigError: an unknown name (the message lists the known ones).
    """
    if name not in RERANKERS:
        raise ConfigError(f'unknown re-ranker {name!r}; known: {sorted(RERANKERS)}')
    return RERANKERS[name](min_similarity=min_similarity)
