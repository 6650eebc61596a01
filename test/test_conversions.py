"""ROS image messages -> RGB arrays (rclpy and rosbags messages) and VlmOutput -> VlmResult."""
import dataclasses
import io
import types

import numpy as np
import pytest
import skimage.data
from builtin_interfaces.msg import Time
from PIL import Image as PILImage
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from zip_vlm_ros.node.conversions import (
    ImageConversionError, compressed_to_rgb, image_has_pixels, image_to_rgb, message_to_rgb,
    output_to_result, rgb_to_compressed, rgb_to_image)


@pytest.fixture(scope='module')
def astronaut():
    return skimage.data.astronaut()  # (512, 512, 3) uint8 RGB


def raw(width, height, encoding, data, step=None, bigendian=0):
    return Image(width=width, height=height, encoding=encoding, step=step if step is not None else 0,
                 is_bigendian=bigendian, data=bytes(data))


def test_rgb8_round_trip_is_exact(astronaut):
    msg = rgb_to_image(astronaut, frame_id='cam')
    assert (msg.width, msg.height, msg.step, msg.encoding) == (512, 512, 1536, 'rgb8')
    np.testing.assert_array_equal(image_to_rgb(msg), astronaut)


def test_bgr8_is_reordered(astronaut):
    msg = rgb_to_image(astronaut, encoding='bgr8')
    assert bytes(msg.data[:3]) == bytes(astronaut[0, 0, ::-1])
    np.testing.assert_array_equal(image_to_rgb(msg), astronaut)


def test_small_hand_computed_encodings():
    # one row of two pixels: red, then blue
    assert image_to_rgb(raw(2, 1, 'rgb8', [255, 0, 0, 0, 0, 255], 6)).tolist() == [[[255, 0, 0], [0, 0, 255]]]
    assert image_to_rgb(raw(2, 1, 'bgr8', [0, 0, 255, 255, 0, 0], 6)).tolist() == [[[255, 0, 0], [0, 0, 255]]]
    assert image_to_rgb(raw(1, 1, 'rgba8', [1, 2, 3, 4], 4)).tolist() == [[[1, 2, 3]]]
    assert image_to_rgb(raw(1, 1, 'bgra8', [1, 2, 3, 4], 4)).tolist() == [[[3, 2, 1]]]
    assert image_to_rgb(raw(2, 1, 'mono8', [7, 9], 2)).tolist() == [[[7, 7, 7], [9, 9, 9]]]
    # mono16 keeps the high byte; little and big endian
    assert image_to_rgb(raw(1, 1, 'mono16', [0x34, 0x12], 2)).tolist() == [[[0x12] * 3]]
    assert image_to_rgb(raw(1, 1, 'mono16', [0x12, 0x34], 2, bigendian=1)).tolist() == [[[0x12] * 3]]
    assert image_to_rgb(raw(1, 1, 'rgb16', [0, 10, 0, 20, 0, 30], 6)).tolist() == [[[10, 20, 30]]]


def test_row_padding_is_dropped():
    # 2x2 rgb8 with 2 bytes of padding per row (step 8)
    data = [1, 1, 1, 2, 2, 2, 0xEE, 0xEE, 3, 3, 3, 4, 4, 4, 0xEE, 0xEE]
    rgb = image_to_rgb(raw(2, 2, 'rgb8', data, 8))
    assert rgb[:, :, 0].tolist() == [[1, 2], [3, 4]]


def test_yuv422_grey_and_colour():
    # UYVY with U = V = 128 is grey: Y = 16 -> black, Y = 235 -> white
    rgb = image_to_rgb(raw(2, 1, 'yuv422', [128, 16, 128, 235], 4))
    assert rgb.tolist() == [[[0, 0, 0], [255, 255, 255]]]
    # YUYV order of the same pixels
    rgb = image_to_rgb(raw(2, 1, 'yuv422_yuy2', [16, 128, 235, 128], 4))
    assert rgb.tolist() == [[[0, 0, 0], [255, 255, 255]]]
    # BT.601 pure red is Y=81, U=90, V=240
    red = image_to_rgb(raw(2, 1, 'yuv422', [90, 81, 240, 81], 4))[0, 0]
    assert red[0] > 200 and red[1] < 40 and red[2] < 40


def test_bayer_cell_becomes_one_colour():
    # rggb cell: R=200, G=100 and 50 (mean 75), B=10
    rgb = image_to_rgb(raw(2, 2, 'bayer_rggb8', [200, 100, 50, 10], 2))
    assert rgb.tolist() == [[[200, 75, 10]] * 2] * 2
    rgb = image_to_rgb(raw(2, 2, 'bayer_bggr8', [10, 100, 50, 200], 2))
    assert rgb.tolist() == [[[200, 75, 10]] * 2] * 2


@pytest.mark.parametrize('msg, words', [
    (raw(0, 0, 'rgb8', [], 0), ['zero size', 'width and height']),
    (raw(4, 0, 'rgb8', [], 12), ['zero size']),
    (raw(2, 1, 'rgb8', [0] * 4, 6), ['4 bytes', 'step*height = 6*1 = 6']),
    (raw(2, 2, 'rgb8', [0] * 8, 4), ['step is 4 bytes', 'needs 6']),
    (raw(1, 1, '32FC1', [0] * 4, 4), ["'32FC1' is not supported", 'rgb8']),
    (raw(1, 1, '', [0] * 3, 3), ["'' is not supported"]),
    (raw(3, 1, 'yuv422', [0] * 6, 6), ['must be even']),
    (raw(2, 1, 'bayer_rggb8', [0] * 2, 2), ['height is 1, must be even']),
])
def test_malformed_images_name_the_problem(msg, words):
    with pytest.raises(ImageConversionError) as error:
        image_to_rgb(msg)
    message = str(error.value)
    assert '\n' not in message
    for word in words:
        assert word in message


def test_error_is_a_value_error():
    assert issubclass(ImageConversionError, ValueError)


@pytest.mark.parametrize('fmt', ['jpeg', 'png'])
def test_compressed_round_trip(astronaut, fmt):
    msg = rgb_to_compressed(astronaut, fmt=fmt, quality=95)
    rgb = compressed_to_rgb(msg)
    assert rgb.shape == astronaut.shape and rgb.dtype == np.uint8
    error = np.abs(rgb.astype(int) - astronaut.astype(int)).mean()
    assert error == 0 if fmt == 'png' else error < 4


def test_compressed_with_ros_style_format_string(astronaut):
    msg = rgb_to_compressed(astronaut)
    msg.format = 'rgb8; jpeg compressed bgr8'
    assert compressed_to_rgb(msg).shape == (512, 512, 3)


def test_grey_png_becomes_three_channels():
    buffer = io.BytesIO()
    PILImage.fromarray(skimage.data.camera()).save(buffer, format='PNG')
    msg = CompressedImage(format='png', data=buffer.getvalue())
    rgb = compressed_to_rgb(msg)
    assert rgb.shape == (512, 512, 3)
    np.testing.assert_array_equal(rgb[..., 0], skimage.data.camera())


def test_16_bit_png_is_scaled_like_raw_mono16():
    """A 16-bit grey PNG keeps the high byte, as raw mono16 does: 40000 -> 156, not clipped to 255."""
    values = np.array([[0, 255, 256, 40000, 65535]], dtype=np.uint16)
    buffer = io.BytesIO()
    PILImage.fromarray(values).save(buffer, format='PNG')
    png = CompressedImage(format='png', data=buffer.getvalue())
    raw = Image(height=1, width=5, encoding='mono16', step=10, data=values.astype('<u2').tobytes())
    expected = [0, 0, 1, 156, 255]
    assert compressed_to_rgb(png)[0, :, 0].tolist() == expected
    assert image_to_rgb(raw)[0, :, 0].tolist() == expected
    assert compressed_to_rgb(png).shape == (1, 5, 3)


@pytest.mark.parametrize('mangle, words', [
    (lambda data: data[: len(data) // 2], ['cannot be decoded', 'corrupt or truncated']),
    (lambda data: b'\x00' * 100, ['cannot be decoded']),
    (lambda data: b'', ['no data']),
])
def test_corrupt_compressed_images(astronaut, mangle, words):
    msg = rgb_to_compressed(astronaut)
    msg.data = mangle(bytes(msg.data))
    with pytest.raises(ImageConversionError) as error:
        compressed_to_rgb(msg)
    assert '\n' not in str(error.value)
    for word in words:
        assert word in str(error.value)


def test_compressed_depth_and_unknown_formats_are_refused(astronaut):
    msg = rgb_to_compressed(astronaut, fmt='png')
    msg.format = '16UC1; compressedDepth png'
    with pytest.raises(ImageConversionError, match='depth image'):
        compressed_to_rgb(msg)
    msg.format = 'theora'
    with pytest.raises(ImageConversionError, match='publish jpeg or png'):
        compressed_to_rgb(msg)


def test_message_to_rgb_dispatches(astronaut):
    np.testing.assert_array_equal(message_to_rgb(rgb_to_image(astronaut)), astronaut)
    assert message_to_rgb(rgb_to_compressed(astronaut, fmt='png')).shape == (512, 512, 3)
    with pytest.raises(ImageConversionError, match='not a sensor_msgs/Image'):
        message_to_rgb(Header())


def test_rosbags_messages_decode_the_same(astronaut):
    """Bag replay hands rosbags-deserialised messages (numpy data) to the same functions."""
    from rosbags.typesys import Stores, get_typestore
    typestore = get_typestore(Stores.ROS2_HUMBLE)
    types = typestore.types
    header = types['std_msgs/msg/Header'](
        stamp=types['builtin_interfaces/msg/Time'](sec=1, nanosec=2), frame_id='cam')
    image = types['sensor_msgs/msg/Image'](
        header=header, height=512, width=512, encoding='bgr8', is_bigendian=0, step=1536,
        data=np.ascontiguousarray(astronaut[..., ::-1]).reshape(-1))
    # through CDR, as a bag reader would produce it
    image = typestore.deserialize_cdr(typestore.serialize_cdr(image, image.__msgtype__), image.__msgtype__)
    assert isinstance(image.data, np.ndarray)
    np.testing.assert_array_equal(message_to_rgb(image), astronaut)

    jpeg = rgb_to_compressed(astronaut, fmt='png')
    compressed = types['sensor_msgs/msg/CompressedImage'](
        header=header, format='png', data=np.frombuffer(bytes(jpeg.data), dtype=np.uint8))
    np.testing.assert_array_equal(message_to_rgb(compressed), astronaut)

    broken = types['sensor_msgs/msg/Image'](
        header=header, height=512, width=512, encoding='rgb8', is_bigendian=0, step=1536,
        data=np.zeros(1000, dtype=np.uint8))
    with pytest.raises(ImageConversionError, match='1000 bytes'):
        message_to_rgb(broken)


def test_image_has_pixels():
    assert not image_has_pixels(Image())
    assert image_has_pixels(raw(1, 1, 'rgb8', [0, 0, 0], 3))
    assert image_has_pixels(Image(data=b'\x01'))  # data without a size: malformed, not absent


@dataclasses.dataclass
class FakeOutput:
    """Field-for-field what engine.VlmOutput carries (conversions reads fields by name)."""
    prompt: str = 'Is the door open?'
    text: str = 'yes'
    model: str = 'tiny'
    reduction: str = 'visionzip'
    token_budget: int = 32
    visual_tokens: int = 32
    visual_tokens_full: int = 576
    generated_tokens: int = 3
    vision_ms: float = 1.5
    reduction_ms: float = 0.25
    prefill_ms: float = 2.0
    ttft_ms: float = 3.0
    decode_ms: float = 4.0
    total_ms: float = 8.0
    prefix_reused: bool = True
    kv_cache_bytes: int = 1024


def test_output_to_result_copies_every_field():
    header = Header(stamp=Time(sec=12, nanosec=34), frame_id='front_optical')
    result = output_to_result(FakeOutput(), header=header, camera='front', image_age_ms=40.0)
    assert (result.header.stamp.sec, result.header.stamp.nanosec, result.header.frame_id) == (
        12, 34, 'front_optical')
    assert (result.camera, result.prompt, result.text, result.model, result.reduction) == (
        'front', 'Is the door open?', 'yes', 'tiny', 'visionzip')
    assert (result.token_budget, result.visual_tokens, result.visual_tokens_full,
            result.generated_tokens, result.prefix_reused) == (32, 32, 576, 3, True)
    assert (result.image_age_ms, result.vision_ms, result.reduction_ms, result.prefill_ms,
            result.decode_ms, result.total_ms) == (40.0, 1.5, 0.25, 2.0, 4.0, 8.0)
    # One image: the image lists name it.
    assert (list(result.image_cameras), list(result.image_labels), list(result.image_visual_tokens)) == (
        ['front'], [''], [32])
    assert [(stamp.sec, stamp.nanosec) for stamp in result.image_stamps] == [(12, 34)]


def test_output_to_result_lists_several_images_in_prompt_order():
    header = Header(stamp=Time(sec=20, nanosec=5), frame_id='rear_optical')
    images = [types.SimpleNamespace(visual_tokens=11), types.SimpleNamespace(visual_tokens=10)]
    output = dataclasses.replace(FakeOutput(), visual_tokens=21)
    output.images = images
    result = output_to_result(output, header=header, camera='front,rear', image_age_ms=5.0,
                              images=[('front', Time(sec=19, nanosec=900), 'front'),
                                      ('rear', Time(sec=20, nanosec=5), 'rear')])
    assert result.camera == 'front,rear' and result.header.frame_id == 'rear_optical'
    assert list(result.image_cameras) == ['front', 'rear'] and list(result.image_labels) == ['front', 'rear']
    assert [(stamp.sec, stamp.nanosec) for stamp in result.image_stamps] == [(19, 900), (20, 5)]
    assert list(result.image_visual_tokens) == [11, 10]
