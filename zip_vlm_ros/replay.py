"""vlm_replay: evaluate token budgets on recorded drives (rosbag2), offline or against a running node.

Offline (default) the bag's image frames go straight into the same engine the node uses, once per
budget; the scene description and every question share the frame's image prefix
(``VlmEngine.generate_many``). ``--live`` instead plays the bag's image topics into a running
``vlm_node`` the way ``ros2 bag play`` would and calls its services at a fixed period. Both write the
same files into ``--out``:

- ``results.jsonl``  one line per frame x budget x prompt (the raw data; everything else is derived)
- ``summary.csv``    one row per budget
- ``report.md``      the summary as tables, skipped frames, example answers, and the plots
- ``latency_vs_budget.png``, ``agreement_vs_budget.png``
- ``run.json``       the settings of the run (``--resume`` refuses to mix results of other settings)

Bags are read with ``rosbags`` (sqlite3 and mcap, no ROS install); images are decoded by
``zip_vlm_ros.conversions``, the node's own decoder (that module imports the generated message classes,
but no rclpy). Only live mode needs rclpy and DDS, imported lazily.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import json
import math
import os
import pathlib
import re
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

FULL_BUDGET = 'full'
DEFAULT_BUDGETS = 'full,192,128,64'
IMAGE_MSGTYPES = ('sensor_msgs/msg/Image', 'sensor_msgs/msg/CompressedImage')
RESULTS_FILE = 'results.jsonl'
SUMMARY_FILE = 'summary.csv'
REPORT_FILE = 'report.md'
RUN_FILE = 'run.json'
LATENCY_PLOT = 'latency_vs_budget.png'
AGREEMENT_PLOT = 'agreement_vs_budget.png'
# Settings that change the answers: --resume only appends to results made with the same ones.
ANSWER_SETTINGS = ('mode', 'model', 'dtype', 'dominant_ratio', 'max_new_tokens')
EXIT_OK, EXIT_NOTHING_EVALUATED, EXIT_INTERRUPTED = 0, 1, 130
SUBSCRIBER_DISCOVERY_S = 3.0


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
            if not label.isdigit() or int(label) < 1:
                raise ReplayError(f'budget {part.strip()!r} in --budgets {text!r} is not "full" or a positive '
                                  f'number of visual tokens: use e.g. --budgets full,192,128,64')
            label = str(int(label))
        if label in labels:
            raise ReplayError(f'budget {label} appears twice in --budgets {text!r}: list each budget once')
        labels.append(label)
    return labels


def budget_tokens(label: str, visual_tokens_full: int) -> int:
    """Visual-token budget to request for a budget label ('full' -> all of the model's visual tokens)."""
    return visual_tokens_full if label == FULL_BUDGET else int(label)


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
class Question:
    question: str
    expect: tuple[str, ...] = ()  # keywords; an answer containing any of them is a hit


def load_questions(path: str | os.PathLike) -> list[Question]:
    """Read a questions file: a YAML list of ``{question: str, expect: [str, ...]}`` (expect optional)."""
    import yaml

    loader = _keyword_loader()
    path = pathlib.Path(path)
    example = 'e.g. "- question: Is there a person?\\n  expect: [yes, person]"'
    if not path.is_file():
        raise ReplayError(f'questions file {path} does not exist: pass a YAML list of questions ({example})')
    try:
        items = yaml.load(path.read_text(encoding='utf-8'), Loader=loader)
    except UnicodeDecodeError:
        raise ReplayError(f'questions file {path} is not UTF-8 text: save it as UTF-8 YAML') from None
    except yaml.YAMLError as error:
        mark = getattr(error, 'problem_mark', None)
        where = f' at line {mark.line + 1}' if mark is not None else ''
        problem = getattr(error, 'problem', None) or type(error).__name__
        raise ReplayError(f'questions file {path} is not valid YAML{where} ({problem}): fix the syntax') from None
    if not isinstance(items, list) or not items:
        found = 'an empty file' if items is None or items == [] else f'a {type(items).__name__}'
        raise ReplayError(f'questions file {path} must be a non-empty YAML list of questions, got {found} '
                          f'({example})')
    questions: list[Question] = []
    for number, item in enumerate(items, start=1):
        where = f'questions file {path} item {number}'
        if not isinstance(item, dict):
            raise ReplayError(f'{where} is a {type(item).__name__} ({item!r}), expected a mapping with a '
                              f'"question" key ({example})')
        unknown = sorted(set(map(str, item)) - {'question', 'expect'})
        if unknown:
            raise ReplayError(f'{where} has unknown key(s) {", ".join(unknown)}: only "question" and '
                              f'"expect" are allowed')
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
        question = Question(text.strip(), tuple(str(keyword).strip() for keyword in expect))
        if any(existing.question == question.question for existing in questions):
            raise ReplayError(f'{where} repeats the question {question.question!r}: list each question once')
        questions.append(question)
    return questions


# Node parameters that decide the answers, read from a node params file for offline replay.
NODE_ENGINE_PARAMETERS = ('model', 'device', 'dtype', 'dominant_ratio', 'max_new_tokens', 'describe_prompt')


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


# ----------------------------------------------------------------------------------------------------
# Reading bags


@dataclass(frozen=True)
class Frame:
    topic: str
    stamp_ns: int          # header stamp (the bag's log time when the header stamp is zero)
    log_ns: int            # time the recorder received the message
    rgb: np.ndarray        # (height, width, 3) uint8


@dataclass(frozen=True)
class SkippedFrame:
    topic: str
    stamp_ns: int | None   # None when the message could not even be deserialised
    log_ns: int
    reason: str


def open_bag(path: str | os.PathLike):
    """Open a rosbag2 (directory with metadata.yaml, or a single .mcap/.db3 file) for reading."""
    from rosbags.rosbag2 import Reader
    from rosbags.rosbag2.errors import ReaderError

    path = pathlib.Path(path)
    if not path.exists():
        raise ReplayError(f'bag {path} does not exist: pass a rosbag2 directory (the folder with '
                          f'metadata.yaml) or a .mcap/.db3 file')
    if path.is_dir() and not (path / 'metadata.yaml').is_file():
        raise ReplayError(f'{path} is a directory without metadata.yaml, so not a rosbag2 bag: pass the '
                          f'bag folder itself (the one holding metadata.yaml)')
    try:
        reader = Reader(path)
        reader.open()
    except (ReaderError, OSError, KeyError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ReplayError(f'cannot read bag {path} ({reason}): check that it is a complete rosbag2 '
                          f'recording in sqlite3 or mcap format') from None
    return reader


def describe_topics(topics: dict[str, Any]) -> str:
    """'/a (sensor_msgs/msg/Image, 5 messages), /b (...)' for messages listing a bag's topics."""
    return ', '.join(f'{name} ({info.msgtype}, {info.msgcount} messages)' for name, info in sorted(topics.items()))


def resolve_topics(bag_topics: dict[str, Any], requested: list[str] | None, bag: str) -> tuple[list[str], list[str]]:
    """Which requested topics can be evaluated, and one message for each that cannot.

    Args:
        bag_topics: topic name -> info with ``msgtype`` and ``msgcount`` (rosbags ``Reader.topics``).
        requested: topic names from --topics; None or empty means every image topic of the bag.
    """
    image_topics = {name: info for name, info in bag_topics.items() if info.msgtype in IMAGE_MSGTYPES}
    if not image_topics:
        others = describe_topics(bag_topics) or 'none'
        raise ReplayError(f'bag {bag} has no image topics (sensor_msgs/msg/Image or CompressedImage); its '
                          f'topics are: {others}')
    listing = f'image topics in {bag}: {describe_topics(image_topics)}'
    if not requested:
        return sorted(image_topics), []
    selected: list[str] = []
    problems: list[str] = []
    for topic in requested:
        name = topic if topic.startswith('/') else '/' + topic
        if name in image_topics:
            if name not in selected:
                selected.append(name)
        elif name in bag_topics:
            problems.append(f'topic {name} is {bag_topics[name].msgtype}, not an image; {listing}')
        else:
            problems.append(f'topic {name} is not in the bag; {listing}')
    return selected, problems


class FrameSelector:
    """Which messages of each topic to evaluate: every Nth, or one per period, up to max_frames each.

    Periods and max_frames count only frames that decoded (`accept`), so a corrupt message does not
    use up a slot that the next good frame can fill.
    """

    def __init__(self, *, every: int = 1, period_s: float | None = None, max_frames: int | None = None):
        self.every = every
        self.period_ns = None if period_s is None else round(period_s * 1e9)
        self.max_frames = max_frames
        self.seen: Counter[str] = Counter()
        self.accepted: Counter[str] = Counter()
        self.last_accepted_ns: dict[str, int] = {}

    def wants(self, topic: str, log_ns: int) -> bool:
        index = self.seen[topic]
        self.seen[topic] += 1
        if self.topic_full(topic):
            return False
        if self.period_ns is not None:
            last = self.last_accepted_ns.get(topic)
            return last is None or log_ns - last >= self.period_ns
        return index % self.every == 0

    def accept(self, topic: str, log_ns: int) -> None:
        self.accepted[topic] += 1
        self.last_accepted_ns[topic] = log_ns

    def topic_full(self, topic: str) -> bool:
        return self.max_frames is not None and self.accepted[topic] >= self.max_frames

    def expected_frames(self, message_count: int, duration_ns: int) -> int:
        """Estimate (for the progress bar) how many frames a topic with these messages will give."""
        if self.period_ns is not None:
            estimate = min(message_count, duration_ns // self.period_ns + 1)
        else:
            estimate = -(-message_count // self.every)
        return estimate if self.max_frames is None else min(estimate, self.max_frames)


def stamp_ns_of(message: Any) -> int:
    stamp = message.header.stamp
    return int(stamp.sec) * 10**9 + int(stamp.nanosec)


def decode_frame(typestore, topic: str, msgtype: str, log_ns: int, raw: bytes) -> Frame | SkippedFrame:
    """Deserialise one bag message and decode its pixels; a SkippedFrame says why when that fails."""
    from zip_vlm_ros.conversions import ImageConversionError, message_to_rgb

    try:
        message = typestore.deserialize_cdr(raw, msgtype)
    except Exception as error:  # rosbags raises struct/index/value errors on truncated or garbled CDR
        return SkippedFrame(topic, None, log_ns, f'message cannot be deserialised as {msgtype} '
                                                 f'({type(error).__name__}: {error})')
    stamp_ns = stamp_ns_of(message) or log_ns
    try:
        rgb = message_to_rgb(message)
    except ImageConversionError as error:
        return SkippedFrame(topic, stamp_ns, log_ns, str(error))
    return Frame(topic, stamp_ns, log_ns, rgb)


# ----------------------------------------------------------------------------------------------------
# results.jsonl


def result_key(row: dict) -> tuple:
    """What identifies one piece of work (and one answer) in results.jsonl."""
    return row['topic'], row['stamp_ns'], row['budget'], row['prompt']


def load_results(path: pathlib.Path) -> list[dict]:
    """Rows of an existing results.jsonl.

    A last line without its newline was cut short by a crash or kill: it is dropped and cut from the
    file so that appended rows start on a line of their own. Any other unreadable line is an error.
    """
    if not path.exists():
        return []
    content = path.read_bytes()
    complete, _, tail = content.rpartition(b'\n')
    if tail:
        try:
            json.loads(tail)
            tail_ok = True
        except ValueError:
            tail_ok = False
        with path.open('r+b') as file:
            if tail_ok:
                file.seek(0, os.SEEK_END)
                file.write(b'\n')
            else:
                print(f'vlm_replay: warning: dropped the incomplete last line of {path} (the previous run '
                      f'was cut short); that work is done again', file=sys.stderr)
                file.truncate(len(complete) + 1 if complete or content.startswith(b'\n') else 0)
        lines = content.split(b'\n') if tail_ok else complete.split(b'\n')
    else:
        lines = complete.split(b'\n')
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as error:
            raise ReplayError(f'{path} line {number} is not valid JSON ({error}): delete that line or '
                              f'start a new --out directory') from None
        if not isinstance(row, dict) or not {'topic', 'stamp_ns', 'budget', 'prompt'} <= row.keys():
            raise ReplayError(f'{path} line {number} is not a vlm_replay result row: delete that line or '
                              f'start a new --out directory')
        rows.append(row)
    return rows


def output_row(frame: Frame, budget: str, output: Any, *, kind: str, expect: tuple[str, ...]) -> dict:
    """One results.jsonl row from an engine VlmOutput."""
    row = {'topic': frame.topic, 'stamp_ns': frame.stamp_ns, 'budget': budget, 'kind': kind,
           'expect': list(expect)}
    row.update(dataclasses.asdict(output))
    return row


# ----------------------------------------------------------------------------------------------------
# Metrics


def answer_tokens(text: str) -> list[str]:
    """Lower-case word tokens of an answer; punctuation and spacing do not count as disagreement."""
    return re.findall(r'\w+', text.lower())


def exact_match(answer: str, reference: str) -> bool:
    return answer_tokens(answer) == answer_tokens(reference)


def token_f1(answer: str, reference: str) -> float:
    """Harmonic mean of token precision and recall (multiset overlap), as in SQuAD. Two empty answers agree."""
    answer_words, reference_words = answer_tokens(answer), answer_tokens(reference)
    if not answer_words or not reference_words:
        return float(answer_words == reference_words)
    overlap = sum((Counter(answer_words) & Counter(reference_words)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(answer_words), overlap / len(reference_words)
    return 2 * precision * recall / (precision + recall)


def keyword_hit(answer: str, expect: Iterable[str]) -> bool:
    """True when any expected keyword (a word or phrase) occurs in the answer as whole words."""
    words = answer_tokens(answer)
    for keyword in expect:
        wanted = answer_tokens(keyword)
        if wanted and any(words[i:i + len(wanted)] == wanted for i in range(len(words) - len(wanted) + 1)):
            return True
    return False


def percentile(values: list[float | None], q: float) -> float | None:
    """numpy's linear-interpolation percentile of the values that are not None; None when there are none."""
    known = [value for value in values if value is not None]
    return float(np.percentile(np.asarray(known, dtype=np.float64), q)) if known else None


# summary.csv columns, in order. Latency percentiles are over "fresh" answers: those that computed
# the frame's image prefix (one per frame and budget), i.e. what a new frame costs at that budget.
SUMMARY_COLUMNS = (
    'budget', 'token_budget', 'reduction', 'visual_tokens', 'visual_tokens_full', 'frames', 'answers',
    'vision_ms_p50', 'vision_ms_p95', 'prefill_ms_p50', 'prefill_ms_p95', 'ttft_ms_p50', 'ttft_ms_p95',
    'total_ms_p50', 'total_ms_p95', 'reused_prefix_answers', 'reused_prefix_total_ms_p50',
    'decode_tokens_per_s', 'kv_cache_bytes_per_frame',
    'agreement_pairs', 'exact_match_rate', 'token_f1_mean', 'keyword_answers', 'keyword_hit_rate',
)
LIVE_COLUMNS = ('requests', 'refused', 'timed_out', 'latency_ms_p50', 'latency_ms_p95',
                'image_age_ms_p50', 'image_age_ms_p95')


def summarize(rows: list[dict], budgets: list[str], *, live: bool = False) -> list[dict]:
    """One summary dict per budget (SUMMARY_COLUMNS, plus LIVE_COLUMNS in live mode), in `budgets` order.

    Budgets found in `rows` but not in `budgets` (from an earlier --resume'd run) are appended.
    Rows with a "status" other than "ok" (live mode) count only as refused or timed out.
    """
    order = list(budgets) + sorted({row['budget'] for row in rows} - set(budgets))
    answered = [row for row in rows if row.get('status', 'ok') == 'ok']
    reference = {(row['topic'], row['stamp_ns'], row['prompt']): row['text']
                 for row in answered if row['budget'] == FULL_BUDGET}
    summaries = []
    for budget in order:
        budget_rows = [row for row in answered if row['budget'] == budget]
        fresh = [row for row in budget_rows if not row['prefix_reused']]
        reused = [row for row in budget_rows if row['prefix_reused']]
        kv_per_frame: dict[tuple, int] = {}
        for row in budget_rows:
            kv_per_frame.setdefault((row['topic'], row['stamp_ns']), row['kv_cache_bytes'])
        decode_tokens = sum(max(row['generated_tokens'] - 1, 0) for row in budget_rows)
        decode_s = sum(row['decode_ms'] for row in budget_rows) / 1000
        pairs = [(row['text'], reference[(row['topic'], row['stamp_ns'], row['prompt'])])
                 for row in budget_rows if (row['topic'], row['stamp_ns'], row['prompt']) in reference]
        keyword_rows = [row for row in budget_rows if row.get('expect')]
        summary = {
            'budget': budget,
            'token_budget': _common(row['token_budget'] for row in budget_rows),
            'reduction': _common(row['reduction'] for row in budget_rows),
            'visual_tokens': _mean_or_none([row['visual_tokens'] for row in budget_rows]),
            'visual_tokens_full': _common(row['visual_tokens_full'] for row in budget_rows),
            'frames': len(kv_per_frame),
            'answers': len(budget_rows),
            'reused_prefix_answers': len(reused),
            'reused_prefix_total_ms_p50': percentile([row['total_ms'] for row in reused], 50),
            'decode_tokens_per_s': decode_tokens / decode_s if decode_s > 0 else None,
            'kv_cache_bytes_per_frame': _mean_or_none(list(kv_per_frame.values())),
            'agreement_pairs': len(pairs),
            'exact_match_rate': _mean_or_none([float(exact_match(a, b)) for a, b in pairs]),
            'token_f1_mean': _mean_or_none([token_f1(a, b) for a, b in pairs]),
            'keyword_answers': len(keyword_rows),
            'keyword_hit_rate': _mean_or_none([float(keyword_hit(row['text'], row['expect']))
                                               for row in keyword_rows]),
        }
        for field in ('vision_ms', 'prefill_ms', 'ttft_ms', 'total_ms'):
            values = [row[field] for row in fresh]
            summary[f'{field}_p50'] = percentile(values, 50)
            summary[f'{field}_p95'] = percentile(values, 95)
        if live:
            # One entry per service call: an AskMany call carries several answers but one latency.
            status_of = {row['request']: row['status'] for row in rows if row['budget'] == budget}
            latency_of = {row['request']: row['latency_ms'] for row in budget_rows}
            summary.update({
                'requests': len(status_of),
                'refused': sum(status == 'refused' for status in status_of.values()),
                'timed_out': sum(status == 'timeout' for status in status_of.values()),
                'latency_ms_p50': percentile(list(latency_of.values()), 50),
                'latency_ms_p95': percentile(list(latency_of.values()), 95),
                'image_age_ms_p50': percentile([row['image_age_ms'] for row in budget_rows], 50),
                'image_age_ms_p95': percentile([row['image_age_ms'] for row in budget_rows], 95),
            })
        columns = SUMMARY_COLUMNS + (LIVE_COLUMNS if live else ())
        summaries.append({column: summary[column] for column in columns})
    return summaries


def _mean_or_none(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return float(np.mean(known)) if known else None


def _common(values: Iterable[Any]) -> Any:
    """The value all rows share, or None when they differ or there are none."""
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else None


# ----------------------------------------------------------------------------------------------------
# Outputs: summary.csv, report.md, plots


def write_summary_csv(summaries: list[dict], path: pathlib.Path) -> None:
    """summary.csv with full-precision numbers (empty cells for values that do not apply)."""
    with path.open('w', newline='', encoding='utf-8') as file:
        writer = csv.DictWriter(file, fieldnames=list(summaries[0]) if summaries else list(SUMMARY_COLUMNS))
        writer.writeheader()
        for summary in summaries:
            writer.writerow({key: '' if value is None else value for key, value in summary.items()})


def format_ms(value: float | None) -> str:
    return '—' if value is None else f'{value:.1f}'


def format_rate(value: float | None) -> str:
    return '—' if value is None else f'{value:.3f}'


def format_pair(p50: float | None, p95: float | None) -> str:
    return f'{format_ms(p50)} / {format_ms(p95)}'


def budget_table(summaries: list[dict]) -> list[str]:
    """The per-budget markdown table of report.md."""
    lines = [
        '| budget | visual tokens | reduction | frames | answers | vision ms p50 / p95 | prefill ms p50 / p95 '
        '| TTFT ms p50 / p95 | total ms p50 / p95 | reused-prefix total ms p50 | decode tok/s | KV MB / frame '
        '| exact match | token F1 | keyword hits |',
        '|' + '---|' * 15,
    ]
    for s in summaries:
        visual = '—' if s['visual_tokens'] is None else f'{s["visual_tokens"]:g}'
        kv = '—' if s['kv_cache_bytes_per_frame'] is None else f'{s["kv_cache_bytes_per_frame"] / 1e6:.3f}'
        tokens_per_s = '—' if s['decode_tokens_per_s'] is None else f'{s["decode_tokens_per_s"]:.1f}'
        keyword = '—' if s['keyword_hit_rate'] is None else f'{format_rate(s["keyword_hit_rate"])} ({s["keyword_answers"]})'
        if s['budget'] == FULL_BUDGET:
            exact, f1 = 'reference', 'reference'
        else:
            exact = '—' if s['exact_match_rate'] is None else f'{format_rate(s["exact_match_rate"])} ({s["agreement_pairs"]})'
            f1 = format_rate(s['token_f1_mean'])
        lines.append(
            f'| {s["budget"]} | {visual} | {s["reduction"] or "—"} | {s["frames"]} | {s["answers"]} '
            f'| {format_pair(s["vision_ms_p50"], s["vision_ms_p95"])} '
            f'| {format_pair(s["prefill_ms_p50"], s["prefill_ms_p95"])} '
            f'| {format_pair(s["ttft_ms_p50"], s["ttft_ms_p95"])} '
            f'| {format_pair(s["total_ms_p50"], s["total_ms_p95"])} '
            f'| {format_ms(s["reused_prefix_total_ms_p50"])} | {tokens_per_s} | {kv} | {exact} | {f1} | {keyword} |')
    return lines


def live_table(summaries: list[dict]) -> list[str]:
    lines = ['| budget | requests | refused | timed out | service latency ms p50 / p95 | image age at answer ms p50 / p95 |',
             '|' + '---|' * 6]
    for s in summaries:
        lines.append(f'| {s["budget"]} | {s["requests"]} | {s["refused"]} | {s["timed_out"]} '
                     f'| {format_pair(s["latency_ms_p50"], s["latency_ms_p95"])} '
                     f'| {format_pair(s["image_age_ms_p50"], s["image_age_ms_p95"])} |')
    return lines


def plot_budgets(summaries: list[dict], out_dir: pathlib.Path) -> None:
    """latency_vs_budget.png and agreement_vs_budget.png (budgets on a categorical axis, in report order)."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    labels = [s['budget'] if s['visual_tokens'] is None else f'{s["budget"]}\n({s["visual_tokens"]:g} tok)'
              for s in summaries]
    positions = np.arange(len(summaries))

    def series(key: str) -> np.ndarray:
        return np.array([np.nan if s[key] is None else s[key] for s in summaries], dtype=float)

    figure, axes = plt.subplots(figsize=(7, 4.2))
    for field, name in (('vision_ms', 'vision'), ('prefill_ms', 'prefill'), ('ttft_ms', 'time to first token'),
                        ('total_ms', 'total')):
        line, = axes.plot(positions, series(f'{field}_p50'), marker='o', label=f'{name} p50')
        axes.plot(positions, series(f'{field}_p95'), marker='x', linestyle='--', color=line.get_color(),
                  alpha=0.6, label=f'{name} p95')
    if summaries and 'latency_ms_p50' in summaries[0]:
        axes.plot(positions, series('latency_ms_p50'), marker='s', color='black', label='service latency p50')
    axes.set_xticks(positions, labels)
    axes.set_xlabel('token budget')
    axes.set_ylabel('ms (fresh frame)')
    axes.set_title('Latency vs visual-token budget')
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(out_dir / LATENCY_PLOT, dpi=100)
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(7, 4.2))
    exact, f1, hits = series('exact_match_rate'), series('token_f1_mean'), series('keyword_hit_rate')
    for values, name, marker in ((exact, 'exact match vs full', 'o'), (f1, 'token F1 vs full', 's'),
                                 (hits, 'keyword hit rate', '^')):
        if not np.all(np.isnan(values)):
            axes.plot(positions, values, marker=marker, label=name)
    if np.all(np.isnan(exact)) and np.all(np.isnan(hits)):
        axes.text(0.5, 0.5, 'no full-budget reference and no expected keywords:\nadd "full" to --budgets',
                  ha='center', va='center', transform=axes.transAxes)
    axes.set_xticks(positions, labels)
    axes.set_ylim(-0.05, 1.05)
    axes.set_xlabel('token budget')
    axes.set_ylabel('rate')
    axes.set_title('Agreement with the full budget vs token budget')
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out_dir / AGREEMENT_PLOT, dpi=100)
    plt.close(figure)


def format_stamp(stamp_ns: int | None) -> str:
    return '—' if stamp_ns is None else f'{stamp_ns // 10**9}.{stamp_ns % 10**9:09d}'


def write_report(out_dir: pathlib.Path, rows: list[dict], skipped: list[SkippedFrame], run: dict,
                 *, problems: list[str] = ()) -> list[dict]:
    """Write summary.csv, report.md and the plots for all rows of results.jsonl; return the summaries."""
    live = run['mode'] == 'live'
    summaries = summarize(rows, run['budgets'], live=live)
    write_summary_csv(summaries, out_dir / SUMMARY_FILE)
    plot_budgets(summaries, out_dir)

    answered = [row for row in rows if row.get('status', 'ok') == 'ok']
    frames_per_topic = Counter(topic for topic, _ in {(row['topic'], row['stamp_ns']) for row in answered})
    lines = ['# vlm_replay report', '']
    if live:
        lines.append(f'- mode: live, bag `{run["bag"]}` played at rate {run["rate"]:g} into node '
                     f'`{run["node_name"]}` (camera `{run["camera"] or "node default"}`), asking every '
                     f'{run["ask_period_s"]:g} s of bag time')
    else:
        lines.append(f'- mode: offline, bag `{run["bag"]}`')
    if live:
        lines.append('- frames played: ' + (', '.join(f'{topic}: {count}' for topic, count in run['published'].items())
                                            or 'none')
                     + '; received by the node: ' + (', '.join(f'{camera}: {count}' for camera, count
                                                               in run['node_frames_received'].items()) or 'unknown'))
    if live:
        lines.append(f'- model: `{run["model"]}` on {run["device"]} ({run["dtype"]}) with the node\'s settings, '
                     f'max new tokens {run["max_new_tokens"]}, greedy decoding')
    else:
        lines.append(f'- model: `{run["model"]}` on {run["device"]} ({run["dtype"]}), VisionZip dominant ratio '
                     f'{run["dominant_ratio"]:.4g}, max new tokens {run["max_new_tokens"]}, greedy decoding')
    lines += [
        '- frames evaluated: ' + (', '.join(f'{topic}: {count}' for topic, count in sorted(frames_per_topic.items()))
                                  or 'none'),
        f'- prompts: description `{run["describe_prompt"]}` and {len(run["questions"])} question(s)'
        + (f', {sum(bool(q["expect"]) for q in run["questions"])} with expected keywords' if run['questions'] else ''),
        f'- answers: {len(answered)} in `{RESULTS_FILE}`'
        + (f' ({len({row["request"] for row in rows if row["status"] != "ok"})} requests failed)' if live else ''),
        f'- skipped frames: {len(skipped)}' + (' (listed below)' if skipped else ''),
    ]
    lines += [f'- problem: {problem}' for problem in problems]
    lines += ['', '## Per budget', ''] + budget_table(summaries) + [
        '',
        'Latency columns are over fresh answers: the one per frame and budget that computed the image '
        'prefix (vision encoder, VisionZip, prefill). Later prompts on the same frame reuse that prefix '
        '(`reused-prefix total`). Decode tok/s counts tokens after the first. Exact match and token F1 '
        'compare each answer with the full-budget answer to the same prompt on the same frame (number of '
        'pairs in brackets); keyword hits count answers containing an expected keyword (answers with '
        'keywords in brackets).',
    ]
    if live:
        lines += ['', '## Service calls', ''] + live_table(summaries) + [
            '', 'Service latency is measured by the caller from request to response. Image age is the '
                'bag time at the response minus the header stamp of the frame the answer is about.']
    lines += ['', f'![latency vs budget]({LATENCY_PLOT})', '', f'![agreement vs budget]({AGREEMENT_PLOT})']
    if skipped:
        lines += ['', '## Skipped frames', '', '| topic | stamp | reason |', '|---|---|---|']
        lines += [f'| {frame.topic} | {format_stamp(frame.stamp_ns)} | {frame.reason.replace("|", "/")} |'
                  for frame in skipped]
    failures = Counter((row['status'], row.get('message', '')) for row in
                       {row['request']: row for row in rows if row.get('status', 'ok') != 'ok'}.values())
    if failures:
        lines += ['', '## Failed requests', '', '| status | requests | message |', '|---|---|---|']
        lines += [f'| {status} | {count} | {_cell(message)} |' for (status, message), count in failures.most_common()]
    if answered:
        first = min(answered, key=lambda row: (row['stamp_ns'], row['topic']))
        example = [row for row in answered if (row['topic'], row['stamp_ns']) == (first['topic'], first['stamp_ns'])]
        order = {budget: index for index, budget in enumerate(s['budget'] for s in summaries)}
        example.sort(key=lambda row: (row['kind'] != 'describe', row['prompt'], order.get(row['budget'], 0)))
        lines += ['', f'## Example answers ({first["topic"]} at {format_stamp(first["stamp_ns"])})', '',
                  '| prompt | budget | answer |', '|---|---|---|']
        lines += [f'| {_cell(row["prompt"])} | {row["budget"]} | {_cell(row["text"])} |' for row in example]
    (out_dir / REPORT_FILE).write_text('\n'.join(lines) + '\n', encoding='utf-8')
    return summaries


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell (one line, no pipes, control characters shown as U+FFFD)."""
    printable = ''.join(char if char.isprintable() or char.isspace() else '\ufffd' for char in text)
    return ' '.join(printable.split()).replace('|', '\\|') or '(empty)'




# ----------------------------------------------------------------------------------------------------
# Progress


class Progress:
    """A text progress bar with ETA on stderr: redrawn in place on a terminal, a line every few
    seconds otherwise (logs, CI). The ETA uses only work done in this run, so resumed work that is
    skipped in an instant does not make it optimistic.
    """

    def __init__(self, total: int, unit: str, stream=None, log_interval_s: float = 5.0):
        self.total = max(total, 0)
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = hasattr(self.stream, 'isatty') and self.stream.isatty()
        self.log_interval_s = log_interval_s
        self.done = 0
        self.computed = 0
        self.computed_seconds = 0.0
        self.started = time.monotonic()
        self.last_drawn = -math.inf

    def advance(self, *, seconds_spent: float | None = None) -> None:
        """One unit finished; `seconds_spent` when it was computed (not skipped as already done)."""
        self.done += 1
        self.total = max(self.total, self.done)
        if seconds_spent is not None:
            self.computed += 1
            self.computed_seconds += seconds_spent
        self.draw()

    def line(self) -> str:
        width = 24
        filled = round(width * self.done / self.total) if self.total else width
        remaining = self.total - self.done
        if self.computed:
            eta = _clock(remaining * self.computed_seconds / self.computed)
        else:
            eta = '0:00:00' if remaining == 0 else '?'
        percent = 100 * self.done / self.total if self.total else 100.0
        return (f'vlm_replay [{"#" * filled}{"." * (width - filled)}] {self.done}/{self.total} {self.unit} '
                f'{percent:3.0f}%  elapsed {_clock(time.monotonic() - self.started)}  ETA {eta}')

    def draw(self, *, final: bool = False) -> None:
        now = time.monotonic()
        if self.interactive:
            self.stream.write('\r' + self.line() + ('\n' if final else ''))
        elif final or now - self.last_drawn >= self.log_interval_s:
            self.stream.write(self.line() + '\n')
        else:
            return
        self.last_drawn = now
        self.stream.flush()

    def finish(self, *, complete: bool = True) -> None:
        """Draw the last line; `complete` when the work ended normally (the estimate becomes exact)."""
        if complete:
            self.total = self.done
        self.draw(final=True)


def _clock(seconds: float) -> str:
    seconds = max(int(round(seconds)), 0)
    return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


# ----------------------------------------------------------------------------------------------------
# The run directory


def prepare_out_dir(out_dir: pathlib.Path, *, resume: bool) -> list[dict]:
    """Create --out (never overwriting an earlier run unless resuming it) and return the rows already done."""
    results_path = out_dir / RESULTS_FILE
    if out_dir.exists() and not out_dir.is_dir():
        raise ReplayError(f'--out {out_dir} is a file: pass a directory for the results')
    if results_path.exists() and not resume:
        raise ReplayError(f'{out_dir} already holds {RESULTS_FILE} from an earlier run: pass --resume to '
                          f'continue it, or choose another --out')
    out_dir.mkdir(parents=True, exist_ok=True)
    return load_results(results_path) if resume else []


def check_resumed_settings(out_dir: pathlib.Path, run: dict) -> None:
    """Refuse to append answers made with other ANSWER_SETTINGS than the earlier run's (run.json)."""
    try:
        previous = json.loads((out_dir / RUN_FILE).read_text(encoding='utf-8'))
    except (OSError, ValueError):
        return  # nothing to compare with: the earlier run was killed before writing run.json
    for key in ANSWER_SETTINGS:
        if key in previous and previous[key] != run[key]:
            raise ReplayError(f'{out_dir / RESULTS_FILE} was made with {key}={previous[key]!r} and this run asks '
                              f'{key}={run[key]!r}: resume with the same settings or choose a new --out')


def write_run_file(out_dir: pathlib.Path, run: dict) -> None:
    (out_dir / RUN_FILE).write_text(json.dumps(run, indent=2, ensure_ascii=False) + '\n', encoding='utf-8')


class ResultsWriter:
    """Appends rows to results.jsonl, one flushed line per row, so a killed run loses at most a line."""

    def __init__(self, path: pathlib.Path):
        self.file = path.open('a', encoding='utf-8')

    def write(self, rows: Iterable[dict]) -> None:
        for row in rows:
            self.file.write(json.dumps(row, ensure_ascii=False) + '\n')
        self.file.flush()

    def close(self) -> None:
        self.file.close()


# ----------------------------------------------------------------------------------------------------
# Offline replay


def run_offline(args: argparse.Namespace, budgets: list[str], questions: list[Question]) -> int:
    from zip_vlm_ros.engine import DEFAULT_DESCRIBE_PROMPT, EngineConfig, EngineError, VlmEngine

    out_dir = pathlib.Path(args.out)
    # Precedence: command line, then the node's params file, then the engine's (= the node's) defaults.
    node_parameters = load_node_parameters(args.params_file) if args.params_file else {}
    settings = {name: node_parameters.get(name) if getattr(args, name) is None else getattr(args, name)
                for name in NODE_ENGINE_PARAMETERS}
    if not settings['model']:
        raise ReplayError('--model is required for offline replay (or a --params-file that sets model): pass a '
                          'LLaVA checkpoint directory or hub id, or use --live to evaluate a running node')
    dominant_ratio = settings['dominant_ratio']
    if dominant_ratio is not None and not (isinstance(dominant_ratio, (int, float)) and 0 < dominant_ratio <= 1):
        raise ReplayError(f'dominant_ratio {dominant_ratio!r} is out of range: use 0 < dominant_ratio <= 1 '
                          f'(the node\'s default is 54/64 = 0.84375)')
    describe_prompt = settings['describe_prompt'] or DEFAULT_DESCRIBE_PROMPT
    if any(question.question == describe_prompt for question in questions):
        raise ReplayError(f'the questions file repeats the description prompt {describe_prompt!r}: remove it '
                          f'from the questions (the description is always evaluated)')

    reader = open_bag(args.bag)
    try:
        topics, problems = resolve_topics(reader.topics, args.topics, args.bag)
        for problem in problems:
            print(f'vlm_replay: {"warning" if topics else "error"}: {problem}', file=sys.stderr)
        if not topics:
            return EXIT_NOTHING_EVALUATED
        # Before the (slow) model load, so that a wrong --out or a damaged results file fails at once.
        done_rows = prepare_out_dir(out_dir, resume=args.resume)

        config_values = {'model': str(settings['model']), 'device': settings['device'], 'dtype': settings['dtype'],
                         'contextual_ratio': None if dominant_ratio is None else 1.0 - dominant_ratio,
                         'max_new_tokens': settings['max_new_tokens']}
        config = EngineConfig(**{key: value for key, value in config_values.items() if value is not None})
        print(f'vlm_replay: loading {config.model} ...', file=sys.stderr)
        try:
            engine = VlmEngine(config)
        except EngineError as error:
            raise ReplayError(str(error)) from None
        try:
            for budget in budgets:
                if budget != FULL_BUDGET and int(budget) >= engine.visual_tokens_full:
                    print(f'vlm_replay: note: budget {budget} >= the {engine.visual_tokens_full} visual tokens of '
                          f'{engine.model_name}: no reduction, same as full', file=sys.stderr)
            run = {
                'mode': 'offline', 'bag': str(args.bag), 'topics': topics, 'model': engine.model_name,
                'device': str(engine.device), 'dtype': str(engine.dtype).removeprefix('torch.'),
                'dominant_ratio': 1.0 - engine.config.contextual_ratio,
                'max_new_tokens': engine.config.max_new_tokens, 'describe_prompt': describe_prompt,
                'questions': [dataclasses.asdict(question) for question in questions], 'budgets': budgets,
                'every': args.every, 'period_s': args.period, 'max_frames': args.max_frames,
            }
            if done_rows:
                check_resumed_settings(out_dir, run)
            write_run_file(out_dir, run)
            return _evaluate_bag(args, reader, engine, run, problems, done_rows)
        finally:
            engine.close()
    finally:
        reader.close()


def _warm_up(engine, rgb: np.ndarray, budgets: list[str], prompt: str) -> None:
    """One unrecorded request per budget before timing starts: the first calls of a fresh process pay for
    lazy initialisation (kernels, allocator, caches), which would otherwise land on whichever budget
    happens to run first and skew the comparison."""
    from zip_vlm_ros.engine import EngineError

    for budget in budgets:
        try:
            engine.generate(rgb, prompt, token_budget=budget_tokens(budget, engine.visual_tokens_full),
                            max_new_tokens=2, frame_key=None)
        except EngineError:
            return  # the real request on this frame reports the problem


def _evaluate_bag(args, reader, engine, run: dict, problems: list[str], done_rows: list[dict]) -> int:
    """The offline loop: frames in bag order, each at every budget, all prompts sharing the prefix."""
    from rosbags.rosbag2.errors import ReaderError
    from rosbags.typesys import Stores, get_typestore

    from zip_vlm_ros.engine import EngineError

    typestore = get_typestore(Stores.ROS2_KILTED)
    out_dir = pathlib.Path(args.out)
    topics, budgets, describe_prompt = run['topics'], run['budgets'], run['describe_prompt']
    done_keys = {result_key(row) for row in done_rows}
    prompts = [(describe_prompt, 'describe', ())] + [(q['question'], 'question', tuple(q['expect']))
                                                     for q in run['questions']]
    selector = FrameSelector(every=args.every, period_s=args.period, max_frames=args.max_frames)
    duration_ns = max(reader.duration, 0)
    expected = sum(selector.expected_frames(reader.topics[topic].msgcount, duration_ns) for topic in topics)
    progress = Progress(expected * len(budgets), 'frame-budgets')
    skipped: list[SkippedFrame] = []
    problems = list(problems)
    new_rows: list[dict] = []
    writer = ResultsWriter(out_dir / RESULTS_FILE)
    interrupted = False
    warmed_up = False
    connections = [connection for connection in reader.connections if connection.topic in topics]
    try:
        for connection, log_ns, raw in reader.messages(connections=connections):
            topic = connection.topic
            if not selector.wants(topic, log_ns):
                if all(selector.topic_full(name) for name in topics):
                    break
                continue
            frame = decode_frame(typestore, topic, connection.msgtype, log_ns, raw)
            if isinstance(frame, SkippedFrame):
                skipped.append(frame)
                print(f'vlm_replay: warning: skipped {topic} frame at {format_stamp(frame.stamp_ns)}: '
                      f'{frame.reason}', file=sys.stderr)
                continue
            selector.accept(topic, log_ns)
            if not warmed_up and any((topic, frame.stamp_ns, budget, prompt) not in done_keys
                                     for budget in budgets for prompt, _, _ in prompts):
                _warm_up(engine, frame.rgb, budgets, describe_prompt)
                warmed_up = True
            for budget in budgets:
                todo = [(prompt, kind, expect) for prompt, kind, expect in prompts
                        if (topic, frame.stamp_ns, budget, prompt) not in done_keys]
                if not todo:
                    progress.advance()
                    continue
                started = time.monotonic()
                try:
                    outputs = engine.generate_many(
                        frame.rgb, [prompt for prompt, _, _ in todo],
                        token_budget=budget_tokens(budget, engine.visual_tokens_full),
                        # Per budget label: budgets that mean the same token count (192 and full on a
                        # small model) are each timed from scratch instead of sharing one prefix.
                        frame_key=(topic, frame.stamp_ns, budget))
                except EngineError as error:
                    skipped.append(SkippedFrame(topic, frame.stamp_ns, log_ns, f'budget {budget}: {error}'))
                    print(f'vlm_replay: warning: {topic} frame at {format_stamp(frame.stamp_ns)}, budget '
                          f'{budget}: {error}', file=sys.stderr)
                    progress.advance()
                    continue
                rows = [output_row(frame, budget, output, kind=kind, expect=expect)
                        for (_, kind, expect), output in zip(todo, outputs)]
                writer.write(rows)
                new_rows.extend(rows)
                progress.advance(seconds_spent=time.monotonic() - started)
    except KeyboardInterrupt:
        interrupted = True
    except ReaderError as error:
        problems.append(f'reading the bag stopped early ({error}); the frames before that point are evaluated')
        print(f'vlm_replay: warning: {problems[-1]}', file=sys.stderr)
    finally:
        writer.close()
    progress.finish(complete=not interrupted)
    for topic in topics if not interrupted else ():
        if selector.accepted[topic] == 0:
            problems.append(f'no frame of {topic} could be evaluated (selection empty or every frame malformed)')
            print(f'vlm_replay: warning: {problems[-1]}', file=sys.stderr)
    all_rows = done_rows + new_rows
    write_report(out_dir, all_rows, skipped, run, problems=problems)
    print(f'vlm_replay: {len(new_rows)} new answers ({len(done_rows)} from earlier runs), {len(skipped)} skipped '
          f'frames; report in {out_dir / REPORT_FILE}', file=sys.stderr)
    if interrupted:
        print('vlm_replay: interrupted; run again with --resume to continue', file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK if all_rows else EXIT_NOTHING_EVALUATED


# ----------------------------------------------------------------------------------------------------
# Live replay into a running node


def parse_remaps(remaps: list[str], topics: list[str]) -> dict[str, str]:
    """['/a:=/b'] -> {'/a': '/b'} for topics being played; other OLD names are an error."""
    mapping = {}
    for remap in remaps:
        old, separator, new = remap.partition(':=')
        old, new = old.strip(), new.strip()
        if not separator or not old or not new:
            raise ReplayError(f'--remap {remap!r} is not OLD:=NEW: use e.g. --remap /camera/front/image_raw:=/front/image')
        old = old if old.startswith('/') else '/' + old
        if old not in topics:
            raise ReplayError(f'--remap {remap!r}: {old} is not one of the played topics ({", ".join(topics)})')
        mapping[old] = new if new.startswith('/') else '/' + new
    return mapping


@dataclass
class LiveRequest:
    """One service call in flight (or finished) and what it asked."""

    request_id: int
    budget: str
    kind: str                                   # 'describe' or 'question'
    prompts: list[tuple[str, tuple[str, ...]]]  # (prompt, expected keywords) in request order
    sent: float                                 # time.monotonic() at call
    future: Any
    answered: float | None = None               # time.monotonic() at response


def _node_diagnostics(node, node_name: str, wait_s: float) -> dict[str, str]:
    """The key/values of the node's own status on /diagnostics (model, device, visual_tokens_full, ...),
    or {} when none arrives within wait_s."""
    from diagnostic_msgs.msg import DiagnosticArray

    status_name = f'{node_name.rsplit("/", 1)[-1]}: vlm'
    received: dict[str, str] = {}
    arrived = threading.Event()

    def on_diagnostics(array) -> None:
        for status in array.status:
            if status.name == status_name and not arrived.is_set():
                received.update({item.key: item.value for item in status.values})
                arrived.set()

    subscription = node.create_subscription(DiagnosticArray, '/diagnostics', on_diagnostics, 10)
    try:
        arrived.wait(wait_s)
    finally:
        node.destroy_subscription(subscription)
    return received


class LivePlayback:
    """Plays bag messages on their topics at recorded timing x rate and keeps the bag clock.

    Bag time at a wall instant is ``bag_start_ns + (monotonic - wall_start) * rate``: the clock
    published on /clock (with --clock) and the one used for image ages.
    """

    def __init__(self, reader, topics: list[str], publishers: dict[str, Any], typestore, rate: float):
        self.reader = reader
        self.topics = topics
        self.publishers = publishers
        self.typestore = typestore
        self.rate = rate
        self.bag_start_ns = reader.start_time
        self.bag_end_ns = reader.end_time
        self.wall_start = 0.0
        self.stop = threading.Event()
        self.finished = threading.Event()
        self.published = Counter()
        self.topic_of_stamp: dict[int, str] = {}
        self.error: str | None = None

    def bag_now_ns(self, wall: float | None = None) -> int:
        wall = time.monotonic() if wall is None else wall
        return self.bag_start_ns + round((wall - self.wall_start) * self.rate * 1e9)

    def wall_at(self, bag_ns: int) -> float:
        return self.wall_start + (bag_ns - self.bag_start_ns) / 1e9 / self.rate

    def run(self) -> None:
        connections = [connection for connection in self.reader.connections if connection.topic in self.topics]
        try:
            for connection, log_ns, raw in self.reader.messages(connections=connections):
                if self.stop.wait(max(self.wall_at(log_ns) - time.monotonic(), 0)):
                    return
                try:
                    stamp_ns = stamp_ns_of(self.typestore.deserialize_cdr(raw, connection.msgtype)) or log_ns
                    self.topic_of_stamp[stamp_ns] = connection.topic
                except Exception:  # a garbled message is still played, as ros2 bag play would
                    pass
                # rosbag2 stores the rmw serialisation, so the recorded bytes go out unchanged.
                self.publishers[connection.topic].publish(bytes(raw))
                self.published[connection.topic] += 1
        except Exception as error:  # reader errors on a damaged bag end playback, not the run
            self.error = f'playback stopped early: {type(error).__name__}: {error}'
        finally:
            self.finished.set()


def _spin_quietly(executor) -> None:
    try:
        executor.spin()
    except Exception:  # raised when the context shuts down under it at the end of the run
        pass


def run_live(args: argparse.Namespace, budgets: list[str], questions: list[Question]) -> int:
    from rosbags.typesys import Stores, get_typestore

    reader = open_bag(args.bag)
    try:
        topics, problems = resolve_topics(reader.topics, args.topics, args.bag)
        for problem in problems:
            print(f'vlm_replay: {"warning" if topics else "error"}: {problem}', file=sys.stderr)
        if not topics:
            return EXIT_NOTHING_EVALUATED
        remaps = parse_remaps(args.remap, topics)
        try:
            import rclpy
            from rclpy.executors import SingleThreadedExecutor

            importlib.import_module('zip_vlm_ros.srv')  # the interfaces _live_session calls
        except ImportError as error:
            raise ReplayError(f'--live needs rclpy and the zip_vlm_ros interfaces ({error}): run '
                              f'scripts/setup.sh or source a ROS 2 install with this package built') from None

        out_dir = pathlib.Path(args.out)
        prepare_out_dir(out_dir, resume=False)
        context = rclpy.Context()
        rclpy.init(context=context)
        node = rclpy.create_node(f'vlm_replay_{os.getpid()}', context=context)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        spinner = threading.Thread(target=_spin_quietly, args=(executor,), daemon=True)
        spinner.start()
        try:
            return _live_session(args, reader, node, topics, remaps, problems, budgets, questions,
                                 get_typestore(Stores.ROS2_KILTED))
        finally:
            executor.shutdown(timeout_sec=1.0)
            node.destroy_node()
            rclpy.try_shutdown(context=context)
            spinner.join(timeout=2.0)
    finally:
        reader.close()


def _live_session(args, reader, node, topics, remaps, problems, budgets, questions, typestore) -> int:
    """Play the bag into the node while asking it at --period; write the results and the report."""
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CompressedImage, Image

    from zip_vlm_ros.srv import AskMany, DescribeScene

    out_dir = pathlib.Path(args.out)
    node_name = args.node_name if args.node_name.startswith('/') else '/' + args.node_name
    describe_client = node.create_client(DescribeScene, f'{node_name}/describe_scene')
    ask_many_client = node.create_client(AskMany, f'{node_name}/ask_many')
    for client in (describe_client, ask_many_client) if questions else (describe_client,):
        if not client.wait_for_service(timeout_sec=args.wait):
            raise ReplayError(f'service {client.srv_name} did not appear within {args.wait:g} s: start vlm_node '
                              f'(and activate it), or pass the right --node-name; ROS_DOMAIN_ID is '
                              f'{os.environ.get("ROS_DOMAIN_ID", "0")}')

    node_info = _node_diagnostics(node, node_name, args.wait)
    visual_tokens_full = int(node_info['visual_tokens_full']) if node_info.get('visual_tokens_full') else None
    if visual_tokens_full is None:
        if FULL_BUDGET in budgets:
            raise ReplayError(f'no diagnostics from {node_name} on /diagnostics within {args.wait:g} s, so its '
                              f'model\'s visual tokens (budget "full") are unknown: drop "full" from --budgets or '
                              f'check that the node is active')
        print(f'vlm_replay: warning: no diagnostics from {node_name}: budgets are sent as given', file=sys.stderr)
    request_budgets = {}
    for budget in budgets:
        # The node accepts 1..visual tokens; larger budgets mean "no reduction" offline, so send the same.
        tokens = visual_tokens_full if budget == FULL_BUDGET else int(budget)
        if visual_tokens_full is not None and tokens > visual_tokens_full:
            print(f'vlm_replay: note: budget {budget} >= the {visual_tokens_full} visual tokens of the node\'s '
                  f'model: no reduction, same as full', file=sys.stderr)
            tokens = visual_tokens_full
        request_budgets[budget] = tokens

    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    publishers = {}
    for topic in topics:
        message_type = Image if reader.topics[topic].msgtype == 'sensor_msgs/msg/Image' else CompressedImage
        publishers[topic] = node.create_publisher(message_type, remaps.get(topic, topic), qos)
    # The node's subscriptions exist once its services do; this only waits for discovery to match them.
    deadline = time.monotonic() + min(args.wait, SUBSCRIBER_DISCOVERY_S)
    while time.monotonic() < deadline and not all(pub.get_subscription_count() for pub in publishers.values()):
        time.sleep(0.05)
    for topic, publisher in publishers.items():
        if not publisher.get_subscription_count():
            problems.append(f'nobody subscribes to {publisher.topic_name}: map it to a camera in the node\'s '
                            f'parameters or use --remap {topic}:=<camera topic>')
            print(f'vlm_replay: warning: {problems[-1]}', file=sys.stderr)

    playback = LivePlayback(reader, topics, publishers, typestore, args.rate)
    clock_thread = None
    if args.clock:
        from rosgraph_msgs.msg import Clock

        clock_publisher = node.create_publisher(Clock, '/clock', 10)

        def publish_clock() -> None:
            while not playback.finished.is_set():
                now_ns = playback.bag_now_ns()
                message = Clock()
                message.clock.sec, message.clock.nanosec = divmod(now_ns, 10**9)
                clock_publisher.publish(message)
                playback.finished.wait(1.0 / args.clock)

        clock_thread = threading.Thread(target=publish_clock, daemon=True)

    period_ns = round((args.period or 1.0) * 1e9)
    rounds = max((playback.bag_end_ns - playback.bag_start_ns) // period_ns, 1)
    if args.max_frames is not None:
        rounds = min(rounds, args.max_frames)
    progress = Progress(rounds * len(budgets), 'request rounds')
    requests: list[LiveRequest] = []
    camera = args.camera
    max_new_tokens = args.max_new_tokens or 0
    describe_prompt = args.describe_prompt or ''

    def send(budget: str, request_id: int) -> list[LiveRequest]:
        token_budget = request_budgets[budget]
        sent = []
        describe = DescribeScene.Request(camera=camera, token_budget=token_budget, max_new_tokens=max_new_tokens,
                                         prompt=describe_prompt)
        sent.append(LiveRequest(request_id, budget, 'describe', [(describe_prompt, ())], time.monotonic(),
                                describe_client.call_async(describe)))
        if questions:
            ask = AskMany.Request(questions=[q.question for q in questions], camera=camera,
                                  token_budget=token_budget, max_new_tokens=max_new_tokens)
            sent.append(LiveRequest(request_id + 1, budget, 'question', [(q.question, q.expect) for q in questions],
                                    time.monotonic(), ask_many_client.call_async(ask)))
        for request in sent:
            request.future.add_done_callback(lambda _, request=request: setattr(request, 'answered', time.monotonic()))
        return sent

    playback.wall_start = time.monotonic() + 0.2
    player = threading.Thread(target=playback.run, daemon=True)
    player.start()
    if clock_thread is not None:
        clock_thread.start()
    interrupted = False
    try:
        for round_index in range(1, rounds + 1):
            if playback.stop.wait(max(playback.wall_at(playback.bag_start_ns + round_index * period_ns)
                                      - time.monotonic(), 0)):
                break
            for budget in budgets:
                requests.extend(send(budget, len(requests) + 1))
                progress.advance()
        # Let playback finish, then give outstanding calls their full timeout.
        player.join()
        while any(request.answered is None and time.monotonic() - request.sent < args.timeout
                  for request in requests):
            time.sleep(0.05)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        playback.stop.set()
        player.join(timeout=2.0)
        if clock_thread is not None:
            clock_thread.join(timeout=2.0)
    progress.finish(complete=not interrupted)
    if playback.error:
        problems.append(playback.error)

    rows = []
    for request in requests:
        client = describe_client if request.kind == 'describe' else ask_many_client
        base = {'request': request.request_id, 'budget': request.budget, 'kind': request.kind, 'camera': camera}
        if request.answered is None or request.answered - request.sent > args.timeout:
            if not request.future.done():
                client.remove_pending_request(request.future)
            status, message = 'timeout', f'no response within {args.timeout:g} s'
            rows += [dict(base, topic='', stamp_ns=None, prompt=prompt, expect=list(expect), status=status,
                          message=message) for prompt, expect in request.prompts]
            continue
        response = request.future.result()
        if not response.success:
            rows += [dict(base, topic='', stamp_ns=None, prompt=prompt, expect=list(expect), status='refused',
                          message=response.message) for prompt, expect in request.prompts]
            continue
        results = [response.result] if request.kind == 'describe' else list(response.results)
        latency_ms = (request.answered - request.sent) * 1000
        bag_at_answer_ns = playback.bag_now_ns(request.answered)
        for (_, expect), result in zip(request.prompts, results):
            stamp_ns = int(result.header.stamp.sec) * 10**9 + int(result.header.stamp.nanosec)
            rows.append(dict(
                base, topic=playback.topic_of_stamp.get(stamp_ns, ''), camera=result.camera, stamp_ns=stamp_ns,
                prompt=result.prompt, expect=list(expect), status='ok', text=result.text, model=result.model,
                reduction=result.reduction, token_budget=result.token_budget, visual_tokens=result.visual_tokens,
                visual_tokens_full=result.visual_tokens_full, generated_tokens=result.generated_tokens,
                vision_ms=result.vision_ms, reduction_ms=result.reduction_ms, prefill_ms=result.prefill_ms,
                ttft_ms=None, decode_ms=result.decode_ms, total_ms=result.total_ms,
                prefix_reused=result.prefix_reused, kv_cache_bytes=None, latency_ms=latency_ms,
                image_age_ms=(bag_at_answer_ns - stamp_ns) / 1e6, node_image_age_ms=result.image_age_ms))
    writer = ResultsWriter(out_dir / RESULTS_FILE)
    writer.write(rows)
    writer.close()
    # Frames the node got, from its own counters: shows transport drops (e.g. large raw images on a
    # best-effort subscription) that would otherwise look like a slow or refusing node.
    node_info_end = _node_diagnostics(node, node_name, min(args.wait, 3.0))
    frames_received = {}
    for key, value in node_info_end.items():
        if key.startswith('camera.') and key.endswith('.frames_received'):
            camera_name = key[len('camera.'):-len('.frames_received')]
            before = node_info.get(key, '0')
            topic_name = node_info_end.get(f'camera.{camera_name}.topic', '')
            frames_received[f'{camera_name} ({topic_name})'] = int(value) - int(before or 0)

    models = sorted({row['model'] for row in rows if row['status'] == 'ok'})
    run = {
        'mode': 'live', 'bag': str(args.bag), 'topics': topics, 'remaps': remaps, 'node_name': node_name,
        'camera': camera, 'rate': args.rate, 'ask_period_s': period_ns / 1e9, 'clock_hz': args.clock,
        'model': ', '.join(models) or node_info.get('model', 'unknown (no answer)'),
        'device': node_info.get('device', 'the node\'s device'), 'dtype': node_info.get('dtype', 'node setting'),
        'dominant_ratio': 'node setting',
        'max_new_tokens': max_new_tokens or 'node default',
        'describe_prompt': describe_prompt or next((row['prompt'] for row in rows
                                                    if row['status'] == 'ok' and row['kind'] == 'describe'),
                                                   'node default'),
        'questions': [dataclasses.asdict(question) for question in questions], 'budgets': budgets,
        'published': {remaps.get(topic, topic): count for topic, count in playback.published.items()},
        'node_frames_received': frames_received,
    }
    write_run_file(out_dir, run)
    write_report(out_dir, rows, [], run, problems=problems)
    answered = sum(row['status'] == 'ok' for row in rows)
    print(f'vlm_replay: {len(requests)} requests, {answered} answers; report in {out_dir / REPORT_FILE}',
          file=sys.stderr)
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if answered else EXIT_NOTHING_EVALUATED


# ----------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='vlm_replay',
        description='Evaluate visual-token budgets on a rosbag2 recording: scene descriptions and questions '
                    'per frame and budget, with results.jsonl, summary.csv, report.md and plots in --out.')
    parser.add_argument('bag', help='rosbag2 directory (with metadata.yaml) or a .mcap/.db3 file')
    parser.add_argument('--out', required=True, help='directory for results.jsonl, summary.csv, report.md, plots')
    parser.add_argument('--topics', nargs='+', metavar='TOPIC', help='image topics to evaluate (default: all)')
    parser.add_argument('--questions', metavar='FILE',
                        help='YAML list of {question: ..., expect: [keywords]} asked about every frame')
    parser.add_argument('--budgets', default=DEFAULT_BUDGETS,
                        help=f'comma-separated visual-token budgets, "full" = no reduction (default {DEFAULT_BUDGETS})')
    selection = parser.add_mutually_exclusive_group()
    selection.add_argument('--every', type=_positive_int, default=1, metavar='N',
                           help='offline: evaluate every Nth frame of each topic (default 1)')
    selection.add_argument('--period', type=_positive_float, metavar='S',
                           help='offline: at most one frame per S seconds of each topic; live: ask every S '
                                'seconds of bag time (default 1)')
    parser.add_argument('--max-frames', type=_positive_int, metavar='K',
                        help='offline: at most K evaluated frames per topic; live: at most K rounds of requests')
    parser.add_argument('--resume', action='store_true',
                        help='continue an earlier run in --out, skipping work already in results.jsonl')
    engine = parser.add_argument_group(
        'engine (offline): the node\'s parameters of the same names; defaults are the node\'s defaults')
    engine.add_argument('--params-file', metavar='YAML',
                        help='read model, device, dtype, dominant_ratio, max_new_tokens and describe_prompt from '
                             'the node\'s params file (e.g. config/vlm.yaml); the options below override it')
    engine.add_argument('--model', help='LLaVA checkpoint directory or hub id (required offline)')
    engine.add_argument('--device', help='auto|cpu|cuda|cuda:N')
    engine.add_argument('--dtype', help='auto|float16|bfloat16|float32')
    engine.add_argument('--dominant-ratio', type=float, help='share of the budget given to dominant tokens')
    engine.add_argument('--max-new-tokens', type=_positive_int, help='answer length limit in tokens')
    parser.add_argument('--describe-prompt', help='scene description prompt (default: the node\'s)')
    live = parser.add_argument_group('live mode (plays the bag into a running vlm_node)')
    live.add_argument('--live', action='store_true', help='replay into a running node instead of offline')
    live.add_argument('--rate', type=_positive_float, default=1.0, help='playback rate factor (default 1)')
    live.add_argument('--clock', type=_positive_float, nargs='?', const=40.0, metavar='HZ',
                      help='publish /clock with bag time at HZ (default 40) for nodes with use_sim_time')
    live.add_argument('--node-name', default='/zip_vlm', help='node whose services to call (default /zip_vlm)')
    live.add_argument('--camera', default='', help='camera name for the requests (default: the node\'s first)')
    live.add_argument('--remap', action='append', default=[], metavar='OLD:=NEW',
                      help='publish bag topic OLD on NEW (repeatable)')
    live.add_argument('--timeout', type=_positive_float, default=60.0,
                      help='seconds before a service call counts as timed out (default 60)')
    live.add_argument('--wait', type=_positive_float, default=30.0,
                      help='seconds to wait for the node\'s services at start (default 30)')
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a whole number') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be at least 1, got {value}')
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f'must be a positive number, got {text}')
    return value


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        budgets = parse_budgets(args.budgets)
        questions = load_questions(args.questions) if args.questions else []
        if args.live:
            if args.every != 1:
                raise ReplayError('--every applies to offline replay; in --live mode use --period to set how '
                                  'often the node is asked')
            if args.resume:
                raise ReplayError('--resume applies to offline replay; a live run cannot be repeated exactly: '
                                  'use a new --out')
            return run_live(args, budgets, questions)
        return run_offline(args, budgets, questions)
    except ReplayError as error:
        print(f'vlm_replay: error: {error}', file=sys.stderr)
        return EXIT_NOTHING_EVALUATED


if __name__ == '__main__':
    sys.exit(main())
