"""Progress bars that read well where they land: tqdm's live bar on a terminal; in a log file (Slurm, a
redirect, the demo's per-run logs) plain lines, one per tenth of the work, and never a carriage return.
"""
from __future__ import annotations

import os
import sys
import time
from typing import IO, Any, Iterable

from tqdm.auto import tqdm as terminal_tqdm
from tqdm.std import tqdm

LINES = 10  # a bar with a total: one line at the start, then one each time another 1/LINES is done
SECONDS_WITHOUT_TOTAL = 30.0  # a bar without a total: one line at most this often


def progress_bar(iterable: Iterable | None = None, *, desc: str, unit: str, total: int | None = None,
                 initial: int = 0, disable: bool = False, file: IO[str] | None = None) -> tqdm:
    """tqdm on a terminal (stderr by default), LogLines anywhere else."""
    stream = sys.stderr if file is None else file
    cls = terminal_tqdm if _is_terminal(stream) else LogLines
    return cls(iterable, desc=desc, unit=unit, total=total, initial=initial, disable=disable, file=stream)


def library_bars_only_on_a_terminal() -> None:
    """transformers' and huggingface_hub's own bars (weight loading, downloads) redraw with carriage returns:
    off when stderr is not a terminal. Before they are imported (they read it then); inherited by the ranks."""
    if not _is_terminal(sys.stderr):
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LogLines(tqdm):
    """tqdm that writes its usual status text as whole lines: at the start, at every tenth of the total
    (without a total: every SECONDS_WITHOUT_TOTAL s) and, if it moved since, when it closes."""

    def __init__(self, *args: Any, **kwargs: Any):
        self._line_n, self._line_t = None, 0.0  # progress and time of the last line written
        kwargs.update(ascii=True, leave=False, mininterval=0, miniters=1)  # every update reaches display()
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg is not None:  # tqdm clearing its line: nothing to clear in a log
            return False
        if self._line_n is None or self._next_line_due():
            self._write_line()
        return True

    def _next_line_due(self) -> bool:
        if not self.total:
            return time.monotonic() - self._line_t >= SECONDS_WITHOUT_TOTAL
        tenth = lambda n: int(n * LINES // self.total)  # noqa: E731
        return tenth(self.n) > tenth(self._line_n)

    def _write_line(self) -> None:
        self.fp.write(self.__str__() + "\n")
        self.fp.flush()
        self._line_n, self._line_t = self.n, time.monotonic()

    def clear(self, nolock: bool = False) -> None:  # tqdm.write() clears live bars with a carriage return
        pass

    def close(self) -> None:
        if not self.disable and self._line_n != self.n:
            self._write_line()
        super().close()
