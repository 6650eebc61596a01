"""vlm_node in its own process serving LLaVA-NeXT with `publish_visual_tokens`: the overlay of a wide frame
outlines the base image and every grid crop where the processor cut them, and a surround-view answer
publishes one overlay per image, each with its own camera's header."""
import json

import numpy as np
import pytest
import skimage.data
from sensor_msgs.msg import Image

from node_helpers import publish_frame, running_node, stamp_tuple
from zip_vlm_ros.client import wait_until
from zip_vlm_ros.engine.overlay import CROP_COLOUR
from zip_vlm_ros.models.anyres import anyres_crop_boxes
from zip_vlm_ros.node.conversions import image_to_rgb, rgb_to_image

NS = '/visual_tokens_next'
CHELSEA = skimage.data.chelsea()  # 300x451: a base image plus a grid on the tiny-next preset
ROCKET = skimage.data.rocket()    # 427x640


@pytest.fixture(scope='module')
def node_client(tiny_next_model_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp('vlm_node_visual_tokens_next') / 'node.log'
    parameters = {'model': str(tiny_next_model_dir), 'cameras': ['front', 'rear'], 'token_budget': 20,
                  'max_new_tokens': 2, 'max_image_age_s': 0.0, 'request_timeout_s': 120.0,
                  'publish_visual_tokens': True}
    with running_node(parameters, log_path, namespace=NS) as (_, client):
        overlays = client.collect(Image, f'{NS}/zip_vlm/visual_tokens/image')
        yield client, overlays


def _crop_boxes(model_dir, frame):
    config = json.loads((model_dir / 'config.json').read_text())
    crop = config['vision_config']['image_size']
    side = crop // config['vision_config']['patch_size']
    return anyres_crop_boxes(frame.shape[:2], config['image_grid_pinpoints'], crop, side)


def test_next_overlay_outlines_the_base_image_and_every_grid_crop(node_client, tiny_next_model_dir):
    client, overlays = node_client
    before = len(overlays)
    stamp = publish_frame(client, f'{NS}/image_raw', rgb_to_image(CHELSEA), frame_id='front_optical')
    response = client.ask('What is it?', 'front')
    assert response.success, response.message
    assert wait_until(lambda: len(overlays) > before, 30), 'no overlay arrived'
    overlay = overlays[before]
    assert (overlay.encoding, overlay.height, overlay.width) == ('rgb8', *CHELSEA.shape[:2])
    assert stamp_tuple(overlay.header.stamp) == stamp_tuple(stamp) and overlay.header.frame_id == 'front_optical'
    pixels = image_to_rgb(overlay)
    boxes = _crop_boxes(tiny_next_model_dir, CHELSEA)
    assert len(boxes) > 2  # a base image and a grid
    height, width = CHELSEA.shape[:2]
    for box in boxes:  # each crop's outline, clipped to the frame (drawn last, so exactly the crop colour)
        top, left = max(0, round(box.top)), max(0, round(box.left))
        bottom, right = min(height, round(box.top + box.height)), min(width, round(box.left + box.width))
        for row in (top, bottom - 1):
            assert (pixels[row, left:right] == CROP_COLOUR).all(), (box, row)
        for col in (left, right - 1):
            assert (pixels[top:bottom, col] == CROP_COLOUR).all(), (box, col)


def test_surround_answer_publishes_an_overlay_per_image_with_its_header(node_client):
    client, overlays = node_client
    front = publish_frame(client, f'{NS}/image_raw', rgb_to_image(CHELSEA), frame_id='front_optical')
    rear = publish_frame(client, f'{NS}/rear/image_raw', rgb_to_image(ROCKET), frame_id='rear_optical')
    before = len(overlays)
    response = client.ask('What is around?', cameras=['front', 'rear'])
    assert response.success, response.message
    assert wait_until(lambda: len(overlays) >= before + 2, 30), f'{len(overlays) - before} overlays arrived'
    arrived = overlays[before:]
    assert [(overlay.header.frame_id, stamp_tuple(overlay.header.stamp), overlay.height, overlay.width)
            for overlay in arrived] == [('front_optical', stamp_tuple(front), *CHELSEA.shape[:2]),
                                        ('rear_optical', stamp_tuple(rear), *ROCKET.shape[:2])]
    for overlay, frame in zip(arrived, (CHELSEA, ROCKET)):
        # multi-image answers read the base image only: its outline is the frame's border
        pixels = image_to_rgb(overlay)
        assert (pixels[0] == CROP_COLOUR).all() and (pixels[:, -1] == CROP_COLOUR).all()
        assert not np.array_equal(pixels, frame)
