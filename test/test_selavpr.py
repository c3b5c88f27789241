"""SelaVPR: adapters, frozen backbone, shapes, weights, export and checkpoint conversion."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import synthetic_place, viewed_again
from safetensors.torch import load_file, save_file

from vpr_ros.cli.convert_selavpr import main as convert_main
from vpr_ros.errors import ConfigError, ModelError
from vpr_ros.models import CONFS, load_model, save_model
from vpr_ros.models.selavpr import SelaVpr, dinov2_pos_embed, read_selavpr_checkpoint

TINY = 'selavpr_tiny_random'
TINY_TIMM = {'depth': 2, 'embed_dim': 64, 'num_heads': 2, 'init_values': 1.0}


def tiny_model(**overrides) -> SelaVpr:
    return load_model(TINY, overrides or None)


def plain_backbone(img_size: int | tuple[int, int] = 70, **kwargs) -> torch.nn.Module:
    """A timm DINOv2 ViT without adapters, shaped like the tiny model's backbone."""
    return timm.create_model(
        'vit_small_patch14_dinov2',
        pretrained=False,
        num_classes=0,
        global_pool='',
        img_size=img_size,
        **{**TINY_TIMM, **kwargs},
    ).eval()


def randomise_trainable(model: SelaVpr, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.trainable_parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    model.invalidate_identity()


def images(count: int = 2, size: int = 70, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_registry_has_vit_s_b_l_variants() -> None:
    for name in ('selavpr_vits14', 'selavpr_vitb14', 'selavpr_vitl14'):
        assert CONFS[name]['model'] == 'selavpr'
    assert 'reg4' in CONFS['selavpr_vitl14_reg4']['backbone']


def test_only_adapters_local_head_and_gem_p_are_trainable() -> None:
    model = tiny_model()
    trainable = set(model.trainable_names())
    for name, param in model.named_parameters():
        is_adapter = '.adapter1.' in name or '.adapter2.' in name
        expected = is_adapter or name.startswith('local_head.') or name == 'aggregation.p'
        assert param.requires_grad == expected, name
    # 2 blocks x 2 adapters x (down, up) x (weight, bias) + 2 up-convs x 2 + GeM p.
    assert len(trainable) == 2 * 2 * 2 * 2 + 4 + 1
    assert 'aggregation.p' in trainable


def test_untrained_adapted_model_gives_the_frozen_backbone_output() -> None:
    model = tiny_model()
    plain = plain_backbone()
    frozen = {k: v for k, v in model.backbone.state_dict().items() if 'adapter' not in k}
    plain.load_state_dict(frozen)
    x = images()
    with torch.no_grad():
        ours = model.backbone.forward_features(x)
        reference = plain.forward_features(x)
        out = model(x)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    tokens = F.normalize(reference[:, 1:], dim=-1)
    gem = tokens.clamp(min=1e-6).pow(3).mean(dim=1).pow(1 / 3)
    torch.testing.assert_close(out['global_descriptor'], F.normalize(gem, dim=-1))


def test_adapters_act_serially_after_attention_and_beside_the_mlp() -> None:
    model = tiny_model()
    randomise_trainable(model)
    plain = plain_backbone()
    plain.load_state_dict(
        {k: v for k, v in model.backbone.state_dict().items() if 'adapter' not in k}
    )
    x = images(1)

    def adapter(block: torch.nn.Module, which: str, t: torch.Tensor) -> torch.Tensor:
        a = getattr(block, which)
        return a.up(F.relu(a.down(t)))

    with torch.no_grad():
        t = plain.patch_embed(x)
        t = plain._pos_embed(t)
        for blk, ours in zip(plain.blocks, model.backbone.blocks):
            attn = blk.attn(blk.norm1(t))
            t = t + blk.ls1(attn + adapter(ours, 'adapter1', attn))
            n = blk.norm2(t)
            t = t + blk.ls2(blk.mlp(n) + 0.2 * adapter(ours, 'adapter2', n))
        reference = plain.norm(t)
        got = model.backbone.forward_features(x)
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)


def test_vits14_gives_384_d_global_and_61x61x128_local_for_224_input() -> None:
    model = load_model('selavpr_vits14', {'backbone_weights': 'random'})
    with torch.no_grad():
        out = model(images(1, 224))
    assert out['global_descriptor'].shape == (1, 384)
    assert out['local_features'].shape == (1, 128, 61, 61)
    assert model.local_map_size == (61, 61)
    torch.testing.assert_close(out['local_features'].norm(dim=1), torch.ones(1, 61, 61))
    torch.testing.assert_close(out['global_descriptor'].norm(dim=1), torch.ones(1))


def test_vitl14_width_gives_1024_d_global_and_1024_256_128_local_head() -> None:
    # One block of ViT-L width keeps the test light; the head and GeM are the real ones.
    model = load_model(
        'selavpr_vitl14', {'backbone_weights': 'random', 'backbone_kwargs': {'depth': 1}}
    )
    convs = model.local_head.upconvs
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1024, 256), (256, 128)]
    with torch.no_grad():
        out = model(images(1, 224))
    assert out['global_descriptor'].shape == (1, 1024)
    assert out['local_features'].shape == (1, 128, 61, 61)


def test_local_map_size_and_channels_are_configuration() -> None:
    model = tiny_model(local_channels=[8], local_size=[4, 4])
    with torch.no_grad():
        out = model(images(1))
    assert out['local_features'].shape == (1, 8, 4, 4)
    assert model.local_dim == 8 and model.local_map_size == (4, 4)


def test_missing_backbone_weights_raise_a_model_error_that_says_what_to_pass() -> None:
    with pytest.raises(ModelError, match="needs DINOv2 backbone weights.*'random'"):
        load_model('selavpr_vitl14')
    with pytest.raises(ModelError, match='do not exist'):
        load_model(TINY, {'backbone_weights': '/nonexistent/dinov2.pth'})
    with pytest.raises(ConfigError, match='multiples of 14'):
        load_model(TINY, {'preprocessing': {'size': [64, 64]}})


def test_backbone_weights_load_from_official_and_timm_files(tmp_path: Path) -> None:
    source = plain_backbone(img_size=98)  # a 7x7 patch grid: the loader resamples to 5x5
    state = source.state_dict()
    official = {**state, 'mask_token': torch.zeros(1, 64)}
    torch.save(official, tmp_path / 'dinov2_official.pth')
    save_file(state, str(tmp_path / 'timm.safetensors'))
    for path in (tmp_path / 'dinov2_official.pth', tmp_path / 'timm.safetensors'):
        model = tiny_model(backbone_weights=str(path))
        ours = model.backbone.state_dict()
        torch.testing.assert_close(
            ours['blocks.1.attn.qkv.weight'], state['blocks.1.attn.qkv.weight']
        )
        assert ours['pos_embed'].shape == (1, 26, 64)
    wrong = plain_backbone(img_size=70, embed_dim=32)
    save_file(wrong.state_dict(), str(tmp_path / 'wrong.safetensors'))
    with pytest.raises(ModelError, match='shape'):
        tiny_model(backbone_weights=str(tmp_path / 'wrong.safetensors'))


def dinov2_reference(patch: torch.Tensor, side: int, grid: tuple[int, int]) -> torch.Tensor:
    """DINOv2's run-time interpolation (interpolate_pos_encoding, interpolate_offset 0.1,
    no antialiasing) of an (1, side * side, C) patch embedding to an h x w patch grid."""
    h0, w0 = grid
    square = patch.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(
        square, scale_factor=((h0 + 0.1) / side, (w0 + 0.1) / side), mode='bicubic'
    )
    return resized.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)


@pytest.mark.parametrize('grid', [(5, 5), (5, 3), (9, 9), (7, 7)])
def test_position_embedding_is_interpolated_with_dinov2s_formula(grid: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(0)
    stored = torch.randn(1, 1 + 7 * 7, 6, generator=gen)
    got = dinov2_pos_embed(stored, grid, prefix_tokens=1)
    assert got.shape == (1, 1 + grid[0] * grid[1], 6)
    if grid == (7, 7):
        assert got is stored  # DINOv2 uses its training grid's embedding as stored
        return
    torch.testing.assert_close(got[:, :1], stored[:, :1], rtol=0, atol=0)  # class token's
    expected = dinov2_reference(stored[:, 1:], 7, grid)
    torch.testing.assert_close(got[:, 1:], expected, rtol=0, atol=0)
    # Resizing to the size alone (timm's resampling) samples elsewhere: not the same.
    timm_like = timm.layers.resample_abs_pos_embed(stored, list(grid), antialias=False)
    assert (timm_like - got).abs().max() > 1e-3


def test_loaded_backbones_carry_dinov2s_interpolated_position_embedding(tmp_path: Path) -> None:
    source = plain_backbone(img_size=98)  # DINOv2 stores a square grid: 7x7 here; ours is 5x5
    state = source.state_dict()
    torch.save({**state, 'mask_token': torch.zeros(1, 64)}, tmp_path / 'official.pth')
    model = tiny_model(backbone_weights=str(tmp_path / 'official.pth'))
    expected = dinov2_reference(state['pos_embed'][:, 1:], 7, (5, 5))
    ours = model.backbone.pos_embed.detach()
    torch.testing.assert_close(ours[:, 1:], expected, rtol=0, atol=0)
    torch.testing.assert_close(ours[:, :1], state['pos_embed'][:, :1], rtol=0, atol=0)

    # Registers: DINOv2 keeps the class token's row in pos_embed; timm's layout folds it
    # into the class token and has no prefix rows.
    reg = timm.create_model(
        'vit_small_patch14_reg4_dinov2', pretrained=False, num_classes=0, global_pool='',
        img_size=98, **TINY_TIMM,
    ).state_dict()  # fmt: skip
    class_row = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(5))
    official = {k: v for k, v in reg.items() if k not in ('reg_token', 'pos_embed')}
    official |= {
        'register_tokens': reg['reg_token'],
        'pos_embed': torch.cat([class_row, reg['pos_embed']], dim=1),
        'mask_token': torch.zeros(1, 64),
    }
    torch.save(official, tmp_path / 'official_reg4.pth')
    save_file(reg, str(tmp_path / 'timm_reg4.safetensors'))
    for path in (tmp_path / 'official_reg4.pth', tmp_path / 'timm_reg4.safetensors'):
        model = tiny_model(backbone='vit_small_patch14_reg4_dinov2', backbone_weights=str(path))
        ours = model.backbone.state_dict()
        expected = dinov2_reference(reg['pos_embed'], 7, (5, 5))
        torch.testing.assert_close(ours['pos_embed'], expected, rtol=0, atol=0)
        cls = reg['cls_token'] + (class_row[0] if path.suffix == '.pth' else 0)
        torch.testing.assert_close(ours['cls_token'], cls, rtol=0, atol=0)


def test_adapters_start_as_the_official_code_starts_them() -> None:
    model = load_model(
        'selavpr_vits14', {'backbone_weights': 'random', 'backbone_kwargs': {'depth': 2}}
    )
    for block in model.backbone.blocks:
        for adapter in (block.adapter1, block.adapter2):
            down = adapter.down.weight.detach()
            assert down.shape == (192, 384)
            assert down.std().item() == pytest.approx(0.02, rel=0.05)  # trunc_normal(0.02)
            assert abs(down.mean().item()) < 1e-3
            assert not adapter.down.bias.any()
            assert not adapter.up.weight.any() and not adapter.up.bias.any()
    first, second = (block.adapter1.down.weight for block in model.backbone.blocks)
    assert not torch.equal(first, second)


def test_save_and_load_round_trip_stores_trainable_tensors_only(tmp_path: Path) -> None:
    save_file(plain_backbone().state_dict(), str(tmp_path / 'dinov2.safetensors'))
    model = tiny_model(backbone_weights=str(tmp_path / 'dinov2.safetensors'))
    randomise_trainable(model)
    save_model(model, tmp_path / 'model')
    stored = load_file(str(tmp_path / 'model' / 'model.safetensors'))
    assert set(stored) == set(model.trainable_names())
    conf = json.loads((tmp_path / 'model' / 'model.json').read_text())
    assert conf['backbone_weights'] == str((tmp_path / 'dinov2.safetensors').resolve())
    loaded = load_model(tmp_path / 'model')
    assert loaded.identity() == model.identity()
    x = images(1)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    assert set(loaded.trainable_names()) == set(model.trainable_names())


def test_random_registry_model_round_trips_with_a_stable_identity(tmp_path: Path) -> None:
    model = tiny_model()
    save_model(model, tmp_path / 'm')
    assert load_model(tmp_path / 'm').identity() == model.identity()
    assert tiny_model().identity() == model.identity()


def test_train_cli_reports_an_unknown_parameter_file_key(tmp_path: Path, capsys) -> None:
    from vpr_ros.cli.train import main as train_main

    params = tmp_path / 'params.yaml'
    params.write_text('train:\n  ros__parameters:\n    no_such_option: 1\n')
    argv = ['--params', str(params), '--dataset', str(tmp_path), '--out', str(tmp_path / 'run')]
    assert train_main(argv) == 1
    err = capsys.readouterr().err
    assert 'error:' in err and 'no_such_option' in err


def published_checkpoint(path: Path, *, depth: int = 2, dim: int = 384) -> dict:
    """A small checkpoint in the key layout of the official SelaVPR release."""
    gen = torch.Generator().manual_seed(3)
    plain = timm.create_model(
        'vit_small_patch14_dinov2', pretrained=False, num_classes=0, img_size=518, depth=depth
    )
    state = {f'backbone.{k}': v for k, v in plain.state_dict().items()}
    state['backbone.mask_token'] = torch.zeros(1, dim)
    hidden = dim // 2
    for block in range(depth):
        for adapter in (1, 2):
            prefix = f'backbone.blocks.{block}.adapter{adapter}'
            state[f'{prefix}.D_fc1.weight'] = torch.randn(hidden, dim, generator=gen)
            state[f'{prefix}.D_fc1.bias'] = torch.randn(hidden, generator=gen)
            state[f'{prefix}.D_fc2.weight'] = torch.randn(dim, hidden, generator=gen) * 0.01
            state[f'{prefix}.D_fc2.bias'] = torch.randn(dim, generator=gen) * 0.01
    state['aggregation.1.p'] = torch.tensor([2.7])
    state['LocalAdapt.upconv1.weight'] = torch.randn(dim, 256, 3, 3, generator=gen) * 0.01
    state['LocalAdapt.upconv1.bias'] = torch.zeros(256)
    state['LocalAdapt.upconv2.weight'] = torch.randn(256, 128, 3, 3, generator=gen) * 0.01
    state['LocalAdapt.upconv2.bias'] = torch.zeros(128)
    published = {f'module.{k}': v for k, v in state.items()}
    torch.save(
        {
            'epoch_num': 3,
            'model_state_dict': published,
            'optimizer_state_dict': {'state': {}, 'param_groups': []},
            'recalls': np.array([88.1, 95.0, 96.3]),
            'best_r5': np.float64(95.0),
            'not_improved_num': 0,
        },
        path,
    )
    return published


def test_published_checkpoint_converts_and_loads(tmp_path: Path, capsys) -> None:
    published = published_checkpoint(tmp_path / 'SelaVPR_test.pth')
    assert convert_main([str(tmp_path / 'SelaVPR_test.pth'), str(tmp_path / 'out')]) == 0
    assert 'wrote' in capsys.readouterr().out
    model = load_model(tmp_path / 'out')
    assert model.conf['backbone'] == 'vit_small_patch14_dinov2'
    assert model.conf['backbone_kwargs'] == {'depth': 2}
    state = model.state_dict()
    pairs = {
        'backbone.blocks.1.adapter2.up.weight': 'module.backbone.blocks.1.adapter2.D_fc2.weight',
        'backbone.blocks.0.adapter1.down.bias': 'module.backbone.blocks.0.adapter1.D_fc1.bias',
        'local_head.upconvs.0.weight': 'module.LocalAdapt.upconv1.weight',
        'local_head.upconvs.1.bias': 'module.LocalAdapt.upconv2.bias',
        'aggregation.p': 'module.aggregation.1.p',
        'backbone.blocks.1.mlp.fc2.weight': 'module.backbone.blocks.1.mlp.fc2.weight',
    }
    for ours, theirs in pairs.items():
        torch.testing.assert_close(state[ours], published[theirs])
    # pos_embed 37x37 (518 px) interpolated to the 16x16 grid of 224 px as DINOv2 does.
    assert state['backbone.pos_embed'].shape == (1, 257, 384)
    expected = dinov2_reference(published['module.backbone.pos_embed'][:, 1:], 37, (16, 16))
    torch.testing.assert_close(state['backbone.pos_embed'][:, 1:], expected, rtol=0, atol=0)
    with torch.no_grad():
        out = model(images(1, 224))
    assert out['local_features'].shape == (1, 128, 61, 61)
    stored = load_file(str(tmp_path / 'out' / 'model.safetensors'))
    assert set(stored) == set(model.trainable_names())


def test_converted_model_folder_still_loads_after_it_is_moved(tmp_path: Path) -> None:
    published_checkpoint(tmp_path / 'SelaVPR_test.pth')
    assert convert_main([str(tmp_path / 'SelaVPR_test.pth'), str(tmp_path / 'a')]) == 0
    conf = json.loads((tmp_path / 'a' / 'model.json').read_text())
    assert conf['backbone_weights'] == 'dinov2_backbone.safetensors'
    before = load_model(tmp_path / 'a')
    shutil.move(tmp_path / 'a', tmp_path / 'b')
    after = load_model(tmp_path / 'b')
    assert after.identity() == before.identity()
    assert Path(after.conf['backbone_weights']).parent == (tmp_path / 'b').resolve()


def test_checkpoint_with_arbitrary_pickled_objects_is_refused(tmp_path: Path) -> None:
    torch.save({'model_state_dict': {}, 'args': argparse.Namespace(lr=1.0)}, tmp_path / 'x.pth')
    with pytest.raises(ModelError, match='refusing to unpickle'):
        read_selavpr_checkpoint(tmp_path / 'x.pth')
    torch.save({'model_state_dict': {'module.x': torch.zeros(1)}}, tmp_path / 'y.pth')
    assert convert_main([str(tmp_path / 'y.pth'), str(tmp_path / 'out')]) == 1


def test_selavpr_map_answers_queries_through_the_relocalizer(tmp_path: Path) -> None:
    from vpr_ros.bagwriter import write_bag
    from vpr_ros.database import PlaceDatabase
    from vpr_ros.mapping import build_map
    from vpr_ros.relocalization import Relocalizer
    from vpr_ros.types import Frame, Pose

    save_model(tiny_model(), tmp_path / 'model')
    model = load_model(tmp_path / 'model')
    places = [synthetic_place(i, (60, 80)) for i in range(4)]
    frames = [
        Frame(image, 10**9 + i * 10**8, frame_id='camera', pose=Pose(2.0 * i, 0.0, 0.0))
        for i, image in enumerate(places)
    ]
    bag = write_bag(tmp_path / 'run', frames, storage='sqlite3')
    build_map(model, [bag], '/camera/image_raw', '/odom', tmp_path / 'map', progress=False)
    database = PlaceDatabase.load(tmp_path / 'map', expected_model=model.identity())
    assert database.local_features.shape[1:] == (17 * 17, 16)
    relocalizer = Relocalizer(load_model(tmp_path / 'model'), database)
    result = relocalizer.relocalize(viewed_again(places[2]))
    assert result.hypotheses
    assert {h.place_index for h in result.hypotheses} <= set(range(len(database)))
