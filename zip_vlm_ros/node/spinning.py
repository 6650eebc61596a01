"""Spin a ROS executor in a background thread and stop it cleanly: used by vlm_node and VlmClient."""
from __future__ import annotations

import threading

from rclpy.executors import Executor, ExternalShutdownException


class BackgroundSpinner:
    """Spins `executor` in a thread of its own until `stop()`.

    The order of `stop()` matters with rclpy 9: `Executor.shutdown()` destroys the executor's guard
    condition at once (it does not wait for work in progress), so a callback handed out a moment
    before fails on it ("The following exception was never retrieved: cannot use Destroyable"), and
    an interpreter exiting while the thread still spins aborts ("terminate called without an active
    exception"). So the thread first stops taking work and is joined, the callbacks it handed out
    finish, then the executor shuts down.
    """

    def __init__(self, executor: Executor, name: str = 'executor', poll_s: float = 0.1):
        self._executor = executor
        self._poll_s = poll_s
        self._spinning = threading.Event()
        self._spinning.set()
        self._thread = threading.Thread(target=self._spin, name=name, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        try:
            while self._spinning.is_set():
                self._executor.spin_once(timeout_sec=self._poll_s)
        except ExternalShutdownException:
            pass

    def stop(self, timeout_s: float = 5.0) -> None:
        self._spinning.clear()
        self._executor.wake()
        self._thread.join(timeout_s)
        # A MultiThreadedExecutor runs the callbacks it handed out in a thread pool, and one that
        # starts after shutdown() fails on the destroyed guard condition: let the pool finish first.
        # (rclpy 9 offers no public way; shutdown() itself stops the pool only after the guard.)
        pool = getattr(self._executor, '_executor', None)
        if pool is not None:
            pool.shutdown(wait=True)
        self._executor.shutdown(timeout_sec=timeout_s)
