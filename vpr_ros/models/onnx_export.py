"""ONNX export of a model, for ONNX Runtime (``vpr_ros.extraction.OnnxExtractor``).

The exported graph takes what decoding gives, a resized RGB ``uint8`` batch (B, H, W, 3),
holds the model's normalisation (the same operations as ``Preprocessing.normalise``), and
returns both heads: ``global_descriptor`` (B, D) and ``local_features`` (B, h, w, C), each
L2-normalised. The batch size is free; the image size is the model's input size, or free
with ``dynamic_size`` (CNNs; the map must then be queried at the size it was built with).
The metadata carries the model identity (what maps record), the input size, the registry
entry's hash for registry models, and the quantisation; see ``vpr_ros.extraction``.

``quantize_int8`` makes an int8 dynamically quantised copy (ONNX Runtime's
``quantize_dynamic``: int8 weights of matrix products and convolutions, activations
quantised per run).

Export needs torch, ``onnx`` and ``onnxscript`` (the torch.export-based exporter); running
an export needs only ``onnxruntime``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from vpr_ros.errors import ModelError
from vpr_ros.extraction import (
    META_DYNAMIC_SIZE,
    META_FORMAT,
    META_IDENTITY,
    META_INPUT_SIZE,
    META_QUANTIZATION,
    META_REGISTRY_CONF,
    ONNX_FORMAT,
    registry_conf_hash,
)
from vpr_ros.models.base import VprModel

EXAMPLE_BATCH = 2  # a batch of 1 would let the exporter fix the batch size at 1
MAX_BATCH = 1024


class OnnxGraph(nn.Module):
    """What is exported: uint8 images (B, H, W, 3) in, (global (B, D), local (B, h, w, C))
    out."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, model: VprModel) -> None:
        super().__init__()
        self.model = model
        preprocessing = model.preprocessing
        self.register_buffer('mean', torch.tensor(preprocessing.mean).view(1, 3, 1, 1))
        self.register_buffer('std', torch.tensor(preprocessing.std).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tensor = image.permute(0, 3, 1, 2).float().div(255.0)
        out = self.model((tensor - self.mean) / self.std)
        return out['global_descriptor'], out['local_features'].permute(0, 2, 3, 1)


def export_onnx(
    model: VprModel,
    out: str | os.PathLike[str],
    *,
    registry_name: str | None = None,
    dynamic_size: bool = False,
) -> Path:
    """Export ``model`` to ``out`` (written atomically) with its identity in the metadata.

    Args:
        model: the model (eval mode is set).
        out: the ``.onnx`` file.
        registry_name: the registry entry the model was built from, recorded so that a
            changed entry is not served by an old export.
        dynamic_size: let the image height and width vary (the default: the model's input
            size, fixed).

    Raises:
        ModelError: the exporter cannot export the model.
    """
    import onnx

    model = model.eval()
    height, width = model.preprocessing.size
    example = torch.randint(0, 256, (EXAMPLE_BATCH, height, width, 3), dtype=torch.uint8)
    shapes: dict[int, torch.export.Dim] = {0: torch.export.Dim('batch', min=1, max=MAX_BATCH)}
    if dynamic_size:
        shapes[1] = torch.export.Dim('height', min=64, max=4096)
        shapes[2] = torch.export.Dim('width', min=64, max=4096)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        raw = Path(tmp) / 'raw.onnx'
        try:
            # The exporter reports its progress on stdout: keep the commands' output clean.
            with contextlib.redirect_stdout(io.StringIO()):
                program = torch.onnx.export(
                    OnnxGraph(model).eval(),
                    (example,),
                    dynamo=True,
                    input_names=['image'],
                    output_names=['global_descriptor', 'local_features'],
                    dynamic_shapes={'image': shapes},
                    external_data=False,
                    verbose=False,
                )
            assert program is not None
            program.save(str(raw), external_data=False)
        except Exception as err:  # the exporter raises many kinds
            detail = ' '.join(str(err).split())[:300]
            raise ModelError(f'cannot export model {model.name!r} to ONNX: {detail}') from err
        proto = onnx.load(str(raw))
        metadata = {
            META_FORMAT: ONNX_FORMAT,
            META_IDENTITY: json.dumps(model.identity().to_dict(), sort_keys=True),
            META_INPUT_SIZE: json.dumps([height, width]),
            META_DYNAMIC_SIZE: json.dumps(dynamic_size),
            META_QUANTIZATION: 'none',
        }
        conf_hash = registry_conf_hash(registry_name) if registry_name else None
        if conf_hash is not None:
            metadata[META_REGISTRY_CONF] = conf_hash
        _write_with_metadata(proto, metadata, out)
    return out


def quantize_int8(source: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """An int8 dynamically quantised copy of export ``source`` (same metadata, with
    ``vpr_ros.quantization`` = ``int8_dynamic``), written atomically to ``out``."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = Path(out)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        quantized = Path(tmp) / 'int8.onnx'
        quantize_dynamic(str(source), str(quantized), weight_type=QuantType.QInt8)
        metadata = {p.key: p.value for p in onnx.load(str(source)).metadata_props}
        metadata[META_QUANTIZATION] = 'int8_dynamic'
        _write_with_metadata(onnx.load(str(quantized)), metadata, out)
    return out


def _write_with_metadata(proto: object, metadata: dict[str, str], out: Path) -> None:
    import onnx

    assert isinstance(proto, onnx.ModelProto)
    del proto.metadata_props[:]
    for key, value in sorted(metadata.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    handle, tmp_name = tempfile.mkstemp(dir=out.parent, suffix='.onnx.tmp')
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_name, 0o666 & ~umask)  # readable as any file the user writes
    try:
        onnx.save(proto, tmp_name)
        os.replace(tmp_name, out)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
