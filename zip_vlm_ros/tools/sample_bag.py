"""vlm_make_sample_bag: a small rosbag2 of real photographs for the demo, the replay tool and tests.

The bag looks like a short drive of a robot with two cameras, recorded at 10 Hz:

- ``/camera/front/image_raw``              sensor_msgs/msg/Image, alternating rgb8 and bgr8
- ``/camera/rear/image_raw/compressed``    sensor_msgs/msg/CompressedImage, jpeg (Pillow)
- ``/camera/front/camera_info``            sensor_msgs/msg/CameraInfo (a non-image topic, as in real bags)

The pixels are scikit-image's bundled photographs (astronaut, coffee, chelsea, rocket), which
install with the package and need no download. ``with_bad_frames`` adds one raw frame whose data is
shorter than ``step * height`` and one jpeg that cannot be decoded, so tools can be tested on the
faults real recordings contain. Both storage formats rosbag2 knows are written with ``rosbags``.
"""
from __future__ import annotations

import argparse
import io
import pathlib
import sys
from dataclasses import dataclass, field

import numpy as np

RAW_TOPIC = '/camera/front/image_raw'
COMPRESSED_TOPIC = '/camera/rear/image_raw/compressed'
CAMERA_INFO_TOPIC = '/camera/front/camera_info'
STORAGE_FORMATS = ('mcap', 'sqlite3')
# Names of functions in skimage.data returning HxWx3 uint8 photographs that ship with scikit-image.
SAMPLE_IMAGE_NAMES = ('astronaut', 'coffee', 'chelsea', 'rocket')
# 2023-11-14T22:13:20Z: a fixed recording start so every generated bag is byte-for-byte comparable.
DEFAULT_START_NS = 1_700_000_000 * 10**9
JPEG_QUALITY = 90


@dataclass(frozen=True)
class BadFrame:
    """A deliberately malformed message written into the bag."""

    topic: str
    stamp_ns: int
    fault: str


@dataclass(frozen=True)
class SampleBag:
    """What `write_sample_bag` wrote: the bag directory and the messages per topic."""

    path: pathlib.Path
    storage: str
    message_counts: dict[str, int]
    # Header stamps (ns) of the well-formed image frames, per image topic, in recording order.
    good_frame_stamps: dict[str, list[int]] = field(default_factory=dict)
    bad_frames: list[BadFrame] = field(default_factory=list)


class SampleBagError(Exception):
    """The bag cannot be written; str() is one line saying what to change."""


def sample_image(index: int) -> np.ndarray:
    """The `index`-th bundled photograph (cycling), as an HxWx3 uint8 RGB array."""
    import skimage.data

    name = SAMPLE_IMAGE_NAMES[index % len(SAMPLE_IMAGE_NAMES)]
    return np.ascontiguousarray(getattr(skimage.data, name)())


def encode_jpeg(rgb: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of an HxWx3 uint8 RGB array."""
    from PIL import Image as PilImage

    buffer = io.BytesIO()
    PilImage.fromarray(rgb, mode='RGB').save(buffer, format='JPEG', quality=quality)
    return buffer.getvalue()


def write_sample_bag(
    out: str | pathlib.Path,
    *,
    storage: str = 'mcap',
    frames_per_topic: int = 4,
    rate_hz: float = 10.0,
    with_bad_frames: bool = False,
    start_ns: int = DEFAULT_START_NS,
) -> SampleBag:
    """Write the sample bag to the new directory `out`.

    Each camera publishes `frames_per_topic` good frames at `rate_hz`; the rear camera is offset by half
    a period, as unsynchronised cameras are. Header stamps equal the bag's log times. Bad frames (when
    asked) sit a quarter period after the first good frame of each camera, so that a replay of the first
    two frames already meets them, between good ones.
    """
    out = pathlib.Path(out)
    _check_arguments(out, storage, frames_per_topic, rate_hz)
    build = _MessageBuilder()
    period_ns = round(1e9 / rate_hz)
    messages, good_frame_stamps = _good_frames(build, start_ns, period_ns, frames_per_topic)
    bad_frames: list[BadFrame] = []
    if with_bad_frames:
        messages += _bad_frames(build, start_ns, period_ns, bad_frames)
    messages.sort(key=lambda item: item[0])  # the bag in time order
    counts = _write(out, storage, build.typestore, messages)
    return SampleBag(path=out, storage=storage, message_counts=counts,
                     good_frame_stamps=good_frame_stamps, bad_frames=bad_frames)


# (log time ns, topic, message, msgtype)
Message = tuple[int, str, object, str]
MESSAGE_TYPES = ((RAW_TOPIC, 'sensor_msgs/msg/Image'), (COMPRESSED_TOPIC, 'sensor_msgs/msg/CompressedImage'),
                 (CAMERA_INFO_TOPIC, 'sensor_msgs/msg/CameraInfo'))


def _check_arguments(out: pathlib.Path, storage: str, frames_per_topic: int, rate_hz: float) -> None:
    if storage not in STORAGE_FORMATS:
        raise SampleBagError(f'unknown storage {storage!r}: use one of {", ".join(STORAGE_FORMATS)}')
    if frames_per_topic < 1:
        raise SampleBagError(f'frames_per_topic must be at least 1, got {frames_per_topic}')
    if rate_hz <= 0:
        raise SampleBagError(f'rate_hz must be positive, got {rate_hz}')
    if out.exists():
        raise SampleBagError(f'{out} already exists: choose a new path or delete it first')
    if not out.parent.is_dir():
        raise SampleBagError(f'parent directory {out.parent} does not exist: create it first')


class _MessageBuilder:
    """The bag's messages as ``rosbags`` types of ROS 2 Kilted."""

    def __init__(self):
        from rosbags.typesys import Stores, get_typestore

        self.typestore = get_typestore(Stores.ROS2_KILTED)
        self.types = self.typestore.types

    def header(self, stamp_ns: int, frame_id: str):
        time = self.types['builtin_interfaces/msg/Time'](sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9)
        return self.types['std_msgs/msg/Header'](stamp=time, frame_id=frame_id)

    def raw_image(self, stamp_ns: int, rgb: np.ndarray, encoding: str, data: np.ndarray | None = None):
        height, width, channels = rgb.shape
        pixels = rgb if encoding == 'rgb8' else rgb[:, :, ::-1]
        if data is None:
            data = np.ascontiguousarray(pixels).reshape(-1)
        return self.types['sensor_msgs/msg/Image'](
            header=self.header(stamp_ns, 'front_camera_optical'), height=height, width=width, encoding=encoding,
            is_bigendian=0, step=width * channels, data=data)

    def compressed_image(self, stamp_ns: int, jpeg: bytes):
        return self.types['sensor_msgs/msg/CompressedImage'](
            header=self.header(stamp_ns, 'rear_camera_optical'), format='jpeg',
            data=np.frombuffer(jpeg, dtype=np.uint8))

    def camera_info(self, stamp_ns: int, height: int, width: int):
        focal = float(width)  # a plausible pinhole camera with a ~53 degree horizontal field of view
        k = np.array([focal, 0, width / 2, 0, focal, height / 2, 0, 0, 1], dtype=np.float64)
        p = np.array([focal, 0, width / 2, 0, 0, focal, height / 2, 0, 0, 0, 1, 0], dtype=np.float64)
        roi = self.types['sensor_msgs/msg/RegionOfInterest'](x_offset=0, y_offset=0, height=0, width=0,
                                                            do_rectify=False)
        return self.types['sensor_msgs/msg/CameraInfo'](
            header=self.header(stamp_ns, 'front_camera_optical'), height=height, width=width,
            distortion_model='plumb_bob', d=np.zeros(5), k=k, r=np.eye(3).reshape(-1), p=p, binning_x=0,
            binning_y=0, roi=roi)


def _good_frames(build: _MessageBuilder, start_ns: int, period_ns: int,
                 frames_per_topic: int) -> tuple[list[Message], dict[str, list[int]]]:
    """Both cameras' frames and the front camera's info, with the good frames' stamps per topic."""
    messages: list[Message] = []
    good_frame_stamps: dict[str, list[int]] = {RAW_TOPIC: [], COMPRESSED_TOPIC: []}
    for index in range(frames_per_topic):
        front_ns = start_ns + index * period_ns
        front_rgb = sample_image(index)
        encoding = 'rgb8' if index % 2 == 0 else 'bgr8'
        messages.append((front_ns, RAW_TOPIC, build.raw_image(front_ns, front_rgb, encoding), 'sensor_msgs/msg/Image'))
        messages.append((front_ns, CAMERA_INFO_TOPIC, build.camera_info(front_ns, *front_rgb.shape[:2]),
                         'sensor_msgs/msg/CameraInfo'))
        good_frame_stamps[RAW_TOPIC].append(front_ns)

        rear_ns = front_ns + period_ns // 2
        # The rear camera sees the images in the opposite order, so the two topics differ frame by frame.
        rear_rgb = sample_image(len(SAMPLE_IMAGE_NAMES) - 1 - index)
        messages.append((rear_ns, COMPRESSED_TOPIC, build.compressed_image(rear_ns, encode_jpeg(rear_rgb)),
                         'sensor_msgs/msg/CompressedImage'))
        good_frame_stamps[COMPRESSED_TOPIC].append(rear_ns)
    return messages, good_frame_stamps


def _bad_frames(build: _MessageBuilder, start_ns: int, period_ns: int, bad_frames: list[BadFrame]) -> list[Message]:
    """A raw frame with too little data and a corrupt jpeg; each is described in `bad_frames`."""
    short_ns = start_ns + period_ns // 4
    rgb = sample_image(1)
    truncated = np.ascontiguousarray(rgb).reshape(-1)[: rgb.size // 2].copy()
    bad_frames.append(BadFrame(RAW_TOPIC, short_ns, f'data has {truncated.size} bytes, step*height needs {rgb.size}'))

    corrupt_ns = short_ns + period_ns // 2
    jpeg = encode_jpeg(sample_image(2))
    # Keep the start-of-image marker and the first header bytes, then garbage: no decoder can use it.
    corrupt = jpeg[:20] + bytes((7 * i) % 251 for i in range(2000))
    bad_frames.append(BadFrame(COMPRESSED_TOPIC, corrupt_ns, 'corrupt jpeg'))
    return [(short_ns, RAW_TOPIC, build.raw_image(short_ns, rgb, 'rgb8', data=truncated), 'sensor_msgs/msg/Image'),
            (corrupt_ns, COMPRESSED_TOPIC, build.compressed_image(corrupt_ns, corrupt),
             'sensor_msgs/msg/CompressedImage')]


def _write(out: pathlib.Path, storage: str, typestore, messages: list[Message]) -> dict[str, int]:
    """Write `messages` (in time order) as a rosbag2 at `out`; returns the messages per topic."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    plugin = StoragePlugin.MCAP if storage == 'mcap' else StoragePlugin.SQLITE3
    counts: dict[str, int] = {}
    with Writer(out, version=9, storage_plugin=plugin) as writer:
        connections = {topic: writer.add_connection(topic, msgtype, typestore=typestore)
                       for topic, msgtype in MESSAGE_TYPES}
        for log_ns, topic, message, msgtype in messages:
            writer.write(connections[topic], log_ns, typestore.serialize_cdr(message, msgtype))
            counts[topic] = counts.get(topic, 0) + 1
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog='vlm_make_sample_bag',
        description='Write a small rosbag2 of real photographs on a raw and a compressed camera topic.')
    parser.add_argument('out', help='bag directory to create (must not exist)')
    parser.add_argument('--storage', choices=STORAGE_FORMATS, default='mcap', help='rosbag2 storage format')
    parser.add_argument('--frames', type=int, default=4, help='good frames per camera (default 4)')
    parser.add_argument('--rate', type=float, default=10.0, help='camera rate in Hz (default 10)')
    parser.add_argument('--with-bad-frames', action='store_true',
                        help='also write a raw frame with too little data and a corrupt jpeg')
    args = parser.parse_args(argv)
    try:
        bag = write_sample_bag(args.out, storage=args.storage, frames_per_topic=args.frames,
                               rate_hz=args.rate, with_bad_frames=args.with_bad_frames)
    except SampleBagError as error:
        print(f'vlm_make_sample_bag: error: {error}', file=sys.stderr)
        return 1
    size_bytes = sum(path.stat().st_size for path in bag.path.rglob('*') if path.is_file())
    counts = ', '.join(f'{topic}: {count}' for topic, count in sorted(bag.message_counts.items()))
    print(f'wrote {bag.path} ({bag.storage}, {size_bytes / 1e6:.1f} MB; {counts}; '
          f'{len(bag.bad_frames)} bad frames)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
