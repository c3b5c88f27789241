"""Global-descriptor retrieval: the ``Index`` seam, ``SearchRestriction`` and the faiss engine.

An index answers "which places have the most similar global descriptors" (inner product on
L2-normalised descriptors, i.e. cosine similarity). ``PlaceDatabase`` owns one, made from the
map's ``IndexConf``; the manifest records that conf and the index's state, so a map reopens
with the index it was built with. Another engine plugs in as a class with the ``Index``
methods, registered in ``INDEX_BACKENDS`` under the name ``IndexConf.backend`` selects
(``milvus``: ``vpr_ros.milvus_index``).

The faiss engine keeps what it needs in RAM and nothing twice:

* ``flat``: exact search over the map's global descriptors themselves (no index file);
* ``hnsw``: an HNSW graph over 8-bit scalar-quantised codes (D bytes a place);
* ``ivfpq``: an inverted file over product-quantised codes (D / 32 bytes a place by default).

Approximate indexes hold codes, not the descriptors: the map re-scores their short list
(``rescore_k``) with the full-precision descriptors it reads from disk. ``auto`` (the
default) picks flat, HNSW or IVF-PQ by the number of places when the map is saved.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from vpr_ros import logger
from vpr_ros.config import Conf, option
from vpr_ros.errors import ConfigError, DatabaseError
from vpr_ros.mapfiles import Column

if TYPE_CHECKING:
    import faiss

FAISS_TYPES = ('auto', 'flat', 'hnsw', 'ivfpq')
BACKENDS = ('faiss', 'milvus')  # the keys of INDEX_BACKENDS
_TRAINING_ROWS_PER_LIST = 48  # IVF training sample: this many rows per list (faiss warns < 39)
_MAX_TRAINING_ROWS = 131_072
_RETRAIN_GROWTH = 4  # an IVF index is trained again when the map has grown this many times


@dataclass(frozen=True)
class IndexConf(Conf):
    """How a map retrieves places by global descriptor."""

    backend: str = option(
        'faiss',
        "Retrieval engine: 'faiss' (in the process, the map's own files) or 'milvus' (a "
        'Milvus collection: Milvus Lite in a local file, or a Milvus server or cluster)',
        choices=BACKENDS,
    )
    type: str = option(
        'auto',
        'faiss index: flat (exact), hnsw (graph over 8-bit codes) or ivfpq (inverted file '
        'over product-quantised codes); auto: flat up to auto_flat_max places, hnsw up to '
        'auto_hnsw_max, ivfpq beyond',
        choices=FAISS_TYPES,
    )
    auto_flat_max: int = option(20_000, 'auto: largest map searched exactly', min=0)
    auto_hnsw_max: int = option(200_000, 'auto: largest map given an HNSW index', min=0)
    hnsw_m: int = option(32, 'HNSW graph degree', min=2)
    hnsw_ef_search: int = option(128, 'HNSW search breadth (recall against speed)', min=1)
    hnsw_ef_construction: int = option(64, 'HNSW build breadth', min=1)
    ivf_nlist: int = option(0, 'IVF lists (0: about sqrt(N), 64 to 8192)', min=0)
    pq_m: int = option(
        0, 'PQ sub-quantisers of 8 bits (0: D / 32, rounded to a divisor of D)', min=0
    )
    ivf_nprobe: int = option(32, 'IVF lists searched per query', min=1)
    rescore_k: int = option(
        256,
        'Approximate indexes: candidates re-scored with the full-precision descriptors '
        '(0: use the approximate scores)',
        min=0,
    )
    tile_m: float = option(
        100.0,
        'Side of the map tiles that position priors select and Milvus filters by',
        unit='m',
        min=1.0,
    )
    milvus_uri: str = option(
        '',
        "Milvus: a server or cluster URI ('http://host:19530'), or a Milvus Lite file "
        "('x.db'); empty: Milvus Lite in the map directory (milvus.db)",
    )
    milvus_collection: str = option(
        '', 'Milvus: the collection (empty: made from the map directory name)'
    )
    milvus_index: str = option(
        'AUTOINDEX',
        'Milvus: the vector index type the collection gets (FLAT, IVF_FLAT, HNSW, IVF_PQ, '
        'DISKANN, AUTOINDEX; Milvus Lite serves FLAT, IVF_FLAT and AUTOINDEX)',
        choices=('AUTOINDEX', 'FLAT', 'IVF_FLAT', 'IVF_SQ8', 'IVF_PQ', 'HNSW', 'DISKANN'),
    )

    def resolved_type(self, count: int) -> str:
        """The faiss index type for a map of ``count`` places."""
        if self.type != 'auto':
            return self.type
        if count <= self.auto_flat_max:
            return 'flat'
        return 'hnsw' if count <= self.auto_hnsw_max else 'ivfpq'


@dataclass(frozen=True)
class SearchRestriction:
    """Which places a search may return (None: no restriction of that kind).

    ``ids`` is what in-process engines use: the place indices allowed, resolved by the map
    from the rest. Engines that filter themselves (Milvus) use the declarative fields.

    Attributes:
        ids: allowed place indices, sorted (int64).
        tiles: allowed map tiles (``vpr_ros.priors.tile_keys``).
        traverses: allowed traverses.
        since_ns: earliest place stamp.
        until_ns: latest place stamp.
    """

    ids: np.ndarray | None = None
    tiles: tuple[int, ...] | None = None
    traverses: tuple[int, ...] | None = None
    since_ns: int | None = None
    until_ns: int | None = None


class Index(Protocol):
    """What a map needs from a retrieval engine (descriptors are (N, D) float32, unit rows)."""

    conf: IndexConf

    @property
    def ntotal(self) -> int:
        """Number of indexed places."""

    @property
    def dim(self) -> int:
        """Descriptor dimension D."""

    @property
    def exact(self) -> bool:
        """Whether search scores are exact inner products (else the map re-scores them)."""

    @property
    def filters_in_engine(self) -> bool:
        """Whether ``search`` reads the declarative fields of a ``SearchRestriction`` (else
        ``ids``)."""

    def add(self, descriptors: np.ndarray, places: np.ndarray) -> None:
        """Append places, numbered after the ones already indexed (``places``: their rows)."""

    def search(
        self, queries: np.ndarray, k: int, *, where: SearchRestriction | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` per query: similarities (Q, k) and place indices (Q, k), best first;
        missing entries are index -1 and similarity -inf."""

    def finalize(self, places: np.ndarray) -> None:
        """Called before saving, with every place's row (e.g. to train an approximate index
        on a map grown place by place, or to pick the index for the map's size)."""

    def write(self, directory: Path) -> list[str]:
        """Write the index into the generation ``directory``; returns the file names."""

    def state(self) -> dict[str, Any]:
        """What the manifest records to read the index back (JSON values)."""

    def close(self) -> None:
        """Release connections or files (the map is no longer served)."""


class FaissIndex:
    """A faiss index for inner product: flat (over the descriptors), HNSW-SQ8 or IVF-PQ.

    Args:
        conf: the index settings.
        descriptors: the map's global descriptors (the flat index searches them; the
            others are trained and filled from them).
        faiss_index: an existing trained index (read from a map) covering the first
            ``faiss_index.ntotal`` places, or None.
        kind: the index type in use ('flat', 'hnsw', 'ivfpq').
        trained_on: places an IVF index was trained with.
        owns_descriptors: ``add`` appends to ``descriptors`` (an index used on its own;
            in a map, the map appends them).
    """

    FILE = 'index.faiss'

    def __init__(
        self,
        conf: IndexConf,
        descriptors: Column,
        faiss_index: faiss.Index | None = None,
        *,
        kind: str = 'flat',
        trained_on: int = 0,
        owns_descriptors: bool = False,
    ) -> None:
        self.conf = conf
        self.owns_descriptors = owns_descriptors
        self.descriptors = descriptors
        self.faiss_index = faiss_index
        self.kind = kind if faiss_index is not None else 'flat'
        self.trained_on = trained_on

    @property
    def ntotal(self) -> int:
        return len(self.descriptors)

    @property
    def dim(self) -> int:
        return int(self.descriptors.row_shape[0])

    @property
    def exact(self) -> bool:
        return self.faiss_index is None

    @property
    def filters_in_engine(self) -> bool:
        return False

    def add(self, descriptors: np.ndarray, places: np.ndarray | None = None) -> None:
        """Index the places just added to the map's descriptors (an index that owns its
        descriptors appends them first); an approximate index encodes them."""
        if self.owns_descriptors:
            self.descriptors.append(np.ascontiguousarray(descriptors, np.float32))
        if self.faiss_index is not None and len(descriptors):
            self._sync()

    def _sync(self) -> None:
        """Add the places beyond the ANN index's coverage to it."""
        assert self.faiss_index is not None
        start = int(self.faiss_index.ntotal)
        for _, block in _blocks(self.descriptors, start):
            self.faiss_index.add(np.ascontiguousarray(block, np.float32))

    def search(
        self, queries: np.ndarray, k: int, *, where: SearchRestriction | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = max(1, int(k))
        allowed = None if where is None else where.ids
        if self.ntotal == 0 or (allowed is not None and len(allowed) == 0):
            return _empty(len(queries), k)
        if self.faiss_index is None or (allowed is not None and len(allowed) <= 4 * k):
            return self._exact(queries, k, allowed)
        params = self._search_parameters(allowed)
        scores, ids = self.faiss_index.search(queries, k, params=params)
        if self.kind != 'ivfpq':  # HNSW over 8-bit codes: L2 on unit vectors
            scores = np.where(ids >= 0, 1.0 - scores / 2.0, -np.inf).astype(np.float32)
        scores[ids < 0] = -np.inf
        return scores, ids

    def _search_parameters(self, allowed: np.ndarray | None) -> Any:
        faiss: Any = importlib.import_module('faiss')  # its stubs lack the search parameters
        selector = None if allowed is None else faiss.IDSelectorBatch(allowed.astype(np.int64))
        if self.kind == 'ivfpq':
            params = faiss.SearchParametersIVF(nprobe=self.conf.ivf_nprobe)
        else:
            params = faiss.SearchParametersHNSW(efSearch=self.conf.hnsw_ef_search)
        if selector is not None:
            params.sel = selector
            params._selector = selector  # keep it alive as long as the parameters
        return params

    def _exact(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        if allowed is None:
            base = self.descriptors.load()
        else:
            base = np.ascontiguousarray(self.descriptors[allowed], np.float32)
        count = min(k, len(base))
        scores, ids = faiss.knn(queries, np.ascontiguousarray(base, np.float32), count,
                                metric=faiss.METRIC_INNER_PRODUCT)  # fmt: skip
        if allowed is not None:
            ids = np.where(ids >= 0, allowed[np.maximum(ids, 0)], -1)
        out_scores, out_ids = _empty(len(queries), k)
        out_scores[:, :count], out_ids[:, :count] = scores, ids
        out_scores[out_ids < 0] = -np.inf
        return out_scores, out_ids

    def finalize(self, places: np.ndarray | None = None) -> None:
        kind = self.conf.resolved_type(self.ntotal)
        if kind == 'flat':
            self.faiss_index, self.kind, self.trained_on = None, 'flat', 0
            return
        grown = self.kind == 'ivfpq' and self.ntotal > _RETRAIN_GROWTH * max(self.trained_on, 1)
        if self.faiss_index is None or kind != self.kind or grown:
            built = build_faiss_index(self.descriptors, self.conf.replace(type=kind))
            if built is None:  # too few places to train it: exact search
                self.faiss_index, self.kind, self.trained_on = None, 'flat', 0
                return
            self.faiss_index, self.kind, self.trained_on = built, kind, self.ntotal
        else:
            self._sync()

    def write(self, directory: Path) -> list[str]:
        if self.faiss_index is None:
            return []
        import faiss

        faiss.write_index(self.faiss_index, str(directory / self.FILE))
        return [self.FILE]

    def state(self) -> dict[str, Any]:
        return {'type': self.kind, 'trained_on': self.trained_on}

    def close(self) -> None:
        pass

    @classmethod
    def create(cls, conf: IndexConf, descriptors: Column, *, owns: bool = False) -> FaissIndex:
        """A new index over ``descriptors`` (exact until ``finalize`` picks its type)."""
        return cls(conf, descriptors, owns_descriptors=owns)

    @classmethod
    def read(
        cls,
        conf: IndexConf,
        state: Mapping[str, Any],
        files: Mapping[str, bytes | bytearray],
        descriptors: Column,
        directory: Path,
    ) -> FaissIndex:
        """The index a map's generation holds (``files``: its index files, read and checked).

        Raises:
            DatabaseError: the index is unreadable or does not match the places.
        """
        import faiss

        kind = str(state.get('type', 'flat' if cls.FILE not in files else conf.type))
        if cls.FILE not in files:
            return cls(conf, descriptors)
        data = np.frombuffer(files[cls.FILE], np.uint8)
        try:
            index = faiss.deserialize_index(data)
        except RuntimeError as err:
            msg = f'cannot read {str(directory / cls.FILE)!r}: {err}; rebuild the map'
            raise DatabaseError(msg) from err
        if int(index.ntotal) != len(descriptors) or int(index.d) != descriptors.row_shape[0]:
            msg = f'map {str(directory)!r}: the faiss index does not match the places; rebuild it'
            raise DatabaseError(msg)
        if isinstance(index, faiss.IndexFlat):  # written by an older version: search exactly
            return cls(conf, descriptors)
        if kind == 'flat' or kind not in FAISS_TYPES:
            kind = 'ivfpq' if 'IVF' in type(index).__name__ else 'hnsw'
        return cls(conf, descriptors, index, kind=kind, trained_on=int(state.get('trained_on', 0)))


def _empty(count: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((count, k), -np.inf, np.float32), np.full((count, k), -1, np.int64)


def _blocks(
    column: Column, start: int = 0, rows: int = 65_536
) -> Iterator[tuple[int, np.ndarray]]:
    for first in range(start, len(column), rows):
        yield first, column.read_range(first, first + rows)


INDEX_BACKENDS: dict[str, str] = {
    'faiss': 'vpr_ros.retrieval:FaissIndex',
    'milvus': 'vpr_ros.milvus_index:MilvusIndex',
}
"""Retrieval engines by ``IndexConf.backend``: 'module:Class' (imported when first used,
so that a settings table or --help does not import an engine's client)."""


def index_backend(name: str) -> Any:
    """The class of engine ``name``.

    Raises:
        ConfigError: unknown engine.
    """
    if name not in INDEX_BACKENDS:
        raise ConfigError(f'unknown index backend {name!r}; known: {sorted(INDEX_BACKENDS)}')
    module, _, attribute = INDEX_BACKENDS[name].partition(':')
    return getattr(importlib.import_module(module), attribute)


def make_index(conf: IndexConf, descriptors: np.ndarray) -> FaissIndex:
    """A faiss index of ``conf``'s kind over ``descriptors`` (N, D), on its own (not in a
    map: ``add`` appends descriptors to it); N may be 0, and the index is exact until
    ``finalize`` trains it."""
    column = Column.from_array(np.ascontiguousarray(descriptors, np.float32))
    index = FaissIndex.create(conf, column, owns=True)
    if len(column):
        index.finalize()
    return index


def build_faiss_index(descriptors: Column | np.ndarray, conf: IndexConf) -> faiss.Index | None:
    """A trained faiss index of ``conf.type`` ('hnsw' or 'ivfpq') over ``descriptors``
    (N, D), or None when there are too few places to train it."""
    import faiss

    column = descriptors if isinstance(descriptors, Column) else Column.from_array(descriptors)
    count, dim = len(column), int(column.row_shape[0])
    index: faiss.Index
    if conf.type == 'hnsw':
        # 8-bit codes with L2 (a ranking equal to inner product on unit vectors): the
        # descriptors themselves stay on disk for re-scoring.
        engine: Any = faiss  # its stubs lack IndexHNSWSQ's signature
        hnsw = engine.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_8bit, conf.hnsw_m)
        hnsw.hnsw.efConstruction = conf.hnsw_ef_construction
        hnsw.hnsw.efSearch = conf.hnsw_ef_search
        hnsw.train(_training_sample(column, 65_536))
        index = hnsw
    elif conf.type == 'ivfpq':
        nlist = conf.ivf_nlist or int(np.clip(np.sqrt(max(count, 1)), 64, 8192))
        pq_m = conf.pq_m or _divisor_near(dim, max(1, dim // 32))
        wanted = max(nlist * _TRAINING_ROWS_PER_LIST, 256 * 40)
        if count < min(wanted, 4 * max(nlist, 256)):
            logger.warning(
                'IVF-PQ needs more training data than %d places (nlist=%d); using exact search',
                count,
                nlist,
            )
            return None
        index = faiss.index_factory(dim, f'IVF{nlist},PQ{pq_m}', faiss.METRIC_INNER_PRODUCT)
        index.train(_training_sample(column, min(wanted, _MAX_TRAINING_ROWS)))
        faiss.extract_index_ivf(index).nprobe = conf.ivf_nprobe
    else:
        raise ValueError(f'build_faiss_index builds hnsw or ivfpq, not {conf.type!r}')
    for _, block in _blocks(column):
        index.add(np.ascontiguousarray(block, np.float32))
    return index


def _training_sample(column: Column, rows: int) -> np.ndarray:
    """At most ``rows`` rows of ``column`` spread over the whole map (seeded)."""
    if len(column) <= rows:
        return np.ascontiguousarray(column.read_range(0, len(column)), np.float32)
    chosen = np.sort(np.random.default_rng(0).choice(len(column), rows, replace=False))
    return np.ascontiguousarray(column[chosen], np.float32)


def _divisor_near(dim: int, target: int) -> int:
    target = max(1, target)
    divisors = [d for d in range(1, dim + 1) if dim % d == 0]
    return min(divisors, key=lambda d: abs(d - target))
