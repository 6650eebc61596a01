"""vlm_node configures with each published checkpoint's replica (test/fixtures/published) in its own process
and answers a question through a real service call: the published files load through the node's configure."""
import shutil

import pytest
import skimage.data
from conftest import PUBLISHED_CHECKPOINTS, PUBLISHED_CLIP_TOWER
from node_helpers import running_node

from zip_vlm_ros.node.conversions import rgb_to_image

MINI = 'ICTNLP/llava-mini-llama-3.1-8b'
QWEN = 'Qwen/Qwen2.5-VL-3B-Instruct'
# Visual tokens of skimage's 512 x 512 astronaut without reduction. LLaVA-1.5: 24 x 24 patches. LLaVA-NeXT:
# the 672 x 672 pinpoint (a 2 x 2 grid) fits the square best, so 576 for the base image plus 48 x 48 grid
# patches and one newline token per row of 48 = 2928. LLaVA-Mini: its one compressed token. Qwen2.5-VL:
# resized to 504 x 504 (multiples of 28), 18 x 18 merged tokens.
FULL_TOKENS = {'llava-hf/llava-1.5-7b-hf': 576, 'llava-hf/llava-v1.6-mistral-7b-hf': 576 + 48 * 48 + 48,
               'llava-hf/llava-v1.6-vicuna-7b-hf': 576 + 48 * 48 + 48, MINI: 1, QWEN: 18 * 18}
# Read at token_budget 64: LLaVA-NeXT splits it over the base image and 4 crops, 12 each; LLaVA-Mini's
# budget does not apply.
BUDGET_TOKENS = {'llava-hf/llava-1.5-7b-hf': 64, 'llava-hf/llava-v1.6-mistral-7b-hf': 5 * 12,
                 'llava-hf/llava-v1.6-vicuna-7b-hf': 5 * 12, MINI: 1, QWEN: 64}


@pytest.mark.parametrize('checkpoint', PUBLISHED_CHECKPOINTS)
def test_the_node_configures_with_a_published_replica_and_answers(published_replicas, checkpoint, tmp_path):
    parameters = {'model': str(published_replicas[checkpoint]), 'token_budget': 64, 'max_new_tokens': 3,
                  'max_image_age_s': 0.0, 'request_timeout_s': 120.0}
    if checkpoint == MINI:  # its config names the tower by hub id; the replica's CLIP directory stands in
        parameters['vision_tower'] = str(published_replicas[PUBLISHED_CLIP_TOWER])
    if checkpoint == QWEN:  # no CLS token for VisionZip: reduced with DivPrune
        parameters['reducer'] = 'divprune'
    with running_node(parameters, tmp_path / 'node.log', namespace='/published') as (process, client):
        answer = client.ask('What is in front of the robot?', image=rgb_to_image(skimage.data.astronaut()))
        assert answer.success, answer.message
        result = answer.result
        assert (result.visual_tokens_full, result.visual_tokens) == (FULL_TOKENS[checkpoint], BUDGET_TOKENS[checkpoint])
        assert 1 <= result.generated_tokens <= 3 and result.text


def test_the_llava_mini_replica_finds_its_tower_by_hub_id_in_the_hugging_face_cache(published_replicas, tmp_path):
    """As published, without vision_tower: mm_vision_tower's hub id resolved in the local cache (offline)."""
    snapshot = '0' * 40  # any commit hash; refs/main names it, as huggingface-cli download writes it
    repository = tmp_path / 'hub' / f"models--{PUBLISHED_CLIP_TOWER.replace('/', '--')}"
    shutil.copytree(published_replicas[PUBLISHED_CLIP_TOWER], repository / 'snapshots' / snapshot)
    (repository / 'refs').mkdir()
    (repository / 'refs' / 'main').write_text(snapshot)
    parameters = {'model': str(published_replicas[MINI]), 'max_new_tokens': 2, 'max_image_age_s': 0.0,
                  'request_timeout_s': 120.0}
    env = {'HF_HUB_CACHE': str(tmp_path / 'hub'), 'HF_HUB_OFFLINE': '1'}
    with running_node(parameters, tmp_path / 'node.log', namespace='/published', env=env) as (_, client):
        answer = client.ask('Is the path clear?', image=rgb_to_image(skimage.data.coffee()))
        assert answer.success, answer.message
        assert (answer.result.visual_tokens, answer.result.reduction) == (1, 'llava-mini')
