"""Append-only purchase ledger: one JSON line per paid teacher image.

The ledger is what guarantees that no paid image is bought twice or dropped.
A gateway looks a request's key (teacher, prompt, seed, size) up here, and
checks that the store still holds the image, before it pays; it records the
purchase right after the image is stored. Each record is one `write` of a
whole line followed by fsync, under an exclusive `flock`, so several gateway
processes may share one ledger file.

A crash mid-write can leave a torn final line: on load it is dropped with a
warning (and cut off the file, so the next record starts on a clean line).
A bad line anywhere else means the file was damaged, and loading raises.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REQUIRED_FIELDS = ("teacher", "prompt", "seed", "size", "ref", "price", "ts")

Key = tuple[str, str, int, int]


class LedgerCorrupt(ValueError):
    """A line other than the last one cannot be read."""


def _key(teacher: str, prompt: str, seed: int, size: int) -> Key:
    return (teacher, prompt, int(seed), int(size))


def _check(entry: Any) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise ValueError(f"a ledger entry is a JSON object, got {type(entry).__name__}")
    missing = [k for k in REQUIRED_FIELDS if k not in entry]
    if missing:
        raise ValueError(f"ledger entry lacks {missing}")
    return entry


class Ledger:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._entries: list[dict[str, Any]] = []
        self._latest: dict[Key, dict[str, Any]] = {}
        self._spent: dict[str, float] = defaultdict(float)
        self._load()

    # -- reading -------------------------------------------------------------
    def lookup(self, teacher: str, prompt: str, seed: int, size: int) -> dict[str, Any] | None:
        """The latest purchase for this key, or None if it was never bought."""
        entry = self._latest.get(_key(teacher, prompt, seed, size))
        return dict(entry) if entry is not None else None

    def spent(self, teacher: str | None = None) -> float:
        if teacher is None:
            return sum(self._spent.values())
        return self._spent.get(teacher, 0.0)

    def entries(self) -> list[dict[str, Any]]:
        return [dict(e) for e in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    # -- writing -------------------------------------------------------------
    def record(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Append one purchase durably (fsync before returning)."""
        entry = dict(entry)
        entry.setdefault("ts", time.time())
        _check(entry)
        with self._lock:
            key = _key(entry["teacher"], entry["prompt"], entry["seed"], entry["size"])
            if key in self._latest:
                # Paid twice (e.g. the stored image went missing): record it anyway,
                # the money is spent; lookups see the newest ref.
                log.warning("ledger %s: key %s bought again", self.path, key)
            append_line(self.path, entry)
            self._add(entry)
        return dict(entry)

    # -- internals -----------------------------------------------------------
    def _add(self, entry: dict[str, Any]) -> None:
        self._entries.append(entry)
        self._latest[_key(entry["teacher"], entry["prompt"], entry["seed"], entry["size"])] = entry
        self._spent[entry["teacher"]] += float(entry["price"])

    def _load(self) -> None:
        for entry in read_lines(self.path, _check):
            self._add(entry)


JOB_STATES = ("open", "closed", "failed", "refused")


def _check_job(entry: Any) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise ValueError(f"a job-log entry is a JSON object, got {type(entry).__name__}")
    missing = [k for k in ("teacher", "prompt", "seed", "size", "state", "price", "ts") if k not in entry]
    if missing:
        raise ValueError(f"job-log entry lacks {missing}")
    if entry["state"] not in JOB_STATES:
        raise ValueError(f"job-log state must be one of {JOB_STATES}, got {entry['state']!r}")
    return entry


class JobLog:
    """What a gateway asked of a teacher beyond the ledger's finished purchases.

    One JSON line per change of a key's state, same durability as the ledger:
    - open: a billed job (submit-and-poll APIs, or an image behind a URL) whose
      image is not stored yet. Written before collecting, so a restarted gateway
      collects it (free) instead of submitting again (paid).
    - closed: its image is stored and in the ledger (which counts the price).
    - failed: billed, but no image will come (the job failed, or its URL expired).
    - refused: the teacher refused the prompt for good (content policy, bad
      request): not sent again, and recorded with the sample (with the price if
      the refusal came after a billed submit).
    `spent` counts every state but closed: the money the ledger does not show.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._latest: dict[Key, dict[str, Any]] = {}
        for entry in read_lines(self.path, _check_job):
            self._latest[_key(entry["teacher"], entry["prompt"], entry["seed"], entry["size"])] = entry

    def get(self, teacher: str, prompt: str, seed: int, size: int) -> dict[str, Any] | None:
        entry = self._latest.get(_key(teacher, prompt, seed, size))
        return dict(entry) if entry is not None else None

    def set(self, teacher: str, prompt: str, seed: int, size: int, state: str, price: float = 0.0,
            **fields: Any) -> dict[str, Any]:
        entry = _check_job({"teacher": teacher, "prompt": prompt, "seed": int(seed), "size": int(size),
                            "state": state, "price": float(price), "ts": time.time(), **fields})
        with self._lock:
            append_line(self.path, entry)
            self._latest[_key(teacher, prompt, seed, size)] = entry
        return dict(entry)

    def spent(self, teacher: str | None = None) -> float:
        return sum(e["price"] for e in self._latest.values()
                   if e["state"] != "closed" and teacher in (None, e["teacher"]))

    def entries(self, state: str | None = None) -> list[dict[str, Any]]:
        return [dict(e) for e in self._latest.values() if state in (None, e["state"])]


def append_line(path: Path, entry: dict[str, Any]) -> None:
    """Append one JSON line durably: one write of the whole line, under an
    exclusive flock (several processes may share the file), then fsync."""
    line = (json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)  # also releases the flock


def read_lines(path: Path, check) -> list[dict[str, Any]]:
    """The records of an append-only JSON-lines file, each passed through `check`.
    A torn final line (a crash mid-write) is dropped and cut off the file; a bad
    line anywhere else raises LedgerCorrupt."""
    out: list[dict[str, Any]] = []
    if not path.exists():
        return out
    with open(path, "r+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # no other process appends while we may truncate
        data = f.read()
        lines = data.split(b"\n")
        # Index of the last line with content: only that one may be torn.
        last = max((i for i, raw in enumerate(lines) if raw.strip()), default=-1)
        offset = 0
        for i, raw in enumerate(lines):
            start, offset = offset, offset + len(raw) + 1
            if not raw.strip():
                continue
            try:
                entry = check(json.loads(raw))
            except (ValueError, UnicodeDecodeError) as exc:
                if i == last:
                    log.warning("ledger %s: dropping torn final line %d (%d bytes): %s",
                                path, i + 1, len(raw), exc)
                    f.truncate(start)
                    os.fsync(f.fileno())
                    break
                raise LedgerCorrupt(f"ledger {path}: line {i + 1} is corrupt "
                                    f"and is not the last line: {exc}") from None
            out.append(entry)
        else:
            if data and not data.endswith(b"\n"):
                # A complete last record without its newline: end the line so the
                # next append does not run into it.
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
    return out
