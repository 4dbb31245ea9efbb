"""Dataset versions: immutable, atomic, round-trip."""

from __future__ import annotations

import os

import pytest

from evolve.dataset import DatasetVersions, Record, record_id, write_json_atomic


def rec(prompt: str, op: str = "seed", rnd: int = 0, parent=None) -> Record:
    return Record(id=record_id(prompt, 1, rnd, op), prompt=prompt, category="colors", teacher="a",
                  image_ref="ab" * 32, seed=1, round_added=rnd, parent_id=parent, op=op)


def test_round_trip_and_manifest(tmp_path):
    dv = DatasetVersions(tmp_path)
    records = [rec("a red circle"), rec("a blue square", "expand", 1, parent="x")]
    dv.write(0, records)
    assert dv.read(0) == records
    m = dv.manifest(0)
    assert m["num_records"] == 2 and m["ops"] == {"expand": 1, "seed": 1}
    assert dv.versions() == [0] and dv.latest() == 0


def test_versions_are_immutable(tmp_path):
    dv = DatasetVersions(tmp_path)
    dv.write(0, [rec("a red circle")])
    with pytest.raises(FileExistsError, match="immutable"):
        dv.write(0, [rec("a blue circle")])
    assert [r.prompt for r in dv.read(0)] == ["a red circle"]


def test_crash_mid_write_leaves_no_version(tmp_path, monkeypatch):
    dv = DatasetVersions(tmp_path)

    def boom(*a, **k):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "rename", boom)
    with pytest.raises(OSError, match="disk gone"):
        dv.write(3, [rec("a red circle")])
    monkeypatch.undo()
    assert dv.versions() == [] and not dv.path(3).exists()
    assert not list(tmp_path.glob(".tmp-*")), "temporary folder must be cleaned"


def test_half_written_folder_is_not_a_version(tmp_path):
    dv = DatasetVersions(tmp_path)
    # What a killed writer leaves behind: a temporary folder, maybe a parquet file.
    junk = tmp_path / ".tmp-v0001-abc"
    junk.mkdir()
    (junk / "records.parquet").write_bytes(b"PAR1 truncated")
    assert dv.versions() == []
    dv.write(1, [rec("a red circle")])
    assert dv.versions() == [1] and not junk.exists()


def test_duplicate_ids_rejected(tmp_path):
    with pytest.raises(ValueError, match="duplicate record ids"):
        DatasetVersions(tmp_path).write(0, [rec("a red circle"), rec("a red circle")])


def test_record_validation():
    with pytest.raises(ValueError, match="op must be one of"):
        Record(id="1", prompt="a circle", category="single_object", teacher="a", image_ref="r",
               seed=0, round_added=0, parent_id=None, op="invent")


def test_write_json_atomic(tmp_path):
    p = tmp_path / "x" / "s.json"
    write_json_atomic(p, {"a": 1})
    write_json_atomic(p, {"a": 2})
    assert p.read_text().strip().endswith("}") and '"a": 2' in p.read_text()
    assert [f.name for f in p.parent.iterdir()] == ["s.json"]


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    from evolve.dataset import atomic_dir

    out = tmp_path / "ckpt"
    with atomic_dir(out) as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("1")
    assert (out / "a").read_text() == "1"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            tmp.mkdir()
            (tmp / "a").write_text("2")
            raise RuntimeError("crash while writing")
    assert (out / "a").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
