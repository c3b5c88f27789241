"""Learning data: VPR folder names, image sets, splits and their positives."""

from __future__ import annotations

from pathlib import Path

import cv2
import pytest
from conftest import synthetic_place
from vpr_dataset import write_dataset, write_places, write_split

from vpr_ros import imagefolders
from vpr_ros.errors import ConfigError
from vpr_ros.imagefolders import parse_utm
from vpr_ros.learning import data
from vpr_ros.learning.data import PlaceImages, VprSplit, load_splits


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / 'tiny_vpr')


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
    assert data.parse_utm is imagefolders.parse_utm  # one reader, one behaviour
    with pytest.raises(ConfigError, match='UTM'):
        imagefolders.parse_utm(name)


def test_training_lists_every_image_type_in_frame_number_order(tmp_path: Path) -> None:
    image = synthetic_place(0, (60, 80))
    for i, suffix in ((10, '.webp'), (2, '.bmp'), (1, '.png')):
        cv2.imwrite(str(tmp_path / f'@{500000 + i}@4000000@{i}@.{suffix[1:]}'), image)
    images = PlaceImages.from_folder(tmp_path)
    assert [p.suffix for p in images.paths] == ['.png', '.bmp', '.webp']
    assert images.utm[:, 0].tolist() == [500001.0, 500002.0, 500010.0]


def test_training_reads_images_with_the_one_image_loader() -> None:
    assert data.load_image is imagefolders.load_image


def test_split_positives_are_the_ground_truth_within_the_radius(dataset: Path) -> None:
    from vpr_ros.ground_truth import positives_from_utm

    split = VprSplit(dataset / 'val')
    for radius in (5.0, 40.0, 100.0):
        expected = positives_from_utm(split.database.paths, split.queries.paths, radius)
        got = split.positives(radius)
        assert [p.tolist() for p in got] == [p.tolist() for p in expected]
    # 30 m apart, queries 2.2 m from their place: 40 m also reaches the neighbours.
    assert split.positives(40.0)[1].tolist() == [0, 1, 2]


def test_the_same_place_of_an_image_is_every_other_image_near_it(tmp_path: Path) -> None:
    images = PlaceImages.from_folder(write_places(tmp_path / 'places', count=3))
    same = images.same_place(10.0)
    assert len(same) == 6
    for i, others in enumerate(same):
        assert i not in others.tolist()
        assert others.tolist() == [j for j in range(6) if j != i and j // 2 == i // 2]
    assert all(len(o) == 5 for o in images.same_place(1000.0))


def test_a_missing_dataset_is_named_with_the_layout_it_needs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match='does not exist.*train/ and val/'):
        load_splits(tmp_path / 'none')
    train, val = load_splits(write_dataset(tmp_path / 'ds'))
    assert (len(train.queries), len(val.database)) == (6, 4)
    only_train = tmp_path / 'only_train'
    write_split(only_train / 'train', range(2))
    with pytest.raises(FileNotFoundError, match='val/database'):
        load_splits(only_train)
