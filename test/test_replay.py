"""vlm_replay: offline evaluation of real bags with a real (tiny, random) LLaVA, and live replay into a
node process. Report numbers are recomputed here from results.jsonl and compared with the outputs."""
import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import sacrebleu
from rouge_score.rouge_scorer import RougeScorer

from zip_vlm_ros.tools import sample_bag
from zip_vlm_ros.replay import bag as replay_bag
from zip_vlm_ros.replay import cli, inputs, metrics, results
from zip_vlm_ros.replay.report import format_stamp
from zip_vlm_ros.tools.sample_bag import COMPRESSED_TOPIC, RAW_TOPIC

# Few tokens and frames keep each replay to seconds on 2 CPU cores.
MAX_NEW_TOKENS = '4'
TINY_BUDGETS = 'full,8,4'


# ----------------------------------------------------------------------------------------------------
# Pure parts: budgets, questions, metrics, results.jsonl


def test_parse_budgets_keeps_order_and_rejects_nonsense():
    assert inputs.parse_budgets('full, 192,128,064') == ['full', '192', '128', '64']
    for bad in ('full,0', 'full,-3', 'full,abc', '64,64', ''):
        with pytest.raises(inputs.ReplayError) as error:
            inputs.parse_budgets(bad)
        assert '\n' not in str(error.value)


def write(path, text):
    path.write_text(text, encoding='utf-8')
    return path


def test_questions_file_is_validated_with_clear_messages(tmp_path):
    good = write(tmp_path / 'q.yaml', '- question: Is there a cat?\n  expect: [cat, kitten]\n'
                                      '- question: What colour is the sky?\n')
    assert inputs.load_questions(good) == [inputs.Question('Is there a cat?', ('cat', 'kitten')),
                                           inputs.Question('What colour is the sky?', ())]
    cases = {
        'missing.yaml': (None, 'does not exist'),
        'syntax.yaml': ('- question: [unclosed\n', 'not valid YAML at line'),
        'empty.yaml': ('', 'non-empty YAML list'),
        'mapping.yaml': ('question: Is there a cat?\n', 'got a dict'),
        'string_item.yaml': ('- Is there a cat?\n', 'item 1 is a str'),
        'unknown_key.yaml': ('- question: Is there a cat?\n  expected: [cat]\n', 'unknown key(s) expected'),
        'blank.yaml': ('- question: "  "\n', '"question" must be a non-empty string'),
        'expect_str.yaml': ('- question: Is there a cat?\n  expect: cat\n', '"expect" must be a list'),
        'duplicate.yaml': ('- question: A?\n- question: A?\n', 'item 2 repeats the question'),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name if text is None else write(tmp_path / name, text)
        with pytest.raises(inputs.ReplayError) as error:
            inputs.load_questions(path)
        assert message in str(error.value), name
        assert str(path) in str(error.value) and '\n' not in str(error.value)


def test_agreement_metrics_on_hand_computed_cases():
    assert metrics.answer_tokens('A red car, parked.') == ['a', 'red', 'car', 'parked']
    assert metrics.exact_match('A red car.', 'a  red CAR')
    assert not metrics.exact_match('a red car', 'a blue car')
    # 2 of 3 tokens shared both ways: precision = recall = 2/3
    assert metrics.token_f1('a red car', 'a blue car') == pytest.approx(2 / 3)
    # answer 'red red' vs 'red car': overlap counts 'red' once -> p = 1/2, r = 1/2
    assert metrics.token_f1('red red', 'red car') == pytest.approx(0.5)
    assert metrics.token_f1('', '') == 1.0 and metrics.token_f1('car', '') == 0.0
    assert metrics.keyword_hit('There is a black cat.', ['dog', 'cat'])
    assert metrics.keyword_hit('a traffic light ahead', ['traffic light'])
    assert not metrics.keyword_hit('a category error', ['cat'])  # whole words only


def test_truncated_last_line_is_dropped_and_cut_from_the_file(tmp_path):
    path = tmp_path / 'results.jsonl'
    row = {'topic': '/a', 'index': 0, 'stamp_ns': 1, 'budget': 'full', 'prompt': 'p'}
    path.write_text(json.dumps(row) + '\n' + json.dumps(dict(row, index=1))[:20], encoding='utf-8')
    assert results.load_results(path) == [row]
    assert path.read_text(encoding='utf-8') == json.dumps(row) + '\n'

    path.write_text(json.dumps(row) + '\nnot json\n' + json.dumps(row) + '\n', encoding='utf-8')
    with pytest.raises(inputs.ReplayError, match='line 2 is not valid JSON'):
        results.load_results(path)


def test_frame_selector_every_period_and_max_frames():
    every = replay_bag.FrameSelector(every=2)
    assert [every.wants('/a', t) for t in range(5)] == [True, False, True, False, True]

    period = replay_bag.FrameSelector(period_s=0.25, max_frames=2)
    wanted = []
    for log_ns in range(0, 1_000_000_000, 100_000_000):  # 10 Hz for one second
        if period.wants('/a', log_ns):
            wanted.append(log_ns)
            period.accept('/a', log_ns)
    assert wanted == [0, 300_000_000]  # 0.3 s is the first frame >= 0.25 s later; then max_frames


# ----------------------------------------------------------------------------------------------------
# Offline replay with the tiny model


@pytest.fixture(scope='module')
def bags(tmp_path_factory):
    """The sample bag in both storage formats, with malformed frames."""
    root = tmp_path_factory.mktemp('bags')
    return {storage: sample_bag.write_sample_bag(root / storage, storage=storage, frames_per_topic=3,
                                                 with_bad_frames=True)
            for storage in sample_bag.STORAGE_FORMATS}


@pytest.fixture(scope='module')
def questions_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('questions') / 'questions.yaml'
    path.write_text('- question: Is there a person?\n  expect: [yes, person]\n'
                    '- question: What is on the table?\n', encoding='utf-8')
    return path


def run_replay(*argv):
    """vlm_replay in this process (the engine loads in a second, and errors show in capsys)."""
    return cli.main([str(arg) for arg in argv])


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding='utf-8').splitlines()]


def read_summary(path):
    with path.open(newline='', encoding='utf-8') as file:
        return {row['budget']: row for row in csv.DictReader(file)}


def report_table_row(report: str, section: str, budget: str) -> list[str]:
    """Cells of the row for `budget` in the table under `## section` of report.md."""
    table = report.split(f'## {section}\n', 1)[1].split('\n## ', 1)[0]
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip('|').split('|')]
        if cells[0] == budget:
            return cells
    raise AssertionError(f'no row for budget {budget} under {section}')


def pair(p50, p95):
    return f'{p50:.1f} / {p95:.1f}'


def check_outputs_match_results(out_dir, budgets):
    """Recompute the per-budget numbers from results.jsonl and compare with summary.csv and report.md."""
    rows = read_jsonl(out_dir / 'results.jsonl')
    summary = read_summary(out_dir / 'summary.csv')
    report = (out_dir / 'report.md').read_text(encoding='utf-8')
    assert list(summary) == budgets
    reference = {(row['topic'], row['index'], row['prompt']): row['text'] for row in rows if row['budget'] == 'full'}
    for budget in budgets:
        budget_rows = [row for row in rows if row['budget'] == budget]
        # fresh: the description that computed the frame's prefix
        fresh = [row for row in budget_rows if row['kind'] == 'describe' and not row['prefix_reused']]
        s = summary[budget]
        cells = report_table_row(report, 'Per budget', budget)
        assert int(s['answers']) == len(budget_rows) and cells[4] == s['answers']
        assert int(s['frames']) == len({(row['topic'], row['index']) for row in budget_rows}) == len(fresh)
        for field, column in (('vision_ms', 5), ('prefill_ms', 6), ('ttft_ms', 7), ('total_ms', 8)):
            values = [row[field] for row in fresh]
            p50, p95 = np.percentile(values, 50), np.percentile(values, 95)
            assert float(s[f'{field}_p50']) == pytest.approx(p50) and float(s[f'{field}_p95']) == pytest.approx(p95)
            assert cells[column] == pair(p50, p95)
        kv = np.mean([row['kv_cache_bytes'] for row in fresh])
        assert float(s['kv_cache_bytes_per_frame']) == pytest.approx(kv) and cells[11] == f'{kv / 1e6:.3f}'
        decode_tokens = sum(row['generated_tokens'] - 1 for row in budget_rows)
        assert float(s['decode_tokens_per_s']) == pytest.approx(
            decode_tokens / (sum(row['decode_ms'] for row in budget_rows) / 1000))

        pairs = [(row['text'], reference[(row['topic'], row['index'], row['prompt'])]) for row in budget_rows]
        exact = np.mean([metrics.exact_match(a, b) for a, b in pairs])
        f1 = np.mean([metrics.token_f1(a, b) for a, b in pairs])
        assert int(s['agreement_pairs']) == len(budget_rows)
        assert float(s['exact_match_rate']) == pytest.approx(exact)
        assert float(s['token_f1_mean']) == pytest.approx(f1)
        # ROUGE-L and BLEU straight from the packages, not through vlm_replay's wrappers
        rouge = np.mean([RougeScorer(['rougeL']).score(b, a)['rougeL'].fmeasure for a, b in pairs])
        bleu = sacrebleu.corpus_bleu([a for a, _ in pairs], [[b for _, b in pairs]]).score
        assert float(s['rouge_l_mean']) == pytest.approx(rouge) and float(s['bleu']) == pytest.approx(bleu)
        if budget == 'full':
            assert exact == f1 == rouge == 1.0 and bleu == pytest.approx(100.0)
            assert cells[12:16] == ['reference'] * 4
        else:
            assert cells[12:16] == [f'{exact:.3f} ({len(pairs)})', f'{f1:.3f}', f'{rouge:.3f}', f'{bleu:.1f}']
        with_keywords = [row for row in budget_rows if row['expect']]
        if with_keywords:
            hits = np.mean([metrics.keyword_hit(row['text'], row['expect']) for row in with_keywords])
            assert float(s['keyword_hit_rate']) == pytest.approx(hits)
            assert cells[16] == f'{hits:.3f} ({len(with_keywords)})'
        else:
            assert s['keyword_hit_rate'] == '' and cells[16] == '—'
    for plot in ('latency_vs_budget.png', 'agreement_vs_budget.png'):
        data = (out_dir / plot).read_bytes()
        assert data.startswith(b'\x89PNG\r\n\x1a\n') and len(data) > 5000
    return rows, summary, report


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
def test_offline_replay_reports_what_results_jsonl_holds(tmp_path, capsys, bags, questions_file, tiny_model_dir,
                                                         storage):
    out = tmp_path / 'out'
    status = run_replay(bags[storage].path, '--out', out, '--model', tiny_model_dir, '--budgets', TINY_BUDGETS,
                        '--questions', questions_file, '--max-new-tokens', MAX_NEW_TOKENS, '--max-frames', 2,
                        '--topics', RAW_TOPIC, COMPRESSED_TOPIC)
    stderr = capsys.readouterr().err
    assert status == 0, stderr
    # tqdm's bar: 2 frames x 2 topics x 3 budgets, the malformed frames never counted in its total
    assert '| 12/12 [' in stderr and '/13 [' not in stderr and '/18 [' not in stderr
    # warnings are written above the bar (tqdm.write), each on a line of its own
    screen_lines = stderr.replace('\r', '\n').splitlines()
    assert sum(line.startswith('vlm_replay: warning: skipped ') for line in screen_lines) == 2

    rows, summary, report = check_outputs_match_results(out, ['full', '8', '4'])
    prompts = ['Describe the scene in one sentence.', 'Is there a person?', 'What is on the table?']
    # 2 topics x 2 frames x 3 budgets x 3 prompts, every key once
    assert len(rows) == 36 and len({results.result_key(row) for row in rows}) == 36
    good = bags[storage].good_frame_stamps
    assert {(row['topic'], row['stamp_ns']) for row in rows} == {
        (topic, stamp) for topic in (RAW_TOPIC, COMPRESSED_TOPIC) for stamp in good[topic][:2]}
    # frame identity is the index in the topic: the bad frame (index 1) sits between good frames 0 and 2
    assert {(row['topic'], row['index']) for row in rows} == {
        (topic, index) for topic in (RAW_TOPIC, COMPRESSED_TOPIC) for index in (0, 2)}
    for row in rows:
        # one generate_many per frame and budget: the description computes the prefix, questions reuse it
        assert row['prefix_reused'] == (row['prompt'] != prompts[0])
        assert row['visual_tokens'] == {'full': 16, '8': 8, '4': 4}[row['budget']]
        assert row['reduction'] == ('none' if row['budget'] == 'full' else 'visionzip')
        assert row['generated_tokens'] <= int(MAX_NEW_TOKENS)
    assert [summary[b]['visual_tokens'] for b in summary] == ['16.0', '8.0', '4.0']

    # the malformed frames are skipped, counted and listed with their reasons
    assert '- skipped frames: 2 (listed below)' in report
    skipped = report.split('## Skipped frames\n', 1)[1].split('\n## ', 1)[0]
    bad = {frame.topic: frame for frame in bags[storage].bad_frames}
    assert f'| {RAW_TOPIC} | 1 | {format_stamp(bad[RAW_TOPIC].stamp_ns)} | image data is' in skipped
    assert f'| {COMPRESSED_TOPIC} | 1 | {format_stamp(bad[COMPRESSED_TOPIC].stamp_ns)} | compressed image' in skipped
    assert 'Partial run' not in report
    assert 'The agreement reference is the `full` budget (16 visual tokens)' in report
    assert 'budget(s) full, 8, 4 have fewer than 20 fresh answers' in report



def test_resume_does_only_new_work_and_survives_a_truncated_line(tmp_path, capsys, bags, tiny_model_dir):
    out = tmp_path / 'out'
    # The engine settings come from a node params file, as the node would read them.
    params = write(tmp_path / 'vlm.yaml', f'/**:\n  ros__parameters:\n    model: {tiny_model_dir}\n'
                                          f'    max_new_tokens: {MAX_NEW_TOKENS}\n    describe_prompt: What is ahead?\n'
                                          f'    token_budget: 8\n')
    common = [bags['mcap'].path, '--out', out, '--params-file', params, '--budgets', 'full,4', '--topics', RAW_TOPIC]
    assert run_replay(*common, '--max-frames', 1) == 0
    first = (out / 'results.jsonl').read_text(encoding='utf-8').splitlines()
    assert len(first) == 2  # 1 frame x 2 budgets x the description
    assert {json.loads(line)['prompt'] for line in first} == {'What is ahead?'}
    assert json.loads((out / 'run.json').read_text(encoding='utf-8'))['max_new_tokens'] == int(MAX_NEW_TOKENS)

    # Without --resume an existing run is never overwritten.
    capsys.readouterr()
    assert run_replay(*common, '--max-frames', 2) == 1
    assert 'pass --resume' in capsys.readouterr().err

    # A run killed while writing leaves half a line: it is dropped and that work is done again.
    (out / 'results.jsonl').write_text(first[0] + '\n' + first[1][:40], encoding='utf-8')
    assert run_replay(*common, '--max-frames', 2, '--resume') == 0
    stderr = capsys.readouterr().err
    assert 'dropped the incomplete last line' in stderr
    assert '3 new answers (1 from earlier runs)' in stderr  # the cut row + frame 2 at both budgets
    rows = read_jsonl(out / 'results.jsonl')
    assert (out / 'results.jsonl').read_text(encoding='utf-8').splitlines()[0] == first[0]
    assert sorted((row['stamp_ns'], row['budget']) for row in rows) == sorted(
        (stamp, budget) for stamp in bags['mcap'].good_frame_stamps[RAW_TOPIC][:2] for budget in ('full', '4'))
    check_outputs_match_results(out, ['full', '4'])

    # Greedy answers do not depend on the run: a fresh run gives the same texts.
    again = tmp_path / 'again'
    assert run_replay(*common[:2], again, *common[3:], '--max-frames', 2) == 0
    texts = lambda path: {results.result_key(row): row['text'] for row in read_jsonl(path / 'results.jsonl')}
    assert texts(again) == texts(out)

    # Resuming with settings that change the answers is refused (the command line overrides the file).
    assert run_replay(*common, '--max-frames', 2, '--resume', '--max-new-tokens', 2) == 1
    assert 'max_new_tokens was 4 and is now 2' in one_line_error(capsys)


def one_line_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith('vlm_replay: error: ')]
    assert len(errors) == 1, lines
    return errors[0]


def test_bad_bags_and_arguments_fail_with_clear_messages(tmp_path, capsys, bags, questions_file):
    bag = bags['sqlite3'].path
    out = tmp_path / 'out'
    model = tmp_path / 'no-model'  # never loaded: every case fails before the engine
    cases = [
        ([tmp_path / 'missing', '--out', out, '--model', model], 'bag {tmp}/missing does not exist'),
        ([tmp_path, '--out', out, '--model', model], 'is a directory without .mcap or .db3 storage files'),
        ([questions_file, '--out', out, '--model', model], 'is not a .mcap or .db3 file'),
        ([bag, '--out', out, '--model', model, '--topics', '/nope'],
         f'topic /nope is not in the bag; image topics in {bag}: {RAW_TOPIC} (sensor_msgs/msg/Image, 4 messages), '
         f'{COMPRESSED_TOPIC} (sensor_msgs/msg/CompressedImage, 4 messages)'),
        ([bag, '--out', out, '--model', model, '--topics', sample_bag.CAMERA_INFO_TOPIC],
         f'topic {sample_bag.CAMERA_INFO_TOPIC} is sensor_msgs/msg/CameraInfo, not an image; image topics in'),
        ([bag, '--out', out], '--model is required for offline replay'),
        # a valid topic next to a mistyped one must not quietly evaluate only half
        ([bag, '--out', out, '--model', model, '--topics', RAW_TOPIC, '/camera/left/image_raw'],
         'topic /camera/left/image_raw is not in the bag; image topics in'),
        ([bag, '--out', out, '--model', model, '--budgets', 'full,0'], 'is not "full" or a positive'),
        ([bag, '--out', out, '--model', model, '--budgets', 'full,\u00b2'], "budget '\u00b2' in --budgets"),
        ([bag, '--out', out, '--model', model, '--questions', tmp_path / 'q.yaml'], 'questions file'),
        ([bag, '--out', out, '--live', '--every', 2], '--every applies to offline replay'),
        ([bag, '--out', out, '--params-file', questions_file], 'has no "/**:" or "zip_vlm:" section'),
        ([bag, '--out', out, '--model', model, '--dominant-ratio', 1.5], 'dominant_ratio 1.5 is out of range'),
    ]
    for argv, message in cases:
        assert run_replay(*argv) == 1, argv
        assert message.format(tmp=tmp_path) in one_line_error(capsys), argv

    not_mcap = write(tmp_path / 'notes.mcap', 'not a recording')
    assert run_replay(not_mcap, '--out', out, '--model', model) == 1
    assert f'cannot read bag {not_mcap} (notes.mcap does not start with the mcap magic bytes)' in one_line_error(capsys)
    assert not (out / 'results.jsonl').exists()


def test_missing_model_and_all_frames_malformed(tmp_path, capsys, tiny_model_dir):
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    typestore = get_typestore(Stores.ROS2_KILTED)
    Image = typestore.types['sensor_msgs/msg/Image']
    Header = typestore.types['std_msgs/msg/Header']
    Time = typestore.types['builtin_interfaces/msg/Time']
    bag = tmp_path / 'broken'
    with Writer(bag, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        connection = writer.add_connection('/cam/image_raw', 'sensor_msgs/msg/Image', typestore=typestore)
        for index, encoding in enumerate(['rgb8', '32FC1']):  # short data, then an encoding no decoder has
            message = Image(header=Header(stamp=Time(sec=10 + index, nanosec=0), frame_id='cam'), height=4, width=4,
                            encoding=encoding, is_bigendian=0, step=12, data=np.zeros(12, dtype=np.uint8))
            writer.write(connection, (10 + index) * 10**9, typestore.serialize_cdr(message, 'sensor_msgs/msg/Image'))

    assert run_replay(bag, '--out', tmp_path / 'x', '--model', tmp_path / 'no-model') == 1
    assert 'no-model' in one_line_error(capsys)

    out = tmp_path / 'out'
    assert run_replay(bag, '--out', out, '--model', tiny_model_dir, '--budgets', 'full') == 1
    stderr = capsys.readouterr().err
    assert 'no frame of /cam/image_raw could be evaluated' in stderr
    report = (out / 'report.md').read_text(encoding='utf-8')
    assert '- skipped frames: 2 (listed below)' in report
    assert '| /cam/image_raw | 0 | 10.000000000 | image data is 12 bytes' in report
    assert "| /cam/image_raw | 1 | 11.000000000 | image encoding '32FC1' is not supported" in report
    assert (out / 'results.jsonl').read_text(encoding='utf-8') == ''


# ----------------------------------------------------------------------------------------------------
# Live replay into a node process


def write_twin_bag(path, count=3):
    """One camera recorded twice, as drivers with image_transport do: a raw and a jpeg copy of each photo
    with the same header stamp, the raw copy logged just after the jpeg."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    typestore = get_typestore(Stores.ROS2_KILTED)
    Image, CompressedImage, Header, Time = (typestore.types[name] for name in (
        'sensor_msgs/msg/Image', 'sensor_msgs/msg/CompressedImage', 'std_msgs/msg/Header',
        'builtin_interfaces/msg/Time'))
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        raw = writer.add_connection(RAW_TOPIC, 'sensor_msgs/msg/Image', typestore=typestore)
        jpeg = writer.add_connection(COMPRESSED_TOPIC, 'sensor_msgs/msg/CompressedImage', typestore=typestore)
        for index in range(count):
            stamp_ns = sample_bag.DEFAULT_START_NS + index * 10**8
            rgb = sample_bag.sample_image(index)[:240, :320]
            header = Header(stamp=Time(sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9), frame_id='cam')
            compressed = CompressedImage(header=header, format='jpeg',
                                         data=np.frombuffer(sample_bag.encode_jpeg(rgb), dtype=np.uint8))
            image = Image(header=header, height=240, width=320, encoding='rgb8', is_bigendian=0, step=960,
                          data=np.ascontiguousarray(rgb).reshape(-1))
            writer.write(jpeg, stamp_ns, typestore.serialize_cdr(compressed, 'sensor_msgs/msg/CompressedImage'))
            writer.write(raw, stamp_ns + 10**6, typestore.serialize_cdr(image, 'sensor_msgs/msg/Image'))
    return path


def live_replay(bag, out, *argv):
    return subprocess.run([sys.executable, '-m', 'zip_vlm_ros.replay', str(bag), '--live', '--out', str(out), '--clock',
                           '--wait', '60', *map(str, argv)], capture_output=True, text=True, timeout=240)


def test_live_replay_into_a_running_node(tmp_path, tiny_model_dir, questions_file):
    from zip_vlm_ros.client import NodeProcess

    bag = sample_bag.write_sample_bag(tmp_path / 'bag', storage='mcap', frames_per_topic=5)
    twins = write_twin_bag(tmp_path / 'twins')
    node = NodeProcess({
        'model': str(tiny_model_dir), 'cameras': ['front', 'rear'],
        'camera.front.topic': '/robot/front/image', 'camera.front.type': 'sensor_msgs/Image',
        'camera.rear.topic': COMPRESSED_TOPIC, 'camera.rear.type': 'sensor_msgs/CompressedImage',
        # bag stamps are from 2023: the node ages frames on the bag clock that replay publishes
        'use_sim_time': True, 'image_qos': 'reliable', 'token_budget': 8, 'max_new_tokens': int(MAX_NEW_TOKENS),
        # max_pending_requests stays at its default (4): fewer than the 8 calls of a round
    }, tmp_path / 'node.log')
    out, twins_out, impatient_out = tmp_path / 'live', tmp_path / 'twins_live', tmp_path / 'impatient'
    try:
        replay_run = live_replay(bag.path, out, '--remap', f'{RAW_TOPIC}:=/robot/front/image', '--camera', 'front',
                                 '--rate', '0.5', '--period', '0.12', '--budgets', 'full,12,8,4',
                                 '--questions', questions_file)
        # Raw and jpeg copies share stamps; the node's rear camera listens to the jpeg topic only.
        twins_run = live_replay(twins, twins_out, '--remap', f'{RAW_TOPIC}:=/robot/front/image', '--camera', 'rear',
                                '--period', '0.1', '--budgets', '4')
        # Calls unanswered within --timeout count as timed out; with no answer at all the exit status is 1.
        impatient = live_replay(bag.path, impatient_out, '--topics', COMPRESSED_TOPIC, '--camera', 'rear',
                                '--period', '0.2', '--budgets', '4', '--timeout', '0.001')
        assert node.alive(), node.log()
    finally:
        node_status = node.stop()
    assert replay_run.returncode == 0, replay_run.stderr + node.log()
    assert twins_run.returncode == 0, twins_run.stderr + node.log()
    assert node_status == 0, node.log()
    check_paced_live_run(bag, out)

    twin_rows = [row for row in read_jsonl(twins_out / 'results.jsonl') if row['status'] == 'ok']
    assert twin_rows and all(row['camera'] == 'rear' and row['topic'] == COMPRESSED_TOPIC for row in twin_rows)
    assert all(row['stamp_ns'] == sample_bag.DEFAULT_START_NS + row['index'] * 10**8 for row in twin_rows)

    assert impatient.returncode == 1, impatient.stderr
    impatient_summary = read_summary(impatient_out / 'summary.csv')['4']
    assert int(impatient_summary['requests']) == 2 and int(impatient_summary['answers']) == 0
    assert int(impatient_summary['timed_out']) + int(impatient_summary['refused']) == 2
    assert int(impatient_summary['timed_out']) >= 1 and int(impatient_summary['rounds_answered']) == 0
    assert '| timeout | ' in (impatient_out / 'report.md').read_text(encoding='utf-8')


def check_paced_live_run(bag, out):
    """Four budgets with the node's default queue: every budget answers every round, on the same frame."""
    rows = read_jsonl(out / 'results.jsonl')
    report = (out / 'report.md').read_text(encoding='utf-8')
    summary = read_summary(out / 'summary.csv')
    budgets = ['full', '12', '8', '4']
    assert [row['status'] for row in rows] == ['ok'] * len(rows)
    stamps = bag.good_frame_stamps[RAW_TOPIC]
    for row in rows:
        # credited to the bag topic the node's camera listens to, and to the frame's index in it
        assert row['topic'] == RAW_TOPIC and row['camera'] == 'front' and stamps[row['index']] == row['stamp_ns']
        assert row['visual_tokens'] == {'full': 16, '12': 12, '8': 8, '4': 4}[row['budget']]
        assert 0 <= row['image_age_ms'] < 10_000  # bag time at the answer minus the frame's stamp
    rounds = sorted({row['round'] for row in rows})
    assert len(rounds) == 3  # the bag spans 0.45 s, asked every 0.12 s
    for round_index in rounds:
        in_round = [row for row in rows if row['round'] == round_index]
        assert {row['budget'] for row in in_round} == set(budgets)
        assert len({row['index'] for row in in_round}) == 1, in_round  # all budgets on one frame
    assert '- rounds: 3, every budget answered on the same frame in 3' in report
    assert '- frames played: /robot/front/image: 5, /camera/rear/image_raw/compressed: 5' in report
    # Reliable QoS delivers what was published once discovery is complete; the node's counters can
    # miss only frames sent while its subscription was still discovering the player.
    received = report.split('received by the node: front (/robot/front/image): ', 1)[1]
    front_received = int(received.split(',', 1)[0])
    assert len({row['index'] for row in rows}) <= front_received <= 5
    for budget in budgets:
        requests = {row['request']: row for row in rows if row['budget'] == budget}
        s = summary[budget]
        assert int(s['rounds']) == int(s['rounds_answered']) == 3
        assert int(s['requests']) == len(requests) == 2 * 3  # describe + ask_many per round
        assert int(s['refused']) == int(s['timed_out']) == 0
        latencies = [row['latency_ms'] for row in requests.values()]
        p50, p95 = np.percentile(latencies, 50), np.percentile(latencies, 95)
        assert float(s['latency_ms_p50']) == pytest.approx(p50)
        cells = report_table_row(report, 'Service calls', budget)
        assert cells[1:5] == ['3/3', '6', '0', '0'] and cells[5] == pair(p50, p95)
        assert int(s['answers']) == sum(row['budget'] == budget for row in rows) == 3 * 3


def test_offline_replay_of_a_llava_next_checkpoint(tmp_path, capsys, bags, questions_file, tiny_next_model_dir):
    out = tmp_path / 'out'
    # The offline test's amount of text, so that corpus BLEU has 4-grams to count.
    status = run_replay(bags['mcap'].path, '--out', out, '--model', tiny_next_model_dir, '--budgets', 'full,40,20',
                        '--questions', questions_file, '--max-new-tokens', MAX_NEW_TOKENS, '--max-frames', 2,
                        '--topics', RAW_TOPIC, COMPRESSED_TOPIC)
    assert status == 0, capsys.readouterr().err
    rows, summary, _ = check_outputs_match_results(out, ['full', '40', '20'])
    assert {row['budget'] for row in rows} == {'full', '40', '20'}
    for row in rows:
        # Each frame reads its own full count (aspect ratio dependent), or the budget shared by its crops.
        if row['budget'] == 'full':
            assert row['reduction'] == 'none' and row['visual_tokens'] == row['visual_tokens_full'] > 40
        else:
            assert row['reduction'] == 'visionzip' and row['visual_tokens'] <= int(row['budget'])


def test_offline_replay_of_a_llava_mini_checkpoint(tmp_path, capsys, bags, questions_file, tiny_mini_model_dir):
    out = tmp_path / 'out'
    status = run_replay(bags['mcap'].path, '--out', out, '--model', tiny_mini_model_dir, '--budgets', 'full,8',
                        '--questions', questions_file, '--max-new-tokens', MAX_NEW_TOKENS, '--max-frames', 1,
                        '--topics', RAW_TOPIC)
    assert status == 0, capsys.readouterr().err
    assert 'token budgets do not apply to LLaVA-Mini' in capsys.readouterr().err
    rows = [row for row in read_jsonl(out / 'results.jsonl') if 'reduction' in row]
    assert {row['budget'] for row in rows} == {'full', '8'}
    assert {(row['reduction'], row['visual_tokens'], row['visual_tokens_full']) for row in rows} == {('llava-mini', 1, 1)}
    # Every budget reads the same one token: the answers agree budget by budget.
    by_prompt = {}
    for row in rows:
        by_prompt.setdefault((row['topic'], row['index'], row['prompt']), set()).add(row['text'])
    assert len(by_prompt) == 3 and all(len(answers) == 1 for answers in by_prompt.values())


def test_offline_replay_of_a_qwen2_5_vl_checkpoint(tmp_path, capsys, bags, questions_file, tiny_qwen_model_dir):
    out = tmp_path / 'out'
    # max_pixels of 16 merged tokens (16 * 28 * 28): every frame of the bag is resized to at most 16 tokens.
    status = run_replay(bags['mcap'].path, '--out', out, '--model', tiny_qwen_model_dir, '--budgets', 'full,6',
                        '--reducers', 'visionzip,divprune', '--max-pixels', 16 * 28 * 28, '--questions', questions_file,
                        '--max-new-tokens', MAX_NEW_TOKENS, '--max-frames', 1, '--topics', RAW_TOPIC)
    assert status == 0, capsys.readouterr().err
    rows = [row for row in read_jsonl(out / 'results.jsonl') if 'reduction' in row]
    assert rows and all(6 < row['visual_tokens_full'] <= 16 for row in rows)
    for row in rows:
        if row['reduction'] == 'none':
            assert row['visual_tokens'] == row['visual_tokens_full']
        else:
            assert row['reduction'] in ('visionzip', 'divprune') and row['visual_tokens'] == 6
    assert {row['reduction'] for row in rows} == {'none', 'visionzip', 'divprune'}
