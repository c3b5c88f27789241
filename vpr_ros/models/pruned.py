"""Pruned CNN place-recognition models, rebuilt from their exported weights.

Structured pruning (``vpr_ros.pruning``) removes whole channels, so a pruned model has
the layers of its source architecture with fewer channels than timm builds by default.
``PrunedCnnVpr.from_export`` builds the unpruned architecture from the configuration,
then shrinks every layer, by module name, to the tensor shapes in the saved weights;
no module is pickled. The configuration keeps the source model's keys plus a
``pruning`` record (source, schedule, gamma, importance), which the identity's config
hash covers, so a map built with a pruned model is rejected by the unpruned one.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from vpr_ros.errors import ModelError
from vpr_ros.models.base import VprModel
from vpr_ros.models.cnn import CnnVpr

# Input size of the shape probe that reads the pruned dimensions (any size works: the
# aggregators pool adaptively).
_PROBE_SIZE = (64, 64)


class PrunedCnnVpr(CnnVpr):
    """A ``CnnVpr`` whose layers have fewer channels than the named timm backbone."""

    default_conf = {**CnnVpr.default_conf, 'model': 'pruned_cnn', 'pruning': {}}

    def _init(self, conf: dict) -> None:
        super()._init(conf)
        self._global_dim = super().global_dim

    @property
    def global_dim(self) -> int:
        return int(self._global_dim)

    @classmethod
    def from_export(cls, conf: dict, state_dict: dict[str, torch.Tensor]) -> VprModel:
        """Build the source architecture, shrink it to the saved shapes, load the weights."""
        conf = {**conf, **{key: None for key in cls.weight_source_keys}}
        model = cls(conf)
        shrink_to_state_dict(model, state_dict)
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as err:
            msg = (
                f'pruned weights do not fit the {conf.get("backbone")!r} architecture: {err}; '
                'export the model again with vpr_ros.models.save_model'
            )
            raise ModelError(msg) from err
        model.refresh_dims()
        model.conf = dict(conf)
        return model

    @torch.no_grad()
    def refresh_dims(self) -> None:
        """Read the global, final and local dimensions from one small forward pass."""
        was_training = self.training
        self.eval()
        probe = torch.zeros(1, 3, *_PROBE_SIZE)
        final, (local,) = self.backbone.forward_intermediates(probe, indices=[self.local_stage])
        self._final_dim = int(final.shape[1])
        self._local_dim = int(local.shape[1])
        self._global_dim = int(self.aggregation(final).shape[1])
        self.backbone.num_features = self._final_dim
        if not isinstance(getattr(type(self.aggregation), 'out_dim', None), property):
            setattr(self.aggregation, 'out_dim', self._global_dim)  # noqa: B010 (nn.Module attr)
        self.train(was_training)
        self.invalidate_identity()


def shrink_to_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Resize ``module``'s parameters and buffers to the shapes in ``state``, in place.

    Every tensor whose shape differs from the one of the same name in ``state`` is
    replaced by an uninitialised tensor of the saved shape, and the size attributes of
    its module are updated (convolutions: channels and groups; batch/layer/group norms;
    linear layers), so that ``load_state_dict(state)`` then succeeds.

    Args:
        module: the unpruned model.
        state: the pruned model's state dict.

    Returns:
        The names of the modules that were resized.

    Raises:
        ModelError: a resized tensor belongs to a module type whose size attributes are
            unknown.
    """
    resized: dict[str, nn.Module] = {}
    for name, tensor in state.items():
        owner_name, _, attr = name.rpartition('.')
        try:
            owner = module.get_submodule(owner_name) if owner_name else module
        except AttributeError:
            continue  # load_state_dict reports unexpected keys
        current = getattr(owner, attr, None)
        if not isinstance(current, torch.Tensor) or current.shape == tensor.shape:
            continue
        new = torch.empty(tensor.shape, dtype=current.dtype)
        if isinstance(current, nn.Parameter):
            setattr(owner, attr, nn.Parameter(new, requires_grad=current.requires_grad))
        else:
            owner._buffers[attr] = new
        resized.setdefault(owner_name, owner)
    for owner_name, owner in resized.items():
        _update_size_attributes(owner_name, owner)
    return list(resized)


def _update_size_attributes(name: str, module: nn.Module) -> None:
    """Make a module's size attributes agree with its (resized) tensors."""
    if isinstance(module, nn.modules.conv._ConvNd):
        out_channels, in_per_group = module.weight.shape[:2]
        depthwise = module.groups > 1 and module.groups == module.in_channels
        if depthwise:
            module.groups = out_channels
        module.out_channels = int(out_channels)
        module.in_channels = int(in_per_group * module.groups)
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        reference = module.weight if module.weight is not None else module.running_mean
        module.num_features = int(reference.shape[0])
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = (int(n) for n in module.weight.shape)
    elif isinstance(module, nn.LayerNorm):
        module.normalized_shape = tuple(int(n) for n in module.weight.shape)
    elif isinstance(module, nn.GroupNorm):
        module.num_channels = int(module.weight.shape[0])
    else:
        msg = (
            f'cannot resize module {name!r} of type {type(module).__name__!r}: '
            'only convolutions, norms and linear layers can be pruned'
        )
        raise ModelError(msg)
