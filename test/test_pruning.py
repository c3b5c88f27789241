"""Structured pruning: schedule, gamma (the final descriptor sparsity), channel counts, the
GeM + linear projection, export round trip, maps, the prune command."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import torch
from conftest import synthetic_place

from vpr_ros.cli.prune import main as prune_main
from vpr_ros.database import PlaceDatabase
from vpr_ros.errors import ConfigError, DatabaseError
from vpr_ros.mapping import MapBuilder
from vpr_ros.models import load_model, save_model
from vpr_ros.models.pruned import PrunedCnnVpr
from vpr_ros.profiling import footprint
from vpr_ros.pruning import (
    PruneConf,
    channel_counts,
    head_layers,
    prune,
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


def test_pruning_settings_check_their_values_with_the_fix() -> None:
    with pytest.raises(ConfigError, match=r'sparsity must be in \[0, 1\), got 1.0; 0.3 removes'):
        PruneConf(sparsity=1.0)
    with pytest.raises(ConfigError, match=r'gamma is the final sparsity.*got -0.5'):
        PruneConf(gamma=-0.5)
    with pytest.raises(ConfigError, match=r'multiplier m of the backbone sparsity s.*m \* s'):
        PruneConf(sparsity=0.2, gamma=2.0)  # the old README recipe's multiplier
    with pytest.raises(ConfigError, match="importance must be one of \\['l1', 'l2', 'taylor'\\]"):
        PruneConf(importance='l3')
    with pytest.raises(ConfigError, match='trace_size must have 2 values'):
        PruneConf(trace_size=[64])
    conf = PruneConf(round_to=8)
    assert PruneConf.from_dict(json.loads(json.dumps(conf.to_dict()))) == conf


@pytest.mark.parametrize('sparsity, steps', [(1.0, 2), (-0.1, 2), (0.5, 0)])
def test_schedule_rejects_impossible_values(sparsity: float, steps: int) -> None:
    with pytest.raises(ConfigError):
        sparsity_schedule(sparsity, steps)


def test_gamma_is_the_final_descriptor_sparsity_reached_on_the_backbone_schedule(
    resnet18,
) -> None:
    steps = list(prune(resnet18, PruneConf(sparsity=0.5, steps=4, gamma=0.25)))
    assert [s.sparsity for s in steps] == pytest.approx([0.125, 0.25, 0.375, 0.5])
    assert [s.descriptor_sparsity for s in steps] == pytest.approx([1 / 16, 1 / 8, 3 / 16, 0.25])
    assert [s.model.global_dim for s in steps] == [480, 448, 416, 384]  # 512 * (1 - d)
    # Gamma does not depend on the backbone sparsity: more descriptor than backbone pruning.
    step = last(prune(resnet18, PruneConf(sparsity=0.2, steps=1, gamma=0.5)))
    assert step.model.global_dim == 256
    assert channel_counts(step.model)['backbone.layer4.0.conv1'] == pytest.approx(512 * 0.8, abs=1)


def test_head_layers_are_the_descriptor_producing_layers(resnet18, lite0) -> None:
    assert head_layers(lite0) == [lite0.backbone.conv_head]
    assert head_layers(resnet18) == [resnet18.backbone.layer4[1].conv2]
    mixvpr = load_model('efficientnet_lite0_mixvpr', SMALL)
    assert head_layers(mixvpr) == [mixvpr.aggregation.channel_proj]
    projected = load_model('resnet18_gem_linear', SMALL)
    assert head_layers(projected) == [projected.aggregation.proj]


# -- channel counts -----------------------------------------------------------------------


@pytest.mark.parametrize('gamma, dim', [(0.0, 512), (0.25, 384), (0.5, 256)])
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
    steps = list(prune(resnet18, PruneConf(sparsity=0.5, steps=2, gamma=0.5)))
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
    step = last(prune(model, PruneConf(sparsity=0.5, steps=1, gamma=0.25)))
    assert step.model.global_dim == pruned  # 256 channels * (1 - 0.25) * 4 cells / rows
    assert step.model(IMAGES)['global_descriptor'].shape == (2, pruned)
    assert channel_counts(step.model)['backbone.conv_head'] == 640  # backbone: 1280 * 0.5


def test_gem_linear_loses_projection_outputs_to_gamma_and_inputs_to_the_backbone() -> None:
    model = load_model('resnet18_gem_linear', SMALL)
    steps = list(prune(model, PruneConf(sparsity=0.5, steps=2, gamma=0.25)))
    projections = [s.model.aggregation.proj for s in steps]
    assert [p.out_features for p in projections] == [448, 384]  # D: 512 * (1 - gamma k / n)
    assert [p.in_features for p in projections] == [384, 256]  # the final channels
    assert [channel_counts(s.model)['backbone.layer4.1.conv2'] for s in steps] == [384, 256]
    assert [s.model.global_dim for s in steps] == [448, 384]
    assert steps[-1].model(IMAGES)['global_descriptor'].shape == (2, 384)
    assert steps[-1].model.local_dim == 128  # layer3: backbone sparsity


# -- export ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    'name', ['efficientnet_lite0_gem', 'efficientnet_lite0_mixvpr', 'resnet18_gem_linear']
)
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
    pruned = last(prune(lite0, PruneConf(sparsity=0.5, steps=1, gamma=0.5))).model
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


# -- importance, inputs ---------------------------------------------------------------------


def test_taylor_importance_needs_gradients(resnet18) -> None:
    with pytest.raises(ConfigError, match='Taylor'):
        list(prune(resnet18, PruneConf(importance='taylor')))


def test_prune_checks_its_inputs_at_the_call_not_when_iterated(resnet18) -> None:
    tiny_selavpr = load_model('selavpr_tiny_random')
    with pytest.raises(ConfigError, match='CNN models'):
        prune(tiny_selavpr, PruneConf())
    with pytest.raises(ConfigError, match='Taylor'):
        prune(resnet18, PruneConf(importance='taylor'))


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
            '--steps', '2', '--gamma', '0.25', '--runs', '1', '--save-steps',
            '--calibration-data', str(images),
        ]
    )  # fmt: skip
    assert code == 0
    model = load_model(out)
    assert model.global_dim == 384
    assert load_model(out / 'steps' / 'step1').global_dim == 448
    rows = list(csv.DictReader((out / 'steps.csv').open()))
    assert [int(r['global_dim']) for r in rows] == [512, 448, 384]
    assert [float(r['descriptor_sparsity']) for r in rows] == [0.0, 0.125, 0.25]
    assert int(rows[0]['params']) > int(rows[2]['params'])
    # The map counts the local features: more than the global descriptors, and shrinking.
    maps = [float(r['map_mb_per_1000']) for r in rows]
    assert all(float(r['global_mb_per_1000']) < m for r, m in zip(rows, maps))
    assert maps[0] > maps[1] > maps[2]
    assert model.conf['pruning']['bn_recalibrated'] is True


def test_prune_command_reports_bad_options(tmp_path: Path, capsys) -> None:
    code = prune_main(['--model', 'resnet18_gem', '--out', str(tmp_path), '--sparsity', '1.5'])
    assert code == 1
    assert 'sparsity' in capsys.readouterr().err


def test_prune_command_flags_come_from_the_settings_tables() -> None:
    from vpr_ros.cli.prune import make_parser
    from vpr_ros.config import conf_from_args
    from vpr_ros.learning.finetune import FinetuneConf

    argv = [
        '--out', 'o', '--sparsity', '0.4', '--round-to', '8', '--importance', 'l1',
        '--finetune-iters', '3', '--finetune-size', '48', '64', '--batch-places', '4',
        '--positive-dist-m', '5', '--metric-weight', '0', '--temperature', '0.1',
    ]  # fmt: skip
    args = make_parser().parse_args(argv)
    assert conf_from_args(PruneConf, args) == PruneConf(sparsity=0.4, round_to=8, importance='l1')
    finetune = conf_from_args(FinetuneConf, args)
    assert finetune == FinetuneConf(
        iterations=3, size=[48, 64], batch_places=4, positive_dist_m=5.0, metric_weight=0.0,
        temperature=0.1,
    )  # fmt: skip
    assert '--trace-size' not in make_parser().format_help()


def test_prune_command_help_and_bad_inputs_do_not_import_torch(tmp_path: Path) -> None:
    code = (
        'import sys\n'
        'from vpr_ros.cli.prune import main\n'
        f'assert main(["--out", {str(tmp_path)!r}, "--sparsity", "1.5"]) == 1\n'
        f'assert main(["--out", {str(tmp_path)!r}, "--model", "no_such_model"]) == 1\n'
        f'assert main(["--out", "o", "--train-data", {str(tmp_path / "x")!r}]) == 1\n'
        'assert "torch" not in sys.modules, "torch was imported"\n'
    )
    repo = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        'PYTHONPATH': os.pathsep.join([str(repo), os.environ.get('PYTHONPATH', '')]),
    }
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert 'sparsity must be in [0, 1)' in done.stderr
    assert "unknown model 'no_such_model'" in done.stderr
    assert '--train-data folder' in done.stderr and 'does not exist' in done.stderr
