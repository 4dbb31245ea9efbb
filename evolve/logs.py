"""Ray's output goes to the run folder, the run's own to the terminal.

Everything Ray shows on a driver's terminal is written, in this process, to
`sys.stdout` / `sys.stderr`:
  - worker and actor output that Ray forwards (`log_to_driver`: Serve's
    request log, Train's controller and workers, raylet warnings, tracebacks
    of Ray's own actors), printed to whatever `sys.stdout`/`sys.stderr` is at
    the time (ray/_private/worker.py `print_to_stdstream`);
  - the driver's loggers: `ray` (and Ray Data's console) through a
    `PlainRayHandler`, Serve's through a StreamHandler; each keeps the
    `sys.stderr` of when it was made (PlainRayHandler's docstring says it
    follows `sys.stderr`, but it emits to `self.stream`: ray/_private/log.py;
    serve/_private/logging_utils.py `configure_component_logger`);
  - Python warnings (`warnings.showwarning` writes to `sys.stderr`).
So pointing both streams, and any log handler already holding one, at one
file moves all of it, in order, without naming each source. File
descriptors 1 and 2 are left alone: what reaches them directly (a C++ fatal
error, a crash) still shows on the terminal.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path


class RunLogs:
    """`with RunLogs(run_dir / "logs", verbose):` sends Ray's output to
    `logs/ray.log` (unless verbose); `out` and `err` stay the terminal's.

    Shut Ray down inside the block: `ray.shutdown()` prints the last forwarded
    lines it held back (its log deduplication) to the streams of that moment."""

    def __init__(self, log_dir: Path | None, verbose: bool = False):
        self.out, self.err = sys.stdout, sys.stderr
        self.path = None if verbose or log_dir is None else Path(log_dir) / "ray.log"
        self.file = None

    def __enter__(self) -> RunLogs:
        if self.path is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Line-buffered: a run killed with -9 keeps all but its last line.
        self.file = open(self.path, "a", buffering=1, encoding="utf-8", errors="replace")
        self._colour = os.environ.get("RAY_COLOR_PREFIX")
        os.environ["RAY_COLOR_PREFIX"] = "0"  # forwarded lines without ANSI colours (read per line)
        sys.stdout = sys.stderr = self.file
        _retarget((self.out, self.err), self.file)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.file is None:
            return
        if exc is not None and not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            # The caller shows it on the terminal; here it sits beside Ray's side of it.
            traceback.print_exception(exc_type, exc, tb, file=self.file)
        sys.stdout, sys.stderr = self.out, self.err
        _retarget((self.file,), self.err)
        if self._colour is None:
            os.environ.pop("RAY_COLOR_PREFIX", None)
        else:
            os.environ["RAY_COLOR_PREFIX"] = self._colour
        self.file.close()
        self.file = None


def _retarget(old: tuple, new) -> None:
    """Point every logging StreamHandler writing to one of `old` at `new`
    (handlers keep the stream they were made with)."""
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and any(getattr(h, "stream", None) is o for o in old):
                h.setStream(new)
