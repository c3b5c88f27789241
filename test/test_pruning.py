"""Structured pruning: schedule, gamma, channel counts, export round trip, maps, recovery."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import synthetic_place, viewed_again

from vpr_ros.cli.prune import main as prune_main
from vpr_ros.database import PlaceDatabase
from vpr_ros.errors import ConfigError, DatabaseError
from vpr_ros.extraction import Extractor
from vpr_ros.mapping import MapBuilder
from vpr_ros.models import DEFAULT_MODEL, load_model, save_model
from vpr_ros.models.pruned import PrunedCnnVpr
from vpr_ros.pruning import (
    BatchNormCalibrator,
    FinetuneConf,
    Finetuner,
    PruneConf,
    channel_counts,
    footprint,
    head_layers,
    head_sparsity,
    multi_similarity_loss,
    prune,
    relational_distillation_loss,
    sparsity_schedule,
)
from vpr_ros.types import Frame, Pose

SMALL = {'preprocessing': {'size': [64, 64]}}
IMAGES = torch.randn(2, 3, 64, 64)


@pytest.fixture(scope='module')
def resnet18():
    torch.manual_seed(0)
    return load_model('resnet18_gem', SMALL)


@pytest.fixture(scope='module')
def lite0():
    return load_model('efficientnet_lite0_gem', SMALL)


def last(steps):
    return list(steps)[-1]


# -- schedule and gamma -------------------------------------------------------------------


def test_sparsity_rises_linearly_to_the_final_value() -> None:
    assert sparsity_schedule(0.3, 3) == pytest.approx([0.1, 0.2, 0.3])
    assert sparsity_schedule(0.5, 1) == [0.5]


@pytest.mark.parametrize('sparsity, steps', [(1.0, 2), (-0.1, 2), (0.5, 0)])
def test_schedule_rejects_impossible_values(sparsity: float, steps: int) -> None:
    with pytest.raises(ConfigError):
        sparsity_schedule(sparsity, steps)


def test_head_sparsity_is_gamma_times_the_backbone_sparsity_and_capped() -> None:
    assert head_sparsity(0.4, 0.0) == 0.0
    assert head_sparsity(0.4, 0.5) == pytest.approx(0.2)
    assert head_sparsity(0.4, 1.0) == pytest.approx(0.4)
    assert head_sparsity(0.8, 2.0) == pytest.approx(0.95)
    with pytest.raises(ConfigError, match='gamma'):
        head_sparsity(0.4, -1.0)


def test_head_layers_are_the_descriptor_producing_layers(resnet18, lite0) -> None:
    assert head_layers(lite0) == [lite0.backbone.conv_head]
    assert head_layers(resnet18) == [resnet18.backbone.layer4[1].conv2]
    mixvpr = load_model('efficientnet_lite0_mixvpr', SMALL)
    assert head_layers(mixvpr) == [mixvpr.aggregation.channel_proj]


# -- channel counts -----------------------------------------------------------------------


@pytest.mark.parametrize('gamma, dim', [(0.0, 512), (0.5, 384), (1.0, 256)])
def test_pruning_at_half_gives_the_expected_channels_and_descriptor(resnet18, gamma, dim) -> None:
    step = last(prune(resnet18, PruneConf(sparsity=0.5, steps=1, gamma=gamma)))
    counts = channel_counts(step.model)
    assert counts['backbone.conv1'] == 32  # stem: 64 * (1 - 0.5)
    assert counts['backbone.layer1.0.conv1'] == 32
    assert counts['backbone.layer3.0.conv1'] == 128
    assert counts['backbone.layer4.0.conv1'] == 256  # inside a block: backbone sparsity
    assert counts['backbone.layer4.1.conv2'] == dim  # the stream GeM pools: gamma
    assert step.model.global_dim == dim
    assert step.model(IMAGES)['global_descriptor'].shape == (2, dim)
    assert step.model.local_dim == 128  # layer3 output: backbone sparsity


def test_each_step_prunes_to_its_scheduled_sparsity(resnet18) -> None:
    steps = list(prune(resnet18, PruneConf(sparsity=0.5, steps=2, gamma=1.0)))
    assert [s.sparsity for s in steps] == pytest.approx([0.25, 0.5])
    assert [channel_counts(s.model)['backbone.conv1'] for s in steps] == [48, 32]
    assert [s.model.global_dim for s in steps] == [384, 256]
    params = [footprint(s.model).params for s in steps]
    assert footprint(resnet18).params > params[0] > params[1]


def test_pruning_leaves_the_source_model_alone(resnet18) -> None:
    before = resnet18.identity()
    last(prune(resnet18, PruneConf(sparsity=0.25, steps=1)))
    resnet18.invalidate_identity()
    assert resnet18.identity() == before
    assert resnet18.global_dim == 512


def test_round_to_keeps_channel_counts_multiples(resnet18) -> None:
    step = last(prune(resnet18, PruneConf(sparsity=0.3, steps=1, round_to=16)))
    assert all(n % 16 == 0 for n in channel_counts(step.model.backbone).values())


@pytest.mark.parametrize('name, full, pruned', [('convap', 1024, 768), ('mixvpr', 1024, 768)])
def test_aggregation_layers_shrink_with_gamma(name, full, pruned) -> None:
    model = load_model(f'efficientnet_lite0_{name}', SMALL)
    assert model.global_dim == full
    step = last(prune(model, PruneConf(sparsity=0.5, steps=1, gamma=0.5)))
    assert step.model.global_dim == pruned  # 256 channels * (1 - 0.25) * 4 cells / rows
    assert step.model(IMAGES)['global_descriptor'].shape == (2, pruned)
    assert channel_counts(step.model)['backbone.conv_head'] == 640  # backbone: 1280 * 0.5


# -- export ---------------------------------------------------------------------------------


@pytest.mark.parametrize('name', ['efficientnet_lite0_gem', 'efficientnet_lite0_mixvpr'])
def test_pruned_model_export_reloads_to_the_same_outputs(tmp_path: Path, name: str) -> None:
    model = load_model(name, SMALL)
    step = last(prune(model, PruneConf(sparsity=0.4, steps=2, gamma=0.5)))
    save_model(step.model, tmp_path / 'pruned')
    loaded = load_model(tmp_path / 'pruned')
    assert isinstance(loaded, PrunedCnnVpr)
    assert loaded.identity() == step.model.identity()
    assert loaded.global_dim == step.model.global_dim < model.global_dim
    with torch.no_grad():
        expected, got = step.model(IMAGES), loaded(IMAGES)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key])
    assert loaded.conf['pruning']['gamma'] == 0.5
    assert loaded.identity().config_hash != model.identity().config_hash


def test_pruned_weights_that_do_not_fit_are_refused(tmp_path: Path, resnet18) -> None:
    step = last(prune(resnet18, PruneConf(sparsity=0.5, steps=1)))
    state = dict(step.model.state_dict())
    state['backbone.fc_extra.weight'] = torch.zeros(1)
    with pytest.raises(Exception, match='do not fit'):
        PrunedCnnVpr.from_export(step.model.export_conf(), state)


def test_a_map_built_with_a_pruned_model_is_smaller_and_rejected_by_the_unpruned_model(
    tmp_path: Path, lite0
) -> None:
    pruned = last(prune(lite0, PruneConf(sparsity=0.5, steps=1, gamma=1.0))).model
    save_model(pruned, tmp_path / 'model')
    pruned = load_model(tmp_path / 'model')
    builder = MapBuilder(pruned, {'batch_size': 4})
    for i in range(4):
        frame = Frame(synthetic_place(i, (64, 64)), i * 10**9, pose=Pose(20.0 * i, 0.0, 0.0))
        builder.offer(frame)
    path = builder.save(tmp_path / 'map')

    database = PlaceDatabase.load(path, expected_model=pruned.identity())
    assert len(database) == 4
    assert database.global_descriptors.shape == (4, pruned.global_dim)
    assert pruned.global_dim == 640 < lite0.global_dim
    with pytest.raises(DatabaseError, match='built with'):
        PlaceDatabase.load(path, expected_model=lite0.identity())


# -- importance, recovery ---------------------------------------------------------------------


def test_taylor_importance_needs_gradients(resnet18) -> None:
    with pytest.raises(ConfigError, match='Taylor'):
        list(prune(resnet18, PruneConf(importance='taylor')))


def test_prune_checks_its_inputs_at_the_call_not_when_iterated(resnet18) -> None:
    tiny_selavpr = load_model('selavpr_tiny_random')
    with pytest.raises(ConfigError, match='CNN models'):
        prune(tiny_selavpr, PruneConf())
    with pytest.raises(ConfigError, match='Taylor'):
        prune(resnet18, PruneConf(importance='taylor'))


def test_footprint_counts_the_pooled_local_map_the_extractor_outputs() -> None:
    model = load_model(DEFAULT_MODEL)
    height, width = model.preprocessing.size
    out = Extractor(model).extract([np.zeros((height, width, 3), np.uint8)])
    _, locations, channels = out.local_features.shape
    assert (locations, channels) == (8 * 10, 112)  # 240 x 320, stride 16, pooled by 2
    size = footprint(model)
    assert size.local_mb_per_1000 == pytest.approx(1000 * locations * channels * 2 / 1e6)
    assert size.map_mb_per_1000 == pytest.approx(1000 * out.global_descriptors.shape[1] * 4 / 1e6)


def test_only_cnn_models_are_pruned() -> None:
    from vpr_ros.models.base import VprModel

    class NotCnn(VprModel):
        def _init(self, conf):
            pass

        def _forward(self, images):
            raise NotImplementedError

        global_dim = local_dim = 1

    with pytest.raises(ConfigError, match='CNN'):
        list(prune(NotCnn(), PruneConf()))


def write_places(folder: Path, count: int = 6) -> Path:
    """Two views of ``count`` places, 100 m apart, in the VPR folder format."""
    folder.mkdir(parents=True)
    for i in range(count):
        image = synthetic_place(i, (48, 48))
        for view, img in enumerate([image, viewed_again(image)]):
            name = f'@{100.0 * i:.2f}@{view * 2.0:.2f}@view{view}.png'
            cv2.imwrite(str(folder / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return folder


def test_taylor_pruning_with_place_labelled_fine_tuning(tmp_path: Path, resnet18) -> None:
    data = write_places(tmp_path / 'places')
    conf = FinetuneConf(iterations=2, batch_places=3, size=(48, 48), seed=1)
    finetuner = Finetuner(data, resnet18, conf)
    assert len(finetuner.anchors) == 12
    batch = finetuner.sample()
    assert len(batch) == 6 and np.all(
        np.abs(finetuner.utm[batch[0::2], 0] - finetuner.utm[batch[1::2], 0]) < 1
    )
    steps = list(
        prune(
            resnet18,
            PruneConf(sparsity=0.5, steps=2, importance='taylor'),
            gradients=finetuner.accumulate_gradients,
            finetune=finetuner,
        )
    )
    assert [s.model.global_dim for s in steps] == [384, 256]
    assert all(np.isfinite(s.finetune_loss) for s in steps)
    assert steps[-1].model.conf['pruning']['finetuned'] is True


def test_fine_tuning_data_without_place_names_needs_distillation(tmp_path: Path) -> None:
    folder = tmp_path / 'plain'
    folder.mkdir()
    cv2.imwrite(str(folder / 'a.png'), synthetic_place(0, (32, 32)))
    with pytest.raises(ConfigError, match='UTM|east'):
        Finetuner(folder, None, FinetuneConf())
    finetuner = Finetuner(folder, load_model('resnet18_gem', SMALL), FinetuneConf(metric_weight=0))
    assert finetuner.utm is None


def test_batchnorm_recalibration_reestimates_running_statistics(resnet18) -> None:
    step = last(prune(resnet18, PruneConf(sparsity=0.5, steps=1)))
    bn = step.model.backbone.bn1
    bn.running_mean.fill_(123.0)
    BatchNormCalibrator([synthetic_place(i, (64, 64)) for i in range(4)], batch_size=2)(step.model)
    assert float(bn.running_mean.abs().max()) < 100
    assert not step.model.training and bn.momentum == 0.1


def test_metric_and_distillation_losses_prefer_the_right_ranking() -> None:
    a = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), dim=1)
    swapped = a[[0, 2, 1]]
    positive = torch.tensor([[0, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    negative = torch.tensor([[0, 0, 1], [0, 0, 1], [1, 1, 0]], dtype=torch.bool)
    assert multi_similarity_loss(a, positive, negative) < multi_similarity_loss(
        swapped, positive, negative
    )
    assert float(relational_distillation_loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(relational_distillation_loss(swapped, a)) > 0.1


# -- command line ----------------------------------------------------------------------------


def test_prune_command_writes_a_loadable_model_and_a_step_table(tmp_path: Path, resnet18) -> None:
    save_model(resnet18, tmp_path / 'base')
    images = tmp_path / 'images'
    images.mkdir()
    for i in range(3):
        cv2.imwrite(str(images / f'{i}.png'), synthetic_place(i, (64, 64)))
    out = tmp_path / 'pruned'
    code = prune_main(
        [
            '--model', str(tmp_path / 'base'), '--out', str(out), '--sparsity', '0.5',
            '--steps', '2', '--gamma', '0.5', '--runs', '1', '--save-steps',
            '--calibration-data', str(images),
        ]
    )  # fmt: skip
    assert code == 0
    model = load_model(out)
    assert model.global_dim == 384
    assert load_model(out / 'steps' / 'step1').global_dim == 448
    rows = list(csv.DictReader((out / 'steps.csv').open()))
    assert [int(r['global_dim']) for r in rows] == [512, 448, 384]
    assert int(rows[0]['params']) > int(rows[2]['params'])
    assert model.conf['pruning']['bn_recalibrated'] is True


def test_prune_command_reports_bad_options(tmp_path: Path, capsys) -> None:
    code = prune_main(['--model', 'resnet18_gem', '--out', str(tmp_path), '--sparsity', '1.5'])
    assert code == 1
    assert 'sparsity' in capsys.readouterr().err
