"""What a map records of the model that built it, and checks against the model that queries it.

Kept apart from the model code (no torch), so that maps open and check without it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ModelIdentity:
    """What a map must agree on with the model that queries it."""

    name: str
    config_hash: str
    weights_hash: str
    global_dim: int
    local_dim: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelIdentity:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})

    def describe(self) -> str:
        return (
            f'{self.name!r} (D={self.global_dim}, local C={self.local_dim}, '
            f'config {self.config_hash[:8]}, weights {self.weights_hash[:8]})'
        )
