"""Descriptor extraction, the seam between images and models: RGB images in, numpy
descriptors out, by torch or by ONNX Runtime.

* ``Extractor`` (protocol): ``extract(images) -> Descriptors``, the model's ``identity()``
  (what maps record and check), its ``input_size`` and its ``backend``;
* ``TorchExtractor``: a ``VprModel`` run by torch (training, pruning, export, and any model
  without an ONNX export);
* ``OnnxExtractor``: an ONNX export (``vpr_ros.models.onnx_export``, the ``export_onnx``
  command) run by ONNX Runtime; the export holds the model identity in its metadata, so a
  map is checked against it without torch;
* ``open_extractor(source, backend=...)``: the one factory. ``backend`` is one of
  ``BACKENDS``: ``'auto'`` (the default) runs ONNX Runtime when an export of the model
  exists (``find_onnx_export``) and fits, else torch; ``'onnxruntime'`` and ``'torch'``
  insist.

Where exports live: beside an exported model directory (``<dir>/model.onnx``); for registry
models in the cache (``$VPR_ROS_CACHE_DIR``, else ``$XDG_CACHE_HOME/vpr_ros``, else
``~/.cache/vpr_ros``: ``onnx/<name>.onnx``); or any ``.onnx`` file given as the model.

Importing this module imports neither torch nor onnxruntime; each backend imports its
library when it is built, so the ONNX Runtime path runs on an install without torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from vpr_ros import logger
from vpr_ros.errors import ConfigError, ModelError
from vpr_ros.models.identity import ModelIdentity
from vpr_ros.models.preprocessing import Preprocessing
from vpr_ros.runtime import set_num_threads

if TYPE_CHECKING:
    from vpr_ros.models.base import VprModel

AUTO, ONNXRUNTIME, TORCH = 'auto', 'onnxruntime', 'torch'
BACKENDS = (AUTO, ONNXRUNTIME, TORCH)
"""Extraction backends by name (``open_extractor``'s ``backend``)."""

ONNX_FILE = 'model.onnx'
"""An exported model directory's ONNX export (beside ``model.json``)."""

CACHE_ENV = 'VPR_ROS_CACHE_DIR'
"""Where registry models' ONNX exports go (default ``$XDG_CACHE_HOME/vpr_ros``)."""

# ONNX metadata keys (``metadata_props``) an export carries.
META_FORMAT = 'vpr_ros.format'
META_IDENTITY = 'vpr_ros.identity'
META_INPUT_SIZE = 'vpr_ros.input_size'
META_DYNAMIC_SIZE = 'vpr_ros.dynamic_size'
META_REGISTRY_CONF = 'vpr_ros.registry_conf'
META_QUANTIZATION = 'vpr_ros.quantization'
ONNX_FORMAT = 'vpr_ros.onnx_model/1'
INT8_SUFFIX = '.int8'
"""The int8 copy ``export_onnx --quantize`` writes beside an export (``NAME.int8.onnx``). No
command picks it: measured slower and less accurate here (README); run it as an explicit
``.onnx`` model to measure it."""


@dataclass
class Descriptors:
    """Descriptors of a batch of images.

    ``global_descriptors``: (B, D) float32, L2-normalised.
    ``local_features``: (B, L, C) float32, L2-normalised per location (L = h * w).
    ``local_grid``: (h, w) of the local feature map, row-major in ``local_features``.
    """

    global_descriptors: np.ndarray
    local_features: np.ndarray
    local_grid: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.global_descriptors)


@runtime_checkable
class Extractor(Protocol):
    """Describes RGB images with one model (see the module docstring)."""

    backend: str
    name: str
    batch_size: int

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) images are resized to; decoding may go straight to it."""

    def identity(self) -> ModelIdentity:
        """The model's identity, as maps record it."""

    def extract(self, images: Sequence[np.ndarray]) -> Descriptors:
        """Descriptors of ``images`` (RGB uint8 arrays, any size), in batches."""

    def extract_stream(self, images: Iterable[np.ndarray]) -> Iterator[Descriptors]:
        """Descriptors of a stream of images, one batch at a time."""

    def thread_settings(self) -> dict[str, int]:
        """The CPU threads the backend was given (library name -> threads; 0: default)."""


def _stream(extractor: Extractor, images: Iterable[np.ndarray]) -> Iterator[Descriptors]:
    iterator = iter(images)
    while batch := list(islice(iterator, extractor.batch_size)):
        yield extractor.extract(batch)


class TorchExtractor:
    """Runs a ``VprModel`` on images in batches, without gradients, on the CPU.

    Args:
        model: the place-recognition model.
        batch_size: images per forward pass.
        num_threads: torch, faiss and BLAS threads (None leaves their settings alone).
    """

    backend = TORCH

    def __init__(
        self, model: VprModel, *, batch_size: int = 8, num_threads: int | None = None
    ) -> None:
        self.model = model.eval()
        self.name = model.name
        self.batch_size = max(1, int(batch_size))
        set_num_threads(num_threads)

    @property
    def input_size(self) -> tuple[int, int]:
        size: tuple[int, int] = self.model.preprocessing.size
        return size

    def identity(self) -> ModelIdentity:
        return self.model.identity()

    def thread_settings(self) -> dict[str, int]:
        import torch

        return {'torch': torch.get_num_threads()}

    def extract(self, images: Sequence[np.ndarray]) -> Descriptors:
        import torch

        globals_, locals_ = [], []
        grid: tuple[int, int] | None = None
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = self.model.preprocessing(images[start : start + self.batch_size])
                out = self.model(batch)
                globals_.append(out['global_descriptor'].float().numpy())
                local = out['local_features'].float()
                grid = (int(local.shape[2]), int(local.shape[3]))
                locals_.append(local.flatten(2).transpose(1, 2).contiguous().numpy())
        return Descriptors(np.concatenate(globals_), np.concatenate(locals_), grid)

    def extract_stream(self, images: Iterable[np.ndarray]) -> Iterator[Descriptors]:
        return _stream(self, images)


class OnnxExtractor:
    """Runs an ONNX export of a model (``vpr_ros.models.onnx_export``) with ONNX Runtime.

    The export takes a resized uint8 batch (B, H, W, 3) and holds the normalisation; it
    returns ``global_descriptor`` (B, D) and ``local_features`` (B, h, w, C), both
    L2-normalised, as the torch model does.

    Args:
        path: the ``.onnx`` file.
        batch_size: images per run.
        num_threads: ONNX Runtime intra-op threads, and faiss and BLAS threads (None or 0:
            ONNX Runtime's default, one per core).

    Raises:
        ModelError: not an export of vpr_ros (no identity in its metadata), or unreadable.
    """

    backend = ONNXRUNTIME

    def __init__(
        self, path: str | os.PathLike[str], *, batch_size: int = 8, num_threads: int | None = None
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.batch_size = max(1, int(batch_size))
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(num_threads or 0)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle pool threads sleep instead of spinning: the CPU is shared with the rest of
        # the robot (SLAM, drivers) between frames.
        options.add_session_config_entry('session.intra_op.allow_spinning', '0')
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=['CPUExecutionProvider']
            )
        except Exception as err:  # onnxruntime raises its own exception classes
            raise ModelError(f'cannot load ONNX model {str(self.path)!r}: {err}') from err
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self._identity = onnx_identity(self.metadata, self.path)
        self.name = self._identity.name
        size = json.loads(self.metadata.get(META_INPUT_SIZE, 'null'))
        self.preprocessing = Preprocessing(size=(int(size[0]), int(size[1])))
        self.quantization = self.metadata.get(META_QUANTIZATION, 'none')
        self._num_threads = int(num_threads or 0)
        set_num_threads(num_threads)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.preprocessing.size

    def identity(self) -> ModelIdentity:
        return self._identity

    def thread_settings(self) -> dict[str, int]:
        return {'onnxruntime': self._num_threads}

    def prepare(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """The export's input for ``images``: resized, uint8 (B, H, W, 3)."""
        return self.preprocessing.batch(images)

    def run(self, batch: np.ndarray) -> Descriptors:
        """Descriptors of a prepared batch (``prepare``)."""
        global_descriptors, local = self.session.run(None, {'image': batch})
        grid = (int(local.shape[1]), int(local.shape[2]))
        local = local.reshape(len(local), grid[0] * grid[1], local.shape[3])
        return Descriptors(global_descriptors, local, grid)

    def extract(self, images: Sequence[np.ndarray]) -> Descriptors:
        parts = [
            self.run(self.prepare(images[start : start + self.batch_size]))
            for start in range(0, len(images), self.batch_size)
        ]
        if len(parts) == 1:
            return parts[0]
        return Descriptors(
            np.concatenate([p.global_descriptors for p in parts]),
            np.concatenate([p.local_features for p in parts]),
            parts[0].local_grid,
        )

    def extract_stream(self, images: Iterable[np.ndarray]) -> Iterator[Descriptors]:
        return _stream(self, images)


def onnx_identity(metadata: dict[str, str], path: Path) -> ModelIdentity:
    """The model identity an export's metadata holds.

    Raises:
        ModelError: the file is not an export of vpr_ros, or its metadata is malformed.
    """
    if metadata.get(META_FORMAT) != ONNX_FORMAT:
        msg = (
            f'ONNX model {str(path)!r} is not a vpr_ros export (metadata {META_FORMAT!r} is '
            f'{metadata.get(META_FORMAT)!r}); export it with export_onnx'
        )
        raise ModelError(msg)
    try:
        identity = ModelIdentity.from_dict(json.loads(metadata[META_IDENTITY]))
        size = json.loads(metadata[META_INPUT_SIZE])
        if not (
            isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)
        ):
            raise ValueError(f'input size {size!r}')
    except (KeyError, TypeError, ValueError) as err:
        msg = f'ONNX model {str(path)!r} has malformed vpr_ros metadata ({err}); export it again'
        raise ModelError(msg) from err
    return identity


def cache_dir() -> Path:
    """Where registry models' exports go (``VPR_ROS_CACHE_DIR``, else the XDG cache)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get('XDG_CACHE_HOME') or str(Path.home() / '.cache')
    return Path(base) / 'vpr_ros'


def onnx_export_path(source: str | os.PathLike[str]) -> Path:
    """Where the export of model ``source`` goes: beside an exported model directory, in
    the cache for a registry name, or ``source`` itself when it is an ``.onnx`` file."""
    path = Path(source)
    if path.suffix == '.onnx':
        return path
    if path.is_dir() or path.name == 'model.json':
        folder = path if path.is_dir() else path.parent
        return folder / ONNX_FILE
    return cache_dir() / 'onnx' / f'{path.name}.onnx'


def find_onnx_export(source: str | os.PathLike[str]) -> Path | None:
    """The ONNX export of model ``source`` (registry name, model directory or ``.onnx``
    file), or None when there is none."""
    path = onnx_export_path(source)
    return path if path.is_file() else None


def registry_conf_hash(name: str) -> str | None:
    """A hash of registry entry ``name`` (None for a path), so that an export made before
    the entry changed is not taken for the model."""
    from vpr_ros.models import CONFS

    if name not in CONFS:
        return None
    text = json.dumps(CONFS[name], sort_keys=True, separators=(',', ':'))
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _onnx_misfit(
    extractor: OnnxExtractor, source: str, expected: ModelIdentity | None
) -> str | None:
    """Why the export ``extractor`` runs cannot stand for model ``source`` (None: it can)."""
    current = None if Path(source).suffix == '.onnx' else registry_conf_hash(source)
    if current is not None and extractor.metadata.get(META_REGISTRY_CONF) != current:
        return f'it was exported before the registry entry {source!r} changed'
    if expected is not None and extractor.identity() != expected:
        return (
            f'it is model {extractor.identity().describe()}, the map was built with '
            f'{expected.describe()}'
        )
    return None


def open_extractor(
    source: str | os.PathLike[str] | VprModel,
    *,
    backend: str = AUTO,
    batch_size: int = 8,
    num_threads: int | None = None,
    expected: ModelIdentity | None = None,
    overrides: dict[str, Any] | None = None,
) -> Extractor:
    """The extractor for model ``source`` on ``backend`` (see the module docstring).

    Args:
        source: a registry name, an exported model directory, an ``.onnx`` file, or a
            model object (run by torch).
        backend: one of ``BACKENDS``.
        batch_size: images per forward pass.
        num_threads: CPU threads of the backend, faiss and BLAS (None: their defaults).
        expected: the identity the model must have (a map's); with ``'auto'`` an export of
            another identity is passed over for torch.
        overrides: registry configuration overrides (torch only: exports have one input
            size; ``'auto'`` then runs torch).

    Raises:
        ConfigError: an unknown backend, or ONNX Runtime asked for a model without a
            fitting export (the message says how to export it).
        ModelError: the model or its export cannot be loaded.
    """
    if backend not in BACKENDS:
        raise ConfigError(f'unknown extraction backend {backend!r}; known: {list(BACKENDS)}')
    if not isinstance(source, (str, os.PathLike)):
        if backend == ONNXRUNTIME:
            raise ConfigError('a model object runs on torch; pass its name or path for ONNX')
        return TorchExtractor(source, batch_size=batch_size, num_threads=num_threads)
    key = str(source)
    is_onnx_file = Path(key).suffix == '.onnx'
    if backend == TORCH and is_onnx_file:
        raise ConfigError(f'model {key!r} is an ONNX file: run it with backend onnxruntime')
    if backend != TORCH and not overrides:
        export = find_onnx_export(key)
        where = onnx_export_path(key)
        why_not = f'there is no ONNX export of {key!r} ({str(where)!r})'
        if export is not None:
            try:
                extractor = OnnxExtractor(export, batch_size=batch_size, num_threads=num_threads)
            except ImportError as err:
                why_not = f'onnxruntime is not installed ({err})'
            else:
                misfit = _onnx_misfit(extractor, key, expected)
                if misfit is None:
                    logger.info('model %r runs on ONNX Runtime (%s)', extractor.name, export)
                    return extractor
                why_not = f'the ONNX export {str(export)!r} does not fit: {misfit}'
        if backend == ONNXRUNTIME or is_onnx_file:
            raise ConfigError(f'{why_not}; run: export_onnx --model {key}')
        logger.info('model %r runs on torch: %s', key, why_not)
    elif backend == ONNXRUNTIME:
        raise ConfigError('ONNX exports have a fixed configuration: no overrides with onnxruntime')
    from vpr_ros.models import load_model

    model = load_model(key, overrides)
    return TorchExtractor(model, batch_size=batch_size, num_threads=num_threads)


def as_extractor(
    model: VprModel | Extractor, *, batch_size: int = 1, num_threads: int | None = None
) -> Extractor:
    """``model`` itself when it is an extractor, else a torch extractor of it."""
    if isinstance(model, Extractor):
        return model
    return TorchExtractor(model, batch_size=batch_size, num_threads=num_threads)
