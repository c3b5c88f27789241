"""Evaluation: metrics on hand-computed queries, every ground-truth format, end-to-end runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import synthetic_place, viewed_again

from vpr_ros.cli.evaluate import main as evaluate_main
from vpr_ros.errors import ConfigError, ImageDecodeError
from vpr_ros.evaluation import (
    RERANKED,
    RETRIEVAL,
    SEQUENCE,
    build_reference_database,
    evaluate,
    evaluate_sequence,
    evenly_spaced,
    sequence_descriptors,
)
from vpr_ros.ground_truth import (
    VPRBENCH_CONVERSION,
    positives_frame_aligned,
    positives_from_utm,
    positives_from_vprbench,
    positives_same_folder,
    positives_within_radius,
)
from vpr_ros.imagefolders import list_images, load_image, natural_key, parse_utm
from vpr_ros.metrics import (
    first_hit_ranks,
    precision_recall_curve,
    recall_at_100_precision,
    recall_at_n,
)
from vpr_ros.results import plot_pr_curve, summarize

PLACES = 6
SPACING_M = 100.0  # places far apart: exactly one positive within 25 m


def as_lists(positives: list[np.ndarray]) -> list[list[int]]:
    return [p.tolist() for p in positives]


# -- metrics --------------------------------------------------------------------------------


def test_recall_at_n_is_cumulative_over_hand_computed_queries() -> None:
    predictions = np.array(
        [
            [3, 1, 2, 0, 4],  # first positive at rank 0
            [0, 5, 7, 6, 2],  # first positive at rank 2
            [1, 2, 3, 4, 5],  # none
            [9, 8, 7, 6, -1],  # first positive at rank 3 (-1 pads)
        ]
    )
    positives = [{3}, {7, 9}, {0}, [6]]
    recalls = recall_at_n(predictions, positives, ns=(1, 2, 3, 4, 5, 20))
    assert recalls == {1: 0.25, 2: 0.25, 3: 0.5, 4: 0.75, 5: 0.75, 20: 0.75}


def test_recall_at_n_never_counts_padding_as_a_match() -> None:
    assert recall_at_n(np.array([[-1, -1]]), [{-1}], ns=(1, 2)) == {1: 0.0, 2: 0.0}


def test_precision_recall_curve_on_hand_computed_queries_with_a_tie() -> None:
    correct = np.array([True, True, False, True])
    confidence = np.array([0.9, 0.8, 0.8, 0.1])
    precision, recall, thresholds = precision_recall_curve(correct, confidence)
    # >= 0.9: 1 accepted, 1 right; >= 0.8: 3 accepted (tie), 2 right; >= 0.1: 4, 3 right.
    np.testing.assert_allclose(thresholds, [0.9, 0.8, 0.1])
    np.testing.assert_allclose(precision, [1.0, 2 / 3, 0.75])
    np.testing.assert_allclose(recall, [0.25, 0.5, 0.75])
    assert recall_at_100_precision(correct, confidence) == 0.25


def test_recall_at_100_precision_takes_the_largest_perfect_threshold() -> None:
    correct = np.array([True, True, True, False, True])
    confidence = np.array([0.9, 0.7, 0.5, 0.3, 0.2])
    assert recall_at_100_precision(correct, confidence) == pytest.approx(0.6)


def test_recall_at_100_precision_is_zero_when_the_most_confident_answer_is_wrong() -> None:
    correct = np.array([False, True, True])
    assert recall_at_100_precision(correct, np.array([0.9, 0.5, 0.4])) == 0.0


def test_summarize_marks_recall_beyond_the_returned_candidates_unknown() -> None:
    predictions = np.array([[0, 1], [2, 1]])
    method = summarize(
        'x', predictions, [0.5, 0.2], [{0}, {1}], [0.01, 0.03], num_db=10, ns=(1, 2, 5)
    )
    assert method.recalls == {1: 0.5, 2: 1.0, 5: None}
    assert method.correct.tolist() == [True, False]
    assert method.recall_at_100_precision == 0.5
    assert method.latency_median_ms == pytest.approx(20.0)
    # A reference of only 2 places: all of it was returned, so Recall@5 is known.
    small = summarize('x', predictions, [0.5, 0.2], [{0}, {1}], [0.01, 0.03], num_db=2, ns=(5,))
    assert small.recalls == {5: 1.0}


def test_summarize_scores_an_empty_query_set_without_a_reshape_error() -> None:
    method = summarize('x', np.zeros((0, 4), np.int64), [], [], [], num_db=3, ns=(1, 5))
    assert method.predictions.shape == (0, 4)
    assert all(math.isnan(r) for r in method.recalls.values())
    assert first_hit_ranks(np.zeros((0, 4), np.int64), []).shape == (0,)


def test_queries_without_a_positive_are_out_of_recall_but_wrong_if_accepted() -> None:
    # Query 1 is off the map; the method answers it with the highest confidence.
    predictions = np.array([[0, 1], [2, 0], [1, 2], [3, 2]])
    positives = [[0], [], [1], [2]]
    confidences = [0.5, 0.9, 0.4, 0.3]
    method = summarize('x', predictions, confidences, positives, [0.01] * 4, num_db=4, ns=(1, 2))
    # Recall@N over the three queries with a positive only.
    assert method.recalls == pytest.approx({1: 2 / 3, 2: 1.0})
    assert method.correct.tolist() == [True, False, True, False]
    # Accepting the off-map query first breaks 100 % precision at once ...
    assert method.recall_at_100_precision == 0.0
    np.testing.assert_allclose(method.precision, [0.0, 0.5, 2 / 3, 0.5])
    # ... and recall's denominator is the 3 queries with a positive.
    np.testing.assert_allclose(method.recall, [0.0, 1 / 3, 2 / 3, 2 / 3])
    # Rejecting it (lowest confidence) costs no recall.
    confidences = [0.5, 0.1, 0.4, 0.3]
    rejected = summarize('x', predictions, confidences, positives, [0.01] * 4, num_db=4)
    assert rejected.recall_at_100_precision == pytest.approx(2 / 3)


def test_plot_pr_curve_writes_a_png(tmp_path: Path) -> None:
    path = plot_pr_curve(
        {'a': (np.array([1.0, 0.5]), np.array([0.5, 0.5])), 'empty': (np.zeros(0), np.zeros(0))},
        tmp_path / 'plots' / 'pr.png',
    )
    image = cv2.imread(str(path))
    assert image is not None and image.shape[0] > 100


def test_evenly_spaced_spreads_the_limit_over_all_queries() -> None:
    assert evenly_spaced(10, 3).tolist() == [0, 4, 9]
    assert evenly_spaced(4, None).tolist() == [0, 1, 2, 3]
    assert evenly_spaced(4, 9).tolist() == [0, 1, 2, 3]


# -- ground truth -----------------------------------------------------------------------------


def test_parse_utm_reads_east_and_north_from_the_file_name() -> None:
    assert parse_utm('db/@585000.5@4477000.25@17@T@@@@@.jpg') == (585000.5, 4477000.25)
    with pytest.raises(ConfigError, match='no UTM coordinates'):
        parse_utm('images-00001.png')


def test_positives_from_utm_use_the_radius_inclusively() -> None:
    db = ['@0@0@.jpg', '@20@0@.jpg', '@25@0@.jpg', '@60@0@.jpg']
    queries = ['@0@0@q.jpg', '@60@10@q.jpg', '@500@500@q.jpg']
    positives = positives_from_utm(db, queries, radius_m=25)
    assert as_lists(positives) == [[0, 1, 2], [3], []]
    assert as_lists(positives_from_utm(db, queries[:1], radius_m=5)) == [[0]]


def test_positives_within_radius_need_every_reference_position() -> None:
    with pytest.raises(ConfigError, match='NaN'):
        positives_within_radius(np.array([[0.0, np.nan]]), np.zeros((1, 2)), 25)


def test_vprbench_bool_matrix_and_ranges_load_without_pickle(tmp_path: Path) -> None:
    matrix = np.array([[True, False, True], [False, False, False]])
    np.save(tmp_path / 'matrix.npy', matrix)
    assert as_lists(positives_from_vprbench(tmp_path / 'matrix.npy', num_queries=2)) == [
        [0, 2],
        [],
    ]
    np.save(tmp_path / 'ranges.npy', np.array([[1, 3], [0, 0], [-1, -1]]))
    positives = positives_from_vprbench(tmp_path / 'ranges.npy', num_db=4)
    assert as_lists(positives) == [[1, 2, 3], [0], []]


def test_vprbench_npz_variants_load_without_pickle(tmp_path: Path) -> None:
    np.savez(tmp_path / 'pairs.npz', query_index=[0, 0, 2], db_index=[5, 4, 1], num_queries=4)
    assert as_lists(positives_from_vprbench(tmp_path / 'pairs.npz')) == [[4, 5], [], [1], []]
    np.savez(tmp_path / 'positives.npz', positives=np.eye(2, dtype=bool))
    assert as_lists(positives_from_vprbench(tmp_path / 'positives.npz')) == [[0], [1]]
    np.savez(tmp_path / 'ranges.npz', ranges=np.array([[2, 3]]))
    assert as_lists(positives_from_vprbench(tmp_path / 'ranges.npz')) == [[2, 3]]


def vprbench_object_array(path: Path) -> Path:
    """A file laid out like VPR-Bench's ground_truth_new.npy (needs pickle)."""
    rows = np.empty((3, 2), dtype=object)
    rows[0] = [0, [1, 2]]
    rows[1] = [1, []]
    rows[2] = [2, np.array([4])]
    np.save(path, rows, allow_pickle=True)
    return path


def test_vprbench_object_array_is_refused_with_the_conversion_command(tmp_path: Path) -> None:
    path = vprbench_object_array(tmp_path / 'ground_truth_new.npy')
    with pytest.raises(ConfigError, match='pickled object array') as info:
        positives_from_vprbench(path)
    assert VPRBENCH_CONVERSION in str(info.value)


def test_vprbench_conversion_command_gives_a_file_that_loads(tmp_path: Path) -> None:
    vprbench_object_array(tmp_path / 'ground_truth_new.npy')
    command = VPRBENCH_CONVERSION.replace('python -c ', '', 1).strip('"')
    subprocess.run([sys.executable, '-c', command], cwd=tmp_path, check=True)
    positives = positives_from_vprbench(tmp_path / 'ground_truth.npz', num_queries=3)
    assert as_lists(positives) == [[1, 2], [], [4]]


def test_vprbench_mismatches_are_reported(tmp_path: Path) -> None:
    np.save(tmp_path / 'gt.npy', np.array([[0, 7]]))
    with pytest.raises(ConfigError, match='1 queries, but there are 2'):
        positives_from_vprbench(tmp_path / 'gt.npy', num_queries=2)
    with pytest.raises(ConfigError, match='reference index 7'):
        positives_from_vprbench(tmp_path / 'gt.npy', num_db=5)
    np.save(tmp_path / 'float.npy', np.ones((2, 3)))
    with pytest.raises(ConfigError, match='dtype float64'):
        positives_from_vprbench(tmp_path / 'float.npy')
    with pytest.raises(FileNotFoundError):
        positives_from_vprbench(tmp_path / 'missing.npy')


def test_frame_aligned_positives_take_neighbours_in_name_order() -> None:
    db = ['f03.png', 'f00.png', 'f01.png', 'f02.png', 'f04.png', 'f05.png']  # unsorted
    queries = ['f00.png', 'f03.png', 'f05.png', 'other.png']
    positives = positives_frame_aligned(db, queries, tolerance=1)
    # f00 -> f00, f01; f03 -> f02..f04; f05 -> f04, f05 (as indices into db).
    assert as_lists(positives) == [[1, 2], [0, 3, 4], [4, 5], []]
    assert as_lists(positives_frame_aligned(db, ['f02.png'], tolerance=0)) == [[3]]


def test_frame_aligned_positives_order_frame_numbers_by_value() -> None:
    db = ['f1.png', 'f10.png', 'f11.png', 'f2.png', 'f9.png']  # plain sort order
    positives = positives_frame_aligned(db, ['f2.png', 'f10.png'], tolerance=1)
    # Frame order is f1, f2, f9, f10, f11: f2 -> f1..f9; f10 -> f9..f11.
    assert as_lists(positives) == [[0, 3, 4], [1, 2, 4]]


def test_natural_key_orders_digit_runs_by_value() -> None:
    names = ['run2/10.png', 'run10/1.png', 'run2/9.png', 'run2/09b.png', 'a.png']
    assert sorted(names, key=natural_key) == [
        'a.png',
        'run2/9.png',
        'run2/09b.png',
        'run2/10.png',
        'run10/1.png',
    ]


def test_same_folder_positives_group_by_leading_folders() -> None:
    db = ['p0/i0/a.jpg', 'p1/i0/b.jpg', 'p1/i0/c.jpg']
    queries = ['p1/i1/x.jpg', 'p0/i2/y.jpg', 'p9/i1/z.jpg']
    assert as_lists(positives_same_folder(db, queries)) == [[1, 2], [0], []]
    assert as_lists(positives_same_folder(db, ['p1/i0/q.jpg'], depth=2)) == [[1, 2]]
    with pytest.raises(ConfigError, match='no folder at depth 1'):
        positives_same_folder(['a.jpg'], ['b.jpg'])


def test_images_are_listed_sorted_and_loaded_as_rgb(tmp_path: Path) -> None:
    image = np.zeros((8, 8, 3), np.uint8)
    image[..., 0] = 200  # red in RGB
    cv2.imwrite(str(tmp_path / 'b.png'), image[..., ::-1])
    cv2.imwrite(str(tmp_path / 'a.png'), image[..., ::-1])
    (tmp_path / 'notes.txt').write_text('not an image')
    paths = list_images(tmp_path)
    assert [p.name for p in paths] == ['a.png', 'b.png']
    assert load_image(paths[0])[0, 0].tolist() == [200, 0, 0]
    (tmp_path / 'broken.png').write_bytes(b'not a png')
    with pytest.raises(ImageDecodeError, match='broken.png'):
        load_image(tmp_path / 'broken.png')
    with pytest.raises(ConfigError, match='no images'):
        list_images(tmp_path, '*.jpg')


def test_images_are_listed_in_frame_number_order(tmp_path: Path) -> None:
    image = np.zeros((4, 4, 3), np.uint8)
    for i in (1, 2, 10, 11, 9):
        cv2.imwrite(str(tmp_path / f'{i}.png'), image)
    names = [p.name for p in list_images(tmp_path)]
    assert names == ['1.png', '2.png', '9.png', '10.png', '11.png']


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
    assert f'{PLACES} queries (1 skipped without a positive)' in table
    assert 'R@N leaves them out, R@100%P counts an accepted answer to one as wrong' in table


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
        assert 0.0 <= method['recall_at_100_precision'] <= 1.0
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
    assert '3 queries (0 skipped without a positive) vs 6 reference places' in table
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
    assert list(results['methods']) == [RETRIEVAL]
    assert results['methods'][RETRIEVAL]['recall_at_n']['R@1'] == 1.0


def test_evaluate_sequence_follows_a_planted_route() -> None:
    rng = np.random.default_rng(0)
    route = rng.normal(size=(60, 32)).astype(np.float32)
    route /= np.linalg.norm(route, axis=1, keepdims=True)
    # The query drives places 10..39 again, one place per frame, with noisy descriptors.
    queries = route[10:40] + 0.3 * rng.normal(size=(30, 32)).astype(np.float32)
    positives = [np.array([10 + i]) for i in range(30)]
    method = evaluate_sequence(
        queries, route, positives, {'length': 5, 'descriptor': 'global'}, progress=False
    )
    assert method.name == SEQUENCE
    assert method.predictions.shape == (30, 20)
    # Single frames are often wrong at this noise; once a few frames are in, the sequence
    # is always right (the first frames have little sequence to go on).
    single_frame = (queries @ route.T).argmax(axis=1) == np.arange(10, 40)
    assert single_frame.mean() < 0.85
    assert method.correct[3:].all()
    assert method.recalls[1] > single_frame.mean()
    assert (method.confidences > 0).all() and (method.latencies_s > 0).all()


def test_sequence_descriptors_are_patch_normalised_per_image(dataset: Path) -> None:
    paths = list_images(dataset / 'aligned/db')
    descriptors, seconds = sequence_descriptors(paths, {'descriptor': 'patch_norm'})
    assert descriptors.shape == (PLACES, 64 * 32) and seconds.shape == (PLACES,)
    np.testing.assert_allclose(np.linalg.norm(descriptors, axis=1), 1.0, rtol=1e-5)


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


def test_evaluate_cli_runs_patch_normalised_sequences_without_a_model(
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
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [row[0] for row in rows[1:2]] == [SEQUENCE] and rows[1][1] == '100.0'


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
        (
            ['--gt', 'utm', '--map', 'MAP', '--mode', 'sequence'],
            'use --sequence-descriptor global',
        ),
        (
            ['--gt', 'aligned', '--db-images', 'DB', '--mode', 'both', '--sequence-length', '0'],
            'length must be >= 1',
        ),
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
