"""Training: settings, mining, steps, validation through the shipped pipeline, checkpoints,
resume and the train command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from conftest import synthetic_place
from safetensors.torch import load_file
from vpr_dataset import write_dataset, write_split

from vpr_ros.cli.train import main as train_main
from vpr_ros.errors import ConfigError
from vpr_ros.evaluation import RERANKED, RETRIEVAL, build_reference_database, evaluate
from vpr_ros.imagefolders import load_image
from vpr_ros.learning.data import VprSplit, load_batch
from vpr_ros.learning.finetune import make_optimizer
from vpr_ros.learning.train import (
    TrainConf,
    TripletMiner,
    load_optimizer,
    recall_percent,
    save_optimizer,
    train,
    train_step,
    validate,
)
from vpr_ros.metrics import recall_at_n
from vpr_ros.models import load_model
from vpr_ros.relocalization import Relocalizer

TINY = 'selavpr_tiny_random'
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / 'tiny_vpr')


def small_conf(**overrides: Any) -> TrainConf:
    values = {
        'epochs': 1,
        'batch_size': 2,
        'negs_per_query': 2,
        'lr': 1e-3,
        'queries_per_epoch': 4,
        'cache_refresh_rate': 4,
        'neg_samples': 6,
        'recall_values': [1, 2],
        'select_recall': 1,
        'progress': False,
    }
    return TrainConf.from_dict({**values, **overrides})


# -- settings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    'changes, message',
    [
        ({'select_recall': 3}, 'not among recall_values'),
        ({'neg_dist_m': 5.0}, 'farther away than positives'),
        ({'epochs': 0}, 'epochs must be >= 1'),
        ({'lr': 0.0}, 'lr must be > 0'),
        ({'recall_values': [1, 0]}, 'recall_values must be >= 1'),
        ({'batch': 2}, "unknown TrainConf setting 'batch'"),
    ],
)
def test_training_settings_refuse_what_cannot_train(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        small_conf(**changes)


def test_training_settings_keep_selavpr_defaults_and_round_trip() -> None:
    conf = TrainConf()
    assert (conf.lr, conf.margin, conf.pos_dist_m, conf.neg_dist_m) == (1e-5, 0.1, 10.0, 25.0)
    assert conf.recall_values == [1, 5, 10, 20] and conf.select_recall == 5
    # The best checkpoint: R@5 after MNN re-ranking of the top 100, as the official code.
    assert (conf.val_rerank_topk, conf.epochs, conf.patience) == (100, 20, 3)
    assert TrainConf.from_dict(json.loads(json.dumps(conf.to_dict()))) == conf


# -- mining and steps -------------------------------------------------------------------------


def test_recall_at_n_counts_queries_with_a_positive_in_the_first_n() -> None:
    predictions = np.array([[0, 1, 2], [2, 1, 0], [1, 2, 0]])
    positives = [np.array([0]), np.array([0]), np.array([5])]
    recalls = recall_percent(recall_at_n(predictions, positives, (1, 2, 3)))
    assert recalls == pytest.approx({'R@1': 100 / 3, 'R@2': 100 / 3, 'R@3': 200 / 3})


def test_mining_gives_the_positive_and_negatives_beyond_25_m(dataset: Path) -> None:
    split = VprSplit(dataset / 'train')
    conf = small_conf()
    miner = TripletMiner(split, conf, np.random.default_rng(0))
    model = load_model(TINY).train()
    triplets = miner.mine(model, np.arange(6))
    assert model.training  # mining describes in eval mode, then gives the mode back
    assert len(triplets) == 6
    for q, p, negs in triplets:
        assert p == q
        assert len(negs) == 2 and q not in negs
        assert all(np.linalg.norm(split.database.utm[n] - split.queries.utm[q]) > 25 for n in negs)
    assert set(miner.neg_cache) == set(range(6))


def triplet_batch(model, dataset: Path, conf: TrainConf) -> torch.Tensor:
    split = VprSplit(dataset / 'train')
    miner = TripletMiner(split, conf, np.random.default_rng(0))
    paths = []
    for q, p, negs in miner.mine(model, np.arange(conf.batch_size)):
        paths += [split.queries.paths[q], split.database.paths[p]]
        paths += [split.database.paths[n] for n in negs]
    return load_batch(model, paths)


def test_one_training_step_changes_only_trainable_parameters(dataset: Path) -> None:
    model = load_model(TINY)
    # A local margin of 1 keeps the local hinge active, so the local head gets a gradient.
    conf = small_conf(local_margin=1.0)
    images = triplet_batch(model, dataset, conf)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = set(model.trainable_names())
    losses = train_step(model, make_optimizer(model, conf.lr), images, conf)
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
    conf = small_conf(lr=3e-3, local_margin=0.3)
    images = triplet_batch(model, dataset, conf)
    optimizer = make_optimizer(model, conf.lr)
    losses = [train_step(model, optimizer, images, conf) for _ in range(8)]
    for part in ('loss', 'global', 'local'):
        assert losses[0][part] > 0
        assert losses[-1][part] < 0.5 * losses[0][part], part


# -- validation -------------------------------------------------------------------------------


def write_hard_split(folder: Path) -> VprSplit:
    """8 places whose queries 1, 4 and 6 show unrelated scenes, plus a query 1 km away from
    every place (it has no positive)."""
    write_split(folder, range(8))
    queries = sorted((folder / 'queries').iterdir())
    for i in (1, 4, 6):
        cv2.imwrite(str(queries[i]), synthetic_place(500 + i, (60, 80)))
    cv2.imwrite(str(folder / 'queries' / '@501000.00@4000000.00@17@T@@@@@@@.png'),
                synthetic_place(0, (60, 80)))  # fmt: skip
    return VprSplit(folder)


def relocalizer_recalls(model, split: VprSplit, conf: TrainConf) -> dict[str, float]:
    """Recall@N of the queries matched one by one by a Relocalizer over the val database,
    over the queries with a positive."""
    rerank_k = conf.val_rerank_topk
    top_k = max(*conf.recall_values, rerank_k)
    database = build_reference_database(model, split.database.paths, progress=False)
    relocalizer = Relocalizer(
        model, database, {'mode': 'single', 'top_k': top_k, 'rerank_k': rerank_k}
    )
    positives = split.positives(conf.val_pos_dist_m)
    predictions, scored = [], []
    for path, pos in zip(split.queries.paths, positives):
        if len(pos):
            ranked = [h.place_index for h in relocalizer.relocalize(load_image(path)).hypotheses]
            predictions.append(ranked + [-1] * (top_k - len(ranked)))
            scored.append(pos)
    return recall_percent(recall_at_n(np.array(predictions), scored, conf.recall_values))


@pytest.mark.parametrize('rerank_k', [0, 3])
def test_validation_recall_is_the_one_evaluate_and_the_relocalizer_give(
    tmp_path: Path, rerank_k: int
) -> None:
    model = load_model(TINY)
    split = write_hard_split(tmp_path / 'val')
    conf = small_conf(val_rerank_topk=rerank_k, recall_values=[1, 2, 3])
    got = validate(model, split, conf)
    assert set(got) == {'R@1', 'R@2', 'R@3'}
    assert got['R@1'] < 100.0  # the unrelated queries are missed: the recall can differ
    assert got == pytest.approx(relocalizer_recalls(model, split, conf))
    result = evaluate(
        model,
        split.database.paths,
        split.queries.paths,
        split.positives(conf.val_pos_dist_m),
        {'top_k': 3, 'rerank_k': rerank_k},
        ns=(1, 2, 3),
        progress=False,
    )
    method = result.methods[RERANKED if rerank_k else RETRIEVAL]
    assert got == pytest.approx(recall_percent(method.recalls))


def test_validation_needs_a_query_with_a_positive(dataset: Path) -> None:
    split = VprSplit(dataset / 'val')
    with pytest.raises(ConfigError, match='has a positive'):
        validate(load_model(TINY), split, small_conf(val_pos_dist_m=0.5))


# -- checkpoints, resume and the command --------------------------------------------------------


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
    conf = small_conf(epochs=2, val_rerank_topk=3)
    result = train(model, dataset, out, conf, resume=True)
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
        train(other, dataset, out, conf, resume=True)


def test_optimizer_state_survives_a_resume(dataset: Path, tmp_path: Path) -> None:
    model = load_model(TINY)
    conf = small_conf()
    optimizer = make_optimizer(model, conf.lr)
    train_step(model, optimizer, triplet_batch(model, dataset, conf), conf)
    names = model.trainable_names()
    meta = json.loads(json.dumps(save_optimizer(optimizer, names, tmp_path)))
    fresh = make_optimizer(model, conf.lr)
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


def test_train_cli_flags_come_from_the_settings_table(tmp_path: Path) -> None:
    from vpr_ros.cli.train import make_parser
    from vpr_ros.config import conf_from_args

    argv = [
        '--dataset', 'd', '--out', 'o', '--local-margin', '0.3', '--horizontal-flip',
        '--no-progress', '--recall-values', '1', '5',
    ]  # fmt: skip
    conf = conf_from_args(TrainConf, make_parser().parse_args(argv))
    assert conf == TrainConf(local_margin=0.3, horizontal_flip=True, progress=False,
                             recall_values=[1, 5])  # fmt: skip
    help_text = make_parser().format_help()
    for flag in ('--val-pos-dist-m', '--cache-refresh-rate', '--eval-batch-size'):
        assert flag in help_text


def test_train_command_help_and_bad_paths_do_not_import_torch(tmp_path: Path) -> None:
    code = (
        'import sys\n'
        'from vpr_ros.cli.train import main\n'
        f'assert main(["--dataset", {str(tmp_path / "none")!r}, "--out", "o"]) == 1\n'
        f'assert main(["--dataset", {str(tmp_path)!r}, "--out", "o"]) == 1\n'
        'assert "torch" not in sys.modules, "torch was imported"\n'
    )
    env = {
        **os.environ,
        'PYTHONPATH': os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]),
    }
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert 'does not exist' in done.stderr
