"""Offline evaluation: the bag's frames go straight into the node's engine, once per budget; the scene
description and every question share the frame's image prefix (``VlmEngine.generate_many``). Questions
over several images (topics paired by stamp, or a history) are asked by ``image_set_questions``."""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
from collections import Counter

import numpy as np

from zip_vlm_ros.replay.bag import (Bag, Frame, FrameSelector, SkippedFrame, bag_labels, damaged_frames, decode_frame,
                                    expand_bag_paths, open_bag, resolve_topics)
from zip_vlm_ros.replay.console import note, progress_bar, warn
from zip_vlm_ros.replay.foxglove import FoxgloveRecording
from zip_vlm_ros.replay.html_report import (HTML_REPORT_FILE, file_name_of, save_frame_images,
                                            save_image_set_overlays, write_html_report)
from zip_vlm_ros.replay.image_set_questions import ImageSetQuestions, image_set_topics
from zip_vlm_ros.replay.inputs import (FULL_BUDGET, NODE_ENGINE_PARAMETERS, Label, Question, ReplayError,
                                       budget_tokens, load_node_parameters, point_budget, point_reducer)
from zip_vlm_ros.replay.report import AGREEMENT_PLOT, LATENCY_PLOT, format_stamp, write_report
from zip_vlm_ros.replay.results import (REPORT_FILE, RESULTS_FILE, ResultsWriter, check_resumed_run, output_row,
                                        prepare_out_dir, result_key, write_run_file)
from zip_vlm_ros.replay.storage import DamagedRegion

EXIT_OK, EXIT_NOTHING_EVALUATED, EXIT_BAG_UNREADABLE, EXIT_INTERRUPTED = 0, 1, 3, 130
BAG_REPORTS_DIR = 'bags'  # a run over several bags: one folder of reports per bag in it


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


@dataclasses.dataclass
class SelectedBag:
    """One bag of the run as checked before the model loads: its label (``bag_labels``), path, the topics
    to evaluate, and what the progress estimate and --resume need. The bag is opened again to be read,
    one at a time, so that a run over hundreds of bags holds one open at once."""
    label: str
    path: pathlib.Path
    topics: list[str]
    files: dict
    notes: list[str]
    message_counts: dict[str, int | None]
    duration_ns: int


def open_selection(args: argparse.Namespace, questions: list[Question]) -> tuple[list[SelectedBag], list[dict]]:
    """The bags (``args.bags``: bags or folders of bags), their topics to evaluate and the rows already
    done; checked before any (slow) model load, so that a wrong bag, topic, --out or a damaged results
    file fails at once."""
    paths = expand_bag_paths(args.bags)
    selected = []
    for label, path in zip(bag_labels(paths), paths):
        bag = open_bag(path)
        try:
            topics = resolve_topics(bag.topics, args.topics, str(path))
            missing = [topic for topic in image_set_topics(questions) if topic not in bag.topics]
            if missing:
                raise ReplayError(f'the questions file names topic(s) {", ".join(missing)} that {path} does not '
                                  f'have: use its image topics ({", ".join(sorted(bag.topics))})')
            selected.append(SelectedBag(label, path, topics, bag.fingerprint(), bag.notes,
                                        {topic: bag.topics[topic].msgcount for topic in topics},
                                        max(bag.end_ns - bag.start_ns, 0)))
        finally:
            bag.close()
    return selected, prepare_out_dir(pathlib.Path(args.out), resume=args.resume)


def engine_facts(engine) -> dict:
    """What the run records about the engine; a Ray worker sends the same dict for the engine it holds."""
    return {'model': engine.model_name, 'device': str(engine.device),
            'dtype': str(engine.dtype).removeprefix('torch.'), 'dominant_ratio': 1.0 - engine.config.contextual_ratio,
            'max_new_tokens': engine.config.max_new_tokens, 'visual_tokens_full': engine.visual_tokens_full,
            'token_budget_applies': engine.token_budget_applies, 'family': engine.family.label}


def start_run(args: argparse.Namespace, settings: dict, bags: list[SelectedBag], budgets: list[str],
              questions: list[Question], facts: dict, done_rows: list[dict]) -> dict:
    """Note budgets that reduce nothing, check a resumed run against this one and write run.json. The
    mode stays 'offline' with or without Ray: both give the same rows, so either may resume the other.
    Bags are keyed by label: a resumed run must name the same bags (in any order, from any place)."""
    if not facts['token_budget_applies']:
        note(f'note: token budgets do not apply to {facts["family"]}: every budget reads its '
             f'{facts["visual_tokens_full"]} trained visual token(s) per image')
    for budget in budgets:
        tokens = budget_tokens(budget, facts['visual_tokens_full'])
        reduces_nothing = point_budget(budget) != FULL_BUDGET and tokens >= facts['visual_tokens_full']
        if facts['token_budget_applies'] and reduces_nothing:
            note(f'note: budget {budget} >= the {facts["visual_tokens_full"]} visual tokens of '
                 f'{facts["model"]}: no reduction, same as full')
    out_dir = pathlib.Path(args.out)
    several = len(bags) > 1
    run = {
        'mode': 'offline', 'bag': ', '.join(str(selected.path) for selected in bags),
        'bags': {selected.label: str(selected.path) for selected in bags},
        'bag_files': {selected.label: selected.files for selected in bags},
        'bag_notes': [f'{selected.label}: {text}' if several else text for selected in bags for text in selected.notes],
        'topics': {selected.label: selected.topics for selected in bags},
        'model': facts['model'], 'device': facts['device'], 'dtype': facts['dtype'],
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
    bags, done_rows = open_selection(args, questions)
    engine = load_engine(settings)
    try:
        run = start_run(args, settings, bags, budgets, questions, engine_facts(engine), done_rows)
        return OfflineEvaluation(args, bags, engine, run, done_rows, labels, questions).run()
    finally:
        engine.close()


class OfflineEvaluation:
    """The offline loop: bags in the order given, frames in bag order, each at every budget, all prompts
    sharing the prefix."""

    def __init__(self, args, bags: list[SelectedBag], engine, run: dict, done_rows: list[dict],
                 labels: list[Label], questions: list[Question] = ()):
        from rosbags.typesys import Stores, get_typestore

        self.args, self.bags, self.engine, self.run_info, self.labels = args, bags, engine, run, labels
        self.questions = list(questions)
        self.typestore = get_typestore(Stores.ROS2_KILTED)
        self.out_dir = pathlib.Path(args.out)
        self.budgets = run['budgets']
        self.done_rows, self.done_keys = done_rows, {result_key(row) for row in done_rows}
        self.prompts = [(run['describe_prompt'], 'describe', ())] + [
            (q.question, 'question', q.expect) for q in questions if not q.several_images]
        self.selector_args = dict(every=args.every, period_s=args.period, max_frames=args.max_frames)
        self.skipped: list[SkippedFrame] = []
        # The bag being read (opened by _read_bags), its selector and its questions over several images.
        self.selected: SelectedBag | None = None
        self.bag: Bag | None = None
        self.selector = FrameSelector(**self.selector_args)
        self.image_sets: ImageSetQuestions | None = None
        # Per bag label: why its reading stopped short (cut files, then the damage that stopped it), and
        # its frames accepted per topic once read, and what stopped it (damage it could not be read past).
        self.partial_of: dict[str, list[str]] = {}
        self.stopped_of: dict[str, str] = {}
        self.accepted_of: dict[str, Counter] = {}
        self.skipped_per_topic: Counter[tuple[str, str]] = Counter()
        self.new_rows: list[dict] = []
        self.warmed_up = False
        self.progress = None
        self.writer = None
        self.foxglove_path = getattr(args, 'foxglove', None)
        self.foxglove: FoxgloveRecording | None = None

    @property
    def topics(self) -> list[str]:
        return self.selected.topics

    def run(self) -> int:
        interrupted = False
        self.writer = ResultsWriter(self.out_dir / RESULTS_FILE)
        self.progress = progress_bar(self._estimated_total(), 'frame-budgets')
        if self.foxglove_path:
            self.foxglove = FoxgloveRecording(self.foxglove_path)
        try:
            self._read_bags()
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

    def _read_bags(self) -> None:
        for selected in self.bags:
            self.selected, self.bag = selected, open_bag(selected.path)
            self.selector = FrameSelector(**self.selector_args)
            self.image_sets = ImageSetQuestions(
                self.engine, self.questions, self.budgets, tolerance_s=self.args.pair_tolerance,
                selector_args=self.selector_args, done_keys=self.done_keys, write=self._write_rows,
                skipped=self.skipped, overlays=self._image_set_overlays) if any(
                    q.several_images for q in self.questions) else None
            try:
                self._read_bag()
            finally:
                self.partial_of[selected.label] = self.bag.cut + ([self.bag.stopped] if self.bag.stopped else [])
                if self.bag.stopped:
                    self.stopped_of[selected.label] = self.bag.stopped
                self.accepted_of[selected.label] = self.selector.accepted
                self.bag.close()

    def _read_bag(self) -> None:
        image_sets, label = self.image_sets, self.selected.label
        read_topics = list(dict.fromkeys(self.topics + (image_sets.topics if image_sets else [])))
        for item in self.bag.messages(read_topics):
            if isinstance(item, DamagedRegion):
                frames = damaged_frames(item, self.topics, label)
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
            frame = decode_frame(self.typestore, item, label)
            if isinstance(frame, SkippedFrame):
                if wanted:
                    self.skipped.append(frame)
                    self._drop_from_total(label, frame.topic)
                    warn(f'skipped {self._where(frame)} frame {frame.index} at {format_stamp(frame.stamp_ns)}: '
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
        estimator = FrameSelector(**self.selector_args)
        estimates = [estimator.expected_frames(selected.message_counts[topic], selected.duration_ns,
                                               skipped=self.skipped_per_topic[selected.label, topic])
                     for selected in self.bags for topic in selected.topics]
        return None if None in estimates else sum(estimates) * len(self.budgets)

    def _drop_from_total(self, label: str, topic: str) -> None:
        """A malformed frame was counted in the estimate; the bar's total should not wait for it."""
        self.skipped_per_topic[label, topic] += 1
        total = self._estimated_total()
        if total is not None:
            self.progress.total = max(total, self.progress.n)
            self.progress.refresh()

    def _todo(self, frame: Frame) -> dict[str, list[tuple]]:
        """Per budget, the prompts of this frame that results.jsonl does not hold yet."""
        return {budget: [(prompt, kind, expect) for prompt, kind, expect in self.prompts
                         if (frame.bag, frame.topic, frame.index, budget, prompt) not in self.done_keys]
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
            warn(f'{self._where(skipped)} frame {skipped.index} at {format_stamp(skipped.stamp_ns)}, {skipped.reason}')
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

    def _in_bag(self, label: str, text: str) -> str:
        """`text` about bag `label`, naming the bag when the run has several."""
        return f'{label}: {text}' if len(self.bags) > 1 else text

    def _where(self, frame: Frame | SkippedFrame) -> str:
        return self._in_bag(frame.bag, frame.topic)

    def _problems_of(self, interrupted: bool) -> dict[str, list[str]]:
        """Per bag label, the topics of which no frame was evaluated in a bag read to its end."""
        problems_of: dict[str, list[str]] = {selected.label: [] for selected in self.bags}
        for selected in self.bags if not interrupted else ():
            if selected.label in self.stopped_of:
                continue
            for topic in selected.topics:
                if self.accepted_of[selected.label][topic] == 0:
                    problems_of[selected.label].append(
                        f'no frame of {topic} could be evaluated (selection empty or every frame malformed)')
                    warn(self._in_bag(selected.label, problems_of[selected.label][-1]))
        return problems_of

    def _image_set_overlays(self, anchor: Frame, group: list[Frame], budget: str, number: int, output) -> list[str]:
        """A question over several images: each image's overlay as a PNG (paths under --out) and in the
        Foxglove recording."""
        if self.foxglove is not None:
            self.foxglove.add_image_set(anchor, group, budget, output)
        return save_image_set_overlays(self.out_dir, anchor, group, f'{budget} q{number}', output)

    def _finish(self, interrupted: bool) -> int:
        problems_of = self._problems_of(interrupted)
        interruption = ['interrupted before the end of the selection; run again with --resume to continue'] if (
            interrupted) else []
        all_rows = self.done_rows + self.new_rows
        several = len(self.bags) > 1
        write_full_report(self.out_dir, all_rows, self.skipped, self.run_info, labels=self.labels,
                          problems=[self._in_bag(label, text) for label, texts in problems_of.items()
                                    for text in texts],
                          partial=interruption + [self._in_bag(label, text)
                                                  for label, texts in self.partial_of.items() for text in texts])
        for selected in self.bags if several else ():
            bag_run = dict(self.run_info, bag=str(selected.path), bags={selected.label: str(selected.path)},
                           bag_notes=selected.notes, topics={selected.label: selected.topics})
            write_full_report(bag_report_dir(self.out_dir, selected.label),
                              [row for row in all_rows if row.get('bag') == selected.label],
                              [frame for frame in self.skipped if frame.bag == selected.label], bag_run,
                              labels=self.labels, problems=problems_of[selected.label], images_dir=self.out_dir,
                              partial=interruption + self.partial_of.get(selected.label, []))
        note(f'{len(self.new_rows)} new answers ({len(self.done_rows)} from earlier runs), {len(self.skipped)} '
             f'skipped frames; report in {self.out_dir / REPORT_FILE} and {self.out_dir / HTML_REPORT_FILE}'
             + (f', per bag in {self.out_dir / BAG_REPORTS_DIR}' if several else ''))
        if self.stopped_of:
            stopped = '; '.join(self._in_bag(label, text) for label, text in self.stopped_of.items())
            warn(f'{stopped}; the report covers the frames before it', level='error')
            return EXIT_BAG_UNREADABLE
        if interrupted:
            note('interrupted; run again with --resume to continue')
            return EXIT_INTERRUPTED
        return EXIT_OK if all_rows else EXIT_NOTHING_EVALUATED


def bag_report_dir(out_dir: pathlib.Path, label: str) -> pathlib.Path:
    """Where a run over several bags writes one bag's summary.csv, report.md, report.html and plots."""
    return out_dir / BAG_REPORTS_DIR / file_name_of(label)


def write_full_report(out_dir: pathlib.Path, rows: list[dict], skipped: list[SkippedFrame], run: dict, *,
                      labels: list[Label], problems: list[str], partial: list[str],
                      images_dir: pathlib.Path | None = None) -> None:
    """summary.csv, report.md, its plots and report.html in `out_dir` (the frames' PNGs under `images_dir`,
    default `out_dir`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = write_report(out_dir, rows, skipped, run, problems=problems, partial=partial, labels=labels)
    write_html_report(out_dir, rows, summaries, [LATENCY_PLOT, AGREEMENT_PLOT], images_dir=images_dir)


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
                # The frame's identity in the run (bag, topic, index), never its stamp (several images
                # may share one), and per budget label: budgets that mean the same token count (192 and
                # full on a small model) are each timed from scratch instead of sharing one prefix.
                frame_key=(frame.bag, frame.topic, frame.index, budget))
        except EngineError as error:
            evaluated.skipped.append(SkippedFrame(frame.topic, frame.index, frame.stamp_ns, frame.log_ns,
                                                  f'budget {budget}: {error}', frame.bag))
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
