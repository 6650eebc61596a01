"""vlm_replay on recordings as they come off real robots: bytes overwritten mid-file, recordings cut
short, bags without metadata.yaml, several images with one stamp, a resume pointed at another bag, an
--out that cannot be written, and human labels. Bags are written with rosbags from skimage photos and
damaged on disk; the tiny random LLaVA answers."""
import json
import shutil

import numpy as np
import pytest
import sacrebleu

from zip_vlm_ros.tools import sample_bag
from zip_vlm_ros.replay import cli, inputs, metrics
from zip_vlm_ros.replay.offline import EXIT_BAG_UNREADABLE
from zip_vlm_ros.tools.sample_bag import COMPRESSED_TOPIC, RAW_TOPIC

MAX_NEW_TOKENS = '2'


def run_replay(*argv):
    return cli.main([str(arg) for arg in argv])


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding='utf-8').splitlines()]


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith('vlm_replay: error: ')]


@pytest.fixture(scope='module')
def clean_bags(tmp_path_factory):
    """The sample bag (4 good frames per camera) in both formats; tests copy it before damaging it."""
    root = tmp_path_factory.mktemp('clean')
    return {storage: sample_bag.write_sample_bag(root / storage, storage=storage, frames_per_topic=4)
            for storage in sample_bag.STORAGE_FORMATS}


def copy_bag(bag, destination):
    shutil.copytree(bag.path, destination)
    return destination, next(destination.glob('*.mcap' if bag.storage == 'mcap' else '*.db3'))


def chunk_offsets(mcap_file):
    from mcap.reader import make_reader

    with mcap_file.open('rb') as file:
        return sorted(index.chunk_start_offset for index in make_reader(file).get_summary().chunk_indexes)


def overwrite(path, offset, count=64):
    with path.open('r+b') as file:
        file.seek(offset)
        file.write(b'\xff' * count)


def offline(bag, out, model, *extra):
    return run_replay(bag, '--out', out, '--model', model, '--budgets', 'full,4', '--max-new-tokens', MAX_NEW_TOKENS,
                      *extra)


def evaluated(out):
    return {(row['topic'], row['index']) for row in read_jsonl(out / 'results.jsonl')}


def test_mcap_with_a_damaged_chunk_is_evaluated_around_it(tmp_path, capsys, clean_bags, tiny_model_dir):
    bag, mcap_file = copy_bag(clean_bags['mcap'], tmp_path / 'bag')
    first, second, _ = chunk_offsets(mcap_file)
    overwrite(mcap_file, second)  # the second chunk's header: opcode and length become garbage
    out = tmp_path / 'out'
    assert offline(bag, out, tiny_model_dir) == 0
    report = (out / 'report.md').read_text(encoding='utf-8')
    frames = evaluated(out)
    # the first and last chunks are read; the damaged one is listed, not fatal
    assert (RAW_TOPIC, 0) in frames and (COMPRESSED_TOPIC, 0) in frames and len(frames) < 8
    assert f'damaged: {mcap_file.name} bytes {second}..' in report and 'skipped to the next chunk' in report
    assert 'Partial run' not in report
    assert error_lines(capsys) == []


def test_mcap_unreadable_to_its_end_stops_with_one_line_and_a_partial_report(tmp_path, capsys, clean_bags,
                                                                               tiny_model_dir):
    bag, mcap_file = copy_bag(clean_bags['mcap'], tmp_path / 'bag')
    last = chunk_offsets(mcap_file)[-1]
    overwrite(mcap_file, last)
    out = tmp_path / 'out'
    assert offline(bag, out, tiny_model_dir) == EXIT_BAG_UNREADABLE
    errors = error_lines(capsys)
    assert len(errors) == 1 and f'reading stopped at byte {last}' in errors[0], errors
    report = (out / 'report.md').read_text(encoding='utf-8')
    assert report.count('**Partial run:**') == 1 and f'reading stopped at byte {last}' in report
    assert evaluated(out)  # the frames before the damage are in the report
    # the folder is not left half-made: a resume of the same bag is accepted and finds nothing new to do
    assert offline(bag, out, tiny_model_dir, '--resume') == EXIT_BAG_UNREADABLE


def test_mcap_cut_short_without_footer_is_evaluated_up_to_the_cut(tmp_path, capsys, clean_bags, tiny_model_dir):
    # A killed recorder: no summary, no footer, no metadata.yaml; the file ends inside the last chunk.
    bag = tmp_path / 'bag'
    bag.mkdir()
    data = next(clean_bags['mcap'].path.glob('*.mcap')).read_bytes()
    last = chunk_offsets(next(clean_bags['mcap'].path.glob('*.mcap')))[-1]
    (bag / 'cut.mcap').write_bytes(data[:last + 100])
    out = tmp_path / 'out'
    assert offline(bag, out, tiny_model_dir) == 0
    report = (out / 'report.md').read_text(encoding='utf-8')
    assert '**Partial run:** cut.mcap ends inside a chunk' in report and 'recording was cut short' in report
    assert 'no readable metadata.yaml' in report
    frames = evaluated(out)
    assert (RAW_TOPIC, 0) in frames and len(frames) < 8
    assert error_lines(capsys) == []


def test_sqlite3_with_damaged_pages_lists_them_and_evaluates_the_rest(tmp_path, capsys, clean_bags, tiny_model_dir):
    bag, db_file = copy_bag(clean_bags['sqlite3'], tmp_path / 'bag')
    page = 4096
    overwrite(db_file, page * (db_file.stat().st_size // page // 2), 2 * page)  # two pages mid-file
    out = tmp_path / 'out'
    assert offline(bag, out, tiny_model_dir) == 0
    report = (out / 'report.md').read_text(encoding='utf-8')
    skipped = report.split('## Skipped frames\n', 1)[1].split('\n## ', 1)[0]
    assert f'damaged: {db_file.name} row' in skipped
    damaged_rows = skipped.count('damaged:')
    assert len(evaluated(out)) + damaged_rows >= 7 and len(evaluated(out)) < 8
    # a lost row keeps its place in its topic: the frames after it keep the indices of an intact bag
    stamps = {topic: clean_bags['sqlite3'].good_frame_stamps[topic] for topic in (RAW_TOPIC, COMPRESSED_TOPIC)}
    assert all(stamps[row['topic']][row['index']] == row['stamp_ns'] for row in read_jsonl(out / 'results.jsonl'))
    listed = [line.split('|')[1:3] for line in skipped.splitlines() if 'damaged:' in line]
    assert all(topic.strip() in stamps and index.strip().isdigit() for topic, index in listed), listed
    assert error_lines(capsys) == []


def test_sqlite3_without_metadata_is_read_as_reindex_would(tmp_path, clean_bags, tiny_model_dir):
    bag, _ = copy_bag(clean_bags['sqlite3'], tmp_path / 'bag')
    (bag / 'metadata.yaml').unlink()
    out = tmp_path / 'out'
    assert offline(bag, out, tiny_model_dir, '--max-frames', 1) == 0
    report = (out / 'report.md').read_text(encoding='utf-8')
    assert 'as `ros2 bag reindex` would' in report
    assert evaluated(out) == {(RAW_TOPIC, 0), (COMPRESSED_TOPIC, 0)}


def write_bag(path, frames, storage='mcap'):
    """A bag of (topic, stamp_ns, rgb) raw frames, logged 10 ms apart in the given order."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    typestore = get_typestore(Stores.ROS2_KILTED)
    Image, Header, Time = (typestore.types[name] for name in
                           ('sensor_msgs/msg/Image', 'std_msgs/msg/Header', 'builtin_interfaces/msg/Time'))
    plugin = StoragePlugin.MCAP if storage == 'mcap' else StoragePlugin.SQLITE3
    with Writer(path, version=9, storage_plugin=plugin) as writer:
        connections = {}
        for number, (topic, stamp_ns, rgb) in enumerate(frames):
            if topic not in connections:
                connections[topic] = writer.add_connection(topic, 'sensor_msgs/msg/Image', typestore=typestore)
            height, width, _ = rgb.shape
            message = Image(header=Header(stamp=Time(sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9), frame_id='cam'),
                            height=height, width=width, encoding='rgb8', is_bigendian=0, step=width * 3,
                            data=np.ascontiguousarray(rgb).reshape(-1))
            writer.write(connections[topic], 10**18 + number * 10**7,
                         typestore.serialize_cdr(message, 'sensor_msgs/msg/Image'))
    return path


def test_frames_sharing_one_stamp_are_each_evaluated(tmp_path, tiny_model_dir):
    stamp = 1_700_000_000 * 10**9
    photos = [sample_bag.sample_image(index)[:160, :160] for index in range(3)]
    bag = write_bag(tmp_path / 'bag', [('/cam/image_raw', stamp, rgb) for rgb in photos])
    out = tmp_path / 'out'
    assert offline(bag, out, tiny_model_dir) == 0
    rows = read_jsonl(out / 'results.jsonl')
    assert sorted((row['index'], row['budget']) for row in rows) == [(i, b) for i in range(3) for b in ('4', 'full')]
    assert all(row['stamp_ns'] == stamp for row in rows)
    # each image computed its own prefix: a cache keyed by the stamp would have answered all three on the first
    assert not any(row['prefix_reused'] for row in rows)
    assert '- frames evaluated: /cam/image_raw: 3' in (out / 'report.md').read_text(encoding='utf-8')


def test_resume_names_what_differs_from_the_run_it_continues(tmp_path, capsys, clean_bags, tiny_model_dir):
    out = tmp_path / 'out'
    assert offline(clean_bags['mcap'].path, out, tiny_model_dir, '--max-frames', 1, '--topics', RAW_TOPIC) == 0
    rows_before = (out / 'results.jsonl').read_text(encoding='utf-8')
    other_bag = sample_bag.write_sample_bag(tmp_path / 'other', storage='mcap', frames_per_topic=2,
                                            start_ns=sample_bag.DEFAULT_START_NS + 10**9)
    cases = [
        ([other_bag.path, out, tiny_model_dir, '--max-frames', 1, '--topics', RAW_TOPIC], 'bag_files was'),
        ([clean_bags['mcap'].path, out, tiny_model_dir, '--max-frames', 1, '--topics', COMPRESSED_TOPIC],
         f'topics was {{"mcap": ["{RAW_TOPIC}"]}} and is now {{"mcap": ["{COMPRESSED_TOPIC}"]}}'),  # per bag
    ]
    for (bag, *rest), message in cases:
        capsys.readouterr()
        assert offline(bag, *rest, '--resume') == 1
        errors = error_lines(capsys)
        assert len(errors) == 1 and message in errors[0] and '--resume:' in errors[0], errors
    capsys.readouterr()
    assert run_replay(clean_bags['mcap'].path, '--out', out, '--model', tiny_model_dir, '--budgets', 'full,8',
                      '--max-new-tokens', MAX_NEW_TOKENS, '--topics', RAW_TOPIC, '--resume') == 1
    assert 'budgets was ["full", "4"] and is now ["full", "8"]' in error_lines(capsys)[0]
    assert (out / 'results.jsonl').read_text(encoding='utf-8') == rows_before  # nothing mixed in


def test_unwritable_out_is_one_line_without_traceback(tmp_path, capsys, clean_bags):
    blocker = tmp_path / 'a_file'
    blocker.write_text('x', encoding='utf-8')
    status = run_replay(clean_bags['mcap'].path, '--out', blocker / 'results', '--model', tmp_path / 'no-model')
    stderr = capsys.readouterr().err
    assert status == 1 and 'Traceback' not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith('vlm_replay: error: ')]
    assert errors == [f'vlm_replay: error: cannot write to --out {blocker / "results"} (Not a directory): choose a '
                      f'directory you can write to'], stderr


def test_labels_file_scores_each_budget_against_human_answers(tmp_path, capsys, clean_bags, tiny_model_dir):
    bag = clean_bags['mcap'].path
    questions = tmp_path / 'questions.yaml'
    questions.write_text('- question: Is there a person?\n', encoding='utf-8')
    out = tmp_path / 'out'
    common = [bag, out, tiny_model_dir, '--max-frames', 1, '--questions', questions]
    assert offline(*common) == 0
    rows = read_jsonl(out / 'results.jsonl')
    text = {(row['topic'], row['index'], row['budget'], row['kind']): row['text'] for row in rows}
    rear_stamp = clean_bags['mcap'].good_frame_stamps[COMPRESSED_TOPIC][0]
    # One label by index (the description, answered as the full budget did) and one by stamp (keywords).
    labels = tmp_path / 'labels.yaml'
    labels.write_text(
        f'- topic: {RAW_TOPIC}\n  index: 0\n  answer: {json.dumps(text[(RAW_TOPIC, 0, "full", "describe")])}\n'
        f'- topic: {COMPRESSED_TOPIC}\n  stamp: "{rear_stamp // 10**9}.{rear_stamp % 10**9:09d}"\n'
        f'  question: Is there a person?\n  keywords: [yes, person]\n', encoding='utf-8')
    capsys.readouterr()
    assert offline(*common, '--resume', '--labels', labels) == 0  # nothing to compute: labels are scored anew
    assert '0 new answers' in capsys.readouterr().err
    summary = {row['budget']: row for row in _csv_rows(out / 'summary.csv')}
    report = (out / 'report.md').read_text(encoding='utf-8')
    assert '## Against the labels' in report
    for budget in ('full', '4'):
        answer = text[(RAW_TOPIC, 0, budget, 'describe')]
        reference = text[(RAW_TOPIC, 0, 'full', 'describe')]
        s = summary[budget]
        assert int(s['label_pairs']) == 1 and int(s['label_keyword_answers']) == 1
        assert float(s['label_exact_match_rate']) == float(metrics.exact_match(answer, reference))
        assert float(s['label_bleu']) == pytest.approx(sacrebleu.corpus_bleu([answer], [[reference]]).score)
        hit = metrics.keyword_hit(text[(COMPRESSED_TOPIC, 0, budget, 'question')], ['yes', 'person'])
        assert float(s['label_keyword_hit_rate']) == float(hit)
    assert float(summary['full']['label_exact_match_rate']) == 1.0
    assert float(summary['full']['label_rouge_l_mean']) == pytest.approx(1.0)


def _csv_rows(path):
    import csv

    with path.open(newline='', encoding='utf-8') as file:
        return list(csv.DictReader(file))


def test_labels_file_is_validated_with_clear_messages(tmp_path):
    cases = {
        '- topic: /cam\n  answer: yes\n': 'give the frame by "index"',
        '- topic: /cam\n  index: 0\n  stamp: "1.5"\n  answer: yes\n': 'not both and not neither',
        '- topic: /cam\n  index: 0\n': 'neither "answer" nor "keywords"',
        '- topic: /cam\n  stamp: 1.5\n  answer: yes\n': '"stamp" 1.5 is not "sec.nanosec" text (quote it)',
        '- topic: /cam\n  index: 0\n  answer: yes\n  frame: 3\n': 'unknown key(s) frame',
    }
    for number, (text, message) in enumerate(cases.items()):
        path = tmp_path / f'labels{number}.yaml'
        path.write_text(text, encoding='utf-8')
        with pytest.raises(inputs.ReplayError) as error:
            inputs.load_labels(path)
        assert message in str(error.value) and '\n' not in str(error.value), text
    good = tmp_path / 'good.yaml'
    good.write_text('- topic: cam\n  stamp: "12.000000345"\n  question: Is it open?\n  keywords: [yes]\n',
                    encoding='utf-8')
    assert inputs.load_labels(good) == [inputs.Label('/cam', None, 12_000_000_345, 'Is it open?', None, ('yes',))]


def test_resume_after_a_cut_inside_a_frame_counts_only_descriptions_as_fresh(tmp_path, clean_bags, tiny_model_dir):
    questions = tmp_path / 'questions.yaml'
    questions.write_text('- question: Is there a person?\n- question: What is ahead?\n', encoding='utf-8')
    out = tmp_path / 'out'
    common = [clean_bags['mcap'].path, out, tiny_model_dir, '--max-frames', 1, '--topics', RAW_TOPIC,
              '--questions', questions]
    assert offline(*common) == 0
    lines = (out / 'results.jsonl').read_text(encoding='utf-8').splitlines()
    # Killed after the description and first question of the last budget: the second question is redone
    # alone, computing the prefix again; that is not what a new frame costs.
    (out / 'results.jsonl').write_text('\n'.join(lines[:-1]) + '\n', encoding='utf-8')
    assert offline(*common, '--resume') == 0
    rows = read_jsonl(out / 'results.jsonl')
    redone = rows[-1]
    assert redone['kind'] == 'question' and not redone['prefix_reused']
    summary = {row['budget']: row for row in _csv_rows(out / 'summary.csv')}
    for budget, s in summary.items():
        description = next(row for row in rows if row['budget'] == budget and row['kind'] == 'describe')
        assert int(s['frames']) == int(s['fresh_answers']) == 1
        assert float(s['total_ms_p95']) == pytest.approx(description['total_ms'])


def test_failed_requests_group_by_cause_not_by_the_numbers_in_their_messages():
    from zip_vlm_ros.replay.report import _failure_lines

    stale = "latest frame of camera 'front' is {:.2f} s old, more than max_image_age_s = 1"
    rows = [{'request': number, 'status': 'refused', 'message': stale.format(age)}
            for number, age in enumerate((1.5, 2.25, 3.75))]
    rows.append({'request': 9, 'status': 'timeout', 'message': 'no response within 60 s'})
    table = _failure_lines(rows)
    assert table[-2:] == ["| refused | 3 | latest frame of camera 'front' is # s old, more than max_image_age_s = # |",
                          '| timeout | 1 | no response within # s |']


def test_interrupted_run_writes_a_report_marked_partial(tmp_path, tiny_model_dir):
    import os
    import signal
    import subprocess
    import sys
    import time

    bag = sample_bag.write_sample_bag(tmp_path / 'bag', storage='mcap', frames_per_topic=30)
    out = tmp_path / 'out'
    # A shell without job control starts background jobs (`pytest ... &`) with SIGINT ignored, and Python
    # keeps an inherited SIG_IGN instead of raising KeyboardInterrupt: give the child the default.
    process = subprocess.Popen([sys.executable, '-m', 'zip_vlm_ros.replay', str(bag.path), '--out', str(out),
                                '--model', str(tiny_model_dir), '--budgets', 'full,8,4', '--max-new-tokens', '8'],
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    results = out / 'results.jsonl'
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (results.exists() and results.read_text(encoding='utf-8').strip()):
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGINT)  # after the first answer, long before the 180 frame-budgets are done
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    report = (out / 'report.md').read_text(encoding='utf-8')
    assert '**Partial run:** interrupted before the end of the selection; run again with --resume' in report
    assert 'Traceback' not in stderr
