"""Offline replay on Ray (``vlm_replay --ray``): frames are sent, several per task, to Ray actors that
each hold one engine; their rows stream back and the driver alone writes results.jsonl and the reports,
exactly as the single-process run does. A worker that dies has its unfinished tasks run again on another
worker. A local Ray instance (no address) listens on 127.0.0.1 only.

Ray is optional: nothing but ``vlm_replay --ray`` imports this module, and it imports ``ray`` only when
the run starts."""
from __future__ import annotations

import argparse
import importlib.util
import os
import time
from collections import deque
from dataclasses import dataclass

from zip_vlm_ros.replay.bag import Frame, SkippedFrame
from zip_vlm_ros.replay.console import note, warn
from zip_vlm_ros.replay.inputs import Label, Question, ReplayError
from zip_vlm_ros.replay.offline import (FrameEvaluation, OfflineEvaluation, engine_facts, engine_settings,
                                        SelectedBag, evaluate_frame, load_engine, open_selection, start_run)

LOCAL_CLUSTER = 'local'
LOOPBACK_ADDRESSES = ('127.0.0.1', '::1')
# Ray's switch for "this machine only" (named for the platforms where that is its default).
LOCAL_ONLY_VARIABLE = 'RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER'
WORKER_NAMESPACE = 'zip_vlm_ros.replay'
# Frames per Ray task (default of --frames-per-task): each task costs a round trip through Ray (about
# 10-20 ms here, plus the frames' pixels through the object store), which a task of several frames pays
# once; a worker that dies re-runs at most this many frames.
FRAMES_PER_TASK = 4
# Tasks queued on each worker beyond the one it runs: the next one is already there when one ends,
# while most frames stay with the driver, free to go to whichever worker is idle (or alive) first.
TASKS_AHEAD_PER_WORKER = 1
# A task whose worker died this many times has its frames reported as skipped rather than retried
# forever (a frame that crashes every process it meets, e.g. out of memory, must not stop the run).
MAX_ATTEMPTS = 3


def worker_name(index: int) -> str:
    """The Ray name of worker `index` of a run (named so an operator, or a test, can find and kill it)."""
    return f'vlm_replay_worker_{index}'


class FrameWorker:
    """A Ray actor's state: one engine, warmed up on its first frame like the single-process run's."""

    def __init__(self, settings: dict, torch_threads: int):
        import torch

        torch.set_num_threads(torch_threads)
        self.engine = load_engine(settings)
        self.describe_prompt = settings['describe_prompt']
        self.warmed_up = False

    def facts(self) -> dict:
        return engine_facts(self.engine)

    def evaluate(self, frames: list[Frame], todos: list[dict]) -> list[FrameEvaluation]:
        """Each frame at its budgets (``todos[i]``: budget -> prompts to do), in order."""
        evaluations = []
        for frame, todo_by_budget in zip(frames, todos):
            warm_up_prompt = None if self.warmed_up else self.describe_prompt
            self.warmed_up = True
            evaluations.append(evaluate_frame(self.engine, frame, todo_by_budget, warm_up_prompt=warm_up_prompt))
        return evaluations


@dataclass
class FrameTask:
    """Frames sent to one worker in one Ray task, each with its budgets' prompts still to do."""
    frames: list[Frame]
    todos: list[dict]
    attempts: int = 0


class WorkerPool:
    """The run's actors and the tasks they hold; replaces an actor that died and hands its tasks on."""

    def __init__(self, args: argparse.Namespace, settings: dict):
        import ray

        self.ray, self.settings = ray, settings
        self.workers, self.gpus_per_worker = args.workers, args.gpus_per_worker
        cpus = int(ray.cluster_resources().get('CPU', 1))
        # Torch threads split between the workers: two workers of two threads each on two cores would
        # only fight over them.
        self.cpus_per_worker = max(1, cpus // self.workers)
        self.torch_threads = args.threads_per_worker or self.cpus_per_worker
        self.actors: dict[int, object] = {}
        self.running: dict[object, tuple[int, FrameTask]] = {}  # object ref -> (worker index, task)
        self.next_index = 0
        for _ in range(self.workers):
            self._start_actor()

    def _start_actor(self) -> None:
        options = {'num_cpus': self.cpus_per_worker, 'name': worker_name(self.next_index),
                   'namespace': WORKER_NAMESPACE, 'max_restarts': 0}
        if self.gpus_per_worker:
            options['num_gpus'] = self.gpus_per_worker
        actor_class = self.ray.remote(FrameWorker).options(**options)
        self.actors[self.next_index] = actor_class.remote(self.settings, self.torch_threads)
        self.next_index += 1

    def facts(self) -> dict:
        """Wait until every worker has loaded its engine (they load at once, in their own processes) and
        return the engine facts (all load the same checkpoint with the same settings)."""
        try:
            return self.ray.get([actor.facts.remote() for actor in self.actors.values()])[0]
        except self.ray.exceptions.RayActorError as error:
            raise ReplayError(f'the Ray worker could not load the model: {_cause(error)}') from None

    def has_room(self) -> bool:
        return len(self.running) < len(self.actors) * (1 + TASKS_AHEAD_PER_WORKER)

    def least_loaded(self) -> int:
        """The index of the live worker holding the fewest tasks (the first of them on a tie)."""
        load = {index: 0 for index in self.actors}
        for index, _ in self.running.values():
            if index in load:  # frames of a worker that died are counted on no one
                load[index] += 1
        return min(load, key=load.get)

    def submit(self, task: FrameTask) -> None:
        """To the live worker holding the fewest tasks."""
        index = self.least_loaded()
        task.attempts += 1
        self.running[self.actors[index].evaluate.remote(task.frames, task.todos)] = (index, task)

    def next_done(self) -> tuple[FrameTask, list[FrameEvaluation] | None]:
        """Wait for a task to end: the task and its frames' evaluations, or None when its worker died
        (the worker is replaced, and the caller re-queues the task)."""
        [ref], _ = self.ray.wait(list(self.running), num_returns=1)
        index, task = self.running.pop(ref)
        try:
            return task, self.ray.get(ref)
        except self.ray.exceptions.RayActorError as error:
            if index in self.actors:
                del self.actors[index]
                warn(f'Ray worker {worker_name(index)} died ({_cause(error)}); its unfinished frames run again '
                     f'on another worker')
                self._start_actor()
            return task, None

    def close(self) -> None:
        for actor in self.actors.values():
            self.ray.kill(actor)
        self.actors.clear()
        self.running.clear()


def _cause(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


class RayEvaluation(OfflineEvaluation):
    """The offline loop with frames evaluated by a WorkerPool; the driver reads the bags, selects frames,
    groups them into tasks and writes every row and the report (so the files are the single-process
    run's)."""

    def __init__(self, args, bags: list[SelectedBag], pool: WorkerPool, run: dict, done_rows: list[dict],
                 labels: list[Label], questions: list[Question]):
        super().__init__(args, bags, None, run, done_rows, labels, questions)
        self.pool = pool
        self.frames_per_task = args.frames_per_task or FRAMES_PER_TASK
        self.filling = FrameTask([], [])
        self.waiting: deque[FrameTask] = deque()

    def _evaluate_frame(self, frame: Frame) -> None:
        todo_by_budget = self._todo(frame)
        if not any(todo_by_budget.values()):
            self.progress.update(len(self.budgets))
            return
        self.filling.frames.append(frame)
        self.filling.todos.append(todo_by_budget)
        if len(self.filling.frames) == self.frames_per_task:
            self.waiting.append(self.filling)
            self.filling = FrameTask([], [])
            self._dispatch(until_empty=False)

    def _read_bags(self) -> None:
        super()._read_bags()
        if self.filling.frames:
            self.waiting.append(self.filling)
        self._dispatch(until_empty=True)

    def _dispatch(self, *, until_empty: bool) -> None:
        """Keep the workers busy; collect finished tasks until the queue is short (reading the bag on)
        or, at the end, until every frame is done."""
        while self.waiting or (until_empty and self.pool.running):
            while self.waiting and self.pool.has_room():
                self.pool.submit(self.waiting.popleft())
            if not until_empty and len(self.waiting) < len(self.pool.actors):
                return
            task, evaluations = self.pool.next_done()
            if evaluations is None and task.attempts < MAX_ATTEMPTS:
                self.waiting.appendleft(task)
                continue
            for position, frame in enumerate(task.frames):
                self._record(frame, evaluations[position] if evaluations is not None else FrameEvaluation(
                    [], [SkippedFrame(frame.topic, frame.index, frame.stamp_ns, frame.log_ns,
                                      f'all budgets: {MAX_ATTEMPTS} Ray workers died on this frame', frame.bag)]))
                self.progress.update(len(self.budgets))


def connect(address: str, workers: int, gpus_per_worker: float) -> bool:
    """Join the cluster at `address`, or start a local one on loopback only; True when this run started
    Ray (and so shuts it down). An already initialised Ray (a caller's own) is used as it is."""
    if address == LOCAL_CLUSTER:
        # Nothing of a local run leaves this machine. Ray turns a node address of 127.0.0.1 into the
        # machine's outward address unless this variable (read when ray is imported) says "local Ray
        # only"; with it the node's address is 127.0.0.1, and the GCS, the raylet and its object manager,
        # the workers and the runtime env agent all listen there. No dashboard (nor its agent, nor the
        # metrics agent), no usage report.
        os.environ[LOCAL_ONLY_VARIABLE] = '0'
        os.environ['RAY_USAGE_STATS_ENABLED'] = '0'
    import ray

    if ray.is_initialized():
        return False
    if address != LOCAL_CLUSTER:
        ray.init(address=address, log_to_driver=True, configure_logging=False)
        return True
    ray.init(include_dashboard=False, _node_ip_address=LOOPBACK_ADDRESSES[0],
             num_cpus=max(os.cpu_count() or 1, workers), num_gpus=None if gpus_per_worker else 0,
             log_to_driver=True, configure_logging=False)
    node_address = ray.util.get_node_ip_address()
    if node_address not in LOOPBACK_ADDRESSES:
        ray.shutdown()
        raise ReplayError(f'the local Ray instance took the address {node_address}, not loopback: this process '
                          f'imported ray before vlm_replay could keep it local; set {LOCAL_ONLY_VARIABLE}=0 in the '
                          f'environment, or start Ray yourself and pass --ray ADDRESS')
    return True


def run_on_ray(args: argparse.Namespace, budgets: list[str], questions: list[Question], labels: list[Label]) -> int:
    if any(question.several_images for question in questions):
        raise ReplayError('questions over several images (topics or history) are evaluated in one process: '
                          'remove them from the questions file for --ray, or run without --ray')
    if importlib.util.find_spec('ray') is None:  # found, not imported: connect() sets Ray up first
        raise ReplayError('--ray needs Ray: pip install -r requirements-ray.txt (or run without --ray)')
    settings = engine_settings(args, questions)
    bags, done_rows = open_selection(args, questions)
    started = False
    pool = None
    try:
        try:
            start_s = time.monotonic()
            started = connect(args.ray, args.workers, args.gpus_per_worker)
            note(f'Ray: {args.workers} worker(s) on {"a local instance" if args.ray == LOCAL_CLUSTER else args.ray}')
            pool = WorkerPool(args, settings)
            facts = pool.facts()
            note(f'Ray: {args.workers} worker(s) ready after {time.monotonic() - start_s:.1f} s (Ray start and model '
                 f'loads)')
            run = start_run(args, settings, bags, budgets, questions, facts, done_rows)
        except KeyboardInterrupt:  # Ctrl-C while Ray or the models start: nothing to report yet
            raise ReplayError('interrupted while the Ray workers started; nothing was evaluated') from None
        return RayEvaluation(args, bags, pool, run, done_rows, labels, questions).run()
    finally:
        if pool is not None:
            pool.close()
        if started:
            import ray

            ray.shutdown()
