"""vlm_node on the way down, in its own process: SIGINT and SIGTERM with one request running and
three queued answer all four callers with the reason and exit 0 with nothing alarming in the log; a
node restarted after SIGKILL serves. (Deactivate and the shutdown transition: test_node_lifecycle.py.)
"""
import signal

import pytest
import rclpy
import skimage.data
from action_msgs.msg import GoalStatus
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.context import Context
from rclpy.executors import MultiThreadedExecutor

from node_helpers import LoadedNode
from zip_vlm_ros.client import NodeProcess, VlmClient, wait_until
from zip_vlm_ros.node.conversions import rgb_to_image
from zip_vlm_ros.node.jobs import SHUTTING_DOWN_MESSAGE
from zip_vlm_ros.node.spinning import BackgroundSpinner
from zip_vlm_ros.node.vlm_node import VlmNode
from zip_vlm_ros.srv import Ask, AskMany

# Lines that must never appear in the log of a node going down (issue 9: aborts, destroyed handles).
ALARMS = ('Traceback', 'exception', 'Exception', 'terminate called', 'InvalidHandle', 'Destroyable')


def start_node(tiny_model_dir, log_path, **parameters):
    process = NodeProcess({'model': str(tiny_model_dir), 'token_budget': 8, 'max_new_tokens': 2,
                           'max_pending_requests': 3, 'request_timeout_s': 120.0,
                           'max_batch_size': 1,  # LoadedNode: one request runs while others wait
                           **parameters}, log_path)
    client = VlmClient()
    if not client.wait_for_service(Ask, '~/ask', 120):
        client.close()
        process.stop()
        pytest.fail(f'vlm_node did not start; log:\n{process.log()}')
    return process, client


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM], ids=['SIGINT', 'SIGTERM'])
def test_signal_with_requests_running_and_queued_answers_everyone_and_exits_0(tiny_model_dir, tmp_path, signum):
    process, client = start_node(tiny_model_dir, tmp_path / 'node.log')
    try:
        diagnostics = client.collect(DiagnosticArray, '/diagnostics')
        client.wait_for_service(AskMany, '~/ask_many', 60)
        load = LoadedNode(client, diagnostics)
        process.process.send_signal(signum)
        outcomes = load.responses()
        exit_code = process.process.wait(60)
    finally:
        client.close()
        process.stop()
    log = process.log()
    for response in outcomes:
        assert not isinstance(response, TimeoutError), f'a caller got no response; log:\n{log}'
        assert not response.success and 'the node is shutting down' in response.message, response.message
    assert exit_code == 0, log
    assert not [line for line in log.splitlines() if any(alarm in line for alarm in ALARMS)], log


def test_requests_arriving_after_the_signal_hear_that_the_node_is_shutting_down(tiny_model_dir):
    """Between the signal and the exit the executor still spins and answers: a request or goal that
    arrives then (after main() called close()) is refused with the shutdown reason, not 'not active'.
    In process, so the request certainly arrives after close(), as a goal racing SIGINT can."""
    coffee = rgb_to_image(skimage.data.coffee())
    context = Context()
    rclpy.init(args=['--ros-args', '-r', '__ns:=/closing', '-p', f'model:={tiny_model_dir}',
                     '-p', 'token_budget:=8', '-p', 'max_new_tokens:=2'], context=context)
    node = VlmNode(context=context)
    executor = MultiThreadedExecutor(num_threads=node.executor_threads, context=context)
    executor.add_node(node)
    spinner = BackgroundSpinner(executor)
    try:
        assert node.start()
        with VlmClient('/closing/zip_vlm', client_name='late_caller') as client:
            assert client.ask('What is this?', image=coffee, timeout_s=60).success
            assert client.wait_for_action(60)
            node.close()  # what main() does when SIGINT or SIGTERM arrives
            response = client.ask('What is this?', image=coffee, timeout_s=30)
            status, result, _ = client.ask_streamed('What is this?', image=coffee, timeout_s=30)
    finally:
        spinner.stop()
        node.destroy_node()
        rclpy.try_shutdown(context=context)
        context.destroy()
    assert not response.success and response.message == SHUTTING_DOWN_MESSAGE
    assert status == GoalStatus.STATUS_ABORTED and result.message == SHUTTING_DOWN_MESSAGE


def test_a_node_restarted_after_sigkill_serves(tiny_model_dir, tmp_path):
    """The same client throughout, as a robot's long-lived caller would be: after each SIGKILL it still
    lists the dead node's service for a while, and its calls go nowhere until the restarted node is
    up (each answered by the client's own timeout); then the new node serves. The killed process's
    Fast DDS shared-memory files stay in /dev/shm (README: fastdds shm clean) and do not get in the way."""
    coffee = rgb_to_image(skimage.data.coffee())
    parameters = {'model': str(tiny_model_dir), 'token_budget': 8, 'max_new_tokens': 2}
    with VlmClient() as client:
        for attempt in range(3):
            process = NodeProcess(parameters, tmp_path / f'node{attempt}.log')
            try:
                served = wait_until(lambda: _served(client, coffee), 180, interval_s=0.5)
                assert served, f'attempt {attempt}: the restarted node never answered; log:\n{process.log()}'
            finally:
                process.process.kill()
                process.process.wait()
                process.stop()


def _served(client, image) -> bool:
    try:
        return client.ask('What is this?', image=image, timeout_s=5).success
    except TimeoutError:
        return False
