"""``vlm_replay --foxglove OUT.mcap``: the drive as Foxglove plays it.

Per evaluated frame: the frame itself on its bag topic, one overlay channel per (reducer, budget) point
(``<topic>/visual_tokens/<point>``, what the LLM read drawn by ``engine.overlay``), and every answer as a
``foxglove.Log`` on ``/vlm/answers`` at the frame's time. Images are ``foxglove.CompressedImage`` (PNG).
Written with the pinned ``mcap`` package in JSON, with the schemas Foxglove publishes
(github.com/foxglove/foxglove-sdk, ``schemas/jsonschema``), so Foxglove picks its image and log panels.
"""
from __future__ import annotations

import base64
import io
import json
import pathlib

import numpy as np
from PIL import Image

from zip_vlm_ros.engine.overlay import draw_overlay
from zip_vlm_ros.replay.bag import Frame

__all__ = ["ANSWERS_TOPIC", "COMPRESSED_IMAGE_SCHEMA", "FoxgloveRecording", "LOG_SCHEMA", "overlay_topic"]

ANSWERS_TOPIC = '/vlm/answers'
INFO = 2  # foxglove.LogLevel.INFO

_TIME = {'type': 'object', 'title': 'time',
         'properties': {'sec': {'type': 'integer', 'minimum': 0},
                        'nsec': {'type': 'integer', 'minimum': 0, 'maximum': 999999999}}}
COMPRESSED_IMAGE_SCHEMA = {
    'title': 'foxglove.CompressedImage', 'description': 'A compressed image', 'type': 'object',
    'properties': {
        'timestamp': {**_TIME, 'description': 'Timestamp of image'},
        'frame_id': {'type': 'string', 'description': 'Frame of reference for the image.'},
        'data': {'type': 'string', 'contentEncoding': 'base64', 'description': 'Compressed image data'},
        'format': {'type': 'string', 'description': 'Image format\n\nSupported values: `jpeg`, `png`, `webp`, `avif`'},
    },
}
LOG_SCHEMA = {
    'title': 'foxglove.Log', 'description': 'A log message', 'type': 'object',
    'properties': {
        'timestamp': {**_TIME, 'description': 'Timestamp of log message'},
        'level': {'title': 'foxglove.LogLevel', 'description': 'Log level',
                  'oneOf': [{'title': name, 'const': value} for value, name in
                            enumerate(('UNKNOWN', 'DEBUG', 'INFO', 'WARNING', 'ERROR', 'FATAL'))]},
        'message': {'type': 'string', 'description': 'Log message'},
        'name': {'type': 'string', 'description': 'Process or node name'},
        'file': {'type': 'string', 'description': 'Filename'},
        'line': {'type': 'integer', 'minimum': 0, 'description': 'Line number in the file'},
    },
}


def overlay_topic(topic: str, point: str) -> str:
    """The channel of `topic`'s overlays at evaluation point `point` ('64', 'divprune@64', 'full')."""
    return f'{topic.rstrip("/")}/visual_tokens/{point.replace("@", "_")}'


def _png(rgb: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format='PNG')
    return base64.b64encode(buffer.getvalue()).decode('ascii')


def _time(stamp_ns: int) -> dict:
    return {'sec': stamp_ns // 1_000_000_000, 'nsec': stamp_ns % 1_000_000_000}


class FoxgloveRecording:
    """An MCAP file being written; ``close`` finishes it (its summary and index)."""

    def __init__(self, path: str | pathlib.Path):
        from mcap.writer import Writer

        self.path = pathlib.Path(path)
        self._file = self.path.open('wb')
        self._writer = Writer(self._file)
        self._writer.start(profile='', library='zip_vlm_ros vlm_replay')
        self._schemas = {schema['title']: self._writer.register_schema(
            name=schema['title'], encoding='jsonschema', data=json.dumps(schema).encode())
            for schema in (COMPRESSED_IMAGE_SCHEMA, LOG_SCHEMA)}
        self._channels: dict[str, int] = {}
        self._sequence = 0

    def _write(self, topic: str, schema: str, log_ns: int, message: dict) -> None:
        if topic not in self._channels:
            self._channels[topic] = self._writer.register_channel(
                topic=topic, message_encoding='json', schema_id=self._schemas[schema])
        self._sequence += 1
        self._writer.add_message(channel_id=self._channels[topic], log_time=log_ns, publish_time=log_ns,
                                 sequence=self._sequence, data=json.dumps(message).encode())

    def _image(self, topic: str, frame: Frame, rgb: np.ndarray) -> None:
        self._write(topic, 'foxglove.CompressedImage', frame.log_ns,
                    {'timestamp': _time(frame.stamp_ns), 'frame_id': frame.topic, 'data': _png(rgb), 'format': 'png'})

    def add_frame(self, frame: Frame) -> None:
        """The frame as the camera sent it, on its own topic at the bag's time."""
        self._image(frame.topic, frame, frame.rgb)

    def add_point(self, frame: Frame, point: str, outputs: list, kinds: list[str]) -> None:
        """One (reducer, budget) point on `frame`: its overlay (when the family traces its tokens) and its
        answers (``VlmOutput``s, `kinds` 'describe' or 'question')."""
        provenance = next((output.provenance for output in outputs if output.provenance is not None), None)
        if provenance is not None:
            self._image(overlay_topic(frame.topic, point), frame, draw_overlay(frame.rgb, provenance))
        for output, kind in zip(outputs, kinds):
            text = output.text if kind == 'describe' else f'{output.prompt} -> {output.text}'
            self._write(ANSWERS_TOPIC, 'foxglove.Log', frame.log_ns, {
                'timestamp': _time(frame.stamp_ns), 'level': INFO, 'name': f'{frame.topic} {point}',
                'message': f'[{point}, {output.visual_tokens} tokens] {text}', 'file': '', 'line': 0})

    def close(self) -> None:
        try:
            self._writer.finish()
        finally:
            self._file.close()
