"""``python -m zip_vlm_ros.bench.refusal_profile``: the node's own work for one refused request, profiled.

``vlm_bench --node`` shows refusals in 40-caller bursts taking longer than on a bare rclpy service that
refuses at once. This separates the node's Python work per request from rclpy's and DDS's: a
``VlmNode`` runs in this process with its one batch row taken (``max_batch_size`` 1,
``max_pending_requests`` 0), and its ``~/ask`` callback is driven directly, as a coroutine, for the
burst's request (a question and a 100x150 inline thumbnail), so every call is refused "busy" and no
executor, wait set or DDS is involved. Prints microseconds per refusal and a cProfile of them.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time

import rclpy
from rclpy.context import Context

from zip_vlm_ros.bench.burst_callers import ask_request
from zip_vlm_ros.bench.inputs import default_model_dir
from zip_vlm_ros.node.jobs import Job
from zip_vlm_ros.node.vlm_node import VlmNode
from zip_vlm_ros.srv import Ask
from zip_vlm_ros.tools.tiny_model import build_checkpoint

__all__ = ["main", "refusal_cost_us"]


def _refuse(node: VlmNode, request: Ask.Request) -> Ask.Response:
    """One call of the node's ~/ask callback, which must return without awaiting (a refusal)."""
    coroutine = node._on_ask(request, Ask.Response())
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise RuntimeError("the request was queued, not refused: the node's batch row is free")


def refusal_cost_us(model_dir: str, requests: int, profile: cProfile.Profile | None = None) -> float:
    """Microseconds of node work per refused request, over `requests` calls (profiled into `profile`)."""
    context = Context()
    rclpy.init(args=['--ros-args', '-r', '__ns:=/refusal_profile', '-p', f'model:={model_dir}',
                     '-p', 'token_budget:=8', '-p', 'max_pending_requests:=0', '-p', 'max_batch_size:=1'],
               context=context)
    node = VlmNode(context=context)
    try:
        if not node.start():
            raise RuntimeError("vlm_node did not start; see its log line above")
        # Stop the worker and hold the one row, so that every request is refused "busy".
        node._worker_stop.set()
        node._join_worker()
        node._queue.running.append(Job('ask', ['hold'], camera='inline', inline=None, token_budget=8,
                                       max_new_tokens=1, timeout_s=3600))
        request = ask_request()
        for _ in range(50):  # warm-up, and a check that these are the refusals to measure
            assert 'busy' in _refuse(node, request).message
        if profile is not None:
            profile.enable()
        start = time.perf_counter()
        for _ in range(requests):
            _refuse(node, request)
        elapsed = time.perf_counter() - start
        if profile is not None:
            profile.disable()
        node._queue.running.clear()
        return elapsed / requests * 1e6
    finally:
        node.close()
        node.destroy_node()
        rclpy.shutdown(context=context)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zip_vlm_ros.bench.refusal_profile",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="LLaVA checkpoint (default: the vlm_tiny_model tiny preset, built once)")
    parser.add_argument("--requests", type=int, default=2000, help="refusals timed (default: %(default)s)")
    parser.add_argument("--top", type=int, default=15, help="profile rows shown (default: %(default)s)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.requests < 1:
        parser.error("--requests must be >= 1")
    model = args.model or str(build_checkpoint(default_model_dir() / "tiny", preset="tiny"))
    plain_us = refusal_cost_us(model, args.requests)
    profile = cProfile.Profile()
    refusal_cost_us(model, args.requests, profile)
    print(f"node work per refused ~/ask request: {plain_us:.1f} us (mean of {args.requests}, no profiler)")
    pstats.Stats(profile, stream=sys.stdout).sort_stats("cumulative").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
