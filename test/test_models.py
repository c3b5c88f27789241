"""The embedded default model, the registry, export and safe weight loading."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic_place, viewed_again

from vpr_ros.errors import ConfigError, ModelError
from vpr_ros.extraction import TorchExtractor
from vpr_ros.models import available_models, load_model, save_model
from vpr_ros.models.weights import efficientnet_lite_file, read_state_dict


def test_default_model_loads_the_shipped_imagenet_weights(default_model) -> None:
    shipped = read_state_dict(efficientnet_lite_file('lite0'))
    stem = next(iter(shipped.values()))
    torch.testing.assert_close(default_model.backbone.conv_stem.weight, stem)


def test_same_place_is_more_similar_than_another_place(default_model) -> None:
    images = [synthetic_place(0), viewed_again(synthetic_place(0)), synthetic_place(1)]
    desc = TorchExtractor(default_model).extract(images).global_descriptors
    assert desc[0] @ desc[1] > desc[0] @ desc[2]


def test_exported_model_reloads_with_the_same_identity_and_outputs(
    tmp_path: Path, default_model
) -> None:
    save_model(default_model, tmp_path / 'exported')
    reloaded = load_model(tmp_path / 'exported')
    assert reloaded.identity() == default_model.identity()
    image = [synthetic_place(5)]
    np.testing.assert_allclose(
        TorchExtractor(reloaded).extract(image).global_descriptors,
        TorchExtractor(default_model).extract(image).global_descriptors,
        atol=1e-6,
    )


def test_identity_changes_with_weights() -> None:
    random_model = load_model('efficientnet_lite0_gem', {'weights': None})
    trained = load_model('efficientnet_lite0_gem')
    assert random_model.identity().config_hash == trained.identity().config_hash
    assert random_model.identity().weights_hash != trained.identity().weights_hash


def test_unknown_model_name_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match='efficientnet_lite0_gem'):
        load_model('no_such_model')
    assert 'efficientnet_lite0_gem' in available_models()


def test_weights_that_need_code_execution_are_refused(tmp_path: Path) -> None:
    path = tmp_path / 'evil.pth'
    # Unpickling an arbitrary class would run its code; weights_only refuses it.
    torch.save({'w': argparse.Namespace(payload=1)}, path)
    with pytest.raises(ModelError, match='cannot read weights'):
        read_state_dict(path)
