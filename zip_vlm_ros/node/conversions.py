"""ROS image messages <-> numpy RGB arrays, and engine outputs -> VlmResult messages.

Pure message-level code: no rclpy node, no torch. It works on rclpy messages (``msg.data`` an
``array.array`` or ``bytes``) and on rosbags-deserialised messages (``msg.data`` a numpy ``uint8``
array) alike, because it reads only the standard field names.

Every decoding failure raises :class:`ImageConversionError` (a ``ValueError``) with a one-line message
that says what is wrong with the message and what the publisher should fix.

Decoding is done with numpy (raw encodings) and Pillow (compressed), not ``rosbags.image``: that
module needs OpenCV, which this package does not otherwise depend on.
"""
from __future__ import annotations

import io
import re
from typing import Any

import numpy as np
from builtin_interfaces.msg import Time
from PIL import Image as PILImage
from sensor_msgs.msg import CompressedImage, Image

from zip_vlm_ros.engine.overlay import draw_overlay
from zip_vlm_ros.msg import VlmResult


class ImageConversionError(ValueError):
    """A ROS image message cannot be turned into pixels; str(e) says what is wrong and what to fix."""


# encoding -> (channels, bytes per channel) for the raw encodings we decode.
_RAW_LAYOUTS = {
    'rgb8': (3, 1), 'bgr8': (3, 1), 'rgba8': (4, 1), 'bgra8': (4, 1), 'mono8': (1, 1),
    'rgb16': (3, 2), 'bgr16': (3, 2), 'mono16': (1, 2),
    # packed 4:2:2, two bytes per pixel: yuv422 is UYVY, yuv422_yuy2 is YUYV (ROS naming)
    'yuv422': (2, 1), 'yuv422_yuy2': (2, 1),
    'bayer_rggb8': (1, 1), 'bayer_bggr8': (1, 1), 'bayer_gbrg8': (1, 1), 'bayer_grbg8': (1, 1),
}
SUPPORTED_ENCODINGS = tuple(_RAW_LAYOUTS)
# Pillow decodes these; ROS `format` strings look like "jpeg", "png" or "bgr8; jpeg compressed bgr8".
SUPPORTED_COMPRESSED_FORMATS = ('jpeg', 'jpg', 'png')


def _byte_view(data: Any) -> np.ndarray:
    """A flat uint8 view of a message's ``data`` (array.array, bytes, memoryview or numpy array)."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise ImageConversionError(
                f'image data has dtype {data.dtype}, expected uint8: pass the message as received')
        return data.reshape(-1)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except TypeError:
        # a plain list of ints (possible when a message is built by hand)
        return np.asarray(data, dtype=np.uint8).reshape(-1)


def image_has_pixels(msg: Any) -> bool:
    """True when an Image field was filled in (used for the optional inline image of Ask/AskMany).

    A message with data but a zero width or height counts as filled, so that it is rejected as
    malformed instead of being silently ignored.
    """
    return msg.width > 0 or msg.height > 0 or len(msg.data) > 0


def image_to_rgb(msg: Any) -> np.ndarray:
    """Decode a ``sensor_msgs/Image`` into an RGB array.

    Args:
        msg: Image message (rclpy or rosbags) with encoding in :data:`SUPPORTED_ENCODINGS`.

    Returns:
        uint8 array of shape (height, width, 3), RGB. For ``rgb8`` without row padding it shares
        memory with ``msg.data``: treat it as read-only.

    Raises:
        ImageConversionError: zero size, unsupported encoding, step too small, data length not equal
            to step * height, odd size for 4:2:2 / Bayer.
    """
    encoding, data = _checked_raw_image(msg)
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    channels, channel_bytes = _RAW_LAYOUTS[encoding]
    row_bytes = width * channels * channel_bytes
    rows = data.reshape(height, step)[:, :row_bytes]  # shape (height, row_bytes), drops row padding
    if channel_bytes == 2:
        big_endian = bool(getattr(msg, 'is_bigendian', False))
        words = np.ascontiguousarray(rows).view('>u2' if big_endian else '<u2')
        pixels = _sixteen_to_eight_bits(words).reshape(height, width, channels)
    else:
        pixels = rows.reshape(height, width, channels) if channels > 1 else rows.reshape(height, width)
    return _pixels_to_rgb(pixels, encoding)


def _checked_raw_image(msg: Any) -> tuple[str, np.ndarray]:
    """``(encoding, data as uint8 bytes)`` of an Image whose size, step, data length and encoding agree, or
    ImageConversionError saying which does not."""
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    encoding = msg.encoding.strip().lower()
    if height == 0 or width == 0:
        raise ImageConversionError(
            f'image is {width}x{height} pixels (zero size): the publisher must set width and height')
    if encoding not in _RAW_LAYOUTS:
        raise ImageConversionError(
            f'image encoding {msg.encoding!r} is not supported: publish one of '
            f'{", ".join(SUPPORTED_ENCODINGS)} (or a CompressedImage)')
    channels, channel_bytes = _RAW_LAYOUTS[encoding]
    row_bytes = width * channels * channel_bytes
    if step < row_bytes:
        raise ImageConversionError(
            f'image step is {step} bytes but one row of {width} {encoding} pixels needs {row_bytes}: '
            f"the publisher's step or encoding is wrong")
    data = _byte_view(msg.data)
    if data.size != step * height:
        raise ImageConversionError(
            f'image data is {data.size} bytes but step*height = {step}*{height} = {step * height}: '
            f"the publisher's step, height or data is wrong")
    if (encoding.startswith('yuv422') or encoding.startswith('bayer')) and width % 2:
        raise ImageConversionError(
            f'{encoding} image width is {width}, must be even: the publisher sent a broken frame')
    if encoding.startswith('bayer') and height % 2:
        raise ImageConversionError(
            f'{encoding} image height is {height}, must be even: the publisher sent a broken frame')
    return encoding, data


def _pixels_to_rgb(pixels: np.ndarray, encoding: str) -> np.ndarray:
    """``[height, width, channels]`` (or ``[height, width]``) 8-bit pixels of `encoding` -> HxWx3 RGB."""
    height, width = pixels.shape[:2]
    if encoding in ('rgb8', 'rgb16'):
        return np.ascontiguousarray(pixels)
    if encoding in ('bgr8', 'bgr16'):
        return np.ascontiguousarray(pixels[..., ::-1])
    if encoding == 'rgba8':
        return np.ascontiguousarray(pixels[..., :3])
    if encoding == 'bgra8':
        return np.ascontiguousarray(pixels[..., 2::-1])
    if encoding in ('mono8', 'mono16'):
        gray = pixels.reshape(height, width)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if encoding.startswith('yuv422'):
        return _yuv422_to_rgb(pixels, uyvy=(encoding == 'yuv422'))
    return _bayer_to_rgb(pixels.reshape(height, width), pattern=encoding[len('bayer_'):-1])


def _yuv422_to_rgb(packed: np.ndarray, *, uyvy: bool) -> np.ndarray:
    """Packed 4:2:2 (height, width, 2) -> RGB (height, width, 3) with BT.601 limited-range maths."""
    height, width, _ = packed.shape
    pairs = packed.reshape(height, width // 2, 4).astype(np.float32)  # one U,V per two pixels
    if uyvy:
        u, y0, v, y1 = pairs[..., 0], pairs[..., 1], pairs[..., 2], pairs[..., 3]
    else:
        y0, u, y1, v = pairs[..., 0], pairs[..., 1], pairs[..., 2], pairs[..., 3]
    luma = np.stack([y0, y1], axis=-1).reshape(height, width) - 16.0
    u = np.repeat(u, 2, axis=1) - 128.0
    v = np.repeat(v, 2, axis=1) - 128.0
    red = 1.164 * luma + 1.596 * v
    green = 1.164 * luma - 0.392 * u - 0.813 * v
    blue = 1.164 * luma + 2.017 * u
    return np.clip(np.stack([red, green, blue], axis=-1), 0, 255).round().astype(np.uint8)


def _bayer_to_rgb(mosaic: np.ndarray, *, pattern: str) -> np.ndarray:
    """Bayer mosaic (height, width) -> RGB (height, width, 3).

    Each 2x2 cell becomes one RGB value (its red, the mean of its two greens, its blue), repeated
    over the cell. Half the colour resolution of a full demosaic, which is below what the vision
    encoder resolves after resizing to 336x336 for any camera larger than 672x672.
    """
    height, width = mosaic.shape
    cells = mosaic.reshape(height // 2, 2, width // 2, 2).astype(np.uint16)  # (cy, dy, cx, dx)
    position = {colour: divmod(index, 2) for index, colour in enumerate(pattern)}  # 'rggb' -> dy, dx
    greens = [divmod(index, 2) for index, colour in enumerate(pattern) if colour == 'g']
    red = cells[:, position['r'][0], :, position['r'][1]]
    blue = cells[:, position['b'][0], :, position['b'][1]]
    green = (cells[:, greens[0][0], :, greens[0][1]] + cells[:, greens[1][0], :, greens[1][1]] + 1) // 2
    rgb_cells = np.stack([red, green, blue], axis=-1).astype(np.uint8)  # (height/2, width/2, 3)
    return np.repeat(np.repeat(rgb_cells, 2, axis=0), 2, axis=1)


def _sixteen_to_eight_bits(words: np.ndarray) -> np.ndarray:
    """16-bit samples (any shape) -> uint8 of the same shape, keeping the high byte: 16-bit cameras
    fill the full range, and the model takes 8-bit input."""
    return (words.astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)


def compressed_to_rgb(msg: Any) -> np.ndarray:
    """Decode a ``sensor_msgs/CompressedImage`` (JPEG or PNG) into an RGB array.

    Returns:
        uint8 array of shape (height, width, 3), RGB.

    Raises:
        ImageConversionError: empty data, unsupported format (e.g. compressedDepth), or bytes that do
            not decode (corrupt or truncated).
    """
    data = _byte_view(msg.data)
    fmt = msg.format.strip().lower()
    if data.size == 0:
        raise ImageConversionError(
            'compressed image has no data: the publisher must fill CompressedImage.data')
    if 'compresseddepth' in fmt:
        raise ImageConversionError(
            f'compressed image format {msg.format!r} is a depth image: subscribe the node to a colour '
            f'camera topic')
    # An empty format is common in hand-written publishers; the bytes' magic number decides then.
    if fmt and not any(name in fmt for name in SUPPORTED_COMPRESSED_FORMATS):
        raise ImageConversionError(
            f'compressed image format {msg.format!r} is not supported: publish jpeg or png')
    try:
        with PILImage.open(io.BytesIO(data.tobytes())) as decoded:
            decoded.load()  # decodes everything now, so truncated data fails here
            if decoded.format not in ('JPEG', 'PNG'):
                raise ImageConversionError(
                    f'compressed image holds {decoded.format} data, not jpeg or png: publish jpeg or png')
            if decoded.mode.startswith('I'):  # 16-bit grayscale PNG: scaled as raw mono16 is
                gray = _sixteen_to_eight_bits(np.asarray(decoded))
                rgb = np.repeat(gray[:, :, None], 3, axis=2)
            else:
                rgb = np.asarray(decoded.convert('RGB'))
    except ImageConversionError:
        raise
    except (OSError, ValueError, SyntaxError, PILImage.DecompressionBombError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        # Pillow names the buffer object ("<_io.BytesIO object at 0x...>"): noise that differs per call.
        reason = re.sub(r'\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>', '', reason)
        raise ImageConversionError(
            f'compressed image ({data.size} bytes, format {msg.format!r}) cannot be decoded ({reason}): '
            f'the data is corrupt or truncated; check the publisher') from None
    return rgb


def message_to_rgb(msg: Any) -> np.ndarray:
    """Decode an Image or CompressedImage message (told apart by their fields) into RGB (H, W, 3)."""
    if hasattr(msg, 'encoding'):
        return image_to_rgb(msg)
    if hasattr(msg, 'format'):
        return compressed_to_rgb(msg)
    raise ImageConversionError(
        f'{type(msg).__name__} is not a sensor_msgs/Image or CompressedImage: pass an image message')


def rgb_to_image(rgb: np.ndarray, *, stamp: Any = None, frame_id: str = '',
                 encoding: str = 'rgb8') -> Image:
    """Build a ``sensor_msgs/Image`` from an RGB array (used by publishers: demo, tests, bench).

    Args:
        rgb: uint8 array of shape (height, width, 3).
        stamp: builtin_interfaces/Time for the header (zero when None).
        encoding: 'rgb8' or 'bgr8' (the channels are reordered for bgr8).
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f'expected a uint8 (H, W, 3) RGB array, got {rgb.dtype} {rgb.shape}')
    if encoding not in ('rgb8', 'bgr8'):
        raise ValueError(f'encoding {encoding!r} is not supported here: use rgb8 or bgr8')
    height, width, _ = rgb.shape
    pixels = rgb if encoding == 'rgb8' else rgb[..., ::-1]
    msg = Image(height=height, width=width, encoding=encoding, is_bigendian=0, step=width * 3)
    if stamp is not None:
        msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.data = np.ascontiguousarray(pixels).tobytes()
    return msg


def visual_token_images(rgb: np.ndarray, header: Any, outputs: list) -> list[Image]:
    """Each engine output's overlay of its visual tokens on `rgb` (``engine.overlay``) as an rgb8 Image
    with the source frame's `header`; an output without provenance (multi-image, LLaVA-Mini) gives none."""
    return [rgb_to_image(draw_overlay(rgb, output.provenance), stamp=header.stamp, frame_id=header.frame_id)
            for output in outputs if output.provenance is not None]


def rgb_to_compressed(rgb: np.ndarray, *, stamp: Any = None, frame_id: str = '',
                      fmt: str = 'jpeg', quality: int = 90) -> CompressedImage:
    """Build a ``sensor_msgs/CompressedImage`` (jpeg or png) from a uint8 (H, W, 3) RGB array."""
    if fmt not in ('jpeg', 'png'):
        raise ValueError(f'format {fmt!r} is not supported here: use jpeg or png')
    buffer = io.BytesIO()
    if fmt == 'jpeg':
        PILImage.fromarray(rgb).save(buffer, format='JPEG', quality=quality)
    else:
        PILImage.fromarray(rgb).save(buffer, format='PNG')
    msg = CompressedImage(format=fmt)
    if stamp is not None:
        msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.data = buffer.getvalue()
    return msg


def stamp_to_seconds(stamp: Any) -> float:
    """builtin_interfaces/Time (rclpy or rosbags) -> seconds as a float."""
    return stamp.sec + stamp.nanosec * 1e-9


def output_to_result(output: Any, *, header: Any, camera: str, image_age_ms: float,
                     images: Any = None) -> VlmResult:
    """Fill a VlmResult from an engine ``VlmOutput`` and the source image's header.

    Args:
        output: engine.VlmOutput (read by field name; this module does not import the engine).
        header: std_msgs/Header of the image the answer is about (the newest of several); copied.
        camera: camera name, or "inline" for an image sent with the request; several images: their
            distinct cameras joined by ",".
        image_age_ms: node clock at the answer minus the (newest) image stamp.
        images: several images: ``(camera, stamp, label)`` per image in prompt order, matching
            ``output.images``; None: the one image of `header` and `camera`.
    """
    result = VlmResult()
    result.header.stamp.sec = int(header.stamp.sec)
    result.header.stamp.nanosec = int(header.stamp.nanosec)
    result.header.frame_id = str(header.frame_id)
    result.camera = camera
    result.prompt = output.prompt
    result.text = output.text
    result.model = output.model
    result.reduction = output.reduction
    result.token_budget = int(output.token_budget)
    result.visual_tokens = int(output.visual_tokens)
    result.visual_tokens_full = int(output.visual_tokens_full)
    result.generated_tokens = int(output.generated_tokens)
    result.prefix_reused = bool(output.prefix_reused)
    result.image_age_ms = float(image_age_ms)
    result.vision_ms = float(output.vision_ms)
    result.reduction_ms = float(output.reduction_ms)
    result.prefill_ms = float(output.prefill_ms)
    result.decode_ms = float(output.decode_ms)
    result.total_ms = float(output.total_ms)
    if images is None:
        images, visual_tokens = [(camera, header.stamp, '')], [output.visual_tokens]
    else:
        visual_tokens = [image.visual_tokens for image in output.images]
    result.image_cameras = [str(image_camera) for image_camera, _, _ in images]
    result.image_stamps = [Time(sec=int(stamp.sec), nanosec=int(stamp.nanosec)) for _, stamp, _ in images]
    result.image_labels = [str(label) for _, _, label in images]
    result.image_visual_tokens = [int(count) for count in visual_tokens]
    return result
