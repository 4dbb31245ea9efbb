"""The purchase ledger: one SQLite file of every paid (or possibly paid) teacher call.

It is what guarantees that no paid image is bought twice or dropped, and what
counts the spend. Each call to a teacher is a row of `calls`, found by its key
(teacher, prompt, seed, size) through an index on a 64-bit hash of the key;
`totals` holds per teacher the images bought and the money spent, changed in
the same transaction as every row, so counts and spend are O(1) reads.

Money: `sending` and `uncertain` calls (sent, no answer: the provider may or
may not have billed) count as uncertain spend; `open`, `bought`, `failed` and
`refused` as certain; `unbilled` as nothing (totals are kept to 1e-9).

Every write is one `BEGIN IMMEDIATE ... COMMIT` (WAL, synchronous=FULL): it is
durable when it returns and never half-written, and several processes on one
host may share the file. A crash loses at most the call in flight, whose row
then shows `sending`. A new ledger imports, once, the JSON-lines ledger
(`ledger.jsonl`, `ledger.jobs.jsonl`) that older versions kept in its folder.

A mirror (`Ledger(path, mirror=...)`, a folder of an object store or of a
shared mount) keeps the ledger on storage that outlives this host. SQLite
cannot live on an object store (and SQLite advises against network
filesystems), so the file stays on local disk and every write transaction,
before it commits, PUTs one immutable journal object `journal/<epoch>/<seq>.json`
holding the rows it changed as they are after it (the seq is counted in the
file's meta in that same transaction). A change is thus on the mirror before
its method returns; if the PUT fails the transaction rolls back and the method
raises. A crash after the PUT and before the COMMIT leaves that entry on the
mirror only: the next open of the file applies it (the change had been made
as far as the caller's side goes), unless a later write took its seq first.
`checkpoint()` uploads a consistent copy of the file (`snapshot.sqlite`,
then `snapshot.json` naming its seq) and deletes the journal it covers. Opening
a mirrored ledger whose file is missing or older than its mirror (a new head
node, a resume elsewhere) restores the snapshot and replays the journal in
one transaction. Replay writes each row whole and moves its weight in `totals`
from the row's state before to its state after, so replaying an entry twice
changes nothing. A file that has been mirrored remembers its mirror, so a
process opening it without one (a gateway on the same host) journals too.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from evolve.storage import Storage

log = logging.getLogger(__name__)
_json_str = json.encoder.encode_basestring_ascii  # what json.dumps writes for a str

REQUIRED_FIELDS = ("teacher", "prompt", "seed", "size", "ref", "price", "ts")   # for record()
CALL_STATES = ("sending", "uncertain", "unbilled", "open", "bought", "failed", "refused")

_UNCERTAIN = ("sending", "uncertain")
_PENDING = ("sending", "open")  # the states the partial index `calls_pending` holds
_SCHEMA_VERSION = 1
_FORMAT = "evolve-ledger"
_COLUMNS = ("id", "teacher", "prompt", "seed", "size", "state", "price", "ref", "ts")
_SELECT = "SELECT id, teacher, prompt, seed, size, state, price, ref, ts, extra FROM calls"
_RESERVED = frozenset(_COLUMNS) | {"khash", "extra", "call"}  # never names of extra fields
_KEY_MATCH = "khash = ? AND teacher = ? AND prompt = ? AND seed = ? AND size = ?"
_DECIMALS = 9  # money totals are kept rounded to 1e-9, so adding and taking away leave no residue

_DDL = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE calls (
    id INTEGER PRIMARY KEY,
    khash INTEGER NOT NULL,
    teacher TEXT NOT NULL,
    prompt TEXT NOT NULL,
    seed INTEGER NOT NULL,
    size INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ({", ".join(f"'{s}'" for s in CALL_STATES)})),
    price REAL NOT NULL,
    ref TEXT,
    ts REAL NOT NULL,
    extra TEXT
);
CREATE INDEX calls_khash ON calls (khash);
CREATE INDEX calls_pending ON calls (teacher, state) WHERE state IN ('sending', 'open');
CREATE TABLE totals (
    teacher TEXT PRIMARY KEY,
    images INTEGER NOT NULL DEFAULT 0,
    certain REAL NOT NULL DEFAULT 0,
    uncertain REAL NOT NULL DEFAULT 0,
    uncertain_calls INTEGER NOT NULL DEFAULT 0
);
"""

_BUMP = f"""
INSERT INTO totals (teacher, images, certain, uncertain, uncertain_calls)
VALUES (?, ?, round(?, {_DECIMALS}), round(?, {_DECIMALS}), ?)
ON CONFLICT (teacher) DO UPDATE SET
    images = images + excluded.images,
    certain = round(certain + excluded.certain, {_DECIMALS}),
    uncertain = round(uncertain + excluded.uncertain, {_DECIMALS}),
    uncertain_calls = uncertain_calls + excluded.uncertain_calls
"""

# -- the mirror ----------------------------------------------------------------
_ROW = ("id", "khash", "teacher", "prompt", "seed", "size", "state", "price", "ref", "ts", "extra")
_ROW_SELECT = f"SELECT {', '.join(_ROW)} FROM calls"
_UPSERT = (f"INSERT INTO calls ({', '.join(_ROW)}) VALUES ({', '.join('?' * len(_ROW))}) "
           f"ON CONFLICT (id) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in _ROW[1:])}")
_JOURNAL_FORMAT = "evolve-ledger-journal"
_JOURNAL_ENTRY = re.compile(r"^(\d{16})/(\d{16})\.json$")   # <epoch>/<seq>.json below journal/
# Temporary (this connection's own, not in the file) triggers note every row a
# transaction changes, so whatever writes `calls` is journaled.
_TRACK = """
CREATE TEMP TABLE IF NOT EXISTS ledger_changed (id INTEGER PRIMARY KEY);
CREATE TEMP TRIGGER IF NOT EXISTS ledger_changed_insert AFTER INSERT ON main.calls
    BEGIN INSERT INTO ledger_changed (id) SELECT new.id WHERE NOT EXISTS (SELECT 1 FROM ledger_changed WHERE id = new.id); END;
CREATE TEMP TRIGGER IF NOT EXISTS ledger_changed_update AFTER UPDATE ON main.calls
    BEGIN INSERT INTO ledger_changed (id) SELECT new.id WHERE NOT EXISTS (SELECT 1 FROM ledger_changed WHERE id = new.id); END;
CREATE TEMP TRIGGER IF NOT EXISTS ledger_changed_delete AFTER DELETE ON main.calls
    BEGIN INSERT INTO ledger_changed (id) SELECT old.id WHERE NOT EXISTS (SELECT 1 FROM ledger_changed WHERE id = old.id); END;
"""
# (Not INSERT OR IGNORE: an outer statement's conflict clause overrides a trigger's.)
# No write changes a row's id, so an update notes new.id only.

_LEGACY_JOB_STATES = ("open", "closed", "failed", "refused")
_LEGACY_JOB_FIELDS = ("teacher", "prompt", "seed", "size", "state", "price", "ts")


class LedgerCorrupt(ValueError):
    """The file is not a ledger, or a legacy JSON-lines ledger has a bad line that is not its last."""


class LedgerMirrorError(OSError):
    """The mirror could not be written or read: the change was not made (rolled back)."""


@dataclass(frozen=True)
class Totals:
    """One teacher's (or all teachers') figures: images bought, money billed
    (certain), money perhaps billed (uncertain), and calls in sending|uncertain."""

    images: int
    certain: float
    uncertain: float
    uncertain_calls: int

    @property
    def spent(self) -> float:
        return self.certain + self.uncertain


def khash(teacher: str, prompt: str, seed: int, size: int) -> int:
    """The indexed hash of a key: the first 8 bytes of sha256(json.dumps(key)), as a signed int64."""
    # Exactly json.dumps([teacher, prompt, int(seed), int(size)]), written out (3x faster).
    text = f"[{_json_str(teacher)}, {_json_str(prompt)}, {int(seed)!r}, {int(size)!r}]"
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _weight(state: str, price: float) -> tuple[int, float, float, int]:
    """What one row adds to its teacher's totals: (images, certain, uncertain, uncertain_calls)."""
    if state in _UNCERTAIN:
        return 0, 0.0, price, 1
    if state == "unbilled":
        return 0, 0.0, 0.0, 0
    return int(state == "bought"), price, 0.0, 0


def _check_state(state: str) -> str:
    if state not in CALL_STATES:
        raise ValueError(f"a call's state is one of {CALL_STATES}, got {state!r}")
    return state


def _check_extra(fields: dict[str, Any]) -> dict[str, Any]:
    clash = sorted(set(fields) & _RESERVED)
    if clash:
        raise ValueError(f"{clash} are ledger columns, not extra fields")
    return fields


def _dump(extra: dict[str, Any]) -> str | None:
    if not extra:
        return None
    try:
        return json.dumps(extra, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"ledger extra fields must be JSON values: {exc}") from None


def _row_dict(row: tuple) -> dict[str, Any]:
    out = dict(zip(_COLUMNS, row[:-1]))
    if row[-1]:
        out.update(json.loads(row[-1]))
    return out


def _entry_dict(row: tuple) -> dict[str, Any]:
    _id, teacher, prompt, seed, size, _state, price, ref, ts, extra = row
    out = {"teacher": teacher, "prompt": prompt, "seed": seed, "size": size, "ref": ref, "price": price, "ts": ts}
    if extra:
        out.update(json.loads(extra))
    return out


class Ledger:
    def __init__(self, path: Path | str, mirror: Storage | str | None = None) -> None:
        """The ledger in the local SQLite file `path`. `mirror`: a folder (a
        Storage, or a URI such as `s3://bucket/run/ledger`) where every change is
        journaled before it returns, and from which a missing or older file is
        restored; None: the mirror the file remembers, if any, else none."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._con = self._open()
        self.mirror: Storage | None = None
        self._mirror_id: str | None = None
        try:
            if mirror is None:
                mirror = self._meta(self._con, "mirror")  # mirrored before: every writer journals
            if mirror is not None:
                self._attach(mirror)
        except BaseException:
            self._con.close()
            raise

    # -- purchases -----------------------------------------------------------
    def lookup(self, teacher: str, prompt: str, seed: int, size: int) -> dict[str, Any] | None:
        """The newest purchase (`bought` row) of this key as an entry dict, or None."""
        with self._lock:
            row = self._con.execute(
                f"{_SELECT} WHERE {_KEY_MATCH} AND state = 'bought' ORDER BY id DESC LIMIT 1",
                self._key_args(teacher, prompt, seed, size)).fetchone()
        return _entry_dict(row) if row is not None else None

    def record(self, entry: dict[str, Any]) -> dict[str, Any]:
        """A bought image, durable when this returns. `entry` holds REQUIRED_FIELDS
        (`ts` may be left out: now) and any extra fields (flaws, native_size...).
        With `"call": id` (from begin) that call becomes `bought`; without, a new row."""
        if not isinstance(entry, dict):
            raise ValueError(f"a ledger entry is a dict, got {type(entry).__name__}")
        entry = dict(entry)
        call = entry.pop("call", None)
        entry.setdefault("ts", time.time())
        missing = [k for k in REQUIRED_FIELDS if k not in entry]
        if missing:
            raise ValueError(f"ledger entry lacks {missing}")
        teacher, prompt, seed, size = entry["teacher"], entry["prompt"], int(entry["seed"]), int(entry["size"])
        ref, price, ts = entry["ref"], float(entry["price"]), float(entry["ts"])
        extra = _check_extra({k: v for k, v in entry.items() if k not in REQUIRED_FIELDS})
        args = self._key_args(teacher, prompt, seed, size)
        with self._write() as con:
            if call is not None:
                old = self._row(con, call)
                if (old[1], old[2], old[3], old[4]) != (teacher, prompt, seed, size):
                    raise ValueError(f"ledger {self.path}: call {call} is for {old[1:5]}, "
                                     f"not {(teacher, prompt, seed, size)}")
            again = con.execute(f"SELECT id FROM calls WHERE {_KEY_MATCH} AND state = 'bought' AND id != ? LIMIT 1",
                                (*args, -1 if call is None else int(call))).fetchone()
            if again is not None:
                # Paid twice (e.g. the stored image went missing): recorded anyway, the
                # money is spent; lookups see the newest ref.
                log.warning("ledger %s: key %s bought again", self.path, (teacher, prompt, seed, size))
            if call is None:
                con.execute("INSERT INTO calls (khash, teacher, prompt, seed, size, state, price, ref, ts, extra) "
                            "VALUES (?, ?, ?, ?, ?, 'bought', ?, ?, ?, ?)", (*args, price, ref, ts, _dump(extra)))
                self._bump(con, teacher, None, ("bought", price))
            else:
                extra = {**(json.loads(old[9]) if old[9] else {}), **extra}
                con.execute("UPDATE calls SET state = 'bought', price = ?, ref = ?, ts = ?, extra = ? WHERE id = ?",
                            (price, ref, ts, _dump(extra), int(call)))
                self._bump(con, teacher, (old[5], old[6]), ("bought", price))
        return {"teacher": teacher, "prompt": prompt, "seed": seed, "size": size, "ref": ref, "price": price,
                "ts": ts, **extra}

    def entries(self, teacher: str | None = None) -> list[dict[str, Any]]:
        """Every purchase (`bought` rows), in the order they were made."""
        where, args = ("AND teacher = ?", (teacher,)) if teacher is not None else ("", ())
        with self._lock:
            return [_entry_dict(r) for r in self._con.execute(
                f"{_SELECT} WHERE state = 'bought' {where} ORDER BY id", args)]

    def __len__(self) -> int:
        """Images bought, every teacher."""
        return self.totals().images

    def spent(self, teacher: str | None = None) -> float:
        """Money certainly or perhaps billed: one teacher's, or every teacher's."""
        return self.totals(teacher).spent

    def totals(self, teacher: str | None = None) -> Totals:
        with self._lock:
            if teacher is not None:
                row = self._con.execute("SELECT images, certain, uncertain, uncertain_calls FROM totals "
                                        "WHERE teacher = ?", (teacher,)).fetchone()
            else:
                row = self._con.execute("SELECT COALESCE(SUM(images), 0), COALESCE(SUM(certain), 0.0), "
                                        "COALESCE(SUM(uncertain), 0.0), COALESCE(SUM(uncertain_calls), 0) "
                                        "FROM totals").fetchone()
        if row is None:
            return Totals(0, 0.0, 0.0, 0)
        return Totals(int(row[0]), round(float(row[1]), _DECIMALS), round(float(row[2]), _DECIMALS), int(row[3]))

    def teachers(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._con.execute("SELECT teacher FROM totals ORDER BY teacher")]

    # -- calls ---------------------------------------------------------------
    def begin(self, teacher: str, prompt: str, seed: int, size: int, price: float, **fields: Any) -> int:
        """A call about to go out: a new `sending` row (its price counted as uncertain). Returns its id."""
        ts = float(fields.pop("ts", time.time()))
        extra = _dump(_check_extra(fields))
        seed, size, price = int(seed), int(size), float(price)
        with self._write() as con:
            cur = con.execute("INSERT INTO calls (khash, teacher, prompt, seed, size, state, price, ref, ts, extra) "
                              "VALUES (?, ?, ?, ?, ?, 'sending', ?, NULL, ?, ?)",
                              (*self._key_args(teacher, prompt, seed, size), price, ts, extra))
            self._bump(con, teacher, None, ("sending", price))
            return int(cur.lastrowid)

    def mark(self, call: int, state: str, *, price: float | None = None, **fields: Any) -> None:
        """Move a call to `state`; `price` (if given) replaces its price; `fields` are
        merged into its extra fields (`ref` and `ts` set those columns; ts defaults to now)."""
        _check_state(state)
        ts = float(fields.pop("ts", time.time()))
        has_ref, ref = "ref" in fields, fields.pop("ref", None)
        _check_extra(fields)
        with self._write() as con:
            old = self._row(con, call)
            new_price = old[6] if price is None else float(price)
            new_ref = ref if has_ref else old[7]
            if state == "bought" and new_ref is None:
                raise ValueError(f"ledger {self.path}: call {call} cannot be bought without a ref "
                                 f"(record(entry with 'call') stores a purchase)")
            extra = {**(json.loads(old[9]) if old[9] else {}), **fields}
            con.execute("UPDATE calls SET state = ?, price = ?, ref = ?, ts = ?, extra = ? WHERE id = ?",
                        (state, new_price, new_ref, ts, _dump(extra), int(call)))
            self._bump(con, old[1], (old[5], old[6]), (state, new_price))

    def call(self, call: int) -> dict[str, Any]:
        """One call's row: {id, teacher, prompt, seed, size, state, price, ref, ts, **extra}."""
        with self._lock:
            return _row_dict(self._row(self._con, call))

    def calls(self, teacher: str, prompt: str, seed: int, size: int) -> list[dict[str, Any]]:
        """Every call of one key, oldest first."""
        with self._lock:
            return [_row_dict(r) for r in self._con.execute(
                f"{_SELECT} WHERE {_KEY_MATCH} ORDER BY id", self._key_args(teacher, prompt, seed, size))]

    def calls_in(self, teacher: str, states: tuple[str, ...]) -> list[dict[str, Any]]:
        """One teacher's calls in any of `states`, oldest first. Served by a small
        index for sending/open; other states are a scan of the whole table."""
        states = (states,) if isinstance(states, str) else tuple(states)
        for s in states:
            _check_state(s)
        if not states:
            return []
        sql = f"{_SELECT} WHERE teacher = ? AND state IN ({', '.join('?' * len(states))})"
        if set(states) <= set(_PENDING):
            sql += " AND state IN ('sending', 'open')"  # the partial index's own condition, so it is used
        with self._lock:
            return [_row_dict(r) for r in self._con.execute(sql + " ORDER BY id", (teacher, *states))]

    def close(self) -> None:
        with self._lock:
            self._con.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- internals -----------------------------------------------------------
    @staticmethod
    def _key_args(teacher: str, prompt: str, seed: int, size: int) -> tuple:
        return khash(teacher, prompt, seed, size), teacher, prompt, int(seed), int(size)

    def _row(self, con: sqlite3.Connection, call: int) -> tuple:
        row = con.execute(f"{_SELECT} WHERE id = ?", (int(call),)).fetchone()
        if row is None:
            raise KeyError(f"ledger {self.path}: no call {call}")
        return row

    @staticmethod
    def _bump(con: sqlite3.Connection, teacher: str, old: tuple[str, float] | None, new: tuple[str, float]) -> None:
        """Move a row's weight in `totals` from (old state, old price) to the new ones."""
        before = _weight(*old) if old is not None else (0, 0.0, 0.0, 0)
        after = _weight(*new)
        con.execute(_BUMP, (teacher, *(a - b for a, b in zip(after, before))))

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction on this ledger's connection; with a mirror, the
        rows it changed are journaled on the mirror before it commits."""
        with self._lock, _transaction(self._con) as con:
            yield con
            if self.mirror is not None:
                self._journal(con)

    # -- the mirror ------------------------------------------------------------
    def checkpoint(self) -> int:
        """Upload a consistent copy of the ledger to the mirror and delete the
        journal it covers; returns the seq (the count of journaled changes) it
        holds. Writers go on meanwhile (they wait only for a local copy)."""
        if self.mirror is None:
            raise ValueError(f"ledger {self.path} has no mirror")
        with self._mirror_lock():
            return self._checkpoint()

    @property
    def journal_length(self) -> int:
        """Changes journaled on the mirror since its last snapshot: what a restore replays."""
        with self._lock:
            return (int(self._meta(self._con, "mirror_seq") or 0)
                    - int(self._meta(self._con, "mirror_epoch") or 0))

    @property
    def mirror_seq(self) -> int:
        """The seq of the last journaled change this file holds (0 without a mirror)."""
        with self._lock:
            return int(self._meta(self._con, "mirror_seq") or 0)

    @staticmethod
    def _meta(con: sqlite3.Connection, key: str) -> str | None:
        row = con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    @staticmethod
    def _set_meta(con: sqlite3.Connection, key: str, value: Any) -> None:
        con.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (key, str(value)))

    def _journal(self, con: sqlite3.Connection) -> None:
        """Inside the write transaction, before COMMIT: PUT the changed rows as one
        journal object. A failed PUT raises, and the transaction rolls back."""
        ids = [r[0] for r in con.execute("SELECT id FROM temp.ledger_changed ORDER BY id")]
        if not ids:
            return
        rows = {r[0]: r for r in con.execute(f"{_ROW_SELECT} WHERE id IN (SELECT id FROM temp.ledger_changed)")}
        con.execute("DELETE FROM temp.ledger_changed")
        seq = int(self._meta(con, "mirror_seq") or 0) + 1
        epoch = int(self._meta(con, "mirror_epoch") or 0)
        self._set_meta(con, "mirror_seq", seq)
        body = {"format": _JOURNAL_FORMAT, "id": self._mirror_id, "seq": seq, "ts": time.time(),
                "calls": [list(rows[i]) for i in ids if i in rows], "deleted": [i for i in ids if i not in rows]}
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        try:
            self.mirror.write_atomic(_journal_name(epoch, seq), data)
        except OSError as exc:
            raise LedgerMirrorError(f"ledger {self.path}: change not made, its journal entry {seq} could not be "
                                    f"written to {self.mirror.uri()}: {exc}") from None

    @contextmanager
    def _mirror_lock(self) -> Iterator[None]:
        """This host's lock on restoring and checkpointing this file (all its writers share the host)."""
        with open(self.path.with_name(self.path.name + ".mirror-lock"), "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _attach(self, mirror: Storage | str) -> None:
        from evolve.storage import Storage

        storage = Storage.at(mirror)
        self.mirror = None  # nothing is journaled until the file and the mirror agree
        with self._mirror_lock():
            seed = self._sync(storage)
            with self._lock, _transaction(self._con) as con:
                if self._meta(con, "mirror") != storage.uri():
                    self._set_meta(con, "mirror", storage.uri())
                self._mirror_id = self._meta(con, "mirror_id")
            for stmt in _TRACK.split(";\n"):
                if stmt.strip():
                    self._con.execute(stmt)
            self.mirror = storage
            if seed:  # a new mirror (or an emptied or lagging one): a snapshot of this file
                self._checkpoint()

    def _remote_snapshot(self, storage: Storage) -> dict[str, Any] | None:
        try:
            info = json.loads(storage.read("snapshot.json"))
        except FileNotFoundError:
            return None
        if info.get("format") != _FORMAT or "id" not in info:
            raise LedgerCorrupt(f"{storage.uri('snapshot.json')} is not a ledger snapshot's description")
        return info

    @staticmethod
    def _remote_journal(storage: Storage) -> dict[int, str]:
        """seq -> journal object; a seq written twice (a crash between PUT and COMMIT,
        then the same seq again later) is the one of the newest epoch."""
        out: dict[int, tuple[int, str]] = {}
        for rel in storage.walk("journal"):
            m = _JOURNAL_ENTRY.match(rel)
            if m:
                epoch, seq = int(m.group(1)), int(m.group(2))
                if seq not in out or out[seq][0] < epoch:
                    out[seq] = (epoch, f"journal/{rel}")
        return {seq: name for seq, (_, name) in sorted(out.items())}

    def _sync(self, storage: Storage) -> bool:
        """Bring the local file up to the mirror (under the host's mirror lock).
        True if the mirror then needs a snapshot of the file (it has none, or is behind)."""
        where = storage.uri()
        for _attempt in range(5):
            info = self._remote_snapshot(storage)
            journal = self._remote_journal(storage)
            with self._lock:
                local_id = self._meta(self._con, "mirror_id")
                local_seq = int(self._meta(self._con, "mirror_seq") or 0)
                has_rows = self._con.execute("SELECT 1 FROM calls LIMIT 1").fetchone() is not None
            if info is None:
                if journal:
                    raise LedgerCorrupt(f"ledger mirror {where} has a journal but no snapshot.json")
                with self._lock, _transaction(self._con) as con:
                    if local_id is None:
                        self._set_meta(con, "mirror_id", uuid.uuid4().hex)
                        self._set_meta(con, "mirror_seq", local_seq)
                    else:
                        log.warning("ledger %s: its mirror %s is empty; seeding it with this file", self.path, where)
                return True
            remote_id, snap_seq = info["id"], int(info["seq"])
            head = max([snap_seq, *journal])
            if local_id is None and has_rows:
                raise LedgerCorrupt(f"ledger {self.path} holds calls but was never mirrored, and {where} holds "
                                    f"another ledger: refusing to replace one with the other")
            if local_id is not None and local_id != remote_id:
                raise LedgerCorrupt(f"ledger {self.path} is mirrored to another mirror than {where} "
                                    f"(ids {local_id} and {remote_id})")
            if local_id is not None and local_seq >= head:
                if local_seq > head:
                    log.warning("ledger %s: its mirror %s is behind it (seq %d < %d); a checkpoint catches it up",
                                self.path, where, head, local_seq)
                return local_seq > head
            full = local_id is None or local_seq < snap_seq
            base = None
            try:
                if full:
                    base = self._download_snapshot(storage, remote_id)
                    start = base[1]
                else:
                    start = local_seq
                todo = [s for s in journal if s > start]
                if todo != list(range(start + 1, start + 1 + len(todo))):
                    continue  # a checkpoint moved on meanwhile: read the mirror again
                entries = []
                for seq in todo:
                    body = json.loads(storage.read(journal[seq]))
                    if body.get("format") != _JOURNAL_FORMAT or body.get("id") != remote_id or body.get("seq") != seq:
                        raise LedgerCorrupt(f"{storage.uri(journal[seq])} is not entry {seq} of this ledger's journal")
                    entries.append(body)
                if not self._restore(base[0] if base else None, entries, start, remote_id):
                    continue  # another process on this host wrote meanwhile: look again
            finally:
                if base is not None:
                    _remove_db(base[0])
            log.info("ledger %s: %s from %s up to seq %d (%d journal entries)", self.path,
                     "restored" if full else "caught up", where, start + len(entries), len(entries))
            return False
        raise LedgerMirrorError(f"ledger mirror {where}: its journal does not follow on from its snapshot "
                                f"(checked 5 times)")

    def _download_snapshot(self, storage: Storage, remote_id: str) -> tuple[Path, int]:
        """The mirror's snapshot as a temporary local file, and the seq it holds."""
        fd, name = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.restore-", suffix=".sqlite")
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(storage.read("snapshot.sqlite"))
            con = sqlite3.connect(tmp)
            try:
                meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
            except sqlite3.DatabaseError as exc:
                raise LedgerCorrupt(f"{storage.uri('snapshot.sqlite')} is not a ledger database ({exc})") from None
            finally:
                con.close()
            if meta.get("format") != _FORMAT or meta.get("mirror_id") != remote_id:
                raise LedgerCorrupt(f"{storage.uri('snapshot.sqlite')} is not this mirror's ledger snapshot")
            if int(meta.get("schema", 0)) > _SCHEMA_VERSION:
                raise LedgerCorrupt(f"{storage.uri('snapshot.sqlite')}: ledger schema {meta['schema']} is newer "
                                    f"than this code's ({_SCHEMA_VERSION})")
            return tmp, int(meta.get("mirror_seq", 0))
        except BaseException:
            _remove_db(tmp)
            raise

    def _restore(self, snapshot: Path | None, entries: list[dict[str, Any]], start: int, mirror_id: str) -> bool:
        """In one transaction: the snapshot's rows (if given) in place of this file's,
        then the journal entries after it, in order. False (nothing done) if,
        without a snapshot, the file is no longer at seq `start`."""
        con = self._con
        with self._lock:
            if snapshot is not None:
                con.execute("ATTACH DATABASE ? AS snap", (str(snapshot),))
            try:
                with _transaction(con):
                    if snapshot is not None:
                        cols = ", ".join(_ROW)
                        con.execute("DELETE FROM main.calls")
                        con.execute(f"INSERT INTO main.calls ({cols}) SELECT {cols} FROM snap.calls")
                        tcols = "teacher, images, certain, uncertain, uncertain_calls"
                        con.execute("DELETE FROM main.totals")
                        con.execute(f"INSERT INTO main.totals ({tcols}) SELECT {tcols} FROM snap.totals")
                        con.execute("INSERT OR REPLACE INTO main.meta (key, value) SELECT key, value FROM snap.meta "
                                    "WHERE key NOT IN ('mirror', 'mirror_epoch')")
                    elif int(self._meta(con, "mirror_seq") or 0) != start:
                        return False
                    for body in entries:
                        _replay(con, body)
                    seq = start + len(entries)
                    self._set_meta(con, "mirror_id", mirror_id)
                    self._set_meta(con, "mirror_seq", seq)
                    # New entries are filed under an epoch no older than what this file
                    # holds, so no cleanup of an earlier checkpoint can delete them.
                    self._set_meta(con, "mirror_epoch", max(seq, int(self._meta(con, "mirror_epoch") or 0)))
            finally:
                if snapshot is not None:
                    con.execute("DETACH DATABASE snap")
        return True

    def _checkpoint(self) -> int:
        """checkpoint(), under the host's mirror lock."""
        storage = self.mirror
        fd, name = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.snapshot-", suffix=".sqlite")
        os.close(fd)
        tmp = Path(name)
        try:
            # Under the write lock (a local copy: milliseconds), so the copy holds exactly
            # the changes up to `seq`, and every later change is filed under epoch `seq`.
            with self._lock, _transaction(self._con) as con:
                seq = int(self._meta(con, "mirror_seq") or 0)
                src, dst = sqlite3.connect(self.path), sqlite3.connect(tmp)
                try:
                    src.backup(dst)
                    dst.execute("PRAGMA journal_mode = DELETE")
                finally:
                    src.close()
                    dst.close()
                self._set_meta(con, "mirror_epoch", seq)
            data = tmp.read_bytes()
        finally:
            _remove_db(tmp)
        info = self._remote_snapshot(storage)
        if info is not None and info["id"] == self._mirror_id and int(info["seq"]) > seq:
            return int(info["seq"])  # a newer one is there already
        try:
            storage.write_atomic("snapshot.sqlite", data)
            storage.write_atomic("snapshot.json", json.dumps(
                {"format": _FORMAT, "id": self._mirror_id, "seq": seq, "ts": time.time(), "bytes": len(data)},
                indent=1).encode())
        except OSError as exc:
            raise LedgerMirrorError(f"ledger {self.path}: checkpoint to {storage.uri()} failed: {exc}") from None
        # Every entry up to `seq` is in an epoch below `seq`; later ones are in epoch `seq` or above.
        for folder in storage.list("journal"):
            if folder.isdigit() and int(folder) < seq:
                storage.delete_dir(f"journal/{folder}")
        return seq

    def _open(self) -> sqlite3.Connection:
        try:
            con = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise sqlite3.OperationalError(f"ledger {self.path}: cannot open: {exc}") from exc
        try:
            con.execute("PRAGMA busy_timeout = 60000")
            mode = con.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                log.warning("ledger %s: journal mode is %s, not WAL", self.path, mode)
            con.execute("PRAGMA synchronous = FULL")
            if not self._ready(con):
                with _transaction(con):
                    if not self._ready(con):  # another process may have set it up meanwhile
                        self._setup(con)
        except sqlite3.OperationalError:
            con.close()
            raise
        except sqlite3.DatabaseError as exc:
            con.close()
            hint = ""
            try:
                if self.path.read_bytes()[:1] == b"{":
                    hint = (f"; it looks like a JSON-lines ledger of an older version: open a new ledger "
                            f"in its folder (e.g. {self.path.with_name('ledger.sqlite')}) to import it")
            except OSError:
                pass
            raise LedgerCorrupt(f"{self.path} is not a ledger database ({exc}){hint}") from None
        except BaseException:
            con.close()
            raise
        return con

    def _ready(self, con: sqlite3.Connection) -> bool:
        """Whether the schema is in place and no legacy import is due (raises if not a ledger)."""
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            return False
        if "meta" not in tables:
            raise LedgerCorrupt(f"{self.path} is an SQLite database but not a ledger database "
                                f"(tables {sorted(tables)})")
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("format") != _FORMAT or not {"calls", "totals"} <= tables:
            raise LedgerCorrupt(f"{self.path} is not a ledger database (meta {meta})")
        if int(meta.get("schema", 0)) > _SCHEMA_VERSION:
            raise LedgerCorrupt(f"{self.path}: ledger schema {meta['schema']} is newer than this "
                                f"code's ({_SCHEMA_VERSION})")
        return not self._legacy_due(con, meta)

    def _legacy(self) -> tuple[Path, Path]:
        return self.path.with_name("ledger.jsonl"), self.path.with_name("ledger.jobs.jsonl")

    def _legacy_due(self, con: sqlite3.Connection, meta: dict[str, str]) -> bool:
        if "legacy_import" in meta:
            return False
        files = [p for p in self._legacy() if p != self.path and p.exists()]
        return bool(files) and con.execute("SELECT 1 FROM calls LIMIT 1").fetchone() is None

    def _setup(self, con: sqlite3.Connection) -> None:
        """Create the schema if the file is new, then import a legacy ledger if one is due.
        Runs inside the caller's write transaction."""
        if con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' LIMIT 1").fetchone() is None:
            for stmt in _DDL.split(";"):
                if stmt.strip():
                    con.execute(stmt)
            con.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                            [("format", _FORMAT), ("schema", str(_SCHEMA_VERSION))])
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        if self._legacy_due(con, meta):
            self._import_legacy(con)

    def _import_legacy(self, con: sqlite3.Connection) -> None:
        """The JSON-lines ledger of older versions, in this (new, empty) ledger, in
        the caller's transaction: each purchase a `bought` row; each key's latest
        job line an `open`, `failed` or `refused` row (closed ones are in the ledger)."""
        ledger_path, jobs_path = self._legacy()
        sums: dict[str, list[int]] = {}  # per teacher: images, certain and uncertain nano-dollars, calls

        def add(teacher: str, state: str, price: float) -> None:
            w = _weight(state, price)
            s = sums.setdefault(teacher, [0, 0, 0, 0])
            s[0] += w[0]
            s[1] += round(w[1] * 10**_DECIMALS)
            s[2] += round(w[2] * 10**_DECIMALS)
            s[3] += w[3]

        def rows(entries: Iterator[dict[str, Any]], state_of) -> Iterator[tuple]:
            for e in entries:
                state = state_of(e)
                if state is None:
                    continue
                teacher, prompt, seed, size = e["teacher"], e["prompt"], int(e["seed"]), int(e["size"])
                price = float(e["price"])
                extra = {k: v for k, v in e.items() if k not in REQUIRED_FIELDS and k != "state"}
                add(teacher, state, price)
                yield (*self._key_args(teacher, prompt, seed, size), state, price,
                       e.get("ref") if state == "bought" else None, float(e["ts"]), _dump(extra))

        insert = ("INSERT INTO calls (khash, teacher, prompt, seed, size, state, price, ref, ts, extra) "
                  "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
        n_bought = n_jobs = n_superseded = 0
        if ledger_path != self.path and ledger_path.exists():
            con.executemany(insert, rows(_read_legacy(ledger_path, _check_legacy_entry), lambda e: "bought"))
            n_bought = con.execute("SELECT count(*) FROM calls").fetchone()[0]
        if jobs_path != self.path and jobs_path.exists():
            latest: dict[tuple, dict[str, Any]] = {}
            for e in _read_legacy(jobs_path, _check_legacy_job):
                key = (e["teacher"], e["prompt"], int(e["seed"]), int(e["size"]))
                latest.pop(key, None)  # re-inserted: the dict keeps the order of each key's latest line
                latest[key] = e
            jobs = []
            for key, e in latest.items():
                if e["state"] == "closed":
                    continue
                if e["state"] == "open":
                    # A crash between storing the purchase and closing its job leaves the
                    # job open although the ledger bought it afterwards: it is not open.
                    newer = con.execute(f"SELECT 1 FROM calls WHERE {_KEY_MATCH} AND state = 'bought' "
                                        f"AND ts >= ? LIMIT 1", (*self._key_args(*key), float(e["ts"]))).fetchone()
                    if newer is not None:
                        n_superseded += 1
                        continue
                jobs.append(e)
            con.executemany(insert, rows(iter(jobs), lambda e: e["state"]))
            n_jobs = len(jobs)
        for teacher, (images, certain, uncertain, uncertain_calls) in sums.items():
            con.execute(_BUMP, (teacher, images, certain / 10**_DECIMALS, uncertain / 10**_DECIMALS, uncertain_calls))
        con.execute("INSERT INTO meta (key, value) VALUES ('legacy_import', ?)",
                    (json.dumps({"ts": time.time(), "bought": n_bought, "jobs": n_jobs}),))
        log.info("ledger %s: imported %d purchases from %s and %d open/failed/refused jobs from %s "
                 "(%d open jobs skipped: bought afterwards)",
                 self.path, n_bought, ledger_path.name, n_jobs, jobs_path.name, n_superseded)


def _journal_name(epoch: int, seq: int) -> str:
    return f"journal/{epoch:016d}/{seq:016d}.json"


def _replay(con: sqlite3.Connection, body: dict[str, Any]) -> None:
    """One journal entry: each row written whole, its weight in `totals` moved from
    its state before to its state after, so replaying an entry twice changes nothing."""
    for row in body["calls"]:
        row = tuple(row)
        old = con.execute("SELECT teacher, state, price FROM calls WHERE id = ?", (row[0],)).fetchone()
        con.execute(_UPSERT, row)
        _move(con, old, (row[2], row[6], row[7]))
    for call in body.get("deleted", ()):
        old = con.execute("SELECT teacher, state, price FROM calls WHERE id = ?", (call,)).fetchone()
        con.execute("DELETE FROM calls WHERE id = ?", (call,))
        _move(con, old, None)


def _move(con: sqlite3.Connection, old: tuple | None, new: tuple | None) -> None:
    """A row's weight in `totals`, from (teacher, state, price) `old` to `new` (None: no row)."""
    zero = (0, 0.0, 0.0, 0)
    before = _weight(old[1], old[2]) if old else zero
    after = _weight(new[1], new[2]) if new else zero
    if old and new and old[0] == new[0]:
        con.execute(_BUMP, (new[0], *(a - b for a, b in zip(after, before))))
        return
    if old:
        con.execute(_BUMP, (old[0], *(-b for b in before)))
    if new:
        con.execute(_BUMP, (new[0], *after))


def _remove_db(path: Path) -> None:
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}-journal")):
        p.unlink(missing_ok=True)


@contextmanager
def _transaction(con: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE (the database's write lock, from the start) ... COMMIT, or ROLLBACK on any error."""
    con.execute("BEGIN IMMEDIATE")
    try:
        yield con
        con.execute("COMMIT")
    except BaseException:
        if con.in_transaction:
            con.rollback()
        raise


# -- the JSON-lines ledger of older versions (read once, to import it) -----------

def _require(entry: Any, fields: tuple[str, ...], what: str) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise ValueError(f"a {what} is a JSON object, got {type(entry).__name__}")
    missing = [k for k in fields if k not in entry]
    if missing:
        raise ValueError(f"{what} lacks {missing}")
    return entry


def _check_legacy_entry(entry: Any) -> dict[str, Any]:
    return _require(entry, REQUIRED_FIELDS, "ledger entry")


def _check_legacy_job(entry: Any) -> dict[str, Any]:
    _require(entry, _LEGACY_JOB_FIELDS, "job-log entry")
    if entry["state"] not in _LEGACY_JOB_STATES:
        raise ValueError(f"job-log state must be one of {_LEGACY_JOB_STATES}, got {entry['state']!r}")
    return entry


def _read_legacy(path: Path, check) -> Iterator[dict[str, Any]]:
    """The records of a JSON-lines file, each passed through `check`, one at a time.
    A bad final line (a crash mid-write) is skipped with a warning; a bad line with
    records after it raises LedgerCorrupt. The file is left as it is."""
    bad: tuple[int, str] | None = None
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            if bad is not None:
                raise LedgerCorrupt(f"legacy ledger {path}: line {bad[0]} is corrupt and is not the "
                                    f"last line: {bad[1]}")
            try:
                entry = check(json.loads(raw))
            except (ValueError, UnicodeDecodeError) as exc:
                bad = (lineno, str(exc))
                continue
            yield entry
    if bad is not None:
        log.warning("ledger %s: skipping torn final line %d: %s", path, bad[0], bad[1])
