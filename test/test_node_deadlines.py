"""Request deadlines (request_timeout_s) in a vlm_node process: a request whose deadline passes during
inference is answered "timed out" at its deadline, and the engine stops within a decode step, so the
request behind it runs at once instead of timing out in the queue.

The long request asks ten questions with the longest answers the tiny checkpoint's context allows:
far more than 3 s of decoding even on a fast idle CPU.
"""
import threading
import time

import skimage.data
from diagnostic_msgs.msg import DiagnosticArray
from std_msgs.msg import String

from node_helpers import LONG_QUESTIONS, LONGEST_ANSWER, running_node, status_values
from zip_vlm_ros.client import wait_until
from zip_vlm_ros.node.conversions import rgb_to_image
from zip_vlm_ros.srv import Ask, AskMany

REQUEST_TIMEOUT_S = 3.0
# Generous on a loaded 2-core machine: DDS, the 0.1 s deadline check and one decode step fit easily.
SLACK_S = 1.5


def test_deadline_stops_inference_and_the_next_request_runs(tiny_model_dir, tmp_path):
    parameters = {'model': str(tiny_model_dir), 'token_budget': 8, 'max_new_tokens': 2,
                  'request_timeout_s': REQUEST_TIMEOUT_S, 'max_pending_requests': 2}
    with running_node(parameters, tmp_path / 'node.log') as (process, client):
        answers = client.collect(String, '/zip_vlm/answer')
        diagnostics = client.collect(DiagnosticArray, '/diagnostics')
        coffee = rgb_to_image(skimage.data.coffee())
        # both service clients discovered before the clock starts (the first call waits for that)
        assert client.wait_for_service(Ask, '~/ask', 30) and client.wait_for_service(AskMany, '~/ask_many', 30)
        long_outcome = {}

        def long_call():
            started = time.monotonic()
            long_outcome['response'] = client.ask_many(LONG_QUESTIONS, image=coffee, max_new_tokens=LONGEST_ANSWER,
                                                       timeout_s=60)
            long_outcome['seconds'] = time.monotonic() - started
        long_started = time.monotonic()
        long_thread = threading.Thread(target=long_call)
        long_thread.start()
        assert wait_until(lambda: status_values(diagnostics).get('running') == 'true', 30)
        # Queued 1.5 s after the long one, so it still has 1.5 s when the long one's deadline passes.
        time.sleep(max(0.0, long_started + 1.5 - time.monotonic()))
        next_started = time.monotonic()
        next_response = client.ask('Is it over?', image=coffee, timeout_s=60)
        next_seconds = time.monotonic() - next_started
        long_thread.join()

        running = long_outcome['response']
        assert not running.success, 'the long request should have run past its deadline'
        assert running.message.startswith('timed out after 3 s (request_timeout_s) during inference'), \
            running.message
        assert REQUEST_TIMEOUT_S - 0.2 <= long_outcome['seconds'] <= REQUEST_TIMEOUT_S + SLACK_S
        # the next request ran as soon as the long one was stopped, well within its own deadline
        assert next_response.success, next_response.message
        long_deadline_from_next_s = REQUEST_TIMEOUT_S - (next_started - long_started)
        assert next_seconds <= long_deadline_from_next_s + SLACK_S
        # only the answer that met its deadline was published
        assert wait_until(lambda: answers, 10)
        time.sleep(0.5)
        assert [m.data for m in answers] == [next_response.result.text]

        seen = len(diagnostics)
        assert wait_until(lambda: len(diagnostics) > seen, 10)
        values = status_values(diagnostics)
        assert int(values['requests_timed_out']) == 1 and int(values['requests_ok']) == 1
        # deadline to worker free: one decode step of the tiny model (milliseconds) plus scheduling
        assert float(values['stop_latency_p95_ms']) < 1000.0, values
        assert 'timed out' in process.log()
