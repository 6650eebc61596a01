"""The public ROS contract: generated interfaces import, and cross a real process boundary over DDS."""
import hashlib
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from skimage import data as skimage_data

from conftest import REPO_ROOT

VLM_RESULT_FIELDS = {
    'header': 'std_msgs/Header', 'camera': 'string', 'prompt': 'string', 'text': 'string',
    'model': 'string', 'reduction': 'string', 'token_budget': 'int32', 'visual_tokens': 'int32',
    'visual_tokens_full': 'int32', 'generated_tokens': 'int32', 'prefix_reused': 'boolean',
    'image_age_ms': 'float', 'vision_ms': 'float', 'reduction_ms': 'float', 'prefill_ms': 'float',
    'decode_ms': 'float', 'total_ms': 'float',
    'image_cameras': 'sequence<string>', 'image_stamps': 'sequence<builtin_interfaces/Time>',
    'image_labels': 'sequence<string>', 'image_visual_tokens': 'sequence<int32>',
}
# Several images: surround cameras, or a history of one camera.
IMAGE_SET_FIELDS = {'cameras': 'sequence<string>', 'history_frames': 'int32', 'history_s': 'float'}


def test_the_ask_action_has_the_ask_request_as_goal():
    from zip_vlm_ros.action import Ask as AskAction
    from zip_vlm_ros.srv import Ask

    assert AskAction.Goal.get_fields_and_field_types() == Ask.Request.get_fields_and_field_types()
    assert AskAction.Result.get_fields_and_field_types() == {
        'success': 'boolean', 'message': 'string', 'partial_text': 'string', 'partial_generated_tokens': 'int32',
        'partial_elapsed_ms': 'float', 'result': 'zip_vlm_ros/VlmResult'}
    assert AskAction.Feedback.get_fields_and_field_types() == {
        'text': 'string', 'delta': 'string', 'generated_tokens': 'int32', 'elapsed_ms': 'float'}


def test_generated_interfaces_have_the_public_fields():
    from zip_vlm_ros.msg import VlmResult
    from zip_vlm_ros.srv import Ask, AskMany, DescribeScene

    assert VlmResult.get_fields_and_field_types() == VLM_RESULT_FIELDS
    assert DescribeScene.Request.get_fields_and_field_types() == {
        'camera': 'string', **IMAGE_SET_FIELDS, 'token_budget': 'int32', 'max_new_tokens': 'int32',
        'prompt': 'string', 'reducer': 'string'}
    assert Ask.Request.get_fields_and_field_types() == {
        'question': 'string', 'camera': 'string', 'image': 'sensor_msgs/Image', **IMAGE_SET_FIELDS,
        'token_budget': 'int32', 'max_new_tokens': 'int32', 'reducer': 'string'}
    assert AskMany.Request.get_fields_and_field_types() == {
        'questions': 'sequence<string>', 'camera': 'string', 'image': 'sensor_msgs/Image', **IMAGE_SET_FIELDS,
        'token_budget': 'int32', 'max_new_tokens': 'int32', 'reducer': 'string'}
    for response in (Ask.Response, DescribeScene.Response):
        assert response.get_fields_and_field_types() == {
            'success': 'boolean', 'message': 'string', 'result': 'zip_vlm_ros/VlmResult'}
    assert AskMany.Response.get_fields_and_field_types() == {
        'success': 'boolean', 'message': 'string', 'results': 'sequence<zip_vlm_ros/VlmResult>'}


def test_sources_and_generated_code_are_one_package():
    import zip_vlm_ros
    import zip_vlm_ros.msg

    # The sources are used in place (edits need no reinstall) and msg/ comes from the build.
    assert pathlib.Path(zip_vlm_ros.__path__[0]).resolve() == REPO_ROOT / 'zip_vlm_ros'
    assert pathlib.Path(zip_vlm_ros.msg.__file__).resolve().parent.parent != REPO_ROOT / 'zip_vlm_ros'


@pytest.fixture(scope='module')
def peer():
    """The interface peer in its own process, on this run's ROS domain (set by conftest)."""
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / 'test' / 'interface_peer.py')],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout.readline().strip() == 'ready'
    yield process
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=20) == 0


@pytest.fixture(scope='module')
def client_node():
    import rclpy
    rclpy.init()
    node = rclpy.create_node('interface_test_client')
    yield node
    node.destroy_node()
    rclpy.shutdown()


def test_ask_with_an_image_between_processes(peer, client_node):
    import rclpy
    from sensor_msgs.msg import Image

    from zip_vlm_ros.srv import Ask

    pixels = np.ascontiguousarray(skimage_data.astronaut())  # 512x512 RGB, a real photograph
    image = Image(height=pixels.shape[0], width=pixels.shape[1], encoding='rgb8', is_bigendian=0,
                  step=pixels.shape[1] * 3, data=pixels.tobytes())
    image.header.frame_id = 'front_camera_optical'
    image.header.stamp.sec, image.header.stamp.nanosec = 1700000000, 123456789

    client = client_node.create_client(Ask, 'ask')
    assert client.wait_for_service(timeout_sec=30), 'the peer process never offered the ask service'
    request = Ask.Request(question='Is the door open?', camera='front', image=image,
                          token_budget=64, max_new_tokens=7)
    future = client.call_async(request)
    rclpy.spin_until_future_complete(client_node, future, timeout_sec=30)
    response = future.result()
    assert response is not None, 'no answer from the peer within 30 s'
    assert response.success
    assert response.message == '512x512 rgb8 step=1536'
    assert response.result.text == hashlib.sha256(pixels.tobytes()).hexdigest()
    assert response.result.header.frame_id == 'front_camera_optical'
    assert (response.result.header.stamp.sec, response.result.header.stamp.nanosec) == (1700000000, 123456789)
    assert (response.result.prompt, response.result.camera) == ('Is the door open?', 'front')
    assert (response.result.token_budget, response.result.visual_tokens) == (64, 7)


def test_vlm_result_topic_round_trip(peer, client_node):
    import rclpy

    from zip_vlm_ros.msg import VlmResult

    received = []
    client_node.create_subscription(VlmResult, 'results_out', received.append, 10)
    publisher = client_node.create_publisher(VlmResult, 'results_in', 10)
    sent = VlmResult(camera='rear', prompt='Describe the scene.', text='a road with two cars',
                     model='tiny', reduction='visionzip', token_budget=64, visual_tokens=64,
                     visual_tokens_full=576, generated_tokens=5, prefix_reused=True, image_age_ms=12.5,
                     vision_ms=1.5, reduction_ms=0.25, prefill_ms=3.0, decode_ms=4.0, total_ms=8.75)
    sent.header.frame_id = 'rear_camera'
    sent.header.stamp.sec = 42

    deadline = time.monotonic() + 30
    while not received and time.monotonic() < deadline:
        publisher.publish(sent)  # repeated until discovery has matched both directions
        rclpy.spin_once(client_node, timeout_sec=0.2)
    assert received, 'no VlmResult came back from the peer within 30 s'
    assert received[0] == sent
