"""Ground truth: every kind, from hand-written files and names; soft ground truth and
duplicate frames on hand-computed cases."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from vpr_ros.errors import ConfigError
from vpr_ros.ground_truth import (
    VPRBENCH_CONVERSION,
    GroundTruthConf,
    MapPlaces,
    check_refinements,
    duplicate_runs,
    ground_truth_choices,
    load_ground_truth,
    parse_ground_truth,
    positives_frame_aligned,
    positives_from_utm,
    positives_from_vprbench,
    positives_same_folder,
    positives_within_radius,
    widen_over_duplicates,
)
from vpr_ros.imagefolders import ImageFolder


def as_lists(positives: list[np.ndarray]) -> list[list[int]]:
    return [p.tolist() for p in positives]


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


def test_same_folder_positives_group_by_leading_folders() -> None:
    db = ['p0/i0/a.jpg', 'p1/i0/b.jpg', 'p1/i0/c.jpg']
    queries = ['p1/i1/x.jpg', 'p0/i2/y.jpg', 'p9/i1/z.jpg']
    assert as_lists(positives_same_folder(db, queries)) == [[1, 2], [0], []]
    assert as_lists(positives_same_folder(db, ['p1/i0/q.jpg'], depth=2)) == [[1, 2]]
    with pytest.raises(ConfigError, match='no folder at depth 1'):
        positives_same_folder(['a.jpg'], ['b.jpg'])


# -- the kinds evaluate offers ----------------------------------------------------------------


def route_folder(root: Path, names: list[str]) -> ImageFolder:
    """An image folder (the files need not exist: ground truth only reads names)."""
    return ImageFolder(root, [root / name for name in names])


def write_poses(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_csv_ground_truth_takes_references_within_the_radius_of_each_query(
    tmp_path: Path,
) -> None:
    # A route along x: references every 4 m, queries between them and one off the route.
    table = write_poses(
        tmp_path / 'data.csv',
        'file,x,y,yaw\n'
        'db/r0.png,0,0,0\ndb/r1.png,4,0,0\ndb/r2.png,8,0,0\ndb/r3.png,12,0,0\n'
        'q0.png,1,0,0\nq1.png,10,0.5,0\nq2.png,50,50,0\n',
    )
    reference = route_folder(tmp_path / 'db', ['r0.png', 'r1.png', 'r2.png', 'r3.png'])
    queries = route_folder(tmp_path / 'queries', ['q0.png', 'q1.png', 'q2.png'])
    truth = load_ground_truth(f'csv:{table}', queries, reference, GroundTruthConf(radius_m=3.5))
    # q0 (1 m) -> r0 (1 m), r1 (3 m); q1 (10 m) -> r2, r3 (about 2 m each); q2: none.
    assert as_lists(truth.positives) == [[0, 1], [2, 3], []]
    np.testing.assert_array_equal(truth.reference_positions, [[0, 0], [4, 0], [8, 0], [12, 0]])
    # r1 is 6.02 m from q1.
    wider = load_ground_truth(f'csv:{table}', queries, reference, GroundTruthConf(radius_m=6.5))
    assert as_lists(wider.positives) == [[0, 1], [1, 2, 3], []]


def test_csv_ground_truth_against_a_map_uses_the_place_poses(tmp_path: Path) -> None:
    table = write_poses(tmp_path / 'data.csv', 'q0.png,1,0\nq1.png,9,0\n')
    queries = route_folder(tmp_path, ['q0.png', 'q1.png'])
    places = MapPlaces(tmp_path / 'map', np.array([[0.0, 0.0], [10.0, 0.0], [20.0, 0.0]]))
    truth = load_ground_truth(f'csv:{table}', queries, places, GroundTruthConf(radius_m=2))
    assert as_lists(truth.positives) == [[0], [1]] and truth.reference_positions is None
    unposed = MapPlaces(tmp_path / 'map', np.array([[0.0, 0.0], [np.nan, np.nan]]))
    with pytest.raises(ConfigError, match='places without poses; --gt csv needs a map'):
        load_ground_truth(f'csv:{table}', queries, unposed)
    far = MapPlaces(tmp_path / 'map', np.array([[50_000.0, 0.0]]))
    with pytest.raises(ConfigError, match='same frame as the positions in'):
        load_ground_truth(f'csv:{table}', queries, far)


def test_csv_ground_truth_names_the_images_without_a_row(tmp_path: Path) -> None:
    table = write_poses(tmp_path / 'data.csv', 'file,x,y\nq0.png,0,0\nr0.png,1,1\n')
    queries = route_folder(tmp_path, ['q0.png', 'q1.png'])
    with pytest.raises(ConfigError, match="no row for 1 of 2 images .*'q1.png'"):
        load_ground_truth(f'csv:{table}', queries, route_folder(tmp_path, ['r0.png']))
    with pytest.raises(FileNotFoundError, match='missing.csv'):
        load_ground_truth(f'csv:{tmp_path / "missing.csv"}', queries, queries)


def test_every_kind_loads_through_the_table(tmp_path: Path) -> None:
    reference = route_folder(tmp_path, ['p0/i0/@0@0@a.png', 'p1/i0/@100@0@b.png'])
    queries = route_folder(tmp_path, ['p1/i1/@98@0@c.png'])
    np.save(tmp_path / 'gt.npy', np.array([[False, True]]))
    for value in ('utm', 'folder', f'vprbench:{tmp_path / "gt.npy"}'):
        assert as_lists(load_ground_truth(value, queries, reference).positives) == [[1]]
    aligned = route_folder(tmp_path, ['p1/i0/@100@0@b.png'])
    exact = GroundTruthConf(tolerance=0)
    assert as_lists(load_ground_truth('aligned', aligned, reference, exact).positives) == [[1]]
    utm = load_ground_truth('utm', queries, reference)
    np.testing.assert_array_equal(utm.reference_positions, [[0, 0], [100, 0]])


@pytest.mark.parametrize(
    ('value', 'with_map', 'message'),
    [
        ('gps', False, "unknown --gt 'gps'; choose one of \\['utm', 'csv:FILE'"),
        ('utm:poses.csv', False, "unknown --gt 'utm:poses.csv'"),
        ('csv', False, '--gt csv needs a file: --gt csv:data.csv'),
        ('vprbench:', False, '--gt vprbench needs a file'),
        ('folder', True, "--gt 'folder' needs reference file names; with --map use --gt utm"),
    ],
)
def test_bad_ground_truth_values_are_refused_with_the_choices(
    value: str, with_map: bool, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_ground_truth(value, with_map=with_map)


def test_ground_truth_values_parse_into_a_kind_and_a_file() -> None:
    assert parse_ground_truth('csv:route/data.csv') == ('csv', Path('route/data.csv'))
    assert parse_ground_truth('utm', with_map=True) == ('utm', None)
    assert ground_truth_choices(with_map=True) == ['utm', 'csv:FILE', 'vprbench:FILE']


# -- soft ground truth and duplicate frames ---------------------------------------------------


def test_soft_ground_truth_widens_the_radius_of_utm_positives(tmp_path: Path) -> None:
    reference = route_folder(tmp_path, ['@0@0@a.png', '@20@0@b.png', '@40@0@c.png'])
    queries = route_folder(tmp_path, ['@2@0@q.png', '@300@0@r.png'])
    conf = GroundTruthConf(radius_m=10, soft_radius_m=30)
    truth = load_ground_truth('utm', queries, reference, conf)
    # The query at 2 m: a (2 m) a positive; b (18 m) a soft one; c (38 m) neither.
    assert as_lists(truth.positives) == [[0], []]
    assert truth.soft_positives is not None
    assert as_lists(truth.soft_positives) == [[0, 1], []]
    assert 'a top-1 answer within 30 m that is not a positive is a near miss' in truth.notes[0]
    assert load_ground_truth('utm', queries, reference).soft_positives is None


def test_soft_ground_truth_widens_the_tolerance_of_aligned_frames(tmp_path: Path) -> None:
    names = [f'f{i}.png' for i in range(8)]
    conf = GroundTruthConf(tolerance=1, soft_tolerance=3)
    truth = load_ground_truth(
        'aligned', route_folder(tmp_path, ['f4.png']), route_folder(tmp_path, names), conf
    )
    assert as_lists(truth.positives) == [[3, 4, 5]]
    assert truth.soft_positives is not None
    assert as_lists(truth.soft_positives) == [[1, 2, 3, 4, 5, 6, 7]]


@pytest.mark.parametrize(
    ('gt', 'conf', 'with_map', 'message'),
    [
        ('folder', {'soft_radius_m': 50.0}, False, "applies to --gt utm or csv, not 'folder'$"),
        ('utm', {'soft_tolerance': 5}, False, '--gt utm widens with --soft-radius-m'),
        ('utm', {'duplicate_frames': True}, True, '--duplicate-frames compares the reference'),
    ],
)
def test_a_refinement_the_ground_truth_cannot_use_is_refused(
    gt: str, conf: dict, with_map: bool, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        check_refinements(gt, GroundTruthConf.from_dict(conf), with_map=with_map)


def test_soft_tolerances_inside_the_hard_ones_are_refused() -> None:
    with pytest.raises(ConfigError, match='soft_radius_m 10.0 is inside radius_m 25.0'):
        GroundTruthConf(soft_radius_m=10)
    with pytest.raises(ConfigError, match='use 0 \\(none\\) or >= tolerance'):
        GroundTruthConf(tolerance=2, soft_tolerance=1)


def test_duplicate_runs_label_identical_consecutive_frames() -> None:
    a, b = np.zeros((2, 3, 3), np.uint8), np.ones((2, 3, 3), np.uint8)
    frames = [a, a.copy(), b, a, a, np.zeros((3, 2, 3), np.uint8)]
    # Equal only to the frame before counts: the second run of a is a new run.
    assert duplicate_runs(frames).tolist() == [0, 0, 1, 2, 2, 3]
    assert duplicate_runs([]).tolist() == []


def test_duplicate_frames_widen_positives_over_both_runs() -> None:
    # Queries 0-2 are one stop (identical frames), references 4 and 5 another.
    query_runs = np.array([0, 0, 0, 1, 2, 3, 4, 5])
    reference_runs = np.array([0, 1, 2, 3, 4, 4, 5, 6, 7])
    aligned = [np.arange(max(q - 1, 0), min(q + 1, 8) + 1) for q in range(8)]
    widened = widen_over_duplicates(aligned, query_runs, reference_runs)
    # Queries 0-2 share [0..3]; query 3's [2..4] takes in 5, a copy of 4; query 6's [5..7]
    # takes in 4; the others keep +-1.
    assert as_lists(widened) == [
        [0, 1, 2, 3],
        [0, 1, 2, 3],
        [0, 1, 2, 3],
        [2, 3, 4, 5],
        [3, 4, 5],
        [4, 5, 6],
        [4, 5, 6, 7],
        [6, 7, 8],
    ]
    with pytest.raises(ValueError, match='2 query run labels for 8 queries'):
        widen_over_duplicates(aligned, query_runs[:2], reference_runs)


def test_duplicate_frames_read_the_images_of_both_folders(tmp_path: Path) -> None:
    def write(folder: str, shades: list[int]) -> ImageFolder:
        for i, shade in enumerate(shades):
            path = tmp_path / folder / f'f{i}.png'
            path.parent.mkdir(exist_ok=True)
            cv2.imwrite(str(path), np.full((4, 6, 3), shade, np.uint8))
        return ImageFolder.from_glob(tmp_path / folder, '*.png')

    # The camera stood still for the queries' first two and the references' last two frames.
    queries = write('queries', [10, 10, 30, 40])
    reference = write('reference', [10, 20, 30, 40, 40])
    conf = GroundTruthConf(tolerance=0, duplicate_frames=True)
    truth = load_ground_truth('aligned', queries, reference, conf)
    assert as_lists(truth.positives) == [[0, 1], [0, 1], [2], [3, 4]]
    assert truth.notes == (
        'duplicate frames: 1 queries and 1 references repeat the frame before them; each run '
        'of identical frames counts as one place',
    )
    soft = load_ground_truth('aligned', queries, reference, conf.replace(soft_tolerance=1))
    assert soft.soft_positives is not None
    assert as_lists(soft.soft_positives) == [[0, 1, 2], [0, 1, 2], [1, 2, 3, 4], [2, 3, 4]]
