"""Fine-tuning: the shared optimisation step, the pruning-recovery loop (Finetuner) and
batch-norm re-estimation."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import synthetic_place
from vpr_dataset import write_places

from vpr_ros.errors import ConfigError, ModelError
from vpr_ros.learning.finetune import (
    BatchNormCalibrator,
    FinetuneConf,
    Finetuner,
    make_optimizer,
    optimization_step,
    set_train_mode,
    trainable_parameters,
)
from vpr_ros.models import load_model
from vpr_ros.pruning import PruneConf, prune

SMALL = {'preprocessing': {'size': [64, 64]}}


@pytest.fixture(scope='module')
def resnet18():
    torch.manual_seed(0)
    return load_model('resnet18_gem', SMALL)


def last(steps):
    return list(steps)[-1]


# -- the shared step --------------------------------------------------------------------------


def test_an_optimization_step_moves_only_the_trainable_parameters() -> None:
    model = load_model('resnet18_gem', SMALL)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith('backbone.layer4.'))
    identity = model.identity()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = make_optimizer(model, 1e-2)
    images = torch.randn(2, 3, 64, 64)
    set_train_mode(model, freeze_batch_norm=True)
    losses = optimization_step(
        model, optimizer, lambda: {'loss': model(images)['global_descriptor'].sum()}
    )
    assert set(losses) == {'loss'} and isinstance(losses['loss'], float)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith('backbone.layer4.') for k in changed)
    assert not any('running_' in k for k in changed)  # frozen batch-norm statistics
    assert model.identity() != identity  # new weights, new identity


def test_a_model_without_trainable_parameters_is_refused() -> None:
    model = load_model('resnet18_gem', SMALL)
    assert [n for n, _ in trainable_parameters(model)] == [n for n, _ in model.named_parameters()]
    for param in model.parameters():
        param.requires_grad_(False)
    with pytest.raises(ModelError, match='no trainable parameters'):
        make_optimizer(model, 1e-3)


def test_train_mode_can_keep_batch_norm_statistics_frozen() -> None:
    model = load_model('resnet18_gem', SMALL).eval()
    set_train_mode(model, freeze_batch_norm=True)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert model.training and norms and not any(m.training for m in norms)
    set_train_mode(model)
    assert all(m.training for m in norms)


# -- fine-tuning after pruning ----------------------------------------------------------------


def test_fine_tuning_settings_refuse_impossible_values() -> None:
    with pytest.raises(ConfigError, match='size must be two values'):
        FinetuneConf(size=[48])
    with pytest.raises(ConfigError, match='negative_dist_m'):
        FinetuneConf(positive_dist_m=30.0, negative_dist_m=20.0)
    with pytest.raises(ConfigError, match='batch_places must be >= 2'):
        FinetuneConf(batch_places=1)
    assert FinetuneConf(size=[48, 64]).size == [48, 64]


def test_taylor_pruning_with_place_labelled_fine_tuning(tmp_path: Path, resnet18) -> None:
    data = write_places(tmp_path / 'places')
    conf = FinetuneConf(iterations=2, batch_places=3, size=[48, 48], seed=1)
    finetuner = Finetuner(data, resnet18, conf)
    assert len(finetuner.anchors) == 12
    batch = finetuner.sample()
    assert finetuner.utm is not None
    assert len(batch) == 6 and np.all(
        np.abs(finetuner.utm[batch[0::2], 0] - finetuner.utm[batch[1::2], 0]) < 1
    )
    steps = list(
        prune(
            resnet18,
            PruneConf(sparsity=0.5, steps=2, gamma=0.5, importance='taylor'),
            gradients=finetuner.accumulate_gradients,
            finetune=finetuner,
        )
    )
    assert [s.model.global_dim for s in steps] == [384, 256]
    assert all(s.finetune_loss is not None and np.isfinite(s.finetune_loss) for s in steps)
    assert steps[-1].model.conf['pruning']['finetuned'] is True


def test_fine_tuning_trains_the_weights_but_not_the_batch_norm_statistics(
    tmp_path: Path,
) -> None:
    model = load_model('resnet18_gem', SMALL)
    finetuner = Finetuner(
        write_places(tmp_path / 'places'), None, FinetuneConf(iterations=2, size=[48, 48])
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = finetuner(model, 1)
    assert loss is not None and np.isfinite(loss) and not model.training
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.endswith('.weight') for k in changed)
    assert not any('running_' in k or 'num_batches' in k for k in changed)
    assert all(p.grad is None for p in model.parameters())
    assert Finetuner(tmp_path / 'places', None, FinetuneConf(iterations=0))(model, 1) is None


def test_fine_tuning_data_without_place_names_needs_distillation(tmp_path: Path) -> None:
    folder = tmp_path / 'plain'
    folder.mkdir()
    cv2.imwrite(str(folder / 'a.png'), synthetic_place(0, (32, 32)))
    with pytest.raises(ConfigError, match='UTM|east'):
        Finetuner(folder, None, FinetuneConf())
    finetuner = Finetuner(folder, load_model('resnet18_gem', SMALL), FinetuneConf(metric_weight=0))
    assert finetuner.utm is None


def test_fine_tuning_needs_places_seen_twice(tmp_path: Path) -> None:
    folder = write_places(tmp_path / 'places', count=3)
    with pytest.raises(ConfigError, match='places seen at least twice'):
        Finetuner(folder, None, FinetuneConf(positive_dist_m=1.0, negative_dist_m=25.0))


def test_batchnorm_recalibration_reestimates_running_statistics(resnet18) -> None:
    step = last(prune(resnet18, PruneConf(sparsity=0.5, steps=1)))
    bn = step.model.backbone.bn1
    bn.running_mean.fill_(123.0)
    BatchNormCalibrator([synthetic_place(i, (64, 64)) for i in range(4)], batch_size=2)(step.model)
    assert float(bn.running_mean.abs().max()) < 100
    assert not step.model.training and bn.momentum == 0.1


def test_batchnorm_recalibration_reads_evenly_spaced_images_of_a_folder(tmp_path: Path) -> None:
    folder = write_places(tmp_path / 'places', count=5)
    calibrator = BatchNormCalibrator.from_folder(folder, limit=4)
    assert len(calibrator.images) == 4
    assert calibrator.images[0].shape == (48, 48, 3)
    with pytest.raises(ConfigError, match='at least one image'):
        BatchNormCalibrator([])
