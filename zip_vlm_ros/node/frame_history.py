"""A camera's recent frames and the choice of frames for a history question; no rclpy, no decoding.

The image callback appends a reference to the received message (O(1): no copy, no decoding); the
oldest frames are dropped when the buffer holds more than `max_frames` frames or `max_bytes` bytes of
image data. A history question of N frames over the last S seconds picks, for each of N evenly spaced
target times from the newest frame's stamp back to S seconds before it, the buffered frame whose stamp
is nearest.
"""
from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from typing import Any, Sequence

__all__ = ['FrameHistory', 'HistoryPick', 'HistoryUnavailable', 'history_label', 'history_targets',
           'message_nbytes', 'pick_history']


def message_nbytes(msg: Any) -> int:
    """Bytes of a sensor_msgs Image/CompressedImage's data (what the byte limit counts); O(1)."""
    return len(msg.data)


class FrameHistory:
    """The newest frames of one camera, oldest first, bounded by count and by bytes of image data.

    `append` runs in the image callback: it stores a reference and drops the oldest entries beyond
    the bounds (the newest frame is always kept, even when it alone exceeds `max_bytes`).
    """

    def __init__(self, max_frames: int, max_bytes: int):
        if max_frames < 1 or max_bytes < 0:
            raise ValueError(f'a frame history needs max_frames >= 1 and max_bytes >= 0; '
                             f'got {max_frames} and {max_bytes}')
        self.max_frames, self.max_bytes = max_frames, max_bytes
        self._frames: collections.deque[tuple[Any, int]] = collections.deque()  # (frame, nbytes)
        self._lock = threading.Lock()
        self.nbytes = 0

    def append(self, frame: Any, nbytes: int) -> None:
        with self._lock:
            self._frames.append((frame, nbytes))
            self.nbytes += nbytes
            while len(self._frames) > 1 and (len(self._frames) > self.max_frames or self.nbytes > self.max_bytes):
                self.nbytes -= self._frames.popleft()[1]

    def frames(self) -> list[Any]:
        """A snapshot of the buffered frames, oldest first."""
        with self._lock:
            return [frame for frame, _ in self._frames]

    def __len__(self) -> int:
        return len(self._frames)


class HistoryUnavailable(ValueError):
    """The buffer cannot serve the history asked for; str(e) says why and what to change."""


@dataclass(frozen=True)
class HistoryPick:
    frame: Any
    stamp_s: float
    target_s: float


def history_targets(newest_s: float, count: int, span_s: float) -> list[float]:
    """`count` >= 2 evenly spaced times from ``newest_s - span_s`` to `newest_s`, oldest first."""
    step = span_s / (count - 1)
    return [newest_s - span_s + index * step for index in range(count)]


def pick_history(frames: Sequence[Any], stamps_s: Sequence[float], count: int, span_s: float) -> list[HistoryPick]:
    """For each target time (``history_targets`` from the newest stamp) the frame with the nearest stamp.

    frames/stamps_s: the buffer, oldest first, and each frame's stamp in seconds. Raises
    HistoryUnavailable when a target's nearest frame is more than half the target spacing away (the
    buffer does not reach that far back, or the camera paused) or two targets pick one frame.
    """
    if not frames:
        raise HistoryUnavailable('no frame buffered')
    newest_s = max(stamps_s)
    spacing_s = span_s / (count - 1)
    picks: list[HistoryPick] = []
    for target_s in history_targets(newest_s, count, span_s):
        index = min(range(len(frames)), key=lambda i: abs(stamps_s[i] - target_s))
        picks.append(HistoryPick(frames[index], stamps_s[index], target_s))
    oldest_s = min(stamps_s)
    for pick in picks:
        if abs(pick.stamp_s - pick.target_s) > spacing_s / 2:
            raise HistoryUnavailable(
                f'no buffered frame within {spacing_s / 2:.2f} s of {newest_s - pick.target_s:.2f} s before the '
                f'newest: the buffer holds {len(frames)} frame(s) over {newest_s - oldest_s:.2f} s')
    if len({id(pick.frame) for pick in picks}) != len(picks):
        raise HistoryUnavailable(f'{len(frames)} buffered frame(s) cannot give {count} distinct frames '
                                 f'{spacing_s:.2f} s apart')
    return picks


def history_label(camera: str, age_s: float) -> str:
    """How the prompt introduces a history frame: ``"front 3.0 s ago"`` (``"front now"`` for the newest)."""
    return f'{camera} now' if round(age_s, 1) == 0 else f'{camera} {age_s:.1f} s ago'
