"""~/ask_action with vlm_node in its own process and action clients in this one (their own contexts)
or in a child process: streamed answers, cancel of a running and of a queued goal, refusals, and a
client that leaves mid-goal."""
import time

import pytest
import skimage.data
from action_msgs.msg import GoalStatus
from action_msgs.srv import CancelGoal
from diagnostic_msgs.msg import DiagnosticArray

from node_helpers import (
    LONGEST_ANSWER, assert_a_leaving_client_frees_the_worker, running_node, status_values)
from zip_vlm_ros.client import VlmClient, wait_until
from zip_vlm_ros.node.conversions import rgb_to_image
from zip_vlm_ros.msg import VlmResult

REQUEST_TIMEOUT_S = 60.0
QUESTION = 'Describe every object on the table in detail.'
# On the coffee photo at token_budget 8 the tiny checkpoint answers this with the longest answer the
# context allows (no EOS): seconds of decoding, far longer than any cancel here takes.
LONG_QUESTION = 'And then?'
# Generous bounds for a loaded 2-core machine; the benchmark (vlm_bench --node) measures the real figures.
CANCEL_ANSWERED_S = 5.0


@pytest.fixture(scope='module')
def node(tiny_model_dir, tmp_path_factory):
    # One goal at a time, so that a second goal waits in the queue (goals in a batch: test_node_batching.py).
    parameters = {'model': str(tiny_model_dir), 'token_budget': 8, 'max_new_tokens': 24,
                  'max_pending_requests': 2, 'max_batch_size': 1, 'request_timeout_s': REQUEST_TIMEOUT_S}
    with running_node(parameters, tmp_path_factory.mktemp('action') / 'node.log') as (process, client):
        yield process, client


@pytest.fixture
def streamer(node):
    """An action client in a context of its own, closed after the test (so it leaves no client behind)."""
    with VlmClient(client_name='streamer') as client:
        assert client.wait_for_action(60), 'vlm_node offers no ~/ask_action'
        yield client


@pytest.fixture(scope='module')
def coffee():
    return rgb_to_image(skimage.data.coffee())


def received_in_order(goal):
    return [feedback for _, feedback in goal.feedback]


def assert_the_stream_adds_up(goal, answer_text):
    """What the node and a reliable keep-last topic guarantee whatever was lost: feedback arrives in the
    order it was sent, each extends the one before, the goal's text is the answer, and the received
    deltas add up to it when no gap was seen."""
    feedback = received_in_order(goal)
    for earlier, later in zip(feedback, feedback[1:]):
        assert later.generated_tokens > earlier.generated_tokens
        assert later.text.startswith(earlier.text)
    assert all(answer_text.startswith(message.text) for message in feedback)
    assert goal.text == answer_text
    if not goal.gap_seen:
        assert goal.deltas == answer_text, (goal.deltas, answer_text)


def test_a_streamed_answer_is_the_ask_services_answer(node, streamer, coffee):
    _, client = node
    status, result, goal = streamer.ask_streamed(QUESTION, image=coffee, max_new_tokens=24, timeout_s=60)
    assert status == GoalStatus.STATUS_SUCCEEDED and result.success, result.message
    answer = result.result
    assert answer.generated_tokens >= 4, 'the tiny checkpoint should not stop this early on this prompt'
    feedback = received_in_order(goal)
    assert feedback, 'no feedback before the result'
    # feedback before the result
    assert goal.feedback[0][0] < goal.result_s
    assert_the_stream_adds_up(goal, answer.text)
    # The first feedback is sent at the first token: within the engine's own TTFT (total minus
    # decode, an upper bound) + 20 ms, on the engine's clock. (Only the first one received can be
    # checked; it is the first sent unless the client fell behind the whole answer.)
    if feedback[0].generated_tokens == 1:
        assert feedback[0].elapsed_ms <= answer.total_ms - answer.decode_ms + 20.0, (feedback[0], answer)
    # the same frame and settings through the service give the same answer
    response = client.ask(QUESTION, image=coffee, max_new_tokens=24)
    assert response.success and response.result.text == answer.text
    assert response.result.generated_tokens == answer.generated_tokens


def test_a_slow_feedback_reader_misses_feedback_but_not_the_answer(node, coffee):
    """A reader with a feedback history of 1 that is busy while the whole answer is generated keeps only
    the newest of the feedback sent meanwhile: a gap it sees, and its text is still the answer."""
    _, client = node
    question = 'And then, slowly?'
    answers = client.collect(VlmResult, '/zip_vlm/results')
    time.sleep(1.0)

    def busy_until_answered(_feedback):
        # blocks this client's action callbacks: every later feedback queues in a history of 1
        wait_until(lambda: any(a.prompt == question for a in answers), REQUEST_TIMEOUT_S)
    with VlmClient(client_name='slow_streamer', feedback_depth=1) as slow:
        assert slow.wait_for_action(60)
        status, result, goal = slow.ask_streamed(question, image=coffee, max_new_tokens=32,
                                                 on_feedback=busy_until_answered, timeout_s=REQUEST_TIMEOUT_S)
    assert status == GoalStatus.STATUS_SUCCEEDED, result.message
    published = next(a for a in answers if a.prompt == question)
    assert published.text == result.result.text and published.generated_tokens >= 8
    # dozens of feedback were sent; the reader took the first, then at most the one its history kept
    assert goal.gap_seen
    assert goal.deltas != goal.text
    assert_the_stream_adds_up(goal, result.result.text)


def test_results_of_goals_reach_the_text_topics(node, streamer, coffee):
    _, client = node
    answers = client.collect(VlmResult, '~/results'.replace('~', '/zip_vlm'))
    time.sleep(1.0)
    status, result, _ = streamer.ask_streamed('What is in the cup?', image=coffee, max_new_tokens=6)
    assert status == GoalStatus.STATUS_SUCCEEDED
    assert wait_until(lambda: any(a.prompt == 'What is in the cup?' for a in answers), 10)
    published = next(a for a in answers if a.prompt == 'What is in the cup?')
    assert published.text == result.result.text


def test_a_refused_goal_is_aborted_with_the_reason(streamer, coffee):
    status, result, goal = streamer.ask_streamed('   ', image=coffee)
    assert status == GoalStatus.STATUS_ABORTED and not result.success
    assert 'question is empty' in result.message and not goal.feedback
    status, result, _ = streamer.ask_streamed('Why?', image=coffee, token_budget=100000)
    assert status == GoalStatus.STATUS_ABORTED and 'token_budget 100000 is out of range' in result.message


def test_cancel_mid_answer_returns_the_partial_text_and_frees_the_worker(node, streamer, coffee):
    _, client = node
    goal = streamer.send_ask_goal(LONG_QUESTION, image=coffee, max_new_tokens=LONGEST_ANSWER)
    assert wait_until(lambda: len(goal.feedback) >= 3, 60), 'no feedback from the running goal'
    cancel_sent_s = time.monotonic()
    response = goal.cancel()
    assert response.return_code == CancelGoal.Response.ERROR_NONE and len(response.goals_canceling) == 1
    status, result = goal.result(30)
    assert status == GoalStatus.STATUS_CANCELED and not result.success
    assert result.message == 'cancelled by the client'
    assert goal.result_s - cancel_sent_s <= CANCEL_ANSWERED_S
    # the partial text is what was streamed: the result repeats the last feedback sent, which extends
    # every feedback received
    assert result.partial_text and result.partial_elapsed_ms > 0
    received = received_in_order(goal)
    assert result.partial_generated_tokens >= max(message.generated_tokens for message in received)
    assert_the_stream_adds_up(goal, result.partial_text)
    assert result.result.generated_tokens == 0  # no VlmResult for an unfinished answer
    # the next request runs at once: the worker left the cancelled answer within one decode step
    asked_s = time.monotonic()
    response = client.ask('What is this?', image=coffee, max_new_tokens=2)
    assert response.success, response.message
    assert time.monotonic() - asked_s <= CANCEL_ANSWERED_S


def test_a_goal_cancelled_while_queued_never_runs(node, streamer, coffee):
    _, client = node
    answers = client.collect(VlmResult, '/zip_vlm/results')
    diagnostics = client.collect(DiagnosticArray, '/diagnostics')
    running = streamer.send_ask_goal(LONG_QUESTION, image=coffee, max_new_tokens=LONGEST_ANSWER)
    assert wait_until(lambda: running.feedback, 60)
    queued = streamer.send_ask_goal('Is this goal ever answered?', image=coffee, max_new_tokens=4)
    assert queued.wait_accepted(30)
    assert wait_until(lambda: status_values(diagnostics).get('queue_depth') == '1', 10), status_values(diagnostics)
    assert queued.cancel().return_code == CancelGoal.Response.ERROR_NONE
    status, result = queued.result(CANCEL_ANSWERED_S)
    assert status == GoalStatus.STATUS_CANCELED and result.message == 'cancelled by the client'
    assert result.partial_text == '' and not queued.feedback
    running.cancel()
    assert running.result(30)[0] == GoalStatus.STATUS_CANCELED
    # FIFO: had the queued goal run, its result would be published before this one's
    assert client.ask('And this one?', image=coffee, max_new_tokens=2).success
    assert wait_until(lambda: any(a.prompt == 'And this one?' for a in answers), 10)
    assert not any(a.prompt == 'Is this goal ever answered?' for a in answers)
    assert not queued.feedback


def test_a_client_that_leaves_mid_goal_frees_the_worker(node):
    """A process sends a long goal, reads some feedback and exits without cancelling; once no action
    client is left the node cancels the job instead of decoding for nobody."""
    script = f'''
import skimage.data
from zip_vlm_ros.client import VlmClient, wait_until
from zip_vlm_ros.node.conversions import rgb_to_image
with VlmClient(client_name='leaver') as leaver:
    goal = leaver.send_ask_goal({LONG_QUESTION!r}, image=rgb_to_image(skimage.data.coffee()),
                                max_new_tokens={LONGEST_ANSWER}, timeout_s=60)
    assert wait_until(lambda: len(goal.feedback) >= 2, 60), 'no feedback'
'''
    # the other tests' action clients are closed with them: the leaver is the only one left
    assert_a_leaving_client_frees_the_worker(node[1], script, within_s=60)
