"""Node benchmark: what vlm_node adds on top of the engine, measured side by side in one run.

    python -m zip_vlm_ros.bench.node_bench [--model DIR] [--requests 50]

1. Node overhead: a client calls ~/describe_scene on a node process (real DDS); overhead = the
   client's round trip minus the engine's own time (result.total_ms). Target p50 <= 5 ms.
2. Image callback cost per 1920x1080 rgb8 frame, timed in this process around the node's own
   subscription callback on messages that went through ROS serialization (as DDS delivers them).
   Target <= 1 ms: the callback only stores a reference. Shown next to it: the node's own counter
   while 1080p frames stream to it over DDS, and rclpy's deserialization of such a frame (done by
   the executor before any callback, not by the node).
3. Every caller answered: refusal latency, the round trip of the callers refused while 40 callers
   (each its own process, ``zip_vlm_ros.bench.burst_callers``) call ~/ask at once with max_pending_requests 4,
   target p95 <= 50 ms, next to the same bursts on a bare rclpy service that refuses at once;
   and cancel latency, from a request's deadline passing to the worker being free (the node's
   stop_latency diagnostics over requests that run past request_timeout_s), target p95 <= one decode
   step + 10 ms.
4. Streaming through ~/ask_action: time to first feedback (goal sent to first feedback received, in
   the client) minus the engine's own time to first token for that answer, target p50 <= 5 ms; and
   cancel latency as a caller sees it, cancel sent to result received for a goal mid-answer, target
   p95 <= one decode step + 50 ms.
5. Frame intake under request load (frame_intake.py): six cameras at 10 Hz into a node process while
   another process sends refusals or one-camera asks back to back; frames the node received over
   frames published, per camera (the worst one shown). Target >= 0.95 under every load.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Any

import numpy as np

from zip_vlm_ros.bench.frame_intake import TARGET_RATIO, measure_frame_intake

OVERHEAD_TARGET_MS = 5.0
CALLBACK_TARGET_US = 1000.0
REFUSAL_TARGET_MS = 50.0
CANCEL_SLACK_MS = 10.0  # cancel latency target: one decode step + this
FIRST_FEEDBACK_TARGET_MS = 5.0
GOAL_CANCEL_SLACK_MS = 50.0  # a caller's cancel-to-result target: one decode step + this
INTAKE_TARGET_RATIO = TARGET_RATIO  # frames received / published per camera, under request load
STREAMED_TOKENS = 16
# On the coffee photo at token_budget 8 the tiny checkpoint answers this without EOS: cancels always
# find it mid-answer.
LONG_STREAMED_QUESTION = 'And then?'
BURST_CALLERS = 40
CANCEL_DEADLINE_S = 2.0  # request_timeout_s of the reliability node
BARE_ASK = '/bench_bare/zip_vlm/ask'
# Ten questions about a photo for which the tiny checkpoint does not stop early: with the longest
# answers the context allows, inference runs far past any deadline used here.
LONG_QUESTIONS = ['Tell me everything.', 'Describe every object in detail.', 'And then?', 'What else?',
                  'Describe the colours.', 'Describe the light.', 'What is on the left?',
                  'What is on the right?', 'What is behind it?', 'Describe it again.']
FRAME_SHAPE = (1080, 1920, 3)
# Text tokens of the chat template and a short question, left beside the longest answers (the tiny
# checkpoint's template around LONG_QUESTIONS takes 14-23).
QUESTION_ROOM_TOKENS = 32


def _percentiles(values: list[float]) -> tuple[float, float]:
    return float(np.percentile(values, 50)), float(np.percentile(values, 95))


def _full_hd_frame() -> np.ndarray:
    """A real photo tiled up to 1920x1080 (uint8 RGB)."""
    import skimage.data
    return np.ascontiguousarray(np.resize(skimage.data.astronaut(), FRAME_SHAPE))


def measure_callback_in_process(frames: int) -> dict[str, float]:
    """Time VlmNode._on_image on `frames` 1080p messages that went through ROS serialization."""
    import rclpy
    from rclpy.context import Context
    from rclpy.serialization import deserialize_message, serialize_message
    from sensor_msgs.msg import Image

    from zip_vlm_ros.node.conversions import rgb_to_image
    from zip_vlm_ros.node.vlm_node import CameraFeed, VlmNode

    serialized = serialize_message(rgb_to_image(_full_hd_frame()))
    context = Context()
    # Own namespace, so that this in-process node is never mistaken for the node process.
    rclpy.init(args=['--ros-args', '-r', '__ns:=/node_bench_in_process', '-p', 'autostart:=false'],
               context=context)
    node = VlmNode(context=context)
    feed = CameraFeed('bench', 'image_raw', 'sensor_msgs/Image')
    callback_us, deserialize_ms = [], []
    try:
        for _ in range(frames):
            started = time.perf_counter()
            msg = deserialize_message(serialized, Image)
            deserialize_ms.append((time.perf_counter() - started) * 1e3)
            started = time.perf_counter()
            node._on_image(feed, msg)  # the subscription callback itself
            callback_us.append((time.perf_counter() - started) * 1e6)
            del msg  # the feed holds the only reference, as after a real callback
    finally:
        node.destroy_node()
        rclpy.shutdown(context=context)
        context.destroy()
    assert feed.received == frames
    callback_p50, callback_p95 = _percentiles(callback_us)
    return {'callback_us_p50': callback_p50, 'callback_us_p95': callback_p95,
            'callback_us_max': max(callback_us), 'deserialize_ms_p50': _percentiles(deserialize_ms)[0]}


def measure_visual_token_overlay(model_dir: str, results: int) -> dict[str, float]:
    """What ``publish_visual_tokens: true`` adds per result in the node's worker: drawing the overlay of a
    real answer's provenance on a 1080p frame and building its rgb8 Image (``visual_token_images``), beside
    that answer's engine time. Off, the node draws nothing (one parameter read)."""
    from zip_vlm_ros.engine import EngineConfig, VlmEngine
    from zip_vlm_ros.node.conversions import rgb_to_image, visual_token_images

    frame = _full_hd_frame()
    header = rgb_to_image(frame[:1, :1]).header
    engine = VlmEngine(EngineConfig(model=model_dir, device='cpu', max_new_tokens=1))
    try:
        output = engine.generate(frame, 'Describe the scene.', token_budget=8)
    finally:
        engine.close()
    overlay_ms = []
    for _ in range(results):
        started = time.perf_counter()
        images = visual_token_images(frame, header, [output])
        overlay_ms.append((time.perf_counter() - started) * 1e3)
    assert len(images) == 1
    p50, p95 = _percentiles(overlay_ms)
    return {'overlay_ms_p50': p50, 'overlay_ms_p95': p95, 'overlay_engine_ms': output.total_ms,
            'overlay_results': results}


def measure_node_process(model_dir: str, *, requests: int, stream_s: float, log_path: pathlib.Path,
                         timeout_s: float, streamed_goals: int) -> dict[str, float]:
    """Round trips and overhead of ~/describe_scene, ~/ask_action's first feedback and cancel
    (measure_streaming), then the node's callback counter under a 1080p stream at 10 Hz."""
    import skimage.data
    from diagnostic_msgs.msg import DiagnosticArray

    from zip_vlm_ros.client import ImageStreamer, NodeProcess, VlmClient, wait_until
    from zip_vlm_ros.node.conversions import rgb_to_image
    from zip_vlm_ros.srv import DescribeScene

    parameters = {'model': model_dir, 'token_budget': 8, 'max_new_tokens': 1, 'max_image_age_s': 0.0,
                  'request_timeout_s': timeout_s}
    node = NodeProcess(parameters, log_path, remaps={'__ns': '/bench'})
    client = VlmClient('/bench/zip_vlm', client_name='node_bench')
    try:
        if not client.wait_for_service(DescribeScene, '~/describe_scene', timeout_s):
            raise RuntimeError(f'vlm_node did not come up within {timeout_s} s; log: {log_path}')
        diagnostics = client.collect(DiagnosticArray, '/diagnostics')
        # One photo, published until the node has it: every request then reuses its prefix, so the
        # engine time is small and the overhead is not lost in its noise.
        photo = ImageStreamer(client, '/bench/image_raw', [rgb_to_image(skimage.data.coffee())], rate_hz=5)
        try:
            assert wait_until(lambda: client.describe(timeout_s=timeout_s).success, timeout_s, 0.5), \
                f'vlm_node never answered a describe; log: {log_path}'
        finally:
            photo.stop()
        round_trip_ms, engine_ms, response = _describe_round_trips(client, requests, timeout_s)
        overhead_ms = [total - engine for total, engine in zip(round_trip_ms, engine_ms)]
        streaming = measure_streaming(client, goals=streamed_goals, timeout_s=timeout_s,
                                      longest=_longest_answer(model_dir, response.result.visual_tokens_full))
        intake = _full_hd_intake(client, diagnostics, stream_s)
    finally:
        client.close()
        exit_code = node.stop()
    if exit_code != 0:
        raise RuntimeError(f'vlm_node exited with {exit_code}; log: {log_path}')
    round_trip = _percentiles(round_trip_ms)
    engine = _percentiles(engine_ms)
    overhead = _percentiles(overhead_ms)
    return {**streaming, 'round_trip_ms_p50': round_trip[0], 'round_trip_ms_p95': round_trip[1],
            'engine_ms_p50': engine[0], 'engine_ms_p95': engine[1],
            'overhead_ms_p50': overhead[0], 'overhead_ms_p95': overhead[1],
            **intake}


def _describe_round_trips(client, requests: int, timeout_s: float):
    """``(round trip ms, engine total ms, last response)`` of `requests` describes after 3 warm-up calls."""
    round_trip_ms, engine_ms = [], []
    for _ in range(3 + requests):
        started = time.perf_counter()
        response = client.describe(timeout_s=timeout_s)
        round_trip_ms.append((time.perf_counter() - started) * 1e3)
        if not response.success:
            raise RuntimeError(f'describe failed: {response.message}')
        engine_ms.append(response.result.total_ms)
    return round_trip_ms[3:], engine_ms[3:], response


def _full_hd_intake(client, diagnostics: list, stream_s: float) -> dict:
    """Frames the node received of a 1080p stream at 10 Hz for `stream_s`, and its image callback's cost,
    from its /diagnostics (`diagnostics`: the messages collected so far)."""
    from zip_vlm_ros.client import ImageStreamer
    from zip_vlm_ros.node.conversions import rgb_to_image

    time.sleep(1.5)  # a /diagnostics message from before the stream
    received_before = int({kv.key: kv.value for kv in diagnostics[-1].status[0].values}[
        'camera.front.frames_received'])
    full_hd = ImageStreamer(client, '/bench/image_raw', [rgb_to_image(_full_hd_frame())], rate_hz=10)
    time.sleep(stream_s)
    full_hd.stop()
    time.sleep(1.5)  # the next /diagnostics includes the last frames
    values = {kv.key: kv.value for kv in diagnostics[-1].status[0].values}
    return {'dds_frames_received': int(values['camera.front.frames_received']) - received_before,
            'dds_frames_published': full_hd.published,
            'dds_callback_us_p50': float(values['image_callback_p50_us']),
            'dds_callback_us_max': float(values['image_callback_max_us'])}


def _longest_answer(model_dir: str, visual_tokens_full: int) -> int:
    """The most new tokens a request with one of LONG_QUESTIONS may ask of this checkpoint: its context
    after a full image and the prompt's text (the engine refuses a request that does not fit)."""
    from transformers import AutoConfig

    from zip_vlm_ros.node.parameters import max_new_tokens_limit
    context = AutoConfig.from_pretrained(model_dir).text_config.max_position_embeddings
    return max_new_tokens_limit(context, visual_tokens_full) - QUESTION_ROOM_TOKENS


def measure_streaming(client: Any, *, goals: int, longest: int, timeout_s: float) -> dict[str, float]:
    """~/ask_action on the camera's frame (its prefix cached): first feedback minus engine TTFT over
    `goals` answers of STREAMED_TOKENS, then `goals` cancels of answers as long as the context allows."""
    from action_msgs.msg import GoalStatus

    from zip_vlm_ros.client import wait_until

    first_feedback_ms, ttft_ms, step_ms = [], [], []
    for _ in range(2 + goals):  # 2 warm-up goals
        status, result, goal = client.ask_streamed('Describe it.', max_new_tokens=STREAMED_TOKENS,
                                                   timeout_s=timeout_s)
        if status != GoalStatus.STATUS_SUCCEEDED or not goal.feedback:
            raise RuntimeError(f'a streamed answer failed ({status}): {result.message}')
        answer = result.result
        # The engine's TTFT: its total minus the decode after the first token.
        ttft_ms.append(answer.total_ms - answer.decode_ms)
        first_feedback_ms.append((goal.feedback[0][0] - goal.sent_s) * 1e3)
        step_ms.append(answer.decode_ms / max(1, answer.generated_tokens - 1))
    ttft_ms, first_feedback_ms = ttft_ms[2:], first_feedback_ms[2:]
    cancel_ms = []
    for _ in range(goals):
        goal = client.send_ask_goal(LONG_STREAMED_QUESTION, max_new_tokens=longest, timeout_s=timeout_s)
        if not wait_until(lambda: len(goal.feedback) >= 3, timeout_s):
            raise RuntimeError('a long streamed answer sent no feedback')
        cancelled_s = time.monotonic()
        goal.cancel(timeout_s)
        status, result = goal.result(timeout_s)
        if status != GoalStatus.STATUS_CANCELED:
            raise RuntimeError(f'a cancelled goal ended with status {status}: {result.message}')
        cancel_ms.append((goal.result_s - cancelled_s) * 1e3)
    overhead = _percentiles([feedback - ttft for feedback, ttft in zip(first_feedback_ms, ttft_ms)])
    cancel = _percentiles(cancel_ms)
    return {'streamed_goals': goals, 'first_feedback_ms_p50': _percentiles(first_feedback_ms)[0],
            'stream_ttft_ms_p50': _percentiles(ttft_ms)[0], 'first_feedback_overhead_ms_p50': overhead[0],
            'first_feedback_overhead_ms_p95': overhead[1], 'goal_cancel_ms_p50': cancel[0],
            'goal_cancel_ms_p95': cancel[1], 'stream_decode_step_ms': float(np.median(step_ms))}


# The floor for the refusal row: a bare rclpy service that refuses at once, in its own process, called
# by the same 40 callers in the same bursts (interleaved with the node's).
BARE_SERVICE = """
import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import QoSProfile
from zip_vlm_ros.srv import Ask

def refuse(request, response):
    response.success, response.message = False, 'refused'
    return response

rclpy.init()
node = Node('zip_vlm', namespace='/bench_bare')
node.create_service(Ask, '~/ask', refuse, qos_profile=QoSProfile(depth=100))
try:
    rclpy.spin(node)
except (KeyboardInterrupt, ExternalShutdownException):
    pass
"""


def measure_reliability(model_dir: str, *, bursts: int, cancels: int, log_path: pathlib.Path,
                        timeout_s: float) -> dict[str, float]:
    """Refusal latency in 40-caller bursts (next to a bare service's) and cancel latency, one node."""
    from zip_vlm_ros.bench.burst_callers import BurstCallers
    from zip_vlm_ros.client import NodeProcess, VlmClient

    parameters = {'model': model_dir, 'token_budget': 8, 'max_new_tokens': 8, 'max_pending_requests': 4,
                  'request_timeout_s': CANCEL_DEADLINE_S}
    node = NodeProcess(parameters, log_path, remaps={'__ns': '/bench_burst'})
    bare = subprocess.Popen([sys.executable, '-c', BARE_SERVICE])
    try:
        with BurstCallers('/bench_burst/zip_vlm', BURST_CALLERS, ['~/ask', BARE_ASK], timeout_s) as callers:
            results = _burst_refusals(callers, bursts)
        with VlmClient('/bench_burst/zip_vlm', client_name='bench_canceller', threads=2) as client:
            results.update(_cancel_latency(client, model_dir, cancels, timeout_s))
    finally:
        bare.send_signal(signal.SIGINT)
        bare.wait(30)
        exit_code = node.stop()
    if exit_code != 0:
        raise RuntimeError(f'vlm_node exited with {exit_code}; log: {log_path}')
    return results


def _burst_refusals(callers: Any, bursts: int) -> dict[str, float]:
    """All callers call ~/ask at once, then the bare service, `bursts` times; refused round trips.

    A caller unanswered after the callers' wait counts as lost (a slow answer on a loaded machine is not).
    """
    refusal_ms, bare_ms, lost = [], [], 0
    for _ in range(bursts):
        outcomes = callers.burst('~/ask')
        lost += sum(not outcome['answered'] for outcome in outcomes)
        refusal_ms += [outcome['ms'] for outcome in outcomes if outcome['answered'] and not outcome['success']]
        bare_ms += [outcome['ms'] for outcome in callers.burst(BARE_ASK) if outcome['answered']]
    nan = (float('nan'), float('nan'))
    refusal = _percentiles(refusal_ms) if refusal_ms else nan
    floor = _percentiles(bare_ms) if bare_ms else nan
    return {'refusal_ms_p50': refusal[0], 'refusal_ms_p95': refusal[1], 'refusals': len(refusal_ms),
            'bare_refusal_ms_p50': floor[0], 'bare_refusal_ms_p95': floor[1], 'burst_lost': lost,
            'bursts': bursts}


def _cancel_latency(client: Any, model_dir: str, cancels: int, timeout_s: float) -> dict[str, float]:
    """Requests that run past their deadline; the node times each stop (stop_latency diagnostics)."""
    import skimage.data
    from diagnostic_msgs.msg import DiagnosticArray

    from zip_vlm_ros.client import wait_until
    from zip_vlm_ros.node.conversions import rgb_to_image
    from zip_vlm_ros.srv import AskMany

    diagnostics = client.collect(DiagnosticArray, '/diagnostics')
    client.wait_for_service(AskMany, '~/ask_many', timeout_s)
    coffee = rgb_to_image(skimage.data.coffee())
    # A short answer, so that it ends well within the node's deadline even on a loaded machine.
    response = client.ask('Describe it.', image=coffee, max_new_tokens=8, timeout_s=timeout_s)
    if not response.success or response.result.generated_tokens < 2:
        raise RuntimeError(f'the decode-step request did not decode two tokens within the node\'s '
                           f'{CANCEL_DEADLINE_S} s deadline: {response.message or response.result.generated_tokens}')
    step = response.result
    longest = _longest_answer(model_dir, step.visual_tokens_full)
    for _ in range(cancels):
        client.ask_many(LONG_QUESTIONS, image=coffee, max_new_tokens=longest, timeout_s=timeout_s)
    seen = len(diagnostics)
    wait_until(lambda: len(diagnostics) > seen + 1, 10)
    values = {kv.key: kv.value for kv in diagnostics[-1].status[0].values}
    return {'cancels': cancels, 'decode_step_ms': step.decode_ms / max(1, step.generated_tokens - 1),
            'cancel_ms_p50': float(values['stop_latency_p50_ms']),
            'cancel_ms_p95': float(values['stop_latency_p95_ms'])}


def run_node_bench(model_dir: str | os.PathLike, *, requests: int = 50, callback_frames: int = 100,
                   stream_s: float = 5.0, bursts: int = 3, cancels: int = 8, streamed_goals: int = 20,
                   intake_s: float = 8.0, log_path: os.PathLike | None = None, timeout_s: float = 120.0) -> dict:
    """Measure the node's overhead and image callback cost (see the module docstring).

    Needs ROS_AUTOMATIC_DISCOVERY_RANGE / ROS_DOMAIN_ID set by the caller (main() does).
    Returns the measurements, the targets and pass flags:
        overhead_ms_p50/p95, round_trip_ms_p50/p95, engine_ms_p50/p95, callback_us_p50/p95/max,
        deserialize_ms_p50, dds_callback_us_p50/max, dds_frames_received/published,
        refusal_ms_p50/p95, refusals, burst_lost, cancel_ms_p50/p95, decode_step_ms,
        intake {load: frame_intake.intake_under_load's results} over `intake_s` of streaming per load,
        targets {'overhead_ms_p50', 'callback_us_p50', 'refusal_ms_p95', 'cancel_ms_p95', ...},
        passed {same keys: bool}.
    """
    from zip_vlm_ros.client import use_large_frames_profile

    use_large_frames_profile()
    log_path = pathlib.Path(log_path) if log_path else pathlib.Path(model_dir).parent / 'node_bench_vlm_node.log'
    results = measure_callback_in_process(callback_frames)
    results.update(measure_visual_token_overlay(str(model_dir), max(3, requests // 5)))
    results.update(measure_node_process(str(model_dir), requests=requests, stream_s=stream_s,
                                        log_path=log_path, timeout_s=timeout_s, streamed_goals=streamed_goals))
    results.update(measure_reliability(str(model_dir), bursts=bursts, cancels=cancels,
                                       log_path=log_path.with_name('node_bench_burst_vlm_node.log'),
                                       timeout_s=timeout_s))
    results['intake'] = measure_frame_intake(str(model_dir), stream_s=intake_s, timeout_s=timeout_s,
                                             log_path=log_path.with_name('node_bench_intake_vlm_node.log'))
    worst_intake = min(intake['ratio_min'] for load, intake in results['intake'].items() if load != 'idle')
    cancel_target_ms = results['decode_step_ms'] + CANCEL_SLACK_MS
    goal_cancel_target_ms = results['stream_decode_step_ms'] + GOAL_CANCEL_SLACK_MS
    results['targets'] = {'overhead_ms_p50': OVERHEAD_TARGET_MS, 'callback_us_p50': CALLBACK_TARGET_US,
                          'refusal_ms_p95': REFUSAL_TARGET_MS, 'cancel_ms_p95': cancel_target_ms,
                          'first_feedback_overhead_ms_p50': FIRST_FEEDBACK_TARGET_MS,
                          'goal_cancel_ms_p95': goal_cancel_target_ms, 'intake_ratio_min': INTAKE_TARGET_RATIO}
    results['passed'] = {'overhead_ms_p50': results['overhead_ms_p50'] <= OVERHEAD_TARGET_MS,
                         'callback_us_p50': results['callback_us_p50'] <= CALLBACK_TARGET_US,
                         # a lost caller fails the row whatever the latency of the others
                         'refusal_ms_p95': results['refusal_ms_p95'] <= REFUSAL_TARGET_MS
                         and results['burst_lost'] == 0,
                         'cancel_ms_p95': results['cancel_ms_p95'] <= cancel_target_ms,
                         'first_feedback_overhead_ms_p50':
                             results['first_feedback_overhead_ms_p50'] <= FIRST_FEEDBACK_TARGET_MS,
                         'goal_cancel_ms_p95': results['goal_cancel_ms_p95'] <= goal_cancel_target_ms,
                         'intake_ratio_min': worst_intake >= INTAKE_TARGET_RATIO}
    results['requests'], results['callback_frames'] = requests, callback_frames
    return results


def format_report(results: dict) -> str:
    verdict = {True: 'PASS', False: 'MISS'}
    rows = [
        ('measure', 'p50', 'p95', 'target', ''),
        (f'service round trip, describe ({results["requests"]} calls)',
         f'{results["round_trip_ms_p50"]:.2f} ms', f'{results["round_trip_ms_p95"]:.2f} ms', '', ''),
        ('engine time (result.total_ms)', f'{results["engine_ms_p50"]:.2f} ms',
         f'{results["engine_ms_p95"]:.2f} ms', '', ''),
        ('node overhead = round trip - engine', f'{results["overhead_ms_p50"]:.2f} ms',
         f'{results["overhead_ms_p95"]:.2f} ms', f'p50 <= {OVERHEAD_TARGET_MS:g} ms',
         verdict[results['passed']['overhead_ms_p50']]),
        (f'image callback, 1920x1080 rgb8 ({results["callback_frames"]} frames)',
         f'{results["callback_us_p50"]:.0f} us', f'{results["callback_us_p95"]:.0f} us',
         f'p50 <= {CALLBACK_TARGET_US:g} us', verdict[results['passed']['callback_us_p50']]),
        ('  same, node counter under a 10 Hz DDS stream', f'{results["dds_callback_us_p50"]:.0f} us',
         f'max {results["dds_callback_us_max"]:.0f} us', '', 'info'),
        (f'publish_visual_tokens on: overlay per result, 1920x1080 ({results["overlay_results"]} results)',
         f'{results["overlay_ms_p50"]:.1f} ms', f'{results["overlay_ms_p95"]:.1f} ms',
         f'engine {results["overlay_engine_ms"]:.0f} ms', 'info'),
        ('  rclpy deserialization before the callback', f'{results["deserialize_ms_p50"]:.2f} ms', '', '',
         'info'),
        ('  1080p frames received / published over DDS', str(results['dds_frames_received']),
         str(results['dds_frames_published']), '', 'info'),
        (f'refusal round trip, {BURST_CALLERS}-caller bursts ({results["refusals"]} refused)',
         f'{results["refusal_ms_p50"]:.1f} ms', f'{results["refusal_ms_p95"]:.1f} ms',
         f'p95 <= {REFUSAL_TARGET_MS:g} ms', verdict[results['passed']['refusal_ms_p95']]),
        (f'  callers without a response in 30 s ({results["bursts"]} bursts)', str(results['burst_lost']), '',
         '0', 'info'),
        ('  same bursts, bare rclpy service refusing at once', f'{results["bare_refusal_ms_p50"]:.1f} ms',
         f'{results["bare_refusal_ms_p95"]:.1f} ms', '', 'info'),
        (f'cancel latency, deadline to worker free ({results["cancels"]} requests)',
         f'{results["cancel_ms_p50"]:.1f} ms', f'{results["cancel_ms_p95"]:.1f} ms',
         f'p95 <= {results["targets"]["cancel_ms_p95"]:.1f} ms', verdict[results['passed']['cancel_ms_p95']]),
        ('  one decode step (tiny checkpoint)', f'{results["decode_step_ms"]:.1f} ms', '', '', 'info'),
        (f'action: first feedback - engine TTFT ({results["streamed_goals"]} goals)',
         f'{results["first_feedback_overhead_ms_p50"]:.2f} ms', f'{results["first_feedback_overhead_ms_p95"]:.2f} ms',
         f'p50 <= {FIRST_FEEDBACK_TARGET_MS:g} ms', verdict[results['passed']['first_feedback_overhead_ms_p50']]),
        ('  goal sent to first feedback / engine TTFT', f'{results["first_feedback_ms_p50"]:.2f} ms',
         f'{results["stream_ttft_ms_p50"]:.2f} ms', '', 'info'),
        (f'action: cancel sent to result received ({results["streamed_goals"]} goals)',
         f'{results["goal_cancel_ms_p50"]:.1f} ms', f'{results["goal_cancel_ms_p95"]:.1f} ms',
         f'p95 <= {results["targets"]["goal_cancel_ms_p95"]:.1f} ms',
         verdict[results['passed']['goal_cancel_ms_p95']]),
        ('  one decode step while streaming', f'{results["stream_decode_step_ms"]:.1f} ms', '', '', 'info'),
        *_intake_rows(results, verdict),
    ]
    widths = [max(len(row[index]) for row in rows) for index in range(5)]
    lines = ['  '.join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, '  '.join('-' * width for width in widths))
    return '\n'.join(lines)


def _intake_rows(results: dict, verdict: dict) -> list[tuple[str, ...]]:
    """Frames received / published per camera under each load: the worst camera, and the mean."""
    rows = []
    for load, intake in results['intake'].items():
        rate = f', {intake["requests_per_s"]:.0f} requests/s' if load != 'idle' else ''
        passed = intake['ratio_min'] >= INTAKE_TARGET_RATIO
        rows.append((f'frames received / published, 6 cameras at 10 Hz, {load}{rate}',
                     f'min {intake["ratio_min"]:.3f}', f'mean {intake["ratio_mean"]:.3f}',
                     f'>= {INTAKE_TARGET_RATIO:g}', verdict[passed] if load != 'idle' else 'info'))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='vlm_bench --node', description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', help='checkpoint dir (default: the tiny offline checkpoint)')
    parser.add_argument('--cache-dir', type=pathlib.Path,
                        default=pathlib.Path(os.environ.get('XDG_CACHE_HOME') or pathlib.Path.home() / '.cache')
                        / 'zip_vlm_ros', help='where the tiny checkpoint and the node log go')
    parser.add_argument('--requests', type=int, default=50, help='describe calls timed (default: 50)')
    parser.add_argument('--callback-frames', type=int, default=100,
                        help='1080p frames through the callback (default: 100)')
    parser.add_argument('--bursts', type=int, default=3, help=f'{BURST_CALLERS}-caller bursts (default: 3)')
    parser.add_argument('--cancels', type=int, default=8,
                        help='requests run past their deadline for the cancel latency (default: 8)')
    parser.add_argument('--goals', type=int, default=20,
                        help='~/ask_action goals streamed, and cancelled, for the action rows (default: 20)')
    parser.add_argument('--intake-s', type=float, default=8.0,
                        help='seconds of six 10 Hz camera streams per load for the frame intake rows (default: 8)')
    parser.add_argument('--domain-id', type=int, help='ROS_DOMAIN_ID (default: random in 1..101)')
    args = parser.parse_args(argv)

    from zip_vlm_ros.client import use_local_ros_domain
    use_local_ros_domain(args.domain_id)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        import transformers

        from zip_vlm_ros.tools.tiny_model import build_checkpoint
        transformers.utils.logging.disable_progress_bar()
        model = str(build_checkpoint(args.cache_dir / 'tiny', preset='tiny'))
    results = run_node_bench(model, requests=args.requests, callback_frames=args.callback_frames,
                             bursts=args.bursts, cancels=args.cancels, streamed_goals=args.goals,
                             intake_s=args.intake_s,
                             log_path=args.cache_dir / 'node_bench_vlm_node.log')
    print(f'vlm_node overhead and image callback cost (model: {model})')
    print(format_report(results))
    return 0


if __name__ == '__main__':
    sys.exit(main())
