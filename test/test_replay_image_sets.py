"""vlm_replay with questions over several images: topics paired by stamp and a topic's history, on a real
rosbag2 written with rosbags (the sample bag: front raw 10 Hz, rear jpeg offset by half a period)."""
import csv
import json

import pytest
from PIL import Image

from zip_vlm_ros.tools import sample_bag
from zip_vlm_ros.replay import cli, inputs
from zip_vlm_ros.tools.sample_bag import COMPRESSED_TOPIC, RAW_TOPIC

FULL = 16  # visual tokens of one tiny-preset image
PERIOD_NS = 100_000_000


@pytest.fixture(scope='module')
def bag(tmp_path_factory):
    return sample_bag.write_sample_bag(tmp_path_factory.mktemp('bags') / 'drive', storage='mcap',
                                       frames_per_topic=40)


@pytest.fixture(scope='module')
def questions_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('questions') / 'questions.yaml'
    path.write_text(
        f'- question: What do both cameras see?\n  topics: [{RAW_TOPIC}, {COMPRESSED_TOPIC}]\n  expect: [cat]\n'
        f'- question: What changed?\n  history: {{topic: {RAW_TOPIC}, frames: 4, seconds: 3.0}}\n'
        f'- question: Is there a person?\n', encoding='utf-8')
    return path


def run(bag, questions_file, out, tiny_model_dir, *extra):
    return cli.main([str(bag.path), '--out', str(out), '--model', str(tiny_model_dir), '--device', 'cpu',
                     '--questions', str(questions_file), '--budgets', 'full,4', '--every', '10',
                     '--max-new-tokens', '3', *map(str, extra)])


def rows_of(out):
    return [json.loads(line) for line in (out / 'results.jsonl').read_text(encoding='utf-8').splitlines()]


def test_questions_over_several_images_are_read_and_checked(tmp_path, questions_file):
    loaded = inputs.load_questions(questions_file)
    assert loaded[0].topics == (RAW_TOPIC, COMPRESSED_TOPIC) and loaded[0].several_images
    assert loaded[1].history == inputs.History(RAW_TOPIC, 4, 3.0)
    assert not loaded[2].several_images
    cases = {
        'one topic': ('- question: A?\n  topics: [/a]\n', 'two or more'),
        'both': ('- question: A?\n  topics: [/a, /b]\n  history: {topic: /a, frames: 2, seconds: 1}\n', 'both'),
        'frames': ('- question: A?\n  history: {topic: /a, frames: 1, seconds: 1}\n', 'frames must be'),
        'seconds': ('- question: A?\n  history: {topic: /a, frames: 3, seconds: 0}\n', 'seconds must be'),
        'keys': ('- question: A?\n  history: {topic: /a, frames: 3}\n', 'topic, frames and seconds'),
        'twice': ('- question: A?\n  topics: [/a, a]\n', 'twice'),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / f'{name}.yaml'
        path.write_text(text, encoding='utf-8')
        with pytest.raises(inputs.ReplayError, match=message):
            inputs.load_questions(path)


def test_offline_replay_pairs_topics_by_stamp_and_picks_history_frames(bag, questions_file, tmp_path,
                                                                       tiny_model_dir):
    out = tmp_path / 'out'
    assert run(bag, questions_file, out, tiny_model_dir, '--pair-tolerance', '0.06') == 0
    rows = rows_of(out)
    surround = [row for row in rows if row['prompt'] == 'What do both cameras see?']
    history = [row for row in rows if row['prompt'] == 'What changed?']
    # Anchors: every 10th front frame (0, 10, 20, 30), each at both budgets.
    assert sorted({row['index'] for row in surround}) == [0, 10, 20, 30]
    assert len(surround) == 8 and all(row['kind'] == 'images' for row in surround)
    for row in surround:
        frames = row['image_frames']
        assert [frame['topic'] for frame in frames] == [RAW_TOPIC, COMPRESSED_TOPIC]
        assert abs(frames[1]['stamp_ns'] - frames[0]['stamp_ns']) <= 60_000_000
        assert [image['label'] for image in row['images']] == [RAW_TOPIC, COMPRESSED_TOPIC]
        assert row['visual_tokens'] == (2 * FULL if row['budget'] == 'full' else 2 * 4)
    # History anchors only where the topic covers the 3 s before them (front frames from 3.0 s on).
    assert history and all(row['index'] >= 30 for row in history)
    for row in history:
        stamps = [frame['stamp_ns'] for frame in row['image_frames']]
        targets = [stamps[-1] - 3 * 10**9 + k * 10**9 for k in range(4)]
        assert all(abs(stamp - target) <= PERIOD_NS for stamp, target in zip(stamps, targets))
        assert stamps[-1] == bag.good_frame_stamps[RAW_TOPIC][row['index']]
        assert row['images'][-1]['label'] == f'{RAW_TOPIC} now'
        assert row['visual_tokens'] == (4 * FULL if row['budget'] == 'full' else 4 * 4)
    # The single-image question and descriptions are unchanged and summarized without the image sets.
    singles = [row for row in rows if row['kind'] != 'images']
    assert {row['kind'] for row in singles} == {'describe', 'question'}
    with (out / 'summary.csv').open(newline='', encoding='utf-8') as file:
        summary = {row['budget']: row for row in csv.DictReader(file)}
    assert int(summary['4']['answers']) == len([row for row in singles if row['budget'] == '4'])
    with (out / 'image_sets.csv').open(newline='', encoding='utf-8') as file:
        image_sets = list(csv.DictReader(file))
    assert {(row['question'], row['budget']) for row in image_sets} == {
        (question, budget) for question in ('What do both cameras see?', 'What changed?') for budget in ('full', '4')}
    surround_4 = next(row for row in image_sets if row['question'] == 'What do both cameras see?' and
                      row['budget'] == '4')
    assert int(surround_4['answers']) == 4 and int(surround_4['images']) == 2
    assert int(surround_4['agreement_pairs']) == 4 and int(surround_4['keyword_answers']) == 4
    report = (out / 'report.md').read_text(encoding='utf-8')
    assert '## Questions over several images' in report and 'What changed?' in report
    # what the LLM read of each image: an overlay per image, embedded in report.html
    image_rows = surround + history
    for row in image_rows:
        assert len(row['overlay_images']) == len(row['images'])
        for path in row['overlay_images']:
            assert Image.open(out / path).mode == 'RGB'
    html_report = (out / 'report.html').read_text(encoding='utf-8')
    assert html_report.count('<tr class="image-set">') == len(image_rows)
    image_sets_table = html_report.split('<table id="image_sets">')[1].split('</table>')[0]
    assert image_sets_table.count('data:image/png;base64,') == sum(len(row['overlay_images']) for row in image_rows)


def test_frames_without_a_partner_within_the_tolerance_are_skipped(bag, questions_file, tmp_path, tiny_model_dir):
    out = tmp_path / 'out'
    # The rear camera is half a period (50 ms) off the front one: nothing pairs within 30 ms.
    assert run(bag, questions_file, out, tiny_model_dir, '--pair-tolerance', '0.03', '--max-frames', '2') == 0
    rows = rows_of(out)
    assert not [row for row in rows if row['prompt'] == 'What do both cameras see?']
    report = (out / 'report.md').read_text(encoding='utf-8')
    assert f'no frame of {COMPRESSED_TOPIC} within 0.03 s' in report and '--pair-tolerance' in report


def test_live_mode_refuses_questions_over_several_images(bag, questions_file, tmp_path, capsys):
    assert cli.main([str(bag.path), '--out', str(tmp_path / 'out'), '--live', '--questions',
                     str(questions_file)]) != 0
    assert 'evaluated offline' in capsys.readouterr().err
