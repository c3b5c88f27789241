"""The place database (the map): place rows, descriptors, local features, retrieval index.

On disk a map is a directory of immutable *generations* and a pointer to the current one::

    CURRENT                    the name of the current generation (replaced atomically)
    .lock                      advisory writer lock (flock); holds the writer's PID
    milvus.db/                 Milvus Lite's data, for maps served by Milvus Lite (optional)
    gen-000002-1a2b3c4d/       one complete map, never changed once written:
      manifest.json            format, model identity, columns, index state, checksums
      strings.json             the frame ids, bag paths and topics the place rows name
      places.s000001.npy       place rows (see PLACE_DTYPE), 96 bytes a place
      global.s000001.npy       (N, D) float32 global descriptors, L2-normalised
      local.s000001.npy        (N, L, C) local features, int8 by default (vpr_ros.codecs)
      sequence.s000001.npy     (N, S) sequence descriptors, 6 bits a value by default
      store_<name>.s000001.npy extra per-place feature stores (optional), e.g. the
                               keypoints a verifying re-ranker reads (vpr_ros.rerankers)
      index.faiss              the approximate index's codes (none for exact search)

Each per-place array is a *column* of one or more *segments* (``vpr_ros.mapfiles``). A save
that adds places writes one new segment per column and hard-links the other segments from
the generation before, so growing a map costs the new places; generations stay immutable.
Everything is plain numpy (``allow_pickle=False``), JSON and faiss, so a map reads without
torch. ``manifest.json`` is written last and lists every file's size and SHA-256 (per 8 MB
chunk for segments); a directory without a valid manifest is not a map.

Saving takes the writer lock, writes and syncs a new generation beside the current one,
renames it into place and then atomically replaces ``CURRENT``: at every instant either
the old or the new map is the one that loads. The previous generation is kept (a reader
that read ``CURRENT`` just before the swap still finds its files); older generations and
the leftovers of an interrupted save are collected by the next save, or on open.

Loading is tiered, so start-up does not grow with the map beyond what stays in memory:

* read into memory and checked there (size, SHA-256, npy header): the manifest, the
  strings, the place rows, the index (and the global descriptors of a map searched
  exactly);
* opened and checked for size and header, then read row by row when needed with ``pread``
  (never memory-mapped): global descriptors of maps with an approximate index (re-scoring),
  local features, sequence descriptors, feature stores. Their chunk checksums are verified
  at load (``verify_checksums``), or later (``verify``, ``verify_in_background``). A file
  changed under a running reader, or a chunk that fails its checksum, makes the places it
  holds unusable: they are reported and no longer retrieved, and nothing crashes.

Maps of format version 1 (one file per array, ``places.npy`` with fixed-width strings) and
maps written before generations existed still load; the next save converts them.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
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
from vpr_ros.codecs import VectorCodec
from vpr_ros.errors import ConfigError, DatabaseError
from vpr_ros.mapfiles import (
    Column,
    Integrity,
    Segment,
    check_file_entry,
    chunk_digests,
    dtype_from_json,
    dtype_to_json,
    npy_header_bytes,
    parse_npy_header,
    write_segment,
)
from vpr_ros.models.identity import ModelIdentity
from vpr_ros.priors import PositionPrior, TileGrid, tiles_near, within
from vpr_ros.retrieval import Index, IndexConf, SearchRestriction, index_backend
from vpr_ros.types import Frame, Pose

FORMAT_NAME = 'vpr_ros.place_database'
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

MANIFEST = 'manifest.json'
STRINGS_FILE = 'strings.json'
CURRENT = 'CURRENT'
LOCK_FILE = '.lock'
MILVUS_LITE_FILE = 'milvus.db'
GENERATION_PATTERN = re.compile(r'^gen-(\d{6})-[0-9a-f]{8}$')
SEGMENT_PATTERN = re.compile(r'^(?P<column>[a-z_0-9]+)\.s(?P<number>\d{6})\.npy$')
KEEP_GENERATIONS = 2
"""Generations kept: the current one and the one before (for readers that read the old
``CURRENT`` just before a swap)."""
MAX_MANIFEST_BYTES = 16 << 20
"""A manifest larger than this is not one of ours (maps of millions of places stay far below)."""

# The files of format version 1 (one per array).
PLACES_FILE = 'places.npy'
GLOBAL_FILE = 'global_descriptors.npy'
LOCAL_FILE = 'local_features.npy'
SEQUENCE_FILE = 'sequence_descriptors.npy'
STORE_FILE = 'store_{}.npy'
INDEX_FILE = 'index.faiss'

# Columns of a map: the place rows, the global descriptors, the local features, the
# sequence descriptors, and 'store_<name>' for each feature store.
PLACES, GLOBAL, LOCAL, SEQUENCE = 'places', 'global', 'local', 'sequence'
STORE_PREFIX = 'store_'

DEFAULT_LOCAL_DTYPE = 'int8'
"""How build_map stores local features (``vpr_ros.codecs``): no re-ranked answer changes on
the shared datasets against float16, at half the bytes."""
DEFAULT_SEQUENCE_DTYPE = 'int6'
"""How build_map stores sequence descriptors: Nordland sequence R@1 within 0.2 points of
float16, at 38 % of the bytes."""

# One row per place. Poses are in the frame ``frame_id`` names (the map frame); ``traverse``
# numbers the source sequences, and places of one traverse are stored in keyframe order,
# which gives the adjacency that sequence matching uses. ``frame_id``, ``source`` (the bag)
# and ``topic`` index the map's strings (``PlaceDatabase.strings``), so a row has a fixed
# 96 bytes whatever the names.
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
        ('msg_index', '<i8'),
        ('traverse', '<i4'),
        ('frame_id', '<i4'),
        ('source', '<i4'),
        ('topic', '<i4'),
    ]
)
STRING_FIELDS = ('frame_id', 'source', 'topic')
# The same row with its strings in place: what ``place_records`` makes from frames (and the
# row of format version 1).
PLACE_RECORD_DTYPE = np.dtype(
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
    """Place rows (``PLACE_RECORD_DTYPE``, strings in place) for ``frames`` (ids counting up
    from ``first_id``); ``PlaceDatabase.add`` takes them."""
    rows = np.zeros(len(frames), PLACE_RECORD_DTYPE)
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


def store_entry(column: Column | np.ndarray, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest entry of a feature store: shape, dtype, bytes per place, settings."""
    shape = [len(column), *column.shape[1:]]
    return {
        'shape': shape,
        'dtype': str(column.dtype),
        'bytes_per_place': int(column.dtype.itemsize * np.prod(shape[1:], dtype=np.int64)),
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
    return {
        MANIFEST,
        MANIFEST + '.tmp',
        PLACES_FILE,
        GLOBAL_FILE,
        LOCAL_FILE,
        SEQUENCE_FILE,
        INDEX_FILE,
    }


def _is_ours(name: str) -> bool:
    """Whether a name inside a map directory is one the map's writer makes."""
    return (
        name in (CURRENT, CURRENT + '.tmp', LOCK_FILE, MILVUS_LITE_FILE)
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


def column_files(path: str | os.PathLike[str], column: str) -> list[Path]:
    """The segment files of column ``column`` ('places', 'global', 'local', 'sequence',
    'store_<name>') in the current generation of map ``path``, in row order."""
    manifest = PlaceDatabase.read_manifest(path)
    directory = current_generation(path)
    if manifest['format_version'] == 1:
        names = {PLACES: PLACES_FILE, GLOBAL: GLOBAL_FILE, LOCAL: LOCAL_FILE}
        names[SEQUENCE] = SEQUENCE_FILE
        legacy = names.get(column, f'{column}.npy')
        return [directory / legacy] if legacy in manifest['files'] else []
    info = manifest['columns'].get(column)
    return [] if info is None else [directory / s['file'] for s in info['segments']]


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
    """A map file's bytes, read once, checked against its manifest entry (``sha256``: one
    digest of the whole file, or a list of per-chunk digests)."""
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
    if verify and not _digests_match(data, info):
        raise DatabaseError(_checksum_message(file))
    return data


def _digests_match(data: bytes | bytearray | memoryview, info: Mapping[str, Any]) -> bool:
    digest = info['sha256']
    if isinstance(digest, list):
        return chunk_digests(data, int(info['chunk_bytes'])) == digest
    return hashlib.sha256(data).hexdigest() == str(digest)


def _npy_from_bytes(data: bytearray, file: Path) -> np.ndarray:
    """The array of an ``.npy`` file's bytes, without copying them; the header must agree
    with the data size, so a header that claims a huge shape allocates nothing."""
    shape, fortran, dtype, offset = parse_npy_header(data, file)
    count = 1
    for side in shape:
        count *= int(side)
    if count * dtype.itemsize != len(data) - offset:
        msg = (
            f'map file {str(file)!r}: its npy header claims shape {shape!r} of {dtype} '
            f'({count * dtype.itemsize} bytes) but it holds {len(data) - offset}; rebuild '
            'the map'
        )
        raise DatabaseError(msg)
    array = np.frombuffer(data, dtype, count=count, offset=offset)
    return array.reshape(shape, order='F' if fortran else 'C')


def _checksum_message(file: Path) -> str:
    return f'map file {str(file)!r} fails its checksum (corrupt); rebuild the map'


class DecodedColumn:
    """A column of encoded vectors (``vpr_ros.codecs``) read as float32 unit vectors.

    Indexing reads and decodes only the rows asked for; ``np.asarray`` decodes all.
    """

    def __init__(self, column: Column, codec: VectorCodec, lead: tuple[int, ...]) -> None:
        self.column = column
        self.codec = codec
        self.lead = lead
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return len(self.column)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.column), *self.lead, self.codec.dim)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        return self.codec.decode(self.column[key])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.codec.decode(self.column.read_range(0, len(self.column)))
        return out if dtype is None else out.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f'<{self.codec.name} vectors {self.shape!r}>'


def _as_rows(values: np.ndarray | Column | DecodedColumn) -> np.ndarray:
    """A numpy array of rows given as an array or a column (read whole)."""
    return np.asarray(values)


class PlaceDatabase:
    """A map of places that a query image is matched against.

    Args:
        model: identity of the model that made the descriptors.
        global_descriptors: (N, D) float32.
        places: (N,) place rows: ``PLACE_RECORD_DTYPE`` (strings in place, as
            ``place_records`` makes them) or ``PLACE_DTYPE`` (string indices into
            ``strings``).
        local_features: (N, L, C) float, or None for a map without re-ranking.
        index_conf: retrieval index settings (``vpr_ros.retrieval.IndexConf`` or overrides).
        index: an index over the global descriptors (read from disk), instead of a new one.
        sequence_descriptors: (N, S) sequence descriptors, or None.
        sequence_conf: how they were made (``image_size``, ``patch``).
        enu_origin: (lat, lon, alt) of the ENU frame of NavSatFix poses, or None.
        local_grid: (h, w) of the local feature maps (L = h * w), when known.
        feature_stores: extra per-place arrays by name (one row per place), e.g. what a
            verifying re-ranker reads; each name needs its ``feature_store_settings``.
        feature_store_settings: by store name, how the store was made (JSON values).
        strings: the strings ``PLACE_DTYPE`` rows index (default: just '').
        local_dtype: how local features are stored (``vpr_ros.codecs.CODECS``).
        sequence_dtype: how sequence descriptors are stored.
        traverses: by traverse number, what is known of it (``added``: when it joined the
            map, UTC ISO 8601; ``source``).
    """

    def __init__(
        self,
        model: ModelIdentity,
        global_descriptors: np.ndarray | Column,
        places: np.ndarray | Column,
        local_features: np.ndarray | Column | DecodedColumn | None = None,
        *,
        index_conf: IndexConf | Mapping[str, Any] | None = None,
        index: Index | None = None,
        sequence_descriptors: np.ndarray | Column | DecodedColumn | None = None,
        sequence_conf: Mapping[str, Any] | None = None,
        enu_origin: Sequence[float] | None = None,
        local_grid: Sequence[int] | None = None,
        feature_stores: Mapping[str, np.ndarray | Column] | None = None,
        feature_store_settings: Mapping[str, Mapping[str, Any]] | None = None,
        strings: Sequence[str] | None = None,
        local_dtype: str = DEFAULT_LOCAL_DTYPE,
        sequence_dtype: str = DEFAULT_SEQUENCE_DTYPE,
        traverses: Mapping[int, Mapping[str, Any]] | None = None,
    ) -> None:
        if global_descriptors.ndim != 2 or global_descriptors.shape[1] != model.global_dim:
            msg = (
                f'global descriptors of shape {global_descriptors.shape!r} do not match '
                f'the model {model.describe()}'
            )
            raise DatabaseError(msg)
        count = len(global_descriptors)
        if len(places) != count:
            raise DatabaseError(f'{len(places)} place rows for {count} descriptors')
        if local_features is not None and (
            len(local_features) != count or local_features.ndim != 3
        ):
            msg = f'local features of shape {local_features.shape!r} for {count} places'
            raise DatabaseError(msg)
        if sequence_descriptors is not None and len(sequence_descriptors) != count:
            msg = f'{len(sequence_descriptors)} sequence descriptors for {count} places'
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
            if not name.isidentifier() or len(array) != count:
                msg = f'feature store {name!r} has {len(array)} rows for {count} places'
                raise DatabaseError(msg)
        try:
            if not isinstance(index_conf, IndexConf):
                index_conf = IndexConf.from_dict(index_conf)
        except ConfigError as err:
            raise DatabaseError(f'bad index settings: {err}') from err
        self.index_conf: IndexConf = index_conf
        self.model = model
        self.integrity = Integrity()
        # Extra per-place arrays by name, and how each was made (see the module docstring).
        self.feature_store_settings = store_settings
        # (lat, lon, alt) of the local ENU frame the poses are in, when they came from
        # NavSatFix; None for odometry/map-frame poses.
        self.enu_origin = tuple(float(v) for v in enu_origin) if enu_origin else None
        # How the sequence descriptors were made (vpr_ros.sequence settings), or None.
        self.sequence_conf = dict(sequence_conf) if sequence_conf else None
        self.local_grid = tuple(int(v) for v in local_grid) if local_grid else None
        self.traverses: dict[int, dict[str, Any]] = {
            int(k): dict(v) for k, v in (traverses or {}).items()
        }
        self.strings: list[str] = ['']
        self._string_ids: dict[str, int] = {'': 0}
        self._columns: dict[str, Column] = {}
        self.local_codec: VectorCodec | None = None
        self.sequence_codec: VectorCodec | None = None
        if isinstance(places, Column) or (places.dtype == PLACE_DTYPE and strings is not None):
            # Rows of this map's own string table (read from a map): kept as they are.
            self.strings = [str(s) for s in (strings if strings is not None else [''])]
            self._string_ids = {}
            for i, value in enumerate(self.strings):
                self._string_ids.setdefault(value, i)
            column = places if isinstance(places, Column) else Column.from_array(places)
            rows = column.load()
            for name in STRING_FIELDS:
                if len(rows) and (rows[name].min() < 0 or rows[name].max() >= len(self.strings)):
                    raise DatabaseError("place rows name strings beyond the map's strings")
        else:
            rows = self._compact_places(np.asarray(places), strings)
            column = Column.from_array(rows)
        self._columns[PLACES] = column
        self._columns[GLOBAL] = (
            global_descriptors
            if isinstance(global_descriptors, Column)
            else Column.from_array(np.ascontiguousarray(global_descriptors, np.float32))
        )
        self.local_codec = self._vector_column(LOCAL, local_features, local_dtype, model.local_dim)
        sequence_dim = None
        if sequence_descriptors is not None:
            sequence_dim = int(sequence_descriptors.shape[-1])
            if isinstance(sequence_descriptors, Column) and self.sequence_conf:
                # Stored codes: the vector length comes from the settings, not the bytes.
                width, height = (int(v) for v in self.sequence_conf['image_size'])
                sequence_dim = width * height
        self.sequence_codec = self._vector_column(
            SEQUENCE, sequence_descriptors, sequence_dtype, sequence_dim
        )
        for name, array in stores.items():
            self._columns[STORE_PREFIX + name] = (
                array if isinstance(array, Column) else Column.from_array(np.asarray(array))
            )
        self._max_place_id = int(rows['place_id'].max()) if len(rows) else -1
        self._max_traverse = int(rows['traverse'].max()) if len(rows) else -1
        self._tiles: TileGrid | None = None
        self._unusable = np.zeros(0, np.int64)
        self._unusable_version = 0
        self._next_segment = 1
        self._verifier: threading.Thread | None = None
        self.index: Index = index if index is not None else self._new_index()

    def _vector_column(
        self,
        name: str,
        values: np.ndarray | Column | DecodedColumn | None,
        dtype: str,
        dim: int | None,
    ) -> VectorCodec | None:
        """Store ``values`` as column ``name`` with codec ``dtype``; returns the codec."""
        if values is None or dim is None:
            return None
        try:
            codec = VectorCodec(dtype, dim)
        except ValueError as err:
            raise DatabaseError(str(err)) from err
        if isinstance(values, Column):  # already stored rows (read from a map)
            self._columns[name] = values
            return codec
        vectors = _as_rows(values)
        lead = tuple(vectors.shape[1:-1])
        row_dtype, row_shape = codec.row_dtype(lead)
        column = Column(row_dtype, row_shape)
        for start in range(0, len(vectors), 65_536):
            column.append(codec.encode(vectors[start : start + 65_536]))
        self._columns[name] = column
        return codec

    def _new_index(self) -> Index:
        backend = index_backend(self.index_conf.backend)
        index: Index = backend.create(self.index_conf, self._columns[GLOBAL])
        return index

    @classmethod
    def empty(
        cls,
        model: ModelIdentity,
        *,
        with_local: bool = True,
        index_conf: IndexConf | Mapping[str, Any] | None = None,
        sequence_conf: Mapping[str, Any] | None = None,
        feature_stores: Mapping[str, tuple[np.dtype, Mapping[str, Any]]] | None = None,
        local_dtype: str = DEFAULT_LOCAL_DTYPE,
        sequence_dtype: str = DEFAULT_SEQUENCE_DTYPE,
    ) -> PlaceDatabase:
        """A map with no places yet, for ``add``; with ``sequence_conf``, places also
        carry sequence descriptors made with those settings; ``feature_stores`` names the
        extra per-place stores, each as (row dtype, settings)."""
        local = np.zeros((0, 0, model.local_dim), np.float32) if with_local else None
        stores = dict(feature_stores or {})
        sequence = None
        if sequence_conf:
            width, height = (int(v) for v in sequence_conf['image_size'])
            sequence = np.zeros((0, width * height), np.float32)
        return cls(
            model,
            np.zeros((0, model.global_dim), np.float32),
            np.zeros(0, PLACE_DTYPE),
            local,
            index_conf=index_conf,
            sequence_descriptors=sequence,
            sequence_conf=sequence_conf,
            feature_stores={name: np.zeros(0, dtype) for name, (dtype, _) in stores.items()},
            feature_store_settings={name: settings for name, (_, settings) in stores.items()},
            local_dtype=local_dtype,
            sequence_dtype=sequence_dtype,
        )

    def __len__(self) -> int:
        return len(self._columns[PLACES])

    def __repr__(self) -> str:
        return f'<PlaceDatabase {len(self)} places, model {self.model.describe()}>'

    # -- what it holds ------------------------------------------------------------------

    @property
    def places(self) -> np.ndarray:
        """(N,) place rows (``PLACE_DTYPE``), in memory."""
        return self._columns[PLACES].load()

    @property
    def global_descriptors(self) -> Column:
        """(N, D) float32 global descriptors (read by index; ``np.asarray`` reads all)."""
        return self._columns[GLOBAL]

    @property
    def local_features(self) -> DecodedColumn | None:
        """(N, L, C) float32 local features, decoded from the stored codes when read."""
        if self.local_codec is None:
            return None
        column = self._columns[LOCAL]
        lead = (len(column.row_shape) and column.row_shape[0]) or 0
        return DecodedColumn(column, self.local_codec, (int(lead),))

    @property
    def sequence_descriptors(self) -> DecodedColumn | None:
        """(N, S) float32 sequence descriptors, decoded when read."""
        if self.sequence_codec is None:
            return None
        return DecodedColumn(self._columns[SEQUENCE], self.sequence_codec, ())

    @property
    def feature_stores(self) -> dict[str, Column]:
        """Extra per-place rows by store name (read by index)."""
        return {
            name[len(STORE_PREFIX) :]: column
            for name, column in self._columns.items()
            if name.startswith(STORE_PREFIX)
        }

    @property
    def poses(self) -> np.ndarray:
        """(N, 7) poses x y z qx qy qz qw (NaN where unknown)."""
        places = self.places
        return np.stack([places[f] for f in POSE_FIELDS], axis=1)

    def poses_of(self, indices: np.ndarray) -> np.ndarray:
        """(K, 7) poses of the places ``indices`` (K,) (NaN where unknown); O(K)."""
        rows = self.places[np.asarray(indices, np.int64)]
        return np.stack([rows[f] for f in POSE_FIELDS], axis=1).reshape(-1, 7)

    def pose(self, index: int) -> Pose | None:
        row = self.places[index]
        if np.isnan(row['x']):
            return None
        return Pose(*(float(row[f]) for f in POSE_FIELDS))

    def place_strings(self, field: str, indices: np.ndarray | None = None) -> np.ndarray:
        """The strings of field ``field`` ('frame_id', 'source' or 'topic') of the places
        ``indices`` (default: all), as an array of str."""
        if field not in STRING_FIELDS:
            raise ValueError(f'{field!r} is not one of the string fields {STRING_FIELDS}')
        refs = self.places[field] if indices is None else self.places[field][indices]
        table = np.array(self.strings, dtype=object)
        return np.asarray(table[refs], dtype=str)

    def bytes_per_place(self) -> dict[str, float]:
        """Bytes a place costs by column (as stored)."""
        return {
            name: column.nbytes / max(len(column), 1) for name, column in self._columns.items()
        }

    # -- strings ------------------------------------------------------------------------

    def _intern(self, value: str) -> int:
        found = self._string_ids.get(value)
        if found is None:
            found = self._string_ids[value] = len(self.strings)
            self.strings.append(value)
        return found

    def _compact_places(self, rows: np.ndarray, strings: Sequence[str] | None) -> np.ndarray:
        """``PLACE_DTYPE`` rows indexing this map's strings, from either kind of row."""
        if rows.dtype == PLACE_DTYPE:
            out = rows.copy()
            if strings is not None:
                table = np.array([self._intern(str(s)) for s in strings], np.int32)
                for name in STRING_FIELDS:
                    refs = out[name]
                    if len(refs) and (refs.min() < 0 or refs.max() >= len(table)):
                        raise DatabaseError(f'place rows name strings beyond the {len(table)}')
                    out[name] = table[refs]
            elif len(rows):
                top = max(int(rows[name].max()) for name in STRING_FIELDS)
                low = min(int(rows[name].min()) for name in STRING_FIELDS)
                if low < 0 or top >= len(self.strings):
                    msg = (
                        'place rows name strings this map does not have; pass the strings '
                        'their map names (strings=other.strings), or rows of place_records'
                    )
                    raise DatabaseError(msg)
            return out
        if rows.dtype.names is None or set(rows.dtype.names) != set(PLACE_DTYPE.names or ()):
            msg = f'place rows of dtype {rows.dtype} are neither PLACE_DTYPE nor place_records'
            raise DatabaseError(msg)
        out = np.zeros(len(rows), PLACE_DTYPE)
        for name in PLACE_DTYPE.names or ():
            if name in STRING_FIELDS:
                values = rows[name]
                unique, inverse = np.unique(values, return_inverse=True)
                ids = np.array([self._intern(str(v)) for v in unique], np.int32)
                out[name] = ids[inverse] if len(ids) else 0
            else:
                out[name] = rows[name]
        return out

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
        strings: Sequence[str] | None = None,
    ) -> None:
        """Append places (descriptors from the same model as the map); ``feature_stores``
        holds a row per new place for each of the map's feature stores. Costs the new
        places only: they wait in memory and are written once, at ``save``."""
        global_descriptors = np.asarray(global_descriptors)
        if global_descriptors.ndim != 2 or global_descriptors.shape[1:] != (
            self.model.global_dim,
        ):
            msg = (
                f'descriptors of dimension {global_descriptors.shape[1:]!r} cannot join a map '
                f'of {self.model.describe()}'
            )
            raise DatabaseError(msg)
        if (self.local_codec is None) != (local_features is None):
            raise DatabaseError('add local features to a map exactly when it has them')
        if (self.sequence_codec is None) != (sequence_descriptors is None):
            raise DatabaseError('add sequence descriptors to a map exactly when it has them')
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
        # Build every new block first, so that a refused add changes nothing.
        string_count = len(self.strings)
        try:
            rows = self._compact_places(np.asarray(places), strings)
            self._check_new_ids(rows)
            blocks: dict[str, np.ndarray] = {PLACES: rows}
            if local_features is not None:
                assert self.local_codec is not None
                blocks[LOCAL] = self._local_block(local_features, local_grid)
            if sequence_descriptors is not None:
                assert self.sequence_codec is not None
                sequence = np.asarray(sequence_descriptors, np.float32)
                if sequence.shape[1:] != (self.sequence_codec.dim,):
                    msg = (
                        f'sequence descriptors of shape {sequence.shape[1:]!r} cannot join a '
                        f'map whose have {(self.sequence_codec.dim,)!r}'
                    )
                    raise DatabaseError(msg)
                blocks[SEQUENCE] = self.sequence_codec.encode(sequence)
            for name, store_rows in new_stores.items():
                existing = self._columns[STORE_PREFIX + name]
                store_rows = np.asarray(store_rows)
                if (
                    store_rows.dtype != existing.dtype
                    or store_rows.shape[1:] != existing.row_shape
                ):
                    msg = (
                        f'feature store {name!r} rows of {store_rows.dtype} '
                        f'{store_rows.shape[1:]!r} cannot join a map whose rows are '
                        f'{existing.dtype} {existing.row_shape!r}'
                    )
                    raise DatabaseError(msg)
                blocks[STORE_PREFIX + name] = store_rows
        except DatabaseError:
            for value in self.strings[string_count:]:
                del self._string_ids[value]
            del self.strings[string_count:]
            raise
        descriptors = np.ascontiguousarray(global_descriptors, np.float32)
        blocks[GLOBAL] = descriptors
        for name, block in blocks.items():
            self._columns[name].append(block)
        if local_features is not None and local_grid:
            self.local_grid = tuple(int(v) for v in local_grid)
        if len(rows):
            self._max_place_id = max(self._max_place_id, int(rows['place_id'].max()))
            self._max_traverse = max(self._max_traverse, int(rows['traverse'].max()))
            self._note_traverses(rows)
        self._tiles = None
        self.index.add(descriptors, rows)

    def _local_block(
        self, local_features: np.ndarray, local_grid: Sequence[int] | None
    ) -> np.ndarray:
        assert self.local_codec is not None
        local = _as_rows(local_features)
        if local.ndim != 3 or local.shape[-1] != self.model.local_dim:
            msg = (
                f'local features of shape {local.shape[1:]!r} ({local.shape[-1]} channels) '
                f'cannot join a map of {self.model.describe()}'
            )
            raise DatabaseError(msg)
        column = self._columns[LOCAL]
        grid = tuple(int(v) for v in local_grid) if local_grid else None
        if grid and self.local_grid and len(self) and grid != self.local_grid:
            msg = (
                f'local features on a {grid!r} grid cannot join a map with a '
                f'{self.local_grid!r} grid'
            )
            raise DatabaseError(msg)
        encoded = self.local_codec.encode(local)
        if len(column) and encoded.shape[1:] != column.row_shape:
            msg = (
                f'local features of shape {local.shape[1:]!r} cannot join a map whose have '
                f'{self.local_features.shape[1:] if self.local_features else None!r}'
            )
            raise DatabaseError(msg)
        if not len(column) and encoded.shape[1:] != column.row_shape:
            self._columns[LOCAL] = Column(encoded.dtype, encoded.shape[1:])
        return encoded

    def _check_new_ids(self, rows: np.ndarray) -> None:
        if not len(rows):
            return
        ids = rows['place_id']
        if len(np.unique(ids)) != len(ids) or (
            int(ids.min()) <= self._max_place_id
            and len(np.intersect1d(ids, self.places['place_id']))
        ):
            raise DatabaseError('place ids must be unique; use next_place_id()')

    def _note_traverses(self, rows: np.ndarray) -> None:
        """Record when new traverses joined the map, and where they came from."""
        now = time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())
        for traverse in np.unique(rows['traverse']):
            if int(traverse) not in self.traverses:
                first = rows[rows['traverse'] == traverse][0]
                self.traverses[int(traverse)] = {
                    'added': now,
                    'source': self.strings[int(first['source'])],
                }

    def next_place_id(self) -> int:
        return self._max_place_id + 1

    def next_traverse(self) -> int:
        return self._max_traverse + 1

    def extend(
        self,
        other: PlaceDatabase,
        *,
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        """Append another map's places (same model), renumbering ids and traverses.

        The other map's stored columns are shared, not copied (its segments are linked into
        this map's next save); its local features are re-encoded only when the two maps
        store them differently.

        Args:
            other: the map to append.
            transform: maps (K, 7) poses of the other map into this map's frame.
        """
        self.check_model(other.model, what='the appended map')
        if not len(other):
            return
        if other.enu_origin != self.enu_origin and transform is None:
            msg = (
                f"the appended map's poses are in the ENU frame at {other.enu_origin!r}, this "
                f"map's at {self.enu_origin!r}; build both from the same origin, or give a "
                'transform'
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
        if (self.local_codec is None) != (other.local_codec is None):
            raise DatabaseError('a map with local features cannot join one without them')
        if (
            self.local_grid
            and other.local_grid
            and len(self)
            and tuple(self.local_grid) != tuple(other.local_grid)
        ):
            msg = (
                f'local features on a {other.local_grid!r} grid cannot join a map with a '
                f'{self.local_grid!r} grid'
            )
            raise DatabaseError(msg)
        rows = other.places.copy()
        table = np.array([self._intern(s) for s in other.strings], np.int32)
        for name in STRING_FIELDS:
            rows[name] = table[rows[name]]
        rows['place_id'] = rows['place_id'] - rows['place_id'].min() + self.next_place_id()
        shift = self.next_traverse()
        rows['traverse'] += shift
        if transform is not None:
            poses = np.stack([rows[f] for f in POSE_FIELDS], axis=1)
            moved = transform(poses)
            for i, name in enumerate(POSE_FIELDS):
                rows[name] = moved[:, i]
        first_new = len(self)
        self._columns[PLACES].append(rows)
        self._columns[GLOBAL].extend(other._columns[GLOBAL])
        if self.local_codec is not None and other.local_codec is not None:
            self._join_vectors(LOCAL, self.local_codec, other, other.local_codec)
            self.local_grid = self.local_grid or other.local_grid
        if self.sequence_codec is not None and other.sequence_codec is not None:
            self._join_vectors(SEQUENCE, self.sequence_codec, other, other.sequence_codec)
        for name in self.feature_stores:
            self._columns[STORE_PREFIX + name].extend(other._columns[STORE_PREFIX + name])
        for traverse, info in other.traverses.items():
            self.traverses[traverse + shift] = dict(info)
        self._max_place_id = max(self._max_place_id, int(rows['place_id'].max()))
        self._max_traverse = max(self._max_traverse, int(rows['traverse'].max()))
        self._note_traverses(rows)
        self._tiles = None
        for start in range(first_new, len(self), 65_536):
            stop = min(start + 65_536, len(self))
            self.index.add(
                self._columns[GLOBAL].read_range(start, stop),
                rows[start - first_new : stop - first_new],
            )

    def _join_vectors(
        self, name: str, codec: VectorCodec, other: PlaceDatabase, other_codec: VectorCodec
    ) -> None:
        column, theirs = self._columns[name], other._columns[name]
        if codec == other_codec and (not len(column) or column.row_shape == theirs.row_shape):
            if not len(column):
                self._columns[name] = column = Column(theirs.dtype, theirs.row_shape)
            column.extend(theirs)
            return
        for start in range(0, len(theirs), 16_384):  # stored differently: re-encode
            column.append(
                codec.encode(other_codec.decode(theirs.read_range(start, start + 16_384)))
            )

    # -- retrieval ----------------------------------------------------------------------

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        prior: PositionPrior | None = None,
        traverses: Sequence[int] | None = None,
        since_ns: int | None = None,
        until_ns: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` places per query: (similarities (Q, k), place indices (Q, k)), best
        first, padded with -inf / -1.

        An approximate index's short list (``IndexConf.rescore_k``) is re-scored with the
        full-precision descriptors, so the similarities are exact. Places found unusable
        (a damaged file) are never returned.

        Args:
            queries: (Q, D) or (D,) unit descriptors.
            k: places per query.
            prior: only places within the prior's radius.
            traverses: only places of these traverses.
            since_ns: only places stamped at or after this time.
            until_ns: only places stamped at or before this time.
        """
        queries = np.ascontiguousarray(np.atleast_2d(queries), np.float32)
        k = max(1, min(int(k), max(len(self), 1)))
        where = self.place_filter(prior, traverses, since_ns, until_ns)
        bad = self.unusable_places()
        rescore = not self.index.exact and self.index_conf.rescore_k > 0
        wanted = max(k, self.index_conf.rescore_k) if rescore else k
        wanted = min(wanted + len(bad), max(len(self), 1))
        scores, ids = self.index.search(queries, wanted, where=where)
        drop = ids < 0
        if len(bad):
            drop |= np.isin(ids, bad)
        if prior is not None and self.index.filters_in_engine:  # tiles are coarser
            xy = np.stack([self.places['x'], self.places['y']], axis=1)
            drop |= ~within(xy[np.maximum(ids, 0)].reshape(-1, 2), prior).reshape(ids.shape)
        out_scores = np.full((len(queries), k), -np.inf, np.float32)
        out_ids = np.full((len(queries), k), -1, np.int64)
        for row in range(len(queries)):
            keep = ids[row][~drop[row]]
            if rescore and len(keep):
                found = np.asarray(self._columns[GLOBAL][keep], np.float32) @ queries[row]
            else:
                found = scores[row][~drop[row]]
            order = np.argsort(-found, kind='stable')[:k]
            out_scores[row, : len(order)] = found[order]
            out_ids[row, : len(order)] = keep[order]
        return out_scores, out_ids

    def place_filter(
        self,
        prior: PositionPrior | None = None,
        traverses: Sequence[int] | None = None,
        since_ns: int | None = None,
        until_ns: int | None = None,
    ) -> SearchRestriction | None:
        """The ``SearchRestriction`` of these restrictions for this map's index (None: none)."""
        if prior is None and traverses is None and since_ns is None and until_ns is None:
            return None
        tiles = None
        if prior is not None:
            near = tiles_near(prior, self.index_conf.tile_m)
            tiles = None if near is None else tuple(int(t) for t in near)
        if self.index.filters_in_engine:
            return SearchRestriction(
                tiles=tiles,
                traverses=None if traverses is None else tuple(int(t) for t in traverses),
                since_ns=since_ns,
                until_ns=until_ns,
            )
        places = self.places
        mask = np.ones(len(places), bool)
        if traverses is not None:
            mask &= np.isin(places['traverse'], np.asarray(list(traverses), np.int64))
        if since_ns is not None:
            mask &= places['stamp_ns'] >= since_ns
        if until_ns is not None:
            mask &= places['stamp_ns'] <= until_ns
        ids = np.flatnonzero(mask)
        if prior is not None:
            ids = np.intersect1d(self.tile_grid().places_within(prior), ids, assume_unique=True)
        return SearchRestriction(ids=ids.astype(np.int64))

    def tile_grid(self) -> TileGrid:
        """The map's places by tile (made on first use, again after places are added)."""
        if self._tiles is None or len(self._tiles) != len(self):
            places = self.places
            xy = np.stack([places['x'], places['y']], axis=1)
            self._tiles = TileGrid(xy, self.index_conf.tile_m)
        return self._tiles

    def check_model(self, model: ModelIdentity, *, what: str = 'the query model') -> None:
        """Raise DatabaseError unless ``model`` made this map's descriptors."""
        check_same_model(self.model, model, what=what)

    # -- integrity ----------------------------------------------------------------------

    def unusable_places(self) -> np.ndarray:
        """Sorted indices of the places whose stored data was found damaged (a file that
        changed size since it was opened is found here: one fstat a segment)."""
        for column in self._columns.values():
            for segment in column.segments:
                if segment.cached is None and not segment.bad:
                    segment.check_size()
        version = self.integrity.version
        if version != self._unusable_version:
            found = [column.bad_rows() for column in self._columns.values()]
            self._unusable = np.unique(np.concatenate(found)) if found else self._unusable
            self._unusable_version = version
        return self._unusable

    def verify(self, *, stop: threading.Event | None = None) -> Integrity:
        """Check every chunk of the files read from disk on demand against the manifest.

        A failed chunk marks the places it covers unusable and is reported (logged, and in
        ``integrity.failures``). Returns ``integrity`` (chunks checked, failed, failures).
        ``stop`` ends the check early.
        """
        for column in list(self._columns.values()):
            for segment in column.segments:
                if segment.cached is not None:
                    continue  # read into memory and checked at load
                for chunk in range(segment.chunks):
                    if stop is not None and stop.is_set():
                        return self.integrity
                    segment.verify_chunk(chunk)
        return self.integrity

    def verify_in_background(self) -> threading.Thread:
        """``verify`` in a daemon thread (at most one at a time); returns the thread."""
        if self._verifier is None or not self._verifier.is_alive():
            self._verifier = threading.Thread(
                target=self._verify_and_log, name='map-verify', daemon=True
            )
            self._verifier.start()
        return self._verifier

    def _verify_and_log(self) -> None:
        started = time.perf_counter()
        integrity = self.verify()
        logger.info(
            'map checked in %.1f s: %d chunks, %d failed (%d places unusable)',
            time.perf_counter() - started,
            integrity.chunks_checked,
            integrity.chunks_failed,
            len(self.unusable_places()),
        )

    # -- storage ------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, *, lock_timeout_s: float = 0.0) -> Path:
        """Write the map to directory ``path`` as a new generation and make it current.

        Holds the writer lock (see ``map_lock``) while it writes. The new generation is
        written and synced beside the current one, renamed into place, and then
        ``CURRENT`` is replaced atomically, so a crash at any point leaves either the old
        or the new map loadable; what it leaves behind is collected by the next save or
        open. A directory that is not empty and not a map is never written into. Stored
        columns are hard-linked from where they were read (copied across file systems);
        only the places added since are written.

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
                written = self._write(tmp)
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
            self._adopt(path / name, written)
            try:
                collect_leftovers(path)
            except OSError as err:  # the new map is in place; leftovers wait for next time
                logger.warning('map %r: could not remove leftovers: %s', str(path), err)
        return path

    def _write(self, directory: Path) -> dict[str, list[tuple[int, str, dict[str, Any]]]]:
        """Write the generation's files into ``directory`` (then the manifest, last).

        Returns, by column, the segments written from memory: (part index, file, entry).
        """
        files: dict[str, dict[str, Any]] = {}
        columns: dict[str, Any] = {}
        written: dict[str, list[tuple[int, str, dict[str, Any]]]] = {}
        taken: set[str] = set()
        for column_name, column in self._columns.items():
            column.consolidate()
            segments = []
            written[column_name] = []
            for part_index, part in enumerate(column.parts):
                if isinstance(part, Segment):
                    file = part.file.name
                    if file in taken or not SEGMENT_PATTERN.match(file):
                        file = self._segment_name(column_name)
                    _step(f'link {file}')
                    _link_or_copy(part, directory / file)
                    entry = dict(part.entry)
                else:
                    file = self._segment_name(column_name)
                    _step(f'write {file}')
                    entry = write_segment(directory / file, part)
                    written[column_name].append((part_index, file, entry))
                taken.add(file)
                files[file] = entry
                segments.append(
                    {
                        'file': file,
                        'rows': len(part) if not isinstance(part, Segment) else part.rows,
                    }
                )
            columns[column_name] = {
                'dtype': dtype_to_json(column.dtype),
                'shape': list(column.row_shape),
                'segments': segments,
            }
        strings = json.dumps(self.strings).encode('utf-8')
        _step('write strings')
        with (directory / STRINGS_FILE).open('wb') as stream:
            stream.write(strings)
            stream.flush()
            os.fsync(stream.fileno())
        files[STRINGS_FILE] = {
            'bytes': len(strings),
            'sha256': hashlib.sha256(strings).hexdigest(),
        }
        # An approximate index of a map grown place by place is trained now, or changes
        # kind when the map outgrew the last one (IndexConf.type 'auto').
        self.index.finalize(self.places)
        _step('write index')
        index_files = self.index.write(directory)
        for name in index_files:
            _fsync_path(directory / name)
            files[name] = {
                'bytes': (directory / name).stat().st_size,
                'sha256': _sha256(directory / name),
            }
        local = None
        if self.local_codec is not None:
            shape = self.local_features.shape if self.local_features is not None else (0, 0, 0)
            local = {
                'num_locations': int(shape[1]),
                'dim': int(self.model.local_dim),
                'dtype': self.local_codec.name,
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
            'sequence_dtype': None if self.sequence_codec is None else self.sequence_codec.name,
            'enu_origin': list(self.enu_origin) if self.enu_origin else None,
            'feature_stores': {
                store: store_entry(column, self.feature_store_settings[store])
                for store, column in self.feature_stores.items()
            },
            'index': self.index_conf.to_dict(),
            'index_state': self.index.state(),
            'index_files': index_files,
            'traverses': {str(k): v for k, v in sorted(self.traverses.items())},
            'next_segment': self._next_segment,
            'columns': columns,
            'files': files,
        }
        tmp_manifest = directory / (MANIFEST + '.tmp')
        _step('write manifest')
        tmp_manifest.write_text(json.dumps(manifest, separators=(',', ':')))
        _fsync_path(tmp_manifest)
        _step('rename manifest')
        os.replace(tmp_manifest, directory / MANIFEST)
        return written

    def _segment_name(self, column: str) -> str:
        name = f'{column}.s{self._next_segment:06d}.npy'
        self._next_segment += 1
        return name

    def _adopt(
        self, directory: Path, written: Mapping[str, Sequence[tuple[int, str, dict[str, Any]]]]
    ) -> None:
        """After a save: the rows written from memory are now segments of ``directory``;
        later saves link them. Place rows (and the descriptors of a map searched exactly)
        stay in memory; the rest is read from disk when needed."""
        for column_name, segments in written.items():
            column = self._columns[column_name]
            parts = list(column.parts)
            keep = column_name == PLACES or (column_name == GLOBAL and self.index.exact)
            for part_index, file, entry in segments:
                rows = parts[part_index]
                assert not isinstance(rows, Segment)
                segment = Segment(
                    directory / file, entry, len(rows), column.dtype, column.row_shape,
                    self.integrity,
                )  # fmt: skip
                if keep:
                    segment.cached = rows
                column.replace_part(part_index, segment)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        expected_model: ModelIdentity | None = None,
        mmap: bool = False,
        verify_checksums: bool = True,
        index_overrides: Mapping[str, Any] | None = None,
    ) -> PlaceDatabase:
        """Open a map, validating format, files, checksums, shapes and (optionally) model.

        What stays in memory (place rows, strings, the index; the global descriptors of a
        map searched exactly) is read once and checked there, so it cannot change when the
        files do. The larger columns are opened, checked for size and header, and read row
        by row when needed; their chunk checksums are verified now when
        ``verify_checksums``, else by ``verify`` or ``verify_in_background``. Leftovers of
        an interrupted save are collected first when no writer holds the map.

        Args:
            path: the map directory.
            expected_model: if given, the map must have been built by this model.
            mmap: maps of format version 1 only: memory-map the local features instead of
                reading them (saves memory for offline tools; only safe while nothing
                truncates the file in place).
            verify_checksums: check every chunk's SHA-256 now (sizes and headers are
                always checked).
            index_overrides: index settings to use instead of the map's (e.g. another
                ``milvus_uri``, a larger ``ivf_nprobe``).

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
                if manifest['format_version'] == 1:
                    return cls._load_v1(
                        directory, manifest, expected_model, mmap, verify_checksums
                    )
                return cls._load(
                    directory, manifest, expected_model, verify_checksums, index_overrides
                )
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
        manifest: dict[str, Any],
        expected_model: ModelIdentity | None,
        verify: bool,
        index_overrides: Mapping[str, Any] | None,
    ) -> PlaceDatabase:
        model = ModelIdentity.from_dict(manifest['model'])
        _check_identity(model, path)
        if expected_model is not None:
            check_same_model(model, expected_model, what='the query model')
        try:
            index_conf = IndexConf.from_dict({**manifest['index'], **(index_overrides or {})})
        except ConfigError as err:
            raise DatabaseError(f'map {str(path)!r} has bad index settings: {err}') from err
        count = manifest['place_count']
        local_info, sequence_conf = manifest['local'], manifest['sequence']
        store_entries: dict[str, Any] = manifest.get('feature_stores') or {}
        expected = {PLACES, GLOBAL}
        expected |= {LOCAL} if local_info else set()
        expected |= {SEQUENCE} if sequence_conf else set()
        expected |= {STORE_PREFIX + store for store in store_entries}
        columns_info: dict[str, Any] = manifest['columns']
        if set(columns_info) != expected:
            msg = (
                f'map {str(path)!r} lists columns {sorted(columns_info)!r}, expected '
                f'{sorted(expected)!r}; rebuild the map'
            )
            raise DatabaseError(msg)
        files_info: dict[str, Any] = manifest['files']
        listed = {STRINGS_FILE, *manifest['index_files']}
        listed |= {s['file'] for info in columns_info.values() for s in info['segments']}
        if set(files_info) != listed:
            msg = (
                f'map {str(path)!r} lists files {sorted(files_info)!r}, its columns and index '
                f'name {sorted(listed)!r}; rebuild the map'
            )
            raise DatabaseError(msg)
        integrity = Integrity()
        dtypes = cls._column_dtypes(model, manifest, path)
        columns: dict[str, Column] = {}
        for name, info in columns_info.items():
            dtype, shape = dtypes[name]
            if dtype_from_json(info['dtype']) != dtype or tuple(info['shape']) != shape:
                msg = (
                    f'map {str(path)!r}: column {name!r} is {info["dtype"]!r} {info["shape"]!r}, '
                    f'its settings say {dtype} {list(shape)!r}; rebuild the map'
                )
                raise DatabaseError(msg)
            segments = []
            for segment in info['segments']:
                file = segment['file']
                check_file_entry(files_info[file], file, path)
                segments.append(
                    Segment(
                        path / file, files_info[file], segment['rows'], dtype, shape, integrity
                    )
                )
            columns[name] = Column(dtype, shape, segments)
            if len(columns[name]) != count:
                msg = (
                    f'map {str(path)!r}: column {name!r} has {len(columns[name])} rows, the '
                    f'manifest says {count} places; rebuild the map'
                )
                raise DatabaseError(msg)
        strings_data = _read_checked(path / STRINGS_FILE, files_info[STRINGS_FILE], True)
        strings = json.loads(strings_data.decode('utf-8'))
        if not isinstance(strings, list) or not all(isinstance(s, str) for s in strings):
            raise DatabaseError(f'map {str(path)!r}: {STRINGS_FILE} is not a list of strings')
        index_data = {
            name: _read_checked(path / name, files_info[name], True)
            for name in manifest['index_files']
        }
        kind = str((manifest.get('index_state') or {}).get('type', 'flat'))
        in_memory = [PLACES] + (
            [GLOBAL] if index_conf.backend == 'faiss' and kind == 'flat' else []
        )
        for name in in_memory:  # read once, checked in memory
            for segment in columns[name].segments:
                data = segment.load()
                header = npy_header_bytes(segment.dtype, (segment.rows, *segment.row_shape))
                if not _digests_match(header + data.tobytes(), segment.entry):
                    raise DatabaseError(_checksum_message(segment.file))
        places = columns[PLACES].load()
        if len(places) and any(
            int(places[f].min()) < 0 or int(places[f].max()) >= len(strings) for f in STRING_FIELDS
        ):
            raise DatabaseError(f'map {str(path)!r}: place rows name strings it lacks; rebuild it')
        if verify:
            for column in columns.values():
                for segment in column.segments:
                    if segment.cached is None and not all(
                        segment.verify_chunk(i) for i in range(segment.chunks)
                    ):
                        raise DatabaseError(_checksum_message(segment.file))
        backend = index_backend(index_conf.backend)
        try:
            index = backend.read(
                index_conf, manifest.get('index_state') or {}, index_data, columns[GLOBAL], path
            )
        except (ValueError, OSError, RuntimeError) as err:
            raise DatabaseError(f'cannot read map {str(path)!r}: {err}') from err
        for store, entry in store_entries.items():
            column = columns[STORE_PREFIX + store]
            if (
                str(column.dtype) != entry['dtype']
                or [len(column), *column.row_shape] != entry['shape']
            ):
                msg = (
                    f'map {str(path)!r}: feature store {store!r} is {column.dtype} '
                    f'{column.shape!r}, the manifest says {entry["dtype"]} {entry["shape"]!r}; '
                    'rebuild the map'
                )
                raise DatabaseError(msg)
        database = cls(
            model,
            columns[GLOBAL],
            columns[PLACES],
            columns.get(LOCAL),
            index_conf=index_conf,
            index=index,
            sequence_descriptors=columns.get(SEQUENCE),
            sequence_conf=sequence_conf,
            enu_origin=manifest.get('enu_origin'),
            local_grid=(local_info or {}).get('grid'),
            feature_stores={s: columns[STORE_PREFIX + s] for s in store_entries},
            feature_store_settings={s: e['settings'] for s, e in store_entries.items()},
            strings=strings,
            local_dtype=(local_info or {}).get('dtype', DEFAULT_LOCAL_DTYPE),
            sequence_dtype=manifest.get('sequence_dtype') or DEFAULT_SEQUENCE_DTYPE,
            traverses={int(k): v for k, v in (manifest.get('traverses') or {}).items()},
        )
        database.integrity = integrity  # what the segments report to
        integrity.chunks_total = sum(  # what verify() checks: the files read lazily
            s.chunks for c in columns.values() for s in c.segments if s.cached is None
        )
        database._next_segment = int(manifest.get('next_segment', 1))
        return database

    @staticmethod
    def _column_dtypes(
        model: ModelIdentity, manifest: Mapping[str, Any], path: Path
    ) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """The row dtype and shape each column must have, from the code and the settings."""
        dtypes: dict[str, tuple[np.dtype, tuple[int, ...]]] = {
            PLACES: (PLACE_DTYPE, ()),
            GLOBAL: (np.dtype('<f4'), (int(model.global_dim),)),
        }
        local = manifest['local']
        try:
            if local:
                if int(local['dim']) != model.local_dim:
                    msg = f'map {str(path)!r}: local features do not match the manifest'
                    raise DatabaseError(msg)
                codec = VectorCodec(local.get('dtype', 'float16'), int(local['dim']))
                dtypes[LOCAL] = codec.row_dtype((int(local['num_locations']),))
            sequence = manifest['sequence']
            if sequence:
                width, height = (int(v) for v in sequence['image_size'])
                codec = VectorCodec(manifest.get('sequence_dtype') or 'float16', width * height)
                dtypes[SEQUENCE] = codec.row_dtype(())
        except ValueError as err:  # an unknown codec
            raise DatabaseError(f'map {str(path)!r}: {err}; rebuild the map') from err
        for store in manifest.get('feature_stores') or {}:
            info = manifest['columns'].get(STORE_PREFIX + store, {})
            dtypes[STORE_PREFIX + store] = (
                dtype_from_json(info.get('dtype')),
                tuple(int(v) for v in info.get('shape', ())),
            )
        return dtypes

    @classmethod
    def _load_v1(
        cls,
        path: Path,
        manifest: dict[str, Any],
        expected_model: ModelIdentity | None,
        mmap: bool,
        verify_checksums: bool,
    ) -> PlaceDatabase:
        """A map of format version 1: one file per array, all read into memory."""
        model = ModelIdentity.from_dict(manifest['model'])
        _check_identity(model, path)
        if expected_model is not None:
            check_same_model(model, expected_model, what='the query model')
        try:
            index_conf = IndexConf.from_dict(manifest['index'])
        except ConfigError as err:
            raise DatabaseError(f'map {str(path)!r} has bad index settings: {err}') from err
        index_files = {INDEX_FILE}
        expected_files = {PLACES_FILE, GLOBAL_FILE, *index_files}
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
        for name in sorted(expected_files - index_files):
            file, info = path / name, manifest['files'][name]
            if mmap and name == LOCAL_FILE:
                arrays[name] = _mmap_checked(file, info, verify_checksums)
            else:
                arrays[name] = _npy_from_bytes(_read_checked(file, info, verify_checksums), file)
        index_bytes = _read_checked(
            path / INDEX_FILE, manifest['files'][INDEX_FILE], verify_checksums
        )
        stores = {store: arrays[STORE_FILE.format(store)] for store in store_entries}
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
        if places.dtype != PLACE_RECORD_DTYPE or len(places) != count:
            raise DatabaseError(f'map {str(path)!r}: places.npy does not match the manifest')
        if global_descriptors.shape != (count, model.global_dim):
            msg = (
                f'map {str(path)!r}: global descriptors {global_descriptors.shape!r}, '
                f'manifest says ({count}, {model.global_dim})'
            )
            raise DatabaseError(msg)
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
        global_column = Column.from_array(np.ascontiguousarray(global_descriptors, np.float32))
        index = _read_v1_index(path, index_bytes, index_conf, global_column)
        return cls(
            model,
            global_column,
            places,
            None if local is None else Column.from_array(local.astype(np.float16, copy=False)),
            index_conf=index_conf,
            index=index,
            sequence_descriptors=(
                None if sequence is None else Column.from_array(sequence.astype(np.float16))
            ),
            sequence_conf=manifest.get('sequence'),
            enu_origin=manifest.get('enu_origin'),
            local_grid=(manifest['local'] or {}).get('grid'),
            feature_stores=stores,
            feature_store_settings={s: e['settings'] for s, e in store_entries.items()},
            local_dtype='float16',
            sequence_dtype='float16',
        )

    @staticmethod
    def is_map(path: str | os.PathLike) -> bool:
        """Whether ``path`` holds a map (of either layout), sound or not."""
        path = Path(path)
        return (path / CURRENT).is_file() or (path / MANIFEST).is_file()

    @staticmethod
    def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
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
        if version not in READABLE_VERSIONS:
            msg = (
                f'map {str(path)!r} has format version {version!r}; this vpr_ros reads versions '
                f'{list(READABLE_VERSIONS)}; rebuild the map with this version'
            )
            raise DatabaseError(msg)
        return manifest


def _read_v1_index(path: Path, data: bytearray, conf: IndexConf, column: Column) -> Index:
    """The faiss index of a map of format version 1 (a flat index is searched exactly)."""
    from vpr_ros.retrieval import FaissIndex

    kind = conf.type if conf.type in ('hnsw', 'ivfpq') else 'flat'
    state = {'type': kind, 'trained_on': len(column)}
    return FaissIndex.read(conf, state, {INDEX_FILE: data}, column, path)


def _link_or_copy(segment: Segment, target: Path) -> None:
    """Put an immutable segment file into a new generation: a hard link, or a copy of what
    the segment's open file holds (across file systems, or when its old name is gone)."""
    if segment.bad or not segment.check_size():
        msg = (
            f'map file {str(segment.file)!r} changed or was damaged after it was read; '
            'this map cannot be saved from it: rebuild the map'
        )
        raise DatabaseError(msg)
    try:
        os.link(segment.file, target)
        if os.stat(target).st_size == segment.entry['bytes']:
            return
        target.unlink()  # the name now holds another file
    except OSError as err:
        logger.debug('cannot link %r (%s): copying it', str(segment.file), err)
    with target.open('wb') as stream:
        position, size = 0, int(segment.entry['bytes'])
        while position < size:
            data = os.pread(segment._fd, min(64 << 20, size - position), position)
            if not data:
                msg = f'map file {str(segment.file)!r} shrank while it was copied; rebuild the map'
                raise DatabaseError(msg)
            stream.write(data)
            position += len(data)
        stream.flush()
        os.fsync(stream.fileno())


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
