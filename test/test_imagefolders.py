"""Image folders: listing in frame order, the one loader, UTM names, pose tables."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from vpr_ros.errors import ConfigError, ImageDecodeError
from vpr_ros.imagefolders import (
    ImageFolder,
    PoseRow,
    list_images,
    load_image,
    natural_key,
    parse_utm,
    positions_from_table,
    read_pose_table,
)


def test_parse_utm_reads_east_and_north_from_the_file_name() -> None:
    assert parse_utm('db/@585000.5@4477000.25@17@T@@@@@.jpg') == (585000.5, 4477000.25)
    with pytest.raises(ConfigError, match='no UTM coordinates'):
        parse_utm('images-00001.png')


def test_natural_key_orders_digit_runs_by_value() -> None:
    names = ['run2/10.png', 'run10/1.png', 'run2/9.png', 'run2/09b.png', 'a.png']
    assert sorted(names, key=natural_key) == [
        'a.png',
        'run2/9.png',
        'run2/09b.png',
        'run2/10.png',
        'run10/1.png',
    ]


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


def test_an_image_folder_names_its_images_relative_to_the_folder(tmp_path: Path) -> None:
    for name in ('run/2.png', 'run/10.png', 'run/1.png'):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        cv2.imwrite(str(tmp_path / name), np.zeros((4, 4, 3), np.uint8))
    folder = ImageFolder.from_glob(tmp_path, 'run/*.png')
    assert len(folder) == 3 and folder.names() == ['run/1.png', 'run/2.png', 'run/10.png']
    assert folder.subset([2, 0]).names() == ['run/10.png', 'run/1.png']


def test_a_pose_table_without_a_header_reads_file_x_y_yaw_in_order(tmp_path: Path) -> None:
    # campus_route's data.csv: no header, file,x,y,yaw (metres, radians).
    table = tmp_path / 'data.csv'
    table.write_text(
        '# route of 3 frames\n'
        'image_0.png,-31.5,-4.75,-1.49\n'
        '\n'
        'image_1.png,-31.25,-7.5,-1.45\n'
        './sub/image_2.png,0,1e1,\n'
    )
    rows = read_pose_table(table)
    assert list(rows) == ['image_0.png', 'image_1.png', 'sub/image_2.png']
    assert rows['image_0.png'] == PoseRow(-31.5, -4.75, -1.49)
    assert rows['sub/image_2.png'] == PoseRow(0.0, 10.0, None)


def test_a_pose_table_header_names_the_columns_in_any_order(tmp_path: Path) -> None:
    table = tmp_path / 'poses.csv'
    table.write_text('y,quality,file,x\n2.5,good,a.png,1\n-1,bad,b.png,0.5\n')
    rows = read_pose_table(table)
    assert rows == {'a.png': PoseRow(1.0, 2.5, None), 'b.png': PoseRow(0.5, -1.0, None)}


@pytest.mark.parametrize(
    ('text', 'message'),
    [
        ('file,x,y\na.png,1,north\n', "line 2: y \\(metres\\) 'north' is not a finite number"),
        ('a.png,1,nan\n', "line 1: y \\(metres\\) 'nan' is not a finite number"),
        ('a.png,1,2,east\n', "line 1: yaw \\(radians\\) 'east' is not a finite number"),
        ('a.png,1\n', 'line 1 has 2 columns, expected file,x,y'),
        ('a.png,1,2\nb.png,3,4\na.png,5,6\n', "line 3 lists 'a.png' a second time"),
        ('file,east,north\na.png,1,2\n', "lacks \\['x', 'y'\\]"),
        ('file,x,y\n', 'has no rows'),
    ],
)
def test_a_bad_pose_table_is_refused_with_the_line_and_value(
    tmp_path: Path, text: str, message: str
) -> None:
    (tmp_path / 'data.csv').write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_pose_table(tmp_path / 'data.csv')


def test_a_missing_pose_table_is_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match='missing.csv'):
        read_pose_table(tmp_path / 'missing.csv')


def test_images_find_their_rows_by_relative_path_or_by_file_name(tmp_path: Path) -> None:
    table = {
        'day/a.png': PoseRow(1.0, 2.0, None),
        'night/a.png': PoseRow(5.0, 6.0, None),
        'b.png': PoseRow(3.0, 4.0, None),
    }
    images = ImageFolder(tmp_path, [tmp_path / 'night/a.png', tmp_path / 'night/b.png'])
    # night/a.png by its relative path; night/b.png by its file name.
    positions = positions_from_table(table, images, 'data.csv')
    np.testing.assert_array_equal(positions, [[5.0, 6.0], [3.0, 4.0]])
    with pytest.raises(ConfigError, match="'dusk/a.png'.* is in 2 rows"):
        positions_from_table(table, ImageFolder(tmp_path, [tmp_path / 'dusk/a.png']), 'data.csv')
    missing = ImageFolder(tmp_path, [tmp_path / 'c.png', tmp_path / 'b.png'])
    with pytest.raises(ConfigError, match="no row for 1 of 2 images .*\\(e.g. 'c.png'\\)"):
        positions_from_table(table, missing, 'data.csv')
