"""The node's overlay thread without ROS: overlays drawn and published in order off the caller's thread, the
oldest waiting result dropped (and reported) when drawing falls behind, a bad view reported without ending it."""
import threading

import numpy as np
import pytest
from std_msgs.msg import Header

from zip_vlm_ros.engine.overlay import draw_overlay
from zip_vlm_ros.models import CropBox, TokenProvenance
from zip_vlm_ros.node.conversions import image_to_rgb
from zip_vlm_ros.node.overlays import MAX_PENDING, OverlayPublisher, OverlayView

FRAME = np.random.default_rng(5).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
PROVENANCE = TokenProvenance([CropBox(0.0, 0.0, 8.0, 8.0, 2)], np.array([[[0, -1], [1, 1]]], np.int32),
                             np.array([1, 2], np.int32))


def _view(frame_id: str) -> OverlayView:
    return OverlayView(FRAME, Header(frame_id=frame_id), PROVENANCE)


class _HeldPublish:
    """A publish that holds the overlay thread inside its first call until released."""

    def __init__(self):
        self.messages, self.entered, self.release = [], threading.Event(), threading.Event()
        self.done = threading.Condition()

    def __call__(self, message):
        self.entered.set()
        self.release.wait(30)
        with self.done:
            self.messages.append(message)
            self.done.notify_all()

    def wait_for(self, count: int) -> bool:
        with self.done:
            return self.done.wait_for(lambda: len(self.messages) >= count, 30)


@pytest.fixture
def held():
    publish, warnings = _HeldPublish(), []
    overlays = OverlayPublisher(publish, warnings.append)
    yield overlays, publish, warnings
    publish.release.set()
    overlays.stop()


def test_overlays_are_drawn_in_order_with_their_headers(held):
    overlays, publish, warnings = held
    overlays.submit([_view('a'), _view('b')])
    overlays.submit([])  # a result without provenance: nothing to draw
    overlays.submit([_view('c')])
    publish.release.set()
    assert publish.wait_for(3)
    assert [message.header.frame_id for message in publish.messages] == ['a', 'b', 'c']
    assert np.array_equal(image_to_rgb(publish.messages[0]), draw_overlay(FRAME, PROVENANCE))
    assert overlays.dropped == 0 and warnings == []


def test_a_burst_beyond_max_pending_drops_the_oldest_waiting_results(held):
    overlays, publish, warnings = held
    overlays.submit([_view('drawing')])
    assert publish.entered.wait(30)  # the thread holds the first result: nothing else is taken meanwhile
    for index in range(MAX_PENDING + 2):
        overlays.submit([_view(f'r{index}'), _view(f'r{index}+')])
    assert overlays.dropped == 4 and len(warnings) == 2 and 'dropped 2 overlay(s)' in warnings[0]
    publish.release.set()
    assert publish.wait_for(1 + 2 * MAX_PENDING)
    kept = [f'r{index}' for index in range(2, MAX_PENDING + 2)]
    assert [message.header.frame_id for message in publish.messages] == ['drawing'] + [
        name + suffix for name in kept for suffix in ('', '+')]


def test_a_view_that_cannot_be_drawn_is_reported_and_the_thread_goes_on(held):
    overlays, publish, warnings = held
    publish.release.set()
    overlays.submit([OverlayView(FRAME[..., 0], Header(frame_id='bad'), PROVENANCE)])  # not HxWx3
    overlays.submit([_view('good')])
    assert publish.wait_for(1)
    assert [message.header.frame_id for message in publish.messages] == ['good']
    assert len(warnings) == 1 and 'HxWx3 uint8' in warnings[0]


def test_stop_ends_the_thread_and_later_submits_are_ignored(held):
    overlays, publish, _ = held
    publish.release.set()
    overlays.stop()
    overlays.submit([_view('late')])
    assert publish.messages == [] and overlays.published == 0
