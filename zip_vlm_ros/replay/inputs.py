"""The inputs of a replay besides the bag: budgets, the questions file, the labels file, node parameters."""
from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass
from typing import Any

FULL_BUDGET = 'full'
POINT_SEPARATOR = '@'  # 'divprune@64': a reducer at a budget (vlm_replay --reducers)
DEFAULT_BUDGETS = 'full,192,128,64'


class ReplayError(Exception):
    """The run cannot go on; str() is one line saying what is wrong and what to do."""


# ----------------------------------------------------------------------------------------------------
# Inputs: budgets and the questions file


def parse_budgets(text: str) -> list[str]:
    """'full,192,64' -> ['full', '192', '64'] (labels in the given order, duplicates refused).

    Labels, not numbers, identify budgets in results.jsonl: on a small model 192 and 128 may both
    mean "no reduction", and the report should still show what was asked.
    """
    labels: list[str] = []
    for part in text.split(','):
        label = part.strip().lower()
        if label != FULL_BUDGET:
            if not (label.isascii() and label.isdigit()) or int(label) < 1:
                raise ReplayError(f'budget {part.strip()!r} in --budgets {text!r} is not "full" or a positive '
                                  f'number of visual tokens: use e.g. --budgets full,192,128,64')
            label = str(int(label))
        if label in labels:
            raise ReplayError(f'budget {label} appears twice in --budgets {text!r}: list each budget once')
        labels.append(label)
    return labels


def parse_reducers(text: str) -> list[str]:
    """'visionzip,divprune' -> ['visionzip', 'divprune'] (each one of REDUCERS, once)."""
    from zip_vlm_ros.reducers import REDUCERS

    names = [part.strip().lower() for part in text.split(',')]
    for name in names:
        if name not in REDUCERS:
            raise ReplayError(f'reducer {name!r} in --reducers {text!r} is not known: use some of '
                              f'{", ".join(REDUCERS)}, e.g. --reducers {",".join(REDUCERS)}')
        if names.count(name) > 1:
            raise ReplayError(f'reducer {name} appears twice in --reducers {text!r}: list each reducer once')
    return names


def evaluation_points(budgets: list[str], reducers: list[str] | None) -> list[str]:
    """The labels evaluated per frame: the budgets as given without --reducers (the default reducer), else
    "full" once (it reduces nothing) and every reducer at every other budget, 'divprune@64'."""
    if not reducers:
        return list(budgets)
    return ([FULL_BUDGET] if FULL_BUDGET in budgets else []) + [
        f'{reducer}{POINT_SEPARATOR}{budget}' for reducer in reducers for budget in budgets if budget != FULL_BUDGET]


def point_reducer(label: str) -> str:
    """The reducer a point label names ('divprune@64' -> 'divprune'); '' for a plain budget (the default)."""
    return label.partition(POINT_SEPARATOR)[0] if POINT_SEPARATOR in label else ''


def point_budget(label: str) -> str:
    """The budget of a point label ('divprune@64' -> '64', '64' -> '64', 'full' -> 'full')."""
    return label.rpartition(POINT_SEPARATOR)[2]


def budget_tokens(label: str, visual_tokens_full: int) -> int:
    """Visual-token budget to request for a budget or point label ('full' -> all of the model's visual tokens)."""
    budget = point_budget(label)
    return visual_tokens_full if budget == FULL_BUDGET else int(budget)


def _keyword_loader():
    """A YAML SafeLoader that leaves yes/no/on/off/true/false as words: `expect: [yes]` means the word."""
    import yaml

    class KeywordLoader(yaml.SafeLoader):
        pass

    KeywordLoader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != 'tag:yaml.org,2002:bool']
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    return KeywordLoader


@dataclass(frozen=True)
class History:
    """A history question's frames: `frames` of `topic` spread over the last `seconds` before each frame."""

    topic: str
    frames: int
    seconds: float


@dataclass(frozen=True)
class Question:
    question: str
    expect: tuple[str, ...] = ()  # keywords; an answer containing any of them is a hit
    topics: tuple[str, ...] = ()  # surround view: one answer over these topics' frames paired by stamp
    history: History | None = None

    @property
    def several_images(self) -> bool:
        return bool(self.topics) or self.history is not None


QUESTION_KEYS = {'question', 'expect', 'topics', 'history'}


def load_questions(path: str | os.PathLike) -> list[Question]:
    """Read a questions file: a YAML list of ``{question: str, expect: [str, ...]}`` (expect optional).

    An entry may also ask about several images at once: ``topics: [/front, /rear]`` (their frames paired
    by stamp) or ``history: {topic: /front, frames: 4, seconds: 3.0}``.
    """
    path = pathlib.Path(path)
    example = 'e.g. "- question: Is there a person?\\n  expect: [yes, person]"'
    items = _read_yaml_list(path, 'questions file', example)
    questions: list[Question] = []
    for number, item in enumerate(items, start=1):
        where = f'questions file {path} item {number}'
        if not isinstance(item, dict):
            raise ReplayError(f'{where} is a {type(item).__name__} ({item!r}), expected a mapping with a '
                              f'"question" key ({example})')
        unknown = sorted(set(map(str, item)) - QUESTION_KEYS)
        if unknown:
            raise ReplayError(f'{where} has unknown key(s) {", ".join(unknown)}: only {", ".join(sorted(QUESTION_KEYS))} '
                              f'are allowed')
        text = item.get('question')
        if not isinstance(text, str) or not text.strip():
            raise ReplayError(f'{where}: "question" must be a non-empty string, got {text!r}')
        expect = item.get('expect', [])
        if expect is None:
            expect = []
        if not isinstance(expect, list) or not all(isinstance(k, (str, int, float)) and str(k).strip()
                                                   for k in expect):
            raise ReplayError(f'{where}: "expect" must be a list of non-empty keywords (e.g. expect: [cat, '
                              f'kitten]), got {expect!r}')
        question = Question(text.strip(), tuple(str(keyword).strip() for keyword in expect),
                            *_image_set(item, where))
        if any(existing.question == question.question for existing in questions):
            raise ReplayError(f'{where} repeats the question {question.question!r}: list each question once')
        questions.append(question)
    return questions


def _topic_name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ReplayError(f'{where}: a topic must be a non-empty name such as /camera/front/image_raw, got {value!r}')
    value = value.strip()
    return value if value.startswith('/') else '/' + value


def _image_set(item: dict, where: str) -> tuple[tuple[str, ...], History | None]:
    """The `topics` (surround view) or `history` of a question entry, checked."""
    if 'topics' in item and 'history' in item:
        raise ReplayError(f'{where} has both "topics" and "history": a question is about several topics at once '
                          f'or about one topic\'s recent frames')
    if 'topics' in item:
        names = item['topics']
        if not isinstance(names, list) or len(names) < 2:
            raise ReplayError(f'{where}: "topics" must list two or more image topics, got {names!r}')
        topics = tuple(_topic_name(name, where) for name in names)
        if len(set(topics)) != len(topics):
            raise ReplayError(f'{where}: "topics" lists a topic twice ({list(topics)}): give each once')
        return topics, None
    if 'history' in item:
        history = item['history']
        example = 'e.g. history: {topic: /camera/front/image_raw, frames: 4, seconds: 3.0}'
        if not isinstance(history, dict) or set(map(str, history)) != {'topic', 'frames', 'seconds'}:
            raise ReplayError(f'{where}: "history" must be a mapping with topic, frames and seconds ({example}), '
                              f'got {history!r}')
        frames, seconds = history['frames'], history['seconds']
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 2:
            raise ReplayError(f'{where}: history frames must be a whole number >= 2, got {frames!r}')
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
            raise ReplayError(f'{where}: history seconds must be a positive number, got {seconds!r}')
        return (), History(_topic_name(history['topic'], where), frames, float(seconds))
    return (), None


# Node parameters that decide the answers, read from a node params file for offline replay.
NODE_ENGINE_PARAMETERS = ('model', 'vision_tower', 'max_pixels', 'device', 'dtype', 'dominant_ratio',
                          'max_new_tokens', 'describe_prompt')


def load_node_parameters(path: str | os.PathLike) -> dict[str, Any]:
    """The engine settings of a vlm_node params file (``/**:`` or ``zip_vlm:`` ``ros__parameters``).

    Offline replay then answers exactly as the node configured by that file would.
    """
    import yaml

    path = pathlib.Path(path)
    if not path.is_file():
        raise ReplayError(f'params file {path} does not exist: pass the node\'s YAML params file, e.g. config/vlm.yaml')
    try:
        document = yaml.safe_load(path.read_text(encoding='utf-8'))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ReplayError(f'params file {path} is not valid YAML ({reason}): fix the syntax') from None
    sections = document if isinstance(document, dict) else {}
    # A section for the node by name wins over the wildcard, as it does for the node itself.
    for key in ('/zip_vlm', 'zip_vlm', '/**'):
        section = sections.get(key)
        if isinstance(section, dict) and isinstance(section.get('ros__parameters'), dict):
            parameters = section['ros__parameters']
            return {name: parameters[name] for name in NODE_ENGINE_PARAMETERS if name in parameters}
    raise ReplayError(f'params file {path} has no "/**:" or "zip_vlm:" section with ros__parameters: pass the '
                      f'node\'s params file (see config/vlm.yaml)')



@dataclass(frozen=True)
class Label:
    """A human answer for one prompt on one frame, found by topic and bag index or header stamp."""

    topic: str
    index: int | None
    stamp_ns: int | None
    question: str | None          # None: the scene description
    answer: str | None
    keywords: tuple[str, ...] = ()
    bag: str | None = None        # a run over several bags: the bag's label (None: the label fits any bag)

    def matches(self, row: dict, describe_prompt: str) -> bool:
        prompt = describe_prompt if self.question is None else self.question
        if row['topic'] != self.topic or row['prompt'] != prompt:
            return False
        if self.bag is not None and row.get('bag') != self.bag:
            return False
        return row.get('index') == self.index if self.index is not None else row.get('stamp_ns') == self.stamp_ns


LABELS_EXAMPLE = ('e.g. "- topic: /camera/front/image_raw\\n  index: 0\\n  question: Is there a person?\\n  '
                  'answer: yes\\n  keywords: [yes, person]"')
LABEL_KEYS = {'bag', 'topic', 'index', 'stamp', 'question', 'answer', 'keywords'}


def load_labels(path: str | os.PathLike) -> list[Label]:
    """Read a labels file: a YAML list of ``{bag?, topic, index | stamp, question?, answer?, keywords?}``.

    ``stamp`` is the header stamp as ``"sec.nanosec"`` or integer nanoseconds; without ``question``
    the label is for the scene description. Each label needs an answer, keywords, or both.
    """
    items = _read_yaml_list(pathlib.Path(path), 'labels file', LABELS_EXAMPLE)
    labels = []
    for number, item in enumerate(items, start=1):
        where = f'labels file {path} item {number}'
        if not isinstance(item, dict):
            raise ReplayError(f'{where} is a {type(item).__name__}, expected a mapping ({LABELS_EXAMPLE})')
        unknown = sorted(set(map(str, item)) - LABEL_KEYS)
        if unknown:
            raise ReplayError(f'{where} has unknown key(s) {", ".join(unknown)}: use {", ".join(sorted(LABEL_KEYS))}')
        labels.append(_label(item, where))
    return labels


def _label(item: dict, where: str) -> Label:
    topic = item.get('topic')
    if not isinstance(topic, str) or not topic.strip():
        raise ReplayError(f'{where}: "topic" must be the bag\'s image topic, got {topic!r}')
    if ('index' in item) == ('stamp' in item):
        raise ReplayError(f'{where}: give the frame by "index" (its position in the topic, from 0) or by '
                          f'"stamp" ("sec.nanosec"), not both and not neither')
    index = item.get('index')
    if 'index' in item and (not isinstance(index, int) or isinstance(index, bool) or index < 0):
        raise ReplayError(f'{where}: "index" must be a whole number from 0, got {index!r}')
    stamp_ns = parse_stamp(item['stamp'], where) if 'stamp' in item else None
    question = item.get('question')
    if question is not None and (not isinstance(question, str) or not question.strip()):
        raise ReplayError(f'{where}: "question" must be a non-empty string (omit it for the description)')
    answer = item.get('answer')
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise ReplayError(f'{where}: "answer" must be text, got {answer!r}')
    keywords = item.get('keywords') or []
    if not isinstance(keywords, list) or not all(isinstance(k, (str, int, float)) and str(k).strip()
                                                 for k in keywords):
        raise ReplayError(f'{where}: "keywords" must be a list of non-empty words, got {keywords!r}')
    if answer is None and not keywords:
        raise ReplayError(f'{where} has neither "answer" nor "keywords": give at least one')
    bag = item.get('bag')
    if bag is not None and (not isinstance(bag, str) or not bag.strip()):
        raise ReplayError(f'{where}: "bag" must be the bag\'s name as the report lists it, got {bag!r}')
    return Label(topic if topic.startswith('/') else '/' + topic, index, stamp_ns,
                 None if question is None else question.strip(),
                 None if answer is None else str(answer).strip(), tuple(str(k).strip() for k in keywords),
                 None if bag is None else bag.strip())


def parse_stamp(value: Any, where: str) -> int:
    """'1700000000.100000000' or 1700000000100000000 -> nanoseconds (floats lose nanoseconds: refused)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        seconds, _, fraction = value.strip().partition('.')
        if seconds.isdigit() and (not fraction or (fraction.isdigit() and len(fraction) <= 9)):
            return int(seconds) * 10**9 + int(fraction.ljust(9, '0') or 0)
    raise ReplayError(f'{where}: "stamp" {value!r} is not "sec.nanosec" text (quote it) or integer nanoseconds')


def _read_yaml_list(path: pathlib.Path, what: str, example: str) -> list:
    """The non-empty YAML list in `path` (yes/no stay words), or a ReplayError naming the problem."""
    import yaml

    if not path.is_file():
        raise ReplayError(f'{what} {path} does not exist: pass a YAML list ({example})')
    try:
        items = yaml.load(path.read_text(encoding='utf-8'), Loader=_keyword_loader())
    except UnicodeDecodeError:
        raise ReplayError(f'{what} {path} is not UTF-8 text: save it as UTF-8 YAML') from None
    except yaml.YAMLError as error:
        mark = getattr(error, 'problem_mark', None)
        where = f' at line {mark.line + 1}' if mark is not None else ''
        problem = getattr(error, 'problem', None) or type(error).__name__
        raise ReplayError(f'{what} {path} is not valid YAML{where} ({problem}): fix the syntax') from None
    if not isinstance(items, list) or not items:
        found = 'an empty file' if items is None or items == [] else f'a {type(items).__name__}'
        raise ReplayError(f'{what} {path} must be a non-empty YAML list, got {found} ({example})')
    return items
