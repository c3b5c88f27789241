"""Aggregation layers: a feature map (B, C, H, W) in, a global descriptor (B, D) out.

Each aggregator exposes ``out_dim`` (D). GeM has one scalar parameter; GeM + linear
projection, Conv-AP and MixVPR have learnable layers, initialised from a fixed ``seed`` so
that, without place-trained weights, they are the same random projection in every process.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

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
        # A mean over the map, not avg_pool2d with the map's size as kernel: the same
        # numbers, and an ONNX export with a free input size (kernel sizes must be fixed).
        pooled = x.clamp(min=self.eps).pow(self.p.view(1, -1, 1, 1)).mean(dim=(-2, -1))
        return pooled.pow(1.0 / self.p)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Initialise layers from ``seed`` without touching the global random state, so that
    an aggregator without trained weights is the same in every process (and so is the
    weights hash that maps record)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


class ConvAP(nn.Module):
    """Conv-AP (Ali-bey et al., GSV-Cities 2022): a 1x1 convolution to ``out_channels``,
    then adaptive average pooling to ``s1`` x ``s2`` cells; D = out_channels * s1 * s2."""

    def __init__(
        self, channels: int, out_channels: int = 512, s1: int = 2, s2: int = 2, seed: int = 0
    ) -> None:
        super().__init__()
        with _seeded(seed):
            self.channel_pool = nn.Conv2d(channels, int(out_channels), kernel_size=1)
        self.cells = (int(s1), int(s2))

    @property
    def out_dim(self) -> int:
        return self.channel_pool.out_channels * self.cells[0] * self.cells[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.channel_pool(x), self.cells).flatten(1)


class FeatureMixer(nn.Module):
    """One MixVPR feature-mixer block: a residual MLP across the spatial positions of
    each channel (input and output (B, C, H * W))."""

    def __init__(self, positions: int, mlp_ratio: float = 1.0) -> None:
        super().__init__()
        hidden = max(1, int(positions * mlp_ratio))
        self.mix = nn.Sequential(
            nn.LayerNorm(positions),
            nn.Linear(positions, hidden),
            nn.ReLU(),
            nn.Linear(hidden, positions),
        )
        for layer in self.mix:
            if isinstance(layer, nn.Linear):  # as in MixVPR: near-identity blocks at start
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mix(x)


class RowProjection(nn.Module):
    """MixVPR's row projection: a linear map over the spatial positions of each channel,
    (B, C, H * W) -> (B, C, out_rows)."""

    def __init__(self, positions: int, out_rows: int) -> None:
        super().__init__()
        self.proj = nn.Linear(positions, int(out_rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class MixVPR(nn.Module):
    """MixVPR (Ali-bey et al., WACV 2023): feature mixing across space, then channel and
    row projections; D = out_channels * out_rows.

    The map is first average-pooled to ``in_h`` x ``in_w`` (a no-op when it already has
    that size, e.g. 8 x 10 for a stride-32 backbone at 240 x 320), so any input size works.
    The channel projection is a 1x1 convolution, which equals the paper's linear layer
    over channels; the mixer blocks and the row projection act on positions only, so a
    channel pruner must treat them as channel pass-throughs (``vpr_ros.pruning`` does).
    """

    def __init__(
        self,
        channels: int,
        out_channels: int = 256,
        in_h: int = 8,
        in_w: int = 10,
        mix_depth: int = 4,
        mlp_ratio: float = 1.0,
        out_rows: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.in_size = (int(in_h), int(in_w))
        positions = self.in_size[0] * self.in_size[1]
        with _seeded(seed):
            mixers = [FeatureMixer(positions, mlp_ratio) for _ in range(int(mix_depth))]
            self.mix = nn.Sequential(*mixers)
            self.channel_proj = nn.Conv1d(channels, int(out_channels), kernel_size=1)
            self.row_proj = RowProjection(positions, out_rows)

    @property
    def out_dim(self) -> int:
        return self.channel_proj.out_channels * self.row_proj.proj.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.in_size:
            x = F.adaptive_avg_pool2d(x, self.in_size)
        x = self.mix(x.flatten(2))
        return self.row_proj(self.channel_proj(x)).flatten(1)


class GeMLinear(nn.Module):
    """GeM, then a linear projection of the pooled channels: D = ``out_features``.

    The ResNet GeM variants of the structured-pruning paper (Grainge et al.) project the
    pooled features with a linear layer, whose outputs are the descriptor; the pruner
    shrinks D by removing those outputs (``vpr_ros.pruning``), while the projection's
    inputs follow the backbone's final channels. Without place-trained weights the
    projection is a seeded random orthogonal map with zero bias: at ``out_features`` equal
    to the input channels (the default) it only rotates GeM's descriptor, so similarities,
    and retrieval, are GeM's.
    """

    def __init__(
        self,
        channels: int,
        out_features: int | None = None,
        p: float = 3.0,
        eps: float = 1e-6,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.gem = GeM(channels, p=p, eps=eps)
        with _seeded(seed):
            self.proj = nn.Linear(channels, int(out_features or channels))
            nn.init.orthogonal_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

    @property
    def out_dim(self) -> int:
        return self.proj.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.gem(x))


AGGREGATORS: dict[str, type[nn.Module]] = {
    'gem': GeM,
    'gem_linear': GeMLinear,
    'convap': ConvAP,
    'mixvpr': MixVPR,
}


# The aggregation of the model classes' default configurations (CnnVpr, SelaVpr).
DEFAULT_AGGREGATION = {'name': 'gem', 'p': 3.0}


def build_aggregator(conf: dict, channels: int) -> nn.Module:
    """Build the aggregator named by ``conf['name']`` for ``channels`` input channels."""
    conf = dict(conf)
    name = conf.pop('name', 'gem')
    if name not in AGGREGATORS:
        msg = f'unknown aggregation {name!r}; choose one of {sorted(AGGREGATORS)}'
        raise ConfigError(msg)
    cls = AGGREGATORS[name]
    accepted = _parameters(cls)
    # A named configuration is merged over the model's default aggregation
    # (DEFAULT_AGGREGATION), so its GeM options can be present unasked: drop those when
    # they still hold the default value; refuse every other option this one does not take.
    carried = {
        key
        for key, value in DEFAULT_AGGREGATION.items()
        if key != 'name' and key not in accepted and conf.get(key, value) == value
    }
    refused = sorted(set(conf) - set(accepted) - carried)
    if refused:
        msg = f'{name!r} aggregation does not take options {refused!r}; it takes {accepted}'
        raise ConfigError(msg)
    return cls(channels, **{key: value for key, value in conf.items() if key in accepted})


def _parameters(cls: type[nn.Module]) -> list[str]:
    """Keyword options of an aggregator's constructor (everything after ``channels``)."""
    return [name for name in inspect.signature(cls).parameters if name != 'channels']
