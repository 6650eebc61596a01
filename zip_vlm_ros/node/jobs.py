"""The node's bookkeeping, without rclpy: each camera's latest frame, jobs with deadlines and a stop
signal for the engine, the checks of a request's prompt and frame age, the FIFO queue the worker
reads, throttled warnings and the counters behind /diagnostics."""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from zip_vlm_ros.node.conversions import message_to_rgb
from zip_vlm_ros.node.frame_history import FrameHistory, message_nbytes
from zip_vlm_ros.msg import VlmResult

# The same kind of bad input is logged at most once per this period (with a count of the rest).
# Decoded frames a camera keeps for repeated requests (a history question decodes several).
DECODED_FRAMES_KEPT = 8
WARN_THROTTLE_S = 5.0
INACTIVE_MESSAGE = 'the node is not active: activate it with the lifecycle service ~/change_state'
SHUTTING_DOWN_MESSAGE = 'the node is shutting down: retry when it is back'


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
    """The latest frame of one camera, its recent frames (for history questions) and its counters.

    The image callback (`store`) only swaps a reference and appends it to the ring buffer under a
    lock: decoding happens in `rgb`, called by the worker when a request uses the frame. A frame
    replaced before any request used it as the latest counts as superseded.
    """

    def __init__(self, name: str, topic: str, type_name: str, *, history_frames: int = 1,
                 history_bytes: int = 0):
        self.name, self.topic, self.type_name = name, topic, type_name
        self._lock = threading.Lock()
        self._latest: Frame | None = None
        self._seq = 0
        self.received = 0
        self.superseded = 0
        self.history = FrameHistory(history_frames, history_bytes)
        self._decoded: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()  # seq -> rgb

    def store(self, msg: Any) -> None:
        with self._lock:
            self._seq += 1
            if self._latest is not None and not self._latest.used:
                self.superseded += 1
            self._latest = Frame(msg, self._seq, time.monotonic())
            self.history.append(self._latest, message_nbytes(msg))
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
        """Decode `frame` to (H, W, 3) uint8 RGB; repeated requests on a recent frame decode it once."""
        rgb = self._decoded.get(frame.seq)
        if rgb is not None:
            self._decoded.move_to_end(frame.seq)
            return rgb
        rgb = message_to_rgb(frame.msg)
        self._decoded[frame.seq] = rgb
        while len(self._decoded) > DECODED_FRAMES_KEPT:
            self._decoded.popitem(last=False)
        return rgb


@dataclass
class InlineImage:
    rgb: np.ndarray
    header: Any


class Job:
    """One request on its way through the queue and the worker.

    State moves WAITING -> RUNNING -> DONE (results or an error), unless the job is settled early:
    DROPPED (deadline passed while waiting: never run), TIMED_OUT (deadline passed while running) or
    CANCELLED (deactivate, cleanup, shutdown, caller gone). The first outcome wins, under the lock;
    the callbacks of `add_settled_callback` then run once, in the thread that settled it, so a
    caller is answered the moment its outcome is known. A job settled while running keeps the
    engine going only until it next asks `should_stop` (between stages and decode steps).
    """

    WAITING, RUNNING, DONE = 'waiting', 'running', 'done'
    DROPPED, TIMED_OUT, CANCELLED = 'dropped', 'timed_out', 'cancelled'

    def __init__(self, kind: str, prompts: list[str], *, camera: str, inline: Any,
                 token_budget: int, max_new_tokens: int, timeout_s: float, periodic: bool = False,
                 images: Any = None, reducer: str = 'visionzip'):
        self.kind, self.prompts, self.camera, self.inline = kind, prompts, camera, inline
        # Several images (image_sets.ImageSetRequest: surround cameras or a history); None: one image.
        self.images = images
        self.token_budget, self.max_new_tokens, self.reducer = token_budget, max_new_tokens, reducer
        self.timeout_s, self.periodic = timeout_s, periodic
        self.submitted_s = time.monotonic()
        self.deadline_s = self.submitted_s + timeout_s
        self.state = Job.WAITING
        self.results: list[VlmResult] = []
        self.error: str | None = None
        self.stop_requested_s: float | None = None  # when the deadline passed or the cancel came
        # Called by the engine after every generated token (StreamedText) while the job runs: the
        # action server's feedback; None for services.
        self.on_token: Callable[[Any], None] | None = None
        self._lock = threading.Lock()
        self._settled = threading.Event()
        self._callbacks: list[Callable[[Job], None]] = []

    def _settle(self, state: str, *, error: str | None = None, results: list | None = None) -> list:
        """Set the outcome (lock held by the caller); returns the callbacks to run after unlocking."""
        self.state, self.error, self.results = state, error, results or []
        if state != Job.DONE:
            self.stop_requested_s = min(time.monotonic(), self.deadline_s) if state in (
                Job.DROPPED, Job.TIMED_OUT) else time.monotonic()
        self._settled.set()
        callbacks, self._callbacks = self._callbacks, []
        return callbacks

    def _run_callbacks(self, callbacks: list) -> None:
        for callback in callbacks:
            callback(self)

    def add_settled_callback(self, callback: Callable[[Job], None]) -> None:
        """Call `callback(job)` once the outcome is known (at once if it is known already)."""
        with self._lock:
            if not self._settled.is_set():
                self._callbacks.append(callback)
                return
        callback(self)

    @property
    def settled(self) -> bool:
        return self._settled.is_set()

    def start(self) -> bool:
        """Worker: claim the job to run it; False when it was cancelled or its deadline passed."""
        callbacks = []
        with self._lock:
            if self.state == Job.WAITING and time.monotonic() >= self.deadline_s:
                callbacks = self._settle(Job.DROPPED, error=self.timeout_message(Job.DROPPED))
            elif self.state == Job.WAITING:
                self.state = Job.RUNNING
        self._run_callbacks(callbacks)
        return self.state == Job.RUNNING

    def finish(self, results: list[VlmResult], error: str | None) -> bool:
        """Worker: deliver the outcome; False when the job was settled meanwhile (late or cancelled)."""
        with self._lock:
            if self.state != Job.RUNNING:
                return False
            callbacks = self._settle(Job.DONE, error=error, results=results)
        self._run_callbacks(callbacks)
        return True

    def expire(self) -> bool:
        """Settle the job as timed out if its deadline has passed; True when this call did it."""
        if time.monotonic() < self.deadline_s:
            return False
        with self._lock:
            if self.state not in (Job.WAITING, Job.RUNNING):
                return False
            state = Job.DROPPED if self.state == Job.WAITING else Job.TIMED_OUT
            callbacks = self._settle(state, error=self.timeout_message(state))
        self._run_callbacks(callbacks)
        return True

    def cancel(self, reason: str) -> bool:
        """Answer the job with `reason` now; a running job stops at the engine's next check."""
        with self._lock:
            if self.state not in (Job.WAITING, Job.RUNNING):
                return False
            callbacks = self._settle(Job.CANCELLED, error=reason)
        self._run_callbacks(callbacks)
        return True

    def should_stop(self) -> str | None:
        """For the engine: why the running job must stop now (deadline passed, cancelled), or None."""
        self.expire()
        return self.error if self.state in (Job.TIMED_OUT, Job.CANCELLED) else None

    def wait(self) -> None:
        """Block until the job is settled; its deadline settles it at the latest (for in-process use)."""
        self._settled.wait(max(0.0, self.deadline_s - time.monotonic()))
        self.expire()
        self._settled.wait()

    def timeout_message(self, state: str | None = None) -> str:
        if (state or self.state) in (Job.WAITING, Job.DROPPED):
            return (f'timed out after {self.timeout_s:g} s (request_timeout_s) waiting in the queue: '
                    f'the node is busy; retry later, or raise request_timeout_s')
        return (f'timed out after {self.timeout_s:g} s (request_timeout_s) during inference: lower '
                f'max_new_tokens or token_budget, or raise request_timeout_s')


def check_prompt(text: str, what: str, limit: int) -> str:
    """`text` stripped; RequestRejected when it is empty or longer than `limit` (question_max_chars)."""
    text = text.strip()
    if not text:
        raise RequestRejected(f'empty_{what}', f'{what} is empty: send the {what} text')
    if len(text) > limit:
        raise RequestRejected(f'long_{what}', (
            f'{what} is {len(text)} characters, more than question_max_chars = {limit}: '
            f'shorten it, or raise question_max_chars'))
    return text


def check_frame_age(camera: str, *, stamped: bool, age_s: float, settings: Any) -> None:
    """RequestRejected for a camera frame without a stamp, stamped in the future beyond
    max_clock_skew_s, or older than max_image_age_s (`age_s`: node clock minus the stamp)."""
    if settings.max_image_age_s > 0 and not stamped:
        raise RequestRejected(('unstamped', camera), (
            f'latest frame of camera {camera!r} has no timestamp (header.stamp is 0): stamp images '
            f'with the capture time, or set max_image_age_s 0 to accept any age'))
    if -age_s > settings.max_clock_skew_s:
        raise RequestRejected(('future', camera), (
            f'latest frame of camera {camera!r} is stamped {-age_s:.2f} s in the future, more than '
            f'max_clock_skew_s = {settings.max_clock_skew_s:g}: synchronize the camera\'s clock with '
            f'this node\'s (chrony/PTP; use_sim_time for bag replay), or raise max_clock_skew_s'))
    limit_s = settings.max_image_age_s
    if limit_s > 0 and age_s > limit_s:
        raise RequestRejected(('stale', camera), (
            f'latest frame of camera {camera!r} is {age_s:.2f} s old, more than '
            f'max_image_age_s = {limit_s:g}: the camera stopped publishing or its stamps/clock '
            f'are off (use_sim_time for bag replay), or raise max_image_age_s'))


class RequestQueue:
    """FIFO of jobs for the worker: at most `max_running` running (the decode batch) plus `max_pending`
    waiting."""

    def __init__(self, max_pending: int, max_running: int = 1):
        self.max_pending = max_pending
        self.max_running = max_running
        self._jobs: collections.deque[Job] = collections.deque()
        self.running: list[Job] = []  # the jobs the worker holds (from `next` until `done`)
        self._open = False  # accepting jobs (the node is active)
        self._refusal = INACTIVE_MESSAGE  # the answer to a job submitted while closed
        self._ready = threading.Condition()

    def open(self) -> None:
        with self._ready:
            self._open = True

    def close(self, reason: str, refuse_with: str = INACTIVE_MESSAGE) -> None:
        """Stop accepting jobs (later ones are refused with `refuse_with`) and cancel the waiting and
        running ones with `reason`."""
        with self._ready:
            self._open, self._refusal = False, refuse_with
            jobs = list(self._jobs) + self.running
            self._jobs.clear()
            self._ready.notify_all()
        for job in jobs:
            job.cancel(reason)

    def submit(self, job: Job) -> None:
        """Queue `job`, or raise RequestRejected at once: inactive, or the batch full and max_pending waiting."""
        with self._ready:
            if not self._open:
                raise RequestRejected('inactive', self._refusal)
            self._prune()
            ahead = len(self._jobs) + len(self.running)
            if ahead >= self.max_pending + self.max_running:
                raise RequestRejected('busy', (
                    f'busy: {ahead} request(s) ahead ({len(self.running)} running, max_batch_size = '
                    f'{self.max_running}) and max_pending_requests = {self.max_pending}: '
                    f'retry later, or raise max_pending_requests'))
            self._jobs.append(job)
            self._ready.notify()

    def next(self, timeout_s: float, accept: Callable[[Job], bool] | None = None) -> Job | None:
        """Worker: the oldest waiting job (held in `running` until `done`), or None after timeout_s.

        `accept(job)` False leaves the oldest job waiting (None is returned): FIFO order is kept.
        """
        with self._ready:
            self._prune()
            if not self._jobs and timeout_s > 0:
                self._ready.wait(timeout_s)
                self._prune()
            if not self._jobs or (accept is not None and not accept(self._jobs[0])):
                return None
            job = self._jobs.popleft()
            self.running.append(job)
            return job

    def done(self, job: Job) -> None:
        with self._ready:
            if job in self.running:
                self.running.remove(job)

    def expire_overdue(self) -> None:
        """Answer every job whose deadline has passed, running or waiting (called periodically)."""
        for job in self.jobs():
            job.expire()

    def jobs(self) -> list[Job]:
        """The running jobs and the waiting ones, oldest first."""
        with self._ready:
            return self.running + list(self._jobs)

    def _prune(self) -> None:
        """Forget settled jobs (deadline passed, cancelled): they hold no place in the queue."""
        if any(job.state != Job.WAITING for job in self._jobs):
            self._jobs = collections.deque(job for job in self._jobs if job.state == Job.WAITING)

    def __len__(self) -> int:
        """Jobs waiting (those already answered excluded)."""
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
        self._stop_ms: collections.deque[float] = collections.deque(maxlen=window)
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

    def stopped(self, stop_ms: float) -> None:
        """A stopped job freed the worker `stop_ms` after its deadline passed or its cancel came."""
        with self._lock:
            self._stop_ms.append(stop_ms)

    def latencies(self) -> dict[str, list[float]]:
        """Copies of the recent samples: round_trip_ms, inference_ms, callback_us, stop_ms."""
        with self._lock:
            return {'round_trip_ms': list(self._round_trip_ms), 'inference_ms': list(self._inference_ms),
                    'callback_us': list(self._callback_us), 'stop_ms': list(self._stop_ms)}

    def failed(self, kind: str, message: str) -> None:
        """kind: 'failed' (bad input, engine error), 'refused' (queue full, inactive), 'timed_out',
        'cancelled' (deactivate, shutdown, caller gone), 'late'."""
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

