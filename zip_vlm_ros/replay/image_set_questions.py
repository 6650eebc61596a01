"""Offline replay of questions over several images: several topics paired by stamp (surround view), or
one topic's recent frames (history), asked once per selected frame and budget.

- Surround view: the first listed topic is the anchor. For each selected anchor frame, every other topic
  contributes its frame whose header stamp is nearest to the anchor's, if within ``--pair-tolerance``
  seconds; otherwise the group is skipped (and listed as such). A group is decided once every other
  topic has a frame stamped past the anchor's stamp plus the tolerance, or the bag ends.
- History: for each selected frame of the topic (the newest of the set), the frames nearest to evenly
  spaced times over the seconds before it, as the node picks them (``frame_history.pick_history``).
  Frames in the bag's first seconds, before the topic covers the span, are not selected.

Budgets are per image, as for single frames: at budget 64 a six-topic question reads 6 x 64 = 384
visual tokens (``full``: every image's full count). Each image is introduced by its topic (surround) or
its age (history). Rows are ``kind: images`` in results.jsonl, keyed by the anchor frame; with an
``overlays`` callback each row also lists the overlay PNGs of its images (``overlay_images``).
"""
from __future__ import annotations

import collections
from collections.abc import Callable

from zip_vlm_ros.node.frame_history import HistoryUnavailable, history_label, pick_history
from zip_vlm_ros.replay.bag import Frame, FrameSelector, SkippedFrame
from zip_vlm_ros.replay.console import warn
from zip_vlm_ros.replay.inputs import Question, budget_tokens, point_reducer
from zip_vlm_ros.replay.report import format_stamp
from zip_vlm_ros.replay.results import output_row

__all__ = ['ImageSetQuestions', 'image_set_topics']

KIND = 'images'
# Frames are kept this long beyond what a history needs, for topics whose messages reach the bag late.
ARRIVAL_MARGIN_NS = 10**9


def image_set_topics(questions: list[Question]) -> list[str]:
    """Every topic the questions over several images read, in first-mention order."""
    topics: dict[str, None] = {}
    for question in questions:
        for topic in question.topics or ((question.history.topic,) if question.history else ()):
            topics[topic] = None
    return list(topics)


class ImageSetQuestions:
    """The questions over several images of an offline run; fed every decoded frame of their topics."""

    def __init__(self, engine, questions: list[Question], budgets: list[str], *, tolerance_s: float,
                 selector_args: dict, done_keys: set, write: Callable[[list[dict]], None],
                 skipped: list[SkippedFrame], overlays: Callable[..., list[str]] | None = None):
        """`overlays(anchor, group, budget, question number, output)` draws an answer's per-image overlays
        and returns where it saved them (None: none are drawn)."""
        self.engine, self.budgets, self.tolerance_ns = engine, budgets, round(tolerance_s * 1e9)
        self.questions = [question for question in questions if question.several_images]
        self.done_keys, self.write, self.skipped, self.overlays = done_keys, write, skipped, overlays
        self.selectors = [FrameSelector(**selector_args) for _ in self.questions]
        self.topics = image_set_topics(self.questions)
        # Each topic's recent frames, oldest first, as long as some question may still need them.
        self.window_ns = max([round(q.history.seconds * 1e9) for q in self.questions if q.history] + [0]) \
            + 2 * self.tolerance_ns + ARRIVAL_MARGIN_NS
        self.recent: dict[str, collections.deque[Frame]] = {topic: collections.deque() for topic in self.topics}
        self.pending: list[tuple[int, Frame]] = []   # (question number, anchor frame) awaiting later frames
        self.first_stamp_ns: dict[str, int] = {}

    def reads(self, topic: str) -> bool:
        return topic in self.recent

    def done(self) -> bool:
        return not self.pending and all(selector.topic_full(self._anchor(q))
                                        for q, selector in zip(self.questions, self.selectors))

    @staticmethod
    def _anchor(question: Question) -> str:
        return question.topics[0] if question.topics else question.history.topic

    def push(self, frame: Frame) -> None:
        """A decoded frame of one of the topics: keep it, decide what waited for it, select new anchors."""
        recent = self.recent[frame.topic]
        recent.append(frame)
        self.first_stamp_ns.setdefault(frame.topic, frame.stamp_ns)
        keep_from_ns = frame.stamp_ns - self.window_ns
        if self.pending:  # a surround anchor still waiting may pair with an older frame of this topic
            keep_from_ns = min(keep_from_ns, min(anchor.stamp_ns for _, anchor in self.pending) - self.tolerance_ns)
        while recent and recent[0].stamp_ns < keep_from_ns:
            recent.popleft()
        for number, (question, selector) in enumerate(zip(self.questions, self.selectors)):
            if self._anchor(question) != frame.topic or not self._covered(question, frame):
                continue
            if selector.wants(frame.topic, frame.log_ns):
                selector.accept(frame.topic, frame.log_ns)
                if question.history is not None:
                    self._history(question, frame)
                else:
                    self.pending.append((number, frame))
        self._decide(at_end=False)

    def finish(self) -> None:
        """The bag ended: decide every surround group still waiting for later frames."""
        self._decide(at_end=True)

    def _covered(self, question: Question, frame: Frame) -> bool:
        """A history anchor needs the topic to have been recorded for the whole span before it."""
        if question.history is None:
            return True
        return frame.stamp_ns - self.first_stamp_ns[frame.topic] >= question.history.seconds * 1e9

    def _decide(self, *, at_end: bool) -> None:
        waiting = []
        for number, anchor in self.pending:
            question = self.questions[number]
            others = question.topics[1:]
            if not at_end and not all(self.recent[topic] and self.recent[topic][-1].stamp_ns
                                      > anchor.stamp_ns + self.tolerance_ns for topic in others):
                waiting.append((number, anchor))
                continue
            group, missing = [anchor], []
            for topic in others:
                nearest = min(self.recent[topic], key=lambda f: abs(f.stamp_ns - anchor.stamp_ns), default=None)
                if nearest is None or abs(nearest.stamp_ns - anchor.stamp_ns) > self.tolerance_ns:
                    missing.append(topic)
                else:
                    group.append(nearest)
            if missing:
                self._skip(anchor, f'{question.question!r}: no frame of {", ".join(missing)} within '
                                   f'{self.tolerance_ns / 1e9:g} s of this frame (--pair-tolerance)')
            else:
                self._ask(question, anchor, group, [frame.topic for frame in group])
        self.pending = waiting

    def _history(self, question: Question, anchor: Frame) -> None:
        frames = list(self.recent[anchor.topic])
        try:
            picks = pick_history(frames, [frame.stamp_ns * 1e-9 for frame in frames], question.history.frames,
                                 question.history.seconds)
        except HistoryUnavailable as error:
            self._skip(anchor, f'{question.question!r}: {error}')
            return
        group = [pick.frame for pick in picks]
        newest_s = max(pick.stamp_s for pick in picks)
        labels = [history_label(anchor.topic, newest_s - pick.stamp_s) for pick in picks]
        self._ask(question, anchor, group, labels)

    def _ask(self, question: Question, anchor: Frame, group: list[Frame], labels: list[str]) -> None:
        from zip_vlm_ros.engine import EngineError, ImageInput

        for budget in self.budgets:
            if (anchor.bag, anchor.topic, anchor.index, budget, question.question) in self.done_keys:
                continue
            per_image = budget_tokens(budget, self.engine.family.base_tokens_full)
            inputs = [ImageInput(frame.rgb, label, key=(frame.bag, frame.topic, frame.index, budget))
                      for frame, label in zip(group, labels)]
            try:
                output = self.engine.generate_images(inputs, [question.question], token_budget=per_image * len(inputs),
                                                     reducer=point_reducer(budget) or None)[0]
            except EngineError as error:
                self._skip(anchor, f'{question.question!r}, budget {budget}: {error}')
                continue
            row = output_row(anchor, budget, output, kind=KIND, expect=question.expect)
            row['image_frames'] = [{'topic': frame.topic, 'index': frame.index, 'stamp_ns': frame.stamp_ns}
                                   for frame in group]
            if self.overlays is not None:
                row['overlay_images'] = self.overlays(anchor, group, budget, self.questions.index(question), output)
            self.write([row])

    def _skip(self, anchor: Frame, reason: str) -> None:
        self.skipped.append(SkippedFrame(anchor.topic, anchor.index, anchor.stamp_ns, anchor.log_ns, reason,
                                         anchor.bag))
        warn(f'skipped {anchor.topic} frame {anchor.index} at {format_stamp(anchor.stamp_ns)}: {reason}')
