"""vlm_node in its own process over real DDS: surround-view and history questions.

One node for the module (namespace /car, six raw-Image cameras, tiny random checkpoint). Each test
publishes the frames it needs, stamped with this process's clock.
"""
import time

import numpy as np
import pytest
import skimage.data
from builtin_interfaces.msg import Time

from node_helpers import publish_frame, running_node, stamp_tuple
from zip_vlm_ros.client import wait_until
from zip_vlm_ros.node.conversions import rgb_to_image, stamp_to_seconds
from zip_vlm_ros.node.frame_history import history_label

NS = '/car'
CAMERAS = ['front', 'front_left', 'front_right', 'back', 'back_left', 'back_right']
FULL = 16  # visual tokens of one tiny-preset image
MAX_AGE_S = 10.0
PERIOD_S = 0.1  # the 10 Hz stream of the history test


def topic(camera):
    return f'{NS}/image_raw' if camera == CAMERAS[0] else f'{NS}/{camera}/image_raw'


@pytest.fixture(scope='module')
def client(tiny_model_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp('vlm_node_multi') / 'node.log'
    parameters = {
        'model': str(tiny_model_dir), 'cameras': CAMERAS, 'token_budget': 8, 'max_new_tokens': 4,
        'max_image_age_s': MAX_AGE_S, 'request_timeout_s': 120.0, 'frame_history_length': 64,
    }
    with running_node(parameters, log_path, namespace=NS) as (_, client):
        yield client


@pytest.fixture(scope='module')
def frames():
    names = ('astronaut', 'coffee', 'chelsea', 'rocket', 'retina', 'hubble_deep_field')
    return [rgb_to_image(np.ascontiguousarray(getattr(skimage.data, name)()[::4, ::4, :3])) for name in names]


def publish_all(client, frames, stamps=None):
    return [publish_frame(client, topic(camera), frame, stamp=None if stamps is None else stamps[index],
                          frame_id=f'{camera}_optical')
            for index, (camera, frame) in enumerate(zip(CAMERAS, frames))]


def seconds_ago(client, seconds):
    now_ns = client.now().nanoseconds - int(seconds * 1e9)
    return Time(sec=now_ns // 10**9, nanosec=now_ns % 10**9)


def test_one_stale_camera_is_refused_by_name(client, frames):
    stale = CAMERAS[3]
    stamps = [seconds_ago(client, 0.0) if camera != stale else seconds_ago(client, MAX_AGE_S + 20)
              for camera in CAMERAS]
    publish_all(client, frames, stamps)
    response = client.ask('What is around the car?', cameras=CAMERAS, token_budget=48, timeout_s=120)
    assert not response.success
    assert f"camera {stale!r}" in response.message and 'max_image_age_s' in response.message
    for camera in CAMERAS:
        if camera != stale:
            assert f"camera {camera!r}" not in response.message, response.message


def test_all_fresh_cameras_give_one_answer_listing_them(client, frames):
    stamps = publish_all(client, frames)
    response = client.ask('What is around the car?', cameras=CAMERAS, token_budget=48, timeout_s=120)
    assert response.success, response.message
    result = response.result
    assert list(result.image_cameras) == CAMERAS
    assert [stamp_tuple(stamp) for stamp in result.image_stamps] == [stamp_tuple(stamp) for stamp in stamps]
    assert list(result.image_labels) == CAMERAS
    newest = max(range(6), key=lambda index: stamp_to_seconds(stamps[index]))
    assert stamp_tuple(result.header.stamp) == stamp_tuple(stamps[newest])
    assert result.header.frame_id == f'{CAMERAS[newest]}_optical'
    assert result.camera == ','.join(CAMERAS)
    assert result.visual_tokens == result.token_budget == 48 and list(result.image_visual_tokens) == [8] * 6
    assert result.reduction == 'visionzip' and result.visual_tokens_full == 6 * FULL

    # The same frames again: the prefix is reused; ask_many answers every question over all six.
    many = client.ask_many(['Is the road clear?', 'Any people?'], cameras=CAMERAS, token_budget=48, timeout_s=120)
    assert many.success, many.message
    assert all(r.prefix_reused for r in many.results)
    assert all(list(r.image_cameras) == CAMERAS for r in many.results)
    # The Ask action takes the same fields and streams the answer over all six.
    status, action_result, _ = client.ask_streamed('What is around the car?', cameras=CAMERAS, token_budget=48,
                                                   timeout_s=120)
    assert action_result.success, action_result.message
    assert list(action_result.result.image_cameras) == CAMERAS and action_result.result.prefix_reused
    # token_budget 0: the node's token_budget (8) per image.
    default = client.ask('What is around the car?', cameras=CAMERAS[:2], timeout_s=120)
    assert default.success and default.result.visual_tokens == 16
    # A total above every image's full count reports what was used, the capped sum (msg/VlmResult.msg).
    capped = client.ask('What is around the car?', cameras=CAMERAS, token_budget=100, max_new_tokens=2,
                        timeout_s=120)
    assert capped.success, capped.message
    assert capped.result.token_budget == capped.result.visual_tokens == 6 * FULL == 96


def test_single_camera_results_list_their_one_image(client, frames):
    stamp = publish_frame(client, topic('back'), frames[0])
    response = client.ask('What is this?', 'back', timeout_s=120)
    assert response.success, response.message
    result = response.result
    assert (list(result.image_cameras), list(result.image_labels)) == (['back'], [''])
    assert [stamp_tuple(s) for s in result.image_stamps] == [stamp_tuple(stamp)]
    assert list(result.image_visual_tokens) == [result.visual_tokens] == [8]


def test_bad_several_image_requests_are_refused(client, frames):
    publish_all(client, frames)
    refusals = {
        "unknown camera(s) 'roof'": dict(cameras=['front', 'roof']),
        'at least 6': dict(cameras=CAMERAS, token_budget=5),
        'cannot be combined': dict(cameras=CAMERAS, history_frames=3, history_s=1.0),
        'history_frames 1 is out of range': dict(history_frames=1, history_s=1.0),
        'either an image': dict(cameras=CAMERAS, image=frames[0]),
    }
    for words, fields in refusals.items():
        response = client.ask('What is around the car?', **fields, timeout_s=60)
        assert not response.success and words in response.message, (words, response.message)
        assert '\n' not in response.message
    # More than the model's context holds (tiny preset: 1024): refused with the numbers.
    overflow = client.ask('What is around the car?', cameras=CAMERAS, token_budget=6 * FULL, max_new_tokens=1000,
                          timeout_s=120)
    assert not overflow.success
    assert '6 images need 96 visual tokens' in overflow.message and 'context of 1024' in overflow.message
    # One image: the same check and numbers. The node's max_new_tokens limit (context minus a full
    # image, 1008) leaves no room for the question's text tokens.
    single = client.ask('What is around the car?', 'back', max_new_tokens=1024 - FULL, timeout_s=120)
    assert not single.success
    assert single.message.startswith("1 image needs 8 visual tokens; with the prompt's "), single.message
    assert 'max_new_tokens 1008 that is' in single.message and 'context of 1024' in single.message


def test_history_of_a_10hz_stream_picks_frames_near_evenly_spaced_targets(client, frames):
    camera = 'front_left'
    publisher = client.publisher(type(frames[0]), topic(camera), reliable=True)
    assert wait_until(lambda: publisher.get_subscription_count() > 0, 30)
    time.sleep(1.0)
    # 4.5 s of a 10 Hz stream; the stamps are exactly one period apart.
    first_ns = client.now().nanoseconds
    published = []
    for index in range(45):
        msg = frames[index % len(frames)]
        stamp_ns = first_ns + index * int(PERIOD_S * 1e9)
        msg.header.stamp = Time(sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9)
        publisher.publish(msg)
        published.append(stamp_ns * 1e-9)
        time.sleep(max(0.0, stamp_ns * 1e-9 + PERIOD_S - client.now().nanoseconds * 1e-9))
    time.sleep(0.5)
    response = client.ask('What changed?', camera, history_frames=4, history_s=3.0, token_budget=32, timeout_s=120)
    assert response.success, response.message
    result = response.result
    chosen = [stamp_to_seconds(stamp) for stamp in result.image_stamps]
    newest = chosen[-1]
    assert newest == pytest.approx(published[-1], abs=PERIOD_S + 1e-6)
    targets = [newest - 3.0 + index * 1.0 for index in range(4)]
    for stamp_s, target_s in zip(chosen, targets):
        assert abs(stamp_s - target_s) <= PERIOD_S + 1e-6, (chosen, targets)
    assert all(stamp_s in [pytest.approx(p, abs=1e-6) for p in published] for stamp_s in chosen)
    assert list(result.image_cameras) == [camera] * 4 and result.camera == camera
    # Each frame is introduced by its age relative to the newest ('front_left 3.0 s ago' ... 'front_left now').
    assert list(result.image_labels) == [history_label(camera, newest - stamp_s) for stamp_s in chosen]
    assert result.image_labels[-1] == f'{camera} now'
    assert list(result.image_visual_tokens) == [8] * 4
    assert stamp_tuple(result.header.stamp) == stamp_tuple(result.image_stamps[-1])

    # More history than the buffer holds is refused, naming the camera.
    too_long = client.ask('What changed?', camera, history_frames=4, history_s=3600.0, timeout_s=60)
    assert not too_long.success and f"camera {camera!r}" in too_long.message
    assert 'frame_history_length' in too_long.message
