"""vlm_replay --reducers on the sample bag with the tiny model: every (reducer, budget) pair on every frame,
"full" once, rows carrying the reducer, a summary row per pair, the per-reducer plot, --resume checking
the reducer list, and --live sending each pair's reducer to a running node."""
import csv
import json

import pytest

from test_replay import (MAX_NEW_TOKENS, check_outputs_match_results, live_replay, one_line_error, read_jsonl,
                         run_replay)
from zip_vlm_ros.replay import inputs
from zip_vlm_ros.replay.inputs import ReplayError
from zip_vlm_ros.tools import sample_bag
from zip_vlm_ros.tools.sample_bag import RAW_TOPIC

POINTS = ['full', 'visionzip@8', 'visionzip@4', 'divprune@8', 'divprune@4', 'vispruner@8', 'vispruner@4']


def test_points_and_reducer_list_parsing():
    assert inputs.evaluation_points(['full', '8', '4'], ['visionzip', 'divprune', 'vispruner']) == POINTS
    assert inputs.evaluation_points(['8', 'full'], None) == ['8', 'full']
    assert (inputs.point_reducer('divprune@64'), inputs.point_budget('divprune@64')) == ('divprune', '64')
    assert (inputs.point_reducer('64'), inputs.budget_tokens('vispruner@full', 576)) == ('', 576)
    with pytest.raises(ReplayError, match="reducer 'holov' in --reducers 'visionzip,holov' is not known"):
        inputs.parse_reducers('visionzip,holov')
    with pytest.raises(ReplayError, match='appears twice'):
        inputs.parse_reducers('divprune,divprune')


@pytest.fixture(scope='module')
def bag(tmp_path_factory):
    return sample_bag.write_sample_bag(tmp_path_factory.mktemp('bag') / 'mcap', storage='mcap', frames_per_topic=2)


def test_replay_compares_the_reducers_side_by_side(tmp_path, capsys, bag, tiny_model_dir):
    out = tmp_path / 'out'
    common = [bag.path, '--out', out, '--model', tiny_model_dir, '--max-new-tokens', MAX_NEW_TOKENS,
              '--budgets', 'full,8,4', '--topics', RAW_TOPIC, '--device', 'cpu']
    assert run_replay(*common, '--reducers', 'visionzip,divprune,vispruner') == 0
    rows = read_jsonl(out / 'results.jsonl')
    frames = bag.good_frame_stamps[RAW_TOPIC]
    assert sorted((row['stamp_ns'], row['budget']) for row in rows) == sorted(
        (stamp, point) for stamp in frames for point in POINTS)
    for row in rows:
        expected = 'none' if row['budget'] == 'full' else row['budget'].split('@')[0]
        assert (row['reducer'], row['reduction']) == (expected, expected)
        assert row['visual_tokens'] == (16 if row['budget'] == 'full' else int(row['budget'].split('@')[1]))
    check_outputs_match_results(out, POINTS)
    with (out / 'summary.csv').open(newline='', encoding='utf-8') as file:
        summary = {row['budget']: row for row in csv.DictReader(file)}
    assert [summary[point]['reducer'] for point in POINTS] == ['none'] + [p.split('@')[0] for p in POINTS[1:]]
    assert (out / 'agreement_vs_budget.png').stat().st_size > 0
    assert json.loads((out / 'run.json').read_text(encoding='utf-8'))['reducers'] == [
        'visionzip', 'divprune', 'vispruner']

    # --resume with another reducer list is refused, naming the difference
    capsys.readouterr()
    assert run_replay(*common, '--reducers', 'divprune', '--resume') == 1
    assert 'reducers was ["visionzip", "divprune", "vispruner"] and is now ["divprune"]' in one_line_error(capsys)
    assert run_replay(*common, '--reducers', 'visionzip,divprune,vispruner', '--resume') == 0
    assert '0 new answers' in capsys.readouterr().err


def test_live_replay_sends_each_pairs_reducer(tmp_path, tiny_model_dir):
    from zip_vlm_ros.client import NodeProcess

    node = NodeProcess({
        'model': str(tiny_model_dir), 'cameras': ['front'], 'camera.front.topic': '/robot/front/image',
        'use_sim_time': True, 'image_qos': 'reliable', 'token_budget': 8, 'max_new_tokens': int(MAX_NEW_TOKENS),
    }, tmp_path / 'node.log')
    bag = sample_bag.write_sample_bag(tmp_path / 'bag', storage='mcap', frames_per_topic=2)
    out = tmp_path / 'live'
    try:
        run = live_replay(bag.path, out, '--remap', f'{RAW_TOPIC}:=/robot/front/image', '--camera', 'front',
                          '--topics', RAW_TOPIC, '--period', '0.1', '--budgets', 'full,4',
                          '--reducers', 'divprune,vispruner')
    finally:
        node_status = node.stop()
    assert run.returncode == 0, run.stderr + node.log()
    assert node_status == 0, node.log()
    answered = [row for row in read_jsonl(out / 'results.jsonl') if row['status'] == 'ok']
    assert {row['budget'] for row in answered} == {'full', 'divprune@4', 'vispruner@4'}
    for row in answered:
        expected = 'none' if row['budget'] == 'full' else row['budget'].split('@')[0]
        assert (row['reducer'], row['reduction']) == (expected, expected), row
