"""vlm_node serving the tiny LLaVA-Mini checkpoint in its own process: it configures with the default
token_budget (which does not apply to LLaVA-Mini), answers through real service calls with the one
visual token it really reads, and refuses only budgets below 1."""
import pytest
import skimage.data
from node_helpers import publish_frame, running_node

from zip_vlm_ros.conversions import rgb_to_image


@pytest.fixture(scope='module')
def client(tiny_mini_model_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp('vlm_node_mini') / 'node.log'
    # token_budget 64 is the node's default: more than LLaVA-Mini's one token, and still accepted.
    parameters = {'model': str(tiny_mini_model_dir), 'token_budget': 64, 'max_new_tokens': 3,
                  'max_image_age_s': 0.0, 'request_timeout_s': 120.0}
    with running_node(parameters, log_path, namespace='/mini') as (_, client):
        yield client


def test_llava_mini_node_answers_with_its_one_token_whatever_the_budget(client):
    publish_frame(client, '/mini/image_raw', rgb_to_image(skimage.data.astronaut()))
    described = client.describe()
    assert described.success, described.message
    result = described.result
    assert (result.reduction, result.visual_tokens, result.visual_tokens_full, result.token_budget) == \
        ('llava-mini', 1, 1, 1)
    assert result.generated_tokens >= 1 and result.vision_ms > 0

    inline = rgb_to_image(skimage.data.coffee())
    answers = [client.ask('Is the path clear?', image=inline, token_budget=budget) for budget in (1, 500)]
    assert all(answer.success for answer in answers), [answer.message for answer in answers]
    assert {(a.result.reduction, a.result.visual_tokens) for a in answers} == {('llava-mini', 1)}
    assert answers[0].result.text == answers[1].result.text

    many = client.ask_many(['Describe the scene.', 'Is there a person?'])
    assert many.success, many.message
    # The second question runs on the frame's cached prefix (pre-fusion and LLM keys/values).
    assert len(many.results) == 2 and many.results[1].prefix_reused

    refused = client.ask('Is it day?', token_budget=-1)
    assert not refused.success and 'token_budget -1 is out of range' in refused.message, refused.message
    assert client.set_parameter('token_budget', 1000) == (True, '')
    successful, reason = client.set_parameter('token_budget', 0)
    assert not successful and 'out of range' in reason, reason
