"""Burst callers for the node benchmark, spread over processes as robots' callers are.

Callers in one Python process share its interpreter lock and its executors' threads: with 40 of them,
a bare rclpy service that refuses at once showed a 643 ms p95 round trip, the time the callers' own
process took to hand out responses, not the server's. Here the callers live in several processes
(``python -m zip_vlm_ros.bench.burst_callers``), a few service clients on one node each: one DDS participant
per caller is more than localhost discovery managed here (with 40 caller participants in separate
processes some never discovered the node; with 28 all did). Each process waits for a start time the
parent gives, calls once from every client at that moment and reports each client's own round trip,
so a burst measures what the server and DDS do.

Protocol on a caller process's stdin/stdout, one JSON line each (the parent is ``BurstCallers``):
    parent: ``{"services": [...], "wait_s": W}``   caller: ``{"ready": true}`` once every service answered
    parent: ``{"service": S, "at": EPOCH_S}``      caller: ``[{"answered", "success", "ms"}, ...]`` per client
    parent: EOF                                    caller exits 0
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

# The Ask request every burst sends: a question about an inline thumbnail of the coffee photo (100x150
# rgb8, 45 kB). With the full 720 kB photo, 40 requests are 29 MB that DDS moves one after another and
# the burst measures the transport: a bare service refusing at once took 18 ms more per caller.
QUESTION = 'What is on the table?'
THUMBNAIL_STRIDE = 4
CLIENTS_PER_PROCESS = 5
# Time for every caller process to read the start line before the burst begins.
START_DELAY_S = 0.5


def ask_request():
    """The Ask request every burst sends (see QUESTION and THUMBNAIL_STRIDE)."""
    import numpy as np
    import skimage.data

    from zip_vlm_ros.node.conversions import rgb_to_image
    from zip_vlm_ros.srv import Ask

    thumbnail = np.ascontiguousarray(skimage.data.coffee()[::THUMBNAIL_STRIDE, ::THUMBNAIL_STRIDE])
    return Ask.Request(question=QUESTION, image=rgb_to_image(thumbnail))


def _reply(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + '\n')
    sys.stdout.flush()


class _Caller:
    """One service client of its own (a DDS reader/writer pair) on a process's shared node."""

    def __init__(self, vlm_client: Any, srv_type: Any, service: str):
        self.client = vlm_client.node.create_client(srv_type, service.replace('~', vlm_client.target, 1),
                                                    qos_profile=vlm_client._service_qos)

    def call(self, request: Any, timeout_s: float) -> tuple[Any, float]:
        """(response or TimeoutError, seconds) of one call."""
        done = threading.Event()
        started = time.perf_counter()
        future = self.client.call_async(request)
        future.add_done_callback(lambda _: done.set())
        if not done.wait(timeout_s):
            self.client.remove_pending_request(future)
            return TimeoutError(), time.perf_counter() - started
        return future.result(), time.perf_counter() - started

    def wait_until_answered(self, request: Any, timeout_s: float) -> bool:
        """Call until a response arrives (see client.wait_until_answered for why seeing is not enough)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.client.wait_for_service(timeout_sec=max(0.1, deadline - time.monotonic())):
                response, _ = self.call(request, min(2.0, max(0.1, deadline - time.monotonic())))
                if not isinstance(response, TimeoutError):
                    return True
        return False


def _all_at_once(callers: list[_Caller], call: Any) -> list:
    """`call(caller)` from a thread per caller, released together; results in order."""
    results: list = [None] * len(callers)
    barrier = threading.Barrier(len(callers))

    def run(index: int) -> None:
        barrier.wait()
        results[index] = call(callers[index])

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(callers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def run_caller(target: str, name: str, clients: int) -> int:
    """One caller process: one node with `clients` clients of each service. They first prove every
    service answers; then each start line makes all of them call at that moment."""
    from zip_vlm_ros.client import VlmClient
    from zip_vlm_ros.srv import Ask

    setup = json.loads(sys.stdin.readline())
    wait_s, request = setup['wait_s'], ask_request()
    with VlmClient(target, client_name=name, threads=clients + 1) as vlm_client:
        callers = {service: [_Caller(vlm_client, Ask, service) for _ in range(clients)]
                   for service in setup['services']}
        for service, service_callers in callers.items():
            ready = _all_at_once(service_callers,
                                 lambda caller: caller.wait_until_answered(Ask.Request(question=''), wait_s))
            if not all(ready):
                _reply({'ready': False, 'service': service})
                return 1
        _reply({'ready': True})
        for line in sys.stdin:
            order = json.loads(line)
            time.sleep(max(0.0, order['at'] - time.time()))
            outcomes = _all_at_once(callers[order['service']], lambda caller: caller.call(request, wait_s))
            _reply([{'answered': not isinstance(response, TimeoutError),
                     'success': not isinstance(response, TimeoutError) and bool(response.success),
                     'ms': seconds * 1e3} for response, seconds in outcomes])
    return 0


class BurstCallers:
    """``count`` callers of ``target`` (a node name such as /bench_burst/zip_vlm), CLIENTS_PER_PROCESS
    to a process.

    ``burst(service)`` makes every caller call `service` at the same wall-clock moment and returns each
    caller's outcome dict. Use as a context manager; the processes end when it closes.
    """

    def __init__(self, target: str, count: int, services: list[str], wait_s: float):
        self.processes: list[subprocess.Popen] = []
        try:
            for index, first in enumerate(range(0, count, CLIENTS_PER_PROCESS)):
                clients = min(CLIENTS_PER_PROCESS, count - first)
                process = subprocess.Popen(
                    [sys.executable, '-m', 'zip_vlm_ros.bench.burst_callers', target, f'bench_caller_{index}',
                     str(clients)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
                process.stdin.write(json.dumps({'services': services, 'wait_s': wait_s}) + '\n')
                process.stdin.flush()
                self.processes.append(process)
            for process in self.processes:
                status = self._read(process)
                if not status.get('ready'):
                    raise RuntimeError(f'a burst caller never got an answer from {status.get("service")}')
        except BaseException:
            self.close()
            raise

    def burst(self, service: str) -> list[dict[str, Any]]:
        start_at = time.time() + START_DELAY_S
        for process in self.processes:
            process.stdin.write(json.dumps({'service': service, 'at': start_at}) + '\n')
            process.stdin.flush()
        return [outcome for process in self.processes for outcome in self._read(process)]

    @staticmethod
    def _read(process: subprocess.Popen) -> Any:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f'burst caller {process.args[-2]} exited with {process.wait()}')
        return json.loads(line)

    def close(self) -> None:
        for process in self.processes:
            if process.stdin and not process.stdin.closed:
                process.stdin.close()
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def __enter__(self) -> BurstCallers:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


if __name__ == '__main__':
    sys.exit(run_caller(sys.argv[1], sys.argv[2], int(sys.argv[3])))
