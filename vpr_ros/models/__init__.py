"""The model registry: named configurations, model classes, export and load by path.

``load_model(name_or_path)`` is the one factory build_map, relocalize and evaluate use.
A name picks an entry of ``CONFS``; a path names a directory written by ``save_model``
(``model.json`` + ``model.safetensors``), which is how trained (SelaVPR) and pruned
models plug in.

Importing this package is cheap: the model classes (torch, timm) are imported when a model
is built, so commands answer ``--help`` and argument errors without loading them.
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vpr_ros.errors import ConfigError, ModelError
from vpr_ros.models.identity import ModelIdentity

if TYPE_CHECKING:
    from vpr_ros.models.base import VprModel

# Model classes by the ``model`` key of a configuration, as 'module:Class' (imported lazily).
MODEL_CLASSES: dict[str, str] = {
    'cnn': 'vpr_ros.models.cnn:CnnVpr',
    'selavpr': 'vpr_ros.models.selavpr:SelaVpr',
    'pruned_cnn': 'vpr_ros.models.pruned:PrunedCnnVpr',
}

DEFAULT_MODEL = 'efficientnet_lite0_gem'

# SelaVPR backbone weight sources that are not file paths.
RANDOM_WEIGHTS = 'random'
DOWNLOAD_WEIGHTS = 'download'

_LITE0 = {'model': 'cnn', 'backbone': 'tf_efficientnet_lite0', 'weights': 'imagenet'}
_RANDOM_INIT = {'model': 'cnn', 'weights': None}


def _selavpr(backbone: str, **extra: Any) -> dict[str, Any]:
    return {'model': 'selavpr', 'backbone': backbone, **extra}


# Named configurations (hloc style): plain dicts, merged over the class defaults.
CONFS: dict[str, dict[str, Any]] = {
    # The embedded default: ImageNet EfficientNet-Lite0 (shipped weights), GeM, local
    # features from the stride-16 stage pooled by 2 (vpr_ros/models/cnn.py).
    'efficientnet_lite0_gem': {
        **_LITE0,
        'local_stage': 3,
        'local_pool': 2,
        'aggregation': {'name': 'gem', 'p': 3.0},
        'preprocessing': {'size': [240, 320]},
    },
    # More CNN models (backbone + GeM / Conv-AP / MixVPR), for pruning (vpr_ros.pruning).
    # Only EfficientNet-Lite0 has shipped ImageNet weights; the ResNets are random-init
    # until given a local weights file, and every Conv-AP / MixVPR layer is a seeded random
    # projection: none of them is place-trained.
    'efficientnet_lite0_convap': {
        **_LITE0,
        'aggregation': {'name': 'convap', 'out_channels': 256, 's1': 2, 's2': 2},
    },
    'efficientnet_lite0_mixvpr': {
        **_LITE0,
        'aggregation': {'name': 'mixvpr', 'out_channels': 256, 'in_h': 8, 'in_w': 10},
    },
    # GeM + a linear projection (the pruning paper's ResNet GeM variants): the pruner
    # shrinks D by pruning the projection's outputs. Untrained, the projection is a seeded
    # orthogonal map, so the Lite0 variant retrieves exactly as the default model does.
    'efficientnet_lite0_gem_linear': {
        **_LITE0,
        'local_stage': 3,
        'local_pool': 2,
        'aggregation': {'name': 'gem_linear'},
        'preprocessing': {'size': [240, 320]},
    },
    'resnet18_gem': {**_RANDOM_INIT, 'backbone': 'resnet18', 'aggregation': {'name': 'gem'}},
    'resnet18_gem_linear': {
        **_RANDOM_INIT,
        'backbone': 'resnet18',
        'aggregation': {'name': 'gem_linear'},
    },
    'resnet50_gem': {**_RANDOM_INIT, 'backbone': 'resnet50', 'aggregation': {'name': 'gem'}},
    'resnet50_gem_linear': {
        **_RANDOM_INIT,
        'backbone': 'resnet50',
        'aggregation': {'name': 'gem_linear'},
    },
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
    # SelaVPR (vpr_ros/models/selavpr.py). The DINOv2 weights are not shipped: pass
    # overrides={'backbone_weights': PATH} (or use a directory written by convert_selavpr
    # or train).
    'selavpr_vits14': _selavpr('vit_small_patch14_dinov2'),
    'selavpr_vitb14': _selavpr('vit_base_patch14_dinov2'),
    'selavpr_vitl14': _selavpr('vit_large_patch14_dinov2'),
    'selavpr_vits14_reg4': _selavpr('vit_small_patch14_reg4_dinov2'),
    'selavpr_vitb14_reg4': _selavpr('vit_base_patch14_reg4_dinov2'),
    'selavpr_vitl14_reg4': _selavpr('vit_large_patch14_reg4_dinov2'),
    # A tiny random-weight model (2 blocks, 64-d, 70x70 input, 17x17x16 local map) for
    # tests and pipeline checks; it recognises nothing. Layer scale starts at 1 (not
    # DINOv2's 1e-5) so that its random blocks, and their adapters, change the tokens.
    'selavpr_tiny_random': _selavpr(
        'vit_small_patch14_dinov2',
        backbone_kwargs={'depth': 2, 'embed_dim': 64, 'num_heads': 2, 'init_values': 1.0},
        backbone_weights=RANDOM_WEIGHTS,
        local_channels=[32, 16],
        preprocessing={'size': [70, 70]},
    ),
}

EXPORT_CONF_FILE = 'model.json'
EXPORT_WEIGHTS_FILE = 'model.safetensors'


def available_models() -> list[str]:
    return sorted(CONFS)


def model_class(conf: dict[str, Any]) -> type[VprModel]:
    """The class that builds ``conf`` (by its ``model`` key), imported now."""
    key = conf.get('model', 'cnn')
    if key not in MODEL_CLASSES:
        raise ConfigError(f'unknown model class {key!r}; known: {sorted(MODEL_CLASSES)}')
    module, _, name = MODEL_CLASSES[key].partition(':')
    cls: type[VprModel] = getattr(importlib.import_module(module), name)
    return cls


def load_model(
    name_or_path: str | os.PathLike[str], overrides: dict[str, Any] | None = None
) -> VprModel:
    """Build a model by registry name or from an exported directory, in eval mode."""
    from vpr_ros.models.base import merge_conf

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


def check_model_source(name_or_path: str | os.PathLike[str]) -> None:
    """Fail fast, before anything heavy is imported, on a model that is neither a registry
    name nor an existing path.

    Raises:
        ConfigError: with the registry names.
    """
    key = str(name_or_path)
    if key not in CONFS and not Path(key).exists():
        msg = f'unknown model {key!r}: neither a registry name {available_models()} nor a path'
        raise ConfigError(msg)


def load_exported(path: Path) -> VprModel:
    """Load a directory written by ``save_model``."""
    from safetensors.torch import load_file

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


def _resolve_weight_sources(
    cls: type[VprModel], conf: dict[str, Any], folder: Path
) -> dict[str, Any]:
    """A weight source stored as a relative path names a file inside the model folder
    (convert_selavpr writes the backbone there), so the folder can move."""
    conf = dict(conf)
    for key in cls.weight_source_keys:
        source = conf.get(key)
        if isinstance(source, str) and not Path(source).is_absolute():
            if (folder / source).is_file():
                conf[key] = str((folder / source).resolve())
    return conf


def save_model(model: VprModel, out_dir: str | os.PathLike[str]) -> Path:
    """Write ``model.json`` + ``model.safetensors`` so ``load_model(out_dir)`` rebuilds it."""
    from safetensors.torch import save_file

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


def __getattr__(name: str) -> Any:
    # ``from vpr_ros.models import VprModel`` without importing torch for everything else.
    if name == 'VprModel':
        from vpr_ros.models.base import VprModel

        return VprModel
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = [
    'CONFS',
    'DEFAULT_MODEL',
    'MODEL_CLASSES',
    'ModelIdentity',
    'VprModel',
    'available_models',
    'check_model_source',
    'load_model',
    'save_model',
]
