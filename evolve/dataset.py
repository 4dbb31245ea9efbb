"""Training records and immutable dataset versions (Parquet, written atomically).

A dataset version is a folder `vNNNN/` holding `records.parquet` and
`manifest.json`. It is built in a hidden temporary folder and renamed into
place in one step, so a reader sees a whole version or none, and a crash
leaves only a temporary folder that the next writer removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from evolve.world import UNKNOWN

Op = Literal["seed", "expand", "mutate"]
OPS: tuple[str, ...] = ("seed", "expand", "reseed", "mutate")

SCHEMA = pa.schema([
    ("id", pa.string()),
    ("prompt", pa.string()),
    ("category", pa.string()),
    ("teacher", pa.string()),
    ("image_ref", pa.string()),
    ("seed", pa.int64()),
    ("round_added", pa.int32()),
    ("parent_id", pa.string()),  # null for seed prompts
    ("op", pa.string()),
])

_VERSION_RE = re.compile(r"^v(\d{4})$")


@dataclass(frozen=True)
class Record:
    """One training example: a prompt and the teacher image chosen for it."""

    id: str
    prompt: str
    category: str | None          # the prompt's skill; None where the world does not know it
    teacher: str
    image_ref: str
    seed: int
    round_added: int
    parent_id: str | None
    op: str

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"record {self.id}: op must be one of {OPS}, got {self.op!r}")
        if not self.image_ref:
            raise ValueError(f"record {self.id}: empty image_ref")


def record_id(prompt: str, seed: int, round_added: int, op: str) -> str:
    """Stable id: the same prompt added the same way in the same round is the same record."""
    h = hashlib.sha256(f"{prompt}|{seed}|{round_added}|{op}".encode()).hexdigest()
    return h[:16]


def records_to_table(records: Iterable[Record]) -> pa.Table:
    rows = [asdict(r) for r in records]
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def table_to_records(table: pa.Table) -> list[Record]:
    return [Record(**row) for row in table.to_pylist()]


class DatasetVersions:
    """The versions of one run's dataset, under `root` (e.g. run_dir/datasets)."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, version: int) -> Path:
        return self.root / f"v{version:04d}"

    def parquet_path(self, version: int) -> Path:
        return self.path(version) / "records.parquet"

    def versions(self) -> list[int]:
        found = []
        for p in self.root.iterdir():
            m = _VERSION_RE.match(p.name)
            if m and (p / "manifest.json").exists():
                found.append(int(m.group(1)))
        return sorted(found)

    def latest(self) -> int | None:
        v = self.versions()
        return v[-1] if v else None

    def write(self, version: int, records: list[Record], meta: dict | None = None) -> Path:
        """Write version `version` atomically. Versions are immutable: writing one
        that exists is an error."""
        final = self.path(version)
        if final.exists():
            raise FileExistsError(f"dataset version {final} exists; versions are immutable")
        ids = [r.id for r in records]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise ValueError(f"dataset version {version}: duplicate record ids {dup}")
        self._clean_temporaries()
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-v{version:04d}-", dir=self.root))
        try:
            table = records_to_table(records)
            pq.write_table(table, tmp / "records.parquet")
            manifest = {
                "version": version,
                "num_records": len(records),
                "categories": _counts(r.category or UNKNOWN for r in records),
                "ops": _counts(r.op for r in records),
                "teachers": _counts(r.teacher for r in records),
                **(meta or {}),
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
            for f in tmp.iterdir():
                _fsync(f)
            os.rename(tmp, final)  # atomic on one filesystem
            _fsync(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def read(self, version: int) -> list[Record]:
        p = self.parquet_path(version)
        if not (self.path(version) / "manifest.json").exists():
            raise FileNotFoundError(f"dataset version {version} not found under {self.root}")
        return table_to_records(pq.read_table(p, schema=SCHEMA))

    def manifest(self, version: int) -> dict:
        return json.loads((self.path(version) / "manifest.json").read_text())

    def _clean_temporaries(self) -> None:
        for p in self.root.glob(".tmp-v*"):
            shutil.rmtree(p, ignore_errors=True)


def _counts(values: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


def _fsync(path: Path) -> None:
    """fsync a file or a folder (a folder's entry list, after a rename)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: Path | str):
    """Write a folder so a reader never sees half of it: fill the yielded
    temporary folder (`.<name>.tmp`, beside `path`, not yet created); when the
    block ends it replaces `path`. On an error it is removed, `path` untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def write_json_atomic(path: Path, data) -> None:
    """Write JSON so a reader never sees half a file."""
    from evolve.store import write_atomic

    write_atomic(path, json.dumps(data, indent=2, default=str).encode())
