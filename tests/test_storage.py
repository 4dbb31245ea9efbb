"""The storage layer on a local folder and on S3 (moto in server mode, 127.0.0.1):
Storage, ImageStore, DatasetVersions, and the ledger's mirror."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import pickle
import random
import signal
import sqlite3
import time

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from test_dataset import rec
from run_checks import noted_calls, write_purchases
from test_store_ledger import PNG, assert_totals_match

from evolve.dataset import DatasetVersions
from evolve.ledger import CALL_STATES, Ledger, LedgerCorrupt, LedgerMirrorError, _replay
from evolve.storage import COMMITTED, NotLocal, Storage
from evolve.store import ImageStore

pytest_plugins = ["s3_server"]  # the s3_server and s3_uri fixtures (tests/s3_server.py)


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path) -> str:
    """A storage root: a local folder, or a prefix of the test bucket."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_uri")


# -- Storage -------------------------------------------------------------------

def test_storage_contract(where):
    st = Storage.at(where)
    assert st.is_local == ("://" not in where)
    assert st.list() == [] and not st.exists("a/b.txt")
    st.write_atomic("a/b.txt", b"one")
    st.write_atomic("a/b.txt", b"two")  # replaced whole
    st.write_atomic("a/c/d.bin", bytes(range(256)))
    st.write_atomic("top.json", b"{}")
    assert st.read("a/b.txt") == b"two" and st.exists("a/b.txt")
    assert not st.exists("a") and not st.exists("a/nope")  # a folder is not a file
    assert st.list() == ["a", "top.json"] and st.list("a") == ["b.txt", "c"] and st.list("zz") == []
    assert st.walk("a") == ["b.txt", "c/d.bin"]
    with pytest.raises(FileNotFoundError, match="a/nope"):
        st.read("a/nope")
    for bad in ("../x", "a/../../x", "a//b", "./a"):
        with pytest.raises(ValueError, match="relative"):
            st.write_atomic(bad, b"x")
    # Another process or node opens the same thing by its URI, or gets the Storage pickled.
    assert Storage.at(st.uri("a/b.txt")).read("") == b"two"
    again = pickle.loads(pickle.dumps(st))
    assert again == st and again.read("a/c/d.bin") == bytes(range(256))
    assert st.child("a").read("b.txt") == b"two" and st.child("a").uri("b.txt") == st.uri("a/b.txt")
    table = pa.table({"x": [1, 2, 3], "y": ["a", "b", None]})
    st.write_parquet("t/records.parquet", table)
    assert st.read_parquet("t/records.parquet").equals(table)
    assert pq.read_table(st.path("t/records.parquet"), filesystem=st.filesystem).equals(table)
    st.delete("a/b.txt")
    st.delete("a/b.txt")  # gone already: fine
    with pytest.raises(FileNotFoundError):
        st.delete("a/b.txt", missing_ok=False)
    assert not st.exists("a/b.txt") and st.walk("a") == ["c/d.bin"]
    st.delete_dir("a")
    assert st.walk("a") == [] and st.list() == ["t", "top.json"]
    if st.is_local:
        assert st.local_path("top.json").read_bytes() == b"{}"
        assert [p.name for p in st.local_path().iterdir() if p.name.startswith(".")] == []  # no temp files
    else:
        with pytest.raises(NotLocal, match="object store"):
            st.local_path("top.json")


def test_storage_folders_are_committed_by_a_marker_written_last(where, tmp_path, monkeypatch):
    st = Storage.at(where)
    src = tmp_path / "ckpt"
    (src / "sub").mkdir(parents=True)
    (src / "model.pt").write_bytes(b"weights" * 100)
    (src / "sub" / "opt.pt").write_bytes(b"state")
    st.upload_dir(src, "checkpoints/round_001")
    assert st.committed("checkpoints/round_001")
    out = st.download_dir("checkpoints/round_001", tmp_path / "back")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == ["model.pt", "sub/opt.pt"]
    assert (out / "model.pt").read_bytes() == b"weights" * 100
    # Replaced by a smaller folder: only what the new marker names comes back.
    (src / "sub" / "opt.pt").unlink()
    (src / "model.pt").write_bytes(b"better")
    st.upload_dir(src, "checkpoints/round_001")
    out = st.download_dir("checkpoints/round_001", tmp_path / "back")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == ["model.pt"]
    assert (out / "model.pt").read_bytes() == b"better"
    # An upload that dies before its commit leaves a folder readers treat as absent:
    # on an object store the marker is never written; locally the rename never happens.
    if st.is_local:
        monkeypatch.setattr(os, "rename", _dies)
    else:
        real = Storage.write_atomic
        monkeypatch.setattr(Storage, "write_atomic", lambda self, rel, data: _dies() if rel.endswith(COMMITTED)
                            else real(self, rel, data))
    with pytest.raises(OSError, match="node lost"):
        st.upload_dir(src, "checkpoints/round_002")
    monkeypatch.undo()
    assert not st.committed("checkpoints/round_002") and st.committed("checkpoints/round_001")
    if st.is_local:
        assert st.list("checkpoints") == ["round_001"]  # not even a temporary folder is left
    with pytest.raises(FileNotFoundError, match="not a committed folder"):
        st.download_dir("checkpoints/round_002", tmp_path / "back2")
    assert not (tmp_path / "back2").exists()


def _dies(*args, **kwargs):
    raise OSError("node lost")


def test_s3_endpoint_and_uri_rules(s3_server, monkeypatch):
    # pyarrow 26's S3FileSystem() does not read AWS_ENDPOINT_URL (only from_uri does):
    # Storage.at reads it, preferring AWS_ENDPOINT_URL_S3 as the AWS SDKs do.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint)
    st = Storage.at(f"{s3_server.base}/endpoints")
    st.write_atomic("x", b"1")
    assert st.read("x") == b"1"
    assert pafs.S3FileSystem().__reduce__()[1][0]["endpoint_override"] == ""  # pyarrow 26, as said above
    # The endpoint travels with the pickle (no credentials do), e.g. to a Ray task elsewhere.
    options = pickle.loads(pickle.dumps(st)).filesystem.__reduce__()[1][0]
    assert options["endpoint_override"] == s3_server.endpoint.removeprefix("http://")
    assert options["access_key"] is None and options["secret_key"] is None
    # An endpoint in the URI itself wins, and uri() keeps it.
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    host = s3_server.endpoint.removeprefix("http://")
    named = Storage.at(f"{s3_server.base}/endpoints?endpoint_override={host}&scheme=http")
    assert named.read("x") == b"1" and Storage.at(named.uri("x")).read("") == b"1"
    with pytest.raises(ValueError, match="credentials") as err:
        Storage.at("s3://AKIDEXAMPLE:hunter2secret@bucket/run")
    assert "hunter2secret" not in str(err.value)
    with pytest.raises(ValueError, match="options"):
        Storage.at("s3://bucket/run?secret_key=x")
    with pytest.raises(ValueError, match="gs://"):
        Storage.at("gs://bucket/run")


# -- ImageStore ------------------------------------------------------------------

def test_image_store_on_s3(s3_uri, monkeypatch):
    store = ImageStore(s3_uri + "/images")
    ref = store.put(PNG)
    assert ref == hashlib.sha256(PNG).hexdigest()
    assert store.has(ref) and store.get(ref) == PNG
    assert store.uri(ref) == f"{s3_uri}/images/{ref[:2]}/{ref}.png"  # the local layout
    assert Storage.at(store.uri(ref)).read("") == PNG
    puts = []
    real = Storage.write_atomic
    monkeypatch.setattr(Storage, "write_atomic", lambda self, rel, data: (puts.append(rel), real(self, rel, data)))
    assert store.put(PNG) == ref and puts == []  # idempotent: no second PUT
    other = store.put(PNG + b"!")
    assert puts == [f"{other[:2]}/{other}.png"]
    missing = "ab" * 32
    assert not store.has(missing)
    with pytest.raises(KeyError, match=missing):
        store.get(missing)
    with pytest.raises(ValueError, match="not an image ref"):
        store.has("../../etc/passwd")
    with pytest.raises(NotLocal, match="uri"):
        store.path(ref)
    # A Storage works as the root too, and a pickled store reads the same images.
    again = pickle.loads(pickle.dumps(ImageStore(Storage.at(s3_uri).child("images"))))
    assert again.get(ref) == PNG and not again.is_local


def test_image_store_local_is_unchanged(tmp_path):
    store = ImageStore(tmp_path / "images")
    ref = store.put(PNG)
    assert store.is_local and store.path(ref) == tmp_path / "images" / ref[:2] / f"{ref}.png"
    assert store.uri(ref) == str(store.path(ref)) and ImageStore(f"file://{tmp_path}/images").get(ref) == PNG


# -- DatasetVersions ---------------------------------------------------------------

def test_dataset_versions_on_s3(s3_uri):
    dv = DatasetVersions(s3_uri + "/datasets")
    assert dv.versions() == [] and dv.latest() is None
    records = [rec("a red circle"), rec("a blue square", "expand", 1, parent="x")]
    assert dv.write(0, records, meta={"round": 0}) == f"{s3_uri}/datasets/v0000"
    dv.write(1, records[:1])
    assert dv.read(0) == records and dv.read(1) == records[:1]
    assert dv.versions() == [0, 1] and dv.latest() == 1
    m = dv.manifest(0)
    assert m["num_records"] == 2 and m["ops"] == {"expand": 1, "seed": 1} and m["round"] == 0
    with pytest.raises(FileExistsError, match="immutable"):
        dv.write(0, [rec("a green star")])
    assert dv.read(0) == records
    with pytest.raises(ValueError, match="duplicate record ids"):
        dv.write(5, [rec("a red circle"), rec("a red circle")])
    with pytest.raises(FileNotFoundError, match="version 7"):
        dv.read(7)
    # What a reader on another node needs: (filesystem, path), or a URI.
    fs, path = dv.parquet_source(0)
    assert pq.read_table(pickle.loads(pickle.dumps(fs)).open_input_file(path)).num_rows == 2
    assert dv.parquet_uri(0) == f"{s3_uri}/datasets/v0000/records.parquet"
    assert Storage.at(dv.parquet_uri(0)).read_parquet("").num_rows == 2
    with pytest.raises(FileNotFoundError):
        dv.parquet_source(7)
    with pytest.raises(NotLocal):
        dv.parquet_path(0)
    assert DatasetVersions(Storage.at(s3_uri).child("datasets")).versions() == [0, 1]


def test_a_crash_between_the_two_puts_leaves_no_version(s3_uri, monkeypatch):
    dv = DatasetVersions(s3_uri + "/datasets")
    real = Storage.write_atomic

    def dies_before_the_manifest(self, rel, data):
        if rel.endswith("manifest.json"):
            raise OSError("driver killed")
        return real(self, rel, data)

    monkeypatch.setattr(Storage, "write_atomic", dies_before_the_manifest)
    with pytest.raises(OSError, match="driver killed"):
        dv.write(3, [rec("a red circle")])
    monkeypatch.undo()
    assert dv.storage.exists("v0003/records.parquet")  # the orphan parquet...
    assert dv.versions() == [] and dv.latest() is None  # ...is no version
    with pytest.raises(FileNotFoundError):
        dv.read(3)
    dv.write(3, [rec("a blue circle")])  # the next write of that version overwrites it
    assert [r.prompt for r in dv.read(3)] == ["a blue circle"] and dv.versions() == [3]


def test_dataset_versions_local_is_unchanged(tmp_path):
    dv = DatasetVersions(tmp_path)
    dv.write(0, [rec("a red circle")])
    fs, path = dv.parquet_source(0)
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(dv.parquet_path(0))
    assert dv.parquet_uri(0) == str(dv.parquet_path(0))


# -- the ledger's mirror -------------------------------------------------------------

def _rows(path) -> list[tuple]:
    con = sqlite3.connect(path)
    try:
        return con.execute("SELECT * FROM calls ORDER BY id").fetchall()
    finally:
        con.close()


def _totals(led: Ledger) -> dict:
    return {t: led.totals(t) for t in led.teachers()}


def _drop(path) -> None:
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(f"{path}{suffix}"):
            os.unlink(f"{path}{suffix}")


def _random_ops(led: Ledger, n: int, seed: int) -> None:
    rng = random.Random(seed)
    keys = [(t, f"a {t} circle {i}", i % 3, 32) for t in ("aurora", "brush") for i in range(8)]
    prices = (0.0, 0.003, 0.01, 0.04, 0.125)
    ids: list[int] = [c["id"] for k in keys for c in led.calls(*k)]
    for i in range(n):
        r = rng.random()
        if r < 0.35 or not ids:
            ids.append(led.begin(*rng.choice(keys), rng.choice(prices), attempt=i))
        elif r < 0.7:
            state = rng.choice(CALL_STATES)
            extra = {"ref": f"{seed}{i:060x}"[:64]} if state == "bought" else {"n": i}
            led.mark(rng.choice(ids), state, price=rng.choice((None, *prices)), **extra)
        else:
            t, p, s, z = rng.choice(keys)
            led.record({"teacher": t, "prompt": p, "seed": s, "size": z, "ref": f"{seed}{i:060x}"[:64],
                        "price": rng.choice(prices), "flaws": ["tiny"]})


def test_a_mirrored_ledger_restores_elsewhere_with_the_same_rows_and_totals(s3_uri, tmp_path):
    mirror = s3_uri + "/ledger"
    path = tmp_path / "head1" / "ledger.sqlite"
    led = Ledger(path, mirror=mirror)
    _random_ops(led, 80, seed=1)
    want_rows, want_totals, seq = _rows(path), _totals(led), led.mirror_seq
    assert seq == 80 and len(Storage.at(mirror).walk("journal")) == 80
    led.close()
    _drop(path)  # the head node is gone
    new = tmp_path / "head2" / "ledger.sqlite"
    again = Ledger(new, mirror=mirror)
    assert _rows(new) == want_rows and _totals(again) == want_totals and again.mirror_seq == seq
    assert_totals_match(again)
    again.record({"teacher": "aurora", "prompt": "after", "seed": 0, "size": 32, "ref": "e" * 64, "price": 0.5})
    assert again.mirror_seq == seq + 1  # and it goes on, journaled
    # A process on that host that opens the file without naming the mirror still journals.
    same_host = Ledger(new)
    assert same_host.mirror == Storage.at(mirror)
    same_host.begin("brush", "sticky", 0, 32, 0.25)
    assert again.mirror_seq == seq + 2
    same_host.close()
    again.close()


def test_replay_is_idempotent(s3_uri, tmp_path):
    mirror = Storage.at(s3_uri + "/ledger")
    led = Ledger(tmp_path / "a.sqlite", mirror=mirror)
    _random_ops(led, 40, seed=2)
    want_rows, want_totals = _rows(led.path), _totals(led)
    bodies = [json.loads(mirror.read(f"journal/{rel}")) for rel in mirror.walk("journal")]
    assert [b["seq"] for b in bodies] == list(range(1, 41))
    con = sqlite3.connect(led.path, isolation_level=None)  # every entry again, twice: nothing moves
    con.execute("BEGIN IMMEDIATE")
    for b in bodies + bodies:
        _replay(con, b)
    con.execute("COMMIT")
    con.close()
    assert _rows(led.path) == want_rows and _totals(led) == want_totals
    assert_totals_match(led)
    led.close()


def _copy(src, dst) -> None:
    """A consistent copy of a (WAL) ledger file, as a host that stopped then would hold."""
    a, b = sqlite3.connect(src), sqlite3.connect(dst)
    try:
        a.backup(b)
    finally:
        a.close()
        b.close()


def test_checkpoint_then_more_changes_then_restore(s3_uri, tmp_path):
    mirror = Storage.at(s3_uri + "/ledger")
    path = tmp_path / "ledger.sqlite"
    led = Ledger(path, mirror=mirror)
    assert mirror.exists("snapshot.sqlite")  # seeded when first attached
    _random_ops(led, 20, seed=3)
    _copy(path, tmp_path / "before_checkpoint.sqlite")  # seq 20
    _random_ops(led, 20, seed=4)
    assert led.checkpoint() == 40
    assert json.loads(mirror.read("snapshot.json"))["seq"] == 40
    assert mirror.walk("journal") == []  # the journal it covers is gone
    _copy(path, tmp_path / "after_checkpoint.sqlite")  # seq 40
    _random_ops(led, 25, seed=5)
    assert len(mirror.walk("journal")) == 25
    want_rows, want_totals = _rows(path), _totals(led)
    led.close()
    _drop(path)
    # From nothing: the snapshot, then the journal after it.
    restored = Ledger(tmp_path / "restored.sqlite", mirror=mirror)
    assert _rows(restored.path) == want_rows and _totals(restored) == want_totals and restored.mirror_seq == 65
    assert_totals_match(restored)
    restored.close()
    # A file older than the mirror: behind the snapshot (restored from it), or after it (caught up).
    for name in ("before_checkpoint.sqlite", "after_checkpoint.sqlite"):
        old = Ledger(tmp_path / name, mirror=mirror)
        assert _rows(old.path) == want_rows and _totals(old) == want_totals and old.mirror_seq == 65, name
        assert_totals_match(old)
        old.close()


def test_a_failed_put_rolls_the_change_back(s3_uri, tmp_path, monkeypatch):
    led = Ledger(tmp_path / "ledger.sqlite", mirror=s3_uri + "/ledger")
    a = led.begin("aurora", "a circle", 1, 32, 0.04)
    real = Storage.write_atomic
    monkeypatch.setattr(Storage, "write_atomic", _dies)
    with pytest.raises(LedgerMirrorError, match="change not made"):
        led.mark(a, "open", job={"id": "j"})
    with pytest.raises(LedgerMirrorError):
        led.begin("aurora", "a square", 1, 32, 0.04)
    assert led.call(a)["state"] == "sending" and len(_rows(led.path)) == 1
    assert led.totals("aurora").uncertain_calls == 1 and led.mirror_seq == 1
    monkeypatch.setattr(Storage, "write_atomic", real)
    led.mark(a, "open", job={"id": "j"})
    assert led.mirror_seq == 2 and led.call(a)["state"] == "open"
    led.close()


def test_a_crash_between_put_and_commit(s3_uri, tmp_path, monkeypatch):
    """The journal entry is up, the local commit never happened: reopening applies
    it (the change was real: its PUT means the call had reached that point); or,
    if another write came first, that write's entry took its seq."""
    mirror = s3_uri + "/ledger"
    path = tmp_path / "ledger.sqlite"
    led = Ledger(path, mirror=mirror)
    led.begin("aurora", "first", 0, 32, 0.01)
    real = Storage.write_atomic

    def put_then_die(self, rel, data):
        real(self, rel, data)
        raise SystemExit("killed after the PUT")

    monkeypatch.setattr(Storage, "write_atomic", put_then_die)
    with pytest.raises(SystemExit):
        led.begin("aurora", "in flight", 0, 32, 0.01)
    monkeypatch.undo()
    assert led.mirror_seq == 1 and len(_rows(path)) == 1
    led.close()
    reopened = Ledger(path, mirror=mirror)
    assert reopened.mirror_seq == 2 and [c["state"] for c in reopened.calls("aurora", "in flight", 0, 32)] == ["sending"]
    assert_totals_match(reopened)
    reopened.close()


def test_a_killed_writer_loses_nothing_that_returned(s3_uri, tmp_path):
    mirror = s3_uri + "/ledger"
    path, progress = tmp_path / "ledger.sqlite", tmp_path / "progress.txt"
    Ledger(path, mirror=mirror).close()
    child = multiprocessing.get_context("spawn").Process(target=write_purchases, args=(str(path), str(progress), mirror))
    child.start()
    deadline = time.time() + 60
    while time.time() < deadline and (not progress.exists() or progress.read_text().count("bought") < 40):
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    begun, bought = noted_calls(progress)
    assert len(bought) >= 40
    _drop(path)  # and the head node with it
    led = Ledger(tmp_path / "elsewhere.sqlite", mirror=mirror)
    rows = {r[0]: r[6] for r in _rows(led.path)}
    assert all(rows[c] == "bought" for c in bought)  # every purchase that returned
    assert all(c in rows for c in begun)  # and every call
    unsettled = set(rows) - set(bought)
    assert len(unsettled) <= 1 and all(rows[c] in ("sending", "bought") for c in unsettled)
    assert_totals_match(led)
    led.record({"teacher": "aurora", "prompt": "after", "seed": 0, "size": 32, "ref": "e" * 64, "price": 0.5})
    assert_totals_match(led)
    led.close()


def test_a_ledger_is_not_replaced_by_another_ledgers_mirror(s3_uri, tmp_path):
    mirror = s3_uri + "/ledger"
    with Ledger(tmp_path / "a.sqlite", mirror=mirror) as theirs:
        theirs.begin("aurora", "a", 0, 32, 0.01)
    mine = Ledger(tmp_path / "b.sqlite")
    mine.begin("brush", "b", 0, 32, 0.01)
    mine.close()
    with pytest.raises(LedgerCorrupt, match="never mirrored"):
        Ledger(tmp_path / "b.sqlite", mirror=mirror)
    assert [r[2] for r in _rows(tmp_path / "b.sqlite")] == ["brush"]  # untouched
    other = Ledger(tmp_path / "c.sqlite", mirror=s3_uri + "/other")
    other.close()
    with pytest.raises(LedgerCorrupt, match="another mirror"):
        Ledger(tmp_path / "c.sqlite", mirror=mirror)


def test_cost_per_durable_change(s3_uri, tmp_path):
    """Seconds per ledger change: plain, mirrored to a local folder, mirrored to S3
    (moto on loopback: a lower bound, real S3 PUTs take ~10-50 ms)."""
    n, out = 60, {}
    for name, mirror in (("local, no mirror", None), ("local-folder mirror", str(tmp_path / "mirror")),
                         ("moto S3 mirror", s3_uri + "/ledger")):
        led = Ledger(tmp_path / f"{len(out)}.sqlite", mirror=mirror)
        t0 = time.perf_counter()
        for i in range(n // 2):
            c = led.begin("aurora", f"p {i}", i, 32, 0.01)
            led.record({"teacher": "aurora", "prompt": f"p {i}", "seed": i, "size": 32, "ref": f"{i:064x}",
                        "price": 0.01, "call": c})
        out[name] = (time.perf_counter() - t0) / n
        t0 = time.perf_counter()
        if mirror:
            led.checkpoint()
            out[name + " checkpoint"] = time.perf_counter() - t0
        led.close()
    print("\nper durable ledger change: " + ", ".join(f"{k}: {v * 1000:.2f} ms" for k, v in out.items()))
    assert out["moto S3 mirror"] < 1.0
