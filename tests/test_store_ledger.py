"""ImageStore and Ledger: pure, fast, no Ray."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import random
import signal
import sqlite3
import time

import pytest

from evolve.ledger import CALL_STATES, Ledger, LedgerCorrupt, Totals, khash
from evolve.store import ImageStore
from run_checks import noted_calls, write_purchases

PNG = b"\x89PNG\r\n\x1a\n" + b"pixels" * 10


def _entry(i: int, teacher: str = "aurora", price: float = 0.01) -> dict:
    return {"teacher": teacher, "prompt": f"a circle {i}", "seed": i, "size": 32,
            "ref": f"{i:064x}", "price": price, "ts": 1.0 + i}


# -- store -------------------------------------------------------------------

def test_store_put_is_content_addressed_sharded_and_idempotent(tmp_path):
    store = ImageStore(tmp_path / "images")
    ref = store.put(PNG)
    assert ref == hashlib.sha256(PNG).hexdigest()
    assert store.path(ref) == tmp_path / "images" / ref[:2] / f"{ref}.png"
    assert store.has(ref) and store.get(ref) == PNG
    mtime = store.path(ref).stat().st_mtime_ns
    assert store.put(PNG) == ref  # second put: same ref, file untouched
    assert store.path(ref).stat().st_mtime_ns == mtime
    assert [p.name for p in store.path(ref).parent.iterdir()] == [f"{ref}.png"]  # no temp files left


def test_store_missing_ref_names_it(tmp_path):
    store = ImageStore(tmp_path)
    ref = "ab" * 32
    assert not store.has(ref)
    with pytest.raises(KeyError, match=ref):
        store.get(ref)
    with pytest.raises(ValueError):
        store.path("../../etc/passwd")


def test_store_write_is_atomic(tmp_path, monkeypatch):
    """A crash before the rename leaves neither a partial image nor a temp file."""
    store = ImageStore(tmp_path)

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.put(PNG)
    ref = hashlib.sha256(PNG).hexdigest()
    assert not store.has(ref)
    assert list(store.path(ref).parent.iterdir()) == []
    monkeypatch.undo()
    assert store.put(PNG) == ref and store.get(ref) == PNG


# -- ledger ------------------------------------------------------------------

# The money class of each state, written out again from the spec (not imported),
# so the ledger's running totals are checked against an independent recount.
UNCERTAIN, NOTHING, CERTAIN = ("sending", "uncertain"), ("unbilled",), ("open", "bought", "failed", "refused")


def recount(path) -> dict[str, Totals]:
    """Per teacher, the totals recomputed from the rows alone."""
    con = sqlite3.connect(path)
    try:
        rows = con.execute("SELECT teacher, state, price FROM calls").fetchall()
    finally:
        con.close()
    acc: dict[str, list] = {}
    for teacher, state, price in rows:
        a = acc.setdefault(teacher, [0, [], [], 0])
        assert state in UNCERTAIN + NOTHING + CERTAIN
        a[0] += state == "bought"
        if state in CERTAIN:
            a[1].append(price)
        if state in UNCERTAIN:
            a[2].append(price)
            a[3] += 1
    return {t: Totals(a[0], math.fsum(a[1]), math.fsum(a[2]), a[3]) for t, a in acc.items()}


def assert_totals_match(led: Ledger) -> None:
    want = recount(led.path)
    assert sorted(want) == led.teachers()
    for teacher, t in want.items():
        got = led.totals(teacher)
        assert (got.images, got.uncertain_calls) == (t.images, t.uncertain_calls), teacher
        # Prices with at most 9 decimals (every real price) add up with no residue.
        assert got.certain == pytest.approx(t.certain, abs=1e-12), teacher
        assert got.uncertain == pytest.approx(t.uncertain, abs=1e-12), teacher
    everything = led.totals()
    assert everything.images == len(led) == sum(t.images for t in want.values())
    assert everything.uncertain_calls == sum(t.uncertain_calls for t in want.values())
    assert led.spent() == pytest.approx(math.fsum(t.spent for t in want.values()), abs=1e-12)


def test_ledger_records_durably_and_looks_up(tmp_path):
    path = tmp_path / "ledger.sqlite"
    led = Ledger(path)
    assert led.lookup("aurora", "a circle 0", 0, 32) is None
    assert len(led) == 0 and led.spent() == 0.0 and led.teachers() == []
    for i in range(3):
        led.record(_entry(i))
    out = led.record({**_entry(3, teacher="brush", price=0.02), "flaws": ["blurry"], "native_size": 1024})
    assert out == {**_entry(3, teacher="brush", price=0.02), "flaws": ["blurry"], "native_size": 1024}
    assert led.lookup("aurora", "a circle 1", 1, 32) == _entry(1)
    assert led.lookup("aurora", "a circle 1", 1, 64) is None  # size is part of the key
    assert led.lookup("aurora", "a circle 1", 2, 32) is None  # and the seed
    led.close()
    again = Ledger(path)
    assert len(again) == 4 and again.entries() == [_entry(0), _entry(1), _entry(2), out]
    assert again.entries("brush") == [out] and again.teachers() == ["aurora", "brush"]
    assert again.lookup("brush", "a circle 3", 3, 32)["flaws"] == ["blurry"]
    assert again.spent("aurora") == pytest.approx(0.03)
    assert again.spent("brush") == pytest.approx(0.02)
    assert again.spent() == pytest.approx(0.05)
    assert again.spent("nobody") == 0.0 and again.totals("nobody") == Totals(0, 0.0, 0.0, 0)
    assert again.totals() == Totals(4, pytest.approx(0.05), 0.0, 0)
    with pytest.raises(ValueError, match="ref"):
        again.record({"teacher": "aurora", "prompt": "a square", "seed": 0, "size": 32, "price": 0.01})
    with pytest.raises(ValueError, match="state"):  # a column, not an extra field
        again.record({**_entry(9), "state": "open"})
    with pytest.raises(ValueError, match="JSON"):
        again.record({**_entry(9), "flaws": {1, 2}})
    stamped = again.record({k: v for k, v in _entry(9).items() if k != "ts"})
    assert abs(stamped["ts"] - time.time()) < 60
    assert len(again) == 5
    # A ledger opened by the name an older version used is a new database, not an import of itself.
    odd = Ledger(tmp_path / "old" / "ledger.jsonl")
    odd.record(_entry(0))
    assert len(Ledger(tmp_path / "old" / "ledger.jsonl")) == 1


def test_calls_move_money_between_certain_and_uncertain(tmp_path):
    led = Ledger(tmp_path / "ledger.sqlite")
    a = led.begin("aurora", "a circle", 1, 32, 0.04)
    assert led.call(a) == {"id": a, "teacher": "aurora", "prompt": "a circle", "seed": 1, "size": 32,
                           "state": "sending", "price": 0.04, "ref": None, "ts": led.call(a)["ts"]}
    assert led.totals("aurora") == Totals(0, 0.0, 0.04, 1)
    b = led.begin("aurora", "a square", 1, 32, 0.04, attempt=1)
    assert led.totals("aurora") == Totals(0, 0.0, 0.08, 2) and led.spent() == pytest.approx(0.08)
    led.mark(a, "open", job={"id": "job-1", "urls": ["https://x/1.png"], "polls": 0})
    assert led.totals("aurora") == Totals(0, 0.04, 0.04, 1)
    assert led.call(a)["job"] == {"id": "job-1", "urls": ["https://x/1.png"], "polls": 0}
    assert [c["id"] for c in led.calls_in("aurora", ("sending", "open"))] == [a, b]
    assert [c["id"] for c in led.calls_in("aurora", ("open",))] == [a]
    assert led.calls_in("brush", ("sending", "open")) == []
    led.mark(b, "uncertain", why="timed out")  # no answer will come: still counted, as uncertain
    assert led.totals("aurora") == Totals(0, 0.04, 0.04, 1)
    assert [c["id"] for c in led.calls_in("aurora", ("uncertain",))] == [b]
    led.mark(b, "unbilled", price=0.0, status=429)  # it was a 429 after all: nothing billed
    assert led.totals("aurora") == Totals(0, 0.04, 0.0, 0)
    assert led.call(b)["attempt"] == 1 and led.call(b)["status"] == 429 and led.call(b)["why"] == "timed out"
    led.mark(b, "sending", price=0.04)  # asked again
    assert led.totals("aurora") == Totals(0, 0.04, 0.04, 1)
    led.mark(b, "refused", price=0.0, kind="content_policy", status=400, why="moderated")
    assert led.totals("aurora") == Totals(0, 0.04, 0.0, 0)
    led.mark(a, "failed", kind="expired")  # billed, the image never came
    assert led.totals("aurora") == Totals(0, 0.04, 0.0, 0)
    assert led.call(a)["job"]["id"] == "job-1" and led.call(a)["kind"] == "expired"
    assert len(led) == 0 and led.lookup("aurora", "a circle", 1, 32) is None
    assert [c["state"] for c in led.calls("aurora", "a circle", 1, 32)] == ["failed"]
    with pytest.raises(ValueError, match="state"):
        led.mark(a, "done")
    with pytest.raises(ValueError, match="ref"):
        led.mark(a, "bought")  # a purchase has an image: record() it
    with pytest.raises(KeyError, match="12345"):
        led.mark(12345, "open")
    with pytest.raises(KeyError, match="12345"):
        led.call(12345)
    with pytest.raises(ValueError, match="state"):
        led.calls_in("aurora", ("sending", "lost"))
    assert_totals_match(led)


def test_record_closes_a_call_and_a_key_bought_again_counts_twice(tmp_path, caplog):
    path = tmp_path / "ledger.sqlite"
    led = Ledger(path)
    call = led.begin("aurora", "a circle 0", 0, 32, 0.01)
    led.mark(call, "open", job={"id": "j0"})
    entry = led.record({**_entry(0), "call": call, "flaws": ["tiny"]})
    assert entry == {**_entry(0), "job": {"id": "j0"}, "flaws": ["tiny"]}
    assert led.call(call)["state"] == "bought" and led.call(call)["ref"] == _entry(0)["ref"]
    assert led.totals("aurora") == Totals(1, 0.01, 0.0, 0)
    assert [c["id"] for c in led.calls("aurora", "a circle 0", 0, 32)] == [call]  # no second row
    with pytest.raises(ValueError, match="call"):
        led.record({**_entry(1), "call": call})  # that call is for another key
    with pytest.raises(KeyError, match="999"):
        led.record({**_entry(1), "call": 999})
    with caplog.at_level(logging.WARNING, logger="evolve.ledger"):
        led.record({**_entry(0), "ref": "f" * 64, "ts": 50.0})  # the image went missing: paid again
    assert "bought again" in caplog.text
    assert led.lookup("aurora", "a circle 0", 0, 32)["ref"] == "f" * 64
    again = Ledger(path)
    assert len(again) == 2 and again.spent() == pytest.approx(0.02)
    assert [e["ref"] for e in again.entries()] == [_entry(0)["ref"], "f" * 64]
    assert_totals_match(again)


def test_totals_equal_a_recount_after_random_operations(tmp_path):
    rng = random.Random(20240601)
    path = tmp_path / "ledger.sqlite"
    led = Ledger(path)
    keys = [(t, f"a {t} circle {i}", i % 3, size) for t in ("aurora", "brush", "cinder")
            for i in range(15) for size in (32, 64)]
    prices = (0.0, 0.003, 0.01, 0.04, 0.125, 0.0335, 1.7)
    ids: list[int] = []
    for n in range(500):
        r = rng.random()
        if r < 0.3 or not ids:
            ids.append(led.begin(*rng.choice(keys), rng.choice(prices)))
        elif r < 0.65:
            state = rng.choice(CALL_STATES)
            price = rng.choice((None, *prices))
            extra = {"ref": f"{n:064x}"} if state == "bought" else {"n": n}
            led.mark(rng.choice(ids), state, price=price, **extra)
        elif r < 0.8:
            t, p, s, z = rng.choice(keys)
            led.record({"teacher": t, "prompt": p, "seed": s, "size": z, "ref": f"{n:064x}",
                        "price": rng.choice(prices)})
        else:
            c = led.call(rng.choice(ids))
            led.record({**{k: c[k] for k in ("teacher", "prompt", "seed", "size")}, "ref": f"{n:064x}",
                        "price": rng.choice(prices), "call": c["id"]})
        if n % 100 == 99:
            assert_totals_match(led)
    states = {c["state"] for k in keys for c in led.calls(*k)}
    assert states == set(CALL_STATES)  # the sequence went through every state
    led.close()
    again = Ledger(path)
    assert_totals_match(again)
    for k in keys:
        bought = [c for c in again.calls(*k) if c["state"] == "bought"]
        got = again.lookup(*k)
        assert (got["ref"] if got else None) == (bought[-1]["ref"] if bought else None)


def _share(path: str, worker: int, n: int) -> None:
    led = Ledger(path)
    for i in range(n):
        teacher = ("aurora", "brush")[worker % 2]
        call = led.begin(teacher, f"a circle {worker} {i}", i, 32, 0.01)
        led.mark(call, "open", job={"worker": worker, "i": i})
        led.record({"teacher": teacher, "prompt": f"a circle {worker} {i}", "seed": i, "size": 32,
                    "ref": f"{worker:032x}{i:032x}", "price": 0.01, "call": call})
    led.close()


def test_processes_share_one_ledger(tmp_path):
    path = tmp_path / "ledger.sqlite"
    Ledger(path).close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_share, args=(str(path), w, 200)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    led = Ledger(path)
    assert len(led) == 800 and len(led.entries()) == 800
    assert led.totals() == Totals(800, pytest.approx(8.0), 0.0, 0)
    assert led.totals("aurora") == Totals(400, pytest.approx(4.0), 0.0, 0)
    assert {(e["prompt"], e["seed"]) for e in led.entries()} == {
        (f"a circle {w} {i}", i) for w in range(4) for i in range(200)}
    assert led.calls_in("aurora", ("sending", "open")) == []
    assert_totals_match(led)


@pytest.mark.parametrize("how", ["sigkill", "exit_in_transaction"])
def test_a_crash_mid_burst_leaves_every_committed_row(tmp_path, how):
    path, progress = tmp_path / "ledger.sqlite", tmp_path / "progress.txt"
    Ledger(path).close()
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=write_purchases, args=(str(path), str(progress), None,
                                                      150 if how != "sigkill" else None))
    child.start()
    if how == "sigkill":
        deadline = time.time() + 60
        while time.time() < deadline and (not progress.exists() or progress.read_text().count("bought") < 100):
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
    child.join(60)
    assert child.exitcode == (-signal.SIGKILL if how == "sigkill" else 3)
    begun, bought = noted_calls(progress)
    assert len(bought) >= 100
    led = Ledger(path)
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    rows = dict(con.execute("SELECT id, state FROM calls").fetchall())
    con.close()
    assert all(rows[c] == "bought" for c in bought)  # every committed purchase is there
    assert all(c in rows for c in begun)  # and every committed call
    # Beyond those, only the call in flight: `sending`, or `bought` if the kill came
    # after its commit but before the child noted it.
    unsettled = set(rows) - set(bought)
    assert len(unsettled) <= 1 and len(rows) <= len(begun) + 1
    assert all(rows[c] == "sending" or (rows[c] == "bought" and c >= max(begun)) for c in unsettled)
    if how == "exit_in_transaction":
        assert len(rows) == len(bought) == 150  # the half-made call never landed
    assert_totals_match(led)
    led.record(_entry(10**6))  # and it goes on
    assert_totals_match(led)


def test_a_file_that_is_not_a_ledger_is_refused_by_name(tmp_path):
    jsonl = tmp_path / "runs" / "ledger.sqlite"
    jsonl.parent.mkdir()
    jsonl.write_text(json.dumps(_entry(0)) + "\n")
    with pytest.raises(LedgerCorrupt, match=f"{jsonl}.*not a ledger database.*JSON-lines"):
        Ledger(jsonl)
    junk = tmp_path / "junk.db"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(LedgerCorrupt, match=f"{junk}.*not a ledger database"):
        Ledger(junk)
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE images (x)")
    con.commit()
    con.close()
    with pytest.raises(LedgerCorrupt, match=f"{other}.*not a ledger database"):
        Ledger(other)
    assert jsonl.read_text() == json.dumps(_entry(0)) + "\n"  # left as it was


def _lines(*records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def _job(prompt: str, state: str, ts: float, price: float = 0.01, **fields) -> dict:
    return {"teacher": "aurora", "prompt": prompt, "seed": 0, "size": 32, "state": state,
            "price": price, "ts": ts, **fields}


def test_a_new_ledger_imports_the_jsonl_ledger_once(tmp_path, caplog):
    bought = [_entry(0), {**_entry(1), "flaws": ["blurry"], "native_size": 1024},
              _entry(2, teacher="brush", price=0.02)]
    (tmp_path / "ledger.jsonl").write_text(_lines(*bought) + json.dumps(_entry(3))[:30])  # torn last line
    jobs = [
        _job("closed one", "open", 10.0, job={"id": "j-closed"}),
        _job("open one", "open", 12.0, job={"id": "j-open", "urls": None}),
        _job("failed one", "open", 13.0, job={"id": "j-failed"}),
        _job("closed one", "closed", 14.0, price=0.0),
        _job("failed one", "failed", 15.0, kind="expired", status=None, why="gone", job={"id": "j-failed"}),
        _job("refused one", "refused", 16.0, price=0.0, kind="content_policy", status=400, why="moderated"),
        # Crashed between the purchase (in ledger.jsonl, ts 3) and closing its job: not open.
        {**_job("a circle 2", "open", 2.5, price=0.02, job={"id": "j-2"}), "teacher": "brush", "seed": 2},
    ]
    (tmp_path / "ledger.jobs.jsonl").write_text(_lines(*jobs) + '{"teacher": "aur')
    with caplog.at_level(logging.INFO, logger="evolve.ledger"):
        led = Ledger(tmp_path / "ledger.sqlite")
    assert caplog.text.count("torn final line") == 2
    assert "imported 3 purchases" in caplog.text and "3 open/failed/refused" in caplog.text
    assert led.entries() == bought
    assert led.lookup("aurora", "a circle 1", 1, 32)["native_size"] == 1024
    assert [led.calls("aurora", p, 0, 32) for p in ("closed one",)] == [[]]
    (opened,), (failed,), (refused,) = (led.calls("aurora", p, 0, 32)
                                        for p in ("open one", "failed one", "refused one"))
    assert (opened["state"], opened["price"], opened["ts"], opened["job"]) == (
        "open", 0.01, 12.0, {"id": "j-open", "urls": None})
    assert (failed["state"], failed["kind"], failed["why"], failed["job"]) == (
        "failed", "expired", "gone", {"id": "j-failed"})
    assert (refused["state"], refused["price"], refused["kind"], refused["status"], refused["why"]) == (
        "refused", 0.0, "content_policy", 400, "moderated")
    assert [c["state"] for c in led.calls("brush", "a circle 2", 2, 32)] == ["bought"]
    assert led.calls_in("aurora", ("sending", "open")) == [opened]
    assert led.totals("aurora") == Totals(2, pytest.approx(0.04), 0.0, 0)  # 2 images, 1 open, 1 failed
    assert led.totals("brush") == Totals(1, pytest.approx(0.02), 0.0, 0)
    assert_totals_match(led)
    led.close()
    assert (tmp_path / "ledger.jsonl").exists() and (tmp_path / "ledger.jobs.jsonl").exists()  # left in place
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="evolve.ledger"):
        again = Ledger(tmp_path / "ledger.sqlite")
    assert "imported" not in caplog.text
    assert len(again) == 3 and len(again.calls_in("aurora", ("open",))) == 1
    # A ledger whose legacy files held nothing to import still imports them only once.
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "ledger.jobs.jsonl").write_text(_lines(_job("x", "open", 1.0), _job("x", "closed", 2.0)))
    Ledger(empty / "ledger.sqlite").close()
    (empty / "ledger.jobs.jsonl").write_text(_lines(_job("x", "open", 1.0)))
    assert Ledger(empty / "ledger.sqlite").calls_in("aurora", ("open",)) == []


def test_a_corrupt_middle_line_of_the_jsonl_ledger_stops_the_import(tmp_path):
    (tmp_path / "ledger.jsonl").write_text(json.dumps(_entry(0)) + "\n{not json\n" + json.dumps(_entry(1)) + "\n")
    with pytest.raises(LedgerCorrupt, match="ledger.jsonl: line 2"):
        Ledger(tmp_path / "ledger.sqlite")
    (tmp_path / "ledger.jsonl").write_text(_lines(_entry(0), _entry(1)))  # repaired: imported whole
    assert len(Ledger(tmp_path / "ledger.sqlite")) == 2


def test_lookups_and_open_calls_use_small_indexes(tmp_path):
    led = Ledger(tmp_path / "ledger.sqlite")
    led.record(_entry(0))
    con, statements = led._con, []

    class Recording:  # the connection, noting each statement and its parameters
        def execute(self, sql, args=()):
            statements.append((sql, args))
            return con.execute(sql, args)

    led._con = Recording()
    led.lookup("aurora", "a circle 0", 0, 32)
    led.calls("aurora", "a circle 0", 0, 32)
    led.calls_in("aurora", ("sending", "open"))
    led.calls_in("aurora", ("open",))
    led._con = con
    plans = [" ".join(r[-1] for r in con.execute("EXPLAIN QUERY PLAN " + sql, args)) for sql, args in statements]
    assert all("USING INDEX calls_khash" in p for p in plans[:2]), plans
    assert all("USING INDEX calls_pending" in p for p in plans[2:]), plans


def test_the_key_hash_is_sha256_of_the_json_key():
    for key in [("aurora", "a circle", 1, 32), ("brush", 'a "quoted" prompt\\ with ünïcode ☃\n', -5, 1024),
                ("cinder", "", 2**40, 0)]:
        digest = hashlib.sha256(json.dumps(list(key)).encode()).digest()
        assert khash(*key) == int.from_bytes(digest[:8], "big", signed=True)
