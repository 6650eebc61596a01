"""vlm_replay --ray on a local Ray instance (loopback only, 2 CPUs, one instance for the module): the
driver writes the single-process run's rows, a killed worker loses and duplicates nothing, and an
interrupted Ray run is resumed by either mode."""
import csv
import json

import pytest
import ray

from zip_vlm_ros.replay import cli, results
from zip_vlm_ros.replay.offline import EXIT_INTERRUPTED
from zip_vlm_ros.replay.ray_fleet import WORKER_NAMESPACE, connect, worker_name
from zip_vlm_ros.tools import sample_bag

MAX_NEW_TOKENS = '4'
BUDGETS = 'full,4'
FRAMES_PER_TOPIC = 5


@pytest.fixture(scope='module')
def local_ray():
    """One local Ray instance for the module; vlm_replay --ray uses the instance it finds initialised."""
    assert connect('local', workers=2, gpus_per_worker=None)
    assert ray.cluster_resources().get('CPU') >= 2
    yield
    ray.shutdown()


@pytest.fixture(scope='module')
def bag(tmp_path_factory):
    return sample_bag.write_sample_bag(tmp_path_factory.mktemp('bags') / 'mcap', storage='mcap',
                                       frames_per_topic=FRAMES_PER_TOPIC, with_bad_frames=True)


@pytest.fixture(scope='module')
def questions_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('questions') / 'questions.yaml'
    path.write_text('- question: Is there a person?\n  expect: [yes, person]\n', encoding='utf-8')
    return path


def replay(bag, out, model, questions_file, *extra):
    return cli.main([str(arg) for arg in (bag.path, '--out', out, '--model', model, '--budgets', BUDGETS,
                                          '--questions', questions_file, '--max-new-tokens', MAX_NEW_TOKENS,
                                          *extra)])


@pytest.fixture(scope='module')
def single_process(tmp_path_factory, bag, tiny_model_dir, questions_file):
    out = tmp_path_factory.mktemp('single') / 'out'
    assert replay(bag, out, tiny_model_dir, questions_file) == 0
    return out


def read_rows(out):
    return [json.loads(line) for line in (out / 'results.jsonl').read_text(encoding='utf-8').splitlines()]


def comparable(rows):
    """Rows without their timings (measured, so never equal twice), in key order (Ray finishes frames in
    any order)."""
    return sorted(({key: value for key, value in row.items() if not key.endswith('_ms')} for row in rows),
                  key=results.result_key)


def summary_counts(out):
    """summary.csv without the measured columns: counts, visual tokens, KV bytes, agreement, keyword hits."""
    with (out / 'summary.csv').open(newline='', encoding='utf-8') as file:
        return [{key: value for key, value in row.items() if '_ms' not in key and key != 'decode_tokens_per_s'}
                for row in csv.DictReader(file)]


def check_same_as_single_process(out, single_process):
    rows = read_rows(out)
    assert len({results.result_key(row) for row in rows}) == len(rows)  # nothing written twice
    assert comparable(rows) == comparable(read_rows(single_process))  # nothing lost, same greedy answers
    assert summary_counts(out) == summary_counts(single_process)
    report = (out / 'report.md').read_text(encoding='utf-8')
    assert 'Partial run' not in report
    assert '- skipped frames: 2 (listed below)' in report  # the malformed frames, read by the driver


def test_two_ray_workers_write_the_single_process_results(tmp_path, capsys, local_ray, bag, tiny_model_dir,
                                                          questions_file, single_process):
    out = tmp_path / 'ray'
    assert replay(bag, out, tiny_model_dir, questions_file, '--ray', '--workers', 2) == 0, capsys.readouterr().err
    check_same_as_single_process(out, single_process)
    run = json.loads((out / 'run.json').read_text(encoding='utf-8'))
    assert run == json.loads((single_process / 'run.json').read_text(encoding='utf-8'))
    # the workers are gone with the run; the Ray instance stays for its owner
    with pytest.raises(ValueError):
        ray.get_actor(worker_name(0), namespace=WORKER_NAMESPACE)


def after_first_rows(monkeypatch, action):
    """Run `action` in the driver right after it has written its first frame's rows: the run is then
    under way, with most frames still to do (at a known point, so the test does not race the run)."""
    write = results.ResultsWriter.write
    done = []

    def write_then_act(self, rows):
        write(self, rows)
        if not done:
            done.append(True)
            action()

    monkeypatch.setattr(results.ResultsWriter, 'write', write_then_act)


def test_a_killed_worker_loses_and_duplicates_nothing(tmp_path, capsys, monkeypatch, local_ray, bag, tiny_model_dir,
                                                      questions_file, single_process):
    out = tmp_path / 'ray'
    # worker 1: worker 0 also answers the driver's question about the engine, before any frame
    after_first_rows(monkeypatch, lambda: ray.kill(ray.get_actor(worker_name(1), namespace=WORKER_NAMESPACE)))
    status = replay(bag, out, tiny_model_dir, questions_file, '--ray', '--workers', 2)
    stderr = capsys.readouterr().err
    assert status == 0, stderr
    assert f'Ray worker {worker_name(1)} died' in stderr and 'run again on another worker' in stderr
    check_same_as_single_process(out, single_process)


def test_an_interrupted_ray_run_is_resumed_by_either_mode(tmp_path, capsys, monkeypatch, local_ray, bag, tiny_model_dir,
                                                          questions_file, single_process):
    out = tmp_path / 'ray'
    # Ctrl-C: the KeyboardInterrupt Python raises in the driver's main thread on SIGINT

    def interrupt():
        raise KeyboardInterrupt

    after_first_rows(monkeypatch, interrupt)
    assert replay(bag, out, tiny_model_dir, questions_file, '--ray', '--workers', 2) == EXIT_INTERRUPTED
    monkeypatch.undo()
    stderr = capsys.readouterr().err
    partial = read_rows(out)
    assert 0 < len(partial) < len(read_rows(single_process)), stderr
    assert 'interrupted before the end of the selection' in (out / 'report.md').read_text(encoding='utf-8')

    # a single-process --resume continues the Ray run's results ...
    single_out = tmp_path / 'single'
    single_out.mkdir()
    for name in ('results.jsonl', 'run.json'):
        (single_out / name).write_bytes((out / name).read_bytes())
    assert replay(bag, single_out, tiny_model_dir, questions_file, '--resume') == 0
    check_same_as_single_process(single_out, single_process)
    # ... and so does a Ray --resume, doing only the frames not yet written
    assert replay(bag, out, tiny_model_dir, questions_file, '--resume', '--ray', '--workers', 2) == 0
    assert read_rows(out)[:len(partial)] == partial
    check_same_as_single_process(out, single_process)
