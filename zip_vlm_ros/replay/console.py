"""What vlm_replay prints while it runs: one tqdm progress bar on stderr and warnings above it."""
from __future__ import annotations

import sys

from tqdm import tqdm

PREFIX = 'vlm_replay'


def warn(message: str, *, level: str = 'warning') -> None:
    """One line on stderr, written above the progress bar (tqdm redraws the bar below it)."""
    tqdm.write(f'{PREFIX}: {level}: {message}', file=sys.stderr)


def note(message: str) -> None:
    tqdm.write(f'{PREFIX}: {message}', file=sys.stderr)


def progress_bar(total: int | None, unit: str) -> tqdm:
    """A bar on stderr: redrawn in place on a terminal, a line every few seconds in logs and CI.

    `total` is an estimate (frames that turn out malformed are taken off it as they are met); None
    when the bag cannot tell how many messages it holds.
    """
    interactive = sys.stderr.isatty()
    return tqdm(total=total, unit=f' {unit}', desc=PREFIX, file=sys.stderr, dynamic_ncols=interactive,
                mininterval=0.5 if interactive else 5.0, smoothing=0.1)
