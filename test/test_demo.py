"""vlm_demo, the README's first command, end to end: its own checkpoint, node process and camera."""
import re
import subprocess
import sys

from conftest import REPO_ROOT


def test_demo_runs_every_call_and_exits_0(tmp_path):
    completed = subprocess.run(
        [sys.executable, '-m', 'zip_vlm_ros.tools.demo', '--cache-dir', str(tmp_path), '--max-new-tokens', '3',
         '--timeout', '240'],
        capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    assert '[demo] ok: 10 results, vlm_node exit status 0' in completed.stdout
    rows = [line.split() for line in completed.stdout.splitlines()
            if line.split()[:1] in (['describe'], ['ask'], ['ask_many'], ['ask_action'], ['surround'], ['history'])]
    assert [row[0] for row in rows] == ['describe', 'ask', 'ask', 'ask_many', 'ask_many', 'ask_many',
                                        'ask_action', 'describe', 'surround', 'history']
    assert '[demo] ~/ask_action, streamed: ' in completed.stdout
    # reduced to 8 of the tiny model's 16 visual tokens, except the full-budget description
    assert [row for row in rows if '8/16' in row] and '16/16' in rows[7]
    # several images at the node's 8 tokens per image: 2 cameras, then 3 frames of the front camera
    assert rows[8][1] == 'front,rear' and '16/32' in rows[8]
    assert rows[9][1] == 'front' and '24/48' in rows[9]
    assert (tmp_path / 'tiny' / 'config.json').is_file() and (tmp_path / 'vlm_node.log').is_file()
    overlay = tmp_path / 'visual_tokens.png'  # the first answer's overlay, from ~/visual_tokens/image
    assert f'what the model saw in the first answer (kept patches bright, merged groups tinted): {overlay}' in (
        completed.stdout) and overlay.stat().st_size > 0
    assert 'Traceback' not in output


def _run_preset_demo(tmp_path, preset: str) -> subprocess.CompletedProcess:
    """vlm_demo on an offline `preset` (2-token answers); asserts that every call succeeded."""
    completed = subprocess.run(
        [sys.executable, '-m', 'zip_vlm_ros.tools.demo', '--preset', preset, '--cache-dir', str(tmp_path),
         '--max-new-tokens', '2', '--timeout', '240'],
        capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert '[demo] ok: 10 results, vlm_node exit status 0' in completed.stdout
    return completed


def test_demo_runs_the_llava_next_preset(tmp_path):
    completed = _run_preset_demo(tmp_path, 'tiny-next')
    visual = [re.search(r' (\d+/\d+) ', line).group(1) for line in completed.stdout.splitlines()
              if line.split()[:1] in (['describe'], ['ask'], ['ask_many'], ['ask_action'])]
    several = [re.search(r' (\d+/\d+) ', line).group(1) for line in completed.stdout.splitlines()
               if line.split()[:1] in (['surround'], ['history'])]
    # Several images read each image's base crop only (16 tokens on tiny-next): all of it at 40 per image.
    assert several == ['32/32', '48/48']
    # The skimage photos all become a base + 2x2 grid: 40 tokens = 8 per crop; the last call reads all.
    assert len(visual) == 8 and all(cell.startswith('40/') for cell in visual[:-1])
    used, full = visual[-1].split('/')
    assert used == full and int(full) in (70, 88)
    assert (tmp_path / 'tiny-next' / 'config.json').is_file()
    assert (tmp_path / 'visual_tokens.png').stat().st_size > 0  # NeXT traces its tokens: the overlay


def test_demo_runs_the_llava_mini_preset(tmp_path):
    completed = _run_preset_demo(tmp_path, 'tiny-mini')
    visual = [re.search(r' (\d+/\d+) ', line).group(1) for line in completed.stdout.splitlines()
              if line.split()[:1] in (['describe'], ['ask'], ['ask_many'], ['ask_action'])]
    assert visual == ['1/1'] * 8  # one compressed token per image, whatever the budget
    # Questions over several images run in LLaVA-Mini's video mode: one token per image.
    several = {line.split()[0]: re.search(r' (\d+/\d+) ', line).group(1) for line in completed.stdout.splitlines()
               if line.split()[:1] in (['surround'], ['history'])}
    assert several == {'surround': '2/2', 'history': '3/3'} and 'skipped' not in completed.stdout
    assert (tmp_path / 'tiny-mini' / 'config.json').is_file()
    assert (tmp_path / 'visual_tokens.png').stat().st_size > 0  # its compressed token's overlay


def test_demo_runs_the_qwen2_5_vl_preset(tmp_path):
    completed = _run_preset_demo(tmp_path, 'tiny-qwen2.5-vl')
    visual = [re.search(r' (\d+/\d+) ', line).group(1) for line in completed.stdout.splitlines()
              if line.split()[:1] in (['describe'], ['ask'], ['ask_many'], ['ask_action'])]
    # 12 of each photo's merged tokens (its own full count: the frame's size decides it); the last call reads all.
    assert len(visual) == 8 and all(cell.startswith('12/') for cell in visual[:-1])
    used, full = visual[-1].split('/')
    assert used == full and 12 < int(full) <= 36
    several = {line.split()[0]: re.search(r' (\d+/\d+) ', line).group(1) for line in completed.stdout.splitlines()
               if line.split()[:1] in (['surround'], ['history'])}
    assert several['surround'].startswith('24/') and several['history'].startswith('36/')
    assert (tmp_path / 'tiny-qwen2.5-vl' / 'config.json').is_file()
    # reduced by the node's default reducer (VisionZip, received-attention scoring); the first answer's overlay
    assert (tmp_path / 'visual_tokens.png').stat().st_size > 0
