"""The run directory: results.jsonl (the raw data), run.json (the settings), and resuming a run."""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Iterable

from zip_vlm_ros.replay.console import warn
from zip_vlm_ros.replay.inputs import ReplayError, point_reducer

RESULTS_FILE = 'results.jsonl'
SUMMARY_FILE = 'summary.csv'
REPORT_FILE = 'report.md'
RUN_FILE = 'run.json'
# What --resume compares with the run it continues: results of another bag, other prompts or other
# settings must not mix into one report.
RESUME_CHECKS = ('mode', 'bag_files', 'topics', 'budgets', 'reducers', 'describe_prompt', 'questions', 'model',
                 'device', 'dtype', 'dominant_ratio', 'max_new_tokens')
ROW_KEYS = {'topic', 'index', 'budget', 'prompt'}


def result_key(row: dict) -> tuple:
    """What identifies one piece of work (and one answer) in results.jsonl: the frame is its bag (label),
    topic and index in that bag, never its stamp alone (several images, or bags, may share one stamp)."""
    return row.get('bag', ''), row['topic'], row['index'], row['budget'], row['prompt']


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
                warn(f'dropped the incomplete last line of {path} (the previous run '
                      f'was cut short); that work is done again')
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
        if not isinstance(row, dict) or not ROW_KEYS <= row.keys():
            raise ReplayError(f'{path} line {number} is not a vlm_replay result row: delete that line or '
                              f'start a new --out directory')
        rows.append(row)
    return rows



def output_row(frame: Any, budget: str, output: Any, *, kind: str, expect: tuple[str, ...]) -> dict:
    """One results.jsonl row from a bag Frame and an engine VlmOutput. `budget` is the point label
    ('64', or 'divprune@64' with --reducers); `reducer` the reducer asked for (the output's reduction when
    the label names none: the engine's default, or "none" when nothing was reduced)."""
    row = {'bag': frame.bag, 'topic': frame.topic, 'index': frame.index, 'stamp_ns': frame.stamp_ns, 'budget': budget,
           'reducer': point_reducer(budget) or output.reduction, 'kind': kind, 'expect': list(expect)}
    # The provenance (numpy arrays per patch; per image for several images) is drawn as overlays, never
    # stored in the rows.
    row.update(dataclasses.asdict(dataclasses.replace(
        output, provenance=None, images=[dataclasses.replace(image, provenance=None) for image in output.images])))
    del row['provenance']
    for image in row['images']:
        del image['provenance']
    return row


def prepare_out_dir(out_dir: pathlib.Path, *, resume: bool) -> list[dict]:
    """Create --out (never overwriting an earlier run unless resuming it) and return the rows already done.

    Places that cannot hold the results (under a file, read-only, no space) fail here, in one line,
    before any work is done.
    """
    results_path = out_dir / RESULTS_FILE
    if out_dir.exists() and not out_dir.is_dir():
        raise ReplayError(f'--out {out_dir} is a file: pass a directory for the results')
    if results_path.exists() and not resume:
        raise ReplayError(f'{out_dir} already holds {RESULTS_FILE} from an earlier run: pass --resume to '
                          f'continue it, or choose another --out')
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / '.vlm_replay_write_test'
        probe.write_bytes(b'')
        probe.unlink()
    except OSError as error:
        raise ReplayError(f'cannot write to --out {out_dir} ({error.strerror or type(error).__name__}): choose a '
                          f'directory you can write to') from None
    return load_results(results_path) if resume else []


def check_resumed_run(out_dir: pathlib.Path, run: dict) -> None:
    """Refuse to continue a run made on another bag, topics, budgets, prompts, model or settings; the
    error names every difference."""
    try:
        previous = json.loads((out_dir / RUN_FILE).read_text(encoding='utf-8'))
    except FileNotFoundError:
        raise ReplayError(f'{out_dir} has {RESULTS_FILE} but no {RUN_FILE}, so what it was made from is unknown: '
                          f'start a new --out') from None
    except (OSError, ValueError) as error:
        raise ReplayError(f'{out_dir / RUN_FILE} is unreadable ({error}): start a new --out') from None
    current = json.loads(json.dumps(run))  # as run.json holds it: tuples become lists
    differences = [f'{key} was {_short(previous.get(key))} and is now {_short(current.get(key))}'
                   for key in RESUME_CHECKS if previous.get(key) != current.get(key)]
    if differences:
        raise ReplayError(f'--resume: {out_dir} holds another run: ' + '; '.join(differences)
                          + ': resume with the same bag and settings, or choose a new --out')


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 120 else text[:117] + '...'


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

