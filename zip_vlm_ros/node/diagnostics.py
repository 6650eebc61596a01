"""vlm_node's /diagnostics status, built from its state without rclpy: model, latency, queue, cameras."""
from __future__ import annotations

import time
from typing import Any, Callable

from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

from zip_vlm_ros.node.jobs import CameraFeed, RequestQueue, RequestStats, percentile

# A camera without a frame for this long turns the diagnostics WARN.
NO_FRAME_WARN_S = 5.0
# Timeouts and refusals this recent turn the diagnostics WARN.
RECENT_PROBLEM_S = 30.0


def diagnostic_status(*, node_name: str, state: str, engine: Any, parameters: dict[str, Any],
                      queue: RequestQueue | None, stats: RequestStats, feeds: list[CameraFeed], active: bool,
                      activated_s: float, resolve_topic_name: Callable[[str], str]) -> DiagnosticStatus:
    """One status: OK when serving, WARN on recent problems or silent cameras, ERROR when inactive.

    parameters: the node's model, device, dtype and token_budget (shown before a model is loaded).
    """
    samples = stats.latencies()
    values = {
        'lifecycle_state': state,
        'model': engine.model_name if engine else str(parameters['model']),
        'device': str(engine.device) if engine else str(parameters['device']),
        'dtype': str(engine.dtype).replace('torch.', '') if engine else str(parameters['dtype']),
        'visual_tokens_full': str(engine.visual_tokens_full) if engine else '',
        'token_budget': str(parameters['token_budget']),
        'queue_depth': str(len(queue) if queue else 0),
        'running': str(queue is not None and bool(queue.running)).lower(),
        'batch_size': str(len(queue.running) if queue is not None else 0),  # requests decoding together now
        'max_batch_size': str(queue.max_running if queue is not None else 0),
        'latency_p50_ms': f'{percentile(samples["round_trip_ms"], 50):.1f}',
        'latency_p95_ms': f'{percentile(samples["round_trip_ms"], 95):.1f}',
        'inference_p50_ms': f'{percentile(samples["inference_ms"], 50):.1f}',
        'inference_p95_ms': f'{percentile(samples["inference_ms"], 95):.1f}',
        'image_callback_p50_us': f'{percentile(samples["callback_us"], 50):.1f}',
        'image_callback_max_us': f'{max(samples["callback_us"], default=float("nan")):.1f}',
    }
    values['stop_latency_p50_ms'] = f'{percentile(samples["stop_ms"], 50):.1f}'
    values['stop_latency_p95_ms'] = f'{percentile(samples["stop_ms"], 95):.1f}'
    for kind in ('ok', 'failed', 'refused', 'timed_out', 'cancelled', 'late'):
        values[f'requests_{kind}'] = str(stats.counts[kind])
    silent = []
    now = time.monotonic()
    for feed in feeds:
        frame = feed.peek()
        since_s = now - (frame.received_s if frame else activated_s)
        values[f'camera.{feed.name}.topic'] = resolve_topic_name(feed.topic)
        values[f'camera.{feed.name}.frames_received'] = str(feed.received)
        values[f'camera.{feed.name}.frames_superseded'] = str(feed.superseded)
        values[f'camera.{feed.name}.history_frames'] = str(len(feed.history))
        values[f'camera.{feed.name}.last_frame_s_ago'] = f'{since_s:.1f}' if frame else 'never'
        if active and since_s > NO_FRAME_WARN_S:
            silent.append(feed.name)
    values['last_error'] = stats.last_error

    problems = stats.recent_problems(RECENT_PROBLEM_S)
    if engine is None or not active:
        level = DiagnosticStatus.ERROR
        message = (f'inactive ({state}): model not loaded' if engine is None
                   else f'inactive ({state}): model loaded, not serving')
    elif problems or silent:
        level = DiagnosticStatus.WARN
        parts = []
        if problems:
            parts.append(f'{problems} timeout(s)/refusal(s) in the last {RECENT_PROBLEM_S:g} s')
        if silent:
            parts.append(f'no frames for {NO_FRAME_WARN_S:g} s on {", ".join(silent)}')
        message = '; '.join(parts)
    else:
        level, message = DiagnosticStatus.OK, 'ready'
    return DiagnosticStatus(
        level=level, name=f'{node_name}: vlm', message=message,
        hardware_id=values['device'],
        values=[KeyValue(key=key, value=value) for key, value in values.items()])
