"""vlm_node's worker: the only thread that runs the engine, decoding up to `max_batch_size` requests together.

Without rclpy (the node passes in what it needs). Each loop turn admits waiting jobs into the engine's
``DecodeBatch`` while it has a free row (a job's frame is decoded and checked, then its prompt is
prefilled alone and its row joins at the next decode step), then runs one decode step for every row.
A row whose job was cancelled or passed its deadline leaves in that step (the job's ``should_stop`` is
asked before every step), so its slot is free for the next waiting job one step later. Services and
action goals are the same kind of job. A multi-image job (surround view, history) runs alone through
``VlmEngine.generate_images``: it waits at the head of the queue until the running rows have ended.
With `max_batch_size` 1 the worker runs one job at a time, in FIFO order, as before batching.
"""
from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zip_vlm_ros.engine import BatchRequest, EngineError, GenerationStopped, VlmEngine
from zip_vlm_ros.msg import VlmResult
from zip_vlm_ros.node.conversions import ImageConversionError, output_to_result
from zip_vlm_ros.node.image_sets import run_image_set
from zip_vlm_ros.node.jobs import CameraFeed, Job, RequestQueue, RequestRejected, RequestStats, ThrottledWarnings

# How long an idle worker waits for a job before it looks at its stop flag again.
IDLE_WAIT_S = 0.2


@dataclass
class NodeHooks:
    """What the worker uses of the node: its feeds, frame checks, result publishing, logs and counters."""

    feeds: dict[str, CameraFeed]
    check_frame_age: Callable[[str, Any], None]     # (camera, stamp): RequestRejected when unusable
    image_age_ms: Callable[[Any], float]            # (stamp): node clock minus stamp, 0 when unstamped
    publish: Callable[[Job, list[VlmResult]], None]
    publish_overlays: Callable[[Any, Any, list], None]   # (rgb, header, outputs): the visual-token overlays
    stats: RequestStats
    warnings: ThrottledWarnings
    logger: Any


@dataclass
class _Running:
    """A job in the batch and what its results need (the frame's header and pixels)."""

    job: Job
    header: Any
    rgb: Any = None                                  # the frame, for its visual-token overlays


class Worker:
    """Runs `queue`'s jobs on `engine`, at most `max_batch_size` decoding together, until `stop` is set."""

    def __init__(self, engine: VlmEngine, queue: RequestQueue, hooks: NodeHooks, max_batch_size: int,
                 stop: threading.Event):
        self.engine, self.queue, self.hooks, self.stop = engine, queue, hooks, stop
        self.batch = engine.decode_batch(max_batch_size)
        self._running: dict[int, _Running] = {}   # id(BatchRequest) -> its job

    def run(self) -> None:
        while not self.stop.is_set():
            self._admit()
            if self.batch:
                for request in self.batch.step():
                    self._end(self._running.pop(id(request)), request)
        # Deactivation: the queue cancelled the running jobs; their rows go with the batch.
        for running in self._running.values():
            self.queue.done(running.job)
        self._running.clear()

    def _admit(self) -> None:
        """Take waiting jobs while the batch has a free row (block briefly only when nothing runs)."""
        while self.batch.accepts and not self.stop.is_set():
            running = bool(self.batch)
            job = self.queue.next(timeout_s=0.0 if running else IDLE_WAIT_S,
                                  accept=lambda waiting: waiting.images is None or not running)
            if job is None:
                return
            if not job.start():
                self.queue.done(job)
                if job.state == Job.DROPPED and job.periodic:
                    self.hooks.stats.failed('timed_out', 'periodic description ' + job.timeout_message())
                continue  # a caller's dropped job is counted by the caller
            if job.images is not None:
                self._run_alone(job)
                continue
            self._join(job)

    def _join(self, job: Job) -> None:
        """Open the job's request and add its row; a job that fails here is answered at once."""
        try:
            request, header, rgb = self._open(job)
        except Exception as error:
            self.queue.done(job)
            self._deliver(job, [], error)
            return
        if self.batch.admit(request):
            self._running[id(request)] = _Running(job, header, rgb)
        else:
            self._end(_Running(job, header, rgb), request)

    def _open(self, job: Job) -> tuple[BatchRequest, Any, Any]:
        """Decode and check the job's frame; the engine's request for it, the frame's header and pixels."""
        if job.inline is not None:
            rgb, header, frame_key = job.inline.rgb, job.inline.header, None
        else:
            feed = self.hooks.feeds[job.camera]
            frame = feed.take()
            self.hooks.check_frame_age(job.camera, frame.msg.header.stamp)
            try:
                rgb = feed.rgb(frame)
            except ImageConversionError as error:
                raise RequestRejected(('malformed', job.camera),
                                      f'camera {job.camera!r} sent a bad frame: {error}') from None
            # Same key while this frame is the camera's latest: the engine reuses its image prefix.
            # A new frame has a new seq, so an old prefix is never used for new pixels.
            header, frame_key = frame.msg.header, (job.camera, frame.seq)
        request = self.engine.open_request(
            rgb, job.prompts, token_budget=job.token_budget, max_new_tokens=job.max_new_tokens,
            frame_key=frame_key, should_stop=job.should_stop, on_token=job.on_token, reducer=job.reducer)
        return request, header, rgb

    def _end(self, running: _Running, request: BatchRequest) -> None:
        """Answer a job whose request left the batch."""
        job = running.job
        self.queue.done(job)
        if request.error is not None:
            self._deliver(job, [], request.error)
            return
        self.hooks.publish_overlays(running.rgb, running.header, request.outputs)
        # An inline image without a stamp has no age; report 0 rather than the time since 1970.
        image_age_ms = self.hooks.image_age_ms(running.header.stamp)
        self._deliver(job, [output_to_result(output, header=running.header, camera=job.camera,
                                             image_age_ms=image_age_ms) for output in request.outputs], None)

    def _run_alone(self, job: Job) -> None:
        """A multi-image job, with the batch empty: the engine's generate_images."""
        results, error = [], None
        try:
            results = run_image_set(job, self.engine, self.hooks.feeds, check_age=self.hooks.check_frame_age,
                                    age_ms=self.hooks.image_age_ms)
        except Exception as failure:
            error = failure
        finally:
            self.queue.done(job)
        self._deliver(job, results, error)

    def _deliver(self, job: Job, results: list[VlmResult], error: BaseException | None) -> None:
        """Settle `job` with its results or `error`, count it and publish its results."""
        stats = self.hooks.stats
        if isinstance(error, GenerationStopped):
            # The job was answered when it was settled (deadline or cancel); time how long the
            # engine took to notice, the worker's cancel latency.
            if job.stop_requested_s is not None:
                stats.stopped((time.monotonic() - job.stop_requested_s) * 1e3)
            return
        message = None if error is None else self._error_message(error)
        if not job.finish(results, message):
            if job.state == Job.TIMED_OUT:  # the deadline passed during the last step
                stats.failed('late', 'discarded a result that came after its deadline')
            return
        if message is not None:
            stats.failed('failed', message)
            return
        stats.succeeded((time.monotonic() - job.submitted_s) * 1e3, [result.total_ms for result in results])
        self.hooks.publish(job, results)

    def _error_message(self, error: BaseException) -> str:
        """One line for the caller; logged (throttled for bad input, with the traceback for a bug)."""
        if isinstance(error, RequestRejected):
            self.hooks.warnings.warn(error.key, f'request failed: {error}')
            message = str(error)
        elif isinstance(error, EngineError):
            message = str(error)
            self.hooks.warnings.warn(('engine', type(error).__name__), f'request failed: {message}')
        else:  # a bug or e.g. CUDA out of memory: answer, log, carry on
            reason = (str(error).splitlines() or [''])[0]
            message = f'inference failed ({type(error).__name__}: {reason}): see the node log'
            trace = ''.join(traceback.format_exception(type(error), error, error.__traceback__))
            self.hooks.logger.error(f'{message}\n{trace}')
        return message.splitlines()[0] if message else message
