"""SelaVPR: a frozen DINOv2 ViT with global and local adapters (Lu et al., ICLR 2024).

"Towards Seamless Adaptation of Pre-trained Models for Visual Place Recognition".

- Global adaptation: every timm ``Block`` of the frozen backbone gets a serial adapter after
  multi-head attention (``ls1(adapter1(attn(norm1(x))))``, a bottleneck MLP with a skip
  connection) and a parallel adapter beside the MLP (``ls2(mlp(n) + 0.2 * adapter2(n))``
  with ``n = norm2(x)``). The adapters hang on the blocks as ``adapter1``/``adapter2`` and
  act through forward hooks on ``attn`` and ``mlp``, so the backbone's own parameter names
  are timm's. They start as the official code starts them: down-projections truncated
  normal (std 0.02), up-projections and all biases zero, so an untrained model is the
  frozen backbone.
- Position embedding: DINOv2 keeps it on the 37x37 grid it was trained at (518 px) and
  interpolates it to the input's patch grid at run time (bicubic, with
  ``interpolate_offset`` 0.1 in the scale factor). The interpolation depends only on the
  grid, which is fixed by the configured input size, so it is done once when the weights
  load (``dinov2_pos_embed``), with exactly DINOv2's formula, not timm's resampling.
- Local adaptation: two stride-2 transposed convolutions on the patch-token map
  (ViT-L: 1024 -> 256 -> 128 channels; 16x16 patches -> 61x61 for a 224x224 input).
- Global descriptor: GeM over the (per-token L2-normalised) patch-token map.

Only the adapters, the local head and GeM's ``p`` train; ``save_model`` stores just those
(plus the configuration, which names the backbone weights file).
"""

from __future__ import annotations

import importlib
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from vpr_ros import logger
from vpr_ros.errors import ConfigError, ModelError
from vpr_ros.models import DOWNLOAD_WEIGHTS, RANDOM_WEIGHTS
from vpr_ros.models.aggregation import DEFAULT_AGGREGATION, build_aggregator
from vpr_ros.models.base import VprModel
from vpr_ros.models.weights import read_state_dict


class Adapter(nn.Module):
    """Bottleneck MLP (down, ReLU, up) with an optional skip connection.

    Initialised as in the official SelaVPR code: the ViT's init gives every linear layer a
    truncated normal weight (std 0.02) and a zero bias, then training zeroes ``D_fc2``
    (our ``up``), so the adapter starts as the identity (serial) or as 0 (parallel).

    Args:
        dim: token dimension.
        ratio: hidden size as a fraction of ``dim``.
        skip: add the input to the output (serial adapter) or not (parallel adapter).
        scale: factor on the output when used as a parallel adapter.
    """

    def __init__(self, dim: int, ratio: float = 0.5, *, skip: bool, scale: float = 1.0) -> None:
        super().__init__()
        hidden = max(1, int(dim * ratio))
        self.skip = skip
        self.scale = float(scale)
        self.down = nn.Linear(dim, hidden)
        self.act = nn.ReLU()
        self.up = nn.Linear(hidden, dim)
        nn.init.trunc_normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.up(self.act(self.down(x)))
        return x + out if self.skip else out

    def serial_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on ``attn``: adapt the attention output."""
        return self(output)

    def parallel_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on ``mlp``: add the scaled adapter branch of the MLP's input."""
        return output + self.scale * self(args[0])


# DINOv2's ``interpolate_offset``: added to the target grid in the scale factor of its
# bicubic position-embedding interpolation (facebookresearch/dino issue 8).
DINOV2_INTERPOLATE_OFFSET = 0.1


def dinov2_pos_embed(
    pos_embed: torch.Tensor,
    grid: tuple[int, int],
    *,
    prefix_tokens: int = 1,
    offset: float = DINOV2_INTERPOLATE_OFFSET,
    source: str = '',
) -> torch.Tensor:
    """A stored position embedding on the patch grid ``grid``, as DINOv2 makes it at run time.

    DINOv2 (``interpolate_pos_encoding``) keeps the embedding of its M x M training grid
    and, for an input with an h x w patch grid, returns it unchanged when h = w = M, or
    else resizes it bicubically (no antialiasing) with the scale factors
    ``((h + offset) / M, (w + offset) / M)``; with ``offset`` 0 it asks for the size
    (h, w) instead. The scale factors, not only the output size, set where the samples
    fall, so this differs from resizing to (h, w) (timm's ``resample_abs_pos_embed``).

    Args:
        pos_embed: (1, prefix_tokens + M * M, C) as stored; an embedding already on the
            h x w grid (not square) is returned as it is.
        grid: (h, w), the patch grid of the input.
        prefix_tokens: rows before the patch grid (the class token's), kept as they are.
        offset: DINOv2's ``interpolate_offset``.
        source: the weights file, for error messages.

    Returns:
        (1, prefix_tokens + h * w, C), in the dtype of ``pos_embed`` (computed in float32).

    Raises:
        ModelError: the patch rows form neither a square grid nor the h x w grid.
    """
    h, w = (int(n) for n in grid)
    prefix, patch = pos_embed[:, :prefix_tokens], pos_embed[:, prefix_tokens:]
    count, dim = int(patch.shape[1]), int(patch.shape[2])
    side = math.isqrt(count)
    if side * side != count:
        if count == h * w:
            return pos_embed
        msg = (
            f'position embedding of {source!r} has {count} patch positions: neither a square '
            f'grid nor the {h}x{w} grid of this input size'
        )
        raise ModelError(msg)
    if (h, w) == (side, side):
        return pos_embed
    square = patch.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if offset:
        scale = ((h + offset) / side, (w + offset) / side)
        resized = F.interpolate(square, scale_factor=scale, mode='bicubic', antialias=False)
    else:
        resized = F.interpolate(square, size=(h, w), mode='bicubic', antialias=False)
    if tuple(resized.shape[-2:]) != (h, w):  # offsets of 1 or more change the size
        msg = f'interpolate_offset {offset!r} gives a {tuple(resized.shape[-2:])} grid'
        raise ModelError(msg)
    patch = resized.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(pos_embed.dtype)
    return torch.cat([prefix, patch], dim=1)


class LocalHead(nn.Module):
    """Stride-2 transposed convolutions (kernel 3, padding 1) with ReLU between them.

    Each one maps an s x s map to (2s - 1) x (2s - 1); no layers leaves the patch map as is.
    """

    def __init__(self, in_channels: int, channels: list[int]) -> None:
        super().__init__()
        convs = []
        for out_channels in channels:
            convs.append(nn.ConvTranspose2d(in_channels, out_channels, 3, stride=2, padding=1))
            in_channels = out_channels
        self.upconvs = nn.ModuleList(convs)
        self.out_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.upconvs):
            x = conv(x)
            if i < len(self.upconvs) - 1:
                x = F.relu(x)
        return x


def _is_trainable_name(name: str) -> bool:
    return '.adapter1.' in name or '.adapter2.' in name or not name.startswith('backbone.')


class SelaVpr(VprModel):
    """DINOv2 + SelaVPR global adapters, up-convolution local head and GeM."""

    backbone: VisionTransformer
    local_head: LocalHead
    aggregation: nn.Module

    default_conf = {
        'model': 'selavpr',
        'name': 'selavpr',
        # A timm DINOv2 ViT: vit_{small,base,large}_patch14_dinov2 or ..._reg4_dinov2.
        'backbone': 'vit_large_patch14_dinov2',
        # Extra timm arguments (depth, embed_dim, num_heads: small test models).
        'backbone_kwargs': {},
        # A local file (official DINOv2 or timm layout), 'download' (timm fetches them),
        # 'random' (untrained, for tests) or None (an error that says what to pass).
        'backbone_weights': None,
        # Seed of every random initialisation (adapters, head, a 'random' backbone), so a
        # configuration always builds the same model.
        'seed': 0,
        'adapter_ratio': 0.5,
        'parallel_scale': 0.2,
        # Output channels of the stride-2 transposed convolutions of the local head.
        'local_channels': [256, 128],
        # [h, w]: average-pool the local map to this size (None keeps 4 * grid - 3).
        'local_size': None,
        # L2-normalise each patch token before GeM (as the published model does).
        'normalize_tokens': True,
        'aggregation': dict(DEFAULT_AGGREGATION),
        'preprocessing': {'size': [224, 224]},
    }

    weight_source_keys = ('backbone_weights',)

    def _init(self, conf: dict) -> None:
        if conf['backbone_weights'] is None:
            msg = (
                f'SelaVPR model {self.name!r} needs DINOv2 backbone weights and none were '
                "given: set 'backbone_weights' to a local file (the official "
                f'dinov2_vit?14_pretrain.pth or a timm {conf["backbone"]} state dict), '
                f"'{DOWNLOAD_WEIGHTS}' to let timm fetch them, or '{RANDOM_WEIGHTS}' for an "
                "untrained test model, e.g. load_model(name, {'backbone_weights': PATH})"
            )
            raise ModelError(msg)
        size = tuple(int(s) for s in conf['preprocessing']['size'])
        if len(size) != 2 or any(s <= 0 or s % 14 for s in size):
            msg = (
                f'SelaVPR input size {list(size)!r} must be two positive multiples of 14 '
                '(the DINOv2 patch size), e.g. [224, 224]'
            )
            raise ConfigError(msg)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(conf['seed']))
            self.backbone = self._create_backbone(conf, size)
            dim = self.backbone.embed_dim
            for block in self.backbone.blocks:
                serial = Adapter(dim, conf['adapter_ratio'], skip=True)
                parallel = Adapter(
                    dim, conf['adapter_ratio'], skip=False, scale=conf['parallel_scale']
                )
                block.adapter1, block.adapter2 = serial, parallel
                block.get_submodule('attn').register_forward_hook(serial.serial_hook)
                block.get_submodule('mlp').register_forward_hook(parallel.parallel_hook)
            self.local_head = LocalHead(dim, [int(c) for c in conf['local_channels']])
            self.aggregation = build_aggregator(conf['aggregation'], dim)
        self._load_backbone_weights(conf['backbone_weights'])
        for name, param in self.named_parameters():
            param.requires_grad_(_is_trainable_name(name))

    def _create_backbone(self, conf: dict, size: tuple[int, int]) -> VisionTransformer:
        name = conf['backbone']
        if 'dinov2' not in name:
            msg = f'SelaVPR backbone {name!r} is not a timm DINOv2 ViT (vit_*_patch14_dinov2)'
            raise ConfigError(msg)
        try:
            backbone = timm.create_model(
                name,
                pretrained=False,
                num_classes=0,
                global_pool='',
                img_size=size,
                **conf['backbone_kwargs'],
            )
        except RuntimeError as err:
            raise ModelError(f'cannot create SelaVPR backbone {name!r}: {err}') from err
        if not isinstance(backbone, VisionTransformer):
            raise ConfigError(f'SelaVPR backbone {name!r} is not a timm VisionTransformer')
        return backbone

    def _load_backbone_weights(self, source: str | None) -> None:
        if source == RANDOM_WEIGHTS:
            return
        if source == DOWNLOAD_WEIGHTS:
            # timm fetches the weights at their own 518 px grid; they are then loaded like
            # a file, so the position embedding is interpolated as DINOv2 does it.
            name = self.conf['backbone']
            try:
                pretrained = timm.create_model(
                    name,
                    pretrained=True,
                    num_classes=0,
                    global_pool='',
                    **self.conf['backbone_kwargs'],
                )
            except Exception as err:
                raise ModelError(f'cannot download {name!r} weights with timm: {err}') from err
            self.load_backbone_state(pretrained.state_dict(), f'timm {name}')
            return
        assert source is not None, '_init refuses a model without backbone weights'
        try:
            state = read_state_dict(source)
        except FileNotFoundError as err:
            msg = f'DINOv2 backbone weights {str(source)!r} of {self.name!r} do not exist: {err}'
            raise ModelError(msg) from err
        self.load_backbone_state(state, str(source))

    def load_backbone_state(self, state: dict[str, torch.Tensor], source: str = '') -> None:
        """Load DINOv2 weights (official or timm layout) into the frozen backbone.

        The position embedding is interpolated to this model's patch grid exactly as
        DINOv2 does it at run time (``dinov2_pos_embed``); timm then only renames keys.

        Raises:
            ModelError: a backbone tensor is missing or has the wrong shape.
        """
        state = {k.removeprefix('backbone.'): v for k, v in state.items()}
        if 'pos_embed' in state:
            state['pos_embed'] = dinov2_pos_embed(
                state['pos_embed'],
                self.patch_grid,
                prefix_tokens=self._stored_prefix_tokens(state),
                source=source,
            )
        try:
            state = checkpoint_filter_fn(dict(state), self.backbone, antialias=False)
        except Exception as err:
            raise ModelError(f'cannot convert backbone weights {source!r}: {err}') from err
        target = self.backbone.state_dict()
        needed = {k for k in target if '.adapter1.' not in k and '.adapter2.' not in k}
        missing = sorted(needed - set(state))
        if missing:
            msg = (
                f'backbone weights {source!r} lack {len(missing)} tensors of '
                f'{self.conf["backbone"]!r}, e.g. {missing[:3]}; is it the right DINOv2 size?'
            )
            raise ModelError(msg)
        for key in needed:
            if tuple(state[key].shape) != tuple(target[key].shape):
                msg = (
                    f'backbone weights {source!r}: {key!r} has shape {tuple(state[key].shape)}, '
                    f'{self.conf["backbone"]!r} needs {tuple(target[key].shape)}'
                )
                raise ModelError(msg)
        ignored = sorted(set(state) - set(target))
        if ignored:
            logger.debug('backbone weights %s: ignoring %d tensors', source, len(ignored))
        known = {k: state[k] for k in set(state) & set(target)}
        self.backbone.load_state_dict(known, strict=False)
        self.invalidate_identity()

    def _stored_prefix_tokens(self, state: dict[str, torch.Tensor]) -> int:
        """Position-embedding rows before the patch grid in a state dict: the class token's
        in the official DINOv2 layout (with or without registers); in timm's layout, the
        ones this timm model has (none for the register variants: ``no_embed_class``)."""
        if 'mask_token' in state or 'register_tokens' in state:
            return 1
        return 0 if self.backbone.no_embed_class else int(self.backbone.num_prefix_tokens)

    @property
    def global_dim(self) -> int:
        return int(self.backbone.embed_dim)

    @property
    def local_dim(self) -> int:
        return int(self.local_head.out_channels)

    @property
    def patch_grid(self) -> tuple[int, int]:
        """Patch-token map size (h, w) for the configured input size."""
        grid_h, grid_w = self.backbone.patch_embed.grid_size
        return int(grid_h), int(grid_w)

    @property
    def local_map_size(self) -> tuple[int, int]:
        """Local feature map size (h, w) for the configured input size."""
        if self.conf['local_size']:
            size_h, size_w = self.conf['local_size']
            return int(size_h), int(size_w)
        h, w = self.patch_grid
        for _ in self.local_head.upconvs:
            h, w = 2 * h - 1, 2 * w - 1
        return h, w

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised patch tokens of the (adapted) backbone as a map (B, C, h, w)."""
        tokens = self.backbone.forward_features(images)[:, self.backbone.num_prefix_tokens :]
        patch_h, patch_w = self.backbone.patch_embed.patch_size
        h, w = images.shape[-2] // patch_h, images.shape[-1] // patch_w
        # images.shape[0], not len(images): the ONNX export's batch size stays free.
        return tokens.transpose(1, 2).reshape(images.shape[0], -1, h, w)

    def _forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.patch_tokens(images)
        pooled_in = F.normalize(tokens, dim=1) if self.conf['normalize_tokens'] else tokens
        local = self.local_head(tokens)
        if self.conf['local_size']:
            local = F.adaptive_avg_pool2d(local, tuple(self.conf['local_size']))
        return {'global_descriptor': self.aggregation(pooled_in), 'local_features': local}

    def export_conf(self) -> dict:
        """The configuration, with a backbone weights path made absolute."""
        conf = super().export_conf()
        source = conf.get('backbone_weights')
        if source not in (None, RANDOM_WEIGHTS, DOWNLOAD_WEIGHTS):
            conf['backbone_weights'] = str(Path(source).expanduser().resolve())
        return conf

    def trainable_names(self) -> list[str]:
        """Names of the parameters that train: adapters, local head, GeM's p."""
        return [name for name, p in self.named_parameters() if p.requires_grad]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters that train (see ``trainable_names``)."""
        return [p for p in self.parameters() if p.requires_grad]

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable tensors only; the backbone comes from ``backbone_weights``."""
        names = set(self.trainable_names())
        return {k: v for k, v in self.state_dict().items() if k in names}

    @classmethod
    def from_export(cls, conf: dict, state_dict: dict[str, torch.Tensor]) -> SelaVpr:
        """Rebuild from ``model.json`` (naming the backbone weights) + trainable tensors.

        A full state dict (backbone included) is accepted too; then the backbone file is
        not read.
        """
        has_backbone = any(k.startswith('backbone.patch_embed.') for k in state_dict)
        build_conf = {**conf, 'backbone_weights': RANDOM_WEIGHTS} if has_backbone else conf
        model = cls(build_conf, name=conf.get('name'))
        expected = set(model.state_dict()) if has_backbone else set(model.trainable_names())
        missing = sorted(expected - set(state_dict))
        unexpected = sorted(set(state_dict) - set(model.state_dict()))
        if missing or unexpected:
            msg = (
                f'SelaVPR weights do not fit the configuration: missing {missing[:3]}, '
                f'unexpected {unexpected[:3]}; was it saved from a different variant?'
            )
            raise ModelError(msg)
        try:
            model.load_state_dict(state_dict, strict=False)
        except RuntimeError as err:
            raise ModelError(f'SelaVPR weights do not fit the configuration: {err}') from err
        model.conf['backbone_weights'] = conf.get('backbone_weights')
        model.invalidate_identity()
        return model


# Official SelaVPR checkpoint (github.com/Lu-Feng/SelaVPR): a DataParallel state dict.
_OFFICIAL_PREFIX = 'module.'
_OFFICIAL_ADAPTER = re.compile(
    r'^backbone\.blocks\.(\d+)\.adapter([12])\.D_fc([12])\.(weight|bias)$'
)
_OFFICIAL_HEAD = re.compile(r'^LocalAdapt\.upconv(\d+)\.(weight|bias)$')
_OFFICIAL_GEM = 'aggregation.1.p'
_BACKBONES_BY_DIM = {384: 'small', 768: 'base', 1024: 'large'}


def read_selavpr_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a published SelaVPR checkpoint with ``torch.load(weights_only=True)``.

    The files hold ``{'model_state_dict': ..., 'optimizer_state_dict': ..., 'recalls':
    numpy array, ...}``; numpy arrays and scalars (and nothing else) are allowed in the
    unpickler besides tensors.

    Returns:
        The model state dict (keys as published, ``module.`` prefix kept).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'SelaVPR checkpoint {str(path)!r} does not exist')
    allowed = []
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # not a zip checkpoint: let torch.load report it
        names = []
    for name in names:
        obj = _numpy_global(name)
        if obj is None:
            msg = (
                f'SelaVPR checkpoint {str(path)!r} pickles {name!r}, which is neither a tensor '
                'nor numpy data; refusing to unpickle it (re-save its model_state_dict)'
            )
            raise ModelError(msg)
        allowed.append(obj)
    if allowed:  # numpy data: its dtype classes are reached without being listed
        allowed += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith('DType')]
    try:
        with torch.serialization.safe_globals(allowed):
            data = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:
        raise ModelError(f'cannot read SelaVPR checkpoint {str(path)!r}: {err}') from err
    if isinstance(data, dict) and isinstance(data.get('model_state_dict'), dict):
        data = data['model_state_dict']
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        msg = f'{str(path)!r} is not a SelaVPR checkpoint (no model_state_dict of tensors)'
        raise ModelError(msg)
    return data


def _numpy_global(name: str) -> Any:
    """The numpy object a checkpoint's pickle names, if it is plain numpy data."""
    module_name, _, attr = name.rpartition('.')
    plain = {
        'numpy.core.multiarray': {'_reconstruct', 'scalar'},
        'numpy._core.multiarray': {'_reconstruct', 'scalar'},
        'numpy': {'ndarray', 'dtype'},
    }
    if module_name == 'numpy.dtypes' and attr.endswith('DType'):
        return getattr(np.dtypes, attr, None)
    if attr not in plain.get(module_name, set()):
        return None
    if module_name == 'numpy':
        return getattr(np, attr)
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        return None


def convert_selavpr_state(
    state: dict[str, torch.Tensor],
) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a published SelaVPR state dict into our layout.

    Args:
        state: ``model_state_dict`` of an official checkpoint (``module.`` prefixes optional).

    Returns:
        ``(conf, trainable, backbone)``: the SelaVPR configuration overrides matching the
        checkpoint (backbone variant, local channels), the trainable tensors under our names
        (``backbone.blocks.N.adapterK.{down,up}``, ``local_head.upconvs.I``,
        ``aggregation.p``) and the frozen DINOv2 backbone in the official DINOv2 layout.

    Raises:
        ModelError: the state dict is not in the published layout.
    """
    state = {k.removeprefix(_OFFICIAL_PREFIX): v for k, v in state.items()}
    if 'backbone.cls_token' not in state or _OFFICIAL_GEM not in state:
        msg = (
            "not a SelaVPR state dict: expected 'module.backbone.cls_token' and "
            f"'module.{_OFFICIAL_GEM}', got keys like {sorted(state)[:4]}"
        )
        raise ModelError(msg)
    trainable: dict[str, torch.Tensor] = {'aggregation.p': state[_OFFICIAL_GEM].reshape(1)}
    backbone: dict[str, torch.Tensor] = {}
    head: dict[int, int] = {}
    for key, value in state.items():
        if match := _OFFICIAL_ADAPTER.match(key):
            block, adapter, fc, kind = match.groups()
            layer = 'down' if fc == '1' else 'up'
            trainable[f'backbone.blocks.{block}.adapter{adapter}.{layer}.{kind}'] = value
        elif match := _OFFICIAL_HEAD.match(key):
            index, kind = int(match.group(1)), match.group(2)
            trainable[f'local_head.upconvs.{index - 1}.{kind}'] = value
            if kind == 'weight':
                head[index] = int(value.shape[1])
        elif key.startswith('backbone.'):
            backbone[key.removeprefix('backbone.')] = value
        elif key != _OFFICIAL_GEM:
            raise ModelError(f'unexpected tensor {key!r} in the SelaVPR state dict')
    dim = int(backbone['cls_token'].shape[-1])
    if dim not in _BACKBONES_BY_DIM:
        raise ModelError(f'SelaVPR backbone width {dim} is not ViT-S/B/L (384, 768, 1024)')
    registers = '_reg4' if 'register_tokens' in backbone else ''
    depth = 1 + max(int(k.split('.')[1]) for k in backbone if k.startswith('blocks.'))
    conf: dict[str, Any] = {
        'model': 'selavpr',
        'backbone': f'vit_{_BACKBONES_BY_DIM[dim]}_patch14{registers}_dinov2',
        'local_channels': [head[i] for i in sorted(head)],
    }
    if depth != {384: 12, 768: 12, 1024: 24}[dim]:
        conf['backbone_kwargs'] = {'depth': depth}
    return conf, trainable, backbone
