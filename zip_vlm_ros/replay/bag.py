"""Step 1 of a replay: open the bag, pick its image topics and frames, decode the pixels.

A frame is identified by its topic and its index among that topic's messages in the bag (``index``),
not by its header stamp: several images can share one stamp, and a camera driver may stamp every
frame zero. The stamp is kept for the report and for image ages.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from zip_vlm_ros.replay.inputs import ReplayError
from zip_vlm_ros.replay.storage import DamagedRegion, StorageReader, TopicInfo, open_storage

IMAGE_MSGTYPES = ('sensor_msgs/msg/Image', 'sensor_msgs/msg/CompressedImage')
STORAGE_SUFFIXES = ('.mcap', '.db3')
FINGERPRINT_BYTES = 1 << 20


@dataclass(frozen=True)
class BagMessage:
    topic: str
    msgtype: str
    index: int             # position among this topic's messages in the bag (0-based)
    log_ns: int            # time the recorder received the message
    raw: bytes


@dataclass(frozen=True)
class Frame:
    topic: str
    index: int
    stamp_ns: int          # header stamp (the bag's log time when the header stamp is zero)
    log_ns: int
    rgb: np.ndarray        # (height, width, 3) uint8
    bag: str = ''          # the bag's label in a run over several bags (its name; see replay.bags)


@dataclass(frozen=True)
class SkippedFrame:
    topic: str             # '' when the damage hides which topic the bytes belonged to
    index: int | None      # None when the message could not be placed in its topic
    stamp_ns: int | None   # None when the message could not even be deserialised
    log_ns: int | None
    reason: str
    bag: str = ''          # as Frame.bag


class Bag:
    """A rosbag2 recording: its storage files, read in order with per-topic message indices.

    `notes` says how the bag was opened when it was not a cleanly closed recording; after reading,
    `stopped` is one line when a file could not be read past a point and `cut` lists cut files.
    """

    def __init__(self, path: pathlib.Path, storages: list[StorageReader], notes: list[str]):
        self.path = path
        self.storages = storages
        self.notes = notes
        self.topics: dict[str, TopicInfo] = {}
        for storage in storages:
            for name, info in storage.topics.items():
                known = self.topics.get(name)
                count = info.msgcount if known is None else (
                    None if known.msgcount is None or info.msgcount is None else known.msgcount + info.msgcount)
                self.topics[name] = TopicInfo(info.msgtype, count)
        starts = [storage.start_ns for storage in storages if storage.start_ns is not None]
        ends = [storage.end_ns for storage in storages if storage.end_ns is not None]
        self.start_ns = min(starts) if starts else 0
        self.end_ns = max(ends) if ends else 0

    @property
    def stopped(self) -> str | None:
        return next((storage.stopped for storage in self.storages if storage.stopped), None)

    @property
    def cut(self) -> list[str]:
        return [storage.cut for storage in self.storages if storage.cut]

    def messages(self, topics: list[str]) -> Iterator[BagMessage | DamagedRegion]:
        """Messages of `topics` (with their index in the topic) and every damaged region, in file order."""
        indices: Counter[str] = Counter()
        for storage in self.storages:
            for item in storage.messages():
                if isinstance(item, DamagedRegion):
                    lost_indices = []
                    for topic, _ in item.lost:  # a lost message still holds its place in its topic
                        lost_indices.append(indices[topic])
                        indices[topic] += 1
                    yield dataclasses.replace(item, lost_indices=tuple(lost_indices))
                    continue
                index = indices[item.topic]
                indices[item.topic] += 1
                if item.topic in topics:
                    yield BagMessage(item.topic, item.msgtype, index, item.log_ns, item.raw)
            if storage.stopped:
                return

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the recording for --resume: file names, sizes and digests of their ends."""
        files = {}
        for storage in self.storages:
            size = storage.path.stat().st_size
            digest = hashlib.sha256()
            with storage.path.open('rb') as file:
                digest.update(file.read(FINGERPRINT_BYTES))
                file.seek(max(size - FINGERPRINT_BYTES, 0))
                digest.update(file.read(FINGERPRINT_BYTES))
            files[storage.path.name] = {'bytes': size, 'sha256_of_ends': digest.hexdigest()[:16]}
        return files

    def close(self) -> None:
        for storage in self.storages:
            storage.close()


def open_bag(path: str | os.PathLike) -> Bag:
    """Open a rosbag2 directory (with or without metadata.yaml) or a single .mcap/.db3 file."""
    path = pathlib.Path(path)
    if not path.exists():
        raise ReplayError(f'bag {path} does not exist: pass a rosbag2 directory (the folder with '
                          f'metadata.yaml) or a .mcap/.db3 file')
    files, notes = _storage_files(path)
    storages: list[StorageReader] = []
    try:
        for file in files:
            storages.append(open_storage(file))
            if storages[-1].topics == {} and file.suffix == '.mcap':
                _index_by_reading(storages[-1])
                notes.append(f'{file.name} has no readable summary: its topics were found by reading it once')
    except (ValueError, OSError) as error:
        for storage in storages:
            storage.close()
        raise ReplayError(f'cannot read bag {path} ({error}): check that it is a rosbag2 recording in sqlite3 '
                          f'or mcap format') from None
    return Bag(path, storages, notes)


def _storage_files(path: pathlib.Path) -> tuple[list[pathlib.Path], list[str]]:
    """The storage files of a bag in recording order, and a note when metadata.yaml could not be used."""
    if path.is_file():
        if path.suffix not in STORAGE_SUFFIXES:
            raise ReplayError(f'{path} is not a .mcap or .db3 file: pass a rosbag2 directory or its storage file')
        return [path], []
    listed = _files_in_metadata(path / 'metadata.yaml')
    found = sorted(file for file in path.iterdir() if file.suffix in STORAGE_SUFFIXES)
    if not found:
        raise ReplayError(f'{path} is a directory without .mcap or .db3 storage files, so not a rosbag2 bag: '
                          f'pass the bag folder itself (the one holding metadata.yaml)')
    if listed is None:
        return found, ['no readable metadata.yaml (the recorder did not close the bag): the storage files were '
                       'read directly, as `ros2 bag reindex` would']
    files = [path / name for name in listed if (path / name).is_file()]
    missing = [name for name in listed if not (path / name).is_file()]
    notes = [f'metadata.yaml lists {", ".join(missing)}, which are missing'] if missing else []
    return files or found, notes


def _files_in_metadata(metadata: pathlib.Path) -> list[str] | None:
    import yaml

    if not metadata.is_file():
        return None
    try:
        info = yaml.safe_load(metadata.read_text(encoding='utf-8'))['rosbag2_bagfile_information']
        return [str(name) for name in info['relative_file_paths']]
    except (yaml.YAMLError, UnicodeDecodeError, KeyError, TypeError):
        return None


def _index_by_reading(storage: StorageReader) -> None:
    """Count each topic's messages of a file without a summary by reading it once."""
    counts: Counter[str] = Counter()
    for item in storage.messages():
        if not isinstance(item, DamagedRegion):
            counts[item.topic] += 1
    storage.topics = {name: TopicInfo(info.msgtype, counts[name]) for name, info in storage.topics.items()}
    storage.stopped = storage.cut = None  # the real read reports them again


def describe_topics(topics: dict[str, TopicInfo]) -> str:
    """'/a (sensor_msgs/msg/Image, 5 messages), /b (...)' for messages listing a bag's topics."""
    def count(info: TopicInfo) -> str:
        return '' if info.msgcount is None else f', {info.msgcount} messages'
    return ', '.join(f'{name} ({info.msgtype}{count(info)})' for name, info in sorted(topics.items()))


def resolve_topics(bag_topics: dict[str, TopicInfo], requested: list[str] | None, bag: str) -> list[str]:
    """The requested image topics (default: every image topic of the bag).

    Any requested topic that is missing or not an image is an error naming the bag's image topics: a
    mistyped name must not silently shrink the evaluation.
    """
    image_topics = {name: info for name, info in bag_topics.items() if info.msgtype in IMAGE_MSGTYPES}
    if not image_topics:
        others = describe_topics(bag_topics) or 'none'
        raise ReplayError(f'bag {bag} has no image topics (sensor_msgs/msg/Image or CompressedImage); its '
                          f'topics are: {others}')
    listing = f'image topics in {bag}: {describe_topics(image_topics)}'
    if not requested:
        return sorted(image_topics)
    selected: list[str] = []
    for topic in requested:
        name = topic if topic.startswith('/') else '/' + topic
        if name in bag_topics and name not in image_topics:
            raise ReplayError(f'topic {name} is {bag_topics[name].msgtype}, not an image; {listing}')
        if name not in image_topics:
            raise ReplayError(f'topic {name} is not in the bag; {listing}')
        if name not in selected:
            selected.append(name)
    return selected


class FrameSelector:
    """Which messages of each topic to evaluate: every Nth, or one per period, up to max_frames each.

    Periods and max_frames count only frames that decoded (`accept`), so a corrupt message does not
    use up a slot that the next good frame can fill.
    """

    def __init__(self, *, every: int = 1, period_s: float | None = None, max_frames: int | None = None):
        self.every = every
        self.period_ns = None if period_s is None else round(period_s * 1e9)
        self.max_frames = max_frames
        self.seen: Counter[str] = Counter()
        self.accepted: Counter[str] = Counter()
        self.last_accepted_ns: dict[str, int] = {}

    def wants(self, topic: str, log_ns: int) -> bool:
        index = self.seen[topic]
        self.seen[topic] += 1
        if self.topic_full(topic):
            return False
        if self.period_ns is not None:
            last = self.last_accepted_ns.get(topic)
            return last is None or log_ns - last >= self.period_ns
        return index % self.every == 0

    def accept(self, topic: str, log_ns: int) -> None:
        self.accepted[topic] += 1
        self.last_accepted_ns[topic] = log_ns

    def topic_full(self, topic: str) -> bool:
        return self.max_frames is not None and self.accepted[topic] >= self.max_frames

    def expected_frames(self, message_count: int | None, duration_ns: int, *, skipped: int = 0) -> int | None:
        """Estimate (for the progress bar) how many frames a topic with these messages will give, less
        the `skipped` (malformed) ones met so far."""
        if message_count is None:
            return self.max_frames
        if self.period_ns is not None:
            estimate = min(message_count - skipped, duration_ns // self.period_ns + 1)
        else:
            estimate = -(-message_count // self.every) - skipped
        estimate = max(estimate, 0)
        return estimate if self.max_frames is None else min(estimate, self.max_frames)


def stamp_ns_of(message: Any) -> int:
    stamp = message.header.stamp
    return int(stamp.sec) * 10**9 + int(stamp.nanosec)


def decode_frame(typestore, message: BagMessage, bag: str = '') -> Frame | SkippedFrame:
    """Deserialise one bag message and decode its pixels; a SkippedFrame says why when that fails. `bag`
    is the label of the bag the message came from."""
    from zip_vlm_ros.node.conversions import ImageConversionError, message_to_rgb

    try:
        decoded = typestore.deserialize_cdr(message.raw, message.msgtype)
    except Exception as error:  # rosbags raises struct/index/value errors on truncated or garbled CDR
        return SkippedFrame(message.topic, message.index, None, message.log_ns,
                            f'message cannot be deserialised as {message.msgtype} ({type(error).__name__}: {error})',
                            bag)
    stamp_ns = stamp_ns_of(decoded) or message.log_ns
    try:
        rgb = message_to_rgb(decoded)
    except ImageConversionError as error:
        return SkippedFrame(message.topic, message.index, stamp_ns, message.log_ns, str(error), bag)
    return Frame(message.topic, message.index, stamp_ns, message.log_ns, rgb, bag)


def damaged_frames(region: DamagedRegion, topics: list[str], bag: str = '') -> list[SkippedFrame]:
    """The skipped-frame rows of a damaged region: one per lost message of an evaluated topic, or one for
    the region when the damage hides which messages it held."""
    reason = f'damaged: {region.file} {region.where}: {region.reason}'
    if not region.lost:
        return [SkippedFrame('', None, None, None, reason, bag)]
    indices = region.lost_indices or (None,) * len(region.lost)
    return [SkippedFrame(topic, index, None, log_ns, reason, bag)
            for (topic, log_ns), index in zip(region.lost, indices) if topic in topics]


def expand_bag_paths(paths: list[str | os.PathLike]) -> list[pathlib.Path]:
    """The bags of a run, in the order given: a bag (directory or storage file) stands for itself; a folder
    of bags (no metadata.yaml and no storage file of its own) for the bags directly inside it, by name:
    folders holding metadata.yaml or storage files, and .mcap/.db3 files."""
    bags: list[pathlib.Path] = []
    for path in map(pathlib.Path, paths):
        if path.is_dir() and not _is_bag_dir(path):
            inside = sorted(child for child in path.iterdir()
                            if _is_bag_dir(child) or (child.is_file() and child.suffix in STORAGE_SUFFIXES))
            # An empty folder stays one (broken) bag: open_bag says what a bag folder must hold.
            bags += inside or [path]
        else:
            bags.append(path)
    repeated = sorted({str(path) for path in bags if bags.count(path) > 1})
    if repeated:
        raise ReplayError(f'bag(s) {", ".join(repeated)} given more than once: pass each bag once')
    return bags


def _is_bag_dir(path: pathlib.Path) -> bool:
    return path.is_dir() and ((path / 'metadata.yaml').is_file()
                              or any(file.suffix in STORAGE_SUFFIXES for file in path.iterdir()))


def bag_labels(paths: list[pathlib.Path]) -> list[str]:
    """A short unique name per bag for rows, reports and --resume: the bag's file or folder name (without
    a .mcap/.db3 suffix), or its whole path where two bags share a name. It stays the same when the
    bags move, so a moved run still resumes."""
    names = [path.stem if path.suffix in STORAGE_SUFFIXES else path.name for path in paths]
    return [name if names.count(name) == 1 else str(path) for name, path in zip(names, paths)]
