"""The place database (the map): descriptors, local features, place metadata, faiss index.

On disk a map is a directory of immutable *generations* and a pointer to the current one::

    CURRENT                    the name of the current generation (replaced atomically)
    .lock                      advisory writer lock (flock); holds the writer's PID
    gen-000002-1a2b3c4d/       one complete map, never changed once written:
      manifest.json            format, model identity, shapes, dtypes, counts, checksums
      places.npy               structured array, one row per place (see PLACE_DTYPE)
      global_descriptors.npy   (N, D) float32, L2-normalised
      local_features.npy       (N, L, C) float16, L2-normalised per location (optional)
      sequence_descriptors.npy (N, S) float16 cheap image descriptors for sequence
                               matching (optional; see vpr_ros.sequence)
      index.faiss              retrieval index over the global descriptors (vpr_ros.retrieval)
      store_<name>.npy         extra per-place feature stores (optional), one row per place,
                               e.g. the keypoints and descriptors a verifying re-ranker
                               reads (vpr_ros.rerankers); the manifest records each store's
                               shape, dtype, bytes per place and the settings it was made with

Everything is plain numpy (``allow_pickle=False``), JSON and faiss, so a map reads
without torch. ``manifest.json`` is written last and lists every file's size and
SHA-256; a directory without a valid manifest is not a map.

Saving takes the writer lock, writes and syncs a new generation beside the current one,
renames it into place and then atomically replaces ``CURRENT``: at every instant either
the old or the new map is the one that loads. The previous generation is kept (a reader
that read ``CURRENT`` just before the swap still finds its files); older generations and
the leftovers of an interrupted save are collected by the next save, or on open.
Loading reads every file into memory and checks it against the manifest (size, SHA-256,
npy header against the file size), so what is served never changes under the reader.

Maps written before generations existed (``manifest.json`` at the top of the directory)
still load; the next save into them converts them.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from vpr_ros import logger
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
CURRENT = 'CURRENT'
LOCK_FILE = '.lock'
GENERATION_PATTERN = re.compile(r'^gen-(\d{6})-[0-9a-f]{8}$')
KEEP_GENERATIONS = 2
"""Generations kept: the current one and the one before (for readers that read the old
``CURRENT`` just before a swap)."""
MAX_MANIFEST_BYTES = 16 << 20
"""A manifest larger than this is not one of ours (maps of millions of places stay far below)."""
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


# -- crash injection ---------------------------------------------------------------------

FAULT_HOOK: Callable[[str], None] | None = None
"""Called with the name of each filesystem step of a save just before it happens. Tests
set it to raise at one step (a crash there); ``None`` in normal use."""


def _step(name: str) -> None:
    if FAULT_HOOK is not None:
        FAULT_HOOK(name)


# -- layout --------------------------------------------------------------------------------


def _legacy_names() -> set[str]:
    """The files a map of the first layout (no generations) keeps at its top level."""
    names = {MANIFEST, MANIFEST + '.tmp', PLACES_FILE, GLOBAL_FILE, LOCAL_FILE, SEQUENCE_FILE}
    for backend in INDEX_BACKENDS.values():
        names.update(backend.files())
    return names


def _is_ours(name: str) -> bool:
    """Whether a name inside a map directory is one the map's writer makes."""
    return (
        name in (CURRENT, CURRENT + '.tmp', LOCK_FILE)
        or GENERATION_PATTERN.match(name) is not None
        or (name.startswith('.gen-') and name.endswith('.tmp'))
    )


def current_generation(path: str | os.PathLike[str]) -> Path:
    """The directory that holds the current manifest and arrays of map ``path``: the
    generation ``CURRENT`` names, or ``path`` itself for a map of the first layout.

    Raises:
        DatabaseError: ``path`` is not a map, or ``CURRENT`` is damaged.
    """
    path = Path(path)
    pointer = path / CURRENT
    try:
        name = pointer.read_bytes().decode('ascii').strip()
    except FileNotFoundError:
        if (path / MANIFEST).is_file():
            return path
        msg = (
            f'{str(path)!r} is not a vpr_ros map (no {CURRENT} and no {MANIFEST}); it may be '
            'half-written or another kind of directory; rebuild it with build_map'
        )
        raise DatabaseError(msg) from None
    except (OSError, UnicodeDecodeError) as err:
        msg = f'map {str(path)!r}: {CURRENT} is unreadable ({err}); rebuild the map'
        raise DatabaseError(msg) from err
    if not GENERATION_PATTERN.match(name):
        msg = f'map {str(path)!r}: {CURRENT} names {name[:80]!r}, not a generation; rebuild it'
        raise DatabaseError(msg)
    return path / name


def map_files(path: str | os.PathLike[str]) -> list[Path]:
    """The files of the current generation of map ``path`` (what a load reads)."""
    manifest = PlaceDatabase.read_manifest(path)
    directory = current_generation(path)
    return [directory / MANIFEST, *(directory / name for name in manifest['files'])]


def check_map_target(path: str | os.PathLike[str], *, what: str = 'the map directory') -> None:
    """Check, before any slow work, that a map can be written at ``path``.

    Refused: a symlink, an existing file, a path under a file, a directory that is neither
    empty nor a map, a read-only place and a full disk (a small probe file is written and
    removed).

    Raises:
        DatabaseError: with what is wrong and what to do.
    """
    path = Path(path)
    _recover_interrupted_swap(path)
    if path.is_symlink():
        msg = (
            f'{what} {str(path)!r} is a symlink (to {os.readlink(path)!r}); pass the real '
            'directory instead, so that the map is written where you expect'
        )
        raise DatabaseError(msg)
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            where = 'is a file' if parent == path else f'is under the file {str(parent)!r}'
            msg = f'{what} {str(path)!r} {where}; pass a directory path'
            raise DatabaseError(msg)
    if path.is_dir():
        _check_replaceable(path)
    existing = next(p for p in [path, *path.parents] if p.exists())
    probe = existing / f'.vpr_ros-write-probe-{os.getpid()}-{secrets.token_hex(4)}'
    try:
        with probe.open('wb') as stream:
            stream.write(bytes(1 << 16))
            stream.flush()
            os.fsync(stream.fileno())
    except OSError as err:
        raise _write_error(path, err) from err
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:  # a read-only file system: the probe was never made
            pass


def _write_error(path: Path, err: OSError) -> DatabaseError:
    """A one-line error for a failed write of map ``path``."""
    reason = err.strerror or str(err)
    if err.errno is None and 'requested and' in reason:  # numpy's short write
        reason = f'No space left on device ({reason})'
    if err.errno in (errno.ENOSPC, errno.EDQUOT) or reason.startswith('No space'):
        fix = 'free some space on that disk or choose another map directory'
    elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = 'choose a writable map directory (or fix its permissions)'
    else:
        fix = 'check the path and the disk'
    return DatabaseError(f'cannot write the map {str(path)!r}: {reason}; {fix}')


def _check_replaceable(path: Path) -> None:
    """Refuse a directory that holds anything but a map (a map is never written over a
    folder of photos)."""
    names = {entry.name for entry in path.iterdir()}
    if not names or (path / CURRENT).is_file() or (path / MANIFEST).is_file():
        return
    if all(_is_ours(name) for name in names):
        return  # an interrupted first save: only our own leftovers
    msg = f'{str(path)!r} exists and is not a vpr_ros map; refusing to replace it'
    raise DatabaseError(msg)


# -- writer lock ---------------------------------------------------------------------------

_MIN_LOCK_WAIT_S = 1.0
_HELD: dict[str, tuple[int, int]] = {}  # real path -> (fd, depth) of locks this process holds
_HELD_GUARD = threading.Lock()


@contextmanager
def map_lock(path: str | os.PathLike[str], *, timeout_s: float = 0.0) -> Iterator[Path]:
    """Hold the advisory writer lock of map ``path`` (``flock`` on ``<path>/.lock``).

    Every writer (``save``, ``build_map``, ``build_map --append``, the map_builder node)
    holds it from reading the old map to swapping in the new one, so two writers can never
    lose each other's places. The lock is re-entrant within one process; the OS releases
    it when the process dies. Readers do not take it. The directory is created if missing
    (with the process umask), and removed again on exit if the lock was all it held.

    Args:
        path: the map directory.
        timeout_s: how long to wait for another writer (0: fail at once).

    Raises:
        DatabaseError: another process writes the map (the message names its PID), or the
            directory cannot be created.
    """
    path = Path(path)
    key = os.path.realpath(path)
    with _HELD_GUARD:
        if key in _HELD:
            fd, depth = _HELD[key]
            _HELD[key] = (fd, depth + 1)
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield path
        finally:
            with _HELD_GUARD:
                fd, depth = _HELD[key]
                _HELD[key] = (fd, depth - 1)
        return
    created = not path.exists()
    try:
        _step('mkdir map')
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise _write_error(path, err) from err
    try:
        # At least a moment: a reader may hold the lock briefly to collect leftovers.
        deadline = time.monotonic() + max(timeout_s, _MIN_LOCK_WAIT_S)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise _locked_error(path, fd, timeout_s) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f'{os.getpid()}\n'.encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    with _HELD_GUARD:
        _HELD[key] = (fd, 1)
    try:
        yield path
    finally:
        with _HELD_GUARD:
            del _HELD[key]
        try:
            os.ftruncate(fd, 0)
            if created and {e.name for e in path.iterdir()} == {LOCK_FILE}:
                (path / LOCK_FILE).unlink()
                path.rmdir()
        except OSError:
            pass
        finally:
            os.close(fd)


def _locked_error(path: Path, fd: int, timeout_s: float) -> DatabaseError:
    try:
        pid = os.pread(fd, 32, 0).decode('ascii', 'replace').strip() or '?'
    except OSError:
        pid = '?'
    waited = f' (waited {timeout_s:g} s)' if timeout_s > 0 else ''
    msg = (
        f'map {str(path)!r} is being written by PID {pid}{waited}; wait for it to finish, '
        'or let build_map wait with --lock-timeout-s'
    )
    return DatabaseError(msg)


def _lock_is_free(path: Path) -> bool:
    """Whether no other process holds the writer lock (this one takes it briefly)."""
    try:
        fd = os.open(path / LOCK_FILE, os.O_RDWR)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


# -- leftovers ----------------------------------------------------------------------------


def _recover_interrupted_swap(path: Path) -> None:
    """Maps saved before generations were swapped by moving the old map to
    ``.<name>.old-*`` and the new one from ``.<name>.tmp-*``; a crash between the two left no
    map. Move the old one back and remove the half-written one."""
    parent = path.parent
    if not parent.is_dir():
        return
    olds = sorted(parent.glob(f'.{path.name}.old-*'))
    tmps = sorted(parent.glob(f'.{path.name}.tmp-*'))
    if not path.exists():
        for old in olds:
            if (old / MANIFEST).is_file() or (old / CURRENT).is_file():
                os.replace(old, path)
                logger.warning(
                    'map %r was missing after an interrupted save; restored it from %r',
                    str(path),
                    old.name,
                )
                olds.remove(old)
                break
    if not path.exists():
        return
    for leftover in [*olds, *tmps]:
        shutil.rmtree(leftover, ignore_errors=True)
        logger.info('map %r: removed %r left by an interrupted save', str(path), leftover.name)


def collect_leftovers(path: str | os.PathLike[str]) -> list[str]:
    """Remove what interrupted saves and replaced generations left in map ``path``.

    The caller holds the writer lock. Kept: ``CURRENT``, the current generation and the
    one before it; a map of the first layout is kept whole until a generation replaces it.

    Returns:
        The names removed.
    """
    path = Path(path)
    removed: list[str] = []
    pointer_ok = True
    try:
        current = current_generation(path)
    except DatabaseError:
        current, pointer_ok = None, False
    names = sorted(entry.name for entry in path.iterdir())
    generations = sorted(
        (n for n in names if GENERATION_PATTERN.match(n)),
        key=lambda n: int(GENERATION_PATTERN.match(n).group(1)),  # type: ignore[union-attr]
    )
    keep = set(generations[-KEEP_GENERATIONS:]) if current is not None else set(generations)
    if current is not None and current != path:
        keep.add(current.name)
    for name in names:
        target = path / name
        if name.startswith('.gen-') and name.endswith('.tmp'):
            pass  # an unfinished generation
        elif name == CURRENT + '.tmp':
            pass  # a pointer that was never swapped in
        elif GENERATION_PATTERN.match(name) and name not in keep:
            pass  # replaced twice: no reader can still want it
        elif name in _legacy_names() and current is not None and current != path:
            pass  # the first layout's files, replaced by a generation
        else:
            continue
        _step(f'remove {name}')
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()
        removed.append(name)
    if removed:
        logger.info('map %r: removed leftovers %s', str(path), ', '.join(removed))
    elif not pointer_ok and (path / CURRENT).exists():
        logger.warning('map %r: %s is damaged; the next save replaces it', str(path), CURRENT)
    return removed


def _has_leftovers(path: Path) -> bool:
    """Whether ``collect_leftovers`` would remove anything (a cheap look, no lock)."""
    if not path.is_dir():
        return False
    names = [entry.name for entry in path.iterdir()]
    generations = sum(GENERATION_PATTERN.match(n) is not None for n in names)
    return (
        generations > KEEP_GENERATIONS
        or any(n.startswith('.gen-') or n == CURRENT + '.tmp' for n in names)
        or (CURRENT in names and any(n in _legacy_names() for n in names))
    )


def _next_generation(path: Path) -> str:
    numbers = [
        int(match.group(1))
        for entry in path.iterdir()
        if (match := GENERATION_PATTERN.match(entry.name))
    ]
    return f'gen-{max(numbers, default=0) + 1:06d}-{secrets.token_hex(4)}'


# -- reading --------------------------------------------------------------------------------


def _read_checked(file: Path, info: Mapping[str, Any], verify: bool) -> bytearray:
    """A map file's bytes, read once, checked against its manifest entry."""
    expected = info['bytes']
    try:
        with file.open('rb') as stream:
            size = os.fstat(stream.fileno()).st_size
            if size != expected:
                msg = (
                    f'map file {str(file)!r} is {size} bytes, the manifest says {expected}: '
                    'truncated or overwritten; rebuild the map'
                )
                raise DatabaseError(msg)
            data = bytearray(size)
            if stream.readinto(data) != size:
                msg = f'map file {str(file)!r} shrank while it was read; load the map again'
                raise DatabaseError(msg)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise DatabaseError(f'cannot read map file {str(file)!r}: {err}') from err
    if verify and hashlib.sha256(data).hexdigest() != info['sha256']:
        raise DatabaseError(
            f'map file {str(file)!r} fails its checksum (corrupt); rebuild the map'
        )
    return data


def _npy_from_bytes(data: bytearray, file: Path) -> np.ndarray:
    """The array of an ``.npy`` file's bytes, without copying them; the header must agree
    with the data size, so a header that claims a huge shape allocates nothing."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f'npy format version {version!r}')
    except (ValueError, SyntaxError, TypeError) as err:
        raise DatabaseError(f'map file {str(file)!r} has a bad npy header: {err}') from err
    if dtype.hasobject:
        raise DatabaseError(f'map file {str(file)!r} holds Python objects; rebuild the map')
    count = 1
    for side in shape:
        count *= int(side)
    offset = stream.tell()
    if count * dtype.itemsize != len(data) - offset:
        msg = (
            f'map file {str(file)!r}: its npy header claims shape {shape!r} of {dtype} '
            f'({count * dtype.itemsize} bytes) but it holds {len(data) - offset}; rebuild '
            'the map'
        )
        raise DatabaseError(msg)
    array = np.frombuffer(data, dtype, count=count, offset=offset)
    return array.reshape(shape, order='F' if fortran else 'C')


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
        # The generation directory the map was loaded from (None: made in memory).
        self.directory: Path | None = None

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

    def save(self, path: str | os.PathLike, *, lock_timeout_s: float = 0.0) -> Path:
        """Write the map to directory ``path`` as a new generation and make it current.

        Holds the writer lock (see ``map_lock``) while it writes. The new generation is
        written and synced beside the current one, renamed into place, and then
        ``CURRENT`` is replaced atomically, so a crash at any point leaves either the old
        or the new map loadable; what it leaves behind is collected by the next save or
        open. A directory that is not empty and not a map is never written into.

        Args:
            path: the map directory.
            lock_timeout_s: how long to wait for another writer of the map (0: refuse).

        Raises:
            DatabaseError: the target is not a map, is being written by another process,
                or cannot be written (read-only, disk full), with what to do.
        """
        path = Path(path)
        _recover_interrupted_swap(path)
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            check_map_target(path)  # the one-line error of this case
        if path.is_dir():
            _check_replaceable(path)
        with map_lock(path, timeout_s=lock_timeout_s):
            try:
                collect_leftovers(path)
                name = _next_generation(path)
                tmp = path / f'.{name}.tmp'
                _step('mkdir generation')
                tmp.mkdir()
            except OSError as err:
                raise _write_error(path, err) from err
            try:
                self._write(tmp)
                _step('sync generation')
                _fsync_path(tmp)
                _step('rename generation')
                os.rename(tmp, path / name)
                pointer = path / (CURRENT + '.tmp')
                _step('write pointer')
                with pointer.open('w') as stream:
                    stream.write(name + '\n')
                    stream.flush()
                    os.fsync(stream.fileno())
                _step('swap pointer')
                os.replace(pointer, path / CURRENT)
                _step('sync map directory')
                _fsync_path(path)
            except Exception as err:  # not a crash: tidy up now rather than at the next save
                if current_generation_name(path) != name:
                    shutil.rmtree(tmp, ignore_errors=True)
                    shutil.rmtree(path / name, ignore_errors=True)
                if isinstance(err, OSError):
                    raise _write_error(path, err) from err
                raise
            try:
                collect_leftovers(path)
            except OSError as err:  # the new map is in place; leftovers wait for next time
                logger.warning('map %r: could not remove leftovers: %s', str(path), err)
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
            _step(f'write {name}')
            with (directory / name).open('wb') as stream:
                np.save(stream, np.ascontiguousarray(array), allow_pickle=False)
                stream.flush()
                os.fsync(stream.fileno())
        # An approximate index of a map grown place by place is trained now.
        self.index.finalize(self.global_descriptors)
        _step('write index')
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
        _step('write manifest')
        tmp_manifest.write_text(json.dumps(manifest, indent=2))
        _fsync_path(tmp_manifest)
        _step('rename manifest')
        os.replace(tmp_manifest, directory / MANIFEST)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        expected_model: ModelIdentity | None = None,
        mmap: bool = False,
        verify_checksums: bool = True,
    ) -> PlaceDatabase:
        """Open a map, validating format, files, checksums, shapes and (optionally) model.

        Every file is read into memory once and checked there (size, SHA-256, npy header
        against the data), so the map in memory cannot change when the files do: a map
        copied over or rebuilt while it is served does not affect the loaded one. Leftovers
        of an interrupted save are collected first when no writer holds the map.

        Args:
            path: the map directory.
            expected_model: if given, the map must have been built by this model.
            mmap: memory-map the local features instead of reading them (saves memory for
                offline tools; only safe while nothing truncates the file in place).
            verify_checksums: check each file's SHA-256 (sizes are always checked).

        Raises:
            FileNotFoundError: ``path`` does not exist.
            DatabaseError: anything else wrong, with what to do about it.
        """
        path = Path(path)
        _recover_interrupted_swap(path)
        if not path.exists():
            raise FileNotFoundError(f'map {str(path)!r} does not exist; build it with build_map')
        if _has_leftovers(path) and os.access(path, os.W_OK) and _lock_is_free(path):
            try:
                with map_lock(path):
                    collect_leftovers(path)
            except (OSError, DatabaseError) as err:  # another writer, or no permission
                logger.debug('map %r: leftovers not collected: %s', str(path), err)
        for attempt in range(3):
            directory = current_generation(path)
            manifest = cls.read_manifest(path)
            try:
                database = cls._load(directory, manifest, expected_model, mmap, verify_checksums)
                database.directory = directory
                return database
            except FileNotFoundError as err:
                # A writer replaced the generation (twice) while we read it: read the new one.
                if attempt == 2 or current_generation(path) == directory:
                    msg = f'map {str(path)!r} lacks {Path(str(err.filename)).name!r}; rebuild it'
                    raise DatabaseError(msg) from err
            except (KeyError, TypeError, IndexError, AttributeError, ValueError) as err:
                msg = (
                    f'map {str(path)!r} has a malformed manifest ({type(err).__name__}: {err}); '
                    'rebuild the map'
                )
                raise DatabaseError(msg) from err
        raise AssertionError('unreachable')

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
        _check_identity(model, path)
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
            if not isinstance(info, dict) or not isinstance(info.get('bytes'), int):
                raise DatabaseError(f'map {str(path)!r}: bad manifest entry for {name!r}')
            if not (path / name).is_file():
                raise DatabaseError(f'map {str(path)!r} lacks {name!r}; rebuild the map')
        arrays: dict[str, np.ndarray] = {}
        for name in sorted(expected_files - set(index_class.files())):
            file, info = path / name, manifest['files'][name]
            if mmap and name == LOCAL_FILE:
                arrays[name] = _mmap_checked(file, info, verify_checksums)
            else:
                arrays[name] = _npy_from_bytes(_read_checked(file, info, verify_checksums), file)
        for name in index_class.files():  # read by the index engine: checked on disk first
            _check_on_disk(path / name, manifest['files'][name], verify_checksums)
        stores = {store: arrays[STORE_FILE.format(store)] for store in store_entries}
        try:
            index = index_class.read(path, index_conf)
        except (ValueError, OSError, RuntimeError) as err:
            raise DatabaseError(f'cannot read map {str(path)!r}: {err}') from err
        places = arrays[PLACES_FILE]
        global_descriptors = arrays[GLOBAL_FILE]
        local = arrays.get(LOCAL_FILE)
        sequence = arrays.get(SEQUENCE_FILE)
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
    def is_map(path: str | os.PathLike) -> bool:
        """Whether ``path`` holds a map (of either layout), sound or not."""
        path = Path(path)
        return (path / CURRENT).is_file() or (path / MANIFEST).is_file()

    @staticmethod
    def read_manifest(path: str | os.PathLike) -> dict:
        """The current manifest of map ``path``, checked for format and version."""
        path = Path(path)
        file = current_generation(path) / MANIFEST
        try:
            if file.stat().st_size > MAX_MANIFEST_BYTES:
                raise DatabaseError(f'{str(file)!r} is too large to be a map manifest')
            manifest = json.loads(file.read_bytes().decode('utf-8'))
        except FileNotFoundError:
            msg = (
                f'{str(path)!r} is not a vpr_ros map (no {MANIFEST}); it may be half-written '
                f'or another kind of directory; rebuild it with build_map'
            )
            raise DatabaseError(msg) from None
        except UnicodeDecodeError as err:
            msg = (
                f'map manifest {str(file)!r} is unreadable: not UTF-8 text ({err.reason} at '
                f'byte {err.start}; a damaged file?); rebuild the map'
            )
            raise DatabaseError(msg) from err
        except (OSError, json.JSONDecodeError, RecursionError) as err:
            msg = f'map manifest {str(file)!r} is unreadable: {err}; rebuild the map'
            raise DatabaseError(msg) from err
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


def current_generation_name(path: str | os.PathLike[str]) -> str | None:
    """The generation ``CURRENT`` of map ``path`` names, or None (no or damaged pointer)."""
    try:
        directory = current_generation(path)
    except DatabaseError:
        return None
    return directory.name if directory != Path(path) else None


def _check_identity(model: ModelIdentity, path: Path) -> None:
    """The manifest's model record has the types it must have."""
    fields = (model.name, model.config_hash, model.weights_hash)
    dims = (model.global_dim, model.local_dim)
    if not all(isinstance(v, str) for v in fields) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 20 for v in dims
    ):
        raise DatabaseError(f'map {str(path)!r}: malformed model record {model!r}; rebuild it')


def _check_on_disk(file: Path, info: Mapping[str, Any], verify: bool) -> None:
    """A map file on disk has its manifest size and (``verify``) checksum."""
    size = file.stat().st_size
    if size != info['bytes']:
        msg = (
            f'map file {str(file)!r} is {size} bytes, the manifest says {info["bytes"]}: '
            'truncated or overwritten; rebuild the map'
        )
        raise DatabaseError(msg)
    if verify and _sha256(file) != info['sha256']:
        raise DatabaseError(_checksum_message(file))


def verify_checksums(directory: str | os.PathLike[str]) -> None:
    """Check the size and SHA-256 of every file of a map generation against its manifest
    (``PlaceDatabase.directory`` of a map loaded with ``verify_checksums=False``, e.g. in
    the background after start-up; generations never change once written).

    Raises:
        DatabaseError: a file is missing, has another size, or fails its checksum.
    """
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_bytes().decode('utf-8'))
        files = manifest['files']
        for name, info in files.items():
            _check_on_disk(directory / name, info, True)
    except DatabaseError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        msg = f'cannot verify map {str(directory)!r}: {err}; rebuild the map'
        raise DatabaseError(msg) from err


def _checksum_message(file: Path) -> str:
    return f'map file {str(file)!r} fails its checksum (corrupt); rebuild the map'


def _mmap_checked(file: Path, info: Mapping[str, Any], verify: bool) -> np.ndarray:
    """A memory map of a ``.npy`` map file, after the checks of ``_check_on_disk``."""
    _check_on_disk(file, info, verify)
    try:
        array = np.load(file, mmap_mode='r', allow_pickle=False)
    except (ValueError, OSError) as err:  # also a header that claims more than the file
        msg = f'cannot read map file {str(file)!r}: {err}; rebuild the map'
        raise DatabaseError(msg) from err
    if not isinstance(array, np.ndarray):
        raise DatabaseError(f'map file {str(file)!r} is not an npy array; rebuild the map')
    return array
