"""Shared by the node tests: start vlm_node as a process, publish frames to it, read its log."""
from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import skimage.data

from zip_vlm_ros.client import NodeProcess, VlmClient, use_large_frames_profile, wait_until
from zip_vlm_ros.node.conversions import rgb_to_image
from zip_vlm_ros.bench.node_bench import LONG_QUESTIONS, QUESTION_ROOM_TOKENS  # noqa: F401  (tests import LONG_QUESTIONS here)
from diagnostic_msgs.msg import DiagnosticArray

from zip_vlm_ros.srv import DescribeScene

# Raw frames over 512 KB need it (config/fastdds_large_frames.xml); set before any client exists.
use_large_frames_profile()

# Generous: on the 2-core CI machine a node start (imports + tiny model) can take tens of seconds.
STARTUP_TIMEOUT_S = 120.0


@contextlib.contextmanager
def running_node(parameters: dict[str, Any], log_path, *, namespace: str = '', wait_for: Any = DescribeScene,
                 service: str = '~/describe_scene', **process_kwargs: Any):
    """Start vlm_node, yield (process, client) once `service` is up, stop it and check exit status 0."""
    remaps = dict(process_kwargs.pop('remaps', {}))
    if namespace:
        remaps['__ns'] = namespace
    process = NodeProcess(parameters, log_path, remaps=remaps, **process_kwargs)
    client = VlmClient(f'{namespace}/zip_vlm')
    try:
        if not client.wait_for_service(wait_for, service, STARTUP_TIMEOUT_S):
            pytest.fail(f'vlm_node did not offer {service} within {STARTUP_TIMEOUT_S} s; '
                        f'alive={process.alive()}; log:\n{process.log()}')
        yield process, client
    finally:
        client.close()
        exit_code = process.stop()
    assert exit_code == 0, f'vlm_node exited with {exit_code} on SIGINT; log:\n{process.log()}'
    # rclpy prints this for a callback that failed on a destroyed handle during shutdown
    assert 'exception was never retrieved' not in process.log(), process.log()


_matched: set = set()


def publish_frame(client: VlmClient, topic: str, msg: Any, *, reliable: bool = True,
                  stamp: Any = None, frame_id: str = 'camera_optical') -> Any:
    """Publish one frame once the node's subscription is matched; returns the stamp it carries."""
    publisher = client.publisher(type(msg), topic, reliable=reliable)
    if publisher not in _matched:
        assert wait_until(lambda: publisher.get_subscription_count() > 0, 30), f'nobody subscribes to {topic}'
        # The writer has seen the reader; give the reader a moment to see the writer too, or it
        # drops the first sample.
        time.sleep(1.0)
        _matched.add(publisher)
    msg.header.stamp = stamp if stamp is not None else client.now().to_msg()
    msg.header.frame_id = frame_id
    publisher.publish(msg)
    time.sleep(0.5)  # shared-memory delivery takes ms; the tests then check the stamp they get back
    return msg.header.stamp


def stamp_tuple(stamp: Any) -> tuple[int, int]:
    return stamp.sec, stamp.nanosec


def status_values(diagnostics: list) -> dict[str, str]:
    """Key/values of the node's latest /diagnostics status (empty before the first)."""
    return {kv.key: kv.value for kv in diagnostics[-1].status[0].values} if diagnostics else {}


# With the longest answers the context allows, LONG_QUESTIONS keep the tiny checkpoint decoding far
# longer than any test waits: the job is certainly still running when the test deactivates, signals
# or times it out.
LONGEST_ANSWER = 1024 - 16 - QUESTION_ROOM_TOKENS  # tiny preset: context 1024 minus 16 visual tokens and the text


class LoadedNode:
    """One long request running and `queued` short ones waiting in a node (max_batch_size 1), each call
    in its own thread.

    Starts the long call, waits until the node's diagnostics say it runs, then starts the others and
    waits until the node reports them all queued. `responses()` joins the calls.
    """

    def __init__(self, client: VlmClient, diagnostics: list, *, queued: int = 3, timeout_s: float = 60.0):
        self.outcomes: list = [None] * (1 + queued)
        coffee = rgb_to_image(skimage.data.coffee())
        self._threads = [threading.Thread(target=self._call, args=(0, lambda: client.ask_many(
            LONG_QUESTIONS, image=coffee, max_new_tokens=LONGEST_ANSWER, timeout_s=timeout_s)))]
        for index in range(1, 1 + queued):
            self._threads.append(threading.Thread(target=self._call, args=(index, lambda: client.ask(
                'What is this?', image=coffee, max_new_tokens=2, timeout_s=timeout_s))))
        self._threads[0].start()
        assert wait_until(lambda: status_values(diagnostics).get('running') == 'true', 30), \
            f'the long request never ran: {status_values(diagnostics)}'
        for thread in self._threads[1:]:
            thread.start()
        assert wait_until(lambda: status_values(diagnostics).get('queue_depth') == str(queued), 30), \
            f'the short requests were not queued: {status_values(diagnostics)}'
        assert status_values(diagnostics).get('running') == 'true'

    def _call(self, index: int, call: Any) -> None:
        try:
            self.outcomes[index] = call()
        except TimeoutError as error:
            self.outcomes[index] = error

    def responses(self, timeout_s: float = 60.0) -> list:
        for thread in self._threads:
            thread.join(timeout_s)
        return self.outcomes


def assert_a_leaving_client_frees_the_worker(client: VlmClient, script: str, within_s: float) -> None:
    """Run `script`, a client process that leaves while its long request runs, and check that the node
    cancels the job (no client of it left), frees the worker within `within_s` and serves again."""
    diagnostics = client.collect(DiagnosticArray, '/diagnostics')
    assert wait_until(lambda: status_values(diagnostics), 10)
    cancelled_before = int(status_values(diagnostics)['requests_cancelled'])
    started = time.monotonic()
    subprocess.run([sys.executable, '-c', script], check=True, timeout=120)
    assert wait_until(lambda: int(status_values(diagnostics)['requests_cancelled']) > cancelled_before
                      and status_values(diagnostics)['running'] == 'false', 30), status_values(diagnostics)
    assert time.monotonic() - started < within_s
    assert client.ask('Still there?', image=rgb_to_image(skimage.data.coffee()), max_new_tokens=2,
                      timeout_s=30).success
