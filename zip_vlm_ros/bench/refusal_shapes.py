"""``python -m zip_vlm_ros.bench.refusal_shapes``: refusals in 40-caller bursts, the node against bare rclpy
services of several shapes, in the same bursts.

``vlm_bench --node`` compares the node's refusals with a bare service: one ``Node`` with one ``~/ask``
service, a plain callback and ``rclpy.spin``. The node differs in how rclpy runs it: a
``MultiThreadedExecutor`` of 4 threads, ``async def`` callbacks in a reentrant group, and some 30 more
entities in its wait set (lifecycle and parameter services, the action server, publishers, timers). Each
bare shape here adds one of those differences, so a burst shows which of them costs time:

    bare                the vlm_node bench's bare service
    multi_async         MultiThreadedExecutor(4), async callback, reentrant group
    multi_async_ents    the same with ``--entities`` more services and publishers, and two timers
    single_sync_ents    the bare service with those entities

With ``--node`` a ``vlm_node`` (tiny checkpoint, ``max_pending_requests`` 4, ``max_batch_size`` 4, as in
``vlm_bench --node``) is called in the same bursts; only its refused callers count. Bursts go to each
service in turn. Prints p50 / p95 per service and p95 over the bare service's.
"""
from __future__ import annotations

import argparse
import pathlib
import signal
import subprocess
import sys
import tempfile

import numpy as np

# shape name -> (executor, callback kind, extra entities?)
SHAPES = {'bare': ('single', 'sync', False), 'multi_async': ('multi', 'async', False),
          'multi_async_ents': ('multi', 'async', True), 'single_sync_ents': ('single', 'sync', True)}
NODE_ASK = '/refusal_shapes_node/zip_vlm/ask'

__all__ = ['SHAPES', 'main', 'measure_shapes', 'serve_shape']


def serve_shape(name: str, executor_kind: str, callback_kind: str, entities: int) -> None:
    """A node ``/<name>/zip_vlm`` whose ``~/ask`` refuses at once, in the given shape; spins until SIGINT."""
    import rclpy
    from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
    from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor, SingleThreadedExecutor
    from rclpy.node import Node
    from std_msgs.msg import String
    from std_srvs.srv import Trigger

    from zip_vlm_ros.node.parameters import service_qos_profile
    from zip_vlm_ros.srv import Ask

    def refuse(request, response):
        response.success, response.message = False, 'refused'
        return response

    async def refuse_async(request, response):
        return refuse(request, response)

    rclpy.init()
    node = Node('zip_vlm', namespace=f'/{name}')
    requests = ReentrantCallbackGroup()
    node.create_service(Ask, '~/ask', refuse_async if callback_kind == 'async' else refuse,
                        qos_profile=service_qos_profile(100), callback_group=requests)
    for index in range(entities):
        node.create_service(Trigger, f'~/extra_{index}', lambda _request, response: response,
                            callback_group=requests)
        node.create_publisher(String, f'~/extra_{index}/out', 10)
    if entities:  # the node's diagnostics (1 Hz) and deadline (10 Hz) timers
        timers = MutuallyExclusiveCallbackGroup()
        node.create_timer(1.0, lambda: None, callback_group=timers)
        node.create_timer(0.1, lambda: None, callback_group=timers)
    executor = MultiThreadedExecutor(num_threads=4) if executor_kind == 'multi' else SingleThreadedExecutor()
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass


def measure_shapes(*, callers: int, bursts: int, entities: int, model_dir: str | None,
                   timeout_s: float = 60.0) -> dict[str, dict[str, float]]:
    """Refused round trips (ms) per service: ``{service: {'p50', 'p95', 'refusals', 'lost'}}``."""
    from zip_vlm_ros.bench.burst_callers import BurstCallers
    from zip_vlm_ros.client import NodeProcess

    servers = [subprocess.Popen([sys.executable, '-m', 'zip_vlm_ros.bench.refusal_shapes', '--serve', name,
                                 executor, callback, str(entities if extra else 0)])
               for name, (executor, callback, extra) in SHAPES.items()]
    services = [f'/{name}/zip_vlm/ask' for name in SHAPES]
    node = None
    try:
        if model_dir is not None:
            log = pathlib.Path(tempfile.gettempdir()) / 'refusal_shapes_node.log'
            node = NodeProcess({'model': model_dir, 'token_budget': 8, 'max_new_tokens': 8,
                                'max_pending_requests': 4, 'max_batch_size': 4}, log,
                               remaps={'__ns': '/refusal_shapes_node'})
            services.append(NODE_ASK)
        refused_ms = {service: [] for service in services}
        lost = dict.fromkeys(services, 0)
        with BurstCallers(NODE_ASK.removesuffix('/ask'), callers, services, timeout_s) as burst_callers:
            for _ in range(bursts):
                for service in services:
                    outcomes = burst_callers.burst(service)
                    lost[service] += sum(not outcome['answered'] for outcome in outcomes)
                    refused_ms[service] += [outcome['ms'] for outcome in outcomes
                                            if outcome['answered'] and not outcome['success']]
    finally:
        for server in servers:
            server.send_signal(signal.SIGINT)
        for server in servers:
            server.wait(30)
        if node is not None:
            node.stop()
    return {service: {'p50': float(np.percentile(values, 50)), 'p95': float(np.percentile(values, 95)),
                      'refusals': len(values), 'lost': lost[service]}
            for service, values in refused_ms.items() if values}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ['--serve']:
        serve_shape(argv[1], argv[2], argv[3], int(argv[4]))
        return 0
    from zip_vlm_ros.client import use_large_frames_profile, use_local_ros_domain

    parser = argparse.ArgumentParser(prog='python -m zip_vlm_ros.bench.refusal_shapes',
                                     description=__doc__.split('\n\n')[0])
    parser.add_argument('--bursts', type=int, default=5, help='bursts per service (default: %(default)s)')
    parser.add_argument('--callers', type=int, default=40, help='callers per burst (default: %(default)s)')
    parser.add_argument('--entities', type=int, default=20,
                        help='extra services and publishers of the *_ents shapes (default: %(default)s)')
    parser.add_argument('--node', action='store_true', help='call a vlm_node (tiny checkpoint) in the bursts too')
    parser.add_argument('--domain-id', type=int, help='ROS_DOMAIN_ID (default: random in 1..101)')
    args = parser.parse_args(argv)
    if min(args.bursts, args.callers) < 1 or args.entities < 0:
        parser.error('--bursts and --callers must be >= 1, --entities >= 0')
    use_local_ros_domain(args.domain_id)
    use_large_frames_profile()
    model_dir = None
    if args.node:
        from zip_vlm_ros.bench.inputs import default_model_dir
        from zip_vlm_ros.tools.tiny_model import build_checkpoint
        model_dir = str(build_checkpoint(default_model_dir() / 'tiny', preset='tiny'))
    results = measure_shapes(callers=args.callers, bursts=args.bursts, entities=args.entities, model_dir=model_dir)
    bare_p95 = results[f'/{next(iter(SHAPES))}/zip_vlm/ask']['p95']
    print(f'{args.callers}-caller bursts, {args.bursts} per service, refused round trips:')
    for service, row in results.items():
        print(f"{service:<36} refused {row['refusals']:>4}  lost {row['lost']:>2}  p50 {row['p50']:7.1f} ms  "
              f"p95 {row['p95']:7.1f} ms  p95 / bare {row['p95'] / bare_p95:5.2f}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
