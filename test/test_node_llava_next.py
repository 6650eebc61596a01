"""vlm_node serving the tiny LLaVA-NeXT checkpoint in its own process: budgets are checked against the
loaded model's numbers, and every result reports its frame's own full visual-token count."""
import numpy as np
import pytest
import skimage.data
from node_helpers import publish_frame, running_node

from zip_vlm_ros.node.conversions import rgb_to_image

# tiny-next: 56 px crops of 4x4 patches; the largest grid (2x2) without unpadding feeds 16 + 8 * 9 = 88.
LARGEST_FULL = 88
ASTRONAUT_FULL, STRIP_FULL = 88, 68  # 512x512 -> 2x2 grid; 170x512 -> 1x3 strip (4x12 patches): 16 + 4 * 13


@pytest.fixture(scope='module')
def client(tiny_next_model_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp('vlm_node_next') / 'node.log'
    parameters = {'model': str(tiny_next_model_dir), 'token_budget': 40, 'max_new_tokens': 3,
                  'max_image_age_s': 0.0, 'request_timeout_s': 120.0}
    with running_node(parameters, log_path, namespace='/next') as (_, client):
        yield client


def test_llava_next_node_reports_per_frame_counts_and_checks_budgets_against_the_model(client):
    astronaut = skimage.data.astronaut()
    publish_frame(client, '/next/image_raw', rgb_to_image(astronaut))
    reduced = client.describe()
    assert reduced.success, reduced.message
    # 40 tokens over 5 crops: 8 per crop.
    assert (reduced.result.reduction, reduced.result.visual_tokens, reduced.result.visual_tokens_full) == \
        ('visionzip', 40, ASTRONAUT_FULL)

    strip = np.ascontiguousarray(astronaut[170:340])
    full = client.ask('Is the path clear?', image=rgb_to_image(strip), token_budget=LARGEST_FULL)
    assert full.success, full.message
    assert (full.result.reduction, full.result.visual_tokens, full.result.visual_tokens_full) == \
        ('none', STRIP_FULL, STRIP_FULL)

    refused = client.ask('Is it day?', token_budget=LARGEST_FULL + 1)
    assert not refused.success and f'1..{LARGEST_FULL}' in refused.message, refused.message
    successful, reason = client.set_parameter('token_budget', LARGEST_FULL + 1)
    assert not successful and f'1..{LARGEST_FULL}' in reason, reason
    assert client.set_parameter('token_budget', LARGEST_FULL) == (True, '')
