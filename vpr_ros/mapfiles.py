"""Per-place columns of a map on disk: immutable segment files, positional reads, chunk checks.

A map keeps each per-place array (place rows, global descriptors, local features, sequence
descriptors, feature stores) as a *column*: one or more ``.npy`` *segments*, each holding
consecutive places. A segment is never changed once written. A save that adds places writes
one new segment per column and hard-links the others from the generation before (see
``vpr_ros.database``), so growing a map costs the new places, not the map.

Reading: a segment file is opened once, its size and npy header are checked against the
manifest, and rows are read with ``pread`` on that descriptor when they are asked for. Nothing
is memory-mapped: a file truncated under a mapping kills the reader with SIGBUS, while a
``pread`` of a truncated file is only short. A segment whose file changed size, or one of whose
chunks fails its checksum, marks its places unusable (``Integrity``) and is reported, instead
of serving wrong rows; its rows read as zeros.

Integrity: the manifest holds the SHA-256 of every ``chunk_bytes`` of each segment file, so a
check reads each file once and can run later: in the background, or on demand (the
``verify_map`` command). A failed chunk marks only the places whose bytes it covers.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vpr_ros import logger
from vpr_ros.errors import DatabaseError

CHUNK_BYTES = 8 << 20
"""Bytes covered by one checksum of a segment file (the last chunk may be shorter)."""
_READ_BLOCK_BYTES = 64 << 20  # bulk reads go in blocks of this size


def parse_npy_header(
    data: bytes | bytearray, file: Path
) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, data offset) of the npy bytes that ``data`` starts with.

    Raises:
        DatabaseError: not an npy header, or one holding Python objects.
    """
    stream = io.BytesIO(bytes(data[: min(len(data), 1 << 16)]))
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f'npy format version {version!r}')
    except (ValueError, SyntaxError, TypeError, EOFError) as err:
        raise DatabaseError(f'map file {str(file)!r} has a bad npy header: {err}') from err
    if dtype.hasobject:
        raise DatabaseError(f'map file {str(file)!r} holds Python objects; rebuild the map')
    return tuple(int(side) for side in shape), bool(fortran), dtype, stream.tell()


def npy_header_bytes(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The npy header numpy writes for a C-ordered array of ``dtype`` and ``shape``."""
    stream = io.BytesIO()
    header: dict[str, Any] = {
        'descr': np.lib.format.dtype_to_descr(dtype),
        'fortran_order': False,
        'shape': shape,
    }
    np.lib.format.write_array_header_1_0(stream, header)
    return stream.getvalue()


def dtype_to_json(dtype: np.dtype) -> Any:
    """A JSON value naming ``dtype`` (``np.lib.format`` descr, tuples as lists)."""

    def as_lists(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return [as_lists(v) for v in value]
        return value

    return as_lists(np.lib.format.dtype_to_descr(dtype))


def dtype_from_json(value: Any) -> np.dtype:
    """The dtype ``dtype_to_json`` named.

    Raises:
        ValueError: not a dtype description.
    """

    def as_tuples(item: Any) -> Any:
        if isinstance(item, list):
            return tuple(as_tuples(v) for v in item)
        return item

    if isinstance(value, list):
        value = [as_tuples(field) for field in value]
    try:
        return np.lib.format.descr_to_dtype(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f'not a dtype description: {value!r}') from err


def write_segment(
    file: Path, array: np.ndarray, *, chunk_bytes: int = CHUNK_BYTES
) -> dict[str, Any]:
    """Write ``array`` as an npy file, synced, hashing it chunk by chunk as it goes.

    Returns:
        The file's manifest entry: ``bytes``, ``chunk_bytes`` and ``sha256`` (one hex digest
        per chunk of the file, header included).
    """
    array = np.ascontiguousarray(array)
    hasher = _ChunkHasher(chunk_bytes)
    with file.open('wb') as stream:
        header = npy_header_bytes(array.dtype, array.shape)
        stream.write(header)
        hasher.update(header)
        data = array.reshape(-1).view(np.uint8).data if array.size else memoryview(b'')
        for start in range(0, len(data), _READ_BLOCK_BYTES):
            block = data[start : start + _READ_BLOCK_BYTES]
            stream.write(block)
            hasher.update(block)
        stream.flush()
        os.fsync(stream.fileno())
    return {'bytes': hasher.total, 'chunk_bytes': chunk_bytes, 'sha256': hasher.digests()}


class _ChunkHasher:
    """SHA-256 of every ``chunk_bytes`` of a byte stream."""

    def __init__(self, chunk_bytes: int) -> None:
        self.chunk_bytes = chunk_bytes
        self.total = 0
        self._done: list[str] = []
        self._current = hashlib.sha256()
        self._in_current = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast('B')
        while len(view):
            take = min(len(view), self.chunk_bytes - self._in_current)
            self._current.update(view[:take])
            self._in_current += take
            self.total += take
            view = view[take:]
            if self._in_current == self.chunk_bytes:
                self._done.append(self._current.hexdigest())
                self._current, self._in_current = hashlib.sha256(), 0

    def digests(self) -> list[str]:
        return [*self._done, self._current.hexdigest()] if self._in_current else list(self._done)


def chunk_digests(data: bytes | bytearray | memoryview, chunk_bytes: int) -> list[str]:
    """SHA-256 of every ``chunk_bytes`` of ``data``."""
    hasher = _ChunkHasher(chunk_bytes)
    hasher.update(data)
    return hasher.digests()


def check_file_entry(entry: Any, name: str, directory: Path) -> None:
    """A manifest ``files`` entry of a segment has its fields, of the right types.

    Raises:
        DatabaseError: it does not.
    """
    ok = (
        isinstance(entry, dict)
        and isinstance(entry.get('bytes'), int)
        and isinstance(entry.get('chunk_bytes'), int)
        and entry['chunk_bytes'] > 0
        and isinstance(entry.get('sha256'), list)
        and all(isinstance(h, str) for h in entry['sha256'])
        and len(entry['sha256']) == -(-entry['bytes'] // entry['chunk_bytes'])
    )
    if not ok:
        raise DatabaseError(f'map {str(directory)!r}: bad manifest entry for {name!r}; rebuild it')


# -- integrity ------------------------------------------------------------------------------


@dataclass
class Integrity:
    """What is known about the soundness of a map's files, shared by its segments.

    ``version`` counts the damage found so far, so a reader can tell cheaply whether its
    set of unusable places is out of date.
    """

    chunks_total: int = 0
    chunks_checked: int = 0
    chunks_failed: int = 0
    failures: list[str] = field(default_factory=list)
    version: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def checked(self, ok: bool) -> None:
        with self.lock:
            self.chunks_checked += 1
            self.chunks_failed += not ok

    def report(self, message: str) -> None:
        with self.lock:
            self.failures.append(message)
            self.version += 1
        logger.warning('%s', message)


class Segment:
    """One immutable ``.npy`` file of a column: opened once, read with ``pread``.

    Args:
        file: the file.
        entry: its manifest entry (``bytes``, ``chunk_bytes``, ``sha256``).
        rows: the places it holds (manifest).
        dtype: the row dtype it must hold.
        row_shape: the shape of one row.
        integrity: where damage is reported.

    Raises:
        FileNotFoundError: the file is missing.
        DatabaseError: its size or header does not match the manifest.
    """

    def __init__(
        self,
        file: Path,
        entry: Mapping[str, Any],
        rows: int,
        dtype: np.dtype,
        row_shape: tuple[int, ...],
        integrity: Integrity,
    ) -> None:
        self.file = file
        self.entry = dict(entry)
        self.rows = int(rows)
        self.dtype = np.dtype(dtype)
        self.row_shape = tuple(row_shape)
        self.integrity = integrity
        self.row_bytes = int(self.dtype.itemsize * int(np.prod(self.row_shape, dtype=np.int64)))
        self.bad: list[tuple[int, int]] = []  # row ranges [start, stop) found damaged
        self.cached: np.ndarray | None = None  # every row, when a reader keeps them in memory
        fd = os.open(file, os.O_RDONLY)
        self._fd = fd
        weakref.finalize(self, os.close, fd)
        size = os.fstat(fd).st_size
        if size != self.entry['bytes']:
            msg = (
                f'map file {str(file)!r} is {size} bytes, the manifest says '
                f'{self.entry["bytes"]}: truncated or overwritten; rebuild the map'
            )
            raise DatabaseError(msg)
        shape, fortran, found, offset = parse_npy_header(os.pread(fd, 1 << 16, 0), file)
        if found != self.dtype or shape != (self.rows, *self.row_shape) or fortran:
            msg = (
                f'map file {str(file)!r} holds {found} {shape!r}, the manifest says '
                f'{self.dtype} {(self.rows, *self.row_shape)!r}; rebuild the map'
            )
            raise DatabaseError(msg)
        if offset + self.rows * self.row_bytes != size:
            msg = (
                f'map file {str(file)!r}: its npy header claims {self.rows * self.row_bytes} '
                f'bytes of data but it holds {size - offset}; rebuild the map'
            )
            raise DatabaseError(msg)
        self.offset = offset

    @property
    def chunks(self) -> int:
        return len(self.entry['sha256'])

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (sorted or not, int64 local indices); damaged rows read as zeros."""
        out = np.zeros((len(rows), *self.row_shape), self.dtype)
        if self.cached is not None:
            out[:] = self.cached[rows]
        elif len(rows):
            if not self.check_size():
                return self._zeros_for_damage(out)
            order = np.argsort(rows, kind='stable')
            ordered = rows[order]
            # Consecutive rows are read with one call.
            breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
            flat = out.reshape(len(rows), -1).view(np.uint8)
            for run in np.split(np.arange(len(ordered)), breaks):
                first = int(ordered[run[0]])
                data = self._pread(first, len(run))
                if data is None:
                    return self._zeros_for_damage(out)
                flat[order[run]] = np.frombuffer(data, np.uint8).reshape(len(run), -1)
        return self._blank_bad(out, rows)

    def read_range(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop``."""
        if self.cached is not None:
            return np.array(self.cached[start:stop])
        out = np.zeros((stop - start, *self.row_shape), self.dtype)
        if stop > start and not self.check_size():
            return self._zeros_for_damage(out)
        buffer = out.reshape(-1).view(np.uint8)
        step = max(1, _READ_BLOCK_BYTES // max(1, self.row_bytes))
        for first in range(start, stop, step):
            count = min(step, stop - first)
            done = (first - start) * self.row_bytes
            view = buffer[done : done + count * self.row_bytes].data
            try:
                read = os.preadv(self._fd, [view], self.offset + first * self.row_bytes)
            except OSError as err:
                self._damaged(f'cannot be read ({err})')
                return self._zeros_for_damage(out)
            if read != len(view):
                self._damaged('shrank after it was opened (overwritten?)')
                return self._zeros_for_damage(out)
        return self._blank_bad(out, np.arange(start, stop))

    def load(self) -> np.ndarray:
        """Every row, kept in memory from now on (reads then come from memory)."""
        if self.cached is None:
            self.cached = self.read_range(0, self.rows)
        return self.cached

    def verify_chunk(self, index: int) -> bool:
        """Check chunk ``index`` against the manifest; a failure marks its places."""
        size = self.entry['chunk_bytes']
        start = index * size
        try:
            data = os.pread(self._fd, size, start)
        except OSError as err:
            data = b''
            logger.debug('reading %r failed: %s', str(self.file), err)
        expected = self.entry['sha256'][index]
        wanted = min(size, self.entry['bytes'] - start)
        ok = len(data) == wanted and hashlib.sha256(data).hexdigest() == str(expected)
        self.integrity.checked(ok)
        if not ok:
            first = max(0, (start - self.offset) // self.row_bytes) if self.row_bytes else 0
            stop = -(-(start + size - self.offset) // self.row_bytes) if self.row_bytes else 0
            first, stop = min(first, self.rows), min(max(stop, 0), self.rows)
            if start < self.offset:  # the header: nothing in the file can be trusted
                first, stop = 0, self.rows
            self._mark(first, stop, f'chunk {index} fails its checksum (corrupt)')
        return ok

    def _pread(self, first: int, count: int) -> bytes | None:
        try:
            data = os.pread(self._fd, count * self.row_bytes, self.offset + first * self.row_bytes)
        except OSError as err:
            self._damaged(f'cannot be read ({err})')
            return None
        if len(data) != count * self.row_bytes:
            self._damaged('shrank after it was opened (overwritten?)')
            return None
        return data

    def check_size(self) -> bool:
        """Whether the file still has its manifest size (one fstat: a file rewritten in
        place, e.g. by ``cp`` over a served map, usually changes size); else its rows are
        marked unusable."""
        try:
            size = os.fstat(self._fd).st_size
        except OSError as err:
            self._damaged(f'cannot be read ({err})')
            return False
        if size != self.entry['bytes']:
            self._damaged(f'changed size after it was opened ({size} bytes; overwritten?)')
            return False
        return True

    def _damaged(self, why: str) -> None:
        self._mark(0, self.rows, why)

    def _mark(self, first: int, stop: int, why: str) -> None:
        if stop <= first or any(a <= first and stop <= b for a, b in self.bad):
            return
        self.bad.append((first, stop))
        self.integrity.report(
            f'map file {str(self.file)!r} {why}: its rows {first}..{stop - 1} are unusable; '
            'rebuild or restore the map'
        )

    def _zeros_for_damage(self, out: np.ndarray) -> np.ndarray:
        out[...] = 0
        return out

    def _blank_bad(self, out: np.ndarray, rows: np.ndarray) -> np.ndarray:
        for first, stop in self.bad:
            out[(rows >= first) & (rows < stop)] = 0
        return out

    def bad_rows(self) -> np.ndarray:
        """Local indices of the rows found damaged."""
        if not self.bad:
            return np.zeros(0, np.int64)
        return np.unique(np.concatenate([np.arange(a, b) for a, b in self.bad]))


class Column:
    """The rows of one per-place array: segments on disk, then rows added in memory.

    Reading by index (``column[indices]``) returns a numpy array and touches only those rows.
    Rows appended are kept as a list of arrays and concatenated once, when they are read or
    saved (appending costs the new rows only).

    Args:
        dtype: the row dtype.
        row_shape: the shape of one row.
        parts: segments and arrays, in row order.
    """

    def __init__(
        self,
        dtype: np.dtype | type,
        row_shape: Sequence[int] = (),
        parts: Sequence[Segment | np.ndarray] = (),
    ) -> None:
        self.dtype = np.dtype(dtype)
        self.row_shape = tuple(int(v) for v in row_shape)
        self.parts: list[Segment | np.ndarray] = []
        self._offsets = np.zeros(1, np.int64)
        for part in parts:
            self._add_part(part)

    @classmethod
    def from_array(cls, array: np.ndarray) -> Column:
        """A column of an in-memory array (N, *row_shape)."""
        return cls(array.dtype, array.shape[1:], [np.asarray(array)])

    # -- shape -------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.row_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.row_shape)

    @property
    def nbytes(self) -> int:
        return len(self) * self.dtype.itemsize * int(np.prod(self.row_shape, dtype=np.int64))

    @property
    def segments(self) -> list[Segment]:
        return [part for part in self.parts if isinstance(part, Segment)]

    @property
    def in_memory(self) -> bool:
        """Whether every row is held in memory (no read touches the disk)."""
        return all(not isinstance(p, Segment) or p.cached is not None for p in self.parts)

    def __repr__(self) -> str:
        return f'<Column {self.dtype} {self.shape!r}, {len(self.segments)} segments>'

    # -- growing -----------------------------------------------------------------------

    def append(self, rows: np.ndarray) -> None:
        """Add rows (N, *row_shape) of this column's dtype at the end."""
        rows = np.asarray(rows)
        if rows.shape[1:] != self.row_shape:
            msg = f'rows of shape {rows.shape[1:]!r} cannot join a column of {self.row_shape!r}'
            raise DatabaseError(msg)
        if len(rows):
            self._add_part(rows.astype(self.dtype, copy=False))

    def extend(self, other: Column) -> None:
        """Add another column's rows at the end (its segments are shared, not copied)."""
        if other.row_shape != self.row_shape or other.dtype != self.dtype:
            msg = (
                f'a column of {other.dtype} {other.row_shape!r} cannot join one of '
                f'{self.dtype} {self.row_shape!r}'
            )
            raise DatabaseError(msg)
        for part in other.parts:
            self._add_part(part)

    def _add_part(self, part: Segment | np.ndarray) -> None:
        count = part.rows if isinstance(part, Segment) else len(part)
        if isinstance(part, Segment) and (
            part.dtype != self.dtype or part.row_shape != self.row_shape
        ):
            raise DatabaseError(f'segment {str(part.file)!r} does not match its column')
        self.parts.append(part)
        self._offsets = np.append(self._offsets, self._offsets[-1] + count)

    def replace_part(self, index: int, segment: Segment) -> None:
        """Put ``segment`` in place of part ``index`` (the same rows, now on disk)."""
        old = self.parts[index]
        if (old.rows if isinstance(old, Segment) else len(old)) != segment.rows:
            raise ValueError('a part can only be replaced by one of as many rows')
        self.parts[index] = segment

    def consolidate(self) -> None:
        """Join consecutive in-memory parts into one array (what a save writes at once)."""
        parts: list[Segment | np.ndarray] = []
        pending: list[np.ndarray] = []
        for part in self.parts:
            if isinstance(part, Segment):
                if pending:
                    parts.append(np.concatenate(pending) if len(pending) > 1 else pending[0])
                    pending = []
                parts.append(part)
            else:
                pending.append(part)
        if pending:
            parts.append(np.concatenate(pending) if len(pending) > 1 else pending[0])
        if len(parts) != len(self.parts):
            self.parts = []
            self._offsets = np.zeros(1, np.int64)
            for part in parts:
                self._add_part(part)

    # -- reading -----------------------------------------------------------------------

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, str):  # a field of structured rows, for every row
            field_values: np.ndarray = self.read_range(0, len(self))[key]
            return field_values
        if isinstance(key, tuple):
            return self[key[0]][(slice(None), *key[1:])]
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1:
                return self.read_range(start, max(start, stop))
            return self.take(np.arange(start, stop, step))
        if isinstance(key, int | np.integer):
            index = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= index < len(self):
                raise IndexError(f'row {int(key)} of a column of {len(self)} rows')
            row: np.ndarray = self.take(np.array([index]))[0]
            return row
        indices = np.asarray(key)
        if indices.dtype == bool:
            indices = np.flatnonzero(indices)
        return self.take(indices.astype(np.int64, copy=False))

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Rows ``indices`` (any shape of int64 indices; negative count from the end)."""
        shape = indices.shape
        flat = indices.reshape(-1)
        flat = np.where(flat < 0, flat + len(self), flat)
        if len(flat) and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f'rows out of range for a column of {len(self)} rows')
        out = np.zeros((len(flat), *self.row_shape), self.dtype)
        which = np.searchsorted(self._offsets, flat, side='right') - 1
        for part_index in np.unique(which):
            mask = which == part_index
            local = flat[mask] - self._offsets[part_index]
            part = self.parts[int(part_index)]
            out[mask] = part.read(local) if isinstance(part, Segment) else part[local]
        return out.reshape(*shape, *self.row_shape)

    def read_range(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as one array."""
        stop = min(stop, len(self))
        if stop <= start:
            return np.zeros((0, *self.row_shape), self.dtype)
        pieces = []
        for part_index, part in enumerate(self.parts):
            first, end = int(self._offsets[part_index]), int(self._offsets[part_index + 1])
            lo, hi = max(start, first) - first, min(stop, end) - first
            if lo >= hi:
                continue
            pieces.append(part.read_range(lo, hi) if isinstance(part, Segment) else part[lo:hi])
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def iter_blocks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, rows) blocks of at most ``rows`` rows, in order."""
        for start in range(0, len(self), max(1, rows)):
            yield start, self.read_range(start, start + rows)

    def load(self) -> np.ndarray:
        """Every row as one array, kept in memory for later reads."""
        for part in self.parts:
            if isinstance(part, Segment):
                part.load()
        self.consolidate()
        if len(self.parts) == 1:
            only = self.parts[0]
            return only.load() if isinstance(only, Segment) else only
        return self.read_range(0, len(self))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = self.read_range(0, len(self))
        out: np.ndarray = array if dtype is None else array.astype(dtype, copy=False)
        return out

    # -- integrity ---------------------------------------------------------------------

    def bad_rows(self) -> np.ndarray:
        """Indices of the rows whose segment was found damaged."""
        found = [
            segment.bad_rows() + self._offsets[i]
            for i, segment in enumerate(self.parts)
            if isinstance(segment, Segment) and segment.bad
        ]
        return np.concatenate(found) if found else np.zeros(0, np.int64)
