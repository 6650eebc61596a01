"""Shared by the node tests: start vlm_node as a process, publish frames to it, read its log."""
from __future__ import annotations

import contextlib
import time
from typing import Any

import pytest

from zip_vlm_ros.client import NodeProcess, VlmClient, use_large_frames_profile, wait_until
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
