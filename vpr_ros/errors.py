"""The package's error classes: one base class and one subclass per area.

Messages say what failed, quote the offending value with ``!r`` and say how to fix it.
"""

from __future__ import annotations


class VprError(Exception):
    """Base class of every error vpr_ros raises on purpose."""


class ConfigError(VprError):
    """A configuration, parameter or command-line value is invalid."""


class ModelError(VprError):
    """A model cannot be built, or its weights cannot be loaded."""


class DatabaseError(VprError):
    """A place database (map) is missing, corrupt, truncated or incompatible."""


class BagReadError(VprError):
    """A bag cannot be read: missing, corrupt, truncated, or without the asked topic."""


class ImageDecodeError(VprError):
    """An image message cannot be turned into pixels (encoding, size, corrupt bytes)."""
