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
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from zip_vlm_ros.node.jobs import (
    SHUTTING_DOWN_MESSAGE, CameraFeed, InlineImage, Job, RequestQueue, RequestRejected, ThrottledWarnings)
from zip_vlm_ros.node.vlm_node import VlmNode
from zip_vlm_ros.node.parameters import parameter_problem, type_problem


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
    ('max_clock_skew_s', -1.0, None, ['tolerance in seconds']),
    ('service_history_depth', 0, None, ['callers that may call at once']),
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


def test_parameter_limits_of_the_loaded_model():
    assert 'use 1..1000' in parameter_problem('max_new_tokens', 10**9, max_new_tokens=1000)
    assert parameter_problem('max_new_tokens', 1000, max_new_tokens=1000) is None
    problem = parameter_problem('describe_prompt', 'x' * 21, question_max_chars=20)
    assert 'more than question_max_chars = 20' in problem


@pytest.mark.parametrize('name, value, default, words', [
    ('max_new_tokens', 'many', 64, ['a whole number', "'many'", 'str']),
    ('token_budget', 8.5, 64, ['a whole number']),
    ('autostart', 1, True, ['true or false']),
    ('cameras', [1, 2], ['front'], ['list of strings']),
])
def test_wrong_types_are_named_in_words(name, value, default, words):
    problem = type_problem(name, value, default)
    for word in words:
        assert word in problem, problem


def test_whole_numbers_are_numbers():
    assert type_problem('request_timeout_s', 3, 30.0) is None


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
    queue.done(first)
    queue.submit(make_job())       # the worker is free again: room for one more
    assert len(queue) == 2


def test_queue_holds_a_batch_of_running_jobs_plus_max_pending():
    queue = RequestQueue(max_pending=1, max_running=3)
    queue.open()
    jobs = [make_job() for _ in range(4)]
    for job in jobs:
        queue.submit(job)
    with pytest.raises(RequestRejected, match=r'busy: 4 request\(s\) ahead \(0 running, max_batch_size = 3\)'):
        queue.submit(make_job())
    assert [queue.next(0) for _ in range(3)] == jobs[:3] and queue.running == jobs[:3]
    with pytest.raises(RequestRejected, match='3 running'):
        queue.submit(make_job())
    queue.done(jobs[1])            # a row left the batch: its slot is free
    assert queue.running == [jobs[0], jobs[2]]
    queue.submit(make_job())
    # A job the worker cannot take now (a multi-image job while rows run) keeps its place at the head.
    assert queue.next(0, accept=lambda job: job is not jobs[3]) is None
    assert queue.next(0, accept=lambda job: True) is jobs[3]


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


def test_job_deadline_while_running_answers_and_tells_the_engine_to_stop():
    job = make_job(timeout_s=0.1)
    answered = []
    job.add_settled_callback(answered.append)
    assert job.start()
    assert job.should_stop() is None
    job.wait()
    assert job.state == Job.TIMED_OUT and 'during inference' in job.error
    assert answered == [job]
    assert job.should_stop() == job.error
    assert job.stop_requested_s == job.deadline_s
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
    assert job.cancel('the node was deactivated')
    job.wait()
    assert (job.state, job.error) == (Job.CANCELLED, 'the node was deactivated')
    assert not job.start()
    assert not job.cancel('twice')


def test_closing_the_queue_cancels_running_and_waiting_jobs():
    queue = RequestQueue(max_pending=2)
    queue.open()
    jobs = [make_job() for _ in range(3)]
    for job in jobs:
        queue.submit(job)
    running = queue.next(0)
    assert running is jobs[0] and running.start()
    queue.close('the node is shutting down')
    assert [job.state for job in jobs] == [Job.CANCELLED] * 3
    assert running.should_stop() == 'the node is shutting down'
    assert queue.next(0) is None
    with pytest.raises(RequestRejected, match='not active'):
        queue.submit(make_job())
    # closed for the process's exit: a request that comes after is told so, not to activate the node
    queue.open()
    queue.close(SHUTTING_DOWN_MESSAGE, refuse_with=SHUTTING_DOWN_MESSAGE)
    with pytest.raises(RequestRejected, match='^the node is shutting down: retry when it is back$'):
        queue.submit(make_job())


def test_expire_overdue_answers_waiting_jobs_while_the_worker_is_busy():
    queue = RequestQueue(max_pending=2)
    queue.open()
    running, waiting = make_job(timeout_s=10), make_job(timeout_s=0.05)
    queue.submit(running)
    queue.submit(waiting)
    assert queue.next(0) is running and running.start()
    time.sleep(0.1)
    queue.expire_overdue()
    assert waiting.state == Job.DROPPED and 'waiting in the queue' in waiting.error
    assert running.state == Job.RUNNING


def test_feed_counts_received_and_superseded_frames():
    feed = CameraFeed('front', 'image_raw', 'sensor_msgs/Image')
    assert feed.take() is None
    messages = [Image(header=Header(frame_id=f'msg{index}')) for index in range(4)]
    for msg in messages[:3]:
        feed.store(msg)
    assert (feed.received, feed.superseded) == (3, 2)
    frame = feed.take()
    assert (frame.msg.header.frame_id, frame.seq, frame.used) == ('msg2', 3, True)
    feed.store(messages[3])        # replaces a frame a request used: not superseded
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


def out_of_memory(*args, **kwargs):
    """Stands in for the vision stage on a GPU that runs out of memory (not causable on this machine)."""
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
        family = node._engine.family
        rgb = np.ascontiguousarray(skimage.data.coffee())

        def run():
            job = Job('ask', ['What is this?'], camera='inline', inline=InlineImage(rgb, Header()),
                      token_budget=8, max_new_tokens=2, timeout_s=60)
            node._queue.submit(job)
            job.wait()
            return job

        family.encode = out_of_memory  # this instance only: the class's method comes back with del
        try:
            failed = run()
        finally:
            del family.encode
        assert failed.error.startswith('inference failed (OutOfMemoryError: CUDA out of memory.')
        assert '\n' not in failed.error and 'see the node log' in failed.error
        served = run()
        assert served.error is None and served.results[0].camera == 'inline'
    finally:
        node.close()
        node.destroy_node()
        rclpy.shutdown(context=context)
        context.destroy()
