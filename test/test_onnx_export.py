"""ONNX export and the ONNX Runtime backend: descriptors equal torch's on real photos, per
model; the identity in the metadata; where exports live and when they are taken; a path
without torch; dynamic input size; int8; the export_onnx command."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data

from vpr_ros.cli.export_onnx import main as export_main
from vpr_ros.database import PlaceDatabase
from vpr_ros.errors import ConfigError, ModelError
from vpr_ros.extraction import (
    CACHE_ENV,
    OnnxExtractor,
    TorchExtractor,
    find_onnx_export,
    onnx_export_path,
    open_extractor,
)
from vpr_ros.mapping import MapBuilder
from vpr_ros.models import CONFS, load_model, save_model
from vpr_ros.models.onnx_export import export_onnx, quantize_int8
from vpr_ros.pruning import PruneConf, prune
from vpr_ros.types import Frame, Pose

REPO = Path(__file__).resolve().parents[1]
PHOTOS = ('astronaut', 'coffee', 'chelsea', 'rocket')  # real photos shipped with scikit-image
TINY = 'selavpr_tiny_random'
# Small inputs keep the 2-core CI fast; the exported graph is the same at any size. SelaVPR
# runs without DINOv2 weights on disk (random backbone).
SMALL = {
    'cnn': {'preprocessing': {'size': [96, 128]}},
    'selavpr_vit': {'backbone_weights': 'random', 'preprocessing': {'size': [112, 112]}},
}

# Every CNN in the registry, and SelaVPR ViT-S (with and without registers) and the tiny
# SelaVPR. ViT-B and ViT-L are the same code at 4x and 14x the weights (exported and checked
# by hand; see the README), too heavy for a 2-core CI run.
PARITY_MODELS = [
    *(name for name, conf in CONFS.items() if conf.get('model', 'cnn') == 'cnn'),
    'selavpr_vits14',
    'selavpr_vits14_reg4',
    TINY,
]


def real_photos() -> list[np.ndarray]:
    return [getattr(skimage.data, name)() for name in PHOTOS]


def assert_same_descriptors(onnx, torch_) -> None:
    """Global and every local descriptor within 1e-4 cosine of torch's."""
    global_cos = np.sum(onnx.global_descriptors * torch_.global_descriptors, axis=1)
    local_cos = np.sum(onnx.local_features * torch_.local_features, axis=2)
    assert onnx.local_features.shape == torch_.local_features.shape
    assert onnx.local_grid == torch_.local_grid
    assert global_cos.min() >= 1 - 1e-4, global_cos
    assert local_cos.min() >= 1 - 1e-4, local_cos.min()


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / 'cache'
    monkeypatch.setenv(CACHE_ENV, str(cache))
    return cache


@pytest.mark.parametrize('name', PARITY_MODELS)
def test_onnx_descriptors_equal_torchs_on_real_photos(tmp_path: Path, name: str) -> None:
    overrides = SMALL['selavpr_vit'] if name.startswith('selavpr_vit') else None
    if CONFS[name].get('model', 'cnn') == 'cnn':
        overrides = SMALL['cnn']
    model = load_model(name, overrides)
    path = export_onnx(model, tmp_path / f'{name}.onnx', registry_name=name)
    photos = real_photos()
    onnx = OnnxExtractor(path, batch_size=3, num_threads=1)
    assert onnx.identity() == model.identity()
    assert onnx.input_size == model.preprocessing.size
    assert_same_descriptors(onnx.extract(photos), TorchExtractor(model).extract(photos))


def test_a_pruned_model_exports_beside_its_directory_and_runs_on_onnxruntime(
    tmp_path: Path,
) -> None:
    model = load_model('efficientnet_lite0_gem', {'preprocessing': {'size': [96, 128]}})
    pruned = list(prune(model, PruneConf(sparsity=0.2, steps=1, gamma=0.25)))[-1].model
    folder = save_model(pruned, tmp_path / 'pruned')
    reloaded = load_model(folder)
    assert export_main(['--model', str(folder)]) == 0
    assert find_onnx_export(folder) == folder / 'model.onnx'
    extractor = open_extractor(folder, batch_size=4)
    assert isinstance(extractor, OnnxExtractor)
    assert extractor.identity() == reloaded.identity() != model.identity()
    photos = real_photos()
    assert_same_descriptors(extractor.extract(photos), TorchExtractor(reloaded).extract(photos))
    # Saving new weights into the folder removes the export made from the old ones.
    save_model(pruned, folder)
    assert find_onnx_export(folder) is None


def test_auto_takes_the_export_when_there_is_one_and_torch_otherwise(own_cache: Path) -> None:
    assert isinstance(open_extractor(TINY), TorchExtractor)
    with pytest.raises(ConfigError, match=f'no ONNX export of .*export_onnx --model {TINY}'):
        open_extractor(TINY, backend='onnxruntime')
    assert export_main(['--model', TINY]) == 0
    assert onnx_export_path(TINY) == own_cache / 'onnx' / f'{TINY}.onnx'
    extractor = open_extractor(TINY)
    assert isinstance(extractor, OnnxExtractor)
    assert extractor.identity() == load_model(TINY).identity()
    assert isinstance(open_extractor(TINY, backend='torch'), TorchExtractor)
    # With overrides the export (one input size) does not fit: auto runs torch.
    resized = open_extractor(TINY, overrides={'preprocessing': {'size': [56, 56]}})
    assert isinstance(resized, TorchExtractor) and resized.input_size == (56, 56)


def test_auto_passes_over_an_export_that_is_not_the_maps_model(own_cache: Path) -> None:
    export_onnx(load_model(TINY), onnx_export_path(TINY), registry_name=TINY)
    other = dataclasses.replace(load_model(TINY).identity(), weights_hash='0' * 16)
    assert isinstance(open_extractor(TINY, expected=other), TorchExtractor)
    with pytest.raises(ConfigError, match='does not fit: it is model'):
        open_extractor(TINY, backend='onnxruntime', expected=other)


def test_an_export_that_does_not_record_the_registry_entry_is_not_taken_for_it() -> None:
    export_onnx(load_model(TINY), onnx_export_path(TINY))  # as if exported from an old entry
    assert isinstance(open_extractor(TINY), TorchExtractor)


def test_an_onnx_file_that_is_not_a_vpr_ros_export_is_refused(tmp_path: Path) -> None:
    import onnx

    path = export_onnx(load_model(TINY), tmp_path / 'm.onnx')
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    onnx.save(proto, str(path))
    with pytest.raises(ModelError, match='not a vpr_ros export'):
        OnnxExtractor(path)


def test_the_onnx_runtime_path_runs_without_torch(tmp_path: Path) -> None:
    """build_map's core, the map and the Relocalizer on ONNX Runtime in a process where
    ``import torch`` fails, as on a robot with a run-time-only install."""
    model_file = export_onnx(load_model(TINY), tmp_path / 'tiny.onnx')
    shadow = tmp_path / 'shadow' / 'torch'
    shadow.mkdir(parents=True)
    (shadow / '__init__.py').write_text('raise ImportError("torch is not installed here")\n')
    code = f"""
import sys
import numpy as np
from vpr_ros.database import PlaceDatabase
from vpr_ros.extraction import open_extractor
from vpr_ros.mapping import MapBuilder
from vpr_ros.relocalization import Relocalizer
from vpr_ros.types import Frame, Pose

extractor = open_extractor({str(model_file)!r}, num_threads=1)
builder = MapBuilder(extractor, {{'keyframes': {{'min_distance_m': 0.0}}}})
builder.start_traverse()
rng = np.random.default_rng(0)
images = [rng.integers(0, 256, (48, 64, 3), np.uint8) for _ in range(5)]
for i, image in enumerate(images):
    assert builder.offer(Frame(image, i * 10**9, pose=Pose(3.0 * i, 0.0, 0.0)))
builder.save({str(tmp_path / 'map')!r})
database = PlaceDatabase.load({str(tmp_path / 'map')!r}, expected_model=extractor.identity())
result = Relocalizer(extractor, database).relocalize(images[3])
assert result.best.place_index == 3, result.best
assert 'torch' not in sys.modules
print('ok', extractor.backend)
"""
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(shadow.parent), str(REPO)])}
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert 'ok onnxruntime' in done.stdout


def test_a_dynamic_size_export_describes_images_of_any_size(tmp_path: Path) -> None:
    import onnxruntime as ort

    model = load_model('resnet18_gem', {'preprocessing': {'size': [64, 64]}})
    path = export_onnx(model, tmp_path / 'dynamic.onnx', dynamic_size=True)
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    photo = skimage.data.astronaut()
    for size in [(64, 64), (96, 128)]:
        batch = np.stack([np.ascontiguousarray(_resize(photo, size))])
        global_onnx, local_onnx = session.run(None, {'image': batch})
        torch_out = model(model.preprocessing.normalise(batch))
        expected = torch_out['global_descriptor'].detach().numpy()
        assert float(np.sum(global_onnx * expected)) >= 1 - 1e-4
        assert local_onnx.shape[1:3] == tuple(torch_out['local_features'].shape[2:])


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from vpr_ros.models.preprocessing import resize_to

    return resize_to(image, size)


def test_an_int8_export_records_its_quantisation_and_stays_close(tmp_path: Path) -> None:
    model = load_model('resnet18_gem', {'preprocessing': {'size': [96, 128]}})
    fp32 = export_onnx(model, tmp_path / 'm.onnx')
    int8 = quantize_int8(fp32, tmp_path / 'm.int8.onnx')
    quantized = OnnxExtractor(int8)
    assert quantized.quantization == 'int8_dynamic'
    assert quantized.identity() == model.identity()
    assert int8.stat().st_size < fp32.stat().st_size / 2
    photos = real_photos()
    cos = np.sum(
        quantized.extract(photos).global_descriptors
        * OnnxExtractor(fp32).extract(photos).global_descriptors,
        axis=1,
    )
    assert cos.min() > 0.9, cos


def test_a_map_built_on_onnxruntime_is_served_by_torch_and_the_reverse(tmp_path: Path) -> None:
    model = load_model(TINY)
    onnx = OnnxExtractor(export_onnx(model, tmp_path / 'tiny.onnx'))
    photos = real_photos()
    for builder_side, query_side in [(onnx, TorchExtractor(model)), (TorchExtractor(model), onnx)]:
        builder = MapBuilder(builder_side, {'keyframes': {'min_distance_m': 0.0}})
        builder.start_traverse()
        for i, photo in enumerate(photos):
            assert builder.offer(Frame(photo, i * 10**9, pose=Pose(10.0 * i, 0.0, 0.0)))
        database = PlaceDatabase.load(builder.save(tmp_path / f'map_{builder_side.backend}'))
        database.check_model(query_side.identity())
        query = query_side.extract(photos[2:3]).global_descriptors
        assert int(database.search(query, 1)[1][0, 0]) == 2


def test_export_onnx_help_and_bad_models_do_not_import_torch(tmp_path: Path) -> None:
    code = (
        'import sys\n'
        'from vpr_ros.cli.export_onnx import main\n'
        'assert main(["--model", "no_such_model"]) == 1\n'
        'assert "torch" not in sys.modules, "torch was imported"\n'
    )
    env = {
        **os.environ,
        'PYTHONPATH': os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]),
    }
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "unknown model 'no_such_model'" in done.stderr
