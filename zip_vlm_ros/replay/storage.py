"""Damage-tolerant readers for rosbag2 storage files (mcap and sqlite3), without metadata.yaml.

Real recordings end badly: a recorder killed mid-drive leaves an mcap without its footer and summary,
or a sqlite3 file without metadata.yaml; a failing disk overwrites bytes in the middle. These readers
walk the storage file itself, as ``ros2 bag reindex`` does, and turn what they cannot read into
``DamagedRegion`` events instead of exceptions, so the caller can evaluate everything that is intact
and list the rest.

Each reader yields, in recording order, ``StoredMessage`` and ``DamagedRegion`` items, and sets
``stopped`` (one line) when the file cannot be read past a point, ``cut`` when it ends without the
records a finished recording has.
"""
from __future__ import annotations

import io
import mmap
import pathlib
import sqlite3
import zlib
from dataclasses import dataclass
from typing import Iterator

MCAP_MAGIC = b'\x89MCAP0\r\n'
_OPCODE_CHUNK = 0x06
_OPCODE_MESSAGE = 0x05
_OPCODE_CHANNEL = 0x04
_OPCODE_SCHEMA = 0x03
_OPCODE_DATA_END = 0x0F
_OPCODE_FOOTER = 0x02
_KNOWN_OPCODES = frozenset(range(0x01, 0x10))
# A chunk header: opcode, length, start/end time, uncompressed size, crc, compression string length.
_CHUNK_HEADER_BYTES = 1 + 8 + 8 + 8 + 8 + 4 + 4


@dataclass(frozen=True)
class StoredMessage:
    topic: str
    msgtype: str
    log_ns: int
    raw: bytes


@dataclass(frozen=True)
class DamagedRegion:
    """Bytes that could not be read; `lost` names the messages known to be in them (topic, log time)."""

    file: str
    where: str                       # e.g. 'bytes 1561062..2895531' or 'row 17'
    reason: str
    lost: tuple[tuple[str, int], ...] = ()
    lost_indices: tuple[int, ...] = ()   # each lost message's index in its topic (filled in by the Bag)


@dataclass(frozen=True)
class TopicInfo:
    msgtype: str
    msgcount: int | None             # None when the file cannot tell without reading it all


class StorageReader:
    """Shared state of both readers: topics, time range, and how reading ended."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.topics: dict[str, TopicInfo] = {}
        self.start_ns: int | None = None
        self.end_ns: int | None = None
        self.stopped: str | None = None  # reading could not go past this point (one line)
        self.cut: str | None = None      # the recording ends without its closing records

    def messages(self) -> Iterator[StoredMessage | DamagedRegion]:
        raise NotImplementedError

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------------
# mcap


class McapStorage(StorageReader):
    """Reads an mcap record by record; uses the summary (when intact) to jump over damaged chunks, and
    otherwise searches for the next chunk that parses. A file without footer is read up to its end."""

    def __init__(self, path: pathlib.Path):
        super().__init__(path)
        self._file = path.open('rb')
        size = path.stat().st_size
        if size < len(MCAP_MAGIC) or self._file.read(len(MCAP_MAGIC)) != MCAP_MAGIC:
            self._file.close()
            raise ValueError(f'{path.name} does not start with the mcap magic bytes')
        self._data = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        self._channels: dict[int, tuple[str, str]] = {}   # channel id -> (topic, msgtype)
        self._schemas: dict[int, str] = {}
        self._chunk_offsets: list[int] | None = None      # from the summary, when it is readable
        self._read_summary()

    def _read_summary(self) -> None:
        from mcap.reader import make_reader

        try:
            with self.path.open('rb') as file:
                summary = make_reader(file).get_summary()
        except Exception:  # no footer (cut) or a damaged summary: found out while reading
            summary = None
        if summary is None:
            return
        self._schemas.update({schema.id: schema.name for schema in summary.schemas.values()})
        for channel in summary.channels.values():
            self._channels[channel.id] = (channel.topic, self._schemas.get(channel.schema_id, ''))
        self._chunk_offsets = sorted(index.chunk_start_offset for index in summary.chunk_indexes)
        statistics = summary.statistics
        counts = statistics.channel_message_counts if statistics else {}
        for channel_id, (topic, msgtype) in self._channels.items():
            self.topics[topic] = TopicInfo(msgtype, counts.get(channel_id) if statistics else None)
        if statistics and statistics.message_count:
            self.start_ns, self.end_ns = statistics.message_start_time, statistics.message_end_time

    def close(self) -> None:
        self._data.close()
        self._file.close()

    def messages(self) -> Iterator[StoredMessage | DamagedRegion]:
        position, size = len(MCAP_MAGIC), len(self._data)
        while True:
            if position + 9 > size:
                self.cut = (f'{self.path.name} ends at byte {size} without its footer: the recording was cut '
                            f'short; read up to the cut')
                return
            opcode, length = self._data[position], int.from_bytes(self._data[position + 1:position + 9], 'little')
            end = position + 9 + length
            if opcode not in _KNOWN_OPCODES or end > size:
                if end > size and opcode in _KNOWN_OPCODES and self._chunk_offsets is None:
                    # No summary and a record running past the end: the recorder stopped writing here.
                    record = 'a chunk' if opcode == _OPCODE_CHUNK else 'a record'
                    self.cut = (f'{self.path.name} ends inside {record} at byte {position} (no footer): the '
                                f'recording was cut short; read up to the cut')
                    return
                position = yield from self._skip_damage(position, f'no valid record at byte {position}')
                if position is None:
                    return
                continue
            if opcode in (_OPCODE_DATA_END, _OPCODE_FOOTER):
                return
            try:
                yield from self._read_record(opcode, position, end)
            except _RecordDamage as damage:
                position = yield from self._skip_damage(position, str(damage))
                if position is None:
                    return
                continue
            position = end

    def _read_record(self, opcode: int, position: int, end: int) -> Iterator[StoredMessage | DamagedRegion]:
        body = self._data[position + 9:end]
        if opcode == _OPCODE_CHUNK:
            records = self._chunk_records(body, position)
            yield from records
        elif opcode in (_OPCODE_SCHEMA, _OPCODE_CHANNEL, _OPCODE_MESSAGE):
            message = self._plain_record(opcode, body)
            if message is not None:
                yield message

    def _plain_record(self, opcode: int, body: bytes) -> StoredMessage | None:
        """Schema and Channel records are remembered; a Message becomes a StoredMessage."""
        from mcap.data_stream import ReadDataStream
        from mcap.records import Channel, Message, Schema

        stream = ReadDataStream(io.BytesIO(body))
        try:
            if opcode == _OPCODE_SCHEMA:
                schema = Schema.read(stream)
                self._schemas[schema.id] = schema.name
                return None
            if opcode == _OPCODE_CHANNEL:
                channel = Channel.read(stream)
                self._add_channel(channel.id, channel.topic, self._schemas.get(channel.schema_id, ''))
                return None
            message = Message.read(stream, len(body))
        except Exception as error:
            raise _RecordDamage(f'unreadable record ({type(error).__name__})') from None
        if message.channel_id not in self._channels:
            raise _RecordDamage(f'message on unknown channel {message.channel_id}')
        topic, msgtype = self._channels[message.channel_id]
        self._note_time(message.log_time)
        return StoredMessage(topic, msgtype, message.log_time, bytes(message.data))

    def _add_channel(self, channel_id: int, topic: str, msgtype: str) -> None:
        self._channels[channel_id] = (topic, msgtype)
        self.topics.setdefault(topic, TopicInfo(msgtype, None))

    def _note_time(self, log_ns: int) -> None:
        self.start_ns = log_ns if self.start_ns is None else min(self.start_ns, log_ns)
        self.end_ns = log_ns if self.end_ns is None else max(self.end_ns, log_ns)

    def _chunk_records(self, body: bytes, position: int) -> list[StoredMessage | DamagedRegion]:
        """The messages of one chunk; a damaged tail becomes one DamagedRegion after the good ones."""
        records = _decompress_chunk(body)
        items: list[StoredMessage | DamagedRegion] = []
        offset = 0
        while offset < len(records):
            if offset + 9 > len(records):
                break
            opcode, length = records[offset], int.from_bytes(records[offset + 1:offset + 9], 'little')
            if opcode not in _KNOWN_OPCODES or offset + 9 + length > len(records):
                items.append(self._chunk_damage(position, offset, 'no valid record'))
                break
            try:
                item = self._plain_record(opcode, records[offset + 9:offset + 9 + length])
            except _RecordDamage as damage:
                items.append(self._chunk_damage(position, offset, str(damage)))
                break
            if item is not None:
                items.append(item)
            offset += 9 + length
        return items

    def _chunk_damage(self, position: int, offset: int, reason: str) -> DamagedRegion:
        return DamagedRegion(self.path.name, f'chunk at byte {position}, from record byte {offset}',
                             f'{reason}; the rest of the chunk is skipped')

    def _skip_damage(self, position: int, reason: str) -> Iterator[DamagedRegion]:
        """Yield the damaged region from `position` to the next readable chunk; return where that is
        (None when nothing readable follows, with `stopped` set)."""
        resume = self._next_chunk_after(position)
        if resume is None:
            self.stopped = (f'{self.path.name}: {reason}; nothing readable follows, so reading stopped at '
                            f'byte {position} of {len(self._data)}')
            yield DamagedRegion(self.path.name, f'bytes {position}..{len(self._data) - 1}', reason)
            return None
        yield DamagedRegion(self.path.name, f'bytes {position}..{resume - 1}', f'{reason}; skipped to the next '
                                                                                 f'chunk')
        return resume

    def _next_chunk_after(self, position: int) -> int | None:
        if self._chunk_offsets is not None:
            return next((offset for offset in self._chunk_offsets if offset > position), None)
        search = position + 1
        while True:
            candidate = self._data.find(bytes([_OPCODE_CHUNK]), search)
            if candidate < 0:
                return None
            if self._plausible_chunk(candidate):
                return candidate
            search = candidate + 1

    def _plausible_chunk(self, position: int) -> bool:
        """A chunk starts here if its header is consistent and every record inside it parses."""
        size = len(self._data)
        if position + _CHUNK_HEADER_BYTES > size:
            return False
        length = int.from_bytes(self._data[position + 1:position + 9], 'little')
        if length < _CHUNK_HEADER_BYTES - 9 or position + 9 + length > size:
            return False
        try:
            items = self._chunk_records(self._data[position + 9:position + 9 + length], position)
        except _RecordDamage:
            return False
        return bool(items) and not any(isinstance(item, DamagedRegion) for item in items)


class _RecordDamage(Exception):
    """One mcap record cannot be read; str() says why."""


def _decompress_chunk(body: bytes) -> bytes:
    """The records inside a chunk record's body (decompressed, CRC checked when one is stored)."""
    from mcap.data_stream import ReadDataStream
    from mcap.records import Chunk
    from mcap.stream_reader import get_chunk_data_stream

    try:
        chunk = Chunk.read(ReadDataStream(io.BytesIO(body)))
        if chunk.message_start_time > chunk.message_end_time or chunk.compression not in ('', 'zstd', 'lz4'):
            raise ValueError('inconsistent chunk header')
        stream, length = get_chunk_data_stream(chunk)
        records = stream.read(length)
    except Exception as error:
        raise _RecordDamage(f'unreadable chunk ({type(error).__name__}: {error})') from None
    if chunk.uncompressed_crc and zlib.crc32(records) != chunk.uncompressed_crc:
        raise _RecordDamage('chunk fails its CRC check')
    return records


# ----------------------------------------------------------------------------------------------------
# sqlite3


class SqliteStorage(StorageReader):
    """Reads a rosbag2 .db3 by message row; a row whose pages are damaged becomes a DamagedRegion."""

    def __init__(self, path: pathlib.Path):
        super().__init__(path)
        # immutable: never write (no journal recovery, no -shm file next to someone's recording).
        self._db = sqlite3.connect(f'file:{path}?immutable=1', uri=True)
        self._topic_of: dict[int, tuple[str, str]] = {}
        try:
            for topic_id, name, msgtype in self._db.execute('SELECT id, name, type FROM topics'):
                self._topic_of[topic_id] = (name, msgtype)
        except sqlite3.DatabaseError as error:
            self._db.close()
            raise ValueError(f'{path.name} has no readable topics table ({error})') from None
        counts = self._query('SELECT topic_id, count(*) FROM messages GROUP BY topic_id') or []
        count_of = dict(counts)
        for topic_id, (name, msgtype) in self._topic_of.items():
            self.topics[name] = TopicInfo(msgtype, count_of.get(topic_id, 0) if counts else None)
        span = self._query('SELECT min(timestamp), max(timestamp) FROM messages')
        if span and span[0][0] is not None:
            self.start_ns, self.end_ns = span[0]

    def _query(self, sql: str, parameters: tuple = ()) -> list[tuple] | None:
        try:
            return self._db.execute(sql, parameters).fetchall()
        except sqlite3.DatabaseError:
            return None

    def close(self) -> None:
        self._db.close()

    def messages(self) -> Iterator[StoredMessage | DamagedRegion]:
        order = self._query('SELECT id, topic_id, timestamp FROM messages ORDER BY timestamp, id')
        if order is None:
            yield from self._probe_rows()
            return
        for row_id, topic_id, log_ns in order:
            topic, msgtype = self._topic_of.get(topic_id, (f'<topic id {topic_id}>', ''))
            data = self._query('SELECT data FROM messages WHERE id = ?', (row_id,))
            if not data:
                yield DamagedRegion(self.path.name, f'row {row_id}', 'the message data is unreadable (database '
                                                                     'pages damaged)', ((topic, log_ns),))
                continue
            yield StoredMessage(topic, msgtype, log_ns, bytes(data[0][0]))

    def _probe_rows(self) -> Iterator[StoredMessage | DamagedRegion]:
        """The message index itself is damaged: read row by row in id order, grouping unreadable rows."""
        span = self._query('SELECT min(id), max(id) FROM messages')
        if not span or span[0][0] is None:
            self.stopped = f'{self.path.name}: the messages table is unreadable, so no message could be read'
            yield DamagedRegion(self.path.name, 'messages table', 'unreadable (database pages damaged)')
            return
        first, last = span[0]
        bad_from = None
        for row_id in range(first, last + 2):
            row = self._query('SELECT topic_id, timestamp, data FROM messages WHERE id = ?', (row_id,)) \
                if row_id <= last else [None]
            if row is None:
                bad_from = row_id if bad_from is None else bad_from
                continue
            if bad_from is not None:
                yield DamagedRegion(self.path.name, f'rows {bad_from}..{row_id - 1}', 'unreadable (database pages '
                                                                                      'damaged)')
                bad_from = None
            if row and row[0] is not None:
                topic_id, log_ns, data = row[0]
                topic, msgtype = self._topic_of.get(topic_id, (f'<topic id {topic_id}>', ''))
                yield StoredMessage(topic, msgtype, log_ns, bytes(data))


def open_storage(path: pathlib.Path) -> StorageReader:
    """The reader for one storage file, chosen by its suffix (.mcap or .db3)."""
    if path.suffix == '.mcap':
        return McapStorage(path)
    if path.suffix == '.db3':
        return SqliteStorage(path)
    raise ValueError(f'{path.name} is neither .mcap nor .db3')
