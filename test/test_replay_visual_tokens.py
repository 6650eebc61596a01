"""What vlm_replay shows of the visual tokens, on the sample bag with the tiny model: --foxglove read back with
the `mcap` reader (the Foxglove schemas, the frames, one overlay channel per (reducer, budget), the answers, each
on the bag's timestamps) and report.html opened in headless Chromium (every image decodes, a row per frame)."""
import base64
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from mcap.reader import make_reader
from PIL import Image

from test_replay import MAX_NEW_TOKENS, one_line_error, read_jsonl, run_replay
from zip_vlm_ros.replay.foxglove import ANSWERS_TOPIC, overlay_topic
from zip_vlm_ros.tools import sample_bag
from zip_vlm_ros.tools.sample_bag import RAW_TOPIC

POINTS = ['full', 'visionzip@4', 'divprune@4']


@pytest.fixture(scope='module')
def bag(tmp_path_factory):
    return sample_bag.write_sample_bag(tmp_path_factory.mktemp('bag') / 'mcap', storage='mcap', frames_per_topic=2)


def _read(path):
    with path.open('rb') as file:
        reader = make_reader(file)
        summary = reader.get_summary()
        messages = [(channel.topic, schema.name, message.log_time, json.loads(message.data))
                    for schema, channel, message in reader.iter_messages(log_time_order=True)]
    return summary, messages


def _decode(message: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(message['data']))))


@pytest.fixture(scope='module')
def replayed(tmp_path_factory, bag, tiny_model_dir):
    """One replay of every (reducer, budget) point with --foxglove: (the --out directory, the MCAP)."""
    run_dir = tmp_path_factory.mktemp('replay')
    out, recording = run_dir / 'out', run_dir / 'drive.mcap'
    assert run_replay(bag.path, '--out', out, '--model', tiny_model_dir, '--max-new-tokens', MAX_NEW_TOKENS,
                      '--budgets', 'full,4', '--reducers', 'visionzip,divprune', '--topics', RAW_TOPIC,
                      '--device', 'cpu', '--foxglove', recording) == 0
    return out, recording


def test_the_mcap_holds_frames_overlays_and_answers_on_the_bags_time(replayed, bag):
    out, recording = replayed
    summary, messages = _read(recording)
    assert {schema.name for schema in summary.schemas.values()} == {'foxglove.CompressedImage', 'foxglove.Log'}
    assert {schema.encoding for schema in summary.schemas.values()} == {'jsonschema'}
    image_topics = [RAW_TOPIC] + [overlay_topic(RAW_TOPIC, point) for point in POINTS]
    assert sorted(channel.topic for channel in summary.channels.values()) == sorted(image_topics + [ANSWERS_TOPIC])
    frames = bag.good_frame_stamps[RAW_TOPIC]  # the sample bag logs each frame at its header stamp
    for topic in image_topics:
        images = [(log_time, data) for name, _, log_time, data in messages if name == topic]
        assert [log_time for log_time, _ in images] == frames, topic
        assert [data['timestamp']['sec'] * 10**9 + data['timestamp']['nsec'] for _, data in images] == frames
        assert images[0][1]['format'] == 'png' and _decode(images[0][1]).ndim == 3
    # the full-budget overlay is the whole crop bright; a reduced one dims the patches it dropped
    first_overlay = {name: _decode(data) for name, _, _, data in reversed(messages) if name in image_topics}
    assert first_overlay[overlay_topic(RAW_TOPIC, 'divprune@4')].mean() < first_overlay[
        overlay_topic(RAW_TOPIC, 'full')].mean()
    answers = [(log_time, data) for name, _, log_time, data in messages if name == ANSWERS_TOPIC]
    rows = read_jsonl(out / 'results.jsonl')
    assert len(answers) == len(rows) == len(frames) * len(POINTS)
    assert sorted(log_time for log_time, _ in answers) == sorted(row['stamp_ns'] for row in rows)
    texts = {(row['stamp_ns'], row['budget']): row['text'] for row in rows}
    for log_time, data in answers:
        point = data['name'].split()[-1]
        assert data['level'] == 2 and data['message'].endswith(texts[(log_time, point)])


def test_foxglove_is_refused_where_it_cannot_record_everything(tmp_path, capsys, bag, tiny_model_dir):
    common = [bag.path, '--out', tmp_path / 'out', '--model', tiny_model_dir, '--foxglove', tmp_path / 'x.mcap']
    assert run_replay(*common, '--resume') == 1
    assert 'without --resume' in one_line_error(capsys)
    assert run_replay(*common, '--live') == 1
    assert 'run without --live' in one_line_error(capsys)
    assert not (tmp_path / 'x.mcap').exists()


# Reports, after the page's load, what the test checks: images that decoded, and the rows per frame.
_CHECK_SCRIPT = """<script>
window.addEventListener('load', () => {
  const images = Array.from(document.images);
  const result = document.createElement('pre');
  result.id = 'browser-check';
  result.textContent = JSON.stringify({images: images.length,
    decoded: images.filter(image => image.complete && image.naturalWidth > 0).length,
    frame_rows: document.querySelectorAll('tr.frame').length});
  document.body.appendChild(result);
});
</script>"""


def _chromium() -> str:
    path = shutil.which('chromium') or shutil.which('chromium-browser')
    if path is None:
        pytest.skip('headless Chromium is not installed (scripts/test.sh installs Debian\'s chromium package with '
                    'apt-get; on a machine without apt: apt-get install -y chromium or equivalent)')
    return path


def _headless(chromium: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, '--headless', '--no-sandbox', '--disable-gpu', '--allow-file-access-from-files',
                           *args], capture_output=True, text=True, timeout=90, check=False)


def test_report_html_opens_in_headless_chromium(replayed, bag, tmp_path):
    chromium = _chromium()
    out, _ = replayed
    report = (out / 'report.html').read_text(encoding='utf-8')
    assert 'src="images/' not in report and 'file:' not in report  # self-contained: nothing to fetch
    frames = bag.good_frame_stamps[RAW_TOPIC]
    # the frame, then the full budget first, then the points in run order
    header = re.search(r'<table id="frames"><tr>(.*?)</tr>', report).group(1)
    assert re.findall(r'<th>(.*?)</th>', header) == ['frame'] + POINTS

    screenshot = tmp_path / 'report.png'
    shot = _headless(chromium, f'--screenshot={screenshot}', '--window-size=1280,2000', (out / 'report.html').as_uri())
    assert screenshot.exists() and Image.open(screenshot).size == (1280, 2000), shot.stderr[-2000:]

    checked = tmp_path / 'report_checked.html'  # the report, moved away from its images/ folder
    checked.write_text(report.replace('</body>', _CHECK_SCRIPT + '</body>'), encoding='utf-8')
    dom = _headless(chromium, '--dump-dom', '--virtual-time-budget=10000', checked.as_uri())
    found = re.search(r'<pre id="browser-check">(.*?)</pre>', dom.stdout)
    assert found, dom.stderr[-2000:]
    result = json.loads(found.group(1))
    # per frame: the frame and one overlay per point; plus the two plots
    assert result == {'images': len(frames) * (1 + len(POINTS)) + 2, 'decoded': result['images'],
                      'frame_rows': len(frames)}
