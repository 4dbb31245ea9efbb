"""ImageStore and Ledger: pure, fast, no Ray."""

from __future__ import annotations

import hashlib
import json
import logging
import os

import pytest

from evolve.ledger import Ledger, LedgerCorrupt
from evolve.store import ImageStore

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

def test_ledger_records_durably_and_looks_up(tmp_path):
    path = tmp_path / "ledger.jsonl"
    led = Ledger(path)
    assert led.lookup("aurora", "a circle 0", 0, 32) is None
    for i in range(3):
        led.record(_entry(i))
    led.record(_entry(3, teacher="brush", price=0.02))
    assert led.lookup("aurora", "a circle 1", 1, 32)["ref"] == f"{1:064x}"
    assert led.lookup("aurora", "a circle 1", 1, 64) is None  # size is part of the key
    again = Ledger(path)
    assert len(again) == 4 and again.entries() == led.entries()
    assert again.spent("aurora") == pytest.approx(0.03)
    assert again.spent("brush") == pytest.approx(0.02)
    assert again.spent() == pytest.approx(0.05)
    assert again.spent("nobody") == 0.0
    with pytest.raises(ValueError, match="ref"):
        led.record({"teacher": "aurora", "prompt": "a square", "seed": 0, "size": 32, "price": 0.01})


def test_ledger_drops_torn_final_line_and_appends_cleanly(tmp_path, caplog):
    path = tmp_path / "ledger.jsonl"
    led = Ledger(path)
    led.record(_entry(0))
    led.record(_entry(1))
    with open(path, "ab") as f:  # a crash in the middle of writing the third line
        f.write(json.dumps(_entry(2)).encode()[:25])
    with caplog.at_level(logging.WARNING, logger="evolve.ledger"):
        led = Ledger(path)
    assert "torn" in caplog.text
    assert len(led) == 2 and led.spent() == pytest.approx(0.02)
    led.record(_entry(2))  # lands on its own line, not glued to the torn bytes
    assert len(Ledger(path)) == 3


def test_ledger_keeps_a_complete_last_line_without_newline(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.write_text(json.dumps(_entry(0)) + "\n" + json.dumps(_entry(1)))
    led = Ledger(path)
    assert len(led) == 2
    led.record(_entry(2))
    assert len(Ledger(path)) == 3


def test_ledger_raises_on_corruption_in_the_middle(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.write_text(json.dumps(_entry(0)) + "\n{not json\n" + json.dumps(_entry(1)) + "\n")
    with pytest.raises(LedgerCorrupt, match="line 2"):
        Ledger(path)
