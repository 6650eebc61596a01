"""Live replay: play the bag's image topics into a running vlm_node the way ``ros2 bag play`` would, and
call its services in rounds, one every ``--period`` seconds of bag time.

Budgets are compared on the same frames: at each round playback (and the published /clock) pauses,
the budgets are asked one call at a time, so the node's queue (``max_pending_requests``, 4 by default)
never refuses them, and a budget whose answer names an older frame than the others (a frame still in
flight when the round began) is asked again. Playback then resumes where it stopped.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import itertools
import os
import pathlib
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from zip_vlm_ros.replay.bag import Bag, open_bag, resolve_topics, stamp_ns_of
from zip_vlm_ros.replay.console import note, progress_bar, warn
from zip_vlm_ros.replay.inputs import FULL_BUDGET, Label, Question, ReplayError, point_budget, point_reducer
from zip_vlm_ros.replay.offline import EXIT_INTERRUPTED, EXIT_NOTHING_EVALUATED, EXIT_OK
from zip_vlm_ros.replay.report import write_report
from zip_vlm_ros.replay.results import REPORT_FILE, RESULTS_FILE, ResultsWriter, prepare_out_dir, write_run_file
from zip_vlm_ros.replay.storage import DamagedRegion

SUBSCRIBER_DISCOVERY_S = 3.0
# After the publisher sees the node's subscription, the subscription may not have seen the publisher
# yet and would drop what arrives first (volatile durability): give discovery this long to finish.
DISCOVERY_SETTLE_S = 1.0
# A frame published just before a round's pause is still in flight for about this long (shared memory).
ROUND_SETTLE_S = 0.2
BUSY_RETRY_S = 0.2
MAX_ROUND_ATTEMPTS = 3


def parse_remaps(remaps: list[str], topics: list[str]) -> dict[str, str]:
    """['/a:=/b'] -> {'/a': '/b'} for topics being played; other OLD names are an error."""
    mapping = {}
    for remap in remaps:
        old, separator, new = remap.partition(':=')
        old, new = old.strip(), new.strip()
        if not separator or not old or not new:
            raise ReplayError(f'--remap {remap!r} is not OLD:=NEW: use e.g. '
                              f'--remap /camera/front/image_raw:=/front/image')
        old = old if old.startswith('/') else '/' + old
        if old not in topics:
            raise ReplayError(f'--remap {remap!r}: {old} is not one of the played topics ({", ".join(topics)})')
        mapping[old] = new if new.startswith('/') else '/' + new
    return mapping


class LivePlayback:
    """Plays bag messages on their topics at recorded timing x rate and keeps the bag clock, which stops
    while playback is paused.

    Bag time at a wall instant is ``bag_start_ns + (monotonic - wall_start) * rate``; a pause moves
    `wall_start` forward by its length when it ends.
    """

    def __init__(self, bag: Bag, topics: list[str], publishers: dict[str, Any], typestore, rate: float):
        self.bag, self.topics, self.publishers, self.typestore, self.rate = bag, topics, publishers, typestore, rate
        self.bag_start_ns = bag.start_ns
        self.wall_start = 0.0
        self.lock = threading.Lock()
        self.paused_at: float | None = None
        self.stop = threading.Event()
        self.finished = threading.Event()
        self.published = Counter()
        self.index_of: dict[tuple[str, int], int] = {}   # (bag topic, stamp) -> index of the last such frame
        self.damaged: list[DamagedRegion] = []

    def bag_now_ns(self, wall: float | None = None) -> int:
        with self.lock:
            wall = self.paused_at if self.paused_at is not None else (time.monotonic() if wall is None else wall)
            return self.bag_start_ns + round((wall - self.wall_start) * self.rate * 1e9)

    def wall_at(self, bag_ns: int) -> float:
        return self.wall_start + (bag_ns - self.bag_start_ns) / 1e9 / self.rate

    def pause(self) -> None:
        with self.lock:
            self.paused_at = time.monotonic()

    def resume(self) -> None:
        with self.lock:
            self.wall_start += time.monotonic() - self.paused_at
            self.paused_at = None

    def wait_until(self, bag_ns: int) -> bool:
        """Sleep until bag time reaches `bag_ns` (pauses extend the wait); False when stopped."""
        while not self.stop.is_set():
            with self.lock:
                due = self.paused_at is None and time.monotonic() >= self.wall_at(bag_ns)
            if due:
                return True
            self.stop.wait(0.01)
        return False

    def run(self) -> None:
        try:
            for item in self.bag.messages(self.topics):
                if isinstance(item, DamagedRegion):
                    self.damaged.append(item)
                    continue
                if not self.wait_until(item.log_ns):
                    return
                self._publish(item)
        except Exception as error:  # a reader error on a damaged bag ends playback, not the run
            self.damaged.append(DamagedRegion(str(self.bag.path), 'playback', f'{type(error).__name__}: {error}'))
        finally:
            self.finished.set()

    def _publish(self, item) -> None:
        try:
            stamp_ns = stamp_ns_of(self.typestore.deserialize_cdr(item.raw, item.msgtype)) or item.log_ns
            self.index_of[(item.topic, stamp_ns)] = item.index
        except Exception:  # a garbled message is still played, as ros2 bag play would
            pass
        with self.lock:  # never publish inside a paused round
            # rosbag2 stores the rmw serialisation, so the recorded bytes go out unchanged.
            self.publishers[item.topic].publish(bytes(item.raw))
        self.published[item.topic] += 1


@dataclass
class LiveCall:
    """One answered, refused or timed-out service call and what it asked."""

    request_id: int
    round: int
    budget: str
    kind: str                                   # 'describe' or 'question'
    prompts: list[tuple[str, tuple[str, ...]]]  # (prompt, expected keywords) in request order
    latency_ms: float | None = None
    response: Any = None
    status: str = 'ok'                          # ok | refused | timeout
    message: str = ''
    bag_at_answer_ns: int | None = None         # bag clock when the response came

    def stamps(self) -> set[int]:
        if self.status != 'ok':
            return set()
        results = [self.response.result] if self.kind == 'describe' else list(self.response.results)
        return {stamp_ns_of(result) for result in results}


def _spin_quietly(executor) -> None:
    try:
        executor.spin()
    except Exception:  # raised when the context shuts down under it at the end of the run
        pass


def run_live(args: argparse.Namespace, budgets: list[str], questions: list[Question], labels: list[Label]) -> int:
    bag = open_bag(args.bag)
    try:
        topics = resolve_topics(bag.topics, args.topics, args.bag)
        remaps = parse_remaps(args.remap, topics)
        try:
            import rclpy
            from rclpy.executors import SingleThreadedExecutor

            importlib.import_module('zip_vlm_ros.srv')  # the interfaces LiveSession calls
        except ImportError as error:
            raise ReplayError(f'--live needs rclpy and the zip_vlm_ros interfaces ({error}): run '
                              f'scripts/setup.sh or source a ROS 2 install with this package built') from None
        prepare_out_dir(pathlib.Path(args.out), resume=False)
        context = rclpy.Context()
        rclpy.init(context=context)
        node = rclpy.create_node(f'vlm_replay_{os.getpid()}', context=context)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        spinner = threading.Thread(target=_spin_quietly, args=(executor,), daemon=True)
        spinner.start()
        try:
            return LiveSession(args, bag, node, topics, remaps, budgets, questions, labels).run()
        finally:
            executor.shutdown(timeout_sec=1.0)
            node.destroy_node()
            rclpy.try_shutdown(context=context)
            spinner.join(timeout=2.0)
    finally:
        bag.close()


def node_diagnostics(node, node_name: str, wait_s: float) -> dict[str, str]:
    """The key/values of the node's own status on /diagnostics (model, device, visual_tokens_full, ...),
    or {} when none arrives within wait_s."""
    from diagnostic_msgs.msg import DiagnosticArray

    status_name = f'{node_name.rsplit("/", 1)[-1]}: vlm'
    received: dict[str, str] = {}
    arrived = threading.Event()

    def on_diagnostics(array) -> None:
        for status in array.status:
            if status.name == status_name and not arrived.is_set():
                received.update({item.key: item.value for item in status.values})
                arrived.set()

    subscription = node.create_subscription(DiagnosticArray, '/diagnostics', on_diagnostics, 10)
    try:
        arrived.wait(wait_s)
    finally:
        node.destroy_subscription(subscription)
    return received


class LiveSession:
    """One live run: connect to the node, play the bag, ask in paced rounds, write results and report."""

    def __init__(self, args, bag: Bag, node, topics: list[str], remaps: dict[str, str], budgets: list[str],
                 questions: list[Question], labels: list[Label]):
        from rosbags.typesys import Stores, get_typestore

        self.args, self.bag, self.node, self.topics, self.remaps = args, bag, node, topics, remaps
        self.budgets, self.questions, self.labels = budgets, questions, labels
        self.typestore = get_typestore(Stores.ROS2_KILTED)
        self.out_dir = pathlib.Path(args.out)
        self.node_name = args.node_name if args.node_name.startswith('/') else '/' + args.node_name
        self.problems: list[str] = []
        self.calls: list[LiveCall] = []
        self.same_frame_rounds = 0
        self.rounds_run = 0
        self.request_ids = itertools.count(1)

    def run(self) -> int:
        self._connect()
        publishers = self._make_publishers()
        self.playback = LivePlayback(self.bag, self.topics, publishers, self.typestore, self.args.rate)
        clock_thread = self._clock_thread()
        player = threading.Thread(target=self.playback.run, daemon=True)
        self.playback.wall_start = time.monotonic() + 0.2
        player.start()
        if clock_thread is not None:
            clock_thread.start()
        interrupted = False
        try:
            self._ask_rounds()
            player.join()  # the rest of the bag plays at its recorded pace
        except KeyboardInterrupt:
            interrupted = True
        finally:
            self.playback.stop.set()
            player.join(timeout=2.0)
            if clock_thread is not None:
                clock_thread.join(timeout=2.0)
        return self._finish(interrupted)

    def _connect(self) -> None:
        """Service clients, the node's diagnostics, and the token count each budget label asks for."""
        from zip_vlm_ros.srv import AskMany, DescribeScene

        self.describe_client = self.node.create_client(DescribeScene, f'{self.node_name}/describe_scene')
        self.ask_many_client = self.node.create_client(AskMany, f'{self.node_name}/ask_many')
        for client in (self.describe_client, self.ask_many_client) if self.questions else (self.describe_client,):
            if not client.wait_for_service(timeout_sec=self.args.wait):
                raise ReplayError(f'service {client.srv_name} did not appear within {self.args.wait:g} s: start '
                                  f'vlm_node (and activate it), or pass the right --node-name; ROS_DOMAIN_ID is '
                                  f'{os.environ.get("ROS_DOMAIN_ID", "0")}')
        self.node_info = node_diagnostics(self.node, self.node_name, self.args.wait)
        full = int(self.node_info['visual_tokens_full']) if self.node_info.get('visual_tokens_full') else None
        if full is None and FULL_BUDGET in self.budgets:
            raise ReplayError(f'no diagnostics from {self.node_name} on /diagnostics within {self.args.wait:g} s, so '
                              f'its model\'s visual tokens (budget "full") are unknown: drop "full" from --budgets or '
                              f'check that the node is active')
        if full is None:
            warn(f'no diagnostics from {self.node_name}: budgets are sent as given')
        self.request_budgets = {}
        for budget in self.budgets:
            # The node accepts 1..visual tokens; larger budgets mean "no reduction" offline, so send the same.
            tokens = full if point_budget(budget) == FULL_BUDGET else int(point_budget(budget))
            if full is not None and tokens > full:
                note(f'note: budget {budget} >= the {full} visual tokens of the node\'s model: no reduction, '
                     f'same as full')
                tokens = full
            self.request_budgets[budget] = tokens

    def _make_publishers(self) -> dict[str, Any]:
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CompressedImage, Image

        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        publishers = {}
        for topic in self.topics:
            message_type = Image if self.bag.topics[topic].msgtype == 'sensor_msgs/msg/Image' else CompressedImage
            publishers[topic] = self.node.create_publisher(message_type, self.remaps.get(topic, topic), qos)
        # The node's subscriptions exist once its services do; this only waits for discovery to match them.
        deadline = time.monotonic() + min(self.args.wait, SUBSCRIBER_DISCOVERY_S)
        while time.monotonic() < deadline and not all(pub.get_subscription_count() for pub in publishers.values()):
            time.sleep(0.05)
        for topic, publisher in publishers.items():
            if not publisher.get_subscription_count():
                self.problems.append(f'nobody subscribes to {publisher.topic_name}: map it to a camera in the '
                                     f'node\'s parameters or use --remap {topic}:=<camera topic>')
                warn(self.problems[-1])
        time.sleep(DISCOVERY_SETTLE_S)
        return publishers

    def _clock_thread(self) -> threading.Thread | None:
        if not self.args.clock:
            return None
        from rosgraph_msgs.msg import Clock

        clock_publisher = self.node.create_publisher(Clock, '/clock', 10)

        def publish_clock() -> None:
            while not self.playback.finished.is_set():
                message = Clock()
                message.clock.sec, message.clock.nanosec = divmod(self.playback.bag_now_ns(), 10**9)
                clock_publisher.publish(message)
                self.playback.finished.wait(1.0 / self.args.clock)

        return threading.Thread(target=publish_clock, daemon=True)

    def _ask_rounds(self) -> None:
        period_ns = round((self.args.period or 1.0) * 1e9)
        rounds = max((self.bag.end_ns - self.bag.start_ns) // period_ns, 1)
        if self.args.max_frames is not None:
            rounds = min(rounds, self.args.max_frames)
        progress = progress_bar(rounds * len(self.budgets), 'budget rounds')
        try:
            for round_index in range(1, rounds + 1):
                if not self.playback.wait_until(self.bag.start_ns + round_index * period_ns):
                    break
                self.calls += self._round(round_index)
                self.rounds_run += 1
                progress.update(len(self.budgets))
        finally:
            progress.close()

    def _round(self, round_index: int) -> list[LiveCall]:
        """Every budget on the camera's current frame: playback pauses, budgets are asked one call at a
        time, and a budget answered about an older frame than the newest in the round is asked again."""
        self.playback.pause()
        try:
            time.sleep(ROUND_SETTLE_S)
            calls = {budget: self._ask_budget(budget, round_index) for budget in self.budgets}
            for _ in range(MAX_ROUND_ATTEMPTS - 1):
                stamps = {budget: set().union(*(call.stamps() for call in budget_calls))
                          for budget, budget_calls in calls.items()}
                newest = max((max(found) for found in stamps.values() if found), default=None)
                behind = [budget for budget, found in stamps.items() if found and found != {newest}]
                if not behind:
                    break
                calls.update({budget: self._ask_budget(budget, round_index) for budget in behind})
            answered = [call for budget_calls in calls.values() for call in budget_calls]
            if all(call.status == 'ok' for call in answered) and len(set().union(*(c.stamps() for c in answered))) == 1:
                self.same_frame_rounds += 1
            return answered
        finally:
            self.playback.resume()

    def _ask_budget(self, budget: str, round_index: int) -> list[LiveCall]:
        from zip_vlm_ros.srv import AskMany, DescribeScene

        args, tokens = self.args, self.request_budgets[budget]
        describe_prompt = args.describe_prompt or ''
        reducer = point_reducer(budget)  # '' asks for the node's reducer
        describe = DescribeScene.Request(camera=args.camera, token_budget=tokens, reducer=reducer,
                                         max_new_tokens=args.max_new_tokens or 0, prompt=describe_prompt)
        calls = [self._call(self.describe_client, describe, LiveCall(
            next(self.request_ids), round_index, budget, 'describe', [(describe_prompt, ())]))]
        if self.questions:
            ask = AskMany.Request(questions=[q.question for q in self.questions], camera=args.camera,
                                  token_budget=tokens, max_new_tokens=args.max_new_tokens or 0, reducer=reducer)
            calls.append(self._call(self.ask_many_client, ask, LiveCall(
                next(self.request_ids), round_index, budget, 'question',
                [(q.question, q.expect) for q in self.questions])))
        return calls

    def _call(self, client, request, call: LiveCall) -> LiveCall:
        """One call, waited for up to --timeout; a "busy" refusal is retried within that time."""
        deadline = time.monotonic() + self.args.timeout
        while True:
            done = threading.Event()
            sent = time.monotonic()
            future = client.call_async(request)
            future.add_done_callback(lambda _: done.set())
            if not done.wait(max(deadline - sent, 0)):
                client.remove_pending_request(future)
                call.status, call.message = 'timeout', f'no response within {self.args.timeout:g} s'
                return call
            call.latency_ms, call.response = (time.monotonic() - sent) * 1000, future.result()
            call.bag_at_answer_ns = self.playback.bag_now_ns()
            if call.response.success:
                return call
            call.status, call.message = 'refused', call.response.message
            if not call.message.startswith('busy') or time.monotonic() + BUSY_RETRY_S >= deadline:
                return call
            time.sleep(BUSY_RETRY_S)
            call.status, call.message = 'ok', ''

    def _finish(self, interrupted: bool) -> int:
        rows = [row for call in self.calls for row in self._rows(call)]
        writer = ResultsWriter(self.out_dir / RESULTS_FILE)
        writer.write(rows)
        writer.close()
        for region in self.playback.damaged:
            self.problems.append(f'damaged: {region.file} {region.where}: {region.reason} (not played)')
            warn(self.problems[-1])
        partial = (['interrupted before the last round'] if interrupted else []) + self.bag.cut
        if self.bag.stopped:
            partial.append(self.bag.stopped)
        run = self._run_info(rows)
        write_run_file(self.out_dir, run)
        write_report(self.out_dir, rows, [], run, problems=self.problems, partial=partial, labels=self.labels)
        answered = sum(row['status'] == 'ok' for row in rows)
        note(f'{len(self.calls)} requests, {answered} answers; report in {self.out_dir / REPORT_FILE}')
        if interrupted:
            return EXIT_INTERRUPTED
        return EXIT_OK if answered else EXIT_NOTHING_EVALUATED

    def _bag_topic_of_camera(self) -> dict[str, str]:
        """camera name -> the bag topic played on the topic that camera subscribes to (node diagnostics)."""
        played = {self.remaps.get(topic, topic): topic for topic in self.topics}
        cameras = {}
        for key, value in self.node_info.items():
            if key.startswith('camera.') and key.endswith('.topic') and value in played:
                cameras[key[len('camera.'):-len('.topic')]] = played[value]
        return cameras

    def _rows(self, call: LiveCall) -> list[dict]:
        base = {'request': call.request_id, 'round': call.round, 'budget': call.budget,
                'reducer': point_reducer(call.budget), 'kind': call.kind, 'camera': self.args.camera}
        if call.status != 'ok':
            return [dict(base, topic='', index=None, stamp_ns=None, prompt=prompt, expect=list(expect),
                         status=call.status, message=call.message) for prompt, expect in call.prompts]
        results = [call.response.result] if call.kind == 'describe' else list(call.response.results)
        topic_of_camera = self._bag_topic_of_camera()
        rows = []
        for (_, expect), result in zip(call.prompts, results):
            stamp_ns = stamp_ns_of(result)
            # Credited to the bag topic played where this camera listens, not guessed from the stamp:
            # a raw and a compressed copy of one camera share stamps.
            topic = topic_of_camera.get(result.camera, '')
            rows.append(dict(
                base, topic=topic, index=self.playback.index_of.get((topic, stamp_ns)), camera=result.camera,
                stamp_ns=stamp_ns, prompt=result.prompt, expect=list(expect), status='ok', text=result.text,
                model=result.model, reduction=result.reduction, reducer=point_reducer(call.budget) or result.reduction,
                token_budget=result.token_budget,
                visual_tokens=result.visual_tokens, visual_tokens_full=result.visual_tokens_full,
                generated_tokens=result.generated_tokens, vision_ms=result.vision_ms,
                reduction_ms=result.reduction_ms, prefill_ms=result.prefill_ms, ttft_ms=None,
                decode_ms=result.decode_ms, total_ms=result.total_ms, prefix_reused=result.prefix_reused,
                kv_cache_bytes=None, latency_ms=call.latency_ms,
                image_age_ms=(call.bag_at_answer_ns - stamp_ns) / 1e6, node_image_age_ms=result.image_age_ms))
        return rows

    def _frames_received(self) -> dict[str, int]:
        """Frames the node got during the run, from its own counters: shows transport drops (e.g. large
        raw images on a best-effort subscription) that would otherwise look like a slow node."""
        after = node_diagnostics(self.node, self.node_name, min(self.args.wait, 3.0))
        received = {}
        for key, value in after.items():
            if key.startswith('camera.') and key.endswith('.frames_received'):
                camera = key[len('camera.'):-len('.frames_received')]
                topic = after.get(f'camera.{camera}.topic', '')
                received[f'{camera} ({topic})'] = int(value) - int(self.node_info.get(key, '0') or 0)
        return received

    def _run_info(self, rows: list[dict]) -> dict:
        ok_rows = [row for row in rows if row['status'] == 'ok']
        models = sorted({row['model'] for row in ok_rows})
        describe = next((row['prompt'] for row in ok_rows if row['kind'] == 'describe'), 'node default')
        return {
            'mode': 'live', 'bag': str(self.args.bag), 'bag_files': self.bag.fingerprint(),
            'bag_notes': self.bag.notes, 'topics': self.topics, 'remaps': self.remaps, 'node_name': self.node_name,
            'camera': self.args.camera, 'rate': self.args.rate, 'ask_period_s': self.args.period or 1.0,
            'clock_hz': self.args.clock, 'rounds': self.rounds_run, 'same_frame_rounds': self.same_frame_rounds,
            'model': ', '.join(models) or self.node_info.get('model', 'unknown (no answer)'),
            'device': self.node_info.get('device', 'the node\'s device'),
            'dtype': self.node_info.get('dtype', 'node setting'), 'dominant_ratio': 'node setting',
            'max_new_tokens': self.args.max_new_tokens or 'node default',
            'describe_prompt': self.args.describe_prompt or describe,
            'questions': [dataclasses.asdict(question) for question in self.questions], 'budgets': self.budgets,
            'reducers': self.args.reducers,
            'published': {self.remaps.get(topic, topic): count for topic, count in self.playback.published.items()},
            'node_frames_received': self._frames_received(),
        }
