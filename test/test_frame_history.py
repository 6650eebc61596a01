"""The per-camera ring buffer and the choice of history frames (zip_vlm_ros.node.frame_history), and the
request checks of zip_vlm_ros.node.image_sets, without a node."""
import types

import pytest
from sensor_msgs.msg import Image

from zip_vlm_ros.node.frame_history import (FrameHistory, HistoryUnavailable, history_label, history_targets,
                                       pick_history)
from zip_vlm_ros.node.image_sets import image_set_request, resolve_total_budget
from zip_vlm_ros.node.jobs import CameraFeed, RequestRejected


def test_ring_buffer_keeps_the_newest_frames_within_count_and_bytes():
    history = FrameHistory(max_frames=3, max_bytes=1000)
    for index in range(5):
        history.append(index, 100)
    assert history.frames() == [2, 3, 4] and history.nbytes == 300
    history.append(5, 850)  # four frames > 3: 2 goes; 3, 4, 5 hold 1050 > 1000 bytes: 3 goes too
    assert history.frames() == [4, 5] and history.nbytes == 950
    history.append(6, 5000)  # alone over the limit: the newest frame is always kept
    assert history.frames() == [6] and history.nbytes == 5000


def test_camera_feed_appends_each_message_to_its_history():
    feed = CameraFeed('front', 'image_raw', 'sensor_msgs/Image', history_frames=4, history_bytes=10_000)
    for value in range(6):
        feed.store(Image(height=1, width=1, encoding='rgb8', step=3, data=bytes([value] * 3)))
    frames = feed.history.frames()
    assert [frame.seq for frame in frames] == [3, 4, 5, 6]
    assert frames[-1] is feed.peek() and feed.history.nbytes == 12


def test_targets_are_evenly_spaced_back_from_the_newest():
    assert history_targets(10.0, 4, 3.0) == [7.0, 8.0, 9.0, 10.0]
    assert history_targets(5.0, 2, 1.0) == [4.0, 5.0]


def test_picks_are_the_frames_nearest_to_the_targets():
    stamps = [10.0 + 0.1 * index for index in range(41)]  # a 10 Hz stream over 4 s: 10.0 .. 14.0
    frames = [f'frame{index}' for index in range(41)]
    picks = pick_history(frames, stamps, 4, 3.0)
    assert [pick.frame for pick in picks] == ['frame10', 'frame20', 'frame30', 'frame40']
    assert [pick.target_s for pick in picks] == pytest.approx([11.0, 12.0, 13.0, 14.0])
    # Frames missing around a target: the nearest one is taken.
    kept = [index for index in range(41) if index not in (19, 20, 21)]
    picks = pick_history([frames[i] for i in kept], [stamps[i] for i in kept], 4, 3.0)
    assert picks[1].frame in ('frame18', 'frame22')


def test_a_buffer_too_short_or_too_sparse_is_refused():
    stamps = [13.0 + 0.1 * index for index in range(11)]  # only 1 s buffered
    with pytest.raises(HistoryUnavailable, match='11 frame'):
        pick_history(list(range(11)), stamps, 4, 3.0)
    with pytest.raises(HistoryUnavailable):
        pick_history(['a', 'b'], [0.0, 3.0], 4, 3.0)  # two frames cannot fill four slots


def test_labels_say_how_long_ago():
    assert history_label('front', 3.0) == 'front 3.0 s ago'
    assert history_label('front', 0.96) == 'front 1.0 s ago'
    assert history_label('front', 0.01) == 'front now'


def request(**fields):
    values = dict(cameras=[], history_frames=0, history_s=0.0, camera='')
    values.update(fields)
    return types.SimpleNamespace(**values)


@pytest.fixture()
def feeds():
    feeds = {name: CameraFeed(name, f'{name}/image_raw', 'sensor_msgs/Image') for name in ('front', 'rear', 'side')}
    for name in ('front', 'rear'):
        feeds[name].store(Image())
    return feeds


def check(req, feeds, *, has_inline=False):
    return image_set_request(req, feeds=feeds, default_camera='front', has_inline=has_inline, history_limit=64,
                             no_frame_message=lambda feed: f'no frame received yet from camera {feed.name!r}')


def test_requests_over_several_images_are_checked(feeds):
    assert check(request(), feeds) is None
    assert check(request(cameras=['rear', 'front']), feeds).cameras == ('rear', 'front')
    spec = check(request(history_frames=4, history_s=3.0), feeds)
    assert (spec.cameras, spec.count, spec.camera_field) == (('front',), 4, 'front')
    refusals = {
        'side': request(cameras=['front', 'side']),
        'unknown camera': request(cameras=['front', 'roof']),
        'twice': request(cameras=['front', 'front']),
        'cannot be combined': request(cameras=['front'], history_frames=4, history_s=3.0),
        'history_frames 1': request(history_frames=1, history_s=3.0),
        'history_frames 65': request(history_frames=65, history_s=3.0),
        'history_s': request(history_frames=4, history_s=0.0),
        'history_frames is 0': request(history_s=2.0),
    }
    for words, req in refusals.items():
        with pytest.raises(RequestRejected, match=words):
            check(req, feeds)
    with pytest.raises(RequestRejected, match='either an image'):
        check(request(cameras=['front']), feeds, has_inline=True)


def test_total_budget_of_several_images():
    assert resolve_total_budget(0, 6, 64) == 384
    assert resolve_total_budget(10, 6, 64) == 10
    with pytest.raises(RequestRejected, match='at least 6'):
        resolve_total_budget(5, 6, 64)
