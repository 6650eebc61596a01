"""vlm_demo: the whole pipeline in one command, offline.

    vlm_demo                          # tiny random checkpoint (built once into the cache dir)
    vlm_demo --preset tiny-next       # the same as LLaVA-NeXT (AnyRes crops)
    vlm_demo --preset tiny-mini       # the same as LLaVA-Mini (one visual token per image)
    vlm_demo --preset tiny-qwen2.5-vl # the same as Qwen2.5-VL (dynamic resolution, M-RoPE, VisionZip)
    vlm_demo --model /models/llava-1.5-7b-hf --token-budget 64

Builds (or reuses) a tiny LLaVA checkpoint, starts vlm_node as a separate process, streams real
photos (skimage.data) on two camera topics at 10 Hz from this process, calls ~/describe_scene,
~/ask (on the camera and with an inline image), ~/ask_many and the ~/ask_action action (its answer
printed piece by piece as the feedback arrives), then ~/ask over both cameras at once (surround view)
and over the front camera's last second (history), prints every result with its token counts and
timings, stops the node with SIGINT and checks that it exits cleanly.

DDS stays on this machine (ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST) in a random domain unless
--domain-id is given, so the demo never talks to a robot on the same network.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

from zip_vlm_ros.client import DOMAIN_IDS, use_local_ros_domain

# Offline presets: (largest full visual-token count per image, default budget). tiny: 56x56 pixels in
# 14x14 patches; tiny-next: a base crop and up to a 2x2 grid of them, the budget is 8 tokens per crop;
# tiny-mini: LLaVA-Mini's one compressed token per image, which no budget changes; tiny-qwen2.5-vl: up to
# 36 merged tokens (max_pixels 168x168), reduced by VisionZip's received-attention variant (no CLS token).
PRESET_TOKENS = {'tiny': (16, 8), 'tiny-next': (88, 40), 'tiny-mini': (1, 1), 'tiny-qwen2.5-vl': (36, 12)}
PHOTOS = ('astronaut', 'coffee', 'chelsea', 'rocket')
HISTORY_ATTEMPTS, HISTORY_WAIT_S = 4, 1.0
COLUMNS = ('call', 'camera', 'prompt', 'budget', 'visual', 'gen', 'vision', 'reduce', 'prefill',
           'decode', 'total ms', 'age ms', 'reused', 'answer')


def traces_visual_tokens(model: str) -> bool:
    """Whether the local checkpoint's family reports which patches each visual token stands for
    (``FamilyAdapter.traces_visual_tokens``: LLaVA-1.5, LLaVA-NeXT, LLaVA-Mini,
    Qwen2.5-VL)."""
    from zip_vlm_ros.models import FAMILIES

    config = pathlib.Path(model) / 'config.json'
    family = FAMILIES.get(json.loads(config.read_text()).get('model_type')) if config.is_file() else None
    return family is not None and family.traces_visual_tokens


def default_cache_dir() -> pathlib.Path:
    base = os.environ.get('XDG_CACHE_HOME') or pathlib.Path.home() / '.cache'
    return pathlib.Path(base) / 'zip_vlm_ros'


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='vlm_demo', description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', help='LLaVA checkpoint dir or hub id (default: the tiny offline '
                                        'checkpoint, random weights: its answers are gibberish)')
    parser.add_argument('--preset', choices=sorted(PRESET_TOKENS), default='tiny',
                        help='offline checkpoint without --model: tiny (LLaVA-1.5 style), tiny-next '
                             '(LLaVA-NeXT style), tiny-mini (LLaVA-Mini style) or tiny-qwen2.5-vl (Qwen2.5-VL) '
                             '(default: %(default)s)')
    parser.add_argument('--cache-dir', type=pathlib.Path, default=default_cache_dir(),
                        help='where the tiny checkpoint and the node log go (default: %(default)s)')
    parser.add_argument('--domain-id', type=int, choices=DOMAIN_IDS, metavar='N',
                        help='ROS_DOMAIN_ID (default: random in 1..101)')
    parser.add_argument('--token-budget', type=int,
                        help='visual tokens kept per image (default: 8 for the tiny checkpoint, 40 for '
                             'tiny-next, else the node default)')
    parser.add_argument('--max-new-tokens', type=int, default=12, help='answer length (default: 12)')
    parser.add_argument('--timeout', type=float, default=300.0,
                        help='seconds to wait for the node and for each call (default: 300)')
    return parser.parse_args(argv)


def printable(text: str, width: int) -> str:
    """One table cell: control characters shown as '.', cut to `width`."""
    cell = ''.join(char if char.isprintable() else '.' for char in text)
    return cell if len(cell) <= width else cell[:width - 1] + '~'


def result_row(call: str, result) -> tuple[str, ...]:
    return (call, result.camera, printable(result.prompt, 24), str(result.token_budget),
            f'{result.visual_tokens}/{result.visual_tokens_full}', str(result.generated_tokens),
            f'{result.vision_ms:.1f}', f'{result.reduction_ms:.1f}', f'{result.prefill_ms:.1f}',
            f'{result.decode_ms:.1f}', f'{result.total_ms:.1f}', f'{result.image_age_ms:.0f}',
            'yes' if result.prefix_reused else 'no', printable(result.text, 32))


def format_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[index]) for row in [COLUMNS, *rows]) for index in range(len(COLUMNS))]
    lines = ['  '.join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in [COLUMNS, *rows]]
    lines.insert(1, '  '.join('-' * width for width in widths))
    return '\n'.join(lines)


def run_demo(args: argparse.Namespace) -> int:
    """Returns the exit status: 0 when every call succeeded and the node exited cleanly."""
    from sensor_msgs.msg import Image

    from zip_vlm_ros.client import NodeProcess, VlmClient, use_large_frames_profile
    from zip_vlm_ros.srv import DescribeScene

    use_large_frames_profile()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    parameters = node_parameters(args)
    log_path = args.cache_dir / 'vlm_node.log'
    print(f'[demo] starting vlm_node (log: {log_path})', flush=True)
    node = NodeProcess(parameters, log_path, remaps={'__ns': '/demo'})
    client = VlmClient('/demo/zip_vlm', client_name='vlm_demo')
    streamers = []
    calls = DemoCalls(client, args.timeout)
    try:
        if not client.wait_for_service(DescribeScene, '~/describe_scene', args.timeout):
            print(f'[demo] vlm_node did not come up; its log:\n{node.log()}', file=sys.stderr)
            return 1
        overlays = client.collect(Image, '/demo/zip_vlm/visual_tokens/image')
        streamers = stream_photos(client)
        time.sleep(1.5)  # a few frames in, so the first call has one
        calls.run_all(full_budget=None if args.model else PRESET_TOKENS[args.preset][0])
        calls.save_overlay(overlays, args.cache_dir / 'visual_tokens.png',
                           required=traces_visual_tokens(parameters['model']))
    finally:
        for streamer in streamers:
            streamer.stop()
        client.close()
        exit_code = node.stop()
    return report(calls, exit_code, node)


def node_parameters(args: argparse.Namespace) -> dict:
    """vlm_node's parameters for the demo: `--model`, or a random checkpoint of `--preset` built once."""
    if args.model:
        model = args.model
    else:
        import transformers

        from zip_vlm_ros.tools.tiny_model import build_checkpoint
        transformers.utils.logging.disable_progress_bar()  # keep the demo's output to its table
        print(f'[demo] {args.preset} random-weight checkpoint in {args.cache_dir / args.preset} '
              f'(answers are gibberish; pass --model for a real one)', flush=True)
        model = str(build_checkpoint(args.cache_dir / args.preset, preset=args.preset))
    token_budget = args.token_budget or (None if args.model else PRESET_TOKENS[args.preset][1])
    parameters = {'model': model, 'cameras': ['front', 'rear'], 'camera.front.topic': 'front/image_raw',
                  'max_new_tokens': args.max_new_tokens, 'max_image_age_s': 5.0,
                  'request_timeout_s': args.timeout, 'publish_visual_tokens': True}
    if token_budget is not None:
        parameters['token_budget'] = token_budget
    return parameters


def stream_photos(client) -> list:
    """The bundled photos at 10 Hz on /demo/front/image_raw and, in reverse order, /demo/rear/image_raw."""
    import skimage.data

    from zip_vlm_ros.client import ImageStreamer
    from zip_vlm_ros.node.conversions import rgb_to_image

    photos = [rgb_to_image(getattr(skimage.data, name)()) for name in PHOTOS]
    streamers = [ImageStreamer(client, f'/demo/{camera}/image_raw', camera_photos, rate_hz=10,
                               frame_id=f'{camera}_camera')
                 for camera, camera_photos in (('front', photos), ('rear', photos[::-1]))]
    print(f'[demo] streaming {", ".join(PHOTOS)} on /demo/front/image_raw and /demo/rear/image_raw '
          f'at 10 Hz', flush=True)
    return streamers


class DemoCalls:
    """Every kind of call the node answers, once each; their result rows and failures."""

    def __init__(self, client, timeout_s: float):
        self.client = client
        self.timeout_s = timeout_s
        self.rows: list[tuple[str, ...]] = []
        self.failures: list[str] = []

    def record(self, call: str, response):
        if not response.success:
            self.failures.append(f'{call}: {response.message}')
        else:
            for result in getattr(response, 'results', None) or [response.result]:
                self.rows.append(result_row(call, result))
        return response

    def save_overlay(self, overlays: list, path: pathlib.Path, required: bool) -> None:
        """The first answer's overlay the node published on ~/visual_tokens/image, as a PNG at `path`.

        `required`: the model's family traces its visual tokens, so a missing overlay is a failure."""
        from PIL import Image

        from zip_vlm_ros.client import wait_until
        from zip_vlm_ros.node.conversions import image_to_rgb

        # Drawn on the node's overlay thread after its answer: in flight, or here already.
        if not wait_until(lambda: bool(overlays), 10.0 if required else 2.0):
            if required:
                self.failures.append('no overlay arrived on /demo/zip_vlm/visual_tokens/image')
            else:
                print('[demo] no overlay: this model family does not trace its visual tokens yet',
                      flush=True)
            return
        Image.fromarray(image_to_rgb(overlays[0])).save(path)
        print(f'[demo] what the model saw in the first answer (kept patches bright, merged groups tinted): {path}',
              flush=True)

    def run_all(self, full_budget: int | None) -> None:
        """`full_budget`: the preset's largest full count; None: the first answer's own full count."""
        import skimage.data

        from zip_vlm_ros.node.conversions import rgb_to_image

        client, timeout_s = self.client, self.timeout_s
        first = self.record('describe', client.describe(timeout_s=timeout_s))
        self.record('ask', client.ask('Is there a person?', timeout_s=timeout_s))
        self.record('ask inline', client.ask('What is on the table?', timeout_s=timeout_s,
                                             image=rgb_to_image(skimage.data.coffee())))
        self.record('ask_many', client.ask_many(
            ['Is it day or night?', 'What colour dominates?', 'Is anyone there?'], timeout_s=timeout_s))
        print('[demo] ~/ask_action, streamed: ', end='', flush=True)
        shown = ['']

        def show(feedback) -> None:
            # Every message's text is the whole answer so far (a keep-last reader may miss a delta):
            # print what it adds to what is on screen.
            if feedback.text.startswith(shown[0]):
                print(printable(feedback.text[len(shown[0]):], 80), end='', flush=True)
                shown[0] = feedback.text
        status, streamed, goal = client.ask_streamed('What do you see?', timeout_s=timeout_s, on_feedback=show)
        print(f'  ({len(goal.feedback)} feedback messages)', flush=True)
        self.record('ask_action', streamed)
        if first.success:  # the same photo stream with every visual token: no reduction
            budget = full_budget or first.result.visual_tokens_full
            self.record('describe full', client.describe(token_budget=budget, timeout_s=timeout_s))
        self.run_image_sets()

    def run_image_sets(self) -> None:
        """Surround view and history; token_budget 0 gives each image the node's per-image budget."""
        from zip_vlm_ros.engine.multi_image import SINGLE_IMAGE_ONLY

        for call, question, fields in (('surround', 'What do the cameras see?', {'cameras': ['front', 'rear']}),
                                       ('history', 'What changed?', {'history_frames': 3, 'history_s': 1.0})):
            response = self.ask_image_set(question, **fields)
            if not response.success and SINGLE_IMAGE_ONLY in response.message:  # a one-image family
                print(f'[demo] {call} skipped: {response.message}', flush=True)
                continue
            self.record(call, response)

    def ask_image_set(self, question: str, **fields):
        """~/ask over several images. A history is asked again (up to HISTORY_ATTEMPTS times, HISTORY_WAIT_S
        apart) while the camera's buffer has a gap where it needs a frame: a busy machine may drop frames on
        a best-effort image topic, and the buffer fills again within a second."""
        from zip_vlm_ros.node.image_sets import HISTORY_UNAVAILABLE

        for attempt in range(1, HISTORY_ATTEMPTS + 1):
            response = self.client.ask(question, timeout_s=self.timeout_s, **fields)
            if response.success or HISTORY_UNAVAILABLE not in response.message or attempt == HISTORY_ATTEMPTS:
                return response
            print(f'[demo] history refused ({response.message}); asking again in {HISTORY_WAIT_S:g} s',
                  flush=True)
            time.sleep(HISTORY_WAIT_S)


def report(calls: DemoCalls, exit_code: int, node) -> int:
    """Print the results table and the verdict; 0 when every call succeeded and the node exited cleanly."""
    print()
    print(format_table(calls.rows))
    print()
    print('budget: visual tokens kept by VisionZip; visual: fed to the LLM / before reduction; gen: '
          'generated tokens;\ntimes in ms; age: node clock at the answer minus the image stamp; '
          'reused: the frame\'s image prefix came from the cache')
    for failure in calls.failures:
        print(f'[demo] FAILED {failure}', file=sys.stderr)
    if exit_code != 0:
        print(f'[demo] vlm_node exited with {exit_code}; its log:\n{node.log()}', file=sys.stderr)
    status = 'ok' if not calls.failures and exit_code == 0 else 'FAILED'
    print(f'[demo] {status}: {len(calls.rows)} results, vlm_node exit status {exit_code}')
    return 0 if status == 'ok' else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    domain_id = use_local_ros_domain(args.domain_id)
    print(f'[demo] ROS_DOMAIN_ID={domain_id}, discovery on localhost only', flush=True)
    return run_demo(args)


if __name__ == '__main__':
    sys.exit(main())
