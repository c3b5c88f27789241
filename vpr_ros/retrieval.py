"""Global-descriptor retrieval with faiss (inner product on L2-normalised descriptors)."""

from __future__ import annotations

import faiss
import numpy as np

from vpr_ros import logger
from vpr_ros.errors import ConfigError

INDEX_TYPES = ('flat', 'hnsw', 'ivfpq')

DEFAULT_INDEX_CONF = {
    'type': 'flat',  # exact search; the right choice up to ~1e5-1e6 places on a CPU
    'hnsw_m': 32,  # graph degree of HNSW
    'hnsw_ef_search': 128,  # HNSW search breadth: recall vs speed
    'ivf_nlist': 0,  # IVF lists; 0 = about 4 * sqrt(N)
    'pq_m': 0,  # PQ sub-quantisers; 0 = D / 8 rounded to a divisor of D
    'ivf_nprobe': 16,
}


def build_index(descriptors: np.ndarray, conf: dict | None = None) -> faiss.Index:
    """Build a faiss index over L2-normalised ``descriptors`` (N, D) for inner product."""
    conf = {**DEFAULT_INDEX_CONF, **(conf or {})}
    descriptors = np.ascontiguousarray(descriptors, dtype=np.float32)
    count, dim = descriptors.shape
    kind = conf['type']
    metric = faiss.METRIC_INNER_PRODUCT
    if kind == 'flat':
        index = faiss.IndexFlatIP(dim)
    elif kind == 'hnsw':
        index = faiss.IndexHNSWFlat(dim, int(conf['hnsw_m']), metric)
        index.hnsw.efSearch = int(conf['hnsw_ef_search'])
    elif kind == 'ivfpq':
        nlist = int(conf['ivf_nlist']) or max(1, int(4 * np.sqrt(max(count, 1))))
        pq_m = int(conf['pq_m']) or _divisor_near(dim, dim // 8)
        if count < max(nlist, 256) * 4:
            logger.warning(
                'IVF-PQ needs more training data than %d places (nlist=%d); using exact search',
                count,
                nlist,
            )
            return build_index(descriptors, {**conf, 'type': 'flat'})
        index = faiss.index_factory(dim, f'IVF{nlist},PQ{pq_m}', metric)
        index.train(descriptors)
        index.nprobe = int(conf['ivf_nprobe'])
    else:
        raise ConfigError(f'unknown index type {kind!r}; choose one of {INDEX_TYPES}')
    if count:
        index.add(descriptors)
    return index


def _divisor_near(dim: int, target: int) -> int:
    target = max(1, target)
    divisors = [d for d in range(1, dim + 1) if dim % d == 0]
    return min(divisors, key=lambda d: abs(d - target))


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` places for each query: (similarities (Q, k), indices (Q, k)), best first.

    Entries beyond the number of indexed places are index -1 and similarity -inf.
    """
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    k = max(1, int(k))
    if index.ntotal == 0:
        return (
            np.full((len(queries), k), -np.inf, np.float32),
            np.full((len(queries), k), -1, np.int64),
        )
    scores, ids = index.search(queries, k)
    scores[ids < 0] = -np.inf
    return scores, ids
