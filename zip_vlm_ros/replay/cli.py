"""The vlm_replay command line: parse the arguments, read the inputs, run offline or live."""
from __future__ import annotations

import argparse
import math

from zip_vlm_ros.replay.console import warn
from zip_vlm_ros.replay.inputs import (DEFAULT_BUDGETS, ReplayError, evaluation_points, load_labels, load_questions,
                                       parse_budgets, parse_reducers)
from zip_vlm_ros.replay.offline import EXIT_NOTHING_EVALUATED, run_offline


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='vlm_replay',
        description='Evaluate visual-token budgets on a rosbag2 recording: scene descriptions and questions '
                    'per frame and budget, with results.jsonl, summary.csv, report.md and plots in --out.')
    parser.add_argument('bags', nargs='+', metavar='BAG',
                        help='rosbag2 directory (with metadata.yaml), .mcap/.db3 file, or a folder of bags; offline, '
                             'several in one run (frames are (bag, topic, index); report per bag and overall)')
    parser.add_argument('--out', required=True, help='directory for results.jsonl, summary.csv, report.md, plots')
    parser.add_argument('--topics', nargs='+', metavar='TOPIC', help='image topics to evaluate (default: all)')
    parser.add_argument('--questions', metavar='FILE',
                        help='YAML list of {question: ..., expect: [keywords]} asked about every frame')
    parser.add_argument('--labels', metavar='FILE',
                        help='YAML list of human labels {topic, index | stamp, question?, answer?, keywords?}: '
                             'answers are scored against them per budget')
    parser.add_argument('--reducers', metavar='A,B',
                        help='comma-separated reducers to compare (visionzip, divprune, vispruner): every reducer '
                             'at every budget, "full" once (default: the node\'s reducer alone)')
    parser.add_argument('--budgets', default=DEFAULT_BUDGETS,
                        help=f'comma-separated visual-token budgets, "full" = no reduction (default {DEFAULT_BUDGETS})')
    selection = parser.add_mutually_exclusive_group()
    selection.add_argument('--every', type=_positive_int, default=1, metavar='N',
                           help='offline: evaluate every Nth frame of each topic (default 1)')
    selection.add_argument('--period', type=_positive_float, metavar='S',
                           help='offline: at most one frame per S seconds of each topic; live: ask every S '
                                'seconds of bag time (default 1)')
    parser.add_argument('--max-frames', type=_positive_int, metavar='K',
                        help='offline: at most K evaluated frames per topic; live: at most K rounds of requests')
    parser.add_argument('--pair-tolerance', type=_positive_float, default=0.05, metavar='S',
                        help='offline: questions naming several topics pair each frame of the first topic with '
                             'the other topics\' frames stamped within S seconds of it (default 0.05)')
    parser.add_argument('--foxglove', metavar='OUT.mcap',
                        help='offline: also write the drive for Foxglove: the frames, one visual-token overlay '
                             'channel per (reducer, budget) and the answers as foxglove.Log')
    parser.add_argument('--resume', action='store_true',
                        help='continue an earlier run in --out, skipping work already in results.jsonl')
    _add_engine_arguments(parser)
    _add_live_arguments(parser)
    _add_ray_arguments(parser)
    return parser


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Offline: the node's engine parameters of the same names."""
    engine = parser.add_argument_group(
        'engine (offline): the node\'s parameters of the same names; defaults are the node\'s defaults')
    engine.add_argument('--params-file', metavar='YAML',
                        help='read model, max_pixels, device, dtype, dominant_ratio, max_new_tokens, describe_prompt '
                             'from the node\'s params file (e.g. config/vlm.yaml); the options below override it')
    engine.add_argument('--model', help='LLaVA checkpoint directory or hub id (required offline)')
    engine.add_argument('--vision-tower', dest='vision_tower',
                        help='LLaVA-Mini only: local CLIP directory when the checkpoint names its tower by hub id')
    engine.add_argument('--max-pixels', dest='max_pixels', type=_positive_int,
                        help='Qwen2.5-VL only: the most pixels a frame is resized to (full visual tokens = '
                             'max_pixels / 784; default: the processor\'s)')
    engine.add_argument('--device', help='auto|cpu|cuda|cuda:N')
    engine.add_argument('--dtype', help='auto|float16|bfloat16|float32')
    engine.add_argument('--dominant-ratio', type=float, help='share of the budget given to dominant tokens')
    engine.add_argument('--max-new-tokens', type=_positive_int, help='answer length limit in tokens')
    parser.add_argument('--describe-prompt', help='scene description prompt (default: the node\'s)')


def _add_live_arguments(parser: argparse.ArgumentParser) -> None:
    """Live mode: playing the bag into a running vlm_node."""
    live = parser.add_argument_group('live mode (plays the bag into a running vlm_node)')
    live.add_argument('--live', action='store_true', help='replay into a running node instead of offline')
    live.add_argument('--rate', type=_positive_float, default=1.0, help='playback rate factor (default 1)')
    live.add_argument('--clock', type=_positive_float, nargs='?', const=40.0, metavar='HZ',
                      help='publish /clock with bag time at HZ (default 40) for nodes with use_sim_time')
    live.add_argument('--node-name', default='/zip_vlm', help='node whose services to call (default /zip_vlm)')
    live.add_argument('--camera', default='', help='camera name for the requests (default: the node\'s first)')
    live.add_argument('--remap', action='append', default=[], metavar='OLD:=NEW',
                      help='publish bag topic OLD on NEW (repeatable)')
    live.add_argument('--timeout', type=_positive_float, default=60.0,
                      help='seconds before a service call counts as timed out (default 60)')
    live.add_argument('--wait', type=_positive_float, default=30.0,
                      help='seconds to wait for the node\'s services at start (default 30)')


def _add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """Offline on Ray: frames evaluated by Ray workers, each holding one engine."""
    fleet = parser.add_argument_group('Ray (offline): frames evaluated by Ray workers, each holding one engine')
    fleet.add_argument('--ray', nargs='?', const='local', metavar='ADDRESS',
                       help='run on Ray: alone, a local Ray instance for this run (loopback only); "auto" or '
                            'ray://host:port joins an existing cluster (needs requirements-ray.txt)')
    fleet.add_argument('--workers', type=_positive_int, default=1, metavar='N',
                       help='--ray: number of workers (engines); torch threads are split between them (default 1)')
    fleet.add_argument('--threads-per-worker', type=_positive_int, metavar='T',
                       help='--ray: torch threads of each worker (default: the CPUs split between the workers)')
    fleet.add_argument('--frames-per-task', type=_positive_int, metavar='K',
                       help='--ray: frames sent to a worker at once (default 4): fewer Ray round trips per frame; '
                            'a worker that dies re-runs at most K frames')
    fleet.add_argument('--gpus-per-worker', type=_positive_float, metavar='G',
                       help='--ray: GPUs each worker reserves on the cluster (use with --device cuda)')


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a whole number') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be at least 1, got {value}')
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f'must be a positive number, got {text}')
    return value


def _check_mode_options(args: argparse.Namespace, questions: list) -> None:
    """Options that only one mode (offline, --live, --ray) reads, refused in the others."""
    if args.ray is None and (args.workers != 1 or args.gpus_per_worker or args.threads_per_worker
                             or args.frames_per_task):
        raise ReplayError('--workers, --threads-per-worker, --frames-per-task and --gpus-per-worker apply to --ray '
                          'runs: add --ray (Ray on this machine) or --ray ADDRESS (a cluster)')
    if args.live:
        if len(args.bags) > 1:
            raise ReplayError(f'--live plays one bag into the node, got {len(args.bags)}: run once per bag, or '
                              f'evaluate them together offline (without --live)')
        if args.ray is not None:
            raise ReplayError('--ray applies to offline replay; a --live run asks the running node: drop one')
        if args.every != 1:
            raise ReplayError('--every applies to offline replay; in --live mode use --period to set how '
                              'often the node is asked')
        if args.resume:
            raise ReplayError('--resume applies to offline replay; a live run cannot be repeated exactly: '
                              'use a new --out')
        if args.foxglove:
            raise ReplayError('--foxglove applies to offline replay (the overlays come from the engine\'s '
                              'own tokens): run without --live')
        if any(question.several_images for question in questions):
            raise ReplayError('questions over several images (topics or history) are evaluated offline: '
                              'remove them from the questions file for --live, or run without --live')
    elif args.foxglove and args.resume:
        raise ReplayError('--foxglove records the frames a run evaluates; a resumed run skips the done ones: '
                          'write the MCAP in a run without --resume')


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.reducers = parse_reducers(args.reducers) if args.reducers else None
        budgets = evaluation_points(parse_budgets(args.budgets), args.reducers)
        questions = load_questions(args.questions) if args.questions else []
        labels = load_labels(args.labels) if args.labels else []
        _check_mode_options(args, questions)
        if args.live:
            from zip_vlm_ros.replay.live import run_live

            args.bag = args.bags[0]
            return run_live(args, budgets, questions, labels)
        if args.ray is not None:
            from zip_vlm_ros.replay.ray_fleet import run_on_ray

            return run_on_ray(args, budgets, questions, labels)
        return run_offline(args, budgets, questions, labels)
    except ReplayError as error:
        warn(str(error), level='error')
    except OSError as error:  # e.g. the disk filled up or --out vanished while results were written
        where = f' {error.filename}' if error.filename else ''
        warn(f'cannot write{where} ({error.strerror or type(error).__name__}): free space or choose another --out',
             level='error')
    return EXIT_NOTHING_EVALUATED
