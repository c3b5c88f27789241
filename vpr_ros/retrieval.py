"""Global-descriptor retrieval: the ``Index`` seam and its faiss implementation.

An index answers "which places have the most similar global descriptors" (inner product
on L2-normalised descriptors, i.e. cosine similarity). ``PlaceDatabase`` owns one, made by
``make_index(conf, dim)`` from the map's ``IndexConf``; the manifest records that conf, so
a map reopens with the index it was built with. Another engine plugs in as a class with
the ``Index`` methods, registered in ``INDEX_BACKENDS`` under the name ``IndexConf.backend``
selects.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from vpr_ros import logger
from vpr_ros.config import Conf, option
from vpr_ros.errors import ConfigError, DatabaseError

if TYPE_CHECKING:
    import faiss

FAISS_TYPES = ('flat', 'hnsw', 'ivfpq')


@dataclass(frozen=True)
class IndexConf(Conf):
    """How a map retrieves places by global descriptor."""

    backend: str = option('faiss', 'Retrieval engine', choices=('faiss',))
    type: str = option(
        'flat',
        'faiss index: flat (exact inner product), hnsw or ivfpq (approximate, for large maps)',
        choices=FAISS_TYPES,
    )
    hnsw_m: int = option(32, 'HNSW graph degree', min=2)
    hnsw_ef_search: int = option(128, 'HNSW search breadth (recall against speed)', min=1)
    ivf_nlist: int = option(0, 'IVF lists (0: about 4 sqrt(N))', min=0)
    pq_m: int = option(0, 'PQ sub-quantisers (0: D / 8, rounded to a divisor of D)', min=0)
    ivf_nprobe: int = option(16, 'IVF lists searched per query', min=1)


class Index(Protocol):
    """What a map needs from a retrieval engine (descriptors are (N, D) float32, unit rows)."""

    @property
    def ntotal(self) -> int:
        """Number of indexed places."""

    @property
    def dim(self) -> int:
        """Descriptor dimension D."""

    def add(self, descriptors: np.ndarray) -> None:
        """Append places, numbered after the ones already indexed."""

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` per query: similarities (Q, k) and place indices (Q, k), best first;
        missing entries are index -1 and similarity -inf."""

    def finalize(self, descriptors: np.ndarray) -> None:
        """Called before saving, with every place's descriptor (e.g. to train an
        approximate index on a map grown place by place)."""

    def write(self, directory: Path) -> list[str]:
        """Write the index into ``directory``; returns the file names written."""


class FaissIndex:
    """A faiss index (flat, HNSW or IVF-PQ) for inner product.

    Args:
        conf: the index settings.
        dim: descriptor dimension.
        index: an existing faiss index (read from a map) instead of a new empty one.
    """

    FILE = 'index.faiss'

    def __init__(self, conf: IndexConf, dim: int, index: faiss.Index | None = None) -> None:
        import faiss

        self.conf = conf
        # Approximate indexes need descriptors to train: until finalize(), exact search.
        self.faiss_index = index if index is not None else faiss.IndexFlatIP(int(dim))

    @property
    def ntotal(self) -> int:
        return int(self.faiss_index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.faiss_index.d)

    def add(self, descriptors: np.ndarray) -> None:
        if len(descriptors):
            self.faiss_index.add(np.ascontiguousarray(descriptors, dtype=np.float32))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = max(1, int(k))
        if self.ntotal == 0:
            return (
                np.full((len(queries), k), -np.inf, np.float32),
                np.full((len(queries), k), -1, np.int64),
            )
        scores, ids = self.faiss_index.search(queries, k)
        scores[ids < 0] = -np.inf
        return scores, ids

    def finalize(self, descriptors: np.ndarray) -> None:
        import faiss

        if self.conf.type != 'flat' and isinstance(self.faiss_index, faiss.IndexFlat):
            self.faiss_index = build_faiss_index(descriptors, self.conf)

    def write(self, directory: Path) -> list[str]:
        import faiss

        faiss.write_index(self.faiss_index, str(directory / self.FILE))
        return [self.FILE]

    @classmethod
    def read(cls, directory: Path, conf: IndexConf) -> FaissIndex:
        """The index a map directory holds.

        Raises:
            DatabaseError: the file is unreadable.
        """
        import faiss

        try:
            index = faiss.read_index(str(directory / cls.FILE))
        except RuntimeError as err:
            raise DatabaseError(f'cannot read {str(directory / cls.FILE)!r}: {err}') from err
        return cls(conf, index.d, index)

    @classmethod
    def files(cls) -> list[str]:
        return [cls.FILE]


INDEX_BACKENDS: dict[str, type[FaissIndex]] = {'faiss': FaissIndex}
"""Retrieval engines by ``IndexConf.backend``."""


def make_index(conf: IndexConf, descriptors: np.ndarray) -> FaissIndex:
    """An index of ``conf``'s kind over ``descriptors`` (N, D), N may be 0."""
    if conf.backend not in INDEX_BACKENDS:
        known = sorted(INDEX_BACKENDS)
        raise ConfigError(f'unknown index backend {conf.backend!r}; known: {known}')
    dim = descriptors.shape[1]
    if conf.type == 'flat' or len(descriptors) == 0:
        index = FaissIndex(conf, dim)
        index.add(descriptors)
        return index
    return FaissIndex(conf, dim, build_faiss_index(descriptors, conf))


def build_faiss_index(descriptors: np.ndarray, conf: IndexConf) -> faiss.Index:
    """A trained faiss index of ``conf.type`` over L2-normalised ``descriptors`` (N, D)."""
    import faiss

    descriptors = np.ascontiguousarray(descriptors, dtype=np.float32)
    count, dim = descriptors.shape
    metric = faiss.METRIC_INNER_PRODUCT
    index: faiss.Index
    if conf.type == 'flat':
        index = faiss.IndexFlatIP(dim)
    elif conf.type == 'hnsw':
        index = faiss.IndexHNSWFlat(dim, conf.hnsw_m, metric)
        index.hnsw.efSearch = conf.hnsw_ef_search
    else:
        nlist = conf.ivf_nlist or max(1, int(4 * np.sqrt(max(count, 1))))
        pq_m = conf.pq_m or _divisor_near(dim, dim // 8)
        if count < max(nlist, 256) * 4:
            logger.warning(
                'IVF-PQ needs more training data than %d places (nlist=%d); using exact search',
                count,
                nlist,
            )
            return build_faiss_index(descriptors, conf.replace(type='flat'))
        index = faiss.index_factory(dim, f'IVF{nlist},PQ{pq_m}', metric)
        index.train(descriptors)
        faiss.ParameterSpace().set_index_parameter(index, 'nprobe', conf.ivf_nprobe)
    if count:
        index.add(descriptors)
    return index


def _divisor_near(dim: int, target: int) -> int:
    target = max(1, target)
    divisors = [d for d in range(1, dim + 1) if dim % d == 0]
    return min(divisors, key=lambda d: abs(d - target))
