"""The node's `~/ask_action` (zip_vlm_ros/action/Ask): a question whose answer streams as feedback and
that its caller can cancel.

A goal is the Ask service's request and becomes the same kind of job in the node's one queue, run by
the one worker, with the same limits and refusals. Every goal is accepted (a goal rejection cannot
carry a reason) and a refused one is aborted at once with the reason in `result.message`. The
execute callback is a coroutine that awaits its job like the service callbacks do, so no executor
thread is held while the answer is generated. Feedback is published from the worker thread as the
engine reports each token; it is reliable but keep-last, and rclpy's ActionClient drops feedback
that arrives after the result, so the result repeats the last feedback sent (text, tokens, time).
A cancel settles the job at once (the result carries the text streamed so far) and the engine stops
at its next decode step.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.action.server import ServerGoalHandle
from rclpy.qos import QoSProfile, ReliabilityPolicy

from zip_vlm_ros.action import Ask as AskAction
from zip_vlm_ros.node.jobs import Job, RequestRejected
from zip_vlm_ros.engine.streaming import StreamedText

ACTION_NAME = '~/ask_action'
# An action client holds a client of each of these services; none left means its callers are gone.
CLIENT_PROBE_SERVICE = ACTION_NAME + '/_action/get_result'
CANCELLED_MESSAGE = 'cancelled by the client'
# Feedback goes out whenever the text grows, and at least this often while tokens come without text
# (the bytes of one character, or a word still open).
FEEDBACK_PERIOD_S = 0.1
# Feedback the server keeps per client while it is slow to read: a 64-token answer's every step.
FEEDBACK_DEPTH = 100
# rclpy moves a goal to CANCELING just after the cancel callback returns; how long the execute
# coroutine, resumed by that callback's job.cancel in another thread, may wait for it.
CANCELING_WAIT_S = 1.0


class GoalStream:
    """One goal's feedback: what was streamed, published from the worker; closed when the job settles."""

    def __init__(self, goal_handle: ServerGoalHandle):
        self._goal_handle = goal_handle
        self._lock = threading.Lock()
        self._open = True
        self._last_feedback_s = 0.0
        # The last feedback sent (the partial answer of a stopped job, which its result repeats).
        self.last_feedback = AskAction.Feedback()
        self.job: Job | None = None
        self.cancel_requested = False

    def on_token(self, step: StreamedText) -> None:
        """Engine callback (worker thread): publish feedback if the text grew or a period passed."""
        now = time.monotonic()
        with self._lock:
            if not self._open:
                return  # settled (cancelled, timed out): its result already holds the text so far
            first = step.generated_tokens == 1
            if not (step.delta or first or now - self._last_feedback_s >= FEEDBACK_PERIOD_S):
                return
            self._last_feedback_s = now
            self.last_feedback = AskAction.Feedback(
                text=step.text, delta=step.delta, generated_tokens=step.generated_tokens,
                elapsed_ms=step.elapsed_ms)
            self._goal_handle.publish_feedback(self.last_feedback)

    def close(self, _job: Job | None = None) -> None:
        with self._lock:
            self._open = False


class AskActionServer:
    """`~/ask_action` on `node`: goals become jobs of `make_job` served by `serve` (the node's own path).

    make_job(request) -> Job validates a goal like the Ask service's request (RequestRejected when bad);
    serve(make_job, response) is the node's coroutine that queues the job and awaits its outcome.
    """

    def __init__(self, node: Any, *, make_job: Callable[[Any], Job], serve: Callable, service_qos: QoSProfile,
                 callback_group: Any):
        self._make_job, self._serve = make_job, serve
        self._streams: dict[bytes, GoalStream] = {}
        feedback_qos = QoSProfile(depth=FEEDBACK_DEPTH, reliability=ReliabilityPolicy.RELIABLE)
        self.server = ActionServer(
            node, AskAction, ACTION_NAME, execute_callback=self._execute,
            goal_callback=lambda _goal: GoalResponse.ACCEPT, cancel_callback=self._cancel,
            callback_group=callback_group, goal_service_qos_profile=service_qos,
            result_service_qos_profile=service_qos, cancel_service_qos_profile=service_qos,
            feedback_pub_qos_profile=feedback_qos)

    def destroy(self) -> None:
        self.server.destroy()

    async def _execute(self, goal_handle: ServerGoalHandle) -> AskAction.Result:
        key = bytes(goal_handle.goal_id.uuid)
        stream = self._streams.setdefault(key, GoalStream(goal_handle))

        def make_job() -> Job:
            if stream.cancel_requested:
                raise RequestRejected('cancelled', CANCELLED_MESSAGE + ' before it was queued')
            job = self._make_job(goal_handle.request)
            job.on_token = stream.on_token
            job.add_settled_callback(stream.close)  # before the node's own: no feedback after the answer
            stream.job = job
            return job
        try:
            result = await self._serve(make_job, AskAction.Result())
            if not result.success:
                # Feedback after the result never reaches an rclpy ActionClient (it drops it with the
                # goal's feedback callback), so the result repeats the last feedback.
                last = stream.last_feedback
                result.partial_text, result.partial_generated_tokens = last.text, last.generated_tokens
                result.partial_elapsed_ms = last.elapsed_ms
            self._set_terminal_state(goal_handle, stream, result)
            return result
        finally:
            # after the terminal state: a later cancel request no longer reaches _cancel
            self._streams.pop(key, None)

    def _cancel(self, goal_handle: ServerGoalHandle) -> CancelResponse:
        """Accept a cancel while the goal waits or runs: its job is answered now and never (re)started."""
        stream = self._streams.setdefault(bytes(goal_handle.goal_id.uuid), GoalStream(goal_handle))
        stream.cancel_requested = True
        job = stream.job
        if job is None or job.cancel(CANCELLED_MESSAGE):
            return CancelResponse.ACCEPT
        return CancelResponse.REJECT  # already answered: the result is on its way

    @staticmethod
    def _set_terminal_state(goal_handle: ServerGoalHandle, stream: GoalStream, result: Any) -> None:
        if result.success:
            goal_handle.succeed()
            return
        if stream.cancel_requested:
            # The cancel callback settled the job from another thread; rclpy marks the goal CANCELING
            # right after that callback returns, which may be a moment after this coroutine resumed.
            deadline = time.monotonic() + CANCELING_WAIT_S
            while not goal_handle.is_cancel_requested and time.monotonic() < deadline:
                time.sleep(0.0005)
            if goal_handle.is_cancel_requested:
                goal_handle.canceled()
                return
        goal_handle.abort()
