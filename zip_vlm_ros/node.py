"""vlm_node: the ROS 2 lifecycle node `zip_vlm`, a thin layer that serves the VLM engine.

    vlm_node --ros-args --params-file config/vlm.yaml      # or: ros2 run zip_vlm_ros vlm_node

What it does, and what it never does:
- Image subscriptions keep only each camera's latest message and its header. Nothing is decoded or
  inferred in an image callback; a frame is decoded when a request uses it.
- One worker thread runs the engine. Service requests wait FIFO (at most `max_pending_requests`;
  beyond that they are refused at once), each with a deadline of `request_timeout_s` that covers
  waiting and inference.
- Services `~/describe_scene`, `~/ask`, `~/ask_many` answer with success/message; every result also
  goes to `~/results` (VlmResult, header = the source image's header) and its text to
  `~/description` or `~/answer`.
- `/diagnostics` at 1 Hz: model, device, latency, queue depth, per-camera frame counters, last error.
- Lifecycle: configure loads the model, activate creates subscriptions/services/timers, deactivate
  removes them, cleanup frees the model (and CUDA memory). `autostart` (default true) runs
  configure + activate at startup; if configuring fails the process exits 1 with one log line.
"""
from __future__ import annotations

import collections
import functools
import math
import re
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import rclpy
import transformers
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from zip_vlm_ros.conversions import (
    ImageConversionError, image_has_pixels, image_to_rgb, message_to_rgb, output_to_result,
    stamp_to_seconds)
from zip_vlm_ros.engine import DEFAULT_DESCRIBE_PROMPT, EngineConfig, EngineError, VlmEngine
from zip_vlm_ros.msg import VlmResult
from zip_vlm_ros.srv import Ask, AskMany, DescribeScene

NODE_NAME = 'zip_vlm'
IMAGE_TYPES = {'sensor_msgs/Image': Image, 'sensor_msgs/CompressedImage': CompressedImage}
IMAGE_QOS_CHOICES = ('sensor_data', 'reliable')
INLINE_CAMERA = 'inline'
# A camera without a frame for this long turns the diagnostics WARN.
NO_FRAME_WARN_S = 5.0
# Timeouts and refusals this recent turn the diagnostics WARN.
RECENT_PROBLEM_S = 30.0
# The same kind of bad input is logged at most once per this period (with a count of the rest).
WARN_THROTTLE_S = 5.0
INACTIVE_MESSAGE = 'the node is not active: activate it with the lifecycle service ~/change_state'


@dataclass(frozen=True)
class ParameterSpec:
    """One node parameter: its default, what it means, and whether `ros2 param set` may change it."""

    name: str
    default: Any
    description: str
    runtime: bool = False


# Every parameter of the node, in one place. config/vlm.yaml lists the same names (a test checks).
NODE_PARAMETERS = (
    ParameterSpec('model', 'llava-hf/llava-1.5-7b-hf',
                  'LLaVA checkpoint (LlavaForConditionalGeneration): a local directory or a hub id'),
    ParameterSpec('device', 'auto', 'auto (CUDA when available), cpu, cuda or cuda:N'),
    ParameterSpec('dtype', 'auto', 'auto (float16 on CUDA, float32 on CPU), float16, bfloat16 or float32'),
    ParameterSpec('cameras', ['front'],
                  'camera names; each has camera.<name>.topic and camera.<name>.type parameters'),
    ParameterSpec('image_qos', 'sensor_data',
                  'image subscription QoS: sensor_data (best effort: reliable and best-effort '
                  'publishers both reach the node) or reliable (reliable publishers only)'),
    ParameterSpec('token_budget', 64,
                  'visual tokens kept by VisionZip per image (1..the model\'s visual tokens, 576 for '
                  'LLaVA-1.5); requests may override it', runtime=True),
    ParameterSpec('dominant_ratio', 54 / 64,
                  'share of the budget given to dominant tokens (0 < r <= 1); the rest are '
                  'contextual tokens merged from the remainder'),
    ParameterSpec('max_new_tokens', 64, 'longest answer in tokens; requests may override it',
                  runtime=True),
    ParameterSpec('describe_prompt', DEFAULT_DESCRIBE_PROMPT,
                  'prompt of ~/describe_scene and of the periodic description', runtime=True),
    ParameterSpec('describe_period_s', 0.0,
                  '0: off; else describe each camera\'s latest (new) frame every this many seconds '
                  'on ~/description and ~/results', runtime=True),
    ParameterSpec('max_image_age_s', 2.0,
                  'refuse frames older than this (node clock minus image stamp; 0: no limit)'),
    ParameterSpec('max_pending_requests', 4,
                  'requests that may wait behind the running one; more are refused at once'),
    ParameterSpec('request_timeout_s', 30.0,
                  'deadline of a request, waiting plus inference; past it the caller gets "timed out"'),
    ParameterSpec('question_max_chars', 500, 'longest accepted question or prompt, in characters'),
    ParameterSpec('autostart', True,
                  'configure and activate at startup; false: wait for the lifecycle services'),
)
RUNTIME_PARAMETERS = frozenset(spec.name for spec in NODE_PARAMETERS if spec.runtime)
_CAMERA_NAME = re.compile(r'^[A-Za-z][A-Za-z0-9_]*$')


def camera_parameter_specs(camera: str, index: int) -> tuple[ParameterSpec, ParameterSpec]:
    """The two parameters of one camera. The first camera reads `image_raw`, others `<name>/image_raw`."""
    topic = 'image_raw' if index == 0 else f'{camera}/image_raw'
    return (
        ParameterSpec(f'camera.{camera}.topic', topic,
                      f'image topic of camera {camera!r} (relative names resolve in the node namespace)'),
        ParameterSpec(f'camera.{camera}.type', 'sensor_msgs/Image',
                      f'message type of camera {camera!r}: {" or ".join(IMAGE_TYPES)}'),
    )


def declared_parameter_names(cameras: list[str]) -> set[str]:
    """Names the node declares for this camera list (config/vlm.yaml must list exactly these)."""
    names = {spec.name for spec in NODE_PARAMETERS}
    for index, camera in enumerate(cameras):
        names.update(spec.name for spec in camera_parameter_specs(camera, index))
    return names


class ParameterError(ValueError):
    """A parameter value the node cannot run with; str(e) names it, the value and what is valid."""


def parameter_problem(name: str, value: Any, *, visual_tokens_full: int | None = None) -> str | None:
    """Why `value` is not valid for parameter `name`, or None when it is.

    visual_tokens_full: the loaded model's visual token count (bounds token_budget), None before load.
    """
    if name == 'token_budget':
        upper = visual_tokens_full
        if value < 1 or (upper is not None and value > upper):
            valid = f'1..{upper} (this model has {upper} visual tokens)' if upper else 'at least 1'
            return f'token_budget {value} is out of range: use {valid}'
    elif name == 'max_new_tokens' and value < 1:
        return f'max_new_tokens {value} is out of range: use at least 1'
    elif name == 'describe_period_s' and not (math.isfinite(value) and value >= 0):
        return f'describe_period_s {value} is invalid: use 0 (off) or a period in seconds'
    elif name == 'describe_prompt' and not value.strip():
        return 'describe_prompt is empty: give the prompt text used for scene descriptions'
    elif name == 'dominant_ratio' and not 0 < value <= 1:
        return f'dominant_ratio {value} is out of range: use 0 < dominant_ratio <= 1 (default 54/64)'
    elif name == 'image_qos' and value not in IMAGE_QOS_CHOICES:
        return f'image_qos {value!r} is not known: use {" or ".join(IMAGE_QOS_CHOICES)}'
    elif name == 'max_image_age_s' and not (math.isfinite(value) and value >= 0):
        return f'max_image_age_s {value} is invalid: use 0 (no limit) or an age in seconds'
    elif name == 'max_pending_requests' and value < 0:
        return f'max_pending_requests {value} is negative: use 0 or more'
    elif name == 'request_timeout_s' and not (math.isfinite(value) and value > 0):
        return f'request_timeout_s {value} is invalid: use a positive number of seconds'
    elif name == 'question_max_chars' and value < 1:
        return f'question_max_chars {value} is out of range: use at least 1'
    elif name == 'model' and not value.strip():
        return 'model is empty: set it to a LLaVA checkpoint directory or hub id'
    elif name == 'cameras':
        if not value:
            return 'cameras is empty: list at least one camera name, e.g. [front]'
        bad = [camera for camera in value if not _CAMERA_NAME.match(camera)]
        if bad:
            return (f'cameras has invalid name(s) {", ".join(map(repr, bad))}: use letters, digits '
                    f'and underscores, starting with a letter')
        if len(set(value)) != len(value):
            return f'cameras lists a name twice ({list(value)}): give each camera once'
    elif name.startswith('camera.') and name.endswith('.type') and value not in IMAGE_TYPES:
        return f'{name} {value!r} is not supported: use {" or ".join(IMAGE_TYPES)}'
    elif name.startswith('camera.') and name.endswith('.topic') and not value.strip():
        return f'{name} is empty: give the image topic of this camera'
    return None


@dataclass(frozen=True)
class Settings:
    """Parameters fixed while the node is configured (read on configure)."""

    model: str
    device: str
    dtype: str
    cameras: tuple[str, ...]
    camera_topics: dict[str, str]
    camera_types: dict[str, str]
    image_qos: str
    dominant_ratio: float
    max_image_age_s: float
    max_pending_requests: int
    request_timeout_s: float
    question_max_chars: int


def image_qos_profile(name: str) -> QoSProfile:
    """Depth 1: only the latest frame matters, and each queued raw frame can be megabytes."""
    reliability = ReliabilityPolicy.BEST_EFFORT if name == 'sensor_data' else ReliabilityPolicy.RELIABLE
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=reliability)


class RequestRejected(Exception):
    """A request the node answers with success=false; `key` groups it for throttled log warnings."""

    def __init__(self, key: Any, message: str):
        super().__init__(message)
        self.key = key


@dataclass
class Frame:
    """A received image message, undecoded, and its sequence number within its camera."""

    msg: Any
    seq: int
    received_s: float  # time.monotonic() at receipt
    used: bool = False


class CameraFeed:
    """The latest frame of one camera and its counters.

    The image callback (`store`) only swaps a reference under a lock: decoding happens in `rgb`,
    called by the worker when a request uses the frame. A frame replaced before any request used it
    counts as superseded.
    """

    def __init__(self, name: str, topic: str, type_name: str):
        self.name, self.topic, self.type_name = name, topic, type_name
        self._lock = threading.Lock()
        self._latest: Frame | None = None
        self._seq = 0
        self.received = 0
        self.superseded = 0
        self._decoded: tuple[int, np.ndarray] | None = None  # (seq, rgb) of the last decoded frame

    def store(self, msg: Any) -> None:
        with self._lock:
            self._seq += 1
            if self._latest is not None and not self._latest.used:
                self.superseded += 1
            self._latest = Frame(msg, self._seq, time.monotonic())
            self.received += 1

    def peek(self) -> Frame | None:
        return self._latest

    def take(self) -> Frame | None:
        """The latest frame, marked as used by a request."""
        with self._lock:
            if self._latest is not None:
                self._latest.used = True
            return self._latest

    def rgb(self, frame: Frame) -> np.ndarray:
        """Decode `frame` to (H, W, 3) uint8 RGB; repeated requests on one frame decode it once."""
        decoded = self._decoded
        if decoded is not None and decoded[0] == frame.seq:
            return decoded[1]
        rgb = message_to_rgb(frame.msg)
        self._decoded = (frame.seq, rgb)
        return rgb


@dataclass
class InlineImage:
    rgb: np.ndarray
    header: Any


class Job:
    """One request on its way through the queue and the worker.

    State moves WAITING -> RUNNING -> DONE, or to DROPPED (deadline passed while waiting: never run)
    or ABANDONED (deadline passed while running: the late result is discarded). The lock makes the
    worker finishing and the caller timing out agree on which of them won.
    """

    WAITING, RUNNING, DONE, DROPPED, ABANDONED = 'waiting', 'running', 'done', 'dropped', 'abandoned'

    def __init__(self, kind: str, prompts: list[str], *, camera: str, inline: InlineImage | None,
                 token_budget: int, max_new_tokens: int, timeout_s: float, periodic: bool = False):
        self.kind, self.prompts, self.camera, self.inline = kind, prompts, camera, inline
        self.token_budget, self.max_new_tokens = token_budget, max_new_tokens
        self.timeout_s, self.periodic = timeout_s, periodic
        self.submitted_s = time.monotonic()
        self.deadline_s = self.submitted_s + timeout_s
        self.state = Job.WAITING
        self.results: list[VlmResult] = []
        self.error: str | None = None
        self._lock = threading.Lock()
        self._settled = threading.Event()

    def start(self) -> bool:
        """Worker: claim the job to run it; False when it was cancelled or its deadline passed."""
        with self._lock:
            if self.state != Job.WAITING:
                return False
            if time.monotonic() >= self.deadline_s:
                self.state = Job.DROPPED
                self._settled.set()
                return False
            self.state = Job.RUNNING
            return True

    def finish(self, results: list[VlmResult], error: str | None) -> bool:
        """Worker: deliver the outcome; False when the job is no longer wanted (late or cancelled)."""
        with self._lock:
            if self.state != Job.RUNNING:
                return False
            if time.monotonic() >= self.deadline_s:
                self.state = Job.ABANDONED
                self._settled.set()
                return False
            self.state, self.results, self.error = Job.DONE, results, error
            self._settled.set()
            return True

    def cancel(self, reason: str) -> None:
        """Answer the job with `reason` now (node deactivating); a running job's result is discarded."""
        with self._lock:
            if self.state in (Job.WAITING, Job.RUNNING):
                self.state, self.error = Job.DONE, reason
                self._settled.set()

    def wait(self) -> None:
        """Caller: block until the job is settled or its deadline passes (then mark it timed out)."""
        self._settled.wait(max(0.0, self.deadline_s - time.monotonic()))
        with self._lock:
            if self.state == Job.WAITING:
                self.state = Job.DROPPED
            elif self.state == Job.RUNNING:
                self.state = Job.ABANDONED
            self._settled.set()

    def timeout_message(self) -> str:
        if self.state == Job.DROPPED:
            return (f'timed out after {self.timeout_s:g} s (request_timeout_s) waiting in the queue: '
                    f'the node is busy; retry later, or raise request_timeout_s')
        return (f'timed out after {self.timeout_s:g} s (request_timeout_s) during inference: lower '
                f'max_new_tokens or token_budget, or raise request_timeout_s')


class RequestQueue:
    """FIFO of jobs for the worker: one running plus at most `max_pending` waiting."""

    def __init__(self, max_pending: int):
        self.max_pending = max_pending
        self._jobs: collections.deque[Job] = collections.deque()
        self._busy = False  # the worker holds a job (from `next` until `done`)
        self._open = False  # accepting jobs (the node is active)
        self._ready = threading.Condition()

    def open(self) -> None:
        with self._ready:
            self._open = True

    def close(self) -> list[Job]:
        """Stop accepting jobs; returns the ones still waiting (the caller answers them)."""
        with self._ready:
            self._open = False
            jobs = list(self._jobs)
            self._jobs.clear()
            return jobs

    def submit(self, job: Job) -> None:
        """Queue `job`, or raise RequestRejected at once: inactive, or max_pending already waiting."""
        with self._ready:
            if not self._open:
                raise RequestRejected('inactive', INACTIVE_MESSAGE)
            self._prune()
            ahead = len(self._jobs) + int(self._busy)
            if ahead >= self.max_pending + 1:
                raise RequestRejected('busy', (
                    f'busy: {ahead} request(s) ahead and max_pending_requests = {self.max_pending}: '
                    f'retry later, or raise max_pending_requests'))
            self._jobs.append(job)
            self._ready.notify()

    def next(self, timeout_s: float) -> Job | None:
        """Worker: the oldest job (the queue counts as busy until `done`), or None after timeout_s."""
        with self._ready:
            if not self._jobs:
                self._ready.wait(timeout_s)
            if not self._jobs:
                return None
            self._busy = True
            return self._jobs.popleft()

    def done(self) -> None:
        with self._ready:
            self._busy = False

    def _prune(self) -> None:
        """Forget jobs whose callers gave up (deadline passed): they hold no place in the queue."""
        if any(job.state != Job.WAITING for job in self._jobs):
            self._jobs = collections.deque(job for job in self._jobs if job.state == Job.WAITING)

    def __len__(self) -> int:
        """Jobs waiting (those whose callers gave up excluded)."""
        with self._ready:
            self._prune()
            return len(self._jobs)


class ThrottledWarnings:
    """Log a warning per key at most once per period, with the count of the ones held back."""

    def __init__(self, logger: Any, period_s: float = WARN_THROTTLE_S):
        self._logger, self._period_s = logger, period_s
        self._last: dict[Any, list] = {}  # key -> [time logged, suppressed since]
        self._lock = threading.Lock()

    def warn(self, key: Any, message: str) -> bool:
        now = time.monotonic()
        with self._lock:
            entry = self._last.get(key)
            if entry is not None and now - entry[0] < self._period_s:
                entry[1] += 1
                return False
            held_back = entry[1] if entry else 0
            self._last[key] = [now, 0]
        suffix = f' ({held_back} more like this in the last {self._period_s:g} s)' if held_back else ''
        self._logger.warning(message + suffix)
        return True


class RequestStats:
    """Counters and recent latencies for /diagnostics."""

    def __init__(self, window: int = 200):
        self._lock = threading.Lock()
        self._round_trip_ms: collections.deque[float] = collections.deque(maxlen=window)
        self._inference_ms: collections.deque[float] = collections.deque(maxlen=window)
        self._callback_us: collections.deque[float] = collections.deque(maxlen=window)
        self.counts = collections.Counter()
        self._problems: collections.deque[float] = collections.deque(maxlen=window)
        self.last_error = ''

    def succeeded(self, round_trip_ms: float, inference_ms: list[float]) -> None:
        with self._lock:
            self.counts['ok'] += 1
            self._round_trip_ms.append(round_trip_ms)
            self._inference_ms.extend(inference_ms)

    def image_callback(self, duration_us: float) -> None:
        with self._lock:
            self._callback_us.append(duration_us)

    def latencies(self) -> dict[str, list[float]]:
        """Copies of the recent samples: round_trip_ms, inference_ms, callback_us."""
        with self._lock:
            return {'round_trip_ms': list(self._round_trip_ms), 'inference_ms': list(self._inference_ms),
                    'callback_us': list(self._callback_us)}

    def failed(self, kind: str, message: str) -> None:
        """kind: 'failed' (bad input, engine error), 'refused' (queue full), 'timed_out', 'late'."""
        with self._lock:
            self.counts[kind] += 1
            self.last_error = message
            if kind in ('refused', 'timed_out', 'late'):
                self._problems.append(time.monotonic())

    def recent_problems(self, within_s: float) -> int:
        now = time.monotonic()
        with self._lock:
            return sum(1 for stamp in self._problems if now - stamp <= within_s)


def percentile(values: list[float], q: float) -> float:
    """q-th percentile of `values`, NaN when empty."""
    return float(np.percentile(values, q)) if values else float('nan')


class VlmNode(LifecycleNode):
    """Lifecycle node `zip_vlm`: parameters, frames, services, worker and diagnostics around VlmEngine."""

    def __init__(self, **node_kwargs: Any):
        super().__init__(NODE_NAME, **node_kwargs)
        self._declare_parameters()
        self.autostart = bool(self.get_parameter('autostart').value)
        # Executor threads: one per caller that may block on a queued or running request (service
        # callbacks wait on their job), plus images, timers, and parameter/lifecycle services.
        self.executor_threads = int(self.get_parameter('max_pending_requests').value) + 5

        # What may run in parallel (MultiThreadedExecutor):
        # - requests (Reentrant): service callbacks; several callers wait on their jobs concurrently.
        # - images (MutuallyExclusive): image callbacks, one at a time; each only swaps a reference,
        #   so they keep up with every camera while requests wait or the worker infers.
        # - timers (MutuallyExclusive): diagnostics and the periodic describer; never block.
        # - the default group: parameter and lifecycle services (configure loads the model there).
        # The engine itself runs only on the worker thread (it is not thread-safe).
        self._requests_group = ReentrantCallbackGroup()
        self._images_group = MutuallyExclusiveCallbackGroup()
        self._timers_group = MutuallyExclusiveCallbackGroup()

        self._warnings = ThrottledWarnings(self.get_logger())
        self._stats = RequestStats()
        self._settings: Settings | None = None
        self._engine: VlmEngine | None = None
        self._feeds: dict[str, CameraFeed] = {}
        self._queue: RequestQueue | None = None
        self._worker: threading.Thread | None = None
        self._worker_stop = threading.Event()
        self._running_job: Job | None = None
        self._active = False
        self._activated_s = time.monotonic()
        self._subscriptions_made: list[Any] = []
        self._services_made: list[Any] = []
        self._describe_timer = None
        self._last_described: dict[str, int] = {}
        self._publishers_made: dict[str, Any] = {}
        self._steady_clock = Clock(clock_type=ClockType.STEADY_TIME)

        self._diagnostics_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self._diagnostics_timer = self.create_timer(
            1.0, self._publish_diagnostics, callback_group=self._timers_group, clock=self._steady_clock)
        self.add_on_set_parameters_callback(self._validate_parameter_change)
        self.add_post_set_parameters_callback(self._apply_parameter_change)

    # ---------------------------------------------------------------- parameters
    def _declare_parameters(self) -> None:
        for spec in NODE_PARAMETERS:
            self._declare(spec)
        cameras = list(self.get_parameter('cameras').value)
        problem = parameter_problem('cameras', cameras)
        if problem:
            raise ParameterError(problem)
        for index, camera in enumerate(cameras):
            for spec in camera_parameter_specs(camera, index):
                self._declare(spec)
        self._own_parameters = declared_parameter_names(cameras)
        # rclpy ignores overrides nobody declares: a misspelt name in the params file would go unnoticed
        unknown = sorted(name for name in self._parameter_overrides if not self.has_parameter(name))
        if unknown:
            self.get_logger().warning(
                f'ignoring unknown parameter(s) {", ".join(unknown)}: check their spelling '
                f'(known: {", ".join(sorted(self._own_parameters))})')

    def _declare(self, spec: ParameterSpec) -> None:
        runtime = 'changes at runtime' if spec.runtime else 'read-only at runtime'
        self.declare_parameter(
            spec.name, spec.default,
            ParameterDescriptor(description=f'{spec.description} ({runtime})'))

    def _validate_parameter_change(self, parameters: list[Parameter]) -> SetParametersResult:
        """Reject read-only parameters and bad values of runtime ones; nothing is applied here."""
        full = self._engine.visual_tokens_full if self._engine is not None else None
        for parameter in parameters:
            if parameter.name not in self._own_parameters:
                continue  # rclpy's own (use_sim_time) are not ours to judge
            if parameter.name not in RUNTIME_PARAMETERS:
                return SetParametersResult(successful=False, reason=(
                    f'{parameter.name} is read-only at runtime: set it in the params file or with '
                    f'--ros-args -p {parameter.name}:=... and restart the node'))
            problem = parameter_problem(parameter.name, parameter.value, visual_tokens_full=full)
            if problem:
                return SetParametersResult(successful=False, reason=problem)
        return SetParametersResult(successful=True)

    def _apply_parameter_change(self, parameters: list[Parameter]) -> None:
        names = {parameter.name for parameter in parameters}
        if 'describe_period_s' in names and self._active:
            self._schedule_describer()
        if names & RUNTIME_PARAMETERS:
            self.get_logger().info('set ' + ', '.join(
                f'{p.name}={p.value!r}' for p in parameters if p.name in RUNTIME_PARAMETERS))

    def _param(self, name: str) -> Any:
        return self.get_parameter(name).value

    def _read_settings(self) -> Settings:
        """Validate every parameter (ParameterError names the first bad one) and snapshot the fixed ones."""
        for name in sorted(self._own_parameters):
            problem = parameter_problem(name, self._param(name))
            if problem:
                raise ParameterError(problem)
        cameras = tuple(self._param('cameras'))
        return Settings(
            model=self._param('model'), device=self._param('device'), dtype=self._param('dtype'),
            cameras=cameras,
            camera_topics={camera: self._param(f'camera.{camera}.topic') for camera in cameras},
            camera_types={camera: self._param(f'camera.{camera}.type') for camera in cameras},
            image_qos=self._param('image_qos'), dominant_ratio=float(self._param('dominant_ratio')),
            max_image_age_s=float(self._param('max_image_age_s')),
            max_pending_requests=int(self._param('max_pending_requests')),
            request_timeout_s=float(self._param('request_timeout_s')),
            question_max_chars=int(self._param('question_max_chars')))

    # ---------------------------------------------------------------- lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Load the model. A failure is logged as one line and leaves the node unconfigured."""
        started = time.monotonic()
        try:
            settings = self._read_settings()
            engine = VlmEngine(EngineConfig(
                model=settings.model, device=settings.device, dtype=settings.dtype,
                token_budget=int(self._param('token_budget')),
                contextual_ratio=1.0 - settings.dominant_ratio,
                max_new_tokens=int(self._param('max_new_tokens'))))
            problem = parameter_problem('token_budget', self._param('token_budget'),
                                        visual_tokens_full=engine.visual_tokens_full)
            if problem:
                engine.close()
                raise ParameterError(problem)
        except (ParameterError, EngineError) as error:
            return self._configure_failed(str(error))
        except Exception as error:  # a bug, not bad input: keep the traceback in the debug log
            self.get_logger().debug(traceback.format_exc())
            return self._configure_failed(f'{type(error).__name__}: {error}')
        self._settings, self._engine = settings, engine
        self._feeds = {camera: CameraFeed(camera, settings.camera_topics[camera],
                                          settings.camera_types[camera]) for camera in settings.cameras}
        self._queue = RequestQueue(settings.max_pending_requests)
        self._publishers_made = {
            'results': self.create_lifecycle_publisher(VlmResult, '~/results', 10),
            'description': self.create_lifecycle_publisher(String, '~/description', 10),
            'answer': self.create_lifecycle_publisher(String, '~/answer', 10),
        }
        self.get_logger().info(
            f'loaded {engine.model_name} on {engine.device} ({str(engine.dtype).replace("torch.", "")}) '
            f'in {time.monotonic() - started:.1f} s: {engine.visual_tokens_full} visual tokens, '
            f'token_budget {self._param("token_budget")}')
        return super().on_configure(state)

    def _configure_failed(self, message: str) -> TransitionCallbackReturn:
        self._stats.last_error = message
        self.get_logger().error(f'configure failed: {message}')
        return TransitionCallbackReturn.FAILURE

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._activate()
        except Exception as error:  # rclpy would turn it into a silent ERROR transition
            self.get_logger().error(f'activate failed: {type(error).__name__}: {error}')
            self.get_logger().debug(traceback.format_exc())
            return TransitionCallbackReturn.FAILURE
        return super().on_activate(state)

    def _activate(self) -> None:
        """Subscriptions, services, the worker and the periodic describer."""
        settings = self._settings
        self._join_worker()
        qos = image_qos_profile(settings.image_qos)
        for feed in self._feeds.values():
            self._subscriptions_made.append(self.create_subscription(
                IMAGE_TYPES[feed.type_name], feed.topic, functools.partial(self._on_image, feed), qos,
                callback_group=self._images_group))
        self._services_made = [
            self.create_service(DescribeScene, '~/describe_scene', self._on_describe_scene,
                                callback_group=self._requests_group),
            self.create_service(Ask, '~/ask', self._on_ask, callback_group=self._requests_group),
            self.create_service(AskMany, '~/ask_many', self._on_ask_many,
                                callback_group=self._requests_group),
        ]
        self._worker_stop.clear()
        self._queue.open()
        self._worker = threading.Thread(target=self._worker_loop, name='vlm_worker', daemon=True)
        self._worker.start()
        self._active = True
        self._activated_s = time.monotonic()
        self._schedule_describer()
        topics = ', '.join(f'{feed.name}={self.resolve_topic_name(feed.topic)}' for feed in self._feeds.values())
        self.get_logger().info(f'active: cameras {topics} ({settings.image_qos} QoS)')

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._deactivate()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        return super().on_cleanup(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._deactivate()
        self._release()
        return super().on_shutdown(state)

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._deactivate()
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def _deactivate(self) -> None:
        """Remove subscriptions, services and the describer; answer waiting callers; stop the worker.

        A job still running keeps the worker busy until the engine returns; its result is discarded.
        """
        self._stop_serving('the node was deactivated: activate it again (lifecycle ~/change_state) '
                           'and retry')
        if self._describe_timer is not None:
            self.destroy_timer(self._describe_timer)
            self._describe_timer = None
        for subscription in self._subscriptions_made:
            self.destroy_subscription(subscription)
        for service in self._services_made:
            self.destroy_service(service)
        self._subscriptions_made, self._services_made = [], []

    def _stop_serving(self, reason: str) -> None:
        """Refuse new requests, answer queued and running ones with `reason`, stop the worker."""
        self._active = False
        self._worker_stop.set()
        if self._queue is not None:
            for job in self._queue.close():
                job.cancel(reason)
        running = self._running_job
        if running is not None:
            running.cancel(reason)

    def _join_worker(self, timeout_s: float | None = None) -> None:
        if self._worker is not None:
            self._worker.join(timeout_s)
            if not self._worker.is_alive():
                self._worker = None

    def _release(self) -> None:
        """Free the model (and CUDA memory), publishers and frames."""
        self._join_worker(timeout_s=None if self._worker_stop.is_set() else 0)
        for publisher in self._publishers_made.values():
            self.destroy_lifecycle_publisher(publisher)
        self._publishers_made = {}
        if self._engine is not None:
            self._engine.close()
            self._engine = None
            self.get_logger().info('model released')
        self._feeds, self._last_described = {}, {}

    def start(self) -> bool:
        """Autostart: configure and activate; False (reason logged) when either fails."""
        if self.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            return False
        return self.trigger_activate() == TransitionCallbackReturn.SUCCESS

    def close(self) -> None:
        """Process exit: answer waiting callers, stop the worker (a running job gets 5 s to end),
        free the model. Entities go with destroy_node()."""
        self._stop_serving('the node is shutting down')
        self._join_worker(timeout_s=5.0)
        if self._worker is None and self._engine is not None:
            self._engine.close()
            self._engine = None

    # ---------------------------------------------------------------- frames
    def _on_image(self, feed: CameraFeed, msg: Any) -> None:
        """Keep the message as the camera's latest frame. No decoding, no inference here."""
        started = time.perf_counter_ns()
        feed.store(msg)
        self._stats.image_callback((time.perf_counter_ns() - started) / 1e3)

    def _age_s(self, stamp: Any) -> float:
        """Node clock (sim time under use_sim_time) minus an image stamp, in seconds."""
        return self.get_clock().now().nanoseconds * 1e-9 - stamp_to_seconds(stamp)

    # ---------------------------------------------------------------- requests
    def _check_prompt(self, text: str, what: str) -> str:
        text = text.strip()
        if not text:
            raise RequestRejected(f'empty_{what}', f'{what} is empty: send the {what} text')
        limit = self._settings.question_max_chars
        if len(text) > limit:
            raise RequestRejected(f'long_{what}', (
                f'{what} is {len(text)} characters, more than question_max_chars = {limit}: '
                f'shorten it, or raise question_max_chars'))
        return text

    def _resolve_limits(self, token_budget: int, max_new_tokens: int) -> tuple[int, int]:
        """Request overrides (0 = node default) checked against the model; returns the values to use."""
        full = self._engine.visual_tokens_full
        if token_budget == 0:
            token_budget = int(self._param('token_budget'))
        elif not 1 <= token_budget <= full:
            raise RequestRejected('token_budget', (
                f'token_budget {token_budget} is out of range: use 1..{full} (this model\'s visual '
                f'tokens), or 0 = node default ({self._param("token_budget")})'))
        if max_new_tokens == 0:
            max_new_tokens = int(self._param('max_new_tokens'))
        elif max_new_tokens < 0:
            raise RequestRejected('max_new_tokens', (
                f'max_new_tokens {max_new_tokens} is negative: use a positive count, or 0 = node '
                f'default ({self._param("max_new_tokens")})'))
        return token_budget, max_new_tokens

    def _resolve_camera(self, camera: str) -> str:
        camera = camera.strip() or self._settings.cameras[0]
        feed = self._feeds.get(camera)
        if feed is None:
            raise RequestRejected('unknown_camera', (
                f'unknown camera {camera!r}: this node has {", ".join(self._settings.cameras)} '
                f'(parameter cameras); leave camera empty for {self._settings.cameras[0]!r}'))
        if feed.peek() is None:
            raise RequestRejected(('no_frame', camera), self._no_frame_message(feed))
        return camera

    def _no_frame_message(self, feed: CameraFeed) -> str:
        return (f'no frame received yet from camera {feed.name!r} on '
                f'{self.resolve_topic_name(feed.topic)} ({feed.type_name}, image_qos '
                f'{self._settings.image_qos}): check that the camera publishes there; raw frames '
                f'over 512 KB need FASTDDS_DEFAULT_PROFILES_FILE=config/fastdds_large_frames.xml in '
                f'both processes')

    def _inline_image(self, image: Image) -> InlineImage | None:
        if not image_has_pixels(image):
            return None
        try:
            return InlineImage(image_to_rgb(image), image.header)
        except ImageConversionError as error:
            raise RequestRejected('inline_image', f'the request\'s image is malformed: {error}') from None

    def _make_job(self, kind: str, prompts: list[str], request: Any, *, inline: InlineImage | None) -> Job:
        if not self._active or self._engine is None:
            raise RequestRejected('inactive', INACTIVE_MESSAGE)
        token_budget, max_new_tokens = self._resolve_limits(request.token_budget, request.max_new_tokens)
        camera = INLINE_CAMERA if inline is not None else self._resolve_camera(request.camera)
        return Job(kind, prompts, camera=camera, inline=inline, token_budget=token_budget,
                   max_new_tokens=max_new_tokens, timeout_s=self._settings.request_timeout_s)

    def _on_describe_scene(self, request: DescribeScene.Request,
                           response: DescribeScene.Response) -> DescribeScene.Response:
        def make_job() -> Job:
            prompt = request.prompt if request.prompt.strip() else self._param('describe_prompt')
            return self._make_job('describe', [self._check_prompt(prompt, 'prompt')], request, inline=None)
        return self._serve(make_job, response)

    def _on_ask(self, request: Ask.Request, response: Ask.Response) -> Ask.Response:
        def make_job() -> Job:
            question = self._check_prompt(request.question, 'question')
            return self._make_job('ask', [question], request, inline=self._inline_image(request.image))
        return self._serve(make_job, response)

    def _on_ask_many(self, request: AskMany.Request, response: AskMany.Response) -> AskMany.Response:
        def make_job() -> Job:
            if not request.questions:
                raise RequestRejected('empty_questions', 'questions is empty: send at least one question')
            questions = []
            for index, question in enumerate(request.questions):
                try:
                    questions.append(self._check_prompt(question, 'question'))
                except RequestRejected as error:
                    raise RequestRejected(error.key, f'questions[{index}]: {error}') from None
            return self._make_job('ask_many', questions, request, inline=self._inline_image(request.image))
        return self._serve(make_job, response)

    def _serve(self, make_job: Callable[[], Job], response: Any) -> Any:
        """Validate and queue a request, wait for its outcome (up to its deadline), fill `response`."""
        try:
            job = make_job()
            self._queue.submit(job)
        except RequestRejected as rejected:
            self._stats.failed('refused' if rejected.key == 'busy' else 'failed', str(rejected))
            self._warnings.warn(rejected.key, f'request refused: {rejected}')
            return self._fill(response, success=False, message=str(rejected), results=[])
        job.wait()
        if job.state in (Job.DROPPED, Job.ABANDONED):
            message = job.timeout_message()
            self._stats.failed('timed_out', message)
            self._warnings.warn(('timeout', job.state), f'request {message}')
            return self._fill(response, success=False, message=message, results=[])
        if job.error is not None:
            return self._fill(response, success=False, message=job.error, results=[])
        return self._fill(response, success=True, message='', results=job.results)

    @staticmethod
    def _fill(response: Any, *, success: bool, message: str, results: list[VlmResult]) -> Any:
        response.success, response.message = success, message
        if hasattr(response, 'results'):
            response.results = results
        elif results:
            response.result = results[0]
        return response

    # ---------------------------------------------------------------- worker
    def _worker_loop(self) -> None:
        """The only thread that runs the engine: jobs in FIFO order until the node deactivates."""
        while not self._worker_stop.is_set():
            job = self._queue.next(timeout_s=0.2)
            if job is None:
                continue
            try:
                self._run_job(job)
            finally:
                self._queue.done()

    def _run_job(self, job: Job) -> None:
        """Run one job unless its deadline passed; answer its caller; publish its results."""
        if not job.start():
            if job.state == Job.DROPPED and job.periodic:
                self._stats.failed('timed_out', 'periodic description ' + job.timeout_message())
            return  # a caller's dropped job is counted by the caller
        self._running_job = job
        results, error = [], None
        try:
            results = self._run(job)
        except RequestRejected as rejected:
            error = str(rejected)
            self._warnings.warn(rejected.key, f'request failed: {rejected}')
        except EngineError as engine_error:
            error = str(engine_error)
            self._warnings.warn(('engine', type(engine_error).__name__), f'request failed: {error}')
        except Exception as unexpected:  # a bug or e.g. CUDA out of memory: answer, log, carry on
            reason = (str(unexpected).splitlines() or [''])[0]
            error = f'inference failed ({type(unexpected).__name__}: {reason}): see the node log'
            self.get_logger().error(f'{error}\n{traceback.format_exc()}')
        finally:
            self._running_job = None
        error = error.splitlines()[0] if error else error
        if not job.finish(results, error):
            if job.state == Job.ABANDONED:
                self._stats.failed('late', 'discarded a result that came after its deadline')
            return
        if error is not None:
            self._stats.failed('failed', error)
            return
        self._stats.succeeded((time.monotonic() - job.submitted_s) * 1e3,
                              [result.total_ms for result in results])
        self._publish(job, results)

    def _run(self, job: Job) -> list[VlmResult]:
        """Decode the frame, check its age, run the engine; one VlmResult per prompt."""
        if job.inline is not None:
            rgb, header, frame_key = job.inline.rgb, job.inline.header, None
        else:
            feed = self._feeds[job.camera]
            frame = feed.take()
            age_s = self._age_s(frame.msg.header.stamp)
            limit_s = self._settings.max_image_age_s
            if limit_s > 0 and age_s > limit_s:
                raise RequestRejected(('stale', job.camera), (
                    f'latest frame of camera {job.camera!r} is {age_s:.2f} s old, more than '
                    f'max_image_age_s = {limit_s:g}: the camera stopped publishing or its stamps/clock '
                    f'are off (use_sim_time for bag replay), or raise max_image_age_s'))
            try:
                rgb = feed.rgb(frame)
            except ImageConversionError as error:
                raise RequestRejected(('malformed', job.camera),
                                      f'camera {job.camera!r} sent a bad frame: {error}') from None
            # Same key while this frame is the camera's latest: the engine reuses its image prefix.
            # A new frame has a new seq, so an old prefix is never used for new pixels.
            header, frame_key = frame.msg.header, (job.camera, frame.seq)
        if job.kind == 'ask_many':
            outputs = self._engine.generate_many(
                rgb, job.prompts, token_budget=job.token_budget, max_new_tokens=job.max_new_tokens,
                frame_key=frame_key)
        else:
            outputs = [self._engine.generate(
                rgb, job.prompts[0], token_budget=job.token_budget, max_new_tokens=job.max_new_tokens,
                frame_key=frame_key)]
        # An inline image without a stamp has no age; report 0 rather than the time since 1970.
        stamped = header.stamp.sec != 0 or header.stamp.nanosec != 0
        image_age_ms = self._age_s(header.stamp) * 1e3 if stamped else 0.0
        return [output_to_result(output, header=header, camera=job.camera, image_age_ms=image_age_ms)
                for output in outputs]

    def _publish(self, job: Job, results: list[VlmResult]) -> None:
        text_publisher = self._publishers_made.get('description' if job.kind == 'describe' else 'answer')
        results_publisher = self._publishers_made.get('results')
        if text_publisher is None or results_publisher is None:
            return  # cleaned up meanwhile
        for result in results:
            results_publisher.publish(result)
            text_publisher.publish(String(data=result.text))

    # ---------------------------------------------------------------- periodic description
    def _schedule_describer(self) -> None:
        if self._describe_timer is not None:
            self.destroy_timer(self._describe_timer)
            self._describe_timer = None
        period_s = float(self._param('describe_period_s'))
        if period_s > 0:
            self._describe_timer = self.create_timer(
                period_s, self._describe_latest_frames, callback_group=self._timers_group,
                clock=self._steady_clock)

    def _describe_latest_frames(self) -> None:
        """Queue a description of each camera's newest frame; a frame already described is skipped
        (greedy decoding would repeat the same text)."""
        if not self._active:
            return
        prompt = self._param('describe_prompt')
        for feed in self._feeds.values():
            frame = feed.peek()
            if frame is None or self._last_described.get(feed.name) == frame.seq:
                continue
            job = Job('describe', [prompt], camera=feed.name, inline=None,
                      token_budget=int(self._param('token_budget')),
                      max_new_tokens=int(self._param('max_new_tokens')),
                      timeout_s=self._settings.request_timeout_s, periodic=True)
            try:
                self._queue.submit(job)
            except RequestRejected as rejected:
                self._warnings.warn(('periodic', rejected.key), f'periodic description skipped: {rejected}')
                continue
            self._last_described[feed.name] = frame.seq

    # ---------------------------------------------------------------- diagnostics
    def _publish_diagnostics(self) -> None:
        array = DiagnosticArray()
        array.header.stamp = self.get_clock().now().to_msg()
        array.status.append(self._diagnostic_status())
        self._diagnostics_pub.publish(array)

    def _diagnostic_status(self) -> DiagnosticStatus:
        stats, engine = self._stats, self._engine
        samples = stats.latencies()
        state = self._state_machine.current_state[1]
        values = {
            'lifecycle_state': state,
            'model': engine.model_name if engine else str(self._param('model')),
            'device': str(engine.device) if engine else str(self._param('device')),
            'dtype': str(engine.dtype).replace('torch.', '') if engine else str(self._param('dtype')),
            'visual_tokens_full': str(engine.visual_tokens_full) if engine else '',
            'token_budget': str(self._param('token_budget')),
            'queue_depth': str(len(self._queue) if self._queue else 0),
            'running': str(self._running_job is not None).lower(),
            'latency_p50_ms': f'{percentile(samples["round_trip_ms"], 50):.1f}',
            'latency_p95_ms': f'{percentile(samples["round_trip_ms"], 95):.1f}',
            'inference_p50_ms': f'{percentile(samples["inference_ms"], 50):.1f}',
            'inference_p95_ms': f'{percentile(samples["inference_ms"], 95):.1f}',
            'image_callback_p50_us': f'{percentile(samples["callback_us"], 50):.1f}',
            'image_callback_max_us': f'{max(samples["callback_us"], default=float("nan")):.1f}',
        }
        for kind in ('ok', 'failed', 'refused', 'timed_out', 'late'):
            values[f'requests_{kind}'] = str(stats.counts[kind])
        silent = []
        now = time.monotonic()
        for feed in self._feeds.values():
            frame = feed.peek()
            since_s = now - (frame.received_s if frame else self._activated_s)
            values[f'camera.{feed.name}.topic'] = self.resolve_topic_name(feed.topic)
            values[f'camera.{feed.name}.frames_received'] = str(feed.received)
            values[f'camera.{feed.name}.frames_superseded'] = str(feed.superseded)
            values[f'camera.{feed.name}.last_frame_s_ago'] = f'{since_s:.1f}' if frame else 'never'
            if self._active and since_s > NO_FRAME_WARN_S:
                silent.append(feed.name)
        values['last_error'] = stats.last_error

        problems = stats.recent_problems(RECENT_PROBLEM_S)
        if engine is None or not self._active:
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
            level=level, name=f'{self.get_name()}: vlm', message=message,
            hardware_id=values['device'],
            values=[KeyValue(key=key, value=value) for key, value in values.items()])


def main(args: list[str] | None = None) -> int:
    """Run the node until SIGINT/SIGTERM (exit 0). Exit 1, with one log line, when it cannot start."""
    # The signals are handled here rather than by rclpy: its handler shuts the context down and also
    # lets Python raise KeyboardInterrupt at an arbitrary later point, which can cut the cleanup short.
    # Here a signal only sets `stop`; the executor spins in a thread and the main thread shuts down
    # in order: answer waiting callers, stop the worker, free the model, destroy the node.
    stop = threading.Event()
    # A node logs lines; the progress bars transformers draws while loading are for terminals.
    transformers.utils.logging.disable_progress_bar()
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        node = VlmNode()
    except (ParameterError, ParameterException) as error:
        rclpy.logging.get_logger(NODE_NAME).error(f'bad parameter: {error}')
        rclpy.try_shutdown()
        return 1
    executor = MultiThreadedExecutor(num_threads=node.executor_threads)
    executor.add_node(node)
    spinner = threading.Thread(target=_spin, args=(executor,), name='executor', daemon=True)
    spinner.start()
    exit_code = 0
    if node.autostart and not stop.is_set() and not node.start():
        exit_code = 1  # the failed transition logged its reason as one line
    if exit_code == 0:
        stop.wait()
    node.close()
    executor.shutdown(timeout_sec=5.0)
    node.destroy_node()
    rclpy.try_shutdown()
    return exit_code


def _spin(executor: MultiThreadedExecutor) -> None:
    try:
        executor.spin()
    except ExternalShutdownException:
        pass


if __name__ == '__main__':
    sys.exit(main())
