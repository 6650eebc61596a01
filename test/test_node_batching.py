"""vlm_node decoding concurrent requests together (max_batch_size), in its own process, with callers in
this one (each VlmClient its own context): services and action goals share the batch, every answer is
the engine's answer alone, and a cancelled row frees its slot for a waiting request."""
import threading

import pytest
import skimage.data
from action_msgs.msg import GoalStatus
from diagnostic_msgs.msg import DiagnosticArray

from node_helpers import LONGEST_ANSWER, running_node, status_values
from zip_vlm_ros.client import VlmClient, call_at_once, wait_until
from zip_vlm_ros.engine import EngineConfig, VlmEngine
from zip_vlm_ros.node.conversions import rgb_to_image
from zip_vlm_ros.srv import Ask

BUDGET, MAX_NEW = 8, 8
QUESTIONS = {'astronaut': 'What is in the image?', 'coffee': 'Describe the table in detail, please.',
             'chelsea': 'Is the path clear?', 'rocket': 'What color is the sky?'}
# On the coffee photo at token_budget 8 the tiny checkpoint answers this with the longest answer the
# context allows (no EOS): far longer than any step of these tests.
LONG_QUESTION = 'And then?'


@pytest.fixture(scope='module')
def node(tiny_model_dir, tmp_path_factory):
    parameters = {'model': str(tiny_model_dir), 'token_budget': BUDGET, 'max_new_tokens': MAX_NEW,
                  'max_batch_size': 2, 'max_pending_requests': 4, 'request_timeout_s': 120.0}
    with running_node(parameters, tmp_path_factory.mktemp('batching') / 'node.log') as (process, client):
        yield process, client


@pytest.fixture(scope='module')
def callers(node):
    clients = [VlmClient(client_name=f'caller_{index}') for index in range(len(QUESTIONS))]
    try:
        for client in clients:
            assert client.wait_for_service(Ask, '~/ask', 60) and client.wait_for_action(60)
        yield clients
    finally:
        for client in clients:
            client.close()


def test_concurrent_callers_get_the_answers_they_get_alone(tiny_model_dir, node, callers):
    engine = VlmEngine(EngineConfig(model=str(tiny_model_dir), device='cpu', token_budget=BUDGET,
                                    max_new_tokens=MAX_NEW))
    try:
        alone = {name: engine.generate(getattr(skimage.data, name)(), question).text
                 for name, question in QUESTIONS.items()}
    finally:
        engine.close()
    images = {name: rgb_to_image(getattr(skimage.data, name)()) for name in QUESTIONS}
    names = list(QUESTIONS)

    def call(client):  # the last caller streams through the action, the others call ~/ask
        name = names[callers.index(client)]
        if client is callers[-1]:
            status, result, _ = client.ask_streamed(QUESTIONS[name], image=images[name], timeout_s=120)
            return name, status == GoalStatus.STATUS_SUCCEEDED, result.result.text, result.message
        response = client.ask(QUESTIONS[name], image=images[name], timeout_s=120)
        return name, response.success, response.result.text, response.message

    outcomes = call_at_once(callers, call, 150)
    for (name, success, text, message), _ in outcomes:
        assert success, message
        assert text == alone[name], name
    assert node[1].ask('Still there?', image=images['coffee'], timeout_s=60).success


def test_a_cancelled_row_frees_its_slot_and_the_other_row_goes_on(node, callers):
    _, client = node
    diagnostics = client.collect(DiagnosticArray, '/diagnostics')
    coffee = rgb_to_image(skimage.data.coffee())
    first, second = (caller.send_ask_goal(LONG_QUESTION, image=coffee, max_new_tokens=LONGEST_ANSWER)
                     for caller in callers[:2])
    # Both stream at once: with one request at a time the second would wait for the first's whole answer.
    assert wait_until(lambda: len(first.feedback) >= 3 and len(second.feedback) >= 3, 60)
    assert wait_until(lambda: status_values(diagnostics).get('batch_size') == '2', 10), status_values(diagnostics)
    assert status_values(diagnostics)['max_batch_size'] == '2'

    # The batch is full: a third request waits until a row leaves.
    waiting = {}
    thread = threading.Thread(target=lambda: waiting.setdefault('response', callers[2].ask(
        'What is this?', image=coffee, max_new_tokens=3, timeout_s=60)))
    thread.start()
    assert wait_until(lambda: status_values(diagnostics).get('queue_depth') == '1', 10), status_values(diagnostics)
    assert 'response' not in waiting

    first.cancel()
    assert first.result(30)[0] == GoalStatus.STATUS_CANCELED
    thread.join(60)
    assert waiting['response'].success, waiting['response'].message
    streamed = len(second.feedback)
    assert wait_until(lambda: len(second.feedback) > streamed + 3, 30), 'the other row stopped decoding'
    second.cancel()
    assert second.result(30)[0] == GoalStatus.STATUS_CANCELED
    assert wait_until(lambda: status_values(diagnostics).get('batch_size') == '0', 10), status_values(diagnostics)
