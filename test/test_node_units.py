"""The node's pure pieces in-process: parameter checks, the request queue and job deadlines, frame
bookkeeping, throttled warnings; and the worker surviving a CUDA out-of-memory error (the one fault
that cannot be caused for real here, so the engine is replaced for that test only)."""
import time

import numpy as np
import pytest
import rclpy
import skimage.data
import torch
from rclpy.context import Context
from std_msgs.msg import Header

from zip_vlm_ros.node import (
    CameraFeed, InlineImage, Job, RequestQueue, RequestRejected, ThrottledWarnings, VlmNode,
    parameter_problem)


@pytest.mark.parametrize('name, value, full, words', [
    ('token_budget', 0, None, ['out of range', 'at least 1']),
    ('token_budget', 17, 16, ['1..16']),
    ('max_new_tokens', 0, None, ['at least 1']),
    ('describe_period_s', -0.5, None, ['0 (off)']),
    ('describe_period_s', float('nan'), None, ['invalid']),
    ('describe_prompt', '  ', None, ['empty']),
    ('dominant_ratio', 0.0, None, ['0 < dominant_ratio <= 1']),
    ('image_qos', 'best_effort', None, ['sensor_data or reliable']),
    ('max_pending_requests', -1, None, ['negative']),
    ('request_timeout_s', 0.0, None, ['positive']),
    ('cameras', [], None, ['at least one']),
    ('cameras', ['front', 'front'], None, ['twice']),
    ('cameras', ['front', 'rear-left'], None, ["'rear-left'"]),
    ('camera.front.type', 'sensor_msgs/PointCloud2', None, ['sensor_msgs/Image or']),
])
def test_parameter_problems_name_value_and_fix(name, value, full, words):
    problem = parameter_problem(name, value, visual_tokens_full=full)
    assert problem is not None
    for word in words:
        assert word in problem, problem


@pytest.mark.parametrize('name, value, full', [
    ('token_budget', 16, 16), ('token_budget', 1, None), ('describe_period_s', 0.0, None),
    ('dominant_ratio', 1.0, None), ('cameras', ['front', 'rear_left'], None),
    ('camera.rear_left.type', 'sensor_msgs/CompressedImage', None), ('max_image_age_s', 0.0, None),
])
def test_valid_parameters_pass(name, value, full):
    assert parameter_problem(name, value, visual_tokens_full=full) is None


def make_job(timeout_s=10.0):
    return Job('ask', ['q'], camera='front', inline=None, token_budget=8, max_new_tokens=4,
               timeout_s=timeout_s)


def test_queue_holds_one_running_plus_max_pending():
    queue = RequestQueue(max_pending=1)
    with pytest.raises(RequestRejected, match='not active'):
        queue.submit(make_job())
    queue.open()
    first, second = make_job(), make_job()
    queue.submit(first)
    assert queue.next(0) is first  # the worker holds it
    queue.submit(second)           # waits behind it
    with pytest.raises(RequestRejected, match='busy: 2 request'):
        queue.submit(make_job())
    queue.done()
    queue.submit(make_job())       # the worker is free again: room for one more
    assert len(queue) == 2


def test_jobs_whose_callers_gave_up_leave_the_queue():
    queue = RequestQueue(max_pending=1)
    queue.open()
    queue.submit(make_job())
    assert queue.next(0) is not None
    expired = make_job(timeout_s=0.05)
    queue.submit(expired)
    expired.wait()                 # the caller's deadline passes while it waits
    assert expired.state == Job.DROPPED
    assert len(queue) == 0
    queue.submit(make_job())       # its place is free


def test_job_deadline_while_running_discards_the_late_result():
    job = make_job(timeout_s=0.1)
    assert job.start()
    job.wait()
    assert job.state == Job.ABANDONED and 'during inference' in job.timeout_message()
    assert not job.finish(['late result'], None)
    assert job.results == []


def test_job_finished_in_time_is_answered():
    job = make_job()
    assert job.start()
    assert job.finish(['result'], None)
    job.wait()
    assert (job.state, job.results) == (Job.DONE, ['result'])


def test_cancel_answers_a_waiting_job_with_the_reason():
    job = make_job()
    job.cancel('the node was deactivated')
    job.wait()
    assert (job.state, job.error) == (Job.DONE, 'the node was deactivated')
    assert not job.start()


def test_feed_counts_received_and_superseded_frames():
    feed = CameraFeed('front', 'image_raw', 'sensor_msgs/Image')
    assert feed.take() is None
    for index in range(3):
        feed.store(f'msg{index}')
    assert (feed.received, feed.superseded) == (3, 2)
    frame = feed.take()
    assert (frame.msg, frame.seq, frame.used) == ('msg2', 3, True)
    feed.store('msg3')             # replaces a frame a request used: not superseded
    assert (feed.received, feed.superseded) == (4, 2)


class ListLogger:
    def __init__(self):
        self.lines = []

    def warning(self, message):
        self.lines.append(message)


def test_warnings_are_throttled_per_key():
    logger = ListLogger()
    warnings = ThrottledWarnings(logger, period_s=0.2)
    for _ in range(5):
        warnings.warn('empty_question', 'question is empty')
    warnings.warn('unknown_camera', 'unknown camera')
    assert logger.lines == ['question is empty', 'unknown camera']
    time.sleep(0.25)
    warnings.warn('empty_question', 'question is empty')
    assert logger.lines[-1] == 'question is empty (4 more like this in the last 0.2 s)'


class OutOfMemoryEngine:
    """Stands in for the engine on a GPU that runs out of memory (not causable on this machine)."""
    visual_tokens_full = 16

    def generate(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail')


def test_worker_answers_an_out_of_memory_error_and_carries_on(tiny_model_dir):
    context = Context()
    # Its own namespace: a destroyed node's endpoints linger in DDS until its context is collected,
    # and must not pass for the node process of a later test.
    rclpy.init(args=['--ros-args', '-r', '__ns:=/unit_test', '-p', f'model:={tiny_model_dir}',
                     '-p', 'token_budget:=8'], context=context)
    node = VlmNode(context=context)
    try:
        assert node.start()
        real_engine = node._engine
        rgb = np.ascontiguousarray(skimage.data.coffee())

        def run(engine):
            node._engine = engine
            job = Job('ask', ['What is this?'], camera='inline', inline=InlineImage(rgb, Header()),
                      token_budget=8, max_new_tokens=2, timeout_s=60)
            node._queue.submit(job)
            job.wait()
            return job

        failed = run(OutOfMemoryEngine())
        assert failed.error.startswith('inference failed (OutOfMemoryError: CUDA out of memory.')
        assert '\n' not in failed.error and 'see the node log' in failed.error
        served = run(real_engine)
        assert served.error is None and served.results[0].camera == 'inline'
    finally:
        node.close()
        node.destroy_node()
        rclpy.shutdown(context=context)
        context.destroy()
