"""vlm_node: the ROS 2 lifecycle node `zip_vlm`, a thin layer that serves the VLM engine.

    vlm_node --ros-args --params-file config/vlm.yaml      # or: ros2 run zip_vlm_ros vlm_node

What it does, and what it never does:
- Image subscriptions keep each camera's latest message and a short ring buffer of its recent ones
  (`frame_history_length` / `frame_history_bytes`). Nothing is decoded or inferred in an image
  callback; a frame is decoded when a request uses it.
- A request may name several cameras (surround view: one question over each camera's latest frame)
  or a history (N frames of one camera over the last S seconds); see image_sets.py.
- One worker thread runs the engine (worker.py), decoding up to `max_batch_size` requests together:
  a waiting request joins the running batch at the next decode step. Requests wait FIFO (at most
  `max_pending_requests` beyond a full batch; more are refused at once), each with a deadline of
  `request_timeout_s` that covers waiting and inference.
- Every caller gets an answer. Service callbacks are coroutines: they queue a job and await its
  outcome without holding an executor thread, so refusals are answered at once at any load. A job
  is answered the moment its deadline passes or the node deactivates, and the engine, which asks
  the job's `should_stop` between stages and decode steps, frees the worker within one step.
- Services `~/describe_scene`, `~/ask`, `~/ask_many` and the action `~/ask_action` (the answer
  streamed as feedback, cancellable; see ask_action.py) appear on the first activation and stay
  (inactive: an immediate refusal); they answer with success/message; every result also goes to `~/results`
  (VlmResult, header = the source image's header) and its text to `~/description` or `~/answer`.
- `/diagnostics` at 1 Hz: model, device, latency, queue depth, per-camera frame counters, last error.
- Lifecycle: configure loads the model, activate creates subscriptions/timers and starts the worker,
  deactivate answers every pending caller and stops the worker, cleanup frees the model (and CUDA
  memory). `autostart` (default true) runs configure + activate at startup; if configuring fails
  the process exits 1 with one log line. SIGINT/SIGTERM answer every caller and exit 0.
"""
from __future__ import annotations

import functools
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable

import rclpy
import transformers
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.exceptions import ParameterException
from rclpy.executors import MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.signals import SignalHandlerOptions
from rclpy.task import Future
from sensor_msgs.msg import Image
from std_msgs.msg import String

from zip_vlm_ros.node.ask_action import CLIENT_PROBE_SERVICE, AskActionServer
from zip_vlm_ros.node.conversions import (
    ImageConversionError, image_has_pixels, image_to_rgb, stamp_to_seconds, visual_token_images)
from zip_vlm_ros.engine import EngineConfig, EngineError, VlmEngine
from zip_vlm_ros.node.image_sets import image_set_request, resolve_total_budget
from zip_vlm_ros.node.jobs import (
    INACTIVE_MESSAGE, SHUTTING_DOWN_MESSAGE, CameraFeed, InlineImage, Job, RequestQueue, RequestRejected,
    RequestStats, ThrottledWarnings, check_frame_age, check_prompt)
from zip_vlm_ros.msg import VlmResult
from zip_vlm_ros.node.diagnostics import diagnostic_status
from zip_vlm_ros.node.parameters import (
    ENGINE_PARAMETERS, IMAGE_TYPES, NODE_PARAMETERS, RUNTIME_PARAMETERS, ParameterError,
    ParameterSpec, Settings, camera_parameter_specs, declared_parameter_names, image_qos_profile,
    max_new_tokens_limit, parameter_problem, service_qos_profile, type_problem)
from zip_vlm_ros.node.spinning import BackgroundSpinner
from zip_vlm_ros.node.worker import NodeHooks, Worker
from zip_vlm_ros.reducers import REDUCERS
from zip_vlm_ros.srv import Ask, AskMany, DescribeScene

NODE_NAME = 'zip_vlm'
INLINE_CAMERA = 'inline'
# How often waiting and running jobs are checked against their deadlines (also bounds how late a
# caller can hear its answer if the executor missed a wake-up).
DEADLINE_CHECK_S = 0.1
SERVICE_OF_KIND = {'describe': '~/describe_scene', 'ask': '~/ask', 'ask_many': '~/ask_many',
                   'ask_action': CLIENT_PROBE_SERVICE}
# At exit, how long callers still being answered may take before the node goes.
ANSWER_GRACE_S = 5.0


class VlmNode(LifecycleNode):
    """Lifecycle node `zip_vlm`: parameters, frames, services, worker and diagnostics around VlmEngine."""

    def __init__(self, **node_kwargs: Any):
        # Undeclared names reach _validate_parameter_change, which names the known ones (rclpy's own
        # refusal reads "Invalid access to undeclared parameter(s): []").
        super().__init__(NODE_NAME, allow_undeclared_parameters=True, **node_kwargs)
        self._declare_parameters()
        self.autostart = bool(self.get_parameter('autostart').value)
        # Service callbacks await their jobs without holding a thread, so a few threads serve any
        # number of callers: requests, images, timers, and parameter/lifecycle services.
        self.executor_threads = 4

        # What may run in parallel (MultiThreadedExecutor):
        # - requests (Reentrant): service callbacks (coroutines); many callers await their jobs at once.
        # - images (one MutuallyExclusive group per camera, made on activate): a camera's frames are
        #   stored one at a time and in order, different cameras' in parallel. With one group for all,
        #   six cameras at 10 Hz queued behind each other while the worker held the interpreter, and
        #   depth-1 subscriptions lost frames (5 of 100 per camera at 11 asks/s; vlm_bench --node).
        # - timers (MutuallyExclusive): diagnostics, deadlines and the periodic describer; never block.
        # - the default group: parameter and lifecycle services (configure loads the model there).
        # The engine itself runs only on the worker thread (it is not thread-safe).
        self._requests_group = ReentrantCallbackGroup()
        self._timers_group = MutuallyExclusiveCallbackGroup()

        self._warnings = ThrottledWarnings(self.get_logger())
        self._stats = RequestStats()
        self._settings: Settings | None = None
        self._engine: VlmEngine | None = None
        self._feeds: dict[str, CameraFeed] = {}
        self._queue: RequestQueue | None = None
        self._worker: threading.Thread | None = None
        self._worker_stop = threading.Event()
        self._active = False
        # Why a request is refused while not active: not activated yet / deactivated, or the process
        # is going down (set before _active turns False, so a request racing the signal reads it).
        self._inactive_message = INACTIVE_MESSAGE
        self._activated_s = time.monotonic()
        self._subscriptions_made: list[Any] = []
        # Service callbacks between receiving a request and returning its response (see close()).
        self._callbacks_in_flight = 0
        self._in_flight_changed = threading.Condition()
        self._describe_timer = None
        self._last_described: dict[str, int] = {}
        self._publishers_made: dict[str, Any] = {}
        self._steady_clock = Clock(clock_type=ClockType.STEADY_TIME)

        self._diagnostics_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self._diagnostics_timer = self.create_timer(
            1.0, self._publish_diagnostics, callback_group=self._timers_group, clock=self._steady_clock)
        # Answers callers whose deadline passed while the worker is inside one long engine stage;
        # its ticks also wake the executor, which resumes any coroutine whose wake-up it missed.
        self._deadline_timer = self.create_timer(
            DEADLINE_CHECK_S, self._expire_overdue, callback_group=self._timers_group, clock=self._steady_clock)
        self._services_made = False
        self._ask_action: AskActionServer | None = None
        self.add_on_set_parameters_callback(self._validate_parameter_change)
        self.add_post_set_parameters_callback(self._apply_parameter_change)

    # ---------------------------------------------------------------- parameters
    def _declare_parameters(self) -> None:
        self._defaults = {spec.name: spec.default for spec in NODE_PARAMETERS}
        for spec in NODE_PARAMETERS:
            self._declare(spec)
        cameras = self._param('cameras') or []
        problem = (type_problem('cameras', cameras, self._defaults['cameras'])
                   or parameter_problem('cameras', cameras))
        if problem:
            raise ParameterError(problem)
        for index, camera in enumerate(cameras):
            for spec in camera_parameter_specs(camera, index):
                self._defaults[spec.name] = spec.default
                self._declare(spec)
        self._own_parameters = declared_parameter_names(cameras)
        # rclpy ignores overrides nobody declares: a misspelt name in the params file would go unnoticed
        unknown = sorted(name for name in self._parameter_overrides if not self.has_parameter(name))
        if unknown:
            self.get_logger().warning(
                f'ignoring unknown parameter(s) {", ".join(unknown)}: check their spelling '
                f'(known: {", ".join(sorted(self._own_parameters))})')
        for name in ('service_history_depth', 'autostart'):  # used before any configure
            value = self._param(name)
            problem = type_problem(name, value, self._defaults[name]) or parameter_problem(name, value)
            if problem:
                raise ParameterError(problem)

    def _declare(self, spec: ParameterSpec) -> None:
        runtime = 'changes at runtime' if spec.runtime else 'read-only at runtime'
        if spec.name in ENGINE_PARAMETERS:
            runtime = 'read-only at runtime, settable while unconfigured'
        # Dynamic typing: a wrong type reaches _value_problem, which names the type in words
        # (rclpy's own check says "expected '2' got '4'").
        self.declare_parameter(
            spec.name, spec.default,
            ParameterDescriptor(description=f'{spec.description} ({runtime})', dynamic_typing=True))

    def _value_problem(self, name: str, value: Any) -> str | None:
        """Why `value` is wrong for our parameter `name` (type, range, the loaded model's limits), or None."""
        problem = type_problem(name, value, self._defaults[name])
        if problem:
            return problem
        question_max_chars = self._param('question_max_chars')
        return parameter_problem(
            name, value, visual_tokens_full=self._token_budget_limit(),
            max_new_tokens=self._max_new_tokens_limit(),
            question_max_chars=question_max_chars if isinstance(question_max_chars, int) else None)

    def _token_budget_limit(self) -> int | None:
        """The largest token_budget the loaded model takes; None before load and for a model whose visual
        token count is fixed by training (LLaVA-Mini accepts and ignores any budget >= 1)."""
        engine = self._engine
        return engine.visual_tokens_full if engine and engine.token_budget_applies else None

    def _max_new_tokens_limit(self) -> int | None:
        engine = self._engine
        return max_new_tokens_limit(engine.context_tokens, engine.visual_tokens_full) if engine else None

    def _validate_parameter_change(self, parameters: list[Parameter]) -> SetParametersResult:
        """Reject unknown and read-only parameters and bad values; nothing is applied here."""
        for parameter in parameters:
            name = parameter.name
            if name not in self._own_parameters:
                if self.has_parameter(name):
                    continue  # rclpy's own (use_sim_time) are not ours to judge
                return SetParametersResult(successful=False, reason=(
                    f'{name!r} is not a parameter of this node: known parameters are '
                    f'{", ".join(sorted(self._own_parameters))}'))
            settable = name in RUNTIME_PARAMETERS or (name in ENGINE_PARAMETERS and self._engine is None)
            if not settable:
                when = (' while the node is configured: clean it up (lifecycle cleanup), set it, configure '
                        'again' if name in ENGINE_PARAMETERS else ' at runtime: set it in the params file '
                        f'or with --ros-args -p {name}:=... and restart the node')
                return SetParametersResult(successful=False, reason=f'{name} is read-only{when}')
            problem = self._value_problem(name, parameter.value)
            if problem:
                return SetParametersResult(successful=False, reason=problem)
        return SetParametersResult(successful=True)

    def _apply_parameter_change(self, parameters: list[Parameter]) -> None:
        names = {parameter.name for parameter in parameters}
        if 'describe_period_s' in names and self._active:
            self._schedule_describer()
        changed = RUNTIME_PARAMETERS | ENGINE_PARAMETERS
        if names & changed:
            self.get_logger().info('set ' + ', '.join(
                f'{p.name}={p.value!r}' for p in parameters if p.name in changed))

    def _param(self, name: str) -> Any:
        return self.get_parameter(name).value

    def _read_settings(self) -> Settings:
        """Validate every parameter (ParameterError names the first bad one) and snapshot the fixed ones."""
        for name in sorted(self._own_parameters):
            problem = self._value_problem(name, self._param(name))
            if problem:
                raise ParameterError(problem)
        cameras = tuple(self._param('cameras'))
        return Settings(
            model=self._param('model'), vision_tower=self._param('vision_tower'),
            max_pixels=int(self._param('max_pixels')), device=self._param('device'),
            dtype=self._param('dtype'),
            cameras=cameras,
            camera_topics={camera: self._param(f'camera.{camera}.topic') for camera in cameras},
            camera_types={camera: self._param(f'camera.{camera}.type') for camera in cameras},
            image_qos=self._param('image_qos'), dominant_ratio=float(self._param('dominant_ratio')),
            max_image_age_s=float(self._param('max_image_age_s')),
            max_clock_skew_s=float(self._param('max_clock_skew_s')),
            frame_history_length=int(self._param('frame_history_length')),
            frame_history_bytes=int(self._param('frame_history_bytes')),
            max_pending_requests=int(self._param('max_pending_requests')),
            max_batch_size=int(self._param('max_batch_size')),
            request_timeout_s=float(self._param('request_timeout_s')),
            question_max_chars=int(self._param('question_max_chars')),
            service_history_depth=int(self._param('service_history_depth')))

    # ---------------------------------------------------------------- lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Load the model. A failure is logged as one line and leaves the node unconfigured."""
        started = time.monotonic()
        try:
            settings = self._read_settings()
            engine = VlmEngine(EngineConfig(
                model=settings.model, vision_tower=settings.vision_tower, max_pixels=settings.max_pixels,
                device=settings.device,
                dtype=settings.dtype,
                token_budget=int(self._param('token_budget')), reducer=self._param('reducer'),
                contextual_ratio=1.0 - settings.dominant_ratio,
                max_new_tokens=int(self._param('max_new_tokens'))))
            limits = {'visual_tokens_full': engine.visual_tokens_full if engine.token_budget_applies else None,
                      'max_new_tokens': max_new_tokens_limit(engine.context_tokens, engine.visual_tokens_full)}
            problem = (parameter_problem('token_budget', self._param('token_budget'), **limits)
                       or parameter_problem('max_new_tokens', self._param('max_new_tokens'), **limits))
            if problem:
                engine.close()
                raise ParameterError(problem)
        except (ParameterError, EngineError) as error:
            return self._configure_failed(str(error))
        except Exception as error:  # a bug, not bad input: keep the traceback in the debug log
            self.get_logger().debug(traceback.format_exc())
            return self._configure_failed(f'{type(error).__name__}: {error}')
        self._settings, self._engine = settings, engine
        self._feeds = {camera: CameraFeed(camera, settings.camera_topics[camera], settings.camera_types[camera],
                                          history_frames=settings.frame_history_length,
                                          history_bytes=settings.frame_history_bytes)
                       for camera in settings.cameras}
        self._queue = RequestQueue(settings.max_pending_requests, settings.max_batch_size)
        self._publishers_made = {
            'results': self.create_lifecycle_publisher(VlmResult, '~/results', 10),
            'description': self.create_lifecycle_publisher(String, '~/description', 10),
            'answer': self.create_lifecycle_publisher(String, '~/answer', 10),
            'visual_tokens': self.create_lifecycle_publisher(Image, '~/visual_tokens/image', 10),
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
        """Subscriptions, the worker and the periodic describer."""
        settings = self._settings
        self._join_worker()
        qos = image_qos_profile(settings.image_qos)
        for feed in self._feeds.values():
            self._subscriptions_made.append(self.create_subscription(
                IMAGE_TYPES[feed.type_name], feed.topic, functools.partial(self._on_image, feed), qos,
                callback_group=MutuallyExclusiveCallbackGroup()))
        if not self._services_made:
            self._create_services()
        self._worker_stop.clear()
        self._queue.open()
        self._worker = threading.Thread(target=self._worker_loop, name='vlm_worker', daemon=True)
        self._worker.start()
        self._active = True
        self._activated_s = time.monotonic()
        self._schedule_describer()
        topics = ', '.join(f'{feed.name}={self.resolve_topic_name(feed.topic)}' for feed in self._feeds.values())
        self.get_logger().info(f'active: cameras {topics} ({settings.image_qos} QoS)')

    def _create_services(self) -> None:
        """The services appear on the first activation (a caller waiting for them waits for a loaded
        model) and then live as long as the node: callers of an inactive node get an immediate
        refusal, and no response is ever sent on a destroyed service."""
        qos = service_qos_profile(int(self._param('service_history_depth')))
        for srv_type, name, callback in ((DescribeScene, '~/describe_scene', self._on_describe_scene),
                                         (Ask, '~/ask', self._on_ask), (AskMany, '~/ask_many', self._on_ask_many)):
            self.create_service(srv_type, name, callback, qos_profile=qos, callback_group=self._requests_group)
        self._ask_action = AskActionServer(
            self, make_job=functools.partial(self._ask_job, 'ask_action'), serve=self._serve, service_qos=qos,
            callback_group=self._requests_group)
        self._services_made = True

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
        """Answer every waiting and running caller, stop the worker, remove subscriptions and the
        describer. Does not wait for the worker: it frees itself within one engine step."""
        self._stop_serving('the node was deactivated: activate it again (lifecycle ~/change_state) '
                           'and retry')
        if self._describe_timer is not None:
            self.destroy_timer(self._describe_timer)
            self._describe_timer = None
        for subscription in self._subscriptions_made:
            self.destroy_subscription(subscription)
        self._subscriptions_made = []

    def _stop_serving(self, reason: str) -> None:
        """Refuse new requests, answer queued and running ones with `reason`, stop the worker."""
        self._active = False
        self._worker_stop.set()
        if self._queue is not None:
            self._queue.close(reason, refuse_with=self._inactive_message)

    def _join_worker(self, timeout_s: float | None = None) -> None:
        if self._worker is not None:
            self._worker.join(timeout_s)
            if not self._worker.is_alive():
                self._worker = None

    def _release(self) -> None:
        """Free the model (and CUDA memory), publishers and frames."""
        self._join_worker()  # the engine must be idle before it is closed: at most one stage
        for publisher in self._publishers_made.values():
            self.destroy_lifecycle_publisher(publisher)
        self._publishers_made = {}
        if self._engine is not None:
            self._engine.close()
            self._engine = None
            self.get_logger().info('model released')
        self._feeds, self._last_described = {}, {}

    def destroy_node(self) -> None:
        # Node.destroy_node leaves waitables such as action servers. getattr: rclpy's context cleanup
        # also destroys a node whose __init__ failed (a bad parameter) before the attribute existed.
        ask_action = getattr(self, '_ask_action', None)
        if ask_action is not None:
            ask_action.destroy()
            self._ask_action = None
        super().destroy_node()

    def start(self) -> bool:
        """Autostart: configure and activate; False (reason logged) when either fails."""
        if self.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            return False
        return self.trigger_activate() == TransitionCallbackReturn.SUCCESS

    def close(self) -> None:
        """Process exit: answer every caller, stop the worker, free the model. The executor must still
        spin (it sends the responses); entities go with destroy_node() afterwards."""
        self._inactive_message = SHUTTING_DOWN_MESSAGE
        self._stop_serving(SHUTTING_DOWN_MESSAGE)
        self._join_worker(timeout_s=ANSWER_GRACE_S)
        with self._in_flight_changed:
            self._in_flight_changed.wait_for(lambda: self._callbacks_in_flight == 0, ANSWER_GRACE_S)
        # The last coroutine has returned its response; the executor sends it right after, and DDS
        # needs a moment to deliver it before the participant goes away.
        time.sleep(0.3)
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

    def _check_frame_age(self, camera: str, stamp: Any) -> None:
        check_frame_age(camera, stamped=_stamped(stamp), age_s=self._age_s(stamp), settings=self._settings)

    # ---------------------------------------------------------------- requests
    def _check_prompt(self, text: str, what: str) -> str:
        return check_prompt(text, what, self._settings.question_max_chars)

    def _resolve_limits(self, token_budget: int, max_new_tokens: int) -> tuple[int, int]:
        """Request overrides (0 = node default) checked against the model; returns the values to use."""
        full = self._token_budget_limit()
        if token_budget == 0:
            token_budget = int(self._param('token_budget'))
        elif token_budget < 1 or (full is not None and token_budget > full):
            valid = (f'1..{full} (this model\'s visual tokens)' if full is not None else
                     'a number >= 1 (this model\'s visual token count is fixed by training; the budget is ignored)')
            raise RequestRejected('token_budget', (
                f'token_budget {token_budget} is out of range: use {valid}, or 0 = node default '
                f'({self._param("token_budget")})'))
        limit = self._max_new_tokens_limit()
        if max_new_tokens == 0:
            max_new_tokens = int(self._param('max_new_tokens'))
        elif not 1 <= max_new_tokens <= limit:
            raise RequestRejected('max_new_tokens', (
                f'max_new_tokens {max_new_tokens} is out of range: use 1..{limit} (what this model\'s '
                f'context holds after the image), or 0 = node default ({self._param("max_new_tokens")})'))
        return token_budget, max_new_tokens

    def _resolve_reducer(self, reducer: str) -> str:
        reducer = reducer.strip() or self._param('reducer')
        if reducer not in REDUCERS:
            raise RequestRejected('reducer', (f'unknown reducer {reducer!r}: use {", ".join(REDUCERS)}, or leave '
                                              f'reducer empty for the node\'s ({self._param("reducer")})'))
        return reducer

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
        images = image_set_request(
            request, feeds=self._feeds, default_camera=self._settings.cameras[0], has_inline=inline is not None,
            history_limit=self._settings.frame_history_length, no_frame_message=self._no_frame_message)
        reducer = self._resolve_reducer(request.reducer)
        if images is not None:  # surround view or history: token_budget is the total (see image_sets)
            _, max_new_tokens = self._resolve_limits(0, request.max_new_tokens)
            token_budget = resolve_total_budget(request.token_budget, images.count, int(self._param('token_budget')))
            return Job(kind, prompts, camera=images.camera_field, inline=None, token_budget=token_budget,
                       max_new_tokens=max_new_tokens, timeout_s=self._settings.request_timeout_s, images=images,
                       reducer=reducer)
        token_budget, max_new_tokens = self._resolve_limits(request.token_budget, request.max_new_tokens)
        camera = INLINE_CAMERA if inline is not None else self._resolve_camera(request.camera)
        return Job(kind, prompts, camera=camera, inline=inline, token_budget=token_budget,
                   max_new_tokens=max_new_tokens, timeout_s=self._settings.request_timeout_s, reducer=reducer)

    async def _on_describe_scene(self, request: DescribeScene.Request,
                                 response: DescribeScene.Response) -> DescribeScene.Response:
        def make_job() -> Job:
            prompt = request.prompt if request.prompt.strip() else self._param('describe_prompt')
            return self._make_job('describe', [self._check_prompt(prompt, 'prompt')], request, inline=None)
        return await self._serve(make_job, response)

    def _ask_job(self, kind: str, request: Any) -> Job:
        """The job of an Ask service request or action goal (the same fields)."""
        question = self._check_prompt(request.question, 'question')
        return self._make_job(kind, [question], request, inline=self._inline_image(request.image))

    async def _on_ask(self, request: Ask.Request, response: Ask.Response) -> Ask.Response:
        return await self._serve(functools.partial(self._ask_job, 'ask', request), response)

    async def _on_ask_many(self, request: AskMany.Request, response: AskMany.Response) -> AskMany.Response:
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
        return await self._serve(make_job, response)

    async def _serve(self, make_job: Callable[[], Job], response: Any) -> Any:
        """Validate and queue a request, await its outcome without holding a thread, fill `response`.

        Refusals return at once. Otherwise the job's outcome (result, deadline, cancel) completes a
        future from whichever thread settles it, and the executor resumes this coroutine.
        """
        with self._in_flight_changed:
            self._callbacks_in_flight += 1
        try:
            try:
                if not self._active or self._engine is None:
                    raise RequestRejected('inactive', self._inactive_message)
                job = make_job()
                self._queue.submit(job)
            except RequestRejected as rejected:
                self._stats.failed('refused' if rejected.key in ('busy', 'inactive') else 'failed', str(rejected))
                self._warnings.warn(rejected.key, f'request refused: {rejected}')
                return self._fill(response, success=False, message=str(rejected), results=[])
            await self._settled(job)
            return self._answer(job, response)
        finally:
            with self._in_flight_changed:
                self._callbacks_in_flight -= 1
                self._in_flight_changed.notify_all()

    def _settled(self, job: Job) -> Future:
        """A future completed when `job` is settled, in whatever thread settles it."""
        executor = self.executor
        future = Future(executor=executor)

        def complete(_job: Job) -> None:
            future.set_result(None)
            # A bare set_result does not wake the executor, and only a woken executor resumes the
            # awaiting coroutine.
            if executor is not None:
                executor.wake()
        job.add_settled_callback(complete)
        return future

    def _answer(self, job: Job, response: Any) -> Any:
        """Fill `response` from a settled job and count its outcome."""
        if job.state in (Job.DROPPED, Job.TIMED_OUT):
            self._stats.failed('timed_out', job.error)
            self._warnings.warn(('timeout', job.state), f'request {job.error}')
        elif job.state == Job.CANCELLED:
            self._stats.failed('cancelled', job.error)
        if job.state != Job.DONE or job.error is not None:
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

    def _expire_overdue(self) -> None:
        """Answer callers whose deadline passed; cancel the jobs of services whose callers all left."""
        queue = self._queue
        if queue is None:
            return
        queue.expire_overdue()
        jobs = [job for job in queue.jobs() if not job.periodic]
        for kind in {job.kind for job in jobs}:
            # ROS 2 does not tell a service which caller left, only how many clients it has.
            if self.count_clients(self.resolve_service_name(SERVICE_OF_KIND[kind])) == 0:
                for job in jobs:
                    if job.kind == kind and job.cancel('the caller is gone (no client of the service left)'):
                        self._stats.failed('cancelled', job.error)

    # ---------------------------------------------------------------- worker
    def _worker_loop(self) -> None:
        """The only thread that runs the engine (see worker.py) until the node deactivates."""
        hooks = NodeHooks(feeds=self._feeds, check_frame_age=self._check_frame_age, image_age_ms=self._image_age_ms,
                          publish=self._publish, publish_overlays=self._publish_overlays, stats=self._stats,
                          warnings=self._warnings, logger=self.get_logger())
        Worker(self._engine, self._queue, hooks, self._settings.max_batch_size, self._worker_stop).run()

    def _publish_overlays(self, rgb, header, outputs) -> None:
        """Each output's token-selection overlay on ~/visual_tokens/image, when publish_visual_tokens is on."""
        overlay_publisher = self._publishers_made.get('visual_tokens')
        if overlay_publisher is not None and self._param('publish_visual_tokens'):  # off: nothing is drawn
            for overlay in visual_token_images(rgb, header, outputs):
                overlay_publisher.publish(overlay)

    def _image_age_ms(self, stamp: Any) -> float:
        """Node clock minus `stamp`: 0 for an unstamped (inline) image and for a stamp slightly ahead."""
        return max(0.0, self._age_s(stamp) * 1e3) if _stamped(stamp) else 0.0

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
                      timeout_s=self._settings.request_timeout_s, periodic=True, reducer=self._param('reducer'))
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
        return diagnostic_status(
            node_name=self.get_name(), state=self._state_machine.current_state[1], engine=self._engine,
            parameters={name: self._param(name) for name in ('model', 'device', 'dtype', 'token_budget')},
            queue=self._queue, stats=self._stats, feeds=list(self._feeds.values()), active=self._active,
            activated_s=self._activated_s, resolve_topic_name=self.resolve_topic_name)


def _stamped(stamp: Any) -> bool:
    return stamp.sec != 0 or stamp.nanosec != 0


def main(args: list[str] | None = None) -> int:
    """Run the node until SIGINT/SIGTERM (exit 0). Exit 1, with one log line, when it cannot start."""
    # The signals are handled here rather than by rclpy: its handler shuts the context down and also
    # lets Python raise KeyboardInterrupt at an arbitrary later point, which can cut the cleanup short.
    # Here a signal only sets `stop`; the executor spins in a thread and the main thread shuts down
    # in order: answer every caller (the executor still sends the responses), stop the worker, free
    # the model, stop the executor and join its threads, destroy the node.
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
    spinner = BackgroundSpinner(executor)
    exit_code = 0
    if node.autostart and not stop.is_set() and not node.start():
        exit_code = 1  # the failed transition logged its reason as one line
    if exit_code == 0:
        stop.wait()
    node.close()
    spinner.stop()
    node.destroy_node()
    rclpy.try_shutdown()
    return exit_code


if __name__ == '__main__':
    sys.exit(main())
