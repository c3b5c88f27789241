"""Evaluation runner and command: every method through the relocalization pipeline."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import synthetic_place, viewed_again
from test_ground_truth import vprbench_object_array

from vpr_ros.cli.evaluate import main as evaluate_main
from vpr_ros.database import PLACE_DTYPE, PlaceDatabase
from vpr_ros.errors import ConfigError
from vpr_ros.evaluation import (
    FILTER,
    RERANKED,
    RETRIEVAL,
    SEQUENCE,
    DescribedQuery,
    build_reference_database,
    evaluate,
    evenly_spaced,
    make_relocalizers,
    method_confs,
    run_methods,
)
from vpr_ros.extraction import Descriptors
from vpr_ros.ground_truth import positives_frame_aligned
from vpr_ros.imagefolders import list_images, load_image, parse_utm
from vpr_ros.mapping import MapBuilder
from vpr_ros.relocalization import RelocalizationConf, Relocalizer
from vpr_ros.sequence import sequence_image_descriptors
from vpr_ros.types import Frame, Pose

PLACES = 6
SPACING_M = 100.0  # places far apart: exactly one positive within 25 m


def test_evenly_spaced_spreads_the_limit_over_all_queries() -> None:
    assert evenly_spaced(10, 3).tolist() == [0, 4, 9]
    assert evenly_spaced(4, None).tolist() == [0, 1, 2, 3]
    assert evenly_spaced(4, 9).tolist() == [0, 1, 2, 3]


# -- end to end -----------------------------------------------------------------------------


def utm_name(index: int, offset_m: float = 0.0) -> str:
    return f'@{1000 + SPACING_M * index + offset_m:.1f}@{5000.0:.1f}@place{index}.png'


@pytest.fixture(scope='module')
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six distinct places; queries are the same places shifted and brightened, 3 m away.

    Also laid out as frame-aligned traverses (same name) and as place folders.
    """
    root = tmp_path_factory.mktemp('evaluation')
    for i in range(PLACES):
        reference = synthetic_place(i)
        query = viewed_again(reference)
        for folder, image, name in (
            ('utm/db', reference, utm_name(i)),
            ('utm/queries', query, utm_name(i, offset_m=3.0)),
            ('aligned/db', reference, f'frame{i:03d}.png'),
            ('aligned/queries', query, f'frame{i:03d}.png'),
            ('folders', reference, f'place{i}/i0/ref.png'),
            ('folders', query, f'place{i}/i1/query.png'),
        ):
            path = root / folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return root


def test_evaluate_finds_every_place_and_reports_both_methods(dataset: Path, default_model) -> None:
    db_paths = list_images(dataset / 'aligned/db')
    query_paths = list_images(dataset / 'aligned/queries')
    names = [p.name for p in query_paths]
    positives = positives_frame_aligned([p.name for p in db_paths], names, tolerance=0)
    positives.append(np.zeros(0, np.int64))  # matched, but out of Recall@N
    result = evaluate(
        default_model,
        db_paths,
        [*query_paths, query_paths[0]],
        positives,
        {'top_k': 4, 'rerank_k': 2},
        query_names=[*names, 'lost.png'],
        progress=False,
    )
    assert result.skipped_queries == ['lost.png']
    assert result.query_names == [*names, 'lost.png']
    assert set(result.methods) == {RETRIEVAL, RERANKED}
    for method in result.methods.values():
        assert method.recalls == {1: 1.0, 5: None, 10: None, 20: None}
        assert method.predictions[:, 0].tolist() == [*range(PLACES), 0]
        assert method.correct.tolist() == [True] * PLACES + [False]
        assert (method.latencies_s > 0).all()
    retrieval = result.methods[RETRIEVAL].predictions
    reranked = result.methods[RERANKED].predictions
    # The re-ranked list is the re-ranked head followed by the rest of the retrieval list.
    for row_retrieval, row_reranked in zip(retrieval, reranked):
        assert sorted(row_reranked[:2]) == sorted(row_retrieval[:2])
        assert row_reranked[2:].tolist() == row_retrieval[2:].tolist()
    assert result.query_globals.shape == (PLACES + 1, default_model.global_dim)
    table = result.table()
    assert 'retrieval' in table and 'n/a' in table
    assert f'{PLACES + 1} queries (1 without a positive)' in table
    assert (
        f'recall denominator: the {PLACES} queries with a positive (1 without one left out of '
        f'R@N; an accepted answer to one is wrong)'
    ) in table


def test_evaluate_refuses_queries_without_any_positive_before_extracting(
    tmp_path: Path, default_model
) -> None:
    missing = [tmp_path / 'not_extracted.png']  # the reference is never read
    message = 'none of 2 queries has a positive in the reference; check --gt'
    with pytest.raises(ConfigError, match=message):
        evaluate(default_model, missing, missing * 2, [[], []], progress=False)


def test_evaluate_cli_reports_queries_without_any_positive_without_a_traceback(
    dataset: Path, capsys: pytest.CaptureFixture
) -> None:
    code = evaluate_main(
        [
            *('--db-images', str(dataset / 'aligned/db'), '--db-glob', 'frame000.png'),
            *('--queries', str(dataset / 'aligned/queries'), '--query-glob', 'frame00[45].png'),
            *('--gt', 'aligned', '--tolerance', '0', '--no-progress'),
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith('error: none of 2 queries has a positive') and 'Traceback' not in err


def test_evaluate_cli_scores_utm_named_images_end_to_end(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / 'out'
    code = evaluate_main(
        [
            '--db-images',
            str(dataset / 'utm/db'),
            '--queries',
            str(dataset / 'utm/queries'),
            '--gt',
            'utm',
            '--radius-m',
            '25',
            '--image-size',
            '96',
            '128',
            '--threads',
            '1',
            '--out',
            str(out),
            '--no-progress',
        ]
    )
    assert code == 0
    results = json.loads((out / 'results.json').read_text())
    assert results['num_queries'] == PLACES and results['num_db'] == PLACES
    for name in (RETRIEVAL, RERANKED):
        method = results['methods'][name]
        assert method['recall_at_n'] == {'R@1': 1.0, 'R@5': 1.0, 'R@10': 1.0, 'R@20': 1.0}
        for curve in ('pr_by_confidence', 'pr_by_similarity'):
            assert 0.0 <= method[curve]['recall_at_100_precision'] <= 1.0
        assert method['latency_ms']['median'] > 0
    assert results['args']['gt'] == 'utm'
    assert (out / 'pr_curve.png').stat().st_size > 0
    assert len((out / 'per_query.csv').read_text().splitlines()) == PLACES + 1


def test_evaluate_cli_matches_queries_against_a_map_by_pose(
    dataset: Path, tmp_path: Path, default_model, capsys: pytest.CaptureFixture
) -> None:
    db_paths = list_images(dataset / 'utm/db')
    positions = np.array([parse_utm(p) for p in db_paths])
    database = build_reference_database(default_model, db_paths, positions=positions)
    database.save(tmp_path / 'map')
    folders = ['--queries', str(dataset / 'utm/queries'), '--gt', 'utm', '--no-progress']
    code = evaluate_main(['--map', str(tmp_path / 'map'), *folders, '--limit', '3'])
    assert code == 0
    table = capsys.readouterr().out
    assert '3 queries (0 without a positive) vs 6 reference places' in table
    retrieval_row = next(line for line in table.splitlines() if line.startswith('retrieval'))
    assert retrieval_row.split()[1:5] == ['100.0'] * 4


def test_evaluate_cli_refuses_map_poses_in_another_frame_than_the_utm_names(
    dataset: Path, tmp_path: Path, default_model, capsys: pytest.CaptureFixture
) -> None:
    utm = np.array([[432100.0 + SPACING_M * i, 5401000.0] for i in range(2)])
    queries = tmp_path / 'queries'
    queries.mkdir()
    for i, (east, north) in enumerate(utm):
        image = cv2.cvtColor(viewed_again(synthetic_place(i)), cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(queries / f'@{east + 3:.1f}@{north:.1f}@q{i}.png'), image)
    # Odometry poses: the same places, but relative to where the mapping run started.
    db_paths = list_images(dataset / 'utm/db')[:2]
    odometry = utm - utm[0]
    build_reference_database(default_model, db_paths, positions=odometry).save(tmp_path / 'map')
    code = evaluate_main(
        ['--map', str(tmp_path / 'map'), '--queries', str(queries), '--gt', 'utm', '--no-progress']
    )
    assert code == 1
    err = capsys.readouterr().err
    assert 'no query is within 10 km of any place' in err
    assert 'same (UTM east/north) frame as the query names' in err


def test_evaluate_cli_scores_place_folders(dataset: Path, tmp_path: Path) -> None:
    root = str(dataset / 'folders')
    code = evaluate_main(
        [
            *('--db-images', root, '--db-glob', '*/i0/*', '--queries', root),
            *('--query-glob', '*/i1/*', '--gt', 'folder', '--image-size', '96', '128'),
            *('--rerank-k', '0', '--out', str(tmp_path), '--no-progress'),
        ]
    )
    assert code == 0
    results = json.loads((tmp_path / 'results.json').read_text())
    assert list(results['methods']) == [
        RETRIEVAL,
        FILTER,
    ]  # --mode default; no re-ranking at --rerank-k 0
    assert results['methods'][RETRIEVAL]['recall_at_n']['R@1'] == 1.0


def planted_map(model, descriptors: np.ndarray) -> PlaceDatabase:
    """A map whose places have the given global descriptors: one traverse, no poses."""
    places = np.zeros(len(descriptors), PLACE_DTYPE)
    places['place_id'] = np.arange(len(descriptors))
    for key in ('x', 'y', 'z', 'qx', 'qy', 'qz', 'qw'):
        places[key] = np.nan
    return PlaceDatabase(model.identity(), descriptors, places)


def test_a_sequence_method_follows_a_planted_route(default_model) -> None:
    rng = np.random.default_rng(0)
    # 32-dimensional descriptors (the model's other dimensions zero), where random places
    # look alike enough for single frames to fail.
    route = np.zeros((60, default_model.identity().global_dim), np.float32)
    route[:, :32] = rng.normal(size=(60, 32))
    route /= np.linalg.norm(route, axis=1, keepdims=True)
    # The query drives places 10..39 again, one place per frame, with noisy descriptors.
    queries = route[10:40].copy()
    queries[:, :32] += 0.3 * rng.normal(size=(30, 32)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    positives = [np.array([10 + i]) for i in range(30)]
    conf = {'sequence': {'length': 5, 'descriptor': 'global'}}
    database = planted_map(default_model, route)
    relocalizers = make_relocalizers(
        default_model, database, method_confs(conf, [SEQUENCE, RETRIEVAL])
    )
    described = (
        DescribedQuery(None, Descriptors(q[None], np.zeros((1, 0, 1), np.float32)), 0.001)
        for q in queries
    )
    runs = run_methods(relocalizers, described, positives, num_db=len(route))
    method = runs.methods[SEQUENCE]
    assert method.name == SEQUENCE
    assert method.predictions.shape == (30, 20)
    # Single frames are often wrong at this noise; once a few frames are in, the sequence
    # is always right (the first frames have little sequence to go on).
    single_frame = runs.methods[RETRIEVAL].correct
    assert single_frame.mean() < 0.85
    assert method.correct[3:].all()
    assert method.recalls[1] > single_frame.mean()
    assert (method.confidences > 0).all() and (method.latencies_s > 0.001).all()
    np.testing.assert_array_equal(runs.query_globals, queries)


def test_reference_images_become_a_map_with_patch_normalised_pixels(
    dataset: Path, default_model
) -> None:
    paths = list_images(dataset / 'aligned/db')
    database = build_reference_database(default_model, paths, progress=False)
    assert len(database) == PLACES and database.place_strings('source').tolist() == list(
        map(str, paths)
    )
    assert (database.places['traverse'] == 0).all()
    descriptors = np.asarray(database.sequence_descriptors, np.float32)
    assert descriptors.shape == (PLACES, 64 * 32)
    np.testing.assert_allclose(np.linalg.norm(descriptors, axis=1), 1.0, rtol=1e-3)
    expected = sequence_image_descriptors([load_image(p) for p in paths])
    # Stored at 6 bits a value (vpr_ros.codecs): the same directions, to a cosine of 0.995.
    np.testing.assert_array_less(0.995, (descriptors * expected).sum(axis=1))


def test_a_sequence_method_on_image_folders_answers_as_relocalizer_on_a_built_map(
    dataset: Path, default_model
) -> None:
    # The same reference images, once through evaluate and once as a map that MapBuilder
    # builds from frames (as the map builder node does), matched by a Relocalizer.
    db_paths = list_images(dataset / 'utm/db')
    query_paths = list_images(dataset / 'utm/queries')
    positions = np.array([parse_utm(p) for p in db_paths])
    builder = MapBuilder(default_model)
    for i, path in enumerate(db_paths):
        pose = Pose(float(positions[i, 0]), float(positions[i, 1]), 0.0)
        assert builder.offer(Frame(load_image(path), i * 10**9, pose=pose))
    builder.flush()
    conf = {'sequence': {'length': 3, 'exclusion_window': 1, 'top_k': 20}}
    relocalizer = Relocalizer(default_model, builder.database, {**conf, 'mode': 'sequence'})
    expected = [relocalizer.relocalize(load_image(p)).hypotheses for p in query_paths]

    positives = [[i] for i in range(PLACES)]
    result = evaluate(
        default_model,
        db_paths,
        query_paths,
        positives,
        conf,
        methods=[SEQUENCE],
        reference_positions=positions,
        progress=False,
    )
    method = result.methods[SEQUENCE]
    for row, hypotheses in enumerate(expected):
        indices = [h.place_index for h in hypotheses]
        assert len(indices) > 1
        assert method.predictions[row, : len(indices)].tolist() == indices
        assert (method.predictions[row, len(indices) :] == -1).all()
        assert method.confidences[row] == pytest.approx(hypotheses[0].confidence, abs=1e-12)
    assert method.correct.all()


def test_method_confs_derive_each_method_from_the_base_settings() -> None:
    base = RelocalizationConf(top_k=8, rerank_k=4, sequence={'length': 7})
    confs = method_confs(base, [RETRIEVAL, RERANKED, SEQUENCE], ns=(1, 30))
    assert (confs[RETRIEVAL].mode, confs[RETRIEVAL].rerank_k) == ('single', 0)
    assert (confs[RERANKED].mode, confs[RERANKED].rerank_k) == ('single', 4)
    assert confs[SEQUENCE].mode == 'sequence'
    # The sequence matcher answers as deep as the largest N; its own settings are kept.
    assert (confs[SEQUENCE].sequence.top_k, confs[SEQUENCE].sequence.length) == (30, 7)
    assert list(method_confs(base.replace(rerank_k=0), [RETRIEVAL, RERANKED])) == [RETRIEVAL]
    with pytest.raises(ConfigError, match="unknown evaluation method 'seqslam'"):
        method_confs(base, ['seqslam'])


def test_evaluate_runs_any_settings_as_a_method_and_ranks_retrieval_after_the_head(
    dataset: Path, default_model
) -> None:
    db_paths = list_images(dataset / 'aligned/db')
    query_paths = list_images(dataset / 'aligned/queries')
    strict = RelocalizationConf(top_k=5, rerank_k=2, min_similarity=0.5)
    result = evaluate(
        default_model,
        db_paths,
        query_paths,
        [[i] for i in range(PLACES)],
        methods={'strict-mnn': strict, 'plain': strict.replace(rerank_k=0)},
        progress=False,
    )
    assert list(result.methods) == ['strict-mnn', 'plain']
    assert result.conf['methods']['strict-mnn']['min_similarity'] == 0.5
    plain, strict_mnn = result.methods['plain'], result.methods['strict-mnn']
    assert plain.predictions.shape == strict_mnn.predictions.shape == (PLACES, 5)
    for row_plain, row_strict in zip(plain.predictions, strict_mnn.predictions):
        assert sorted(row_strict[:2]) == sorted(row_plain[:2])
        assert row_strict[2:].tolist() == row_plain[2:].tolist()


def test_evaluate_reports_retrieval_alone_on_a_map_without_local_features(
    dataset: Path, default_model, caplog: pytest.LogCaptureFixture
) -> None:
    db_paths = list_images(dataset / 'aligned/db')
    full = build_reference_database(default_model, db_paths, progress=False)
    database = PlaceDatabase(
        full.model, full.global_descriptors, full.places, strings=full.strings
    )
    result = evaluate(
        default_model,
        database,
        list_images(dataset / 'aligned/queries'),
        [[i] for i in range(PLACES)],
        progress=False,
    )
    assert list(result.methods) == [RETRIEVAL] and result.conf['rerank_k'] == 0
    assert "not evaluating 'reranked'" in caplog.text and 'local features' in caplog.text


def test_evaluate_cli_reports_sequence_matching_beside_single_frames(
    dataset: Path, tmp_path: Path
) -> None:
    code = evaluate_main(
        [
            *('--db-images', str(dataset / 'aligned/db'), '--queries'),
            *(str(dataset / 'aligned/queries'), '--gt', 'aligned', '--tolerance', '0'),
            *('--mode', 'both', '--sequence-length', '3', '--image-size', '96', '128'),
            *('--out', str(tmp_path), '--no-progress'),
        ]
    )
    assert code == 0
    results = json.loads((tmp_path / 'results.json').read_text())
    assert list(results['methods']) == [RETRIEVAL, RERANKED, SEQUENCE]
    assert results['methods'][SEQUENCE]['recall_at_n']['R@1'] == 1.0
    assert results['args']['sequence']['length'] == 3


def test_evaluate_cli_runs_sequences_over_every_query_not_only_those_with_a_positive(
    dataset: Path, tmp_path: Path
) -> None:
    # frame003 is missing from the reference: its query has no positive, but the matcher
    # must still see it, in order, rather than a route spliced from 002 to 004.
    code = evaluate_main(
        [
            *('--db-images', str(dataset / 'aligned/db'), '--db-glob', 'frame00[01245].png'),
            *('--queries', str(dataset / 'aligned/queries'), '--gt', 'aligned'),
            *('--tolerance', '0', '--mode', 'sequence', '--sequence-length', '2'),
            *('--out', str(tmp_path), '--no-progress'),
        ]
    )
    assert code == 0
    results = json.loads((tmp_path / 'results.json').read_text())
    assert results['num_queries'] == PLACES - 1 and results['num_queries_matched'] == PLACES
    assert results['skipped_queries'] == ['frame003.png']
    rows = (tmp_path / 'per_query.csv').read_text().splitlines()[1:]
    assert [row.split(',')[0] for row in rows] == [f'frame{i:03d}.png' for i in range(PLACES)]
    off_route = rows[3].split(',')
    assert off_route[1] == '' and off_route[3] == '0'  # no positive: never correct


def test_evaluate_cli_runs_patch_normalised_sequences_alone(
    dataset: Path, capsys: pytest.CaptureFixture
) -> None:
    code = evaluate_main(
        [
            *('--db-images', str(dataset / 'aligned/db'), '--queries'),
            *(str(dataset / 'aligned/queries'), '--gt', 'aligned', '--mode', 'sequence'),
            '--no-progress',
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()]
    assert [row[0] for row in rows[1:2]] == [SEQUENCE] and rows[1][1] == '100.0'
    # Six places are one exclusion window: one answer per query, so R@5 and on are unknown.
    assert rows[1][2:5] == ['n/a'] * 3
    assert (
        'sequence: R@N = a positive among the N best sequence matches, one per +-10 keyframes'
    ) in out


def test_evaluate_cli_labels_soft_duplicate_and_denominator_choices(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = evaluate_main(
        [
            *('--db-images', str(dataset / 'aligned/db'), '--db-glob', 'frame00[01235].png'),
            *('--queries', str(dataset / 'aligned/queries'), '--gt', 'aligned'),
            *('--tolerance', '0', '--soft-tolerance', '1', '--duplicate-frames'),
            *('--recall-denominator', 'all', '--methods', RETRIEVAL, '--image-size', '96', '128'),
            *('--threads', '1', '--out', str(tmp_path), '--no-progress'),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    # frame004's query has no reference: a miss out of all six.
    assert 'recall denominator: all 6 queries (1 without a positive count as misses)' in out
    assert 'duplicate frames: 0 queries and 0 references repeat the frame before them' in out
    results = json.loads((tmp_path / 'results.json').read_text())
    retrieval = results['methods'][RETRIEVAL]
    assert retrieval['recall_at_n']['R@1'] == pytest.approx(5 / 6)
    assert results['recall_denominator']['queries'] == 6
    assert results['args']['soft_tolerance'] == 1 and results['args']['duplicate_frames']
    assert len(results['ground_truth_notes']) == 2
    for curve, label in (('pr_by_confidence', 'confidence'), ('pr_by_similarity', 'similarity')):
        assert retrieval[curve]['ranked_by'].startswith(f'by {label}')
        assert retrieval[curve]['recall_at_100_precision'] <= 5 / 6
    header = (tmp_path / 'per_query.csv').read_text().splitlines()[0]
    assert header.endswith('retrieval_similarity,retrieval_latency_ms,retrieval_near_miss')


@pytest.mark.parametrize(
    ('args', 'message'),
    [
        (['--gt', 'aligned', '--map', 'MAP'], "--gt 'aligned' needs reference file names"),
        (['--gt', 'gps', '--db-images', 'DB'], "unknown --gt 'gps'"),
        (['--gt', 'vprbench', '--db-images', 'DB'], 'needs a file'),
        (['--gt', 'utm', '--db-images', 'DB', '--limit', '0'], '--limit must be >= 1'),
        (
            ['--gt', 'aligned', '--db-images', 'DB', '--mode', 'both', '--limit', '5'],
            'breaks sequences',
        ),
        (['--gt', 'csv', '--db-images', 'DB'], 'needs a file: --gt csv:data.csv'),
        (['--gt', 'folder:x.csv', '--db-images', 'DB'], "unknown --gt 'folder:x.csv'"),
        (['--gt', 'utm', '--db-images', 'DB', '--radius-m', '-1'], 'radius_m must be >= 0'),
        (
            ['--gt', 'aligned', '--db-images', 'DB', '--methods', 'sequence', '--limit', '5'],
            'breaks sequences',
        ),
        (
            ['--gt', 'aligned', '--db-images', 'DB', '--mode', 'both', '--sequence-length', '0'],
            'length must be >= 1',
        ),
        (
            ['--gt', 'utm', '--db-images', 'DB', '--soft-tolerance', '5'],
            '--soft-tolerance applies to --gt aligned, not',
        ),
        (['--gt', 'utm', '--map', 'MAP', '--duplicate-frames'], 'a map does not keep'),
        (['--gt', 'utm', '--db-images', 'DB', '--soft-radius-m', '5'], 'inside radius_m'),
    ],
)
def test_evaluate_cli_reports_bad_options_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], message: str
) -> None:
    args = [a.replace('MAP', str(tmp_path)).replace('DB', str(tmp_path)) for a in args]
    code = evaluate_main(['--queries', str(tmp_path), *args])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith('error: ') and message in err


def test_evaluate_cli_refuses_a_pickled_vprbench_file(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    gt = vprbench_object_array(tmp_path / 'ground_truth_new.npy')
    code = evaluate_main(
        [
            *('--db-images', str(dataset / 'aligned/db'), '--queries'),
            *(str(dataset / 'aligned/queries'), '--gt', f'vprbench:{gt}'),
        ]
    )
    assert code == 1
    assert 'pickled object array' in capsys.readouterr().err


def test_evaluate_cli_scores_a_route_with_a_pose_table(dataset: Path, tmp_path: Path) -> None:
    # One route folder with db/ and queries/ and a hand-written data.csv (campus_route's
    # format, no header): references every 100 m, each query 3 m from its own. The file
    # names repeat across db/ and queries/, so the rows name them by their relative path.
    route = tmp_path / 'route'
    shutil.copytree(dataset / 'aligned/db', route / 'db')
    shutil.copytree(dataset / 'aligned/queries', route / 'queries')
    lines = [f'db/frame{i:03d}.png,{SPACING_M * i},0,0' for i in range(PLACES)]
    lines += [f'queries/frame{i:03d}.png,{SPACING_M * i + 3},0,1.5' for i in range(PLACES)]
    (route / 'data.csv').write_text('\n'.join(lines) + '\n')
    code = evaluate_main(
        [
            *('--db-images', str(route), '--db-glob', 'db/*', '--queries', str(route)),
            *('--query-glob', 'queries/*', '--gt', f'csv:{route / "data.csv"}'),
            *('--radius-m', '5', '--top-k', '3', '--out', str(tmp_path / 'out'), '--no-progress'),
        ]
    )
    assert code == 0
    results = json.loads((tmp_path / 'out' / 'results.json').read_text())
    assert results['num_queries'] == PLACES and results['args']['radius_m'] == 5
    for name in (RETRIEVAL, RERANKED):
        assert results['methods'][name]['recall_at_n']['R@1'] == 1.0
    rows = (tmp_path / 'out' / 'per_query.csv').read_text().splitlines()[1:]
    assert [row.split(',')[:2] for row in rows] == [
        [f'queries/frame{i:03d}.png', str(i)] for i in range(PLACES)
    ]


def test_evaluate_cli_finds_pose_table_rows_by_file_name(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # A data.csv per traverse, as campus_route has: the file names are the keys.
    root = dataset / 'aligned'
    db_table = tmp_path / 'poses.csv'
    db_table.write_text(
        'file,x,y\n' + ''.join(f'frame{i:03d}.png,{SPACING_M * i},0\n' for i in range(PLACES))
    )
    code = evaluate_main(
        [
            *('--db-images', str(root / 'db'), '--queries', str(root / 'queries')),
            *('--gt', f'csv:{db_table}', '--radius-m', '10', '--rerank-k', '0'),
            *('--methods', 'sequence', 'retrieval', '--sequence-length', '2'),
            *('--out', str(tmp_path / 'out'), '--no-progress'),
        ]
    )
    assert code == 0, capsys.readouterr().err
    results = json.loads((tmp_path / 'out' / 'results.json').read_text())
    assert list(results['methods']) == [SEQUENCE, RETRIEVAL]
    assert results['args']['gt'] == f'csv:{db_table}' and results['args']['radius_m'] == 10
    for method in results['methods'].values():
        assert method['recall_at_n']['R@1'] == 1.0
    rows = (tmp_path / 'out' / 'per_query.csv').read_text().splitlines()
    assert rows[0].split(',')[:2] == ['query', 'positives'] and len(rows) == PLACES + 1
    assert [row.split(',')[1] for row in rows[1:]] == [str(i) for i in range(PLACES)]


def test_evaluate_cli_refuses_patch_normalised_sequences_on_a_map_without_them(
    dataset: Path, tmp_path: Path, default_model, capsys: pytest.CaptureFixture
) -> None:
    db_paths = list_images(dataset / 'utm/db')
    positions = np.array([parse_utm(p) for p in db_paths])
    full = build_reference_database(default_model, db_paths, positions=positions)
    PlaceDatabase(full.model, full.global_descriptors, full.places, strings=full.strings).save(
        tmp_path / 'map'
    )
    folders = ['--queries', str(dataset / 'utm/queries'), '--gt', 'utm', '--no-progress']
    code = evaluate_main(['--map', str(tmp_path / 'map'), *folders, '--mode', 'sequence'])
    assert code == 1
    err = capsys.readouterr().err
    assert 'needs a map built with sequence descriptors' in err and "'global'" in err
    code = evaluate_main(
        ['--map', str(tmp_path / 'map'), *folders, '--mode', 'sequence']
        + ['--sequence-descriptor', 'global']
    )
    assert code == 0
    assert capsys.readouterr().out.splitlines()[1].startswith(SEQUENCE)


def test_importing_the_evaluate_command_leaves_torch_for_the_run() -> None:
    # --help and mistakes in the flags must answer at once: no torch, faiss or scipy yet.
    code = (
        'import sys, vpr_ros.cli.evaluate as e; e.make_parser(); '
        "print(sorted(m for m in ('torch', 'faiss', 'scipy', 'timm') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, '-c', code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == '[]'


def test_evaluate_cli_refuses_a_reranker_the_map_cannot_serve_before_the_model_loads(
    dataset: Path, tmp_path: Path, default_model, capsys: pytest.CaptureFixture
) -> None:
    db_paths = list_images(dataset / 'utm/db')
    positions = np.array([parse_utm(p) for p in db_paths])
    database = build_reference_database(default_model, db_paths, positions=positions)
    database.save(tmp_path / 'map')
    folders = ['--queries', str(dataset / 'utm/queries'), '--gt', 'utm']
    code = evaluate_main(
        ['--map', str(tmp_path / 'map'), *folders, '--reranker', 'xfeat_lighterglue']
    )
    assert code == 1
    error = capsys.readouterr().err
    assert "re-ranker 'xfeat_lighterglue' needs the keypoints" in error
    assert 'build_map ... --verifiers xfeat_lighterglue' in error


def test_evaluate_cli_runs_a_keypoint_verifier_on_reference_images(
    dataset: Path, capsys: pytest.CaptureFixture
) -> None:
    folders = ['--db-images', str(dataset / 'aligned/db'), '--queries']
    folders += [str(dataset / 'aligned/queries'), '--gt', 'aligned', '--no-progress']
    code = evaluate_main([*folders, '--reranker', 'xfeat_lighterglue', '--rerank-k', '3'])
    assert code == 0
    table = capsys.readouterr().out
    reranked_row = next(line for line in table.splitlines() if line.startswith('reranked'))
    assert reranked_row.split()[1] == '100.0'  # R@1


def test_evaluate_runs_on_onnxruntime_when_an_export_exists_and_scores_as_torch(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vpr_ros.cli.export_onnx import main as export_main
    from vpr_ros.extraction import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / 'cache'))
    root = str(dataset / 'folders')
    model = 'selavpr_tiny_random'
    assert export_main(['--model', model]) == 0
    per_query = {}
    for backend in ('auto', 'torch'):
        out = tmp_path / backend
        code = evaluate_main(
            [
                *('--db-images', root, '--db-glob', '*/i0/*', '--queries', root),
                *('--query-glob', '*/i1/*', '--gt', 'folder', '--model', model),
                *('--backend', backend, '--out', str(out), '--no-progress'),
            ]
        )
        assert code == 0
        results = json.loads((out / 'results.json').read_text())
        assert results['args']['backend'] == ('onnxruntime' if backend == 'auto' else 'torch')
        per_query[backend] = [
            line.split(',')[:3] for line in (out / 'per_query.csv').read_text().splitlines()
        ]
    assert per_query['auto'] == per_query['torch']
