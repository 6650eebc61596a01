"""vlm_node serving the tiny LLaVA-Mini checkpoint in its own process: it configures with the default
token_budget (which does not apply to LLaVA-Mini), answers through real service calls with the one
visual token it really reads, and refuses only budgets below 1; surround and history requests are
answered in LLaVA-Mini's video mode, one token per image."""
import pytest
import skimage.data
from builtin_interfaces.msg import Time
from node_helpers import publish_frame, running_node, stamp_tuple

from zip_vlm_ros.node.conversions import rgb_to_image, stamp_to_seconds


@pytest.fixture(scope='module')
def client(tiny_mini_model_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp('vlm_node_mini') / 'node.log'
    # token_budget 64 is the node's default: more than LLaVA-Mini's one token, and still accepted.
    parameters = {'model': str(tiny_mini_model_dir), 'token_budget': 64, 'max_new_tokens': 3,
                  'max_image_age_s': 0.0, 'request_timeout_s': 120.0, 'cameras': ['front', 'rear'],
                  'frame_history_length': 8}
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


def _stamp(nanoseconds: int) -> Time:
    return Time(sec=nanoseconds // 10**9, nanosec=nanoseconds % 10**9)


def test_llava_mini_node_answers_surround_and_history_requests_one_token_per_image(client):
    photos = [rgb_to_image(getattr(skimage.data, name)()) for name in ('astronaut', 'coffee', 'chelsea')]
    publish_frame(client, '/mini/rear/image_raw', photos[1])
    now_ns = client.now().nanoseconds  # two front frames exactly 1 s apart, the newer one now
    stamps = [publish_frame(client, '/mini/image_raw', photo, stamp=_stamp(now_ns - ago_ns))
              for photo, ago_ns in zip((photos[2], photos[0]), (10**9, 0))]

    surround = client.ask('What do the cameras see?', cameras=['front', 'rear'], token_budget=7)
    assert surround.success, surround.message
    result = surround.result
    assert (list(result.image_cameras), list(result.image_labels)) == (['front', 'rear'], ['front', 'rear'])
    assert (result.reduction, result.visual_tokens, result.visual_tokens_full, result.token_budget) == \
        ('llava-mini', 2, 2, 2)
    assert list(result.image_visual_tokens) == [1, 1] and result.generated_tokens >= 1
    again = client.ask_many(['Is the road clear?'], cameras=['front', 'rear'], token_budget=7)
    assert again.success and again.results[0].prefix_reused, again.message

    history = client.ask('What changed?', 'front', history_frames=2, history_s=1.0)
    assert history.success, history.message
    result = history.result
    assert [stamp_tuple(stamp) for stamp in result.image_stamps] == [stamp_tuple(stamp) for stamp in stamps]
    assert list(result.image_labels) == ['front 1.0 s ago', 'front now']
    assert stamp_to_seconds(result.header.stamp) == stamp_to_seconds(stamps[1])
    assert (result.reduction, result.visual_tokens, list(result.image_visual_tokens)) == ('llava-mini', 2, [1, 1])
