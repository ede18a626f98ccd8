"""Progress of long benchmark work on stderr, through tqdm: a live bar on a terminal, and
complete lines, now and then, in a log.

    from pdserve.cluster.cli.progress import bar, note

    for rep in bar(range(reps), desc="kv_transfer reps", unit="rep"):
        ...
    note("[kv_transfer] results in /tmp/x")     # one line, above any live bar

``bar`` returns a ``tqdm`` bar writing to stderr. When stderr is a terminal it is redrawn
in place (at most every ``interval_s``, default 0.1 s). When stderr is anything else (a
file, a pipe, a CI log) the bar is written as one complete, newline-terminated line per
refresh, at most every ``LOG_INTERVAL_S`` seconds (or ``interval_s`` if longer), plus the
first and the final state: a log gets occasional readable lines, never a carriage return
or an endless line. ``note`` prints a line without tearing a live bar. Nothing here writes
to stdout, where the benchmarks print their results.
"""

from __future__ import annotations

import io
import re
import sys
import time
from collections.abc import Iterable

from tqdm import tqdm

LOG_INTERVAL_S = 10.0
TERMINAL_INTERVAL_S = 0.1
# No bar graphic in a log: the counts, times and rate are what a reader of the log needs.
LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class _Bar(tqdm):
    # tqdm's monitor thread would appear among the threads the soak counts in this process;
    # miniters=1 below makes every update check the interval, which is what it is for.
    monitor_interval = 0


class _LogLines(io.TextIOBase):
    """What tqdm writes, as complete lines: each refresh ("\\r" + status + padding) becomes
    one line; cursor returns, blank padding and empty lines are dropped."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s: str) -> int:
        lines = [part.rstrip() for part in re.split(r"[\r\n]", s) if part.strip()]
        if lines:
            self.stream.write("".join(f"{line}\n" for line in lines))
            self.stream.flush()
        return len(s)

    def flush(self) -> None:
        self.stream.flush()


def is_terminal(stream=None) -> bool:
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def bar(iterable: Iterable | None = None, *, desc: str, total: float | None = None,
        unit: str = "it", disable: bool = False, interval_s: float | None = None,
        **kwargs) -> tqdm:
    """A tqdm bar on stderr for this process's output (see the module docstring); extra
    keyword arguments go to ``tqdm`` (``postfix``, ``leave``, ...)."""
    if is_terminal():
        return _Bar(iterable, desc=desc, total=total, unit=unit, disable=disable,
                    file=sys.stderr, mininterval=interval_s or TERMINAL_INTERVAL_S,
                    miniters=1, dynamic_ncols=True, **kwargs)
    interval = max(LOG_INTERVAL_S, interval_s or 0.0)
    # position=0: a log line never moves the cursor up to redraw a bar above it.
    return _Bar(iterable, desc=desc, total=total, unit=unit, disable=disable,
                file=_LogLines(sys.stderr), mininterval=interval, maxinterval=interval,
                miniters=1, ascii=True, position=0, bar_format=LOG_FORMAT, **kwargs)


def refresh_due(progress: tqdm) -> None:
    """Redraw ``progress`` if its interval has passed since it was last drawn, even when its
    count has not moved (elapsed time and rate keep going while work is stuck)."""
    if progress.disable:
        return
    now = time.time()  # tqdm's clock
    if now - progress.last_print_t >= progress.mininterval:
        progress.refresh()
        # refresh() leaves these to update(), which would otherwise draw again at once.
        progress.last_print_t, progress.last_print_n = now, progress.n


def note(msg: str) -> None:
    """One line on stderr: above a live bar on a terminal; as it is in a log, where a bar
    holds no unfinished line."""
    if is_terminal():
        tqdm.write(msg, file=sys.stderr)
    else:
        print(msg, file=sys.stderr, flush=True)
