"""Aggregation layers: GeM, GeM + linear projection, Conv-AP and MixVPR shapes, options
and seeded initialisation."""

from __future__ import annotations

import pytest
import torch

from vpr_ros.errors import ConfigError
from vpr_ros.models import load_model
from vpr_ros.models.aggregation import (
    AGGREGATORS,
    ConvAP,
    GeM,
    GeMLinear,
    MixVPR,
    build_aggregator,
)

FEATURES = torch.rand(2, 32, 6, 8)


def test_every_aggregator_reports_its_descriptor_dimension() -> None:
    confs = {
        'gem': ({}, 32),
        'gem_linear': ({'out_features': 20}, 20),
        'convap': ({'out_channels': 16, 's1': 2, 's2': 3}, 16 * 6),
        'mixvpr': ({'out_channels': 16, 'in_h': 6, 'in_w': 8, 'out_rows': 4}, 16 * 4),
    }
    assert set(confs) == set(AGGREGATORS)
    for name, (options, dim) in confs.items():
        layer = build_aggregator({'name': name, **options}, 32)
        assert layer.out_dim == dim
        assert layer(FEATURES).shape == (2, dim)


def test_gem_with_p_one_is_average_pooling() -> None:
    gem = GeM(32, p=1.0)
    torch.testing.assert_close(gem(FEATURES), FEATURES.mean(dim=(2, 3)))


def test_gem_linear_projects_the_gem_descriptor() -> None:
    layer = GeMLinear(32, out_features=12, p=2.0)
    expected = layer.proj(GeM(32, p=2.0)(FEATURES))
    torch.testing.assert_close(layer(FEATURES), expected)
    assert layer.proj.weight.shape == (12, 32) and not layer.proj.bias.any()


def test_untrained_gem_linear_only_rotates_gem_so_similarities_are_gems() -> None:
    layer, gem = GeMLinear(32), GeM(32)
    assert layer.out_dim == 32
    projected = torch.nn.functional.normalize(layer(FEATURES), dim=1)
    pooled = torch.nn.functional.normalize(gem(FEATURES), dim=1)
    torch.testing.assert_close(projected @ projected.T, pooled @ pooled.T)
    assert not torch.allclose(projected, pooled)  # a rotation, not the identity


def test_convap_is_a_1x1_convolution_then_cell_pooling() -> None:
    layer = ConvAP(32, out_channels=8, s1=1, s2=1)
    expected = layer.channel_pool(FEATURES).mean(dim=(2, 3))
    torch.testing.assert_close(layer(FEATURES), expected)


def test_mixvpr_pools_any_input_size_to_its_grid() -> None:
    layer = MixVPR(32, out_channels=8, in_h=3, in_w=4, out_rows=2)
    for size in [(3, 4), (6, 8), (2, 2)]:
        assert layer(torch.rand(1, 32, *size)).shape == (1, 16)


def test_mixvpr_channel_projection_equals_a_linear_layer_over_channels() -> None:
    layer = MixVPR(32, out_channels=8, in_h=6, in_w=8, mix_depth=0, out_rows=3)
    x = FEATURES.flatten(2)
    weight = layer.channel_proj.weight[:, :, 0]
    projected = torch.einsum('oc,bcn->bon', weight, x) + layer.channel_proj.bias[:, None]
    expected = layer.row_proj.proj(projected).flatten(1)
    torch.testing.assert_close(layer(FEATURES), expected)


def test_options_of_another_aggregator_are_dropped_and_unknown_ones_refused() -> None:
    layer = build_aggregator({'name': 'mixvpr', 'p': 3.0, 'in_h': 6, 'in_w': 8}, 32)
    assert isinstance(layer, MixVPR)
    with pytest.raises(ConfigError, match='out_chanels'):
        build_aggregator({'name': 'convap', 'out_chanels': 8}, 32)
    with pytest.raises(ConfigError, match='netvlad'):
        build_aggregator({'name': 'netvlad'}, 32)


def test_options_of_another_aggregator_are_refused_unless_they_are_the_merged_default() -> None:
    # {'name': 'gem', 'p': 3.0} is merged under every named configuration: p=3 is dropped.
    assert isinstance(build_aggregator({'name': 'convap', 'p': 3.0}, 32), ConvAP)
    with pytest.raises(
        ConfigError, match=r"'convap' aggregation does not take.*'p'.*out_channels"
    ):
        build_aggregator({'name': 'convap', 'p': 2.0}, 32)
    with pytest.raises(ConfigError, match=r"does not take options \['in_h'\]"):
        build_aggregator({'name': 'convap', 'in_h': 6}, 32)
    with pytest.raises(ConfigError, match="does not take options \\['p'\\]"):
        load_model('efficientnet_lite0_convap', {'aggregation': {'p': 4.0}})


def test_seeded_layers_are_the_same_every_time_and_leave_the_global_rng_alone() -> None:
    torch.manual_seed(5)
    expected_next = torch.rand(1)
    torch.manual_seed(5)
    a, b = ConvAP(32, seed=3), ConvAP(32, seed=3)
    assert torch.equal(torch.rand(1), expected_next)
    torch.testing.assert_close(a.channel_pool.weight, b.channel_pool.weight)
    assert not torch.equal(a.channel_pool.weight, ConvAP(32, seed=4).channel_pool.weight)


@pytest.mark.parametrize(
    'name, dim',
    [
        ('efficientnet_lite0_convap', 1024),
        ('efficientnet_lite0_mixvpr', 1024),
        ('efficientnet_lite0_gem_linear', 1280),
        ('resnet18_gem_linear', 512),
    ],
)
def test_registry_models_with_learned_aggregation_have_a_stable_identity(name, dim) -> None:
    small = {'preprocessing': {'size': [64, 64]}}
    first, second = load_model(name, small), load_model(name, small)
    assert first.global_dim == dim
    assert first.identity() == second.identity()
    out = first(torch.rand(1, 3, 64, 64))['global_descriptor']
    assert out.shape == (1, dim)
