"""Tests of vpr_ros.images: message <-> RGB pixels for every supported encoding and error."""

from __future__ import annotations

import array

import cv2
import numpy as np
import pytest
from rosbags.typesys import Stores, get_typestore

from vpr_ros.errors import ImageDecodeError
from vpr_ros.images import (
    SUPPORTED_ENCODINGS,
    compressed_to_rgb,
    failure_reason,
    image_to_rgb,
    msg_to_rgb,
    rgb_to_compressed_bytes,
    rgb_to_image_fields,
)

TYPES = get_typestore(Stores.ROS2_HUMBLE).types
Header = TYPES['std_msgs/msg/Header']
Time = TYPES['builtin_interfaces/msg/Time']
Image = TYPES['sensor_msgs/msg/Image']
CompressedImage = TYPES['sensor_msgs/msg/CompressedImage']


def random_rgb(height: int = 24, width: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def smooth_rgb(height: int = 24, width: int = 32) -> np.ndarray:
    """A gradient, which JPEG reproduces closely."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) * 4], axis=-1).astype(np.uint8)


def header() -> object:
    return Header(stamp=Time(sec=1, nanosec=2), frame_id='camera')


def image_msg(
    rgb: np.ndarray, encoding: str = 'rgb8', *, step: int | None = None, bigendian: bool = False
) -> object:
    encoding, height, width, step, data = rgb_to_image_fields(
        rgb, encoding, step=step, bigendian=bigendian
    )
    return Image(
        header=header(),
        height=height,
        width=width,
        encoding=encoding,
        is_bigendian=int(bigendian),
        step=step,
        data=np.frombuffer(data, dtype=np.uint8),
    )


def raw_msg(encoding: str, height: int, width: int, step: int, data: bytes) -> object:
    return Image(
        header=header(),
        height=height,
        width=width,
        encoding=encoding,
        is_bigendian=0,
        step=step,
        data=np.frombuffer(data, dtype=np.uint8),
    )


def compressed_msg(data: bytes, fmt: str = 'jpeg') -> object:
    return CompressedImage(header=header(), format=fmt, data=np.frombuffer(data, dtype=np.uint8))


def grey_as_rgb(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)


@pytest.mark.parametrize('encoding', ['rgb8', 'bgr8', 'rgba8', 'bgra8'])
def test_colour_encodings_round_trip_exactly(encoding: str) -> None:
    rgb = random_rgb()
    out = image_to_rgb(image_msg(rgb, encoding))
    assert out.dtype == np.uint8
    assert out.shape == (24, 32, 3)
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize('encoding', ['mono8', 'mono16'])
@pytest.mark.parametrize('bigendian', [False, True])
def test_grey_encodings_round_trip_to_grey_replicated_in_three_channels(
    encoding: str, bigendian: bool
) -> None:
    rgb = random_rgb()
    out = image_to_rgb(image_msg(rgb, encoding, bigendian=bigendian))
    np.testing.assert_array_equal(out, grey_as_rgb(rgb))


@pytest.mark.parametrize('encoding', SUPPORTED_ENCODINGS)
def test_padded_rows_are_cropped_to_the_image_width(encoding: str) -> None:
    rgb = random_rgb(seed=1)
    _, _, width, step, _ = rgb_to_image_fields(rgb, encoding)
    msg = image_msg(rgb, encoding, step=step + 7)
    assert msg.step == step + 7
    expected = grey_as_rgb(rgb) if encoding.startswith('mono') else rgb
    np.testing.assert_array_equal(image_to_rgb(msg), expected)


@pytest.mark.parametrize(('is_bigendian', 'raw'), [(0, b'\x34\x12'), (1, b'\x12\x34')])
def test_mono16_keeps_the_high_byte_in_the_message_byte_order(
    is_bigendian: int, raw: bytes
) -> None:
    msg = raw_msg('mono16', 1, 2, 4, raw * 2)
    msg.is_bigendian = is_bigendian
    out = image_to_rgb(msg)
    np.testing.assert_array_equal(out, np.full((1, 2, 3), 0x12, dtype=np.uint8))


def test_decoded_image_is_a_writable_copy_not_a_view_of_the_message() -> None:
    rgb = random_rgb()
    data = rgb_to_image_fields(rgb)[4]
    msg = raw_msg('rgb8', 24, 32, 96, data)  # data is a read-only view of bytes
    out = image_to_rgb(msg)
    out[0, 0] = 0
    assert out.flags.writeable
    assert msg.data[0] == rgb[0, 0, 0]


@pytest.mark.parametrize('container', [bytes, bytearray, lambda b: array.array('B', b), list])
def test_rclpy_style_data_containers_are_accepted(container: object) -> None:
    rgb = random_rgb()
    msg = image_msg(rgb)
    msg.data = container(msg.data.tobytes())
    np.testing.assert_array_equal(image_to_rgb(msg), rgb)


def test_png_compressed_image_round_trips_exactly() -> None:
    rgb = random_rgb()
    out = compressed_to_rgb(compressed_msg(rgb_to_compressed_bytes(rgb, 'png'), 'png'))
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize('fmt', ['jpeg', 'rgb8; jpeg compressed bgr8'])
def test_jpeg_compressed_image_round_trips_closely_in_rgb_order(fmt: str) -> None:
    rgb = smooth_rgb()
    out = compressed_to_rgb(compressed_msg(rgb_to_compressed_bytes(rgb, 'jpeg'), fmt))
    assert out.shape == rgb.shape
    assert np.abs(out.astype(int) - rgb.astype(int)).mean() < 3.0


def test_msg_to_rgb_dispatches_on_format_or_encoding() -> None:
    rgb = random_rgb()
    np.testing.assert_array_equal(msg_to_rgb(image_msg(rgb, 'bgr8')), rgb)
    png = compressed_msg(rgb_to_compressed_bytes(rgb, 'png'), 'png')
    np.testing.assert_array_equal(msg_to_rgb(png), rgb)


@pytest.mark.parametrize('encoding', ['yuv422', 'rgb16', 'bayer_rggb8'])
def test_unknown_encoding_raises_with_the_encoding_as_reason(encoding: str) -> None:
    msg = raw_msg(encoding, 2, 2, 4, bytes(8))
    with pytest.raises(ImageDecodeError, match=f'unknown encoding {encoding}: .*republish') as exc:
        image_to_rgb(msg)
    assert failure_reason(exc.value) == f'unknown encoding {encoding}'


@pytest.mark.parametrize(('height', 'width'), [(0, 4), (4, 0)])
def test_zero_width_or_height_raises(height: int, width: int) -> None:
    msg = raw_msg('rgb8', height, width, width * 3, b'')
    with pytest.raises(ImageDecodeError, match='zero image size'):
        image_to_rgb(msg)


def test_step_smaller_than_a_row_raises() -> None:
    msg = raw_msg('rgb8', 2, 4, 11, bytes(22))
    with pytest.raises(ImageDecodeError, match='step too small: step 11 is smaller than .* 12'):
        image_to_rgb(msg)


@pytest.mark.parametrize('size', [23, 25])
def test_data_length_other_than_step_times_height_raises(size: int) -> None:
    msg = raw_msg('rgb8', 2, 4, 12, bytes(size))
    with pytest.raises(ImageDecodeError, match=f'data size mismatch: data has {size} bytes'):
        image_to_rgb(msg)


def test_corrupt_compressed_bytes_raise() -> None:
    msg = compressed_msg(b'\xff\xd8 this is not a jpeg at all', 'jpeg')
    with pytest.raises(ImageDecodeError, match="corrupt compressed image: .* 'jpeg'"):
        compressed_to_rgb(msg)


def test_empty_compressed_image_raises() -> None:
    with pytest.raises(ImageDecodeError, match='empty compressed image'):
        compressed_to_rgb(compressed_msg(b'', 'png'))


def test_compressed_depth_image_is_rejected() -> None:
    msg = compressed_msg(rgb_to_compressed_bytes(random_rgb(), 'png'), '16UC1; compressedDepth')
    with pytest.raises(ImageDecodeError, match='compressedDepth.*not a colour image'):
        compressed_to_rgb(msg)


def test_message_that_is_no_image_raises() -> None:
    msg = TYPES['std_msgs/msg/String'](data='hello')
    with pytest.raises(ImageDecodeError, match='not an image message'):
        msg_to_rgb(msg)


def test_encoding_helpers_reject_bad_arrays_and_names() -> None:
    with pytest.raises(ValueError, match=r'shape \(H, W, 3\)'):
        rgb_to_image_fields(np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match='uint8'):
        rgb_to_image_fields(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="unknown encoding 'rgb16'"):
        rgb_to_image_fields(random_rgb(), 'rgb16')
    with pytest.raises(ValueError, match='step 10 is smaller'):
        rgb_to_image_fields(random_rgb(), step=10)
    with pytest.raises(ValueError, match="unknown compressed format 'webm'"):
        rgb_to_compressed_bytes(random_rgb(), 'webm')


def test_images_over_the_pixel_cap_are_refused_from_their_fields_or_header() -> None:
    from types import SimpleNamespace

    from vpr_ros.images import (
        TOO_LARGE_REASON,
        compressed_image_size,
        compressed_to_rgb,
        failure_reason,
        image_to_rgb,
    )

    huge = SimpleNamespace(
        encoding='rgb8', height=9000, width=9000, step=27000, is_bigendian=0, data=b''
    )
    with pytest.raises(ImageDecodeError) as error:
        image_to_rgb(huge)  # refused before the data size is even looked at
    assert failure_reason(error.value) == TOO_LARGE_REASON
    assert '9000x9000 = 81.0 MP' in str(error.value)
    rgb = np.zeros((30, 40, 3), np.uint8)
    png = rgb_to_compressed_bytes(rgb, 'png')
    assert compressed_image_size(png) == (40, 30)
    assert compressed_image_size(rgb_to_compressed_bytes(rgb, 'jpeg')) == (40, 30)
    assert compressed_image_size(b'not an image') is None
    small_cap = SimpleNamespace(format='png', data=png)
    with pytest.raises(ImageDecodeError, match='image too large'):
        compressed_to_rgb(small_cap, max_pixels=1000)
    assert compressed_to_rgb(small_cap, max_pixels=1200).shape == (30, 40, 3)


@pytest.mark.parametrize('encoding', ['rgb8', 'bgr8', 'bgra8', 'mono8'])
def test_raw_frames_decode_straight_to_the_models_size_as_a_resize_of_the_full_decode(
    encoding: str,
) -> None:
    from vpr_ros.models.preprocessing import resize_to

    msg = image_msg(smooth_rgb(480, 640), encoding)
    full = image_to_rgb(msg)
    small = image_to_rgb(msg, size=(240, 320))
    assert small.shape == (240, 320, 3) and small.flags.c_contiguous
    np.testing.assert_allclose(small, resize_to(full, (240, 320)), atol=1)
    assert image_to_rgb(msg, size=(480, 640)).tobytes() == full.tobytes()


def test_a_large_jpeg_decodes_at_a_reduced_scale_to_the_models_size() -> None:
    from vpr_ros.models.preprocessing import resize_to

    data = rgb_to_compressed_bytes(smooth_rgb(960, 1280), 'jpeg')
    msg = CompressedImage(header=header(), format='jpeg', data=np.frombuffer(data, np.uint8))
    small = compressed_to_rgb(msg, size=(240, 320))
    assert small.shape == (240, 320, 3)
    reference = resize_to(compressed_to_rgb(msg), (240, 320))
    assert np.abs(small.astype(int) - reference).mean() < 2.0
