"""vlm_node in its own process with each reducer: the `reducer` request field of Ask, AskMany, DescribeScene
and the action goal, the runtime `reducer` parameter, and unknown names refused while the node keeps serving."""
import pytest
import skimage.data

from node_helpers import publish_frame, running_node
from zip_vlm_ros.client import wait_until
from zip_vlm_ros.node.conversions import rgb_to_image
from zip_vlm_ros.reducers import REDUCERS

NS = '/reducers'
FRONT = f'{NS}/image_raw'
BUDGET, FULL = 6, 16  # the tiny preset has 4x4 patches = 16 visual tokens


@pytest.fixture(scope='module')
def client(tiny_model_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp('vlm_node_reducers') / 'node.log'
    parameters = {'model': str(tiny_model_dir), 'cameras': ['front'], 'token_budget': BUDGET, 'max_new_tokens': 3,
                  'max_image_age_s': 0.0, 'request_timeout_s': 120.0}
    with running_node(parameters, log_path, namespace=NS) as (_, client):
        wait_until(lambda: False, 0.5)
        publish_frame(client, FRONT, rgb_to_image(skimage.data.astronaut()))
        assert wait_until(lambda: client.describe().success, 30)
        yield client


def test_each_request_type_takes_each_reducer(client):
    for reducer in REDUCERS:
        ask = client.ask('What is it?', reducer=reducer)
        assert ask.success, ask.message
        assert (ask.result.reduction, ask.result.visual_tokens) == (reducer, BUDGET)
        many = client.ask_many(['What is it?', 'Where?'], reducer=reducer)
        assert many.success, many.message
        assert [(r.reduction, r.prefix_reused) for r in many.results] == [(reducer, True), (reducer, True)]
        describe = client.describe(reducer=reducer)
        assert describe.success and describe.result.reduction == reducer, describe.message
        status, result, _ = client.ask_streamed('What is it?', reducer=reducer, timeout_s=120.0)
        assert result.success and result.result.reduction == reducer, result.message


def test_the_request_field_empty_means_the_node_parameter(client):
    assert client.ask('What is it?').result.reduction == 'visionzip'
    assert client.set_parameter('reducer', 'vispruner') == (True, '')
    assert client.ask('What is it?').result.reduction == 'vispruner'
    assert client.describe().result.reduction == 'vispruner'
    assert client.ask('What is it?', reducer='divprune').result.reduction == 'divprune'
    successful, reason = client.set_parameter('reducer', 'holov')
    assert not successful and "reducer 'holov' is not known: use visionzip, divprune, vispruner" in reason, reason
    assert client.get_parameter('reducer') == 'vispruner'
    assert client.set_parameter('reducer', 'visionzip') == (True, '')


def test_unknown_reducer_is_refused_with_the_choices_and_the_node_keeps_serving(client):
    expected = "unknown reducer 'holov': use visionzip, divprune, vispruner"
    for response in (client.ask('What is it?', reducer='holov'), client.ask_many(['What?'], reducer='holov'),
                     client.describe(reducer='holov'), client.ask('What?', cameras=['front'], reducer='holov')):
        assert not response.success and expected in response.message, response.message
    _, result, _ = client.ask_streamed('What is it?', reducer='holov', timeout_s=60.0)
    assert not result.success and expected in result.message, result.message
    assert client.ask('What is it?', reducer='divprune').success


def test_surround_view_uses_the_requested_reducer(client):
    response = client.ask('What is around?', cameras=['front'], token_budget=5, reducer='divprune')
    assert response.success, response.message
    assert (response.result.reduction, response.result.visual_tokens) == ('divprune', 5)
