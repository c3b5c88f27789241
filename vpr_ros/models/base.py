"""The model interface every place-recognition model implements.

A model takes a normalised image batch (B, 3, H, W) and returns
``global_descriptor`` (B, D), L2-normalised, for retrieval and ``local_features``
(B, C, h, w), L2-normalised per location, for re-ranking. Subclasses implement
``_init(conf)`` and ``_forward(images)``; the base class merges configuration defaults,
normalises the outputs and computes the model's identity, which every map records.
"""

from __future__ import annotations

import copy
import hashlib
import json
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from vpr_ros.models.identity import ModelIdentity
from vpr_ros.models.preprocessing import Preprocessing


def merge_conf(default: dict, conf: dict | None) -> dict:
    """Recursively merge ``conf`` over ``default`` (neither is modified)."""
    merged = copy.deepcopy(default)
    for key, value in (conf or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_conf(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def conf_hash(conf: dict) -> str:
    """A stable hash of a JSON-serialisable configuration."""
    text = json.dumps(conf, sort_keys=True, separators=(',', ':'))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def state_dict_hash(module: nn.Module) -> str:
    """A hash of every parameter and buffer (names, shapes and values)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class VprModel(nn.Module, ABC):
    """Base class of place-recognition models (global descriptor + dense local features)."""

    default_conf: dict = {}

    def __init__(self, conf: dict | None = None, *, name: str | None = None) -> None:
        super().__init__()
        self.conf = merge_conf(self.default_conf, conf)
        self.name = name or self.conf.get('name', type(self).__name__)
        self.preprocessing = Preprocessing.from_conf(self.conf.get('preprocessing', {}))
        self._identity: ModelIdentity | None = None
        self._init(self.conf)

    @abstractmethod
    def _init(self, conf: dict) -> None:
        """Build the layers."""

    @abstractmethod
    def _forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return un-normalised ``global_descriptor`` (B, D) and ``local_features``."""

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self._forward(images)
        return {
            'global_descriptor': F.normalize(out['global_descriptor'], dim=-1),
            'local_features': F.normalize(out['local_features'], dim=1),
        }

    @property
    @abstractmethod
    def global_dim(self) -> int:
        """Dimension D of the global descriptor."""

    @property
    @abstractmethod
    def local_dim(self) -> int:
        """Channels C of the local features."""

    # Configuration keys that say where weights come from, not what the model is: left
    # out of the identity's config hash (the weights hash covers the weights themselves).
    weight_source_keys: tuple[str, ...] = ('weights',)

    def export_conf(self) -> dict:
        """The configuration that rebuilds this exact architecture (see models.load_model)."""
        return copy.deepcopy(self.conf)

    def architecture_conf(self) -> dict:
        """The export configuration without the name and the weight sources: what the
        identity's config hash covers."""
        skip = {'name', *self.weight_source_keys}
        return {k: v for k, v in self.export_conf().items() if k not in skip}

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors ``models.save_model`` writes and ``from_export`` gets back; models
        with a frozen part loaded from elsewhere (SelaVPR) return only the trained ones."""
        return self.state_dict()

    @classmethod
    def from_export(cls, conf: dict, state_dict: dict[str, torch.Tensor]) -> VprModel:
        """Rebuild a model saved by ``models.save_model``; subclasses whose architecture is
        not fully given by ``conf`` (pruned models) override this."""
        conf = {**conf, **{key: None for key in cls.weight_source_keys}}
        model = cls(conf)
        model.load_state_dict(state_dict)
        model.conf = {k: v for k, v in conf.items()}
        return model

    def identity(self) -> ModelIdentity:
        """Name, configuration hash and weights hash; cached (call ``invalidate_identity``
        after changing weights)."""
        if self._identity is None:
            self._identity = ModelIdentity(
                name=self.name,
                config_hash=conf_hash(self.architecture_conf()),
                weights_hash=state_dict_hash(self),
                global_dim=self.global_dim,
                local_dim=self.local_dim,
            )
        return self._identity

    def invalidate_identity(self) -> None:
        self._identity = None
