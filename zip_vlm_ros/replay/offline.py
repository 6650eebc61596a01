"""Offline evaluation: the bag's frames go straight into the node's engine, once per budget; the scene
description and every question share the frame's image prefix (``VlmEngine.generate_many``). Questions
over several images (topics paired by stamp, or a history) are asked by ``image_set_questions``."""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
from collections import Counter

import numpy as np

from zip_vlm_ros.replay.bag import (Bag, Frame, FrameSelector, SkippedFrame, damaged_frames, decode_frame, open_bag,
                                    resolve_topics)
from zip_vlm_ros.replay.console import note, progress_bar, warn
from zip_vlm_ros.replay.foxglove import FoxgloveRecording
from zip_vlm_ros.replay.html_report import HTML_REPORT_FILE, save_frame_images, write_html_report
from zip_vlm_ros.replay.image_set_questions import ImageSetQuestions, image_set_topics
from zip_vlm_ros.replay.inputs import (FULL_BUDGET, NODE_ENGINE_PARAMETERS, Label, Question, ReplayError,
                                       budget_tokens, load_node_parameters, point_budget, point_reducer)
from zip_vlm_ros.replay.report import AGREEMENT_PLOT, LATENCY_PLOT, format_stamp, write_report
from zip_vlm_ros.replay.results import (REPORT_FILE, RESULTS_FILE, ResultsWriter, check_resumed_run, output_row,
                                        prepare_out_dir, result_key, write_run_file)
from zip_vlm_ros.replay.storage import DamagedRegion

EXIT_OK, EXIT_NOTHING_EVALUATED, EXIT_BAG_UNREADABLE, EXIT_INTERRUPTED = 0, 1, 3, 130


def engine_settings(args: argparse.Namespace, questions: list[Question]) -> dict:
    """Command line, then the node's params file, then the engine's (= the node's) defaults."""
    from zip_vlm_ros.engine import DEFAULT_DESCRIBE_PROMPT

    node_parameters = load_node_parameters(args.params_file) if args.params_file else {}
    settings = {name: node_parameters.get(name) if getattr(args, name) is None else getattr(args, name)
                for name in NODE_ENGINE_PARAMETERS}
    if not settings['model']:
        raise ReplayError('--model is required for offline replay (or a --params-file that sets model): pass a '
                          'LLaVA checkpoint directory or hub id, or use --live to evaluate a running node')
    ratio = settings['dominant_ratio']
    if ratio is not None and not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
        raise ReplayError(f'dominant_ratio {ratio!r} is out of range: use 0 < dominant_ratio <= 1 '
                          f'(the node\'s default is 54/64 = 0.84375)')
    settings['describe_prompt'] = settings['describe_prompt'] or DEFAULT_DESCRIBE_PROMPT
    if any(question.question == settings['describe_prompt'] for question in questions):
        raise ReplayError(f'the questions file repeats the description prompt {settings["describe_prompt"]!r}: '
                          f'remove it from the questions (the description is always evaluated)')
    return settings


def load_engine(settings: dict):
    from zip_vlm_ros.engine import EngineConfig, EngineError, VlmEngine

    ratio = settings['dominant_ratio']
    values = {'model': str(settings['model']), 'vision_tower': settings['vision_tower'] or None,
              'max_pixels': settings['max_pixels'] or None,
              'device': settings['device'], 'dtype': settings['dtype'],
              'contextual_ratio': None if ratio is None else 1.0 - ratio, 'max_new_tokens': settings['max_new_tokens']}
    config = EngineConfig(**{key: value for key, value in values.items() if value is not None})
    note(f'loading {config.model} ...')
    try:
        return VlmEngine(config)
    except EngineError as error:
        raise ReplayError(str(error)) from None


def open_selection(args: argparse.Namespace, questions: list[Question]) -> tuple[Bag, list[str], list[dict]]:
    """The bag, its topics to evaluate and the rows already done; checked before any (slow) model load, so
    that a wrong topic, --out or a damaged results file fails at once. The caller closes the bag."""
    bag = open_bag(args.bag)
    try:
        topics = resolve_topics(bag.topics, args.topics, args.bag)
        missing = [topic for topic in image_set_topics(questions) if topic not in bag.topics]
        if missing:
            raise ReplayError(f'the questions file names topic(s) {", ".join(missing)} that {args.bag} does not '
                              f'have: use its image topics ({", ".join(sorted(bag.topics))})')
        return bag, topics, prepare_out_dir(pathlib.Path(args.out), resume=args.resume)
    except BaseException:
        bag.close()
        raise


def engine_facts(engine) -> dict:
    """What the run records about the engine; a Ray worker sends the same dict for the engine it holds."""
    return {'model': engine.model_name, 'device': str(engine.device),
            'dtype': str(engine.dtype).removeprefix('torch.'), 'dominant_ratio': 1.0 - engine.config.contextual_ratio,
            'max_new_tokens': engine.config.max_new_tokens, 'visual_tokens_full': engine.visual_tokens_full,
            'token_budget_applies': engine.token_budget_applies, 'family': engine.family.label}


def start_run(args: argparse.Namespace, settings: dict, bag: Bag, topics: list[str], budgets: list[str],
              questions: list[Question], facts: dict, done_rows: list[dict]) -> dict:
    """Note budgets that reduce nothing, check a resumed run against this one and write run.json. The
    mode stays 'offline' with or without Ray: both give the same rows, so either may resume the other."""
    if not facts['token_budget_applies']:
        note(f'note: token budgets do not apply to {facts["family"]}: every budget reads its '
             f'{facts["visual_tokens_full"]} trained visual token(s) per image')
    for budget in budgets:
        tokens = budget_tokens(budget, facts['visual_tokens_full'])
        if facts['token_budget_applies'] and point_budget(budget) != FULL_BUDGET and tokens >= facts['visual_tokens_full']:
            note(f'note: budget {budget} >= the {facts["visual_tokens_full"]} visual tokens of '
                 f'{facts["model"]}: no reduction, same as full')
    out_dir = pathlib.Path(args.out)
    run = {
        'mode': 'offline', 'bag': str(args.bag), 'bag_files': bag.fingerprint(), 'bag_notes': bag.notes,
        'topics': topics, 'model': facts['model'], 'device': facts['device'], 'dtype': facts['dtype'],
        'dominant_ratio': facts['dominant_ratio'], 'max_new_tokens': facts['max_new_tokens'],
        'describe_prompt': settings['describe_prompt'],
        'questions': [dataclasses.asdict(question) for question in questions], 'budgets': budgets,
        'reducers': args.reducers,
        'every': args.every, 'period_s': args.period, 'max_frames': args.max_frames,
        'pair_tolerance_s': args.pair_tolerance,
    }
    if args.resume and (done_rows or (out_dir / RESULTS_FILE).exists()):
        check_resumed_run(out_dir, run)
    write_run_file(out_dir, run)
    return run


def run_offline(args: argparse.Namespace, budgets: list[str], questions: list[Question], labels: list[Label]) -> int:
    settings = engine_settings(args, questions)
    bag, topics, done_rows = open_selection(args, questions)
    try:
        engine = load_engine(settings)
        try:
            run = start_run(args, settings, bag, topics, budgets, questions, engine_facts(engine), done_rows)
            return OfflineEvaluation(args, bag, engine, run, done_rows, labels, questions).run()
        finally:
            engine.close()
    finally:
        bag.close()


class OfflineEvaluation:
    """The offline loop: frames in bag order, each at every budget, all prompts sharing the prefix."""

    def __init__(self, args, bag: Bag, engine, run: dict, done_rows: list[dict], labels: list[Label],
                 questions: list[Question] = ()):
        from rosbags.typesys import Stores, get_typestore

        self.args, self.bag, self.engine, self.run_info, self.labels = args, bag, engine, run, labels
        self.typestore = get_typestore(Stores.ROS2_KILTED)
        self.out_dir = pathlib.Path(args.out)
        self.topics, self.budgets = run['topics'], run['budgets']
        self.done_rows, self.done_keys = done_rows, {result_key(row) for row in done_rows}
        self.prompts = [(run['describe_prompt'], 'describe', ())] + [
            (q.question, 'question', q.expect) for q in questions if not q.several_images]
        selector_args = dict(every=args.every, period_s=args.period, max_frames=args.max_frames)
        self.selector = FrameSelector(**selector_args)
        self.skipped: list[SkippedFrame] = []
        self.image_sets = ImageSetQuestions(
            engine, list(questions), self.budgets, tolerance_s=args.pair_tolerance, selector_args=selector_args,
            done_keys=self.done_keys, write=self._write_rows, skipped=self.skipped) if any(
                q.several_images for q in questions) else None
        self.skipped_per_topic: Counter[str] = Counter()
        self.new_rows: list[dict] = []
        self.warmed_up = False
        self.progress = None
        self.writer = None
        self.foxglove_path = getattr(args, 'foxglove', None)
        self.foxglove: FoxgloveRecording | None = None

    def run(self) -> int:
        interrupted = False
        self.writer = ResultsWriter(self.out_dir / RESULTS_FILE)
        self.progress = progress_bar(self._estimated_total(), 'frame-budgets')
        if self.foxglove_path:
            self.foxglove = FoxgloveRecording(self.foxglove_path)
        try:
            self._read_bag()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            self.writer.close()
            if self.foxglove is not None:
                self.foxglove.close()
                note(f'Foxglove recording in {self.foxglove_path}')
            if not interrupted and self.progress.total is not None:
                self.progress.total = self.progress.n  # the estimate becomes exact
            self.progress.close()
        return self._finish(interrupted)

    def _read_bag(self) -> None:
        image_sets = self.image_sets
        read_topics = list(dict.fromkeys(self.topics + (image_sets.topics if image_sets else [])))
        for item in self.bag.messages(read_topics):
            if isinstance(item, DamagedRegion):
                frames = damaged_frames(item, self.topics)
                self.skipped.extend(frames)
                warn(frames[0].reason if frames else f'damaged region in {item.file} {item.where}')
                continue
            wanted = item.topic in self.topics and self.selector.wants(item.topic, item.log_ns)
            # Questions over several images pair and look back over every frame of their topics.
            paired = image_sets is not None and image_sets.reads(item.topic)
            if not wanted and not paired:
                if all(self.selector.topic_full(name) for name in self.topics) and (
                        image_sets is None or image_sets.done()):
                    return
                continue
            frame = decode_frame(self.typestore, item)
            if isinstance(frame, SkippedFrame):
                if wanted:
                    self.skipped.append(frame)
                    self._drop_from_total(frame.topic)
                    warn(f'skipped {frame.topic} frame {frame.index} at {format_stamp(frame.stamp_ns)}: '
                         f'{frame.reason}')
                continue
            if wanted:
                self.selector.accept(item.topic, item.log_ns)
                self._evaluate_frame(frame)
            if paired:
                image_sets.push(frame)
        if image_sets is not None:
            image_sets.finish()

    def _write_rows(self, rows: list[dict]) -> None:
        self.writer.write(rows)
        self.new_rows.extend(rows)

    def _estimated_total(self) -> int | None:
        """Frame-budgets the selection will give, not counting the malformed frames met so far."""
        duration_ns = max(self.bag.end_ns - self.bag.start_ns, 0)
        estimates = [self.selector.expected_frames(self.bag.topics[topic].msgcount, duration_ns,
                                                   skipped=self.skipped_per_topic[topic]) for topic in self.topics]
        return None if None in estimates else sum(estimates) * len(self.budgets)

    def _drop_from_total(self, topic: str) -> None:
        """A malformed frame was counted in the estimate; the bar's total should not wait for it."""
        self.skipped_per_topic[topic] += 1
        total = self._estimated_total()
        if total is not None:
            self.progress.total = max(total, self.progress.n)
            self.progress.refresh()

    def _todo(self, frame: Frame) -> dict[str, list[tuple]]:
        """Per budget, the prompts of this frame that results.jsonl does not hold yet."""
        return {budget: [(prompt, kind, expect) for prompt, kind, expect in self.prompts
                         if (frame.topic, frame.index, budget, prompt) not in self.done_keys]
                for budget in self.budgets}

    def _evaluate_frame(self, frame: Frame) -> None:
        todo_by_budget = self._todo(frame)
        if any(todo_by_budget.values()):
            warm_up_prompt = None if self.warmed_up else self.run_info['describe_prompt']
            self.warmed_up = True
            self._record(frame, evaluate_frame(self.engine, frame, todo_by_budget, warm_up_prompt=warm_up_prompt))
        self.progress.update(len(self.budgets))

    def _record(self, frame: Frame, evaluated: FrameEvaluation) -> None:
        """One frame's answers into results.jsonl (and its images, and the Foxglove recording), and its
        budgets the engine refused into the report."""
        for skipped in evaluated.skipped:
            self.skipped.append(skipped)
            warn(f'{skipped.topic} frame {skipped.index} at {format_stamp(skipped.stamp_ns)}, {skipped.reason}')
        if self.foxglove is not None:
            self.foxglove.add_frame(frame)
        rows = []
        for point in evaluated.points:
            rows += [output_row(frame, point.budget, output, kind=kind, expect=expect)
                     for kind, expect, output in zip(point.kinds, point.expects, point.outputs)]
            save_frame_images(self.out_dir, frame, point.budget, point.outputs[0].provenance)
            if self.foxglove is not None:
                self.foxglove.add_point(frame, point.budget, point.outputs, point.kinds)
        self._write_rows(rows)

    def _finish(self, interrupted: bool) -> int:
        problems, partial = [], []
        if interrupted:
            partial.append('interrupted before the end of the selection; run again with --resume to continue')
        partial += self.bag.cut
        if self.bag.stopped:
            partial.append(self.bag.stopped)
        for topic in self.topics if not (interrupted or self.bag.stopped) else ():
            if self.selector.accepted[topic] == 0:
                problems.append(f'no frame of {topic} could be evaluated (selection empty or every frame malformed)')
                warn(problems[-1])
        all_rows = self.done_rows + self.new_rows
        summaries = write_report(self.out_dir, all_rows, self.skipped, self.run_info, problems=problems,
                                 partial=partial, labels=self.labels)
        write_html_report(self.out_dir, all_rows, summaries, [LATENCY_PLOT, AGREEMENT_PLOT])
        note(f'{len(self.new_rows)} new answers ({len(self.done_rows)} from earlier runs), {len(self.skipped)} '
             f'skipped frames; report in {self.out_dir / REPORT_FILE} and {self.out_dir / HTML_REPORT_FILE}')
        if self.bag.stopped:
            warn(f'{self.bag.stopped}; the report covers the frames before it', level='error')
            return EXIT_BAG_UNREADABLE
        if interrupted:
            note('interrupted; run again with --resume to continue')
            return EXIT_INTERRUPTED
        return EXIT_OK if all_rows else EXIT_NOTHING_EVALUATED


@dataclasses.dataclass
class EvaluatedPoint:
    """One (reducer, budget) point of a frame: the engine's outputs (``VlmOutput``) for its prompts, in order."""
    budget: str
    kinds: list[str]
    expects: list[tuple]
    outputs: list


@dataclasses.dataclass
class FrameEvaluation:
    """What an engine gave for one frame: its evaluated points, and a SkippedFrame per budget it refused."""
    points: list[EvaluatedPoint]
    skipped: list[SkippedFrame]


def evaluate_frame(engine, frame: Frame, todo_by_budget: dict[str, list[tuple]], *,
                   warm_up_prompt: str | None = None) -> FrameEvaluation:
    """A frame at every budget (all prompts of a budget sharing the image prefix). `warm_up_prompt` is
    given on an engine's first frame."""
    from zip_vlm_ros.engine import EngineError

    if warm_up_prompt is not None:
        _warm_up(engine, frame.rgb, list(todo_by_budget), warm_up_prompt)
    evaluated = FrameEvaluation([], [])
    for budget, todo in todo_by_budget.items():
        if not todo:
            continue
        try:
            outputs = engine.generate_many(
                frame.rgb, [prompt for prompt, _, _ in todo],
                token_budget=budget_tokens(budget, engine.visual_tokens_full),
                reducer=point_reducer(budget) or None,
                # The frame's identity in the bag, never its stamp (several images may share one), and
                # per budget label: budgets that mean the same token count (192 and full on a small
                # model) are each timed from scratch instead of sharing one prefix.
                frame_key=(frame.topic, frame.index, budget))
        except EngineError as error:
            evaluated.skipped.append(SkippedFrame(frame.topic, frame.index, frame.stamp_ns, frame.log_ns,
                                                  f'budget {budget}: {error}'))
            continue
        evaluated.points.append(EvaluatedPoint(budget, [kind for _, kind, _ in todo],
                                               [expect for _, _, expect in todo], outputs))
    return evaluated


def _warm_up(engine, rgb: np.ndarray, budgets: list[str], prompt: str) -> None:
    """One unrecorded request per budget before timing starts: the first calls of a fresh process pay for
    lazy initialisation (kernels, allocator, caches), which would otherwise land on whichever budget
    happens to run first and skew the comparison."""
    from zip_vlm_ros.engine import EngineError

    for budget in budgets:
        try:
            engine.generate(rgb, prompt, token_budget=budget_tokens(budget, engine.visual_tokens_full),
                            max_new_tokens=2, frame_key=None, reducer=point_reducer(budget) or None)
        except EngineError:
            return  # the real request on this frame reports the problem
