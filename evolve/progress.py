"""What a run shows on the terminal: its own messages and where it is.

    2/5 rounds done | judge | held-out 12.5% | spend $1.44 | 48 images | 3m05s, ~4m10s left

On a terminal that is one live line, redrawn in place, with the run's
messages printed above it. Anywhere else (a pipe, CI, `ray job submit`'s job
log) there is no live line and no carriage return: the messages, plus one
plain line per finished round.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from typing import TextIO

from tqdm import tqdm


def _duration(s: float) -> str:
    s = round(s)
    h, m = divmod(s // 60, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s % 60:02d}s" if m else f"{s}s"


class Progress:
    """The run's terminal output. `say` prints a line that stays; `phase` and
    `update` change the status line; `close` ends it. Safe to call from
    several threads (the log handler may be fed by any of them)."""

    def __init__(self, total_rounds: int, max_wall_s: float | None = None, stream: TextIO | None = None,
                 live: bool | None = None, clock=time.monotonic, refresh_s: float = 1.0):
        # stderr, like tqdm and logging: stdout stays for the run's result (the final JSON line).
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.max_wall_s, self.clock = total_rounds, max_wall_s, clock
        self.done = 0  # rounds finished, counting those of earlier runs in this folder
        self.heldout: float | None = None
        self.spend: float | None = None
        self.images: int | None = None
        self.t0 = clock()
        self._rounds_t0 = self.t0  # when this process's first round began (see `start`)
        self._rounds_end = self.t0  # when its last one ended
        self._rounds_timed = 0  # rounds finished by this process
        self._phases: list[str] = []
        self._lock = threading.RLock()
        self._bar = None
        if live if live is not None else _live_terminal(self.stream):
            # bar_format "{desc}": tqdm only keeps the line (in place, cut to the
            # terminal's width so it never wraps); the text is ours.
            self._bar = tqdm(total=total_rounds, file=self.stream, bar_format="{desc}", leave=False,
                             dynamic_ncols=True, mininterval=0)
            self._stop = threading.Event()
            # The clock ticks between events too (a training phase can last minutes).
            self._ticker = threading.Thread(target=self._tick, args=(refresh_s,), name="progress", daemon=True)
            self._ticker.start()
            self._draw()

    # -- what the driver calls -------------------------------------------------
    def say(self, text: str) -> None:
        with self._lock:
            if self._bar is not None:
                tqdm.write(str(text), file=self.stream)  # clears the live line, prints, redraws it
            else:
                print(text, file=self.stream, flush=True)

    @contextlib.contextmanager
    def phase(self, name: str):
        with self._lock:
            self._phases.append(name)
            self._draw()
        try:
            yield
        finally:
            with self._lock:
                self._phases.remove(name)
                self._draw()

    def start(self, done: int = 0) -> None:
        """The rounds begin: `done` of them were finished by an earlier run in
        this folder (a resume). Round times count from here; without this call,
        from when Progress was made (the set-up then counts in the first round)."""
        with self._lock:
            self.done, self._rounds_t0 = done, self.clock()
            self._draw()

    def update(self, round: int | None = None, heldout: float | str | None = None, spend: float | None = None,
               images: int | None = None) -> None:
        """`round`: how many rounds are finished (the one just finished + 1);
        `heldout`: the last held-out accuracy (0-1), or a score in words; `spend`: dollars so far;
        `images`: teacher images bought so far."""
        with self._lock:
            self.heldout = heldout if heldout is not None else self.heldout
            self.spend = spend if spend is not None else self.spend
            self.images = images if images is not None else self.images
            finished = round is not None and round > self.done
            if finished:
                self._rounds_timed += round - self.done
                self._rounds_end = self.clock()
                self.done = round
            if self._bar is not None:
                self._draw()
            elif finished:  # no live line: one line per finished round
                print(self.status(finished=True), file=self.stream, flush=True)

    def close(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._stop.set()
                self._bar.close()  # leave=False: the live line goes, the messages above it stay
                self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def log_handler(self, level: int = logging.WARNING) -> logging.Handler:
        """A logging handler that says each record (for the run's own loggers)."""
        progress = self

        class _Say(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                progress.say(f"{record.levelname.lower()}: {record.getMessage()}")

        return _Say(level)

    # -- the status line -------------------------------------------------------
    def left_s(self) -> float | None:
        """Seconds left: the mean round time times the rounds left, and never
        past max_wall_s (the run stops at the end of the round that passes it)."""
        if self.done >= self.total:
            return None  # what is left (the final scoring, the report) is not a round: no guess
        est = None
        if self._rounds_timed:
            mean = (self._rounds_end - self._rounds_t0) / self._rounds_timed
            est = mean * max(0, self.total - self.done)
        if self.max_wall_s is not None:
            wall = max(0.0, self.max_wall_s - (self.clock() - self.t0))
            est = wall if est is None else min(est, wall)
        return est

    def status(self, finished: bool = False) -> str:
        """The status line; `finished`: the line printed as a round ends (no phase)."""
        # Rounds done, not "round i": the driver's messages number rounds from 0.
        parts = [f"{self.done}/{self.total} rounds done"]
        if self._phases and not finished:
            parts.append(self._phases[-1])
        if self.heldout is not None:  # an accuracy, or a score said in words ("alignment 0.44")
            parts.append(f"held-out {self.heldout:.1%}" if isinstance(self.heldout, float) else
                         f"held-out {self.heldout}")
        if self.spend is not None:
            parts.append(f"spend ${self.spend:.2f}")
        if self.images is not None:
            parts.append(f"{self.images} images")
        left = self.left_s()
        parts.append(_duration(self.clock() - self.t0) + ("" if left is None else f", ~{_duration(left)} left"))
        return " | ".join(parts)

    def _draw(self) -> None:
        if self._bar is not None:
            self._bar.set_description_str(self.status(), refresh=True)

    def _tick(self, every: float) -> None:
        while not self._stop.wait(every):
            with self._lock:
                self._draw()


def _live_terminal(stream) -> bool:
    """A terminal a live line can be drawn on: a TTY that knows its size (tqdm
    draws nothing on a pty left at 0 rows, as `script` without a size makes one)."""
    try:
        if not stream.isatty():
            return False
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):  # a TTY without a descriptor (a test's stand-in)
        return True
    return size.lines > 0 and size.columns > 0
