"""Structured pruning of CNN place-recognition models (Grainge et al., "Structured Pruning
for Efficient Visual Place Recognition").

Whole channels are removed with torch-pruning's dependency graph, so a filter pruned in
the backbone also goes from every layer that reads it: from the aggregation layer and,
where the descriptor is built from the final feature map (GeM), from the descriptor
itself. The model, the map (D floats per place), extraction and matching all shrink.

- **Schedule**: iterative; the backbone's channel sparsity rises linearly to
  ``sparsity`` over ``steps`` steps (``sparsity_schedule``).
- **Gamma** (the paper's): the *final* sparsity of the descriptor layers (the
  aggregation's output convolutions / linear layers, e.g. the projection after GeM, or
  for a bare GeM the backbone layer whose channels GeM pools), reached on the same linear
  schedule as the backbone: after step k of n they have lost ``gamma * k / n`` of their
  output channels, so the descriptor dimension D ends at ``(1 - gamma) * D``. Gamma 0
  keeps D; gamma is independent of ``sparsity``.
- **Importance**: L1 or L2 filter magnitude, or first-order Taylor (|w * dL/dw|, which
  needs a loss, so place-labelled images).
- **Recovery** (optional, between steps; ``prune_with_recovery``): batch-norm
  re-estimation and fine-tuning, from ``vpr_ros.learning.finetune``.
- **Export**: each step is a ``PrunedCnnVpr`` that ``models.save_model`` writes as
  ``model.json`` + ``model.safetensors`` and ``models.load_model(path)`` rebuilds.

``vpr_ros.profiling`` measures what the pruning buys; ``benchmarks/pruning_report.py``
turns it into the paper's trade-off plots.

Importing this module does not import torch (``PruneConf`` builds the prune command's
flags); the functions do.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vpr_ros.config import Conf, option
from vpr_ros.errors import ConfigError

if TYPE_CHECKING:
    import torch_pruning as tp
    from torch import nn

    from vpr_ros.learning.finetune import FinetuneConf
    from vpr_ros.models.base import VprModel
    from vpr_ros.models.cnn import CnnVpr
    from vpr_ros.models.pruned import PrunedCnnVpr

IMPORTANCES = ('l1', 'l2', 'taylor')
# The largest final descriptor sparsity (gamma) accepted: D keeps at least 5 %.
MAX_SPARSITY = 0.95


# --------------------------------------------------------------------------------------
# Schedule, gamma, importance


def sparsity_schedule(final_sparsity: float, steps: int) -> list[float]:
    """Target sparsity after each step: rising linearly from ``final / steps`` to ``final``.

    Args:
        final_sparsity: fraction of channels removed after the last step, in [0, 1).
        steps: number of pruning steps, >= 1.

    Returns:
        ``steps`` values, the k-th being ``final_sparsity * k / steps``.
    """
    if not 0.0 <= final_sparsity < 1.0:
        msg = f'sparsity must be in [0, 1), got {final_sparsity!r}; 0.3 removes 30% of channels'
        raise ConfigError(msg)
    if int(steps) < 1:
        raise ConfigError(f'steps must be >= 1, got {steps!r}')
    return [final_sparsity * k / int(steps) for k in range(1, int(steps) + 1)]


def check_gamma(gamma: float) -> None:
    """Refuse a gamma that is not a final descriptor sparsity in [0, ``MAX_SPARSITY``].

    Raises:
        ConfigError: with the conversion from the multiplier gamma of earlier versions.
    """
    if not 0.0 <= gamma <= MAX_SPARSITY:
        msg = (
            f'gamma is the final sparsity of the descriptor layers and must be in '
            f'[0, {MAX_SPARSITY}], got {gamma!r} (0.25 removes a quarter of the descriptor '
            'dimension D); a multiplier m of the backbone sparsity s (earlier versions) is '
            'gamma = m * s'
        )
        raise ConfigError(msg)


def make_importance(name: str) -> tp.importance.Importance:
    """The torch-pruning channel importance called ``name`` (see ``IMPORTANCES``)."""
    import torch_pruning as tp

    if name == 'l1':
        return tp.importance.MagnitudeImportance(p=1)
    if name == 'l2':
        return tp.importance.MagnitudeImportance(p=2)
    if name == 'taylor':
        return tp.importance.TaylorImportance()
    raise ConfigError(f'unknown importance {name!r}; choose one of {IMPORTANCES}')


@dataclass(frozen=True)
class PruneConf(Conf):
    """How to prune (the prune command's pruning flags)."""

    sparsity: float = option(
        0.3, 'Fraction of backbone channels removed after the last step (below 1)', min=0.0
    )
    steps: int = option(3, 'Pruning steps (the sparsity rises linearly)', min=1)
    gamma: float = option(
        0.3,
        "Final sparsity of the descriptor layers (the paper's gamma), reached on the "
        "backbone's linear schedule: the descriptor dimension D ends at (1 - gamma) * D; "
        '0 keeps D',
    )
    importance: str = option(
        'l2',
        'Channel importance: filter L1/L2 magnitude, or first-order Taylor (needs '
        'place-labelled images: --train-data)',
        choices=IMPORTANCES,
    )
    round_to: int = option(
        0, 'Keep channel counts multiples of this, e.g. 8 for SIMD (0: exact ratios)', min=0
    )
    trace_size: list[int] = option(
        [64, 64],
        'Height and width of the dummy input that traces the layer graph',
        unit='px',
        min=1,
        length=2,
        cli=False,
    )

    def validate(self) -> None:
        sparsity_schedule(self.sparsity, self.steps)
        check_gamma(self.gamma)


@dataclass
class PruneStep:
    """The model after one pruning step (and its fine-tuning, if any): ``sparsity`` of
    the backbone and ``descriptor_sparsity`` of the descriptor layers after this step."""

    index: int
    sparsity: float
    descriptor_sparsity: float
    model: PrunedCnnVpr
    finetune_loss: float | None = None


# --------------------------------------------------------------------------------------
# Which layers are which


def _pass_through_types() -> tuple[type[nn.Module], ...]:
    """Modules that act on spatial positions only: channels pass through them unchanged
    (MixVPR's feature mixers and row projection)."""
    from vpr_ros.models.aggregation import FeatureMixer, RowProjection

    return (FeatureMixer, RowProjection)


def _prunable_types() -> tuple[type[nn.Module], ...]:
    from torch import nn

    return (nn.modules.conv._ConvNd, nn.Linear)


def _norm_types() -> tuple[type[nn.Module], ...]:
    from torch import nn

    return (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def _pass_through_pruner() -> tp.pruner.function.BasePruningFunc:
    """torch-pruning handler for the pass-through modules: channel pruning passes through
    them untouched."""
    import torch_pruning as tp

    class PassThroughPruner(tp.pruner.function.BasePruningFunc):
        def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            return layer

        prune_in_channels = prune_out_channels  # in and out channels are the same channels

        def get_out_channels(self, layer: nn.Module) -> None:
            return None

        def get_in_channels(self, layer: nn.Module) -> None:
            return None

    return PassThroughPruner()


def _inside_pass_through(model: nn.Module) -> set[int]:
    inside: set[int] = set()
    for module in model.modules():
        if isinstance(module, _pass_through_types()):
            inside.update(id(sub) for sub in module.modules())
    return inside


def head_layers(model: CnnVpr) -> list[nn.Module]:
    """The layers whose output channels make the descriptor, pruned to gamma.

    The aggregation's convolutions and linear layers (Conv-AP, MixVPR's channel
    projection, the projection after GeM); their input channels follow the backbone.
    For an aggregation without such layers (GeM, D = final channels), the
    backbone's last convolution producing the final feature map, which takes with it
    every layer coupled to those channels (e.g. a ResNet stage's residual stream).
    """
    from torch import nn

    inside = _inside_pass_through(model.aggregation)
    layers = [
        m
        for m in model.aggregation.modules()
        if isinstance(m, _prunable_types()) and id(m) not in inside
    ]
    if layers:
        return layers
    final = [
        m
        for m in model.backbone.modules()
        if isinstance(m, nn.modules.conv._ConvNd) and m.out_channels == model._final_dim
    ]
    if not final:
        msg = f'no backbone convolution outputs the {model._final_dim} final channels'
        raise ConfigError(msg)
    return [final[-1]]


def _unwrapped_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters outside convolution, linear and norm layers (GeM's p): never pruned."""
    inside = _inside_pass_through(model)
    kept = (*_prunable_types(), *_norm_types())
    params: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, kept) or id(module) in inside:
            continue
        params.extend(module.parameters(recurse=False))
    return params


def channel_counts(model: nn.Module) -> dict[str, int]:
    """Output channels of every convolution and linear layer, by module name."""
    import torch

    counts = {}
    for name, module in model.named_modules():
        weight = getattr(module, 'weight', None)
        if isinstance(module, _prunable_types()) and isinstance(weight, torch.Tensor):
            counts[name] = int(weight.shape[0])
    return counts


# --------------------------------------------------------------------------------------
# Pruning


def prune_with_recovery(
    model: VprModel,
    conf: PruneConf,
    *,
    calibrator: Callable[[VprModel], None] | None = None,
    train_data: str | os.PathLike[str] | None = None,
    finetune_conf: FinetuneConf | None = None,
) -> Iterator[PruneStep]:
    """``prune`` with the optional recoveries wired in: batch-norm re-estimation
    (``calibrator``, e.g. a ``learning.finetune.BatchNormCalibrator``), and fine-tuning on
    the place-labelled images in ``train_data`` (``learning.finetune.Finetuner``, which
    also gives Taylor importance its gradients). Inputs are checked at the call, as
    ``prune`` does."""
    from vpr_ros.learning.finetune import Finetuner

    finetuner = None
    if train_data is not None:
        finetuner = Finetuner(train_data, model, finetune_conf)
    return prune(
        model,
        conf,
        gradients=finetuner.accumulate_gradients if finetuner else None,
        calibrate=calibrator,
        finetune=finetuner if finetuner and finetuner.conf.iterations else None,
    )


def prune(
    model: VprModel,
    conf: PruneConf,
    *,
    gradients: Callable[[VprModel], None] | None = None,
    calibrate: Callable[[VprModel], None] | None = None,
    finetune: Callable[[VprModel, int], float | None] | None = None,
) -> Iterator[PruneStep]:
    """Prune a copy of ``model`` step by step: an iterator of each step's exportable model.

    The inputs are checked here, at the call, before any step runs; the steps run as the
    returned iterator is consumed.

    Args:
        model: a CNN model (``CnnVpr`` or an already pruned one); it is not modified.
        conf: sparsity, steps, gamma, importance.
        gradients: fills ``.grad`` of the working model before each step (needed by
            Taylor importance; e.g. ``Finetuner.accumulate_gradients``).
        calibrate: re-estimates batch-norm statistics after each step (and after its
            fine-tuning), e.g. ``BatchNormCalibrator``: removing a layer's input channels
            shifts its outputs, so the stored statistics no longer fit.
        finetune: trains the working model in place after each step (e.g. a
            ``Finetuner``), returning its mean loss or None.

    Returns:
        An iterator of ``PruneStep`` for steps 1..``conf.steps``; each holds an
        independent ``PrunedCnnVpr`` (rebuilt from the state dict, as ``load_model`` would).

    Raises:
        ConfigError: the model is not a CNN, or Taylor importance has no gradients.
    """
    from vpr_ros.models.cnn import CnnVpr

    if not isinstance(model, CnnVpr):
        msg = (
            f'structured pruning supports the CNN models (backbone + GeM/Conv-AP/MixVPR), '
            f'not {type(model).__name__!r} ({model.name!r})'
        )
        raise ConfigError(msg)
    if conf.importance == 'taylor' and gradients is None:
        msg = (
            'Taylor importance needs gradients of a loss: give place-labelled images '
            '(--train-data), or use --importance l1 / l2'
        )
        raise ConfigError(msg)
    return _prune_steps(model, conf, gradients, calibrate, finetune)


def _prune_steps(
    model: CnnVpr,
    conf: PruneConf,
    gradients: Callable[[VprModel], None] | None,
    calibrate: Callable[[VprModel], None] | None,
    finetune: Callable[[VprModel, int], float | None] | None,
) -> Iterator[PruneStep]:
    """The steps of ``prune`` (inputs already checked)."""
    work = copy.deepcopy(model).eval()
    work.invalidate_identity()
    heads = head_layers(work)
    schedule = sparsity_schedule(conf.sparsity, conf.steps)
    descriptor_schedule = sparsity_schedule(conf.gamma, conf.steps)
    with warnings.catch_warnings():  # GeM's p is ignored on purpose (ignored_layers)
        warnings.filterwarnings('ignore', message='Unwrapped parameters detected')
        pruner = _make_pruner(work, conf, heads)
    for index, (sparsity, descriptor) in enumerate(zip(schedule, descriptor_schedule), 1):
        if gradients is not None and conf.importance == 'taylor':
            work.zero_grad(set_to_none=True)
            gradients(work)
        pruner.step()
        work.zero_grad(set_to_none=True)
        if calibrate is not None:
            calibrate(work)
        loss = None
        if finetune is not None:
            loss = finetune(work, index)
            if calibrate is not None:
                calibrate(work)
        work.eval()
        record = {
            'source': model.name,
            'source_config': model.export_conf(),
            **conf.to_dict(),
            'step': index,
            'step_sparsity': sparsity,
            'step_descriptor_sparsity': descriptor,
            'finetuned': finetune is not None,
            'bn_recalibrated': calibrate is not None,
        }
        yield PruneStep(
            index=index,
            sparsity=sparsity,
            descriptor_sparsity=descriptor,
            model=snapshot(work, record),
            finetune_loss=loss,
        )


def _make_pruner(work: CnnVpr, conf: PruneConf, heads: list[nn.Module]) -> tp.pruner.BasePruner:
    """torch-pruning's pruner: the backbone to ``conf.sparsity`` and ``heads`` to
    ``conf.gamma``, each on the linear schedule (``_with_start``)."""
    import torch
    import torch_pruning as tp

    pass_through = _pass_through_pruner()
    return tp.pruner.BasePruner(
        work,
        torch.zeros(1, 3, *conf.trace_size),
        make_importance(conf.importance),
        pruning_ratio=conf.sparsity,
        pruning_ratio_dict={layer: conf.gamma for layer in heads},
        iterative_steps=conf.steps,
        iterative_pruning_ratio_scheduler=_with_start,
        ignored_layers=_unwrapped_parameters(work),
        round_to=conf.round_to or None,
        customized_pruners={cls: pass_through for cls in _pass_through_types()},
        forward_fn=lambda module, images: module(images),
        output_transform=lambda out: [out['global_descriptor'], out['local_features']],
    )


def _with_start(ratio: float, steps: int) -> list[float]:
    """torch-pruning's scheduler form: the sparsity before step 1 (0) and after each step."""
    return [0.0, *(ratio * k / steps for k in range(1, steps + 1))]


def snapshot(work: CnnVpr, record: dict[str, Any]) -> PrunedCnnVpr:
    """An independent ``PrunedCnnVpr`` with ``work``'s current (pruned) weights."""
    from vpr_ros.models.pruned import PrunedCnnVpr

    source_conf = record['source_config']
    conf = {
        **{k: v for k, v in source_conf.items() if k != 'pruning'},
        'model': 'pruned_cnn',
        'name': (
            f'{record["source"]}-pruned-s{record["step_sparsity"]:.2f}'
            f'-d{record["step_descriptor_sparsity"]:.2f}'
        ),
        'pruning': {k: v for k, v in record.items() if k != 'source_config'},
    }
    state = {k: v.detach().clone() for k, v in work.state_dict().items()}
    model = PrunedCnnVpr.from_export(conf, state)
    model.name = conf['name']
    return model.eval()  # type: ignore[return-value]


__all__ = [
    'IMPORTANCES',
    'PruneConf',
    'PruneStep',
    'channel_counts',
    'check_gamma',
    'head_layers',
    'make_importance',
    'prune',
    'prune_with_recovery',
    'snapshot',
    'sparsity_schedule',
]
