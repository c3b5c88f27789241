"""The place database (the map): descriptors, local features, place metadata, faiss index.

On disk a map is a directory::

    manifest.json              format, model identity, shapes, dtypes, counts, checksums
    places.npy                 structured array, one row per place (see PLACE_DTYPE)
    global_descriptors.npy     (N, D) float32, L2-normalised
    local_features.npy         (N, L, C) float16, L2-normalised per location (optional)
    sequence_descriptors.npy   (N, S) float16 cheap image descriptors for sequence
                               matching (optional; see vpr_ros.sequence)
    index.faiss                retrieval index over the global descriptors (vpr_ros.retrieval)
    store_<name>.npy           extra per-place feature stores (optional), one row per place,
                               e.g. the keypoints and descriptors a verifying re-ranker reads
                               (vpr_ros.rerankers); the manifest records each store's shape,
                               dtype, bytes per place and the settings it was made with

Everything is plain numpy (``allow_pickle=False``), JSON and faiss, so a map reads
without torch. ``manifest.json`` is written last and lists every file's size and
SHA-256; a directory without a valid manifest is not a map. Saving writes a complete new
directory next to the target and then renames it into place, so a crash never leaves a
half-written map where a good one was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vpr_ros.errors import ConfigError, DatabaseError
from vpr_ros.models.identity import ModelIdentity
from vpr_ros.retrieval import INDEX_BACKENDS, Index, IndexConf, make_index
from vpr_ros.types import Frame, Pose

FORMAT_NAME = 'vpr_ros.place_database'
FORMAT_VERSION = 1

MANIFEST = 'manifest.json'
PLACES_FILE = 'places.npy'
GLOBAL_FILE = 'global_descriptors.npy'
LOCAL_FILE = 'local_features.npy'
SEQUENCE_FILE = 'sequence_descriptors.npy'
STORE_FILE = 'store_{}.npy'

# One row per place. Poses are in ``frame_id`` (the map frame); ``traverse`` numbers the
# source sequences, and places of one traverse are stored in keyframe order, which gives
# the adjacency that sequence matching uses.
PLACE_DTYPE = np.dtype(
    [
        ('place_id', '<i8'),
        ('stamp_ns', '<i8'),
        ('x', '<f8'),
        ('y', '<f8'),
        ('z', '<f8'),
        ('qx', '<f8'),
        ('qy', '<f8'),
        ('qz', '<f8'),
        ('qw', '<f8'),
        ('frame_id', '<U64'),
        ('source', '<U256'),
        ('topic', '<U128'),
        ('msg_index', '<i8'),
        ('traverse', '<i4'),
    ]
)
POSE_FIELDS = ('x', 'y', 'z', 'qx', 'qy', 'qz', 'qw')


def place_records(frames: Sequence[Frame], *, first_id: int = 0, traverse: int = 0) -> np.ndarray:
    """Place rows for ``frames`` (ids counting up from ``first_id``)."""
    rows = np.zeros(len(frames), PLACE_DTYPE)
    for i, frame in enumerate(frames):
        pose = frame.pose or Pose(np.nan, np.nan, np.nan, np.nan, np.nan, np.nan, np.nan)
        rows[i] = (
            first_id + i,
            frame.stamp_ns,
            *pose.as_array(),
            frame.pose_frame_id or frame.frame_id,
            frame.source,
            frame.topic,
            frame.msg_index,
            traverse,
        )
    return rows


def _concatenate(existing: np.ndarray, new: np.ndarray, what: str) -> np.ndarray:
    """Append rows; an empty array takes the new rows' shape."""
    if len(existing) == 0:
        return new
    if new.shape[1:] != existing.shape[1:]:
        msg = f'{what} of shape {new.shape[1:]!r} cannot join a map with {existing.shape[1:]!r}'
        raise DatabaseError(msg)
    return np.concatenate([existing, new])


def store_entry(array: np.ndarray, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest entry of a feature store: file, shape, dtype, bytes per place, settings."""
    return {
        'shape': list(array.shape),
        'dtype': str(array.dtype),
        'bytes_per_place': int(array.dtype.itemsize * np.prod(array.shape[1:], dtype=np.int64)),
        'settings': dict(settings),
    }


def check_same_model(map_model: ModelIdentity, model: ModelIdentity, *, what: str) -> None:
    """Raise DatabaseError unless ``model`` is the one that built a map of ``map_model``."""
    same = (
        model.name == map_model.name
        and model.config_hash == map_model.config_hash
        and model.weights_hash == map_model.weights_hash
        and model.global_dim == map_model.global_dim
    )
    if not same:
        msg = (
            f'this map was built with {map_model.describe()}, but {what} is '
            f"{model.describe()}; rebuild the map with that model or use the map's model"
        )
        raise DatabaseError(msg)


def _fsync_path(path: Path) -> None:
    """Flush a file or directory entry to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open('rb') as stream:
        for block in iter(lambda: stream.read(1 << 22), b''):
            digest.update(block)
    return digest.hexdigest()


class PlaceDatabase:
    """A map of places that a query image is matched against.

    Args:
        model: identity of the model that made the descriptors.
        global_descriptors: (N, D) float32.
        places: (N,) rows of ``PLACE_DTYPE``.
        local_features: (N, L, C) float16/float32, or None for a map without re-ranking.
        index_conf: retrieval index settings (``vpr_ros.retrieval.IndexConf`` or overrides).
        index: an index over ``global_descriptors`` (read from disk), instead of a new one.
        sequence_descriptors: (N, S) sequence descriptors, or None.
        sequence_conf: how they were made (``image_size``, ``patch``).
        enu_origin: (lat, lon, alt) of the ENU frame of NavSatFix poses, or None.
        local_grid: (h, w) of the local feature maps (L = h * w), when known.
        feature_stores: extra per-place arrays by name (one row per place), e.g. what a
            verifying re-ranker reads; each name needs its ``feature_store_settings``.
        feature_store_settings: by store name, how the store was made (JSON values).
    """

    def __init__(
        self,
        model: ModelIdentity,
        global_descriptors: np.ndarray,
        places: np.ndarray,
        local_features: np.ndarray | None = None,
        *,
        index_conf: IndexConf | Mapping[str, Any] | None = None,
        index: Index | None = None,
        sequence_descriptors: np.ndarray | None = None,
        sequence_conf: Mapping[str, Any] | None = None,
        enu_origin: Sequence[float] | None = None,
        local_grid: Sequence[int] | None = None,
        feature_stores: Mapping[str, np.ndarray] | None = None,
        feature_store_settings: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        if global_descriptors.ndim != 2 or global_descriptors.shape[1] != model.global_dim:
            msg = (
                f'global descriptors of shape {global_descriptors.shape!r} do not match '
                f'the model {model.describe()}'
            )
            raise DatabaseError(msg)
        if len(places) != len(global_descriptors):
            msg = f'{len(places)} place rows for {len(global_descriptors)} descriptors'
            raise DatabaseError(msg)
        if local_features is not None and (
            len(local_features) != len(places) or local_features.ndim != 3
        ):
            msg = f'local features of shape {local_features.shape!r} for {len(places)} places'
            raise DatabaseError(msg)
        if sequence_descriptors is not None and len(sequence_descriptors) != len(places):
            msg = f'{len(sequence_descriptors)} sequence descriptors for {len(places)} places'
            raise DatabaseError(msg)
        stores = dict(feature_stores or {})
        store_settings = {k: dict(v) for k, v in (feature_store_settings or {}).items()}
        if set(stores) != set(store_settings):
            msg = (
                f'feature stores {sorted(stores)!r} and their settings '
                f'{sorted(store_settings)!r} must name the same stores'
            )
            raise DatabaseError(msg)
        for name, array in stores.items():
            if not name.isidentifier() or len(array) != len(places):
                msg = f'feature store {name!r} has {len(array)} rows for {len(places)} places'
                raise DatabaseError(msg)
        # Extra per-place arrays by name, and how each was made (see the module docstring).
        self.feature_stores = stores
        self.feature_store_settings = store_settings
        self.model = model
        # (lat, lon, alt) of the local ENU frame the poses are in, when they came from
        # NavSatFix; None for odometry/map-frame poses.
        self.enu_origin = tuple(float(v) for v in enu_origin) if enu_origin else None
        self.sequence_descriptors = sequence_descriptors
        # How the sequence descriptors were made (vpr_ros.sequence settings), or None.
        self.sequence_conf = dict(sequence_conf) if sequence_conf else None
        self.global_descriptors = np.ascontiguousarray(global_descriptors, np.float32)
        self.places = places.astype(PLACE_DTYPE, copy=False)
        self.local_features = local_features
        self.local_grid = tuple(int(v) for v in local_grid) if local_grid else None
        try:
            if not isinstance(index_conf, IndexConf):
                index_conf = IndexConf.from_dict(index_conf)
            self.index_conf = index_conf
        except ConfigError as err:
            raise DatabaseError(f'bad index settings: {err}') from err
        self.index: Index = (
            index if index is not None else make_index(self.index_conf, self.global_descriptors)
        )

    @classmethod
    def empty(
        cls,
        model: ModelIdentity,
        *,
        with_local: bool = True,
        index_conf: IndexConf | Mapping[str, Any] | None = None,
        sequence_conf: Mapping[str, Any] | None = None,
        feature_stores: Mapping[str, tuple[np.dtype, Mapping[str, Any]]] | None = None,
    ) -> PlaceDatabase:
        """A map with no places yet, for ``add``; with ``sequence_conf``, places also
        carry sequence descriptors made with those settings; ``feature_stores`` names the
        extra per-place stores, each as (row dtype, settings)."""
        local = np.zeros((0, 0, model.local_dim), np.float16) if with_local else None
        stores = dict(feature_stores or {})
        return cls(
            model,
            np.zeros((0, model.global_dim), np.float32),
            np.zeros(0, PLACE_DTYPE),
            local,
            index_conf=index_conf,
            sequence_descriptors=np.zeros((0, 0), np.float16) if sequence_conf else None,
            sequence_conf=sequence_conf,
            feature_stores={name: np.zeros(0, dtype) for name, (dtype, _) in stores.items()},
            feature_store_settings={name: settings for name, (_, settings) in stores.items()},
        )

    def __len__(self) -> int:
        return len(self.places)

    def __repr__(self) -> str:
        return f'<PlaceDatabase {len(self)} places, model {self.model.describe()}>'

    @property
    def poses(self) -> np.ndarray:
        """(N, 7) poses x y z qx qy qz qw (NaN where unknown)."""
        return np.stack([self.places[f] for f in POSE_FIELDS], axis=1)

    def poses_of(self, indices: np.ndarray) -> np.ndarray:
        """(K, 7) poses of the places ``indices`` (K,) (NaN where unknown); O(K)."""
        rows = self.places[np.asarray(indices, np.int64)]
        return np.stack([rows[f] for f in POSE_FIELDS], axis=1).reshape(-1, 7)

    def pose(self, index: int) -> Pose | None:
        row = self.places[index]
        if np.isnan(row['x']):
            return None
        return Pose(*(float(row[f]) for f in POSE_FIELDS))

    # -- building ---------------------------------------------------------------------

    def add(
        self,
        global_descriptors: np.ndarray,
        places: np.ndarray,
        local_features: np.ndarray | None = None,
        sequence_descriptors: np.ndarray | None = None,
        *,
        local_grid: Sequence[int] | None = None,
        feature_stores: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Append places (descriptors from the same model as the map); ``feature_stores``
        holds a row per new place for each of the map's feature stores."""
        if global_descriptors.shape[1:] != (self.model.global_dim,):
            msg = (
                f'descriptors of dimension {global_descriptors.shape[1:]!r} cannot join a map '
                f'of {self.model.describe()}'
            )
            raise DatabaseError(msg)
        if (self.local_features is None) != (local_features is None):
            raise DatabaseError('add local features to a map exactly when it has them')
        if (self.sequence_descriptors is None) != (sequence_descriptors is None):
            raise DatabaseError('add sequence descriptors to a map exactly when it has them')
        places = places.astype(PLACE_DTYPE, copy=True)
        counts = {len(global_descriptors), len(places)}
        counts |= {len(a) for a in (local_features, sequence_descriptors) if a is not None}
        new_stores = dict(feature_stores or {})
        if set(new_stores) != set(self.feature_stores):
            msg = (
                f'adding places with feature stores {sorted(new_stores)!r} to a map with '
                f'{sorted(self.feature_stores)!r}; add exactly the stores the map has'
            )
            raise DatabaseError(msg)
        counts |= {len(a) for a in new_stores.values()}
        if len(counts) != 1:
            raise DatabaseError(f'adding places with mismatched row counts {sorted(counts)!r}')
        if len(np.intersect1d(places['place_id'], self.places['place_id'])):
            raise DatabaseError('place ids must be unique; use next_place_id()')
        # Build every new array first, so that a refused add changes nothing.
        local = self.local_features
        if local_features is not None:
            if local_features.shape[-1] != self.model.local_dim:
                msg = (
                    f'local features with {local_features.shape[-1]} channels cannot join a map '
                    f'of {self.model.describe()}'
                )
                raise DatabaseError(msg)
            grid = tuple(int(v) for v in local_grid) if local_grid else None
            if grid and self.local_grid and len(self) and grid != self.local_grid:
                msg = (
                    f'local features on a {grid!r} grid cannot join a map with a '
                    f'{self.local_grid!r} grid'
                )
                raise DatabaseError(msg)
            assert local is not None  # checked above: the map has local features
            local = _concatenate(local, np.asarray(local_features, np.float16), 'local features')
        sequence = self.sequence_descriptors
        if sequence_descriptors is not None:
            assert sequence is not None  # checked above: the map has them
            sequence = _concatenate(
                sequence, np.asarray(sequence_descriptors, np.float16), 'sequence descriptors'
            )
        stores = {}
        for name, rows in new_stores.items():
            existing = self.feature_stores[name]
            if rows.dtype != existing.dtype or rows.shape[1:] != existing.shape[1:]:
                msg = (
                    f'feature store {name!r} rows of {rows.dtype} {rows.shape[1:]!r} cannot '
                    f'join a map whose rows are {existing.dtype} {existing.shape[1:]!r}'
                )
                raise DatabaseError(msg)
            stores[name] = np.concatenate([existing, rows])
        self.global_descriptors = np.concatenate(
            [self.global_descriptors, np.asarray(global_descriptors, np.float32)]
        )
        self.places = np.concatenate([self.places, places])
        self.local_features, self.sequence_descriptors = local, sequence
        self.feature_stores.update(stores)
        if local_features is not None and local_grid:
            self.local_grid = tuple(int(v) for v in local_grid)
        self.index.add(np.ascontiguousarray(global_descriptors, np.float32))

    def next_place_id(self) -> int:
        return int(self.places['place_id'].max()) + 1 if len(self) else 0

    def next_traverse(self) -> int:
        return int(self.places['traverse'].max()) + 1 if len(self) else 0

    def extend(self, other: PlaceDatabase) -> None:
        """Append another map's places (same model), renumbering ids and traverses."""
        self.check_model(other.model, what='the appended map')
        if not len(other):
            return
        if other.enu_origin != self.enu_origin:
            msg = (
                f"the appended map's poses are in the ENU frame at {other.enu_origin!r}, this "
                f"map's at {self.enu_origin!r}; build both from the same origin"
            )
            raise DatabaseError(msg)
        if self.sequence_conf != other.sequence_conf:
            msg = (
                f'the appended map has sequence descriptors {other.sequence_conf!r}, this map '
                f'{self.sequence_conf!r}; build both with the same settings'
            )
            raise DatabaseError(msg)
        if self.feature_store_settings != other.feature_store_settings:
            msg = (
                f'the appended map has feature stores {other.feature_store_settings!r}, this '
                f'map {self.feature_store_settings!r}; build both with the same verifiers'
            )
            raise DatabaseError(msg)
        places = other.places.copy()
        places['place_id'] = places['place_id'] - places['place_id'].min() + self.next_place_id()
        places['traverse'] += self.next_traverse()
        self.add(
            other.global_descriptors,
            places,
            other.local_features,
            other.sequence_descriptors,
            local_grid=other.local_grid,
            feature_stores=other.feature_stores,
        )

    # -- retrieval ----------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` places per query: (similarities (Q, k), place indices (Q, k))."""
        return self.index.search(queries, min(k, max(len(self), 1)))

    def check_model(self, model: ModelIdentity, *, what: str = 'the query model') -> None:
        """Raise DatabaseError unless ``model`` made this map's descriptors."""
        check_same_model(self.model, model, what=what)

    # -- storage ------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the map to directory ``path``, replacing an existing map.

        The new map is written and synced in a temporary directory beside ``path``, then
        renamed into place; the old map is deleted only after that. A directory that is
        not empty and not a map is never replaced.
        """
        path = Path(path)
        if path.exists() and any(path.iterdir()) and not (path / MANIFEST).is_file():
            msg = f'{str(path)!r} exists and is not a vpr_ros map; refusing to replace it'
            raise DatabaseError(msg)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f'.{path.name}.tmp-'))
        old = None
        try:
            self._write(tmp)
            _fsync_path(tmp)
            if path.exists():
                old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f'.{path.name}.old-'))
                os.replace(path, old)
            os.replace(tmp, path)
            _fsync_path(path.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None and not path.exists():
                os.replace(old, path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def _write(self, directory: Path) -> None:
        files = {PLACES_FILE: self.places, GLOBAL_FILE: self.global_descriptors}
        if self.local_features is not None:
            files[LOCAL_FILE] = np.asarray(self.local_features, np.float16)
        if self.sequence_descriptors is not None:
            files[SEQUENCE_FILE] = np.asarray(self.sequence_descriptors, np.float16)
        for store, array in self.feature_stores.items():
            files[STORE_FILE.format(store)] = array
        for name, array in files.items():
            with (directory / name).open('wb') as stream:
                np.save(stream, np.ascontiguousarray(array), allow_pickle=False)
                stream.flush()
                os.fsync(stream.fileno())
        # An approximate index of a map grown place by place is trained now.
        self.index.finalize(self.global_descriptors)
        index_files = self.index.write(directory)
        for name in index_files:
            _fsync_path(directory / name)
        names = [*files, *index_files]
        local = None
        if self.local_features is not None:
            local = {
                'num_locations': int(self.local_features.shape[1]),
                'dim': int(self.local_features.shape[2]),
                'dtype': 'float16',
                'grid': list(self.local_grid) if self.local_grid else None,
            }
        manifest = {
            'format': FORMAT_NAME,
            'format_version': FORMAT_VERSION,
            'created': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
            'model': self.model.to_dict(),
            'place_count': len(self),
            'global': {'dim': int(self.model.global_dim), 'dtype': 'float32'},
            'local': local,
            'sequence': self.sequence_conf,
            'enu_origin': list(self.enu_origin) if self.enu_origin else None,
            'feature_stores': {
                store: store_entry(array, self.feature_store_settings[store])
                for store, array in self.feature_stores.items()
            },
            'index': self.index_conf.to_dict(),
            'files': {
                name: {
                    'bytes': (directory / name).stat().st_size,
                    'sha256': _sha256(directory / name),
                }
                for name in names
            },
        }
        tmp_manifest = directory / (MANIFEST + '.tmp')
        tmp_manifest.write_text(json.dumps(manifest, indent=2))
        _fsync_path(tmp_manifest)
        os.replace(tmp_manifest, directory / MANIFEST)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        expected_model: ModelIdentity | None = None,
        mmap: bool = True,
        verify_checksums: bool = True,
    ) -> PlaceDatabase:
        """Open a map, validating format, files, checksums, shapes and (optionally) model.

        Args:
            path: the map directory.
            expected_model: if given, the map must have been built by this model.
            mmap: memory-map the local features instead of reading them.
            verify_checksums: check each file's SHA-256 (sizes are always checked).

        Raises:
            FileNotFoundError: ``path`` does not exist.
            DatabaseError: anything else wrong, with what to do about it.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f'map {str(path)!r} does not exist; build it with build_map')
        manifest = cls.read_manifest(path)
        try:
            return cls._load(path, manifest, expected_model, mmap, verify_checksums)
        except (KeyError, TypeError, IndexError, AttributeError, ValueError) as err:
            msg = (
                f'map {str(path)!r} has a malformed manifest ({type(err).__name__}: {err}); '
                'rebuild the map'
            )
            raise DatabaseError(msg) from err

    @classmethod
    def _load(
        cls,
        path: Path,
        manifest: dict,
        expected_model: ModelIdentity | None,
        mmap: bool,
        verify_checksums: bool,
    ) -> PlaceDatabase:
        model = ModelIdentity.from_dict(manifest['model'])
        if expected_model is not None:
            check_same_model(model, expected_model, what='the query model')
        try:
            index_conf = IndexConf.from_dict(manifest['index'])
        except ConfigError as err:
            raise DatabaseError(f'map {str(path)!r} has bad index settings: {err}') from err
        index_class = INDEX_BACKENDS[index_conf.backend]
        expected_files = {PLACES_FILE, GLOBAL_FILE, *index_class.files()}
        expected_files |= {LOCAL_FILE} if manifest['local'] else set()
        expected_files |= {SEQUENCE_FILE} if manifest['sequence'] else set()
        store_entries: dict[str, Any] = manifest.get('feature_stores') or {}
        expected_files |= {STORE_FILE.format(store) for store in store_entries}
        if set(manifest['files']) != expected_files:
            msg = (
                f'map {str(path)!r} lists files {sorted(manifest["files"])!r}, expected '
                f'{sorted(expected_files)!r}; rebuild the map'
            )
            raise DatabaseError(msg)
        for name, info in manifest['files'].items():
            file = path / name
            if not file.is_file():
                raise DatabaseError(f'map {str(path)!r} lacks {name!r}; rebuild the map')
            size = file.stat().st_size
            if size != info['bytes']:
                msg = (
                    f'map file {str(file)!r} is {size} bytes, the manifest says '
                    f'{info["bytes"]}: truncated or overwritten; rebuild the map'
                )
                raise DatabaseError(msg)
            if verify_checksums and _sha256(file) != info['sha256']:
                msg = f'map file {str(file)!r} fails its checksum (corrupt); rebuild the map'
                raise DatabaseError(msg)
        try:
            places = np.load(path / PLACES_FILE, allow_pickle=False)
            global_descriptors = np.load(path / GLOBAL_FILE, allow_pickle=False)
            local = None
            if LOCAL_FILE in manifest['files']:
                local = np.load(
                    path / LOCAL_FILE, mmap_mode='r' if mmap else None, allow_pickle=False
                )
            sequence = None
            if SEQUENCE_FILE in manifest['files']:
                sequence = np.load(path / SEQUENCE_FILE, allow_pickle=False)
            stores = {
                store: np.load(
                    path / STORE_FILE.format(store),
                    mmap_mode='r' if mmap else None,
                    allow_pickle=False,
                )
                for store in store_entries
            }
            index = index_class.read(path, index_conf)
        except (ValueError, OSError, RuntimeError) as err:
            raise DatabaseError(f'cannot read map {str(path)!r}: {err}') from err
        if local is not None and (
            local.ndim != 3
            or local.shape[1] != manifest['local']['num_locations']
            or local.shape[2] != model.local_dim
        ):
            raise DatabaseError(f'map {str(path)!r}: local features do not match the manifest')
        count = manifest['place_count']
        if places.dtype != PLACE_DTYPE or len(places) != count:
            raise DatabaseError(f'map {str(path)!r}: places.npy does not match the manifest')
        if global_descriptors.shape != (count, model.global_dim):
            msg = (
                f'map {str(path)!r}: global descriptors {global_descriptors.shape!r}, '
                f'manifest says ({count}, {model.global_dim})'
            )
            raise DatabaseError(msg)
        if index.ntotal != count or index.dim != model.global_dim:
            raise DatabaseError(f'map {str(path)!r}: the faiss index does not match the places')
        if local is not None and (
            len(local) != count or local.shape[2] != manifest['local']['dim']
        ):
            raise DatabaseError(f'map {str(path)!r}: local features do not match the manifest')
        if sequence is not None and len(sequence) != count:
            raise DatabaseError(f'map {str(path)!r}: sequence descriptors do not match the places')
        for store, array in stores.items():
            entry = store_entries[store]
            if list(array.shape) != entry['shape'] or str(array.dtype) != entry['dtype']:
                msg = (
                    f'map {str(path)!r}: feature store {store!r} is {array.dtype} '
                    f'{array.shape!r}, the manifest says {entry["dtype"]} {entry["shape"]!r}; '
                    'rebuild the map'
                )
                raise DatabaseError(msg)
        return cls(
            model,
            global_descriptors,
            places,
            local,
            index_conf=index_conf,
            index=index,
            sequence_descriptors=sequence,
            sequence_conf=manifest.get('sequence'),
            enu_origin=manifest.get('enu_origin'),
            local_grid=(manifest['local'] or {}).get('grid'),
            feature_stores=stores,
            feature_store_settings={s: e['settings'] for s, e in store_entries.items()},
        )

    @staticmethod
    def read_manifest(path: str | os.PathLike) -> dict:
        """The manifest of map ``path``, checked for format and version."""
        path = Path(path)
        file = path / MANIFEST
        if not file.is_file():
            msg = (
                f'{str(path)!r} is not a vpr_ros map (no {MANIFEST}); it may be half-written '
                f'or another kind of directory; rebuild it with build_map'
            )
            raise DatabaseError(msg)
        try:
            manifest = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise DatabaseError(f'map manifest {str(file)!r} is unreadable: {err}') from err
        if not isinstance(manifest, dict) or manifest.get('format') != FORMAT_NAME:
            raise DatabaseError(f'{str(file)!r} is not a vpr_ros map manifest')
        version = manifest.get('format_version')
        if version != FORMAT_VERSION:
            msg = (
                f'map {str(path)!r} has format version {version!r}; this vpr_ros reads version '
                f'{FORMAT_VERSION}; rebuild the map with this version'
            )
            raise DatabaseError(msg)
        return manifest
