"""Image messages <-> RGB pixels, shared by the bag reader and the ROS nodes.

The functions are duck-typed on message attributes, so they accept messages deserialised by
rosbags as well as rclpy messages: a ``sensor_msgs/Image`` needs ``encoding``, ``height``,
``width``, ``step``, ``is_bigendian`` and ``data``; a ``sensor_msgs/CompressedImage`` needs
``format`` and ``data``. ``data`` may be a numpy array, ``bytes``, ``bytearray``,
``array.array('B')`` (rclpy) or a list of ints.

Every decoding problem raises :class:`~vpr_ros.errors.ImageDecodeError` whose message starts
with a short, stable reason followed by ``': '`` and the details, e.g.
``"unknown encoding rgb16: ..."``; :func:`failure_reason` extracts that reason so callers can
count skipped frames by cause.

Decoding is bounded: an image with more pixels than ``max_pixels`` (default
:data:`DEFAULT_MAX_PIXELS`) is refused with reason :data:`TOO_LARGE_REASON` before any
pixel is decoded, from the ``width``/``height`` fields of a raw image or from the header of
a compressed one (read by Pillow, which parses only the header), so a small PNG that
would decode to 16000 x 16000 costs nothing.

Decoding can go straight to the size a consumer needs (``size``, e.g. the model's input
size): a raw image is resized from the message buffer itself, so the frame is copied once,
at that size; a JPEG is decoded at 1/2, 1/4 or 1/8 scale by the codec when that is still at
least ``size`` (``cv2.IMREAD_REDUCED_COLOR_*``), then resized. The resize policy is the
model's (``vpr_ros.models.preprocessing.resize_to``).
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import cv2
import numpy as np

from vpr_ros.errors import ImageDecodeError
from vpr_ros.models.preprocessing import resize_to

# encoding -> (channels, bytes per channel, cv2 conversion code to RGB or None)
_ENCODINGS: dict[str, tuple[int, int, int | None]] = {
    'rgb8': (3, 1, None),
    'bgr8': (3, 1, cv2.COLOR_BGR2RGB),
    'rgba8': (4, 1, cv2.COLOR_RGBA2RGB),
    'bgra8': (4, 1, cv2.COLOR_BGRA2RGB),
    'mono8': (1, 1, cv2.COLOR_GRAY2RGB),
    'mono16': (1, 2, cv2.COLOR_GRAY2RGB),
}

SUPPORTED_ENCODINGS: tuple[str, ...] = tuple(_ENCODINGS)
"""Raw ``sensor_msgs/Image`` encodings that :func:`image_to_rgb` understands."""

IMAGE_TYPES: tuple[str, ...] = ('sensor_msgs/msg/Image', 'sensor_msgs/msg/CompressedImage')
"""The image message types: raw, then compressed."""

_COMPRESSED_EXTENSIONS = {'jpeg': '.jpg', 'jpg': '.jpg', 'png': '.png'}

DEFAULT_MAX_PIXELS = 40_000_000
"""Largest image decoded by default (width * height): 40 MP, e.g. 7300 x 5500."""

TOO_LARGE_REASON = 'image too large'
"""The failure reason of an image refused for its pixel count."""


def _error(reason: str, detail: str) -> ImageDecodeError:
    return ImageDecodeError(f'{reason}: {detail}')


def failure_reason(err: ImageDecodeError) -> str:
    """Return the short, stable reason of a decoding error, e.g. ``'unknown encoding rgb16'``.

    Args:
        err: An error raised by this module.

    Returns:
        The text before the first ``': '`` of the message (the whole message if there is none).
    """
    return str(err).split(': ', 1)[0]


def _as_uint8(data: Any) -> np.ndarray:
    """Return message ``data`` as a flat uint8 array without copying when possible."""
    if isinstance(data, np.ndarray):
        if data.dtype.itemsize == 1:
            return data.reshape(-1).view(np.uint8)
        return data.astype(np.uint8).reshape(-1)
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(data, dtype=np.uint8)
    try:
        return np.frombuffer(memoryview(data), dtype=np.uint8)  # array.array('B') from rclpy
    except TypeError:
        return np.asarray(data, dtype=np.uint8).reshape(-1)


def _check_rgb(rgb: np.ndarray) -> None:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3:
        got = f'{rgb.dtype} {rgb.shape}' if isinstance(rgb, np.ndarray) else type(rgb).__name__
        msg = f'expected an RGB uint8 array of shape (H, W, 3), got {got}'
        raise ValueError(msg)
    if rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        msg = f'expected an RGB uint8 array of shape (H, W, 3) with H, W > 0, got {rgb.shape}'
        raise ValueError(msg)


def _check_pixels(width: int, height: int, max_pixels: int | None, what: str) -> None:
    if max_pixels is not None and width * height > max_pixels:
        detail = (
            f'{what} is {width}x{height} = {width * height / 1e6:.1f} MP, more than the cap of '
            f'{max_pixels / 1e6:.1f} MP; it was not decoded (raise max_image_pixels if such '
            'images are genuine)'
        )
        raise _error(TOO_LARGE_REASON, detail)


def compressed_image_size(data: Any) -> tuple[int, int] | None:
    """(width, height) of a compressed image from its header, without decoding it.

    Args:
        data: The encoded bytes (any bytes-like object or uint8 array).

    Returns:
        The size, or None if the bytes do not start like an image format Pillow knows.
    """
    from PIL import Image as PilImage
    from PIL import UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter('ignore', PilImage.DecompressionBombWarning)
        try:
            with PilImage.open(io.BytesIO(_as_uint8(data).tobytes())) as image:
                width, height = image.size
        except PilImage.DecompressionBombError:
            return (1 << 16, 1 << 16)  # more than Pillow's own limit of about 179 MP
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            return None
    return int(width), int(height)


def image_to_rgb(
    msg: Any,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Decode a raw ``sensor_msgs/Image`` into an RGB image.

    Supports the encodings in :data:`SUPPORTED_ENCODINGS`. ``mono16`` is reduced to 8 bit by
    keeping the high byte (``>> 8``), honouring ``is_bigendian``. Rows may be padded
    (``step > width * bytes_per_pixel``).

    Args:
        msg: A ``sensor_msgs/Image`` (rosbags or rclpy).
        max_pixels: Refuse images with more pixels than this (None: no cap).
        size: Decode straight to (height, width), resizing from the message buffer
            (None: the image's own size).

    Returns:
        A new C-contiguous ``uint8`` array of shape (height, width, 3) in RGB order.

    Raises:
        ImageDecodeError: Unknown encoding, zero width or height, too many pixels, ``step``
            smaller than a row, or ``len(data) != step * height``.
    """
    encoding = str(msg.encoding)
    spec = _ENCODINGS.get(encoding.lower())
    if spec is None:
        detail = (
            f'image encoding {encoding!r} is not supported; expected one of '
            f'{", ".join(SUPPORTED_ENCODINGS)}; republish the camera as rgb8 or bgr8 '
            '(e.g. with image_proc or a debayer node)'
        )
        raise _error(f'unknown encoding {encoding}', detail)
    channels, depth, conversion = spec
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        detail = f'image has size {width}x{height} (width x height); the camera sent no pixels'
        raise _error('zero image size', detail)
    _check_pixels(width, height, max_pixels, 'the image')
    row_bytes = width * channels * depth
    if step < row_bytes:
        detail = (
            f'step {step} is smaller than width * bytes per pixel = {width} * '
            f'{channels * depth} = {row_bytes} for {encoding!r}; the message header is wrong'
        )
        raise _error('step too small', detail)
    data = _as_uint8(msg.data)
    if data.size != step * height:
        detail = (
            f'data has {data.size} bytes, expected step * height = {step} * {height} = '
            f'{step * height}; the message is truncated or its header is wrong'
        )
        raise _error('data size mismatch', detail)

    rows = data.reshape(height, step)[:, :row_bytes]
    if depth == 2:
        dtype = np.dtype('>u2') if int(msg.is_bigendian) else np.dtype('<u2')
        pixels = (np.ascontiguousarray(rows).view(dtype) >> 8).astype(np.uint8)
    else:
        pixels = rows
    pixels = pixels.reshape(height, width, channels)
    if channels == 1:
        pixels = pixels[:, :, 0]
    if size is not None:  # per-channel resizing commutes with the channel conversions
        resized = resize_to(pixels, size)
        if resized is not pixels:
            return resized if conversion is None else cv2.cvtColor(resized, conversion)
    if conversion is None:
        return pixels.copy(order='C')  # never a view of the (possibly read-only) message buffer
    return cv2.cvtColor(np.ascontiguousarray(pixels), conversion)


def compressed_to_rgb(
    msg: Any,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Decode a ``sensor_msgs/CompressedImage`` (JPEG, PNG, ...) into an RGB image.

    ``format`` is only checked for ``compressedDepth``, which is not a colour image; the codec is
    taken from the bytes themselves, so 'jpeg', 'png' and image_transport strings such as
    ``'rgb8; jpeg compressed bgr8'`` all work.

    Args:
        msg: A ``sensor_msgs/CompressedImage`` (rosbags or rclpy).
        max_pixels: Refuse images whose header declares more pixels (None: no cap).
        size: Decode straight to (height, width): a JPEG at a reduced scale that is still
            at least this large, then resized (None: the image's own size).

    Returns:
        A ``uint8`` array of shape (H, W, 3) in RGB order.

    Raises:
        ImageDecodeError: Empty or corrupt data, too many pixels, or a ``compressedDepth``
            image.
    """
    fmt = str(msg.format)
    if 'compresseddepth' in fmt.lower():
        detail = (
            f'format {fmt!r} is a depth image, not a colour image; subscribe to the colour '
            'camera topic instead'
        )
        raise _error('unsupported compressed format compressedDepth', detail)
    data = _as_uint8(msg.data)
    if data.size == 0:
        raise _error('empty compressed image', f'format {fmt!r} message has no data bytes')
    header_size = compressed_image_size(data)
    if header_size is None:
        detail = (
            f'{data.size} bytes of format {fmt!r} do not start with the header of an image '
            'format (jpeg, png, ...); the data is corrupt'
        )
        raise _error('corrupt compressed image', detail)
    _check_pixels(*header_size, max_pixels, f'the {fmt!r} image')
    bgr = cv2.imdecode(data, _reduced_read_flag(header_size, size))
    if bgr is None:
        detail = (
            f'OpenCV cannot decode {data.size} bytes of format {fmt!r}; the data is corrupt '
            'or not an image codec OpenCV knows (jpeg, png, ...)'
        )
        raise _error('corrupt compressed image', detail)
    if size is not None:
        bgr = resize_to(bgr, size)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


_REDUCED_READS = (
    (8, cv2.IMREAD_REDUCED_COLOR_8),
    (4, cv2.IMREAD_REDUCED_COLOR_4),
    (2, cv2.IMREAD_REDUCED_COLOR_2),
)


def _reduced_read_flag(header_size: tuple[int, int], size: tuple[int, int] | None) -> int:
    """The largest reduced-scale read whose image still covers ``size`` (height, width)."""
    if size is not None:
        width, height = header_size
        for factor, flag in _REDUCED_READS:
            if width // factor >= size[1] and height // factor >= size[0]:
                return flag
    return cv2.IMREAD_COLOR


def msg_to_rgb(
    msg: Any,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Decode an ``Image`` or ``CompressedImage`` message, whichever ``msg`` is.

    Args:
        msg: A message with ``format`` (compressed) or ``encoding`` (raw).
        max_pixels: Refuse images with more pixels than this (None: no cap).
        size: Decode straight to (height, width) (None: the image's own size).

    Returns:
        A ``uint8`` array of shape (H, W, 3) in RGB order.

    Raises:
        ImageDecodeError: The message cannot be decoded, or is neither kind of image.
    """
    if hasattr(msg, 'format'):
        return compressed_to_rgb(msg, max_pixels=max_pixels, size=size)
    if hasattr(msg, 'encoding'):
        return image_to_rgb(msg, max_pixels=max_pixels, size=size)
    detail = (
        f'message of type {type(msg).__name__!r} has neither "encoding" nor "format"; '
        'pass a sensor_msgs/Image or sensor_msgs/CompressedImage'
    )
    raise _error('not an image message', detail)


def rgb_to_image_fields(
    rgb: np.ndarray,
    encoding: str = 'rgb8',
    *,
    step: int | None = None,
    bigendian: bool = False,
) -> tuple[str, int, int, int, bytes]:
    """Encode an RGB image as the fields of a raw ``sensor_msgs/Image``.

    Grey encodings use OpenCV's RGB->grey weights; ``mono16`` stores ``grey * 257`` so that the
    high byte equals the 8-bit grey value. Alpha channels are 255.

    Args:
        rgb: ``uint8`` array of shape (H, W, 3) in RGB order.
        encoding: One of :data:`SUPPORTED_ENCODINGS`.
        step: Row length in bytes; ``None`` for unpadded rows. Larger values pad each row with
            zero bytes.
        bigendian: Byte order of ``mono16`` pixels; the caller sets ``is_bigendian`` to match.

    Returns:
        ``(encoding, height, width, step, data)``.

    Raises:
        ValueError: ``rgb`` is not (H, W, 3) uint8, the encoding is unknown, or ``step`` is
            smaller than a row.
    """
    _check_rgb(rgb)
    spec = _ENCODINGS.get(encoding)
    if spec is None:
        msg = f'unknown encoding {encoding!r}; expected one of {", ".join(SUPPORTED_ENCODINGS)}'
        raise ValueError(msg)
    channels, depth, _ = spec
    height, width = rgb.shape[:2]
    if encoding == 'rgb8':
        pixels = rgb
    elif encoding == 'bgr8':
        pixels = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    elif encoding == 'rgba8':
        pixels = cv2.cvtColor(rgb, cv2.COLOR_RGB2RGBA)
    elif encoding == 'bgra8':
        pixels = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGRA)
    else:
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        if encoding == 'mono8':
            pixels = grey
        else:
            dtype = np.dtype('>u2') if bigendian else np.dtype('<u2')
            pixels = (grey.astype(np.uint16) * 257).astype(dtype).view(np.uint8)
    rows = np.ascontiguousarray(pixels).reshape(height, -1)
    row_bytes = width * channels * depth
    step = row_bytes if step is None else int(step)
    if step < row_bytes:
        msg = f'step {step} is smaller than a row of {row_bytes} bytes for {encoding!r}'
        raise ValueError(msg)
    if step > row_bytes:
        padded = np.zeros((height, step), dtype=np.uint8)
        padded[:, :row_bytes] = rows
        rows = padded
    return encoding, height, width, step, rows.tobytes()


def rgb_to_compressed_bytes(rgb: np.ndarray, fmt: str = 'jpeg', *, quality: int = 95) -> bytes:
    """Encode an RGB image as JPEG or PNG bytes for a ``sensor_msgs/CompressedImage``.

    Args:
        rgb: ``uint8`` array of shape (H, W, 3) in RGB order.
        fmt: ``'jpeg'`` (or ``'jpg'``) or ``'png'``; the message's ``format`` field.
        quality: JPEG quality 0..100 (ignored for PNG).

    Returns:
        The encoded bytes.

    Raises:
        ValueError: ``rgb`` is not (H, W, 3) uint8 or ``fmt`` is unknown.
    """
    _check_rgb(rgb)
    ext = _COMPRESSED_EXTENSIONS.get(fmt.lower())
    if ext is None:
        msg = f'unknown compressed format {fmt!r}; expected one of jpeg, png'
        raise ValueError(msg)
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if ext == '.jpg' else []
    ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:  # pragma: no cover - OpenCV fails only on exotic builds
        msg = f'OpenCV could not encode a {rgb.shape} image as {fmt!r}'
        raise ValueError(msg)
    return buf.tobytes()
