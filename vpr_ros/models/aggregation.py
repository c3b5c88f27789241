"""Aggregation layers: a feature map (B, C, H, W) in, a global descriptor (B, D) out."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vpr_ros.errors import ConfigError


class GeM(nn.Module):
    """Generalised-mean pooling (Radenovic et al.); ``p`` is learnable, D = C."""

    def __init__(self, channels: int, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor([float(p)]))
        self.eps = eps
        self.out_dim = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(x.clamp(min=self.eps).pow(self.p), (x.shape[-2], x.shape[-1]))
        return pooled.pow(1.0 / self.p).flatten(1)


AGGREGATORS: dict[str, type[nn.Module]] = {'gem': GeM}


def build_aggregator(conf: dict, channels: int) -> nn.Module:
    """Build the aggregator named by ``conf['name']`` for ``channels`` input channels."""
    conf = dict(conf)
    name = conf.pop('name', 'gem')
    if name not in AGGREGATORS:
        msg = f'unknown aggregation {name!r}; choose one of {sorted(AGGREGATORS)}'
        raise ConfigError(msg)
    return AGGREGATORS[name](channels, **conf)
