"""vlm_node's ~/visual_tokens/image: token-selection overlays drawn on their own thread, off the decode path.

Drawing an overlay costs tens of milliseconds on a large frame (77 ms for 1920x1080 on this project's 2
shared cores), which the worker's decode steps of every other running request would otherwise wait for.
The worker hands each result's ``OverlayView`` (the frame, its header, the provenance) to an
``OverlayPublisher`` and goes on decoding; the publisher's thread draws and publishes them in order. It
holds at most ``MAX_PENDING`` results' views: when drawing falls behind, the oldest waiting result's
overlays are dropped (and counted), because a viewer wants the newest frame and memory must stay bounded.
No rclpy here: the node passes the publisher's ``publish``.
"""
from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from zip_vlm_ros.engine.overlay import draw_overlay
from zip_vlm_ros.models import TokenProvenance
from zip_vlm_ros.node.conversions import rgb_to_image

__all__ = ['MAX_PENDING', 'OverlayPublisher', 'OverlayView', 'image_set_views', 'single_image_views']

# Results whose overlays may wait to be drawn; a burst beyond this drops the oldest.
MAX_PENDING = 4


@dataclass(frozen=True)
class OverlayView:
    """One overlay to draw: the frame the tokens were computed from, its header, what each token stands for."""

    rgb: np.ndarray
    header: Any
    provenance: TokenProvenance


def single_image_views(rgb: np.ndarray, header: Any, outputs: Sequence) -> list[OverlayView]:
    """One view per engine output about one frame (an output without provenance gives none)."""
    return [OverlayView(rgb, header, output.provenance) for output in outputs if output.provenance is not None]


def image_set_views(frames: Sequence[tuple[np.ndarray, Any]], outputs: Sequence) -> list[OverlayView]:
    """Per output of a multi-image answer, one view per image: `frames` ``(rgb, header)`` in the order of
    each output's ``images``."""
    return [OverlayView(rgb, header, image.provenance) for output in outputs
            for (rgb, header), image in zip(frames, output.images) if image.provenance is not None]


class OverlayPublisher:
    """Draws and publishes submitted overlays on its own thread; ``submit`` never blocks.

    `publish` sends one ``sensor_msgs/Image``; `warn` reports a drop or a failure (the node throttles it).
    """

    def __init__(self, publish: Callable[[Any], None], warn: Callable[[str], None], max_pending: int = MAX_PENDING):
        self._publish, self._warn, self._max_pending = publish, warn, max_pending
        self._pending: collections.deque[list[OverlayView]] = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        self.dropped = 0          # overlays dropped because drawing fell behind
        self.published = 0
        self._thread = threading.Thread(target=self._run, name='vlm_overlays', daemon=True)
        self._thread.start()

    def submit(self, views: list[OverlayView]) -> None:
        """Queue one result's views; drop the oldest waiting result's when `max_pending` are waiting."""
        if not views:
            return
        with self._wake:
            if self._stopping:
                return
            dropped = 0
            while len(self._pending) >= self._max_pending:
                dropped += len(self._pending.popleft())
            self._pending.append(views)
            self.dropped += dropped
            self._wake.notify()
        if dropped:
            self._warn(f'visual_tokens: dropped {dropped} overlay(s) ({self.dropped} in all): drawing falls behind '
                       f'the results; publish_visual_tokens costs each result an overlay of its frame')

    def stop(self, timeout_s: float = 5.0) -> None:
        """Drop what waits, let the overlay being drawn finish, end the thread."""
        with self._wake:
            self._stopping = True
            self._pending.clear()
            self._wake.notify()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._pending or self._stopping)
                if self._stopping:
                    return
                views = self._pending.popleft()
            for view in views:
                try:
                    self._publish(rgb_to_image(draw_overlay(view.rgb, view.provenance), stamp=view.header.stamp,
                                               frame_id=view.header.frame_id))
                    self.published += 1
                except Exception as error:  # a bad frame must not end the thread: report and go on
                    self._warn(f'visual_tokens: an overlay failed ({type(error).__name__}: {error})')
