"""vlm_replay --ray on a local Ray instance (loopback only, 2 CPUs, one instance for the module): the
driver writes the single-process run's rows, every Ray process listens on loopback only, a killed worker
loses and duplicates nothing, an interrupted Ray run is resumed by either mode, and two bags are
evaluated in one run by both modes.

`ray` is imported through the `local_ray` fixture, after ``connect`` has set Ray up for this machine only
(Ray reads that setting when it is imported)."""
import csv
import json

import psutil
import pytest

from zip_vlm_ros.replay import cli, results
from zip_vlm_ros.replay.offline import BAG_REPORTS_DIR, EXIT_INTERRUPTED
from zip_vlm_ros.replay.ray_fleet import LOOPBACK_ADDRESSES, WORKER_NAMESPACE, WorkerPool, connect, worker_name
from zip_vlm_ros.tools import sample_bag

MAX_NEW_TOKENS = '4'
BUDGETS = 'full,4'
FRAMES_PER_TOPIC = 3


@pytest.fixture(scope='module')
def local_ray():
    """One local Ray instance for the module (the `ray` module); vlm_replay --ray uses the instance it
    finds initialised."""
    assert connect('local', workers=2, gpus_per_worker=None)
    import ray

    assert ray.cluster_resources().get('CPU') >= 2
    yield ray
    ray.shutdown()


@pytest.fixture(scope='module')
def bags_dir(tmp_path_factory):
    return tmp_path_factory.mktemp('bags')


@pytest.fixture(scope='module')
def bag(bags_dir):
    return sample_bag.write_sample_bag(bags_dir / 'mcap', storage='mcap', frames_per_topic=FRAMES_PER_TOPIC,
                                       with_bad_frames=True)


@pytest.fixture(scope='module')
def second_bag(bags_dir, bag):
    """A second drive next to `bag` (so `bags_dir` is a folder of two bags): sqlite3, other frame times,
    the same topics and frame indices as `bag`, so only the bag tells their frames apart."""
    return sample_bag.write_sample_bag(bags_dir / 'drive_2', storage='sqlite3', frames_per_topic=3,
                                       start_ns=sample_bag.DEFAULT_START_NS + 3600 * 10**9)


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


def listening_sockets() -> list[tuple[str, str, int]]:
    """(process name, address, port) of every socket this process and its descendants (the Ray
    instance's GCS, raylet, workers and agents) listen on: TCP listeners and bound UDP sockets."""
    sockets = []
    for process in [psutil.Process()] + psutil.Process().children(recursive=True):
        try:
            name, connections = process.name(), process.net_connections(kind='inet')
        except psutil.NoSuchProcess:
            continue
        sockets += [(name, connection.laddr.ip, connection.laddr.port) for connection in connections
                    if connection.status == psutil.CONN_LISTEN or (connection.laddr and not connection.raddr
                                                                   and connection.type == 2)]  # 2: UDP
    return sockets


def test_two_ray_workers_write_the_single_process_results_listening_on_loopback_only(
        tmp_path, capsys, monkeypatch, local_ray, bag, tiny_model_dir, questions_file, single_process):
    out = tmp_path / 'ray'
    seen = []
    # Mid-run, when the workers (and what Ray starts for them) are up.
    after_first_rows(monkeypatch, lambda: seen.extend(listening_sockets()))
    assert replay(bag, out, tiny_model_dir, questions_file, '--ray', '--workers', 2) == 0, capsys.readouterr().err
    check_same_as_single_process(out, single_process)
    run = json.loads((out / 'run.json').read_text(encoding='utf-8'))
    assert run == json.loads((single_process / 'run.json').read_text(encoding='utf-8'))
    # the workers are gone with the run; the Ray instance stays for its owner
    with pytest.raises(ValueError):
        local_ray.get_actor(worker_name(0), namespace=WORKER_NAMESPACE)
    names = {name for name, _, _ in seen}
    assert {'gcs_server', 'raylet'} <= names, seen  # the listing sees the Ray instance's own processes
    assert sum(name.startswith('ray::') for name, _, _ in seen) >= 2, seen  # and the workers
    # IPv6 sockets of dual-stack servers show an IPv4 loopback address as ::ffff:127.0.0.1
    assert [s for s in seen if s[1].removeprefix('::ffff:') not in LOOPBACK_ADDRESSES] == []


def kill_before_its_second_task(monkeypatch, ray, index: int) -> None:
    """Kill worker `index` when the driver is about to hand it its second task, and wait until Ray has
    it dead: its first task may still be running, and its second is then certain to reach a dead worker
    (killing it after some rows are written instead would race the workers: a worker that has already
    finished its tasks dies with nothing to lose)."""
    submit = WorkerPool.submit
    given = []

    def kill_then_submit(self, task):
        if self.least_loaded() == index:
            given.append(task)
            if len(given) == 2:
                actor = self.actors[index]
                ray.kill(actor)
                while True:  # an idle worker may answer a call or two before the kill lands
                    try:
                        ray.get(actor.facts.remote(), timeout=60)
                    except ray.exceptions.RayActorError:
                        break
        submit(self, task)

    monkeypatch.setattr(WorkerPool, 'submit', kill_then_submit)


def test_a_killed_worker_loses_and_duplicates_nothing(tmp_path, capsys, monkeypatch, local_ray, bag, tiny_model_dir,
                                                      questions_file, single_process):
    out = tmp_path / 'ray'
    kill_before_its_second_task(monkeypatch, local_ray, 1)
    status = replay(bag, out, tiny_model_dir, questions_file, '--ray', '--workers', 2, '--frames-per-task', 1)
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
    assert replay(bag, out, tiny_model_dir, questions_file, '--ray', '--workers', 2, '--frames-per-task', 2) == (
        EXIT_INTERRUPTED)
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


def test_two_bags_in_one_run_in_both_modes(tmp_path, capsys, local_ray, bags_dir, bag, second_bag, tiny_model_dir,
                                           questions_file, single_process):
    single_out, ray_out = tmp_path / 'single', tmp_path / 'ray'
    assert cli.main([str(arg) for arg in (bag.path, second_bag.path, '--out', single_out, '--model', tiny_model_dir,
                                          '--budgets', BUDGETS, '--questions', questions_file, '--max-new-tokens',
                                          MAX_NEW_TOKENS)]) == 0, capsys.readouterr().err
    # the folder holding both bags, on Ray
    assert cli.main([str(arg) for arg in (bags_dir, '--out', ray_out, '--model', tiny_model_dir, '--budgets', BUDGETS,
                                          '--questions', questions_file, '--max-new-tokens', MAX_NEW_TOKENS,
                                          '--ray', '--workers', 2)]) == 0, capsys.readouterr().err
    rows = read_rows(single_out)
    assert {row['bag'] for row in rows} == {'mcap', 'drive_2'}
    # the first bag's frames answer as when it runs alone; the second bag's frames share its topics and
    # indices, and are kept apart by the bag alone
    assert comparable([row for row in rows if row['bag'] == 'mcap']) == comparable(read_rows(single_process))
    assert len([row for row in rows if row['bag'] == 'drive_2']) == 2 * 3 * 2 * 2  # topics, frames, budgets, prompts
    for out in (single_out, ray_out):
        assert comparable(read_rows(out)) == comparable(rows)
        assert len({results.result_key(row) for row in read_rows(out)}) == len(rows)
        overall = summary_counts(out)
        per_bag = {label: summary_counts(out / BAG_REPORTS_DIR / label) for label in ('mcap', 'drive_2')}
        assert per_bag['mcap'] == summary_counts(single_process)
        for position, summary in enumerate(overall):
            assert int(summary['answers']) == sum(int(of_bag[position]['answers']) for of_bag in per_bag.values())
        report = (out / 'report.md').read_text(encoding='utf-8')
        # (the folder lists its bags by name: drive_2 first on Ray)
        assert '2 bags (per-bag reports in `bags/`): ' in report
        assert f'`mcap` {2 * FRAMES_PER_TOPIC} frames' in report and '`drive_2` 6 frames' in report
        for label in ('mcap', 'drive_2'):
            assert (out / BAG_REPORTS_DIR / label / 'report.html').is_file()
            bag_report = (out / BAG_REPORTS_DIR / label / 'report.md').read_text(encoding='utf-8')
            assert f'mode: offline, bag `{bags_dir / label}`' in bag_report
