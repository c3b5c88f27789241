"""How per-place feature vectors are stored: float16, or a few bits a value.

Local features and sequence descriptors are most of a map's bytes. Both are compared by
cosine similarity only, so each vector (the last axis) is stored as signed integers of
``bits`` bits relative to its own largest absolute value, and decoded back to a unit vector:
the scale itself is not needed, as it cancels when the vector is normalised. ``int8`` halves
float16; ``int6`` and ``int4`` pack 6 or 4 bits a value. The README gives the recall each
choice keeps on the shared datasets.

A codec is named in the map's manifest (``local.dtype``, ``sequence.dtype``), so a map reads
back with the codec it was written with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CODECS = ('float16', 'int8', 'int6', 'int4')
"""Codec names; ``intB`` stores B bits a value."""


@dataclass(frozen=True)
class VectorCodec:
    """Stores vectors (..., C) as float16 or as ``bits``-bit integers (their direction).

    Args:
        name: one of ``CODECS``.
        dim: C, the length of each vector.
    """

    name: str
    dim: int

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise ValueError(f'unknown codec {self.name!r}; known: {list(CODECS)}')

    @property
    def bits(self) -> int:
        return 16 if self.name == 'float16' else int(self.name[3:])

    @property
    def _levels(self) -> int:
        """Largest code magnitude M: codes are integers in [-M, M]."""
        return (1 << (self.bits - 1)) - 1

    @property
    def code_bytes(self) -> int:
        """Bytes of one vector's codes."""
        return -(-self.dim * self.bits // 8)

    def row_dtype(self, lead: tuple[int, ...]) -> tuple[np.dtype, tuple[int, ...]]:
        """(dtype, row shape) of one stored row of vectors (``*lead``, C)."""
        if self.name == 'float16':
            return np.dtype(np.float16), (*lead, self.dim)
        if self.bits == 8:
            return np.dtype(np.int8), (*lead, self.dim)
        return np.dtype(np.uint8), (*lead, self.code_bytes)

    def bytes_per_row(self, lead: tuple[int, ...]) -> int:
        dtype, shape = self.row_dtype(lead)
        return int(dtype.itemsize * int(np.prod(shape, dtype=np.int64)))

    def encode(self, vectors: np.ndarray) -> np.ndarray:
        """Rows (N, *lead, C) float -> stored rows (see ``row_dtype``)."""
        vectors = np.asarray(vectors, np.float32)
        if vectors.shape[-1] != self.dim:
            raise ValueError(f'vectors of length {vectors.shape[-1]}, codec for {self.dim}')
        if self.name == 'float16':
            return vectors.astype(np.float16)
        scale = np.abs(vectors).max(axis=-1, keepdims=True)
        levels = self._levels
        scaled = vectors / np.where(scale > 0, scale, 1.0) * levels
        codes = np.clip(np.rint(scaled), -levels, levels).astype(np.int16)
        if self.bits == 8:
            return codes.astype(np.int8)
        unsigned = (codes + levels).astype(np.uint8)  # 0 .. 2M fits in ``bits`` bits
        bits = np.unpackbits(unsigned[..., None], axis=-1)[..., 8 - self.bits :]
        packed: np.ndarray = np.packbits(bits.reshape(*bits.shape[:-2], -1), axis=-1)
        return packed

    def decode(self, rows: np.ndarray) -> np.ndarray:
        """Stored rows -> unit vectors (N, *lead, C) float32 (zero vectors stay zero)."""
        if self.name == 'float16':
            return np.asarray(rows, np.float32)
        if self.bits == 8:
            values = np.asarray(rows, np.float32)
        else:
            bits = np.unpackbits(rows, axis=-1, count=self.dim * self.bits)
            bits = bits.reshape(*rows.shape[:-1], self.dim, self.bits)
            weights = (1 << np.arange(self.bits - 1, -1, -1)).astype(np.float32)
            values = bits.astype(np.float32) @ weights - self._levels
        norms = np.linalg.norm(values, axis=-1, keepdims=True)
        out: np.ndarray = values / np.where(norms > 0, norms, 1.0)
        return out
