"""vlm_node in its own process, driven over real DDS: services, topics, parameters, bad input.

One node for the module (namespace /robot, cameras front = raw Image, rear = CompressedImage,
side = never publishes), tiny random checkpoint. Tests run in file order and each publishes the
frames it needs, so none depends on an earlier one's frame.
"""
import threading
import time

import numpy as np
import psutil
import pytest
import skimage.data
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Image
from std_msgs.msg import String

from node_helpers import publish_frame, running_node, stamp_tuple
from zip_vlm_ros.client import ImageStreamer, wait_until
from zip_vlm_ros.node.conversions import rgb_to_compressed, rgb_to_image
from zip_vlm_ros.engine import DEFAULT_DESCRIBE_PROMPT
from zip_vlm_ros.msg import VlmResult

NS = '/robot'
FRONT, REAR, SIDE = f'{NS}/image_raw', f'{NS}/rear/image_raw', f'{NS}/side/image_raw'
BUDGET, FULL = 8, 16  # the tiny preset has 4x4 patches = 16 visual tokens
CONTEXT = 1024  # the tiny preset's max_position_embeddings
CLOCK_SKEW_S = 5.0
QUESTION_MAX_CHARS = 100
DESCRIBE_PROMPT = DEFAULT_DESCRIBE_PROMPT  # the node's default describe_prompt


@pytest.fixture(scope='module')
def node(tiny_model_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp('vlm_node') / 'node.log'
    parameters = {
        'model': str(tiny_model_dir), 'cameras': ['front', 'rear', 'side'],
        'camera.rear.type': 'sensor_msgs/CompressedImage',
        'token_budget': BUDGET, 'max_new_tokens': 4, 'max_image_age_s': 10.0,
        'max_pending_requests': 1, 'max_batch_size': 1, 'request_timeout_s': 120.0,
        'question_max_chars': QUESTION_MAX_CHARS, 'max_clock_skew_s': CLOCK_SKEW_S,
    }
    with running_node(parameters, log_path, namespace=NS) as (process, client):
        yield process, client


@pytest.fixture(scope='module')
def client(node):
    return node[1]


@pytest.fixture(scope='module')
def topics(client):
    """Everything the node publishes, collected from the start of the module."""
    return {
        'results': client.collect(VlmResult, f'{NS}/zip_vlm/results', depth=100),
        'description': client.collect(String, f'{NS}/zip_vlm/description', depth=100),
        'answer': client.collect(String, f'{NS}/zip_vlm/answer', depth=100),
        'diagnostics': client.collect(DiagnosticArray, '/diagnostics', depth=100),
    }


@pytest.fixture(scope='module')
def images():
    return {name: getattr(skimage.data, name)() for name in ('astronaut', 'coffee', 'chelsea', 'rocket')}


def assert_refused(response, *words):
    assert not response.success, 'expected a refusal'
    assert '\n' not in response.message
    for word in words:
        assert word in response.message, f'{word!r} not in {response.message!r}'


def test_describe_fills_every_field_and_publishes(client, topics, images):
    wait_until(lambda: False, 0.5)  # let the topic subscriptions match before anything is published
    stamp = publish_frame(client, FRONT, rgb_to_image(images['astronaut']), frame_id='front_optical')
    response = client.describe()
    assert response.success, response.message
    result = response.result
    assert stamp_tuple(result.header.stamp) == stamp_tuple(stamp)
    assert result.header.frame_id == 'front_optical'
    assert (result.camera, result.prompt, result.reduction) == ('front', DESCRIBE_PROMPT, 'visionzip')
    assert (result.token_budget, result.visual_tokens, result.visual_tokens_full) == (BUDGET, BUDGET, FULL)
    assert result.model.endswith('tiny') and 1 <= result.generated_tokens <= 4
    assert result.vision_ms > 0 and result.prefill_ms > 0 and result.total_ms >= result.prefill_ms
    assert 0 < result.image_age_ms < 10_000
    assert wait_until(lambda: any(r.header.stamp == result.header.stamp for r in topics['results']), 10)
    published = [r for r in topics['results'] if r.header.stamp == result.header.stamp][-1]
    assert (published.text, published.header.frame_id, published.camera) == (
        result.text, 'front_optical', 'front')
    assert wait_until(lambda: result.text in [m.data for m in topics['description']], 10)


def test_prefix_is_reused_only_while_the_frame_is_current(client, images):
    publish_frame(client, FRONT, rgb_to_image(images['coffee']))
    first = client.describe()
    again = client.ask('Is there a cup?')
    assert first.success and again.success, (first.message, again.message)
    assert stamp_tuple(first.result.header.stamp) == stamp_tuple(again.result.header.stamp)
    assert not first.result.prefix_reused
    assert again.result.prefix_reused
    publish_frame(client, FRONT, rgb_to_image(images['chelsea']))
    new_frame = client.ask('Is there a cup?')
    assert new_frame.success and not new_frame.result.prefix_reused
    assert client.ask('Is there a cat?').result.prefix_reused


def test_ask_compressed_camera_publishes_answer(client, topics, images):
    stamp = publish_frame(client, REAR, rgb_to_compressed(images['rocket']), frame_id='rear_optical')
    response = client.ask('Is the door open?', camera='rear')
    assert response.success, response.message
    assert response.result.camera == 'rear' and response.result.prompt == 'Is the door open?'
    assert stamp_tuple(response.result.header.stamp) == stamp_tuple(stamp)
    assert response.result.header.frame_id == 'rear_optical'
    assert wait_until(lambda: response.result.text in [m.data for m in topics['answer']], 10)


def test_ask_inline_image_is_never_cached(client, images):
    inline = rgb_to_image(images['chelsea'], stamp=Time(sec=1234, nanosec=5), frame_id='hand_camera')
    answers = [client.ask('What animal is this?', camera='no_such_camera_ignored', image=inline)
               for _ in range(2)]
    for response in answers:
        assert response.success, response.message
        assert response.result.camera == 'inline'
        assert stamp_tuple(response.result.header.stamp) == (1234, 5)
        assert response.result.header.frame_id == 'hand_camera'
        assert not response.result.prefix_reused


def test_ask_many_answers_in_order_from_one_prefix(client, topics, images):
    publish_frame(client, FRONT, rgb_to_image(images['rocket']))
    questions = ['Is it day?', 'What is in the sky?', 'Is anyone there?']
    answers_before = len(topics['answer'])
    response = client.ask_many(questions)
    assert response.success, response.message
    assert [r.prompt for r in response.results] == questions
    assert len({stamp_tuple(r.header.stamp) for r in response.results}) == 1
    assert all(r.prefix_reused for r in response.results[1:])
    assert wait_until(lambda: len(topics['answer']) >= answers_before + 3, 10)


def test_runtime_token_budget_change(client, images):
    publish_frame(client, FRONT, rgb_to_image(images['astronaut']))
    assert client.set_parameter('token_budget', 4) == (True, '')
    assert client.describe().result.visual_tokens == 4
    full = client.describe(token_budget=FULL).result
    assert (full.reduction, full.visual_tokens, full.token_budget) == ('none', FULL, FULL)
    for bad in (-1, 0, FULL + 1):
        successful, reason = client.set_parameter('token_budget', bad)
        assert not successful and 'out of range' in reason and f'1..{FULL}' in reason, reason
    assert client.get_parameter('token_budget') == 4
    successful, reason = client.set_parameter('max_new_tokens', 0)
    assert not successful and 'max_new_tokens' in reason
    assert client.set_parameter('token_budget', BUDGET) == (True, '')
    assert client.describe().result.visual_tokens == BUDGET


def test_read_only_parameters_are_rejected_with_a_reason(client):
    for name, value in (('max_pending_requests', 9), ('cameras', ['x'])):
        successful, reason = client.set_parameter(name, value)
        assert not successful and 'read-only at runtime' in reason and 'restart' in reason, reason
    assert client.get_parameter('max_pending_requests') == 1
    # the engine's parameters change while unconfigured (test_node_lifecycle), not while loaded
    successful, reason = client.set_parameter('model', '/elsewhere')
    assert not successful and 'read-only while the node is configured' in reason and 'cleanup' in reason


def test_parameter_limits_wrong_types_and_unknown_names_in_words(client):
    limit = CONTEXT - FULL  # the tiny preset's context minus one image at full budget
    successful, reason = client.set_parameter('max_new_tokens', 10**9)
    assert not successful and f'use 1..{limit}' in reason and 'context' in reason, reason
    assert client.set_parameter('max_new_tokens', limit) == (True, '')
    assert client.set_parameter('max_new_tokens', 4) == (True, '')
    successful, reason = client.set_parameter('describe_prompt', 'd' * (QUESTION_MAX_CHARS + 1))
    assert not successful and f'question_max_chars = {QUESTION_MAX_CHARS}' in reason, reason
    assert client.get_parameter('describe_prompt') == DESCRIBE_PROMPT
    successful, reason = client.set_parameter('max_new_tokens', 'many')
    assert not successful and reason == "max_new_tokens must be a whole number (e.g. 64); got 'many' (str)"
    successful, reason = client.set_parameter('token_budgett', 8)
    assert not successful and "'token_budgett' is not a parameter of this node" in reason
    assert 'token_budget' in reason.split('known parameters are ')[1]
    # a request asking for more than the context holds is refused with the range
    assert_refused(client.ask('Is it day?', image=rgb_to_image(skimage.data.coffee()), max_new_tokens=10**9),
                   f'max_new_tokens {10**9} is out of range', f'1..{limit}')


def test_no_frame_yet_and_unknown_camera(client):
    assert_refused(client.describe('side'), "no frame received yet from camera 'side'", SIDE)
    assert_refused(client.ask('Is it open?', camera='garage'), "unknown camera 'garage'",
                   'front, rear, side')


def test_stale_frame_refused_then_fresh_frame_served(client, images):
    old = client.now().to_msg()
    old.sec -= 60
    publish_frame(client, FRONT, rgb_to_image(images['coffee']), stamp=old)
    assert_refused(client.describe(), "camera 'front'", 's old', 'max_image_age_s = 10')
    assert client.describe().success is False  # still the same stale frame
    publish_frame(client, FRONT, rgb_to_image(images['coffee']))
    assert client.describe().success


def test_future_stamped_and_unstamped_frames(client, images):
    """A stamp an hour ahead is refused naming the skew; within max_clock_skew_s the age reads 0,
    never negative; a zero stamp is "no timestamp", not an age since 1970."""
    ahead = client.now().to_msg()
    ahead.sec += 3600
    publish_frame(client, FRONT, rgb_to_image(images['coffee']), stamp=ahead)
    assert_refused(client.describe(), "camera 'front'", 'in the future', f'max_clock_skew_s = {CLOCK_SKEW_S:g}')
    slightly = client.now().to_msg()
    slightly.sec += 3  # publish_frame waits 0.5 s: still about 2.5 s ahead, within 5 s
    publish_frame(client, FRONT, rgb_to_image(images['coffee']), stamp=slightly)
    response = client.describe()
    assert response.success, response.message
    assert response.result.image_age_ms == 0.0
    publish_frame(client, FRONT, rgb_to_image(images['coffee']), stamp=Time(sec=0, nanosec=0))
    assert_refused(client.describe(), 'no timestamp', 'header.stamp is 0')
    publish_frame(client, FRONT, rgb_to_image(images['coffee']))
    assert client.describe().success


def malformed_images():
    good = rgb_to_image(skimage.data.astronaut()[:64, :64])
    short = rgb_to_image(skimage.data.astronaut()[:64, :64])
    short.data = bytes(short.data)[:1000]
    narrow = rgb_to_image(skimage.data.astronaut()[:64, :64])
    narrow.step = 64
    narrow.data = bytes(narrow.data)[:64 * 64]
    empty = Image(encoding='rgb8')
    empty.data = b'\x00'
    exotic = rgb_to_image(skimage.data.astronaut()[:64, :64])
    exotic.encoding = '32FC1'
    assert good.step == 192
    return {
        'short data': (short, ['1000 bytes', 'step*height']),
        'step too small': (narrow, ['step is 64', 'needs 192']),
        'zero size': (empty, ['zero size']),
        'unsupported encoding': (exotic, ["'32FC1' is not supported"]),
    }


@pytest.mark.parametrize('case', list(malformed_images()))
def test_malformed_camera_frame_is_refused_then_good_frame_works(client, images, case):
    msg, words = malformed_images()[case]
    publish_frame(client, FRONT, msg)
    assert_refused(client.describe(), "camera 'front' sent a bad frame", *words)
    publish_frame(client, FRONT, rgb_to_image(images['astronaut']))
    assert client.describe().success


def test_corrupt_compressed_frame_is_refused_then_good_frame_works(client, images):
    corrupt = rgb_to_compressed(images['rocket'])
    corrupt.data = bytes(corrupt.data)[:2000]
    publish_frame(client, REAR, corrupt)
    assert_refused(client.ask('What is this?', camera='rear'), "camera 'rear' sent a bad frame",
                   'cannot be decoded', 'corrupt or truncated')
    publish_frame(client, REAR, rgb_to_compressed(images['rocket']))
    assert client.ask('What is this?', camera='rear').success


def test_bad_questions_and_limits(client, images):
    publish_frame(client, FRONT, rgb_to_image(images['astronaut']))
    assert_refused(client.ask(''), 'question is empty')
    assert_refused(client.ask(' \t\n '), 'question is empty')
    assert_refused(client.ask('x' * (QUESTION_MAX_CHARS + 1)),
                   f'{QUESTION_MAX_CHARS + 1} characters', f'question_max_chars = {QUESTION_MAX_CHARS}')
    assert_refused(client.ask_many([]), 'questions is empty')
    assert_refused(client.ask_many(['Is it day?', '  ']), 'questions[1]', 'question is empty')
    assert_refused(client.describe(prompt='y' * 200), 'prompt is 200 characters')
    for budget in (-1, FULL + 1):
        assert_refused(client.ask('Is it day?', token_budget=budget), f'token_budget {budget}',
                       f'1..{FULL}', '0 = node default')
    assert_refused(client.describe(max_new_tokens=-3), 'max_new_tokens -3', '0 = node default')
    assert client.ask('Is it day?').success


def test_malformed_inline_image_is_refused(client):
    inline = rgb_to_image(skimage.data.coffee())
    inline.height += 1
    assert_refused(client.ask('What is this?', image=inline), "request's image is malformed",
                   'step*height')
    assert client.ask('What is this?', image=rgb_to_image(skimage.data.coffee())).success


def test_bad_input_warnings_are_rate_limited(node, client):
    """20 identical bad requests in a burst log at most one warning; the next one, after the
    throttle period, says how many were held back."""
    from zip_vlm_ros.node.jobs import WARN_THROTTLE_S
    process = node[0]
    marker = f'{QUESTION_MAX_CHARS + 7} characters'
    for _ in range(20):
        assert_refused(client.ask('z' * (QUESTION_MAX_CHARS + 7)), marker)
    time.sleep(0.5)
    burst = process.log().count(marker)
    assert burst <= 1, f'{burst} warnings for 20 identical bad requests'
    time.sleep(WARN_THROTTLE_S)
    assert_refused(client.ask('z' * (QUESTION_MAX_CHARS + 7)), marker)
    time.sleep(0.5)
    lines = [line for line in process.log().splitlines() if marker in line]
    assert len(lines) == burst + 1
    assert f'({20 - burst} more like this' in lines[-1], lines[-1]


def test_best_effort_and_reliable_publishers_both_reach_the_node(client, images):
    for reliable in (False, True):
        stamp = publish_frame(client, FRONT, rgb_to_image(images['chelsea']), reliable=reliable)
        response = client.describe()
        assert response.success, response.message
        assert stamp_tuple(response.result.header.stamp) == stamp_tuple(stamp), f'reliable={reliable}'


def test_queue_overflow_is_refused_at_once(client):
    """max_pending_requests = 1: one runs, one waits, the rest are refused immediately.

    Inline images (no frame age to expire while waiting) and a photo/prompt for which the tiny
    checkpoint does not stop early, so the first answer takes a while even on a fast CPU."""
    coffee = rgb_to_image(skimage.data.coffee())
    outcomes = [None] * 4

    def call(index):
        started = time.monotonic()
        response = client.ask('Tell me everything.', image=coffee, max_new_tokens=600, timeout_s=300)
        outcomes[index] = (response, time.monotonic() - started)

    threads = [threading.Thread(target=call, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    served = [(r, t) for r, t in outcomes if r.success]
    refused = [(r, t) for r, t in outcomes if not r.success]
    assert len(served) == 2 and len(refused) == 2, [r.message for r, _ in outcomes]
    slowest_served = max(t for _, t in served)
    for response, seconds in refused:
        assert_refused(response, 'busy', 'max_pending_requests = 1')
        assert seconds < slowest_served / 2, 'a refusal must not wait for the queue'
    assert client.ask('Still there?', image=coffee).success


def test_periodic_description_changes_at_runtime(client, topics, images):
    successful, reason = client.set_parameter('describe_period_s', -1.0)
    assert not successful and 'describe_period_s' in reason
    streamer = ImageStreamer(client, FRONT, [rgb_to_image(images[name]) for name in images], rate_hz=5)
    try:
        before = len(topics['description'])
        assert client.set_parameter('describe_prompt', 'What do you see?') == (True, '')
        assert client.set_parameter('describe_period_s', 0.5) == (True, '')
        assert wait_until(lambda: len(topics['description']) >= before + 3, 30)
        periodic = [r for r in topics['results'] if r.prompt == 'What do you see?']
        assert periodic and all(r.camera in ('front', 'rear') for r in periodic)
        assert client.set_parameter('describe_period_s', 0.0) == (True, '')
        time.sleep(1.5)  # a description already queued may still arrive
        settled = len(topics['description'])
        time.sleep(2.0)
        assert len(topics['description']) == settled
    finally:
        streamer.stop()
        client.set_parameter('describe_period_s', 0.0)
        client.set_parameter('describe_prompt', DESCRIBE_PROMPT)


def test_use_sim_time_image_age_follows_the_node_clock(client, images):
    clock_publisher = client.publisher(Clock, '/clock', reliable=True, depth=10)
    sim_now = Time(sec=1000, nanosec=0)
    try:
        assert client.set_parameter('use_sim_time', True) == (True, '')
        assert wait_until(lambda: clock_publisher.get_subscription_count() > 0, 30)
        for _ in range(3):
            clock_publisher.publish(Clock(clock=sim_now))
            time.sleep(0.1)
        publish_frame(client, FRONT, rgb_to_image(images['coffee']), stamp=Time(sec=999, nanosec=750_000_000))
        response = client.describe()
        assert response.success, response.message
        assert response.result.image_age_ms == pytest.approx(250.0, abs=0.5)
        publish_frame(client, FRONT, rgb_to_image(images['coffee']), stamp=Time(sec=980, nanosec=0))
        assert_refused(client.describe(), '20.00 s old')
    finally:
        client.set_parameter('use_sim_time', False)
    publish_frame(client, FRONT, rgb_to_image(images['coffee']))
    assert client.describe().success


def diagnostics_of(array_messages, name='zip_vlm: vlm'):
    statuses = [status for array in array_messages for status in array.status if status.name == name]
    return statuses[-1] if statuses else None


def test_diagnostics_report_model_latency_queue_cameras(client, topics):
    assert wait_until(lambda: diagnostics_of(topics['diagnostics'][-3:]) is not None, 10)
    status = diagnostics_of(topics['diagnostics'])
    values = {kv.key: kv.value for kv in status.values}
    assert values['model'].endswith('tiny') and values['device'] == 'cpu'
    assert values['lifecycle_state'] == 'active'
    assert float(values['latency_p50_ms']) > 0 and float(values['latency_p95_ms']) >= float(
        values['latency_p50_ms'])
    assert values['queue_depth'] == '0'
    assert int(values['camera.front.frames_received']) >= 10
    assert int(values['camera.front.frames_superseded']) >= 1
    assert values['camera.side.frames_received'] == '0'
    assert int(values['requests_refused']) >= 2 and int(values['requests_ok']) >= 10
    assert values['last_error']
    # side never published: that is worth a warning, not an error
    assert status.level == DiagnosticStatus.WARN and 'side' in status.message


def test_30hz_720p_stream_keeps_services_up_and_memory_bounded(node, client):
    """20 s of 1280x720 raw frames at 30 Hz while requests keep coming: the node keeps answering
    and its memory does not grow with the frames it has seen."""
    process = psutil.Process(node[0].pid)
    frames = [rgb_to_image(np.ascontiguousarray(np.resize(skimage.data.astronaut(), (720, 1280, 3))))
              for _ in range(2)]
    streamer = ImageStreamer(client, FRONT, frames, rate_hz=30)
    try:
        time.sleep(3.0)
        rss_start = process.memory_info().rss
        answers, started = [], time.monotonic()
        while time.monotonic() - started < 20.0:
            answers.append(client.describe(timeout_s=60))
        rss_end = process.memory_info().rss
    finally:
        streamer.stop()
    failures = [r.message for r in answers if not r.success]
    assert not failures and len(answers) >= 5, failures[:3]
    assert max(r.result.image_age_ms for r in answers) < 10_000
    growth_mb = (rss_end - rss_start) / 2**20
    assert growth_mb < 150, f'RSS grew {growth_mb:.0f} MB over 20 s of frames'
