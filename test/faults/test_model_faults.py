"""Faults of exported models and weight files: each is a one-line ModelError naming the
file, and the commands exit with code 1 (no traceback, no network wait)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vpr_ros.errors import ModelError
from vpr_ros.models import ALLOW_DOWNLOADS_ENV, load_model, save_model
from vpr_ros.models.weights import read_state_dict

SMALL = {'preprocessing': {'size': [64, 64]}}


@pytest.fixture(scope='module')
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = load_model('resnet18_gem', SMALL)
    return save_model(model, tmp_path_factory.mktemp('models') / 'resnet18')


def copy_export(exported: Path, tmp_path: Path) -> Path:
    target = tmp_path / 'model'
    target.mkdir()
    for file in exported.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


def edit_conf(folder: Path, change: Callable[[dict], object]) -> None:
    conf_file = folder / 'model.json'
    conf = json.loads(conf_file.read_text())
    result = change(conf)
    conf_file.write_text(json.dumps(conf if result is None else result))


def edit_weights(folder: Path, change: Callable[[dict], None]) -> None:
    state = load_file(str(folder / 'model.safetensors'))
    change(state)
    save_file(state, str(folder / 'model.safetensors'))


def first_conv(state: dict) -> str:
    return next(k for k, v in state.items() if v.ndim == 4)


CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    'json list': (lambda f: edit_conf(f, lambda c: [c]), 'is a list, not a JSON object'),
    'bad utf-8': (
        lambda f: (f / 'model.json').write_bytes(b'{"model": "cnn\xff"}'),
        'is not UTF-8 text',
    ),
    'strange backbone': (
        lambda f: edit_conf(f, lambda c: c.update(backbone='../../etc/passwd')),
        'is not a local timm model name',
    ),
    'unknown backbone': (
        lambda f: edit_conf(f, lambda c: c.update(backbone='no_such_net')),
        'unknown timm backbone',
    ),
    'negative size': (
        lambda f: edit_conf(f, lambda c: c['preprocessing'].update(size=[-64, 64])),
        r'preprocessing size \[-64, 64\] must be',
    ),
    'huge size': (
        lambda f: edit_conf(f, lambda c: c['preprocessing'].update(size=[100000, 100000])),
        r'preprocessing size \[100000, 100000\] must be',
    ),
    'bad local_stage': (
        lambda f: edit_conf(f, lambda c: c.update(local_stage='three')),
        "local_stage 'three' must be a backbone stage index",
    ),
    'local_stage past the backbone': (
        lambda f: edit_conf(f, lambda c: c.update(local_stage=12)),
        'does not fit model.json',
    ),
    'extra keys': (
        lambda f: edit_weights(f, lambda s: s.update(extra=torch.zeros(3))),
        'does not fit model.json.*Unexpected key',
    ),
    'wrong shape': (
        lambda f: edit_weights(f, lambda s: s.update({first_conv(s): torch.zeros(2, 3, 3, 3)})),
        'does not fit model.json.*size mismatch',
    ),
    'nan weights': (
        lambda f: edit_weights(
            f, lambda s: s[first_conv(s)].view(-1).__setitem__(0, float('nan'))
        ),
        'holds NaN or infinite values',
    ),
}


@pytest.mark.parametrize('case', list(CASES))
def test_a_broken_exported_model_is_a_one_line_model_error(
    exported: Path, tmp_path: Path, case: str
) -> None:
    folder = copy_export(exported, tmp_path)
    damage, expected = CASES[case]
    damage(folder)
    with pytest.raises(ModelError, match=expected) as error:
        load_model(folder)
    assert '\n' not in str(error.value)
    assert str(folder) in str(error.value)


def test_a_hub_backbone_is_refused_at_once_unless_downloads_are_allowed(
    exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ALLOW_DOWNLOADS_ENV, raising=False)
    folder = copy_export(exported, tmp_path)
    edit_conf(folder, lambda c: c.update(backbone='hf-hub:timm/resnet18.a1_in1k'))
    started = time.monotonic()
    with pytest.raises(ModelError, match=f'would be downloaded; set {ALLOW_DOWNLOADS_ENV}=1'):
        load_model(folder)
    with pytest.raises(ModelError, match='would be downloaded'):
        load_model('resnet18_gem', {'backbone': 'hf-hub:timm/resnet18.a1_in1k'})
    assert time.monotonic() - started < 5


def test_nan_in_a_weights_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / 'backbone.pth'
    torch.save({'conv.weight': torch.tensor([1.0, float('inf')])}, path)
    with pytest.raises(ModelError, match="'conv.weight' holds NaN or infinite values"):
        read_state_dict(path)


def test_build_map_exits_1_with_one_line_on_a_broken_model(
    exported: Path, tmp_path: Path, capsys
) -> None:
    from conftest import make_frames

    from vpr_ros.bagwriter import write_bag
    from vpr_ros.cli.build_map import main

    folder = copy_export(exported, tmp_path)
    edit_weights(folder, lambda s: s.update(extra=torch.zeros(3)))
    bag = write_bag(tmp_path / 'bag', make_frames(3))
    argv = ['--bag', str(bag), '--image-topic', '/camera/image_raw', '--pose-topic', '/odom']
    code = main([*argv, '--out', str(tmp_path / 'map'), '--model', str(folder), '--no-progress'])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith('error: model') and err.count('\n') == 1, err
    assert not (tmp_path / 'map').exists()
