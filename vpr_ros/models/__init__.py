"""The model registry: named configurations, model classes, export and load by path.

``load_model(name_or_path)`` is the one factory build_map, relocalize and evaluate use.
A name picks an entry of ``CONFS``; a path names a directory written by ``save_model``
(``model.json`` + ``model.safetensors``), which is how trained (SelaVPR) and pruned
models plug in.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from vpr_ros.errors import ConfigError, ModelError
from vpr_ros.models.base import ModelIdentity, VprModel, merge_conf
from vpr_ros.models.cnn import CnnVpr
from vpr_ros.models.pruned import PrunedCnnVpr
from vpr_ros.models.selavpr import SELAVPR_CONFS, SelaVpr

# Model classes by the ``model`` key of a configuration.
MODEL_CLASSES: dict[str, type[VprModel]] = {'cnn': CnnVpr}

DEFAULT_MODEL = 'efficientnet_lite0_gem'

# Named configurations (hloc style): plain dicts, merged over the class defaults.
CONFS: dict[str, dict] = {
    'efficientnet_lite0_gem': {
        'model': 'cnn',
        'backbone': 'tf_efficientnet_lite0',
        'weights': 'imagenet',
        'local_stage': 3,
        'local_pool': 2,
        'aggregation': {'name': 'gem', 'p': 3.0},
        'preprocessing': {'size': [240, 320]},
    },
}

# SelaVPR (DINOv2 + adapters): vpr_ros/models/selavpr.py.
MODEL_CLASSES['selavpr'] = SelaVpr
CONFS.update(SELAVPR_CONFS)

# More CNN models (backbone + GeM / Conv-AP / MixVPR) and pruned ones (vpr_ros.pruning).
# Only EfficientNet-Lite0 has shipped ImageNet weights; the ResNets are random-init
# ('weights': None) until given a local weights file, and every Conv-AP / MixVPR layer is
# a seeded random projection: none of them is place-trained.
MODEL_CLASSES['pruned_cnn'] = PrunedCnnVpr
_LITE0 = {'model': 'cnn', 'backbone': 'tf_efficientnet_lite0', 'weights': 'imagenet'}
_RANDOM_INIT = {'model': 'cnn', 'weights': None}
CONFS.update(
    {
        'efficientnet_lite0_convap': {
            **_LITE0,
            'aggregation': {'name': 'convap', 'out_channels': 256, 's1': 2, 's2': 2},
        },
        'efficientnet_lite0_mixvpr': {
            **_LITE0,
            'aggregation': {'name': 'mixvpr', 'out_channels': 256, 'in_h': 8, 'in_w': 10},
        },
        'resnet18_gem': {**_RANDOM_INIT, 'backbone': 'resnet18', 'aggregation': {'name': 'gem'}},
        'resnet50_gem': {**_RANDOM_INIT, 'backbone': 'resnet50', 'aggregation': {'name': 'gem'}},
        'resnet50_convap': {
            **_RANDOM_INIT,
            'backbone': 'resnet50',
            'aggregation': {'name': 'convap', 'out_channels': 512, 's1': 2, 's2': 2},
        },
        'resnet50_mixvpr': {
            **_RANDOM_INIT,
            'backbone': 'resnet50',
            'aggregation': {'name': 'mixvpr', 'out_channels': 512, 'in_h': 8, 'in_w': 10},
        },
    }
)

EXPORT_CONF_FILE = 'model.json'
EXPORT_WEIGHTS_FILE = 'model.safetensors'


def register_model_class(key: str, cls: type[VprModel]) -> None:
    MODEL_CLASSES[key] = cls


def available_models() -> list[str]:
    return sorted(CONFS)


def model_class(conf: dict) -> type[VprModel]:
    key = conf.get('model', 'cnn')
    if key not in MODEL_CLASSES:
        raise ConfigError(f'unknown model class {key!r}; known: {sorted(MODEL_CLASSES)}')
    return MODEL_CLASSES[key]


def load_model(name_or_path: str | os.PathLike, overrides: dict | None = None) -> VprModel:
    """Build a model by registry name or from an exported directory, in eval mode."""
    key = str(name_or_path)
    if key in CONFS:
        conf = merge_conf(CONFS[key], overrides)
        model = model_class(conf)(conf, name=key)
    else:
        path = Path(key)
        if not path.exists():
            msg = f'unknown model {key!r}: neither a registry name {available_models()} nor a path'
            raise ConfigError(msg)
        model = load_exported(path)
    return model.eval()


def load_exported(path: Path) -> VprModel:
    """Load a directory written by ``save_model``."""
    conf_file = path / EXPORT_CONF_FILE if path.is_dir() else path
    weights_file = conf_file.parent / EXPORT_WEIGHTS_FILE
    try:
        conf = json.loads(conf_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelError(f'cannot read model configuration {str(conf_file)!r}: {err}') from err
    if not weights_file.is_file():
        raise ModelError(f'model {str(path)!r} has no {EXPORT_WEIGHTS_FILE}')
    try:
        state = load_file(str(weights_file))
    except Exception as err:
        raise ModelError(f'cannot read weights {str(weights_file)!r}: {err}') from err
    cls = model_class(conf)
    model = cls.from_export(_resolve_weight_sources(cls, conf, conf_file.parent), state)
    model.name = conf.get('name', path.name)
    return model


def _resolve_weight_sources(cls: type[VprModel], conf: dict, folder: Path) -> dict:
    """A weight source stored as a relative path names a file inside the model folder
    (convert_selavpr writes the backbone there), so the folder can move."""
    conf = dict(conf)
    for key in cls.weight_source_keys:
        source = conf.get(key)
        if isinstance(source, str) and not Path(source).is_absolute():
            if (folder / source).is_file():
                conf[key] = str((folder / source).resolve())
    return conf


def save_model(model: VprModel, out_dir: str | os.PathLike) -> Path:
    """Write ``model.json`` + ``model.safetensors`` so ``load_model(out_dir)`` rebuilds it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    conf = model.export_conf()
    conf['name'] = model.name
    state = {k: v.detach().contiguous() for k, v in model.export_state_dict().items()}
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        save_file(state, str(Path(tmp) / EXPORT_WEIGHTS_FILE))
        (Path(tmp) / EXPORT_CONF_FILE).write_text(json.dumps(conf, indent=2, sort_keys=True))
        os.replace(Path(tmp) / EXPORT_WEIGHTS_FILE, out_dir / EXPORT_WEIGHTS_FILE)
        os.replace(Path(tmp) / EXPORT_CONF_FILE, out_dir / EXPORT_CONF_FILE)
    return out_dir


__all__ = [
    'CONFS',
    'DEFAULT_MODEL',
    'MODEL_CLASSES',
    'ModelIdentity',
    'VprModel',
    'available_models',
    'load_model',
    'register_model_class',
    'save_model',
]
