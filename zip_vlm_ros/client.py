"""The caller's side of vlm_node: start it as a process, publish images, call its services.

Used by vlm_demo, the node benchmark and the tests, the way a robot program would use the node:
over real DDS from another process.
"""
from __future__ import annotations

import os
import pathlib
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import rclpy
from rcl_interfaces.msg import Parameter as ParameterMsg
from rcl_interfaces.srv import GetParameters, SetParameters
from action_msgs.msg import GoalStatus
from rclpy.action import ActionClient
from rclpy.context import Context
from rclpy.executors import MultiThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

from zip_vlm_ros.action import Ask as AskAction
from zip_vlm_ros.node.spinning import BackgroundSpinner
from zip_vlm_ros.srv import Ask, AskMany, DescribeScene

NODE_NAME = 'zip_vlm'
# ROS 2 sends every response of a service to every client of it, and a client keeps only the last
# `depth` responses that arrive together: with the default 10, a client among 40 concurrent callers
# lost its own response (10 of 40 answered at depth 10, 40 of 40 at 100).
RESPONSE_HISTORY_DEPTH = 100
# Linux: domains 0..101 map to valid UDP ports below the ephemeral range; 0 is everyone's default.
DOMAIN_IDS = range(1, 102)


def large_frames_profile() -> pathlib.Path:
    """config/fastdds_large_frames.xml, from the source tree or the installed share directory."""
    in_tree = pathlib.Path(__file__).resolve().parents[1] / 'config' / 'fastdds_large_frames.xml'
    if in_tree.is_file():
        return in_tree
    from ament_index_python.packages import get_package_share_directory
    return pathlib.Path(get_package_share_directory('zip_vlm_ros')) / 'config' / 'fastdds_large_frames.xml'


def use_large_frames_profile() -> None:
    """Let Fast DDS carry raw camera frames over 512 KB between processes on this machine.

    Sets FASTDDS_DEFAULT_PROFILES_FILE to config/fastdds_large_frames.xml (see the file for why)
    unless it is set already. Every participant that exchanges big images needs it, so call this
    before creating ROS contexts and starting node processes (they inherit it).
    """
    os.environ.setdefault('FASTDDS_DEFAULT_PROFILES_FILE', str(large_frames_profile()))


def use_local_ros_domain(domain_id: int | None = None) -> int:
    """Keep DDS on this machine, in `domain_id` or a random one; returns the domain.

    For tools that start their own node (demo, benchmark): a random domain keeps them from talking
    to a robot, or to another run, on the same machine. Call before creating any ROS context.
    """
    if domain_id is None:
        domain_id = random.choice(DOMAIN_IDS)
    os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    os.environ['ROS_DOMAIN_ID'] = str(domain_id)
    return domain_id


def ros_arg_value(value: Any) -> str:
    """A parameter value as `--ros-args -p name:=VALUE` parses it (YAML)."""
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, (list, tuple)):
        return '[' + ', '.join(ros_arg_value(item) for item in value) + ']'
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    return '"' + str(value).replace('"', '\\"') + '"'


class NodeProcess:
    """vlm_node in its own process (`python -m zip_vlm_ros.node.vlm_node`), its log in a file.

    Args:
        parameters: node parameters, passed as `-p name:=value`.
        log_path: file that receives the node's stdout and stderr.
        remaps: topic remappings (from, to).
        params_file: optional YAML params file, applied before `parameters`.
    """

    def __init__(self, parameters: dict[str, Any], log_path: os.PathLike, *,
                 remaps: dict[str, str] | None = None, params_file: os.PathLike | None = None,
                 env: dict[str, str] | None = None):
        self.log_path = pathlib.Path(log_path)
        command = [sys.executable, '-m', 'zip_vlm_ros.node.vlm_node', '--ros-args']
        if params_file is not None:
            command += ['--params-file', str(params_file)]
        for name, value in parameters.items():
            command += ['-p', f'{name}:={ros_arg_value(value)}']
        for source, target in (remaps or {}).items():
            command += ['-r', f'{source}:={target}']
        self.command = command
        self._log = open(self.log_path, 'wb')
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    def log(self) -> str:
        return self.log_path.read_text(errors='replace')

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGINT, then SIGKILL if it does not exit within timeout_s; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


class _LockedActionClient(ActionClient):
    """rclpy 9's ActionClient registers itself with its node (and so with an executor spinning in
    another thread) before it creates its lock: the executor can then call `get_num_entities` on a
    half-built client, which raises AttributeError and kills the spin thread. Creating the lock first
    closes that window; the constructor's own lock then replaces it before any goal exists."""

    def __init__(self, *args: Any, **kwargs: Any):
        self._lock = threading.Lock()
        super().__init__(*args, **kwargs)


class VlmClient:
    """A ROS node of its own (own context and executor thread) that talks to vlm_node.

    Args:
        node_name: full name of the vlm node, e.g. '/zip_vlm' or '/robot/zip_vlm'.
        response_depth: response history of its service clients (RESPONSE_HISTORY_DEPTH: deep
            enough for 100 concurrent callers of one service).
        threads: executor threads (responses and subscriptions).
        feedback_depth: feedback history of its action clients; a reader slower than the node's
            feedback loses the oldest (AskGoal.gap_seen), never the answer.
    """

    def __init__(self, node_name: str = '/' + NODE_NAME, *, client_name: str = 'vlm_client',
                 response_depth: int = RESPONSE_HISTORY_DEPTH, threads: int = 4,
                 feedback_depth: int = RESPONSE_HISTORY_DEPTH):
        self.target = node_name.rstrip('/')
        self.context = Context()
        rclpy.init(context=self.context)
        self.node = Node(client_name, context=self.context)
        self._feedback_depth = feedback_depth
        self._service_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=response_depth,
                                       reliability=ReliabilityPolicy.RELIABLE)
        self._executor = MultiThreadedExecutor(num_threads=threads, context=self.context)
        self._executor.add_node(self.node)
        self._spinner = BackgroundSpinner(self._executor, name='vlm_client')
        self._clients: dict[str, Any] = {}
        self._ready: set = set()  # clients whose server was seen once (see wait_for_service)
        self._publishers: dict[tuple, Any] = {}
        self._action_clients: dict[str, ActionClient] = {}

    def close(self) -> None:
        self._spinner.stop()
        for action_client in self._action_clients.values():
            action_client.destroy()  # Node.destroy_node leaves action clients, and their DDS endpoints
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self.context.destroy()

    def __enter__(self) -> VlmClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ services
    def client(self, srv_type: Any, name: str) -> Any:
        """A (cached) client for service `name` relative to the vlm node ('~/ask' -> /zip_vlm/ask)."""
        full = name.replace('~', self.target, 1) if name.startswith('~') else name
        if full not in self._clients:
            self._clients[full] = self.node.create_client(srv_type, full, qos_profile=self._service_qos)
        return self._clients[full]

    def wait_for_service(self, srv_type: Any, name: str, timeout_s: float) -> bool:
        """Wait until service `name` can be called; False after timeout_s."""
        client = self.client(srv_type, name)
        if client in self._ready:
            return client.service_is_ready() or client.wait_for_service(timeout_sec=timeout_s)
        if not client.wait_for_service(timeout_sec=timeout_s):
            return False
        # The client sees the server's request reader; the server may not see the client's response
        # reader yet, and a response sent before then is lost. Give discovery a moment, once.
        time.sleep(0.5)
        self._ready.add(client)
        return True

    def call(self, srv_type: Any, name: str, request: Any, timeout_s: float = 60.0) -> Any:
        """Call a service and wait for its response; TimeoutError when none comes within timeout_s."""
        client = self.client(srv_type, name)
        if not self.wait_for_service(srv_type, name, timeout_s):
            raise TimeoutError(f'service {name} of {self.target} is not available after {timeout_s} s')
        done = threading.Event()
        future = client.call_async(request)
        future.add_done_callback(lambda _: done.set())
        if not done.wait(timeout_s):
            client.remove_pending_request(future)
            raise TimeoutError(f'no response from {name} of {self.target} within {timeout_s} s')
        return future.result()

    # cameras: surround view (each camera's latest frame); history_frames/history_s: a history of
    # `camera` (see srv/Ask.srv). token_budget is then the request's total over its images.
    def describe(self, camera: str = '', *, token_budget: int = 0, max_new_tokens: int = 0,
                 prompt: str = '', cameras: Sequence[str] = (), history_frames: int = 0, history_s: float = 0.0,
                 reducer: str = '', timeout_s: float = 60.0) -> DescribeScene.Response:
        request = DescribeScene.Request(camera=camera, token_budget=token_budget, max_new_tokens=max_new_tokens,
                                        prompt=prompt, cameras=list(cameras), history_frames=history_frames,
                                        history_s=float(history_s), reducer=reducer)
        return self.call(DescribeScene, '~/describe_scene', request, timeout_s)

    def ask(self, question: str, camera: str = '', *, image: Any = None, token_budget: int = 0,
            max_new_tokens: int = 0, cameras: Sequence[str] = (), history_frames: int = 0,
            history_s: float = 0.0, reducer: str = '', timeout_s: float = 60.0) -> Ask.Response:
        request = Ask.Request(question=question, camera=camera, token_budget=token_budget,
                              max_new_tokens=max_new_tokens, cameras=list(cameras), history_frames=history_frames,
                              history_s=float(history_s), reducer=reducer)
        if image is not None:
            request.image = image
        return self.call(Ask, '~/ask', request, timeout_s)

    def ask_many(self, questions: list[str], camera: str = '', *, image: Any = None,
                 token_budget: int = 0, max_new_tokens: int = 0, cameras: Sequence[str] = (),
                 history_frames: int = 0, history_s: float = 0.0, reducer: str = '',
                 timeout_s: float = 60.0) -> AskMany.Response:
        request = AskMany.Request(questions=questions, camera=camera, token_budget=token_budget,
                                  max_new_tokens=max_new_tokens, cameras=list(cameras),
                                  history_frames=history_frames, history_s=float(history_s), reducer=reducer)
        if image is not None:
            request.image = image
        return self.call(AskMany, '~/ask_many', request, timeout_s)

    # ------------------------------------------------------------------ the ask action
    def action_client(self, name: str = '~/ask_action') -> ActionClient:
        """A (cached) client of the node's Ask action (`name` relative to the vlm node)."""
        full = name.replace('~', self.target, 1) if name.startswith('~') else name
        if full not in self._action_clients:
            self._action_clients[full] = _LockedActionClient(
                self.node, AskAction, full, goal_service_qos_profile=self._service_qos,
                result_service_qos_profile=self._service_qos, cancel_service_qos_profile=self._service_qos,
                feedback_sub_qos_profile=QoSProfile(depth=self._feedback_depth,
                                                    reliability=ReliabilityPolicy.RELIABLE))
        return self._action_clients[full]

    def wait_for_action(self, timeout_s: float, name: str = '~/ask_action') -> bool:
        """Wait until the action server is seen (plus a moment for it to see this client; see
        wait_for_service); False after timeout_s."""
        if not self.action_client(name).wait_for_server(timeout_sec=timeout_s):
            return False
        if name not in self._ready:
            time.sleep(0.5)
            self._ready.add(name)
        return True

    def send_ask_goal(self, question: str, camera: str = '', *, image: Any = None, token_budget: int = 0,
                      max_new_tokens: int = 0, on_feedback: Any = None, cameras: Sequence[str] = (),
                      history_frames: int = 0, history_s: float = 0.0, reducer: str = '',
                      timeout_s: float = 60.0) -> AskGoal:
        """Send an Ask goal and return at once; the AskGoal collects feedback, cancels, waits for the result.

        on_feedback(feedback), if given, runs in this client's executor thread for every feedback.
        """
        if not self.wait_for_action(timeout_s):
            raise TimeoutError(f'action ~/ask_action of {self.target} is not available after {timeout_s} s')
        goal = AskAction.Goal(question=question, camera=camera, token_budget=token_budget,
                              max_new_tokens=max_new_tokens, cameras=list(cameras), history_frames=history_frames,
                              history_s=float(history_s), reducer=reducer)
        if image is not None:
            goal.image = image
        return AskGoal(self.action_client(), goal, on_feedback)

    def ask_streamed(self, question: str, camera: str = '', *, image: Any = None, token_budget: int = 0,
                     max_new_tokens: int = 0, on_feedback: Any = None, cameras: Sequence[str] = (),
                     history_frames: int = 0, history_s: float = 0.0, reducer: str = '',
                     timeout_s: float = 60.0) -> tuple[int, AskAction.Result, AskGoal]:
        """Ask through the action and wait for the answer: (GoalStatus status, result, the goal)."""
        goal = self.send_ask_goal(question, camera, image=image, token_budget=token_budget,
                                  max_new_tokens=max_new_tokens, on_feedback=on_feedback, cameras=cameras,
                                  history_frames=history_frames, history_s=history_s, reducer=reducer,
                                  timeout_s=timeout_s)
        status, result = goal.result(timeout_s)
        return status, result, goal

    def set_parameter(self, name: str, value: Any, timeout_s: float = 10.0) -> tuple[bool, str]:
        """Set one parameter of the vlm node; returns (successful, reason)."""
        message: ParameterMsg = Parameter(name, value=value).to_parameter_msg()
        response = self.call(SetParameters, '~/set_parameters',
                             SetParameters.Request(parameters=[message]), timeout_s)
        result = response.results[0]
        return result.successful, result.reason

    def get_parameter(self, name: str, timeout_s: float = 10.0) -> Any:
        response = self.call(GetParameters, '~/get_parameters', GetParameters.Request(names=[name]),
                             timeout_s)
        return Parameter.from_parameter_msg(ParameterMsg(name=name, value=response.values[0])).value

    # ------------------------------------------------------------------ topics
    def publisher(self, msg_type: Any, topic: str, *, reliable: bool = False, depth: int = 1) -> Any:
        key = (msg_type, topic, reliable, depth)
        if key not in self._publishers:
            reliability = ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT
            self._publishers[key] = self.node.create_publisher(
                msg_type, topic, QoSProfile(depth=depth, reliability=reliability))
        return self._publishers[key]

    def collect(self, msg_type: Any, topic: str, *, depth: int = 50) -> list:
        """Subscribe to `topic` (reliable); received messages are appended to the returned list."""
        received: list = []
        self.node.create_subscription(msg_type, topic, received.append, depth)
        return received

    def now(self) -> Any:
        return self.node.get_clock().now()


class AskGoal:
    """One goal sent to the node's ~/ask_action: its feedback as it arrives, cancel, result.

    Attributes: sent_s and result_s (time.monotonic() when sent and when the result arrived),
    feedback (list of (arrival monotonic s, AskAction.Feedback)).

    The feedback topic is reliable but keep-last: a reader that falls behind the writer's history
    loses the oldest samples, and rclpy's ActionClient drops feedback that arrives after the result.
    So the answer is read from what every message carries in full: `text` is the newest feedback's
    text (by generated_tokens) until the result arrives, then the result's (which holds everything
    the last feedback did). `deltas` concatenates the received deltas; it equals `text` whenever
    `gap_seen` is False.
    """

    def __init__(self, action_client: ActionClient, goal: AskAction.Goal, on_feedback: Any = None):
        self.feedback: list[tuple[float, Any]] = []
        self._on_feedback = on_feedback
        self._accepted = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._goal_handle = None
        self._result = None
        self.result_s: float | None = None
        self.sent_s = time.monotonic()
        future = action_client.send_goal_async(goal, feedback_callback=self._feedback)
        future.add_done_callback(self._goal_answered)

    def _feedback(self, message: Any) -> None:
        with self._lock:
            self.feedback.append((time.monotonic(), message.feedback))
        if self._on_feedback is not None:
            self._on_feedback(message.feedback)

    def _goal_answered(self, future: Any) -> None:
        self._goal_handle = future.result()
        self._accepted.set()
        if self._goal_handle.accepted:
            self._goal_handle.get_result_async().add_done_callback(self._result_arrived)
        else:
            self._done.set()

    def _result_arrived(self, future: Any) -> None:
        with self._lock:
            self.result_s = time.monotonic()
            self._result = future.result()
        self._done.set()

    def _received_in_order(self) -> list[Any]:
        """The received feedback ordered by generated_tokens (the order the node published it in)."""
        with self._lock:
            received = [feedback for _, feedback in self.feedback]
        return sorted(received, key=lambda feedback: feedback.generated_tokens)

    def _result_text(self) -> str | None:
        """The answer the result carries (the whole answer, or the partial text of a stopped goal);
        None before the result or when the goal was rejected."""
        with self._lock:
            result = self._result
        if result is None:
            return None
        answer = result.result
        return answer.result.text if answer.success else answer.partial_text

    @property
    def text(self) -> str:
        """The answer so far: the result's text once it arrived, else the newest feedback's text."""
        result_text = self._result_text()
        if result_text is not None:
            return result_text
        received = self._received_in_order()
        return received[-1].text if received else ''

    @property
    def deltas(self) -> str:
        """The received deltas concatenated in generated_tokens order: equals `text` unless gap_seen."""
        return ''.join(feedback.delta for feedback in self._received_in_order())

    @property
    def gap_seen(self) -> bool:
        """True when a feedback that changed the text was not received: a received one does not extend
        the one before it, or the result's text is not where the received feedback ended."""
        streamed = ''
        for feedback in self._received_in_order():
            if feedback.text != streamed + feedback.delta:
                return True
            streamed = feedback.text
        result_text = self._result_text()
        return result_text is not None and result_text != streamed

    def wait_accepted(self, timeout_s: float) -> bool:
        return self._accepted.wait(timeout_s) and self._goal_handle.accepted

    def cancel(self, timeout_s: float = 10.0) -> Any:
        """Request the cancel and wait for the server's CancelGoal response."""
        if not self.wait_accepted(timeout_s):
            raise TimeoutError(f'the goal was not accepted within {timeout_s} s')
        done = threading.Event()
        future = self._goal_handle.cancel_goal_async()
        future.add_done_callback(lambda _: done.set())
        if not done.wait(timeout_s):
            raise TimeoutError(f'no cancel response within {timeout_s} s')
        return future.result()

    def result(self, timeout_s: float = 60.0) -> tuple[int, Any]:
        """(GoalStatus status, AskAction.Result); TimeoutError when none comes within timeout_s."""
        if not self._done.wait(timeout_s):
            raise TimeoutError(f'no result from ~/ask_action within {timeout_s} s')
        if self._result is None:  # the server rejected the goal (this node never does)
            return GoalStatus.STATUS_UNKNOWN, AskAction.Result(message='the goal was rejected')
        return self._result.status, self._result.result


def wait_until_answered(client: VlmClient, srv_type: Any, name: str, request: Any, timeout_s: float) -> bool:
    """Call `name` with `request` until a response arrives (False after timeout_s).

    Seeing the service is not enough for a burst: the server may not have discovered this client's
    response reader yet, and a response sent before that is lost (under load, discovery of 40 new
    participants took longer than VlmClient's 0.5 s pause). The first answered call proves both
    directions; use a request the node refuses at once (an empty question).
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            client.call(srv_type, name, request, timeout_s=min(2.0, max(0.1, deadline - time.monotonic())))
            return True
        except TimeoutError:
            continue
    return False


def call_at_once(clients: list[VlmClient], call: Any, timeout_s: float) -> list[tuple[Any, float]]:
    """Make `call(client)` from every client at the same moment, each in its own thread.

    Returns (response, seconds) per client in order; a call unanswered within timeout_s gives
    (TimeoutError, seconds). Each client should have discovered the service beforehand, or its
    first call also waits for discovery.
    """
    outcomes: list[tuple[Any, float]] = [(None, 0.0)] * len(clients)
    barrier = threading.Barrier(len(clients))

    def run(index: int, client: VlmClient) -> None:
        barrier.wait()
        started = time.monotonic()
        try:
            response = call(client)
        except TimeoutError as error:
            response = error
        outcomes[index] = (response, time.monotonic() - started)

    threads = [threading.Thread(target=run, args=(index, client)) for index, client in enumerate(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s + 30.0)
    return outcomes


def wait_until(predicate: Any, timeout_s: float, interval_s: float = 0.05) -> bool:
    """Poll predicate() until it is true or timeout_s passes; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return bool(value)
        time.sleep(interval_s)


class ImageStreamer:
    """Publish images on a topic at a fixed rate from a thread, each stamped with the current time.

    Args:
        client: the VlmClient whose node publishes.
        messages: Image or CompressedImage messages, published in turn (their stamps are rewritten).
        rate_hz: publishing rate.
        reliable: reliable QoS instead of best effort.
    """

    def __init__(self, client: VlmClient, topic: str, messages: list, *, rate_hz: float = 10.0,
                 reliable: bool = False, frame_id: str = 'camera'):
        self._client, self._messages = client, messages
        self._publisher = client.publisher(type(messages[0]), topic, reliable=reliable)
        self._period_s = 1.0 / rate_hz
        self._frame_id = frame_id
        self._stop = threading.Event()
        self.published = 0
        self.last_stamp = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        next_s = time.monotonic()
        while not self._stop.is_set():
            msg = self._messages[self.published % len(self._messages)]
            msg.header.stamp = self._client.now().to_msg()
            msg.header.frame_id = self._frame_id
            self._publisher.publish(msg)
            self.last_stamp = msg.header.stamp
            self.published += 1
            next_s += self._period_s
            self._stop.wait(max(0.0, next_s - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
