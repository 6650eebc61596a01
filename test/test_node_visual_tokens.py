"""vlm_node in its own process with `publish_visual_tokens`: an overlay per result on ~/visual_tokens/image
(rgb8, the source frame's header) when on, none when switched off at runtime."""
import numpy as np
import pytest
import skimage.data
from sensor_msgs.msg import Image

from node_helpers import publish_frame, running_node, stamp_tuple
from zip_vlm_ros.client import wait_until
from zip_vlm_ros.node.conversions import image_to_rgb, rgb_to_image

NS = '/visual_tokens'
FRONT = f'{NS}/image_raw'
CHELSEA = skimage.data.chelsea()  # 300x451: a frame under the default 512 KB transport limit


@pytest.fixture(scope='module')
def node_client(tiny_model_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp('vlm_node_visual_tokens') / 'node.log'
    parameters = {'model': str(tiny_model_dir), 'cameras': ['front'], 'token_budget': 6, 'max_new_tokens': 2,
                  'max_image_age_s': 0.0, 'request_timeout_s': 120.0, 'publish_visual_tokens': True}
    with running_node(parameters, log_path, namespace=NS) as (_, client):
        overlays = client.collect(Image, f'{NS}/zip_vlm/visual_tokens/image')
        yield client, overlays


def test_an_overlay_per_result_with_the_source_header(node_client):
    client, overlays = node_client
    stamp = publish_frame(client, FRONT, rgb_to_image(CHELSEA), frame_id='front_optical')
    response = client.ask_many(['What is it?', 'What colour is it?'])
    assert response.success, response.message
    assert wait_until(lambda: len(overlays) >= 2, 30), f'{len(overlays)} overlays arrived'
    assert len(overlays) == len(response.results) == 2
    for overlay, result in zip(overlays, response.results):
        assert overlay.encoding == 'rgb8' and (overlay.height, overlay.width) == CHELSEA.shape[:2]
        assert stamp_tuple(overlay.header.stamp) == stamp_tuple(stamp) == stamp_tuple(result.header.stamp)
        assert overlay.header.frame_id == 'front_optical'
    pixels = image_to_rgb(overlays[0])
    # the frame dimmed outside what the tokens stand for: not the frame, and darker on the whole
    assert not np.array_equal(pixels, CHELSEA) and pixels.mean() < CHELSEA.mean()
    assert np.array_equal(pixels, image_to_rgb(overlays[1]))  # same frame, same tokens


def test_switched_off_at_runtime_no_overlay_is_published(node_client):
    client, overlays = node_client
    before = len(overlays)
    assert client.set_parameter('publish_visual_tokens', False) == (True, '')
    off_stamp = publish_frame(client, FRONT, rgb_to_image(CHELSEA))
    assert client.ask('What is it?').success
    assert client.set_parameter('publish_visual_tokens', True) == (True, '')
    on_stamp = publish_frame(client, FRONT, rgb_to_image(CHELSEA))
    assert client.ask('What is it?').success
    # one reliable publisher keeps its order: an overlay of the first frame would arrive before the second's
    assert wait_until(lambda: len(overlays) > before, 30)
    assert [stamp_tuple(overlay.header.stamp) for overlay in overlays[before:]] == [stamp_tuple(on_stamp)]
    assert stamp_tuple(off_stamp) != stamp_tuple(on_stamp)
