"""Progress of long steps (the reference log-prob pass, export, push, eval, win rates), with
rate and ETA.

A tqdm bar is drawn only where someone watches: stderr is a terminal, and this process is the
one that reports (rank 0). Elsewhere (a log file, CI, a launcher's other ranks) nothing is drawn
while the step runs, so logs hold no carriage-return debris; a step that took longer than
`LOG_AFTER_S` leaves one line with its count, time and rate instead. Bars and lines go to
stderr: stdout stays for results (`selm-train train --json-log` prints JSON lines there).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

LOG_AFTER_S = 5.0  # a quicker step leaves no line in a log: it is not worth one


def interactive() -> bool:
    """Whether a bar can be drawn: stderr is a terminal."""
    return sys.stderr.isatty()


def quiet_libraries() -> None:
    """In a log, turn off the bars of huggingface_hub, and so of transformers and datasets that
    draw theirs through it ("Loading weights", "Generating train split"). Call it before they
    are imported: they read HF_HUB_DISABLE_PROGRESS_BARS once; a value the user set stays."""
    if not interactive():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


class Steps:
    """Counts the units of one step; a tqdm bar on a terminal, one closing line in a log."""

    def __init__(self, desc: str, total: int | None, *, unit: str, show: bool) -> None:
        self.desc, self.total, self.unit, self.show = desc, total, unit, show
        self.done = 0
        self._start = time.monotonic()
        self._bar: Any = None
        if show and interactive():
            from tqdm import tqdm

            # A pty that reports no width (0 columns) would get an empty bar: 80 columns then.
            sized = shutil.get_terminal_size((0, 0)).columns > 0
            self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B",
                             unit_divisor=1024 if unit == "B" else 1000, dynamic_ncols=sized,
                             ncols=None if sized else 80, mininterval=0.5, file=sys.stderr)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> str | None:
        """Close the bar; in a log, write (and return) the closing line of a long step."""
        if self._bar is not None:
            self._bar.close()
            return None
        elapsed = time.monotonic() - self._start
        if not self.show or elapsed < LOG_AFTER_S:
            return None
        line = f"{self.desc}: {_amount(self.done, self.unit)} in {elapsed:.1f} s " \
               f"({_amount(self.done / elapsed, self.unit, rate=True)}/s)"
        print(line, file=sys.stderr, flush=True)
        return line


def _amount(value: float, unit: str, *, rate: bool = False) -> str:
    if unit == "B":
        return f"{value / 2**20:.1f} MiB"
    return f"{value:.3g} {unit}" if rate else f"{int(value)} {unit}"


@contextmanager
def steps(desc: str, total: int | None = None, *, unit: str = "it",
          show: bool = True) -> Iterator[Steps]:
    """`with steps("reference log-probs", n, unit="pairs", show=rank == 0) as s: s.update(k)`"""
    counter = Steps(desc, total, unit=unit, show=show)
    try:
        yield counter
    finally:
        counter.close()
