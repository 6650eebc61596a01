"""Every caller gets an answer at any load, with vlm_node in its own process (the way down is in
test_node_shutdown.py).

- 40 callers (each its own ROS context, response history 100) calling at once: every one is answered
  within request_timeout_s + 2 s, served or refused with a reason; the same for 40 bad requests.
- A caller that leaves frees the worker.
"""
import pytest
import skimage.data

from node_helpers import LONG_QUESTIONS, LONGEST_ANSWER, assert_a_leaving_client_frees_the_worker, running_node
from zip_vlm_ros.client import VlmClient, call_at_once, wait_until_answered
from zip_vlm_ros.node.conversions import rgb_to_image
from zip_vlm_ros.srv import Ask

CALLERS = 40
REQUEST_TIMEOUT_S = 10.0


@pytest.fixture(scope='module')
def node(tiny_model_dir, tmp_path_factory):
    parameters = {'model': str(tiny_model_dir), 'token_budget': 8, 'max_new_tokens': 8,
                  'max_pending_requests': 4, 'request_timeout_s': REQUEST_TIMEOUT_S}
    with running_node(parameters, tmp_path_factory.mktemp('burst') / 'node.log') as (process, client):
        yield process, client


@pytest.fixture(scope='module')
def callers(node):
    """40 clients with their own contexts, each already answered once by ~/ask (discovered both ways)."""
    clients = [VlmClient(client_name=f'caller_{index}', threads=2) for index in range(CALLERS)]
    try:
        ready = call_at_once(clients, lambda client: wait_until_answered(
            client, Ask, '~/ask', Ask.Request(question=''), 120), 120)
        assert all(found is True for found, _ in ready), 'a caller was never answered by ~/ask'
        yield clients
    finally:
        for client in clients:
            client.close()


def assert_everyone_answered(outcomes):
    lost = [seconds for response, seconds in outcomes if isinstance(response, TimeoutError)]
    assert not lost, f'{len(lost)} of {len(outcomes)} callers got no response'
    slowest = max(seconds for _, seconds in outcomes)
    assert slowest <= REQUEST_TIMEOUT_S + 2.0, f'the slowest caller waited {slowest:.1f} s'


def test_40_callers_at_once_are_all_answered(node, callers):
    coffee = rgb_to_image(skimage.data.coffee())
    outcomes = call_at_once(callers, lambda client: client.ask(
        'What is on the table?', image=coffee, timeout_s=REQUEST_TIMEOUT_S + 2.0), REQUEST_TIMEOUT_S + 2.0)
    assert_everyone_answered(outcomes)
    served = [response for response, _ in outcomes if response.success]
    refused = [response for response, _ in outcomes if not response.success]
    assert len(served) + len(refused) == CALLERS and served
    for response in refused:
        assert 'busy' in response.message and 'max_pending_requests = 4' in response.message, response.message
    # the node serves normally afterwards
    assert node[1].ask('Still there?', image=coffee, timeout_s=30).success


def test_40_bad_requests_at_once_are_all_refused(node, callers):
    outcomes = call_at_once(callers, lambda client: client.ask('  ', timeout_s=REQUEST_TIMEOUT_S + 2.0),
                            REQUEST_TIMEOUT_S + 2.0)
    assert_everyone_answered(outcomes)
    assert all(not response.success and 'question is empty' in response.message for response, _ in outcomes)
    assert node[1].ask('Still there?', image=rgb_to_image(skimage.data.coffee()), timeout_s=30).success


def test_a_caller_that_leaves_frees_the_worker(node):
    """A client process calls with a short timeout of its own and exits; once no client of the service
    is left the node cancels the job instead of decoding for nobody."""
    script = f'''
import skimage.data
from zip_vlm_ros.client import VlmClient
from zip_vlm_ros.node.conversions import rgb_to_image
from zip_vlm_ros.srv import AskMany
with VlmClient(client_name='leaver') as leaver:
    # discovery first: under load it can take longer than the call's own 3 s
    assert leaver.wait_for_service(AskMany, '~/ask_many', 60), 'no ~/ask_many'
    try:
        leaver.ask_many({LONG_QUESTIONS!r}, image=rgb_to_image(skimage.data.coffee()),
                        max_new_tokens={LONGEST_ANSWER}, timeout_s=3)
    except TimeoutError:
        pass
'''
    # this module's own clients use ~/ask only; the leaver is the only client of ~/ask_many
    assert_a_leaving_client_frees_the_worker(node[1], script, within_s=REQUEST_TIMEOUT_S + 30)
