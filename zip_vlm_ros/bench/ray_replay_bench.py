"""``vlm_bench --replay-ray``: ``vlm_replay --ray --workers 2`` against ``--workers 1`` on the same bag, one
torch thread per worker, the two commands alternated in each repeat so that a busy machine slows both.

Each command is timed whole, as a user waits for it (Ray start, model loads, the frames, the report);
the Ray start-up (instance and workers ready, which the command prints) is reported beside it, and
frames/s is the evaluated frames over the whole command's wall clock. Beside it, how much parallel CPU
the machine gives this process right now: the same pure-Python loop in 2 processes at once against 1
(2.0x on two free cores; on a machine shared with other jobs, or under a CPU quota, less). 2 Ray workers
cannot beat 1 by more than that.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

__all__ = ["main"]

READY = re.compile(r'worker\(s\) ready after ([0-9.]+) s')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='vlm_bench --replay-ray', description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', required=True, help='checkpoint directory (e.g. vlm_tiny_model --preset bench)')
    parser.add_argument('--bag', required=True, help='the bag (or folder of bags) both commands replay')
    parser.add_argument('--budgets', default='64', help='--budgets of vlm_replay (default 64)')
    parser.add_argument('--max-new-tokens', type=int, default=8, help='answer length (default 8)')
    parser.add_argument('--frames-per-task', type=int, help='--frames-per-task of vlm_replay (default its own)')
    parser.add_argument('--repeats', type=int, default=2, help='runs of each command (default 2)')
    return parser


def run_replay(args: argparse.Namespace, workers: int, out: pathlib.Path) -> dict:
    """One vlm_replay --ray command: wall clock, start-up and frames evaluated."""
    command = [sys.executable, '-m', 'zip_vlm_ros.replay', args.bag, '--out', str(out), '--model', args.model,
               '--budgets', args.budgets, '--max-new-tokens', str(args.max_new_tokens), '--ray',
               '--workers', str(workers), '--threads-per-worker', '1']
    if args.frames_per_task:
        command += ['--frames-per-task', str(args.frames_per_task)]
    start = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE='1'))
    wall_s = time.perf_counter() - start
    if finished.returncode != 0:
        raise SystemExit(f'vlm_replay failed ({finished.returncode}):\n{finished.stderr[-2000:]}')
    ready = READY.search(finished.stderr)
    rows = [json.loads(line) for line in (out / 'results.jsonl').read_text(encoding='utf-8').splitlines()]
    frames = len({(row['bag'], row['topic'], row['index']) for row in rows})
    return {'workers': workers, 'wall_s': wall_s, 'startup_s': float(ready.group(1)) if ready else float('nan'),
            'frames': frames, 'frames_per_s': frames / wall_s}


def _spin(iterations: int) -> float:
    start = time.perf_counter()
    total = 0
    for step in range(iterations):
        total += step * step
    return time.perf_counter() - start


def parallel_cpu(iterations: int = 20_000_000) -> float:
    """Work done per second by 2 processes at once over 1 process alone (2.0 on two free cores)."""
    alone_s = _spin(iterations)
    with multiprocessing.Pool(2) as pool:
        start = time.perf_counter()
        pool.map(_spin, [iterations, iterations])
        together_s = time.perf_counter() - start
    return 2 * alone_s / together_s


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    load_start = os.getloadavg()[0]
    cpu_before = parallel_cpu()
    runs = []
    with tempfile.TemporaryDirectory(prefix='ray_replay_bench_') as scratch:
        for repeat in range(args.repeats):
            for workers in (1, 2) if repeat % 2 == 0 else (2, 1):
                runs.append(run_replay(args, workers, pathlib.Path(scratch) / f'{repeat}_{workers}'))
                print(f'  workers {workers}: {runs[-1]["wall_s"]:.1f} s, {runs[-1]["frames"]} frames', flush=True)
    print(f'\nvlm_bench --replay-ray: {args.bag}, model {args.model}, budgets {args.budgets}, '
          f'{args.max_new_tokens} new tokens, 1 torch thread per worker\n')
    print(f'{"workers":>7}  {"wall s":>7}  {"start-up s":>10}  {"frames":>6}  {"frames/s":>8}')
    for run in runs:
        print(f'{run["workers"]:>7}  {run["wall_s"]:>7.1f}  {run["startup_s"]:>10.1f}  {run["frames"]:>6}  '
              f'{run["frames_per_s"]:>8.3f}')
    # Ratios of the runs made side by side (repeat r of each command)
    ones, twos = ([run for run in runs if run['workers'] == workers] for workers in (1, 2))
    ratios = [two['frames_per_s'] / one['frames_per_s'] for one, two in zip(ones, twos)]
    print('\nframes/s, 2 workers / 1 worker, per repeat: ' + ', '.join(f'{ratio:.2f}x' for ratio in ratios)
          + f' (range {min(ratios):.2f}-{max(ratios):.2f}x; target >= 1.6x)')
    print(f'parallel CPU available (2 processes / 1, pure Python): {cpu_before:.2f}x at start, '
          f'{parallel_cpu():.2f}x at end')
    print(f'load average (1 min): {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end')
    return 0


if __name__ == '__main__':
    sys.exit(main())
