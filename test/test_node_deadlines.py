"""Request deadlines (request_timeout_s) in a vlm_node process: a request running past its deadline
is answered "timed out" and its late result discarded; one still waiting when its deadline passes
is dropped without running; the worker then moves on.

The node gets a short deadline, and the long request three long answers about a photo for which the
tiny checkpoint does not stop early (about 2500 tokens: over 2 s even on a fast idle CPU).
"""
import threading
import time

import skimage.data
from diagnostic_msgs.msg import DiagnosticArray
from std_msgs.msg import String

from node_helpers import running_node
from zip_vlm_ros.client import wait_until
from zip_vlm_ros.conversions import rgb_to_image

REQUEST_TIMEOUT_S = 0.5


def test_deadline_while_running_and_while_waiting(tiny_model_dir, tmp_path):
    parameters = {'model': str(tiny_model_dir), 'token_budget': 8, 'max_new_tokens': 1,
                  'request_timeout_s': REQUEST_TIMEOUT_S, 'max_pending_requests': 2}
    with running_node(parameters, tmp_path / 'node.log') as (process, client):
        answers = client.collect(String, '/zip_vlm/answer')
        diagnostics = client.collect(DiagnosticArray, '/diagnostics')
        coffee = rgb_to_image(skimage.data.coffee())
        time.sleep(1.0)  # topic subscriptions matched
        long_response = {}
        questions = ['Tell me everything.', 'Describe every object in detail.', 'And then?']
        long_call = threading.Thread(target=lambda: long_response.update(
            r=client.ask_many(questions, image=coffee, max_new_tokens=900, timeout_s=60)))
        long_call.start()
        time.sleep(0.2)
        started = time.monotonic()
        waiting = client.ask('And then?', image=coffee, timeout_s=60)
        waited_s = time.monotonic() - started
        long_call.join()
        running = long_response['r']
        assert not running.success and running.message.startswith('timed out after 0.5 s'), running.message
        assert 'during inference' in running.message
        assert not waiting.success and 'waiting in the queue' in waiting.message, waiting.message
        assert waited_s < REQUEST_TIMEOUT_S + 1.0, 'the caller waited past its deadline'

        # Once the long generation ends, the worker serves again (retry: each try has 0.5 s).
        deadline = time.monotonic() + 240
        while True:
            response = client.ask('Is it over?', image=coffee, timeout_s=60)
            if response.success or time.monotonic() > deadline:
                break
            assert 'timed out' in response.message, response.message
            time.sleep(0.5)
        assert response.success, response.message
        # ~/answer got only the answer that met its deadline; the late ones were discarded
        assert wait_until(lambda: answers, 10)
        time.sleep(0.5)
        assert [m.data for m in answers] == [response.result.text]

        def counters():
            return {kv.key: kv.value for kv in diagnostics[-1].status[0].values} if diagnostics else {}
        assert wait_until(lambda: int(counters().get('requests_late', 0)) >= 1, 10)
        assert int(counters()['requests_timed_out']) >= 2
        assert 'timed out' in process.log()
