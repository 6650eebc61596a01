"""vlm_node's lifecycle and startup failures, each in a real process.

The module's node starts with autostart:=false, so the tests drive every transition through the
lifecycle services.
"""
import re
import subprocess
import sys
import time

import pytest
import skimage.data
import torch
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from lifecycle_msgs.msg import State, Transition
from lifecycle_msgs.srv import ChangeState, GetState
from rclpy.event_handler import PublisherEventCallbacks
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image

from node_helpers import LoadedNode, publish_frame, running_node
from zip_vlm_ros.client import wait_until
from zip_vlm_ros.node.conversions import rgb_to_image
from zip_vlm_ros.srv import DescribeScene

FRONT = '/image_raw'


@pytest.fixture(scope='module')
def managed(tiny_model_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp('vlm_lifecycle') / 'node.log'
    parameters = {
        'model': str(tiny_model_dir), 'autostart': False, 'token_budget': 8, 'max_new_tokens': 4,
        'request_timeout_s': 120.0, 'max_image_age_s': 0.0, 'max_pending_requests': 3,
        'image_qos': 'reliable', 'max_batch_size': 1,  # LoadedNode: one request runs while others wait
    }
    with running_node(parameters, log_path, wait_for=GetState, service='~/get_state') as (process, client):
        client.diagnostics = client.collect(DiagnosticArray, '/diagnostics')
        yield process, client


@pytest.fixture(scope='module')
def client(managed):
    return managed[1]


def state(client):
    return client.call(GetState, '~/get_state', GetState.Request()).current_state.id


def transition(client, transition_id):
    request = ChangeState.Request(transition=Transition(id=transition_id))
    return client.call(ChangeState, '~/change_state', request, timeout_s=120).success


def fresh_status(client):
    """The node's next /diagnostics status (published after this call)."""
    seen = len(client.diagnostics)
    assert wait_until(lambda: len(client.diagnostics) > seen, 10), 'no /diagnostics within 10 s'
    return client.diagnostics[-1].status[0]


def test_starts_unconfigured_with_error_diagnostics(client):
    assert state(client) == State.PRIMARY_STATE_UNCONFIGURED
    status = fresh_status(client)
    assert status.name == 'zip_vlm: vlm'
    assert status.level == DiagnosticStatus.ERROR and 'model not loaded' in status.message
    assert not client.wait_for_service(DescribeScene, '~/describe_scene', 1.0)


def test_a_failed_configure_is_corrected_through_parameters(managed, client, tiny_model_dir, tmp_path):
    """model/device/dtype are settable while unconfigured: no restart after a wrong path."""
    missing = str(tmp_path / 'no_such_checkpoint')
    assert client.set_parameter('model', missing) == (True, '')
    assert not transition(client, Transition.TRANSITION_CONFIGURE)
    assert state(client) == State.PRIMARY_STATE_UNCONFIGURED
    assert wait_until(lambda: f'configure failed: model path {missing!r} does not exist' in managed[0].log(), 10)
    successful, reason = client.set_parameter('dtype', 'float64')
    assert not successful and 'float64' in reason, reason
    assert client.set_parameter('model', str(tiny_model_dir)) == (True, '')
    assert client.set_parameter('device', 'cpu') == (True, '')


def test_configure_then_activate_serves(client):
    assert transition(client, Transition.TRANSITION_CONFIGURE)
    assert state(client) == State.PRIMARY_STATE_INACTIVE
    status = fresh_status(client)
    assert status.level == DiagnosticStatus.ERROR and 'not serving' in status.message
    assert transition(client, Transition.TRANSITION_ACTIVATE)
    assert state(client) == State.PRIMARY_STATE_ACTIVE
    assert client.wait_for_service(DescribeScene, '~/describe_scene', 30)
    publish_frame(client, FRONT, rgb_to_image(skimage.data.astronaut()))  # reliable, as image_qos
    response = client.describe()
    assert response.success, response.message
    # image_qos reliable: a best-effort publisher cannot match (DDS offers less than requested)
    incompatible = []
    best_effort = client.node.create_publisher(
        Image, FRONT, qos_profile_sensor_data,
        event_callbacks=PublisherEventCallbacks(incompatible_qos=incompatible.append))
    time.sleep(2.0)
    assert best_effort.get_subscription_count() == 0 and incompatible
    client.node.destroy_publisher(best_effort)
    values = {kv.key: kv.value for kv in fresh_status(client).values}
    assert values['lifecycle_state'] == 'active' and values['visual_tokens_full'] == '16'


def assert_answered_with(outcomes, reason):
    assert len(outcomes) == 4
    for response in outcomes:
        assert not isinstance(response, TimeoutError), f'a caller got no response: {response}'
        assert not response.success and reason in response.message, response.message


def test_deactivate_with_requests_running_and_queued_answers_every_caller(client):
    load = LoadedNode(client, client.diagnostics)
    started = time.monotonic()
    assert transition(client, Transition.TRANSITION_DEACTIVATE)
    assert state(client) == State.PRIMARY_STATE_INACTIVE  # the lifecycle services keep answering
    assert_answered_with(load.responses(), 'the node was deactivated')
    assert time.monotonic() - started < 20, 'callers waited for the long inference'
    # the services stay and refuse at once while inactive
    coffee = rgb_to_image(skimage.data.coffee())
    refused = client.ask('Still there?', image=coffee, timeout_s=10)
    assert not refused.success and 'not active' in refused.message
    values = {kv.key: kv.value for kv in fresh_status(client).values}
    assert values['running'] == 'false' and int(values['requests_cancelled']) == 4
    assert transition(client, Transition.TRANSITION_ACTIVATE)
    response = client.ask('Still there?', image=coffee, timeout_s=60)
    assert response.success, response.message


def test_deactivate_keeps_services_refusing_and_cleanup_frees_the_model(client):
    assert transition(client, Transition.TRANSITION_DEACTIVATE)
    assert state(client) == State.PRIMARY_STATE_INACTIVE
    response = client.describe(timeout_s=10)
    assert not response.success and 'not active' in response.message
    assert transition(client, Transition.TRANSITION_CLEANUP)
    assert state(client) == State.PRIMARY_STATE_UNCONFIGURED
    status = fresh_status(client)
    assert status.level == DiagnosticStatus.ERROR and 'model not loaded' in status.message


def test_configure_again_after_cleanup(managed, client):
    assert transition(client, Transition.TRANSITION_CONFIGURE)
    assert transition(client, Transition.TRANSITION_ACTIVATE)
    assert client.wait_for_service(DescribeScene, '~/describe_scene', 30)
    publish_frame(client, FRONT, rgb_to_image(skimage.data.rocket()))
    response = client.describe()
    assert response.success, response.message
    assert managed[0].log().count('model released') == 1


def test_shutdown_transition_with_requests_running_and_queued_answers_every_caller(client):
    load = LoadedNode(client, client.diagnostics)
    assert transition(client, Transition.TRANSITION_ACTIVE_SHUTDOWN)
    assert state(client) == State.PRIMARY_STATE_FINALIZED
    assert_answered_with(load.responses(), 'the node was deactivated')


def run_failing_node(parameters, tmp_path):
    """Start vlm_node (autostart) and wait for it to exit; returns (exit status, its output lines)."""
    command = [sys.executable, '-m', 'zip_vlm_ros.node.vlm_node', '--ros-args']
    for name, value in parameters.items():
        command += ['-p', f'{name}:={value}']
    completed = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    lines = [line for line in (completed.stdout + completed.stderr).splitlines() if line.strip()]
    return completed.returncode, lines


def assert_one_clear_line(lines, *words):
    assert len(lines) == 1, 'expected one line, got:\n' + '\n'.join(lines)
    assert 'Traceback' not in lines[0]
    for word in words:
        assert word in lines[0], f'{word!r} not in {lines[0]!r}'


def test_missing_model_exits_1_with_one_line(tmp_path):
    missing = tmp_path / 'no_such_checkpoint'
    code, lines = run_failing_node({'model': str(missing)}, tmp_path)
    assert code == 1
    assert_one_clear_line(lines, 'configure failed', str(missing))


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has CUDA; the failure needs its absence')
def test_cuda_without_cuda_exits_1_with_one_line(tiny_model_dir, tmp_path):
    code, lines = run_failing_node({'model': str(tiny_model_dir), 'device': 'cuda'}, tmp_path)
    assert code == 1
    assert_one_clear_line(lines, 'configure failed')
    assert re.search('cuda', lines[0], re.IGNORECASE)


def test_budget_above_the_model_exits_1_with_one_line(tiny_model_dir, tmp_path):
    code, lines = run_failing_node({'model': str(tiny_model_dir), 'token_budget': 64}, tmp_path)
    assert code == 1
    assert_one_clear_line(lines, 'configure failed', 'token_budget 64 is out of range', '1..16')


def test_bad_camera_list_exits_1_with_one_line(tmp_path):
    code, lines = run_failing_node({'cameras': '[front, 2nd]'}, tmp_path)
    assert code == 1
    assert_one_clear_line(lines, 'bad parameter', "'2nd'")


def test_params_file_limits_are_checked_at_startup(tiny_model_dir, tmp_path):
    """The set-time checks apply to the params file too: no node that fails every describe_scene."""
    params_file = tmp_path / 'vlm.yaml'
    params_file.write_text('/**:\n  ros__parameters:\n    question_max_chars: 20\n'
                           '    describe_prompt: Describe the whole scene in great detail.\n')
    command = [sys.executable, '-m', 'zip_vlm_ros.node.vlm_node', '--ros-args', '--params-file', str(params_file),
               '-p', f'model:={tiny_model_dir}', '-p', 'token_budget:=8']
    completed = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    lines = [line for line in (completed.stdout + completed.stderr).splitlines() if line.strip()]
    assert completed.returncode == 1
    assert_one_clear_line(lines, 'configure failed', 'describe_prompt is 41 characters', 'question_max_chars = 20')


def test_max_new_tokens_beyond_the_context_exits_1_with_one_line(tiny_model_dir, tmp_path):
    code, lines = run_failing_node({'model': str(tiny_model_dir), 'token_budget': 8, 'max_new_tokens': 10**9},
                                   tmp_path)
    assert code == 1
    assert_one_clear_line(lines, 'configure failed', f'max_new_tokens {10**9}', 'use 1..1008')


@pytest.mark.parametrize('parameter, words', [
    ('cameras:=[]', ['bad parameter', 'cameras is empty', 'e.g. [front]']),
    ('max_new_tokens:=many', ['max_new_tokens must be a whole number', "got 'many' (str)"]),
])
def test_empty_camera_list_and_wrong_types_are_said_in_words(tmp_path, parameter, words):
    name, _, value = parameter.partition(':=')
    code, lines = run_failing_node({name: value}, tmp_path)
    assert code == 1
    assert_one_clear_line(lines, *words)
