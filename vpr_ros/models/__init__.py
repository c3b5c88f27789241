"""The model registry: named configurations, model classes, export and load by path.

``load_model(name_or_path)`` is the one factory build_map, relocalize and evaluate use.
A name picks an entry of ``CONFS``; a path names a directory written by ``save_model``
(``model.json`` + ``model.safetensors``), which is how trained (SelaVPR) and pruned
models plug in.

What is loaded is checked before it is used: ``model.json`` must be a JSON object in UTF-8
with a known model class, a timm backbone name and input sizes within bounds; the weights
must be finite and fit the architecture exactly. Backbones named on a hub (``hf-hub:...``)
are refused unless downloads are allowed (``VPR_ROS_ALLOW_DOWNLOADS=1``, or SelaVPR's
``backbone_weights: download``), so nothing waits on the network by surprise.

Importing this package is cheap: the model classes (torch, timm) are imported when a model
is built, so commands answer ``--help`` and argument errors without loading them.
"""

from __future__ import annotations

import importlib
import json
import os
import re
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

ALLOW_DOWNLOADS_ENV = 'VPR_ROS_ALLOW_DOWNLOADS'
"""Set to 1 to let models fetch backbones from a hub (otherwise they are refused)."""

MAX_INPUT_SIDE = 4096
"""Largest model input side (px) a configuration may ask for."""

_TIMM_NAME = re.compile(r'^[a-z0-9_.]+$')
_MAX_EXPORT_CONF_BYTES = 1 << 20


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
        check_model_conf(conf, f'model {key!r}')
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


def downloads_allowed(conf: dict[str, Any] | None = None) -> bool:
    """Whether a model may fetch from a hub: ``VPR_ROS_ALLOW_DOWNLOADS=1``, or a SelaVPR
    configuration that asks for downloaded backbone weights."""
    if os.environ.get(ALLOW_DOWNLOADS_ENV, '') == '1':
        return True
    return conf is not None and conf.get('backbone_weights') == DOWNLOAD_WEIGHTS


def check_model_conf(conf: Any, source: str) -> None:
    """Refuse a model configuration that would fail late, hang or exhaust memory.

    Checked: a mapping with a known ``model`` class; ``backbone`` a timm model name (a hub
    name only when downloads are allowed); ``preprocessing.size`` two sides in
    1..``MAX_INPUT_SIDE``; ``local_stage`` a small non-negative integer;
    ``backbone_kwargs`` small numbers.

    Raises:
        ModelError: naming ``source``, the value and the fix.
    """

    def refuse(what: str) -> ModelError:
        return ModelError(f'{source}: {what}; fix it or export the model again')

    if not isinstance(conf, dict):
        raise refuse(f'the configuration is a {type(conf).__name__}, not a JSON object')
    if conf.get('model', 'cnn') not in MODEL_CLASSES:
        known = sorted(MODEL_CLASSES)
        raise refuse(f'unknown model class {conf.get("model")!r} (known: {known})')
    backbone = conf.get('backbone')
    if backbone is not None:
        if not isinstance(backbone, str) or not backbone:
            raise refuse(f'backbone {backbone!r} is not a timm model name')
        if not _TIMM_NAME.match(backbone):
            if not downloads_allowed(conf):
                raise refuse(
                    f'backbone {backbone!r} is not a local timm model name (a hub name would '
                    f'be downloaded; set {ALLOW_DOWNLOADS_ENV}=1 to allow that)'
                )
    size = (conf.get('preprocessing') or {}).get('size')
    if size is not None and (
        not isinstance(size, list)
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in size)
        or not all(1 <= v <= MAX_INPUT_SIDE for v in size)
    ):
        raise refuse(f'preprocessing size {size!r} must be [height, width] in 1..{MAX_INPUT_SIDE}')
    stage = conf.get('local_stage')
    if stage is not None and (
        not isinstance(stage, int) or isinstance(stage, bool) or not 0 <= stage <= 16
    ):
        raise refuse(f'local_stage {stage!r} must be a backbone stage index (0, 1, 2, ...)')
    kwargs = conf.get('backbone_kwargs')
    if kwargs is not None and (
        not isinstance(kwargs, dict)
        or not all(
            isinstance(v, (int, float, bool)) and abs(v) <= MAX_INPUT_SIDE for v in kwargs.values()
        )
    ):
        raise refuse(
            f'backbone_kwargs {kwargs!r} must map names to numbers up to {MAX_INPUT_SIDE}'
        )


def read_export_conf(conf_file: Path) -> dict[str, Any]:
    """``model.json``, checked (see ``check_model_conf``).

    Raises:
        ModelError: unreadable, not UTF-8, not JSON, not an object, or a bad value.
    """
    try:
        if conf_file.stat().st_size > _MAX_EXPORT_CONF_BYTES:
            raise ModelError(f'model configuration {str(conf_file)!r} is too large')
        conf = json.loads(conf_file.read_bytes().decode('utf-8'))
    except UnicodeDecodeError as err:
        msg = (
            f'model configuration {str(conf_file)!r} is not UTF-8 text ({err.reason} at byte '
            f'{err.start}); export the model again'
        )
        raise ModelError(msg) from err
    except (OSError, json.JSONDecodeError, RecursionError) as err:
        raise ModelError(f'cannot read model configuration {str(conf_file)!r}: {err}') from err
    check_model_conf(conf, f'model configuration {str(conf_file)!r}')
    assert isinstance(conf, dict)
    return conf


def load_exported(path: Path) -> VprModel:
    """Load a directory written by ``save_model``.

    Raises:
        ModelError: a bad ``model.json``, unreadable or non-finite weights, or weights
            that do not fit the configuration (extra or missing tensors, wrong shapes).
    """
    from safetensors.torch import load_file

    from vpr_ros.models.weights import check_finite

    conf_file = path / EXPORT_CONF_FILE if path.is_dir() else path
    weights_file = conf_file.parent / EXPORT_WEIGHTS_FILE
    conf = read_export_conf(conf_file)
    if not weights_file.is_file():
        raise ModelError(f'model {str(path)!r} has no {EXPORT_WEIGHTS_FILE}')
    try:
        state = load_file(str(weights_file))
    except Exception as err:
        raise ModelError(f'cannot read weights {str(weights_file)!r}: {err}') from err
    check_finite(state, str(weights_file))
    cls = model_class(conf)
    try:
        model = cls.from_export(_resolve_weight_sources(cls, conf, conf_file.parent), state)
    except (ModelError, ConfigError) as err:
        if str(path) in str(err):
            raise
        raise type(err)(f'model {str(path)!r}: {err}') from err
    except (RuntimeError, KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
        detail = ' '.join(str(err).split())[:300]
        msg = (
            f'model {str(path)!r}: {EXPORT_WEIGHTS_FILE} does not fit {EXPORT_CONF_FILE} '
            f'({type(err).__name__}: {detail}); export the model again with save_model'
        )
        raise ModelError(msg) from err
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
    # ONNX exports beside the model were made from the weights being replaced.
    for stale in ('model.onnx', 'model.int8.onnx'):
        (out_dir / stale).unlink(missing_ok=True)
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
