"""Frame intake under request load, for the node benchmark: do the node's image subscriptions keep up
with six cameras at 10 Hz while requests arrive?

A node process with six cameras gets each camera's frames from this process (real DDS) while a caller
process (``python -m zip_vlm_ros.bench.frame_intake TARGET KIND SECONDS``) sends requests back to back
from a few threads: ``idle`` (none), ``refusals`` (an empty question, refused at once) or ``asks`` (a
question about one camera's frame, one new token). The streams start after the load and stop before
it, and the node's own /diagnostics counters (``camera.<name>.frames_received``, read before and after)
give the frames received per camera; over the frames published, that is the intake ratio.

Caller protocol: it prints ``{"ready": true}`` once the service answered, waits for a line on stdin,
calls for SECONDS and prints ``{"calls": N, "seconds": S}``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from typing import Any

CAMERAS = ('front', 'front_left', 'front_right', 'back', 'back_left', 'back_right')
RATE_HZ = 10.0
TARGET_RATIO = 0.95
LOADS = ('idle', 'refusals', 'asks')
CALLER_THREADS = 4
# The coffee photo at half size (200x300 rgb8, 180 kB): frames under Fast DDS's default 512 kB segment,
# so the row measures the node's intake, not the transport of large frames.
FRAME_STRIDE = 1


def _topic(namespace: str, index: int, camera: str) -> str:
    """The node's default topic of its `index`-th camera (parameters.camera_parameter_specs)."""
    return f'{namespace}/image_raw' if index == 0 else f'{namespace}/{camera}/image_raw'


def _received(diagnostics: list) -> dict[str, int]:
    values = {kv.key: kv.value for kv in diagnostics[-1].status[0].values}
    return {camera: int(values[f'camera.{camera}.frames_received']) for camera in CAMERAS}


def _next_diagnostics(diagnostics: list, timeout_s: float) -> None:
    """Wait for two more /diagnostics messages: the second was made after everything sent before the wait."""
    from zip_vlm_ros.client import wait_until

    seen = len(diagnostics)
    if not wait_until(lambda: len(diagnostics) >= seen + 2, timeout_s):
        raise RuntimeError('vlm_node stopped publishing /diagnostics')


def _start_caller(target: str, load: str, seconds: float, timeout_s: float) -> subprocess.Popen:
    caller = subprocess.Popen([sys.executable, '-m', 'zip_vlm_ros.bench.frame_intake', target, load, str(seconds)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = caller.stdout.readline()
    if not line or not json.loads(line).get('ready'):
        caller.kill()
        raise RuntimeError(f'the {load} caller did not come up within {timeout_s} s')
    return caller


def intake_under_load(client: Any, diagnostics: list, *, target: str, namespace: str, load: str,
                      stream_s: float, timeout_s: float) -> dict[str, float]:
    """Frames received / published per camera while `load` runs; the worst camera and the request rate."""
    import skimage.data

    from zip_vlm_ros.client import ImageStreamer
    from zip_vlm_ros.node.conversions import rgb_to_image

    frame = rgb_to_image(skimage.data.coffee()[::FRAME_STRIDE, ::FRAME_STRIDE].copy())
    _next_diagnostics(diagnostics, timeout_s)
    before = _received(diagnostics)
    caller = None
    if load != 'idle':
        # The caller runs a second longer than the streams on each side.
        caller = _start_caller(target, load, stream_s + 2.0, timeout_s)
        caller.stdin.write('go\n')
        caller.stdin.flush()
        time.sleep(1.0)
    streamers = [ImageStreamer(client, _topic(namespace, index, camera), [frame], rate_hz=RATE_HZ,
                               frame_id=camera) for index, camera in enumerate(CAMERAS)]
    time.sleep(stream_s)
    for streamer in streamers:
        streamer.stop()
    requests_per_s = 0.0
    if caller is not None:
        outcome = json.loads(caller.stdout.readline())
        caller.wait(timeout_s)
        requests_per_s = outcome['calls'] / outcome['seconds']
    _next_diagnostics(diagnostics, timeout_s)
    after = _received(diagnostics)
    ratios = {camera: (after[camera] - before[camera]) / streamer.published
              for camera, streamer in zip(CAMERAS, streamers)}
    worst = min(ratios, key=ratios.get)
    return {'ratio_min': ratios[worst], 'ratio_mean': sum(ratios.values()) / len(ratios), 'worst_camera': worst,
            'published_per_camera': min(streamer.published for streamer in streamers),
            'requests_per_s': requests_per_s}


def measure_frame_intake(model_dir: str, *, stream_s: float, log_path: Any, timeout_s: float) -> dict[str, dict]:
    """A six-camera node process; intake_under_load for each of LOADS. Returns {load: its results}."""
    from diagnostic_msgs.msg import DiagnosticArray

    from zip_vlm_ros.client import NodeProcess, VlmClient
    from zip_vlm_ros.srv import Ask

    namespace = '/bench_intake'
    # max_image_age_s 0: the asks use whatever frame is latest; a deep queue keeps asks from being refused
    parameters = {'model': model_dir, 'token_budget': 8, 'max_new_tokens': 1, 'cameras': list(CAMERAS),
                  'max_image_age_s': 0.0, 'max_pending_requests': 2 * CALLER_THREADS,
                  'request_timeout_s': timeout_s}
    node = NodeProcess(parameters, log_path, remaps={'__ns': namespace})
    results = {}
    try:
        with VlmClient(namespace + '/zip_vlm', client_name='bench_intake') as client:
            if not client.wait_for_service(Ask, '~/ask', timeout_s):
                raise RuntimeError(f'vlm_node did not come up within {timeout_s} s; log: {log_path}')
            diagnostics = client.collect(DiagnosticArray, '/diagnostics')
            # Not counted: the streams' publishers and the node's subscriptions discover each other.
            intake_under_load(client, diagnostics, target=namespace + '/zip_vlm', namespace=namespace,
                              load='idle', stream_s=1.5, timeout_s=timeout_s)
            for load in LOADS:
                results[load] = intake_under_load(client, diagnostics, target=namespace + '/zip_vlm',
                                                  namespace=namespace, load=load, stream_s=stream_s,
                                                  timeout_s=timeout_s)
    finally:
        exit_code = node.stop()
    if exit_code != 0:
        raise RuntimeError(f'vlm_node exited with {exit_code}; log: {log_path}')
    return results


def _call_until(client: Any, load: str, deadline_s: float, counts: list[int], index: int) -> None:
    question = '' if load == 'refusals' else 'What is in front?'
    while time.monotonic() < deadline_s:
        try:
            client.ask(question, 'front', max_new_tokens=1, timeout_s=10.0)
        except TimeoutError:
            continue
        counts[index] += 1


def main(argv: list[str] | None = None) -> int:
    """The caller process: requests of one kind from CALLER_THREADS threads (see the module docstring)."""
    parser = argparse.ArgumentParser(description='requests for the frame intake bench (started by it)')
    parser.add_argument('target', help='the vlm node, e.g. /bench_intake/zip_vlm')
    parser.add_argument('load', choices=LOADS[1:])
    parser.add_argument('seconds', type=float)
    args = parser.parse_args(argv)

    from zip_vlm_ros.client import VlmClient, wait_until_answered
    from zip_vlm_ros.srv import Ask

    with VlmClient(args.target, client_name='intake_caller') as client:
        if not wait_until_answered(client, Ask, '~/ask', Ask.Request(question=''), 60.0):
            return 1
        print(json.dumps({'ready': True}), flush=True)
        sys.stdin.readline()
        started = time.monotonic()
        counts = [0] * CALLER_THREADS
        threads = [threading.Thread(target=_call_until, args=(client, args.load, started + args.seconds, counts, index))
                   for index in range(CALLER_THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print(json.dumps({'calls': sum(counts), 'seconds': time.monotonic() - started}), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
