"""Training records and immutable dataset versions (Parquet, written atomically).

A dataset version is a folder `vNNNN/` holding `records.parquet` and
`manifest.json`. It is built in a hidden temporary folder and renamed into
place in one step, so a reader sees a whole version or none, and a crash
leaves only a temporary folder that the next writer removes. On an object
store (an `s3://` root) the manifest is written last and is the commit: see
DatasetVersions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from evolve.storage import atomic_dir, fsync_path  # noqa: F401 - atomic_dir: this module's API too
from evolve.world import UNKNOWN

if TYPE_CHECKING:
    from evolve.storage import Storage

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
    """The versions of one run's dataset, under `root` (e.g. run_dir/datasets):
    a local folder (a path), or a folder of an object store (an `s3://` URI or
    a `Storage`).

    Locally a version is built in a temporary folder and renamed into place.
    An object store has no rename: `records.parquet` is PUT first and
    `manifest.json` last, and a version exists iff its manifest does, so a
    reader sees a whole version or none. A crash between the two PUTs leaves a
    parquet file without a manifest, which is no version; the next `write` of
    that version overwrites it."""

    def __init__(self, root: Path | str | Storage):
        from evolve.storage import open_root

        self.storage, self.root, self._local = open_root(root)

    @property
    def is_local(self) -> bool:
        return self._local

    @staticmethod
    def _name(version: int) -> str:
        return f"v{version:04d}"

    def path(self, version: int) -> Path:
        """A local version's folder (NotLocal on an object store: see parquet_source)."""
        if not self._local:
            from evolve.storage import NotLocal

            raise NotLocal(f"dataset versions at {self.root} are on an object store: no local path; "
                           f"use parquet_uri / parquet_source, read or manifest")
        return self.root / self._name(version)

    def parquet_path(self, version: int) -> Path:
        return self.path(version) / "records.parquet"

    def parquet_uri(self, version: int) -> str:
        """Version `version`'s Parquet file as a string any node can open: an
        absolute path locally, `s3://bucket/.../vNNNN/records.parquet` on an object
        store (for `Storage.at`, or Ray Data / pyarrow, which resolve the endpoint
        and credentials from that node's environment)."""
        return self.storage.uri(f"{self._name(version)}/records.parquet")

    def parquet_source(self, version: int) -> tuple[pafs.FileSystem, str]:
        """(filesystem, path) of version `version`'s Parquet file, what
        `ray.data.read_parquet(path, filesystem=filesystem)` and
        `pq.read_table(path, filesystem=filesystem)` take: the filesystem pickles
        with its endpoint (no credentials), so it reads the same store on every
        node. FileNotFoundError if the version does not exist."""
        if version not in self._existing(version):
            raise FileNotFoundError(f"dataset version {version} not found under {self.root}")
        return self.storage.filesystem, self.storage.path(f"{self._name(version)}/records.parquet")

    def versions(self) -> list[int]:
        if not self._local:
            return self._existing()
        found = []
        for p in self.root.iterdir():
            m = _VERSION_RE.match(p.name)
            if m and (p / "manifest.json").exists():
                found.append(int(m.group(1)))
        return sorted(found)

    def _existing(self, only: int | None = None) -> list[int]:
        """The versions whose manifest exists (all, or just `only` if it does)."""
        if only is not None:
            return [only] if self.storage.exists(f"{self._name(only)}/manifest.json") else []
        names = [n for n in self.storage.list() if _VERSION_RE.match(n)]
        return sorted(int(n[1:]) for n in names if self.storage.exists(f"{n}/manifest.json"))

    def latest(self) -> int | None:
        v = self.versions()
        return v[-1] if v else None

    def write(self, version: int, records: list[Record], meta: dict | None = None) -> Path | str:
        """Write version `version` atomically. Versions are immutable: writing one
        that exists is an error. Returns its folder (a path, or a URI)."""
        if not self._local:
            return self._write_remote(version, records, meta)
        final = self.path(version)
        if final.exists():
            raise FileExistsError(f"dataset version {final} exists; versions are immutable")
        _check_ids(version, records)
        self._clean_temporaries()
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-v{version:04d}-", dir=self.root))
        try:
            table = records_to_table(records)
            pq.write_table(table, tmp / "records.parquet")
            manifest = _manifest(version, records, meta)
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
            for f in tmp.iterdir():
                fsync_path(f)
            os.rename(tmp, final)  # atomic on one filesystem
            fsync_path(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def _write_remote(self, version: int, records: list[Record], meta: dict | None) -> str:
        name = self._name(version)
        if self._existing(version):
            raise FileExistsError(f"dataset version {self.storage.uri(name)} exists; versions are immutable")
        _check_ids(version, records)
        manifest = _manifest(version, records, meta)
        # Parquet first (overwriting what a crashed writer may have left), manifest last:
        # the manifest's PUT is the commit. Two writers of one version would be a bug of
        # the caller (one driver writes versions); the later manifest would win.
        self.storage.write_parquet(f"{name}/records.parquet", records_to_table(records))
        self.storage.write_atomic(f"{name}/manifest.json", json.dumps(manifest, indent=2).encode())
        return self.storage.uri(name)

    def read(self, version: int) -> list[Record]:
        if not self._local:
            if not self._existing(version):
                raise FileNotFoundError(f"dataset version {version} not found under {self.root}")
            table = self.storage.read_parquet(f"{self._name(version)}/records.parquet", schema=SCHEMA)
            return table_to_records(table)
        p = self.parquet_path(version)
        if not (self.path(version) / "manifest.json").exists():
            raise FileNotFoundError(f"dataset version {version} not found under {self.root}")
        return table_to_records(pq.read_table(p, schema=SCHEMA))

    def manifest(self, version: int) -> dict:
        if not self._local:
            return json.loads(self.storage.read(f"{self._name(version)}/manifest.json"))
        return json.loads((self.path(version) / "manifest.json").read_text())

    def _clean_temporaries(self) -> None:
        for p in self.root.glob(".tmp-v*"):
            shutil.rmtree(p, ignore_errors=True)


def _check_ids(version: int, records: list[Record]) -> None:
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"dataset version {version}: duplicate record ids {dup}")


def _manifest(version: int, records: list[Record], meta: dict | None) -> dict:
    return {
        "version": version,
        "num_records": len(records),
        "categories": _counts(r.category or UNKNOWN for r in records),
        "ops": _counts(r.op for r in records),
        "teachers": _counts(r.teacher for r in records),
        **(meta or {}),
    }


def _counts(values: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


def write_json_atomic(path: Path, data) -> None:
    """Write JSON so a reader never sees half a file."""
    from evolve.store import write_atomic

    write_atomic(path, json.dumps(data, indent=2, default=str).encode())
