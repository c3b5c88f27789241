"""Training: data format, MNN loss, mining, steps, checkpoints, resume and the train CLI."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import synthetic_place, viewed_again
from safetensors.torch import load_file

from vpr_ros import imagefolders, training
from vpr_ros.cli.train import main as train_main
from vpr_ros.errors import ConfigError
from vpr_ros.imagefolders import parse_utm
from vpr_ros.metrics import recall_at_n
from vpr_ros.models import load_model
from vpr_ros.rerank import mutual_nn_matches
from vpr_ros.training import (
    PlaceImages,
    TrainConfig,
    TripletMiner,
    VprSplit,
    load_batch,
    make_optimizer,
    mnn_local_loss,
    mnn_similarity,
    recall_percent,
    train,
    train_step,
)

TINY = 'selavpr_tiny_random'
SPACING_M = 30.0


def write_split(folder: Path, places: range) -> None:
    """One database and one query image per place, ``SPACING_M`` apart along east."""
    for kind in ('database', 'queries'):
        (folder / kind).mkdir(parents=True, exist_ok=True)
    for i in places:
        east, north = 500000.0 + SPACING_M * i, 4000000.0
        image = synthetic_place(i, (60, 80))
        db_name = f'@{east:.2f}@{north:.2f}@17@T@@@@@@@.png'
        q_name = f'@{east + 2:.2f}@{north + 1:.2f}@17@T@@@@@@@.png'
        cv2.imwrite(str(folder / 'database' / db_name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        query = cv2.cvtColor(viewed_again(image), cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(folder / 'queries' / q_name), query)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / 'tiny_vpr'
    write_split(root / 'train', range(6))
    write_split(root / 'val', range(100, 104))
    return root


def small_config(**overrides) -> TrainConfig:
    values = {
        'epochs': 1,
        'batch_size': 2,
        'negs_per_query': 2,
        'lr': 1e-3,
        'queries_per_epoch': 4,
        'cache_refresh_rate': 4,
        'neg_samples': 6,
        'recall_values': (1, 2),
        'select_recall': 1,
        'progress': False,
    }
    return TrainConfig(**{**values, **overrides})


def brute_force_mnn(a: np.ndarray, b: np.ndarray) -> tuple[list[tuple[int, int]], float]:
    """Mutual nearest neighbours by explicit loops, and their mean similarity."""
    matches = []
    for i in range(len(a)):
        sims = [float(a[i] @ b[j]) for j in range(len(b))]
        j = int(np.argmax(sims))
        back = [float(a[k] @ b[j]) for k in range(len(a))]
        if int(np.argmax(back)) == i:
            matches.append((i, j))
    mean = float(np.mean([a[i] @ b[j] for i, j in matches])) if matches else 0.0
    return matches, mean


def test_mnn_matcher_agrees_with_a_brute_force_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(3, 20, 8, generator=gen), dim=-1)
    b = F.normalize(torch.randn(3, 25, 8, generator=gen), dim=-1)
    got = mnn_similarity(a, b)
    for k in range(3):
        matches, mean = brute_force_mnn(a[k].numpy(), b[k].numpy())
        assert len(matches) > 0
        assert got[k].item() == pytest.approx(mean, abs=1e-6)
        rows, cols = mutual_nn_matches(a[k], b[k])
        assert sorted(zip(rows.tolist(), cols.tolist())) == matches


def test_mnn_similarity_is_differentiable_through_the_matched_similarities() -> None:
    gen = torch.Generator().manual_seed(1)
    a = F.normalize(torch.randn(1, 10, 4, generator=gen), dim=-1).requires_grad_()
    b = F.normalize(torch.randn(1, 12, 4, generator=gen), dim=-1)
    mnn_similarity(a, b).sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0


def test_mnn_local_loss_is_a_hinge_of_negative_minus_positive_similarity() -> None:
    gen = torch.Generator().manual_seed(2)
    q = F.normalize(torch.randn(2, 16, 8, generator=gen), dim=-1)
    other = F.normalize(torch.randn(2, 16, 8, generator=gen), dim=-1)
    assert mnn_local_loss(q, q, other).item() == 0.0  # positive identical: s_p = 1 >= s_n
    expected = (1.0 - mnn_similarity(q, other)).mean().item()
    assert mnn_local_loss(q, other, q).item() == pytest.approx(expected, abs=1e-6)


def test_vpr_file_names_give_utm_positions_and_positives(dataset: Path) -> None:
    assert parse_utm('/x/@500000.00@4000000.50@17@T@45.1@7.6@.jpg') == (500000.0, 4000000.5)
    with pytest.raises(ConfigError, match='UTM'):
        parse_utm('image_0001.jpg')
    split = VprSplit(dataset / 'train')
    assert repr(split) == '< tiny_vpr/train - #q: 6; #db: 6 >'
    assert [p.tolist() for p in split.positives(10.0)] == [[i] for i in range(6)]


@pytest.mark.parametrize(
    'name',
    ['@abc@500000@4000000@.jpg', '@500000@nan@17@.jpg', '@500000@4000000.jpg', 'x@1@.png'],
)
def test_training_and_evaluation_refuse_the_same_bad_utm_names(name: str) -> None:
    assert training.parse_utm is imagefolders.parse_utm  # one reader, one behaviour
    with pytest.raises(ConfigError, match='UTM'):
        imagefolders.parse_utm(name)


def test_training_lists_every_image_type_in_frame_number_order(tmp_path: Path) -> None:
    image = synthetic_place(0, (60, 80))
    for i, suffix in ((10, '.webp'), (2, '.bmp'), (1, '.png')):
        cv2.imwrite(str(tmp_path / f'@{500000 + i}@4000000@{i}@.{suffix[1:]}'), image)
    images = PlaceImages.from_folder(tmp_path)
    assert [p.suffix for p in images.paths] == ['.png', '.bmp', '.webp']
    assert images.utm[:, 0].tolist() == [500001.0, 500002.0, 500010.0]


def test_recall_at_n_counts_queries_with_a_positive_in_the_first_n() -> None:
    predictions = np.array([[0, 1, 2], [2, 1, 0], [1, 2, 0]])
    positives = [np.array([0]), np.array([0]), np.array([5])]
    recalls = recall_percent(recall_at_n(predictions, positives, (1, 2, 3)))
    assert recalls == pytest.approx({'R@1': 100 / 3, 'R@2': 100 / 3, 'R@3': 200 / 3})


def test_mining_gives_the_positive_and_negatives_beyond_25_m(dataset: Path) -> None:
    split = VprSplit(dataset / 'train')
    config = small_config()
    miner = TripletMiner(split, config, np.random.default_rng(0))
    triplets = miner.mine(load_model(TINY), np.arange(6))
    assert len(triplets) == 6
    for q, p, negs in triplets:
        assert p == q
        assert len(negs) == 2 and q not in negs
        assert all(np.linalg.norm(split.database.utm[n] - split.queries.utm[q]) > 25 for n in negs)
    assert set(miner.neg_cache) == set(range(6))


def triplet_batch(model, dataset: Path, config: TrainConfig) -> torch.Tensor:
    split = VprSplit(dataset / 'train')
    miner = TripletMiner(split, config, np.random.default_rng(0))
    paths = []
    for q, p, negs in miner.mine(model, np.arange(config.batch_size)):
        paths += [split.queries.paths[q], split.database.paths[p]]
        paths += [split.database.paths[n] for n in negs]
    return load_batch(model, paths)


def test_one_training_step_changes_only_trainable_parameters(dataset: Path) -> None:
    model = load_model(TINY)
    # A local margin of 1 keeps the local hinge active, so the local head gets a gradient.
    config = small_config(local_margin=1.0)
    images = triplet_batch(model, dataset, config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = set(model.trainable_names())
    losses = train_step(model, make_optimizer(model, config), images, config)
    assert losses['local'] > 0 and losses['global'] > 0
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= trainable
    assert any('.adapter1.up.' in k for k in changed)
    assert any(k.startswith('local_head.') for k in changed)
    assert 'aggregation.p' in changed


def test_training_loss_falls_over_a_few_steps(dataset: Path) -> None:
    torch.manual_seed(0)
    model = load_model(TINY)
    # A local margin of 0.3 makes the local part non-zero on these easy synthetic pairs.
    config = small_config(lr=3e-3, local_margin=0.3)
    images = triplet_batch(model, dataset, config)
    optimizer = make_optimizer(model, config)
    losses = [train_step(model, optimizer, images, config) for _ in range(8)]
    for part in ('loss', 'global', 'local'):
        assert losses[0][part] > 0
        assert losses[-1][part] < 0.5 * losses[0][part], part


def test_train_cli_then_resume_keeps_best_and_last_checkpoints(
    dataset: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / 'run'
    args = [
        '--dataset', str(dataset), '--out', str(out), '--model', TINY, '--epochs', '1',
        '--batch-size', '2', '--lr', '1e-3', '--queries-per-epoch', '4',
        '--cache-refresh-rate', '4', '--neg-samples', '6', '--recall-values', '1', '2',
        '--select-recall', '1', '--val-rerank-topk', '3', '--no-progress',
    ]  # fmt: skip
    assert train_main(args) == 0
    assert 'best model (epoch 1)' in capsys.readouterr().out
    for name in ('model.json', 'model.safetensors', 'optimizer.safetensors', 'train_state.json'):
        assert (out / 'last' / name).is_file()
    state = json.loads((out / 'last' / 'train_state.json').read_text())
    assert state['epoch'] == 1 and len(state['history']) == 1
    assert (out / 'train.log').is_file()

    model = load_model(TINY)
    config = small_config(epochs=2, val_rerank_topk=3)
    result = train(model, dataset, out, config, resume=True)
    assert result.epochs_run == 2 and len(result.history) == 2
    assert result.history[0] == state['history'][0]
    state = json.loads((out / 'last' / 'train_state.json').read_text())
    optimizer = load_file(str(out / 'last' / 'optimizer.safetensors'))
    steps = [float(v) for k, v in optimizer.items() if k.endswith('/step')]
    assert steps and all(v == 4 for v in steps)  # 2 steps per epoch, continued after resume
    best = load_model(out / 'best')
    assert best.identity().config_hash == model.identity().config_hash

    other = load_model(TINY, {'local_channels': [8]})
    with pytest.raises(ConfigError, match='another model configuration'):
        train(other, dataset, out, config, resume=True)


def test_optimizer_state_survives_a_resume(dataset: Path, tmp_path: Path) -> None:
    from vpr_ros.training import load_optimizer, save_optimizer

    model = load_model(TINY)
    config = small_config()
    optimizer = make_optimizer(model, config)
    train_step(model, optimizer, triplet_batch(model, dataset, config), config)
    names = model.trainable_names()
    meta = json.loads(json.dumps(save_optimizer(optimizer, names, tmp_path)))
    fresh = make_optimizer(model, config)
    load_optimizer(fresh, names, tmp_path, meta)
    a, b = optimizer.state_dict()['state'], fresh.state_dict()['state']
    assert a.keys() == b.keys()
    for index in a:
        for key in a[index]:
            torch.testing.assert_close(
                torch.as_tensor(a[index][key]), torch.as_tensor(b[index][key])
            )


def test_train_cli_reports_a_missing_dataset(tmp_path: Path, capsys) -> None:
    code = train_main(['--dataset', str(tmp_path / 'none'), '--out', str(tmp_path / 'o'),
                       '--model', TINY, '--no-progress'])  # fmt: skip
    assert code == 1
    assert 'does not exist' in capsys.readouterr().err
