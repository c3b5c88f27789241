"""The ``milvus`` retrieval engine: a Milvus collection behind the ``retrieval.Index`` seam.

One pymilvus client talks to Milvus Lite (embedded: a file, ``milvus.db`` in the map
directory by default, what the tests use) and to a Milvus server or cluster
(``IndexConf.milvus_uri = 'http://host:19530'``). Each place is one entity: its place index
(primary key), its global descriptor, its map tile (``vpr_ros.priors.tile_keys``), traverse
and stamp, so that restricting a search by position prior, traverse or date happens in the
engine (``filters_in_engine``). Re-scoring the short list and local re-ranking stay in the
node, which reads the candidates' descriptors and features from the map store.

Places added to a map wait in the map (searched exactly) until it is saved; the save inserts
them. The manifest records how many places the collection holds for this map generation,
and searches are limited to those, so a collection that an interrupted save left ahead of
the map never answers with places the map does not have.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import numpy as np

from vpr_ros.errors import DatabaseError
from vpr_ros.mapfiles import Column
from vpr_ros.priors import tile_keys
from vpr_ros.retrieval import FaissIndex, IndexConf, SearchRestriction

MILVUS_LITE_FILE = 'milvus.db'
_INSERT_ROWS = 4096  # entities per insert call


def _collection_name(conf: IndexConf, map_directory: Path) -> str:
    if conf.milvus_collection:
        return conf.milvus_collection
    stem = re.sub(r'[^0-9A-Za-z_]', '_', map_directory.resolve().name) or 'map'
    return f'vpr_{stem}'[:255]


class MilvusIndex:
    """Places searched in a Milvus collection (inner product on unit descriptors).

    Args:
        conf: the index settings (``milvus_uri``, ``milvus_collection``, ``milvus_index``).
        descriptors: the map's global descriptors (inserted at save; places not yet
            inserted are searched exactly here).
        places: the map's place rows (their tile, traverse and stamp are inserted).
        inserted: places the collection holds for this map.
        uri: the client URI, once known; collection: its collection.
    """

    def __init__(
        self,
        conf: IndexConf,
        descriptors: Column,
        *,
        inserted: int = 0,
        uri: str = '',
        collection: str = '',
    ) -> None:
        self.conf = conf
        self.descriptors = descriptors
        self.inserted = inserted
        self.uri = uri
        self.collection = collection
        self._client: Any = None
        self._lock = threading.Lock()
        self._places: list[np.ndarray] = []  # rows of places added since the last save
        self._pending = FaissIndex(conf.replace(type='flat'), descriptors)

    # -- the Index protocol -------------------------------------------------------------

    @property
    def ntotal(self) -> int:
        return len(self.descriptors)

    @property
    def dim(self) -> int:
        return int(self.descriptors.row_shape[0])

    @property
    def exact(self) -> bool:
        return False  # the map re-scores the short list with the stored descriptors

    @property
    def filters_in_engine(self) -> bool:
        return True

    def add(self, descriptors: np.ndarray, places: np.ndarray) -> None:
        self._places.append(np.asarray(places))

    def search(
        self, queries: np.ndarray, k: int, *, where: SearchRestriction | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(np.atleast_2d(queries), np.float32)
        k = max(1, int(k))
        scores = np.full((len(queries), k), -np.inf, np.float32)
        ids = np.full((len(queries), k), -1, np.int64)
        if self.inserted and self.uri:
            expression = self._filter(where)
            with self._lock:
                found = self._connect().search(
                    self.collection,
                    data=queries.tolist(),
                    limit=min(k, 16_384),
                    filter=expression,
                    anns_field='vector',
                    search_params={'metric_type': 'IP'},
                )
            for row, hits in enumerate(found):
                for rank, hit in enumerate(hits[:k]):
                    ids[row, rank] = int(hit['id'])
                    scores[row, rank] = float(hit['distance'])
        if self.ntotal > self.inserted:  # places not saved yet: exact search over them
            extra_scores, extra_ids = self._search_pending(queries, k, where)
            both_scores = np.concatenate([scores, extra_scores], axis=1)
            both_ids = np.concatenate([ids, extra_ids], axis=1)
            order = np.argsort(-both_scores, axis=1, kind='stable')[:, :k]
            scores = np.take_along_axis(both_scores, order, axis=1)
            ids = np.take_along_axis(both_ids, order, axis=1)
        return scores, ids

    def _search_pending(
        self, queries: np.ndarray, k: int, where: SearchRestriction | None
    ) -> tuple[np.ndarray, np.ndarray]:
        allowed = np.arange(self.inserted, self.ntotal, dtype=np.int64)
        if where is not None and self._places:
            rows = np.concatenate(self._places)[-len(allowed) :]
            keep = np.ones(len(rows), bool)
            if where.tiles is not None:
                keys = tile_keys(rows['x'], rows['y'], self.conf.tile_m)
                keep &= np.isin(keys, np.asarray(where.tiles, np.int64))
            if where.traverses is not None:
                keep &= np.isin(rows['traverse'], np.asarray(where.traverses, np.int64))
            if where.since_ns is not None:
                keep &= rows['stamp_ns'] >= where.since_ns
            if where.until_ns is not None:
                keep &= rows['stamp_ns'] <= where.until_ns
            allowed = allowed[keep]
        return self._pending.search(queries, k, where=SearchRestriction(ids=allowed))

    def _filter(self, where: SearchRestriction | None) -> str:
        terms = [f'id < {self.inserted}']
        if where is not None:
            if where.tiles is not None:
                terms.append(f'tile in {list(map(int, where.tiles))}')
            if where.traverses is not None:
                terms.append(f'traverse in {list(map(int, where.traverses))}')
            if where.since_ns is not None:
                terms.append(f'stamp_ns >= {int(where.since_ns)}')
            if where.until_ns is not None:
                terms.append(f'stamp_ns <= {int(where.until_ns)}')
        return ' and '.join(terms)

    def finalize(self, places: np.ndarray) -> None:
        self._all_places = places  # write() inserts the rows beyond ``inserted``

    def write(self, directory: Path) -> list[str]:
        """Insert the places added since the last save (the generation holds no index file:
        the collection lives in the engine, Milvus Lite's file beside the generations)."""
        map_directory = directory.parent
        if not self.uri:
            self.uri = self.conf.milvus_uri or str(map_directory / MILVUS_LITE_FILE)
            self.collection = _collection_name(self.conf, map_directory)
        places = getattr(self, '_all_places', None)
        if places is None or len(places) != self.ntotal:
            raise DatabaseError('the milvus index was not finalized with every place row')
        with self._lock:
            client = self._connect()
            if not client.has_collection(self.collection):
                self._create_collection(client)
            start = self.inserted
            if start == 0 and client.get_collection_stats(self.collection)['row_count']:
                client.delete(self.collection, filter='id >= 0')  # a map written again
            keys = tile_keys(places['x'], places['y'], self.conf.tile_m)
            for first in range(start, self.ntotal, _INSERT_ROWS):
                stop = min(first + _INSERT_ROWS, self.ntotal)
                vectors = np.asarray(self.descriptors.read_range(first, stop), np.float32)
                client.upsert(
                    self.collection,
                    [
                        {
                            'id': i,
                            'vector': vectors[i - first].tolist(),
                            'tile': int(keys[i]),
                            'traverse': int(places['traverse'][i]),
                            'stamp_ns': int(places['stamp_ns'][i]),
                        }
                        for i in range(first, stop)
                    ],
                )
            client.flush(self.collection)
            client.load_collection(self.collection)
        self.inserted = self.ntotal
        self._places = []
        return []

    def state(self) -> dict[str, Any]:
        uri = self.uri
        if uri and not self.conf.milvus_uri:
            uri = MILVUS_LITE_FILE  # relative to the map directory: the map can move
        return {'type': 'milvus', 'inserted': self.inserted, 'uri': uri,
                'collection': self.collection}  # fmt: skip

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    # -- engine -------------------------------------------------------------------------

    def _connect(self) -> Any:
        if self._client is None:
            from pymilvus import MilvusClient  # the client only when this engine is used

            try:
                self._client = MilvusClient(self.uri)
            except Exception as err:  # pymilvus raises its own exception types
                msg = f'cannot reach Milvus at {self.uri!r}: {err}; check milvus_uri'
                raise DatabaseError(msg) from err
        return self._client

    def _create_collection(self, client: Any) -> None:
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field('id', DataType.INT64, is_primary=True)
        schema.add_field('vector', DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field('tile', DataType.INT64)
        schema.add_field('traverse', DataType.INT64)
        schema.add_field('stamp_ns', DataType.INT64)
        params = client.prepare_index_params()
        params.add_index(field_name='vector', index_type=self.conf.milvus_index, metric_type='IP')
        client.create_collection(self.collection, schema=schema, index_params=params)

    @classmethod
    def create(cls, conf: IndexConf, descriptors: Column) -> MilvusIndex:
        return cls(conf, descriptors)

    @classmethod
    def read(
        cls,
        conf: IndexConf,
        state: dict[str, Any],
        files: dict[str, bytes | bytearray],
        descriptors: Column,
        directory: Path,
    ) -> MilvusIndex:
        """The collection a map's manifest names (``directory``: its generation).

        Raises:
            DatabaseError: Milvus unreachable, or the collection holds fewer places than
                the map.
        """
        map_directory = directory.parent
        inserted = int(state.get('inserted', 0))
        uri = conf.milvus_uri or str(state.get('uri') or MILVUS_LITE_FILE)
        if not conf.milvus_uri and '://' not in uri:
            uri = str(map_directory / uri)
        collection = conf.milvus_collection or str(state.get('collection') or '')
        collection = collection or _collection_name(conf, map_directory)
        index = cls(conf, descriptors, inserted=inserted, uri=uri, collection=collection)
        if inserted:
            client = index._connect()
            if not client.has_collection(collection):
                msg = (
                    f'map {str(map_directory)!r}: Milvus at {uri!r} has no collection '
                    f'{collection!r}; rebuild the map (or set milvus_uri)'
                )
                raise DatabaseError(msg)
            count = int(client.get_collection_stats(collection)['row_count'])
            if count < inserted:
                msg = (
                    f'map {str(map_directory)!r}: collection {collection!r} holds {count} '
                    f'places, the map {inserted}; rebuild the map'
                )
                raise DatabaseError(msg)
            client.load_collection(collection)
        return index
