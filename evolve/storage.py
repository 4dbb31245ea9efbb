"""Where a run's files live: a local folder (or a shared mount) or an object store.

`Storage` is a pyarrow.fs FileSystem and a root path in it, made from what a
user types as `--run-dir`: `s3://bucket/prefix`, `file:///path` or a path.
pyarrow.fs is what Ray itself uses for Train's `storage_path` and for Ray
Data, so a `Storage` (or its `filesystem` and `path(rel)`) can be handed to
both, and it pickles, so Ray tasks on any node get it.

Atomicity. Locally a write is a temp file beside the target, fsynced, renamed
into place. An object store has no rename and no append, but a PUT of one
object is atomic: a reader sees the old object or the whole new one, never
part of it, and AWS S3 has been strongly read-after-write consistent for every
PUT, DELETE and LIST since December 2020 ("Amazon S3 data consistency model",
https://docs.aws.amazon.com/AmazonS3/latest/userguide/Welcome.html#ConsistencyModel;
https://aws.amazon.com/about-aws/whats-new/2020/12/amazon-s3-now-delivers-strong-read-after-write-consistency-automatically-for-all-applications/).
So every write here is one PUT of bytes held in memory: pyarrow's S3 output
stream completes an upload when it is closed, even when the Python block
writing it raised, so a stream is never written piece by piece. Whatever needs
more than one object (a dataset version, a checkpoint folder) is committed by
an object written last, and readers treat a group without it as absent.

S3 settings come from the environment, as for boto and the AWS CLI:
credentials through the AWS SDK's own chain (AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, ~/.aws, instance roles), never
passed here, so they are neither pickled nor logged; the endpoint from
AWS_ENDPOINT_URL_S3 or else AWS_ENDPOINT_URL (pyarrow 26's `S3FileSystem()`
ignores both, only `FileSystem.from_uri` reads them, so `Storage.at` reads
them itself and the endpoint travels with the pickled filesystem); the region
from AWS_REGION / AWS_DEFAULT_REGION (else the bucket's own, looked up). A URI
may also say `?endpoint_override=host:port&scheme=http&region=...`.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import BinaryIO, Callable
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

COMMITTED = "_COMMITTED"  # the marker object upload_dir writes last
_S3_OPTIONS = ("region", "endpoint_override", "scheme", "anonymous", "force_virtual_addressing")


class NotLocal(RuntimeError):
    """A local path was asked of something that lives on an object store."""


class Storage:
    """A folder in a pyarrow filesystem. Paths given to methods (`rel`) are
    relative, '/'-separated, without '..'; '' is the root itself."""

    def __init__(self, filesystem: pafs.FileSystem, root: str, query: str = "") -> None:
        self.filesystem = filesystem
        self.root = root.rstrip("/") or "/"
        self._query = query  # the S3 options a URI named, so uri() opens the same store

    # -- making one ------------------------------------------------------------
    @classmethod
    def at(cls, where: Storage | Path | str) -> Storage:
        """A Storage for `s3://bucket/prefix[?options]`, `file:///path` or a local path."""
        if isinstance(where, Storage):
            return where
        if isinstance(where, Path):
            return cls(pafs.LocalFileSystem(), str(where.expanduser().resolve()))
        text = str(where)
        if "://" not in text:
            return cls(pafs.LocalFileSystem(), str(Path(text).expanduser().resolve()))
        parts = urlsplit(text)
        scheme = parts.scheme.lower()
        if scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise ValueError(f"a file:// URI names no host: {parts.scheme}://{parts.netloc}/...")
            return cls(pafs.LocalFileSystem(), str(Path(unquote(parts.path)).resolve()))
        if scheme not in ("s3", "s3a"):
            raise ValueError(f"storage URIs are s3://bucket/prefix, file:///path or a path, "
                             f"not {scheme}://")
        if "@" in parts.netloc or parts.username or parts.password:
            # Never echo the URI: its user part would be a secret.
            raise ValueError("an s3:// URI must not hold credentials; set AWS_ACCESS_KEY_ID / "
                             "AWS_SECRET_ACCESS_KEY (or a profile, or an instance role) instead")
        bucket = parts.netloc
        if not bucket:
            raise ValueError("an s3:// URI names a bucket: s3://bucket/prefix")
        options = dict(parse_qsl(parts.query))
        unknown = sorted(set(options) - set(_S3_OPTIONS))
        if unknown:
            raise ValueError(f"s3:// URI options are {_S3_OPTIONS}, not {unknown}")
        fs = _s3(bucket, dict(options))
        prefix = parts.path.strip("/")
        return cls(fs, f"{bucket}/{prefix}" if prefix else bucket, urlencode(options))

    def child(self, rel: str) -> Storage:
        """The folder `rel` below this one, as a Storage of its own."""
        return Storage(self.filesystem, self.path(rel), self._query)

    def __reduce__(self):
        # pyarrow filesystems pickle with their options (an S3 one with its endpoint and
        # region; no credentials, none are given to it): each node resolves its own.
        return (Storage, (self.filesystem, self.root, self._query))

    def __repr__(self) -> str:
        return f"Storage({self.uri()!r})"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Storage) and self.root == other.root and self._query == other._query
                and self.filesystem.equals(other.filesystem))

    def __hash__(self) -> int:
        return hash((self.root, self._query, self.filesystem.type_name))

    # -- names -----------------------------------------------------------------
    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    def path(self, rel: str = "") -> str:
        """`rel` as a path of `filesystem` ("bucket/key" on S3, absolute locally)."""
        rel = _check_rel(rel)
        return posixpath.join(self.root, rel) if rel else self.root

    def local_path(self, rel: str = "") -> Path:
        """A real path, for code that needs one (SQLite, torch.save)."""
        if not self.is_local:
            raise NotLocal(f"{self.uri(rel)} is on an object store: it has no local path")
        return Path(self.path(rel))

    def uri(self, rel: str = "") -> str:
        """What another process or node passes to `Storage.at` to open `rel`: an
        absolute path locally, `s3://bucket/key` (with this Storage's URI options)."""
        p = self.path(rel)
        if self.is_local:
            return p
        return f"s3://{p}" + (f"?{self._query}" if self._query else "")

    # -- files -----------------------------------------------------------------
    def write_atomic(self, rel: str, data: bytes) -> None:
        """Write `data` so a reader sees the old file or the whole new one: a
        temp file, fsynced, renamed (locally); one PUT (object store)."""
        if self.is_local:
            target = Path(self.path(rel))
            write_atomic(target, bytes(data))
            _fsync_dir(target.parent)
            return
        data = bytes(data)
        with self.filesystem.open_output_stream(self.path(rel)) as out:
            out.write(data)  # one write: see the module's note on streams

    def read(self, rel: str) -> bytes:
        try:
            if self.is_local:
                return Path(self.path(rel)).read_bytes()
            with self.filesystem.open_input_stream(self.path(rel)) as f:
                return f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise FileNotFoundError(f"{self.uri(rel)} does not exist") from None

    def exists(self, rel: str) -> bool:
        """Whether `rel` is a file (folders, on an object store, are only prefixes)."""
        return self.filesystem.get_file_info(self.path(rel)).type == pafs.FileType.File

    def list(self, rel: str = "") -> list[str]:
        """The names in folder `rel` (files and folders, sorted); [] if there is none."""
        base = self.path(rel)
        infos = self.filesystem.get_file_info(pafs.FileSelector(base, allow_not_found=True))
        return sorted({i.base_name for i in infos if i.path.rstrip("/") != base})

    def walk(self, rel: str = "") -> list[str]:
        """Every file below folder `rel`, as paths relative to it, sorted."""
        base = self.path(rel)
        infos = self.filesystem.get_file_info(pafs.FileSelector(base, allow_not_found=True, recursive=True))
        return sorted(posixpath.relpath(i.path, base) for i in infos if i.type == pafs.FileType.File)

    def delete(self, rel: str, missing_ok: bool = True) -> None:
        try:
            self.filesystem.delete_file(self.path(rel))
        except FileNotFoundError:
            if not missing_ok:
                raise FileNotFoundError(f"{self.uri(rel)} does not exist") from None

    def delete_dir(self, rel: str) -> None:
        """Remove folder `rel` and all below it (nothing if there is none)."""
        if not rel:
            raise ValueError("refusing to delete a Storage's root")
        self.filesystem.delete_dir_contents(self.path(rel), missing_dir_ok=True)
        try:
            self.filesystem.delete_dir(self.path(rel))
        except FileNotFoundError:
            pass

    # -- parquet ---------------------------------------------------------------
    def write_parquet(self, rel: str, table: pa.Table) -> None:
        """`table` as one Parquet file, written atomically (serialised in memory first)."""
        if self.is_local:
            target = Path(self.path(rel))
            write_atomic(target, lambda f: pq.write_table(table, f))
            _fsync_dir(target.parent)
            return
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        self.write_atomic(rel, buf.getvalue().to_pybytes())

    def read_parquet(self, rel: str, **kwargs) -> pa.Table:
        if not self.exists(rel):
            raise FileNotFoundError(f"{self.uri(rel)} does not exist")
        return pq.read_table(self.path(rel), filesystem=self.filesystem, **kwargs)

    # -- folders committed by a marker -------------------------------------------
    def upload_dir(self, local_dir: Path | str, rel: str) -> None:
        """Copy the local folder `local_dir` to folder `rel`, replacing what is there.
        The folder counts as present only once its marker (`_COMMITTED`, listing
        every file and its size) is written, last; a crash before leaves it absent."""
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise FileNotFoundError(f"{local_dir} is not a folder")
        files = {p.relative_to(local_dir).as_posix(): p for p in sorted(local_dir.rglob("*")) if p.is_file()}
        if COMMITTED in files:
            raise ValueError(f"{local_dir} holds a file named {COMMITTED}, the name of the commit marker")
        marker = json.dumps({"files": {k: p.stat().st_size for k, p in files.items()}, "ts": time.time()},
                            indent=1).encode()
        if self.is_local:
            # Built beside the target and renamed: whole or absent, as atomic_dir does.
            final = Path(self.path(rel))
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
            try:
                shutil.copytree(local_dir, tmp, dirs_exist_ok=True)
                (tmp / COMMITTED).write_bytes(marker)
                for p in [*tmp.rglob("*"), tmp]:
                    fsync_path(p)
                old = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.old")
                if final.exists():
                    os.rename(final, old)  # no reader sees a mix: old whole, then new whole
                os.rename(tmp, final)
                _fsync_dir(final.parent)
                shutil.rmtree(old, ignore_errors=True)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return
        self.delete(f"{rel}/{COMMITTED}")  # absent to readers from now until the new marker
        stale = set(self.walk(rel)) - set(files)
        for name in sorted(stale):
            self.delete(f"{rel}/{name}")
        for name, p in files.items():
            self.write_atomic(f"{rel}/{name}", p.read_bytes())
        self.write_atomic(f"{rel}/{COMMITTED}", marker)

    def committed(self, rel: str) -> bool:
        """Whether folder `rel` was uploaded whole (its marker exists)."""
        return self.exists(f"{rel}/{COMMITTED}")

    def download_dir(self, rel: str, local_dir: Path | str) -> Path:
        """Folder `rel` (committed by upload_dir) into the local folder `local_dir`,
        replacing it. Only the files its marker names; FileNotFoundError if it
        has no marker (absent, or its upload did not finish)."""
        try:
            listing = json.loads(self.read(f"{rel}/{COMMITTED}"))["files"]
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri(rel)} is not a committed folder (no {COMMITTED})") from None
        local_dir = Path(local_dir)
        local_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{local_dir.name}.", suffix=".tmp", dir=local_dir.parent))
        try:
            for name, size in listing.items():
                data = self.read(f"{rel}/{name}")
                if len(data) != size:
                    raise OSError(f"{self.uri(rel + '/' + name)}: {len(data)} bytes, its marker says {size}: "
                                  f"the folder is being replaced")
                target = tmp / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            shutil.rmtree(local_dir, ignore_errors=True)
            os.rename(tmp, local_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return local_dir


def is_remote(where: Storage | Path | str) -> bool:
    """Whether `where` names an object store (a URI other than file://, or such a Storage)."""
    if isinstance(where, Storage):
        return not where.is_local
    if isinstance(where, Path):
        return False
    text = str(where)
    return "://" in text and not text.lower().startswith("file://")


def split_ref(ref: Storage | Path | str) -> tuple[Storage, str]:
    """A folder's path or URI -> (the Storage of its parent, its name)."""
    st = Storage.at(ref)
    parent, name = posixpath.split(st.root)
    if not name:
        raise ValueError(f"{ref} names no folder below a root")
    return Storage(st.filesystem, parent, st._query), name


def cache_dir() -> Path:
    """This node's cache of folders fetched from an object store (EVOLVE_CACHE, else ~/.cache/evolve)."""
    return Path(os.environ.get("EVOLVE_CACHE") or Path.home() / ".cache" / "evolve").expanduser()


def local_folder(ref: Path | str) -> Path:
    """A folder this process can open (a checkpoint, say), named by a path (returned
    as it is) or by the URI of a folder committed by `upload_dir`: that one is
    downloaded once into this node's cache, keyed by its URI and its commit
    marker, so a folder uploaded again is fetched again and two nodes never
    share a half-written copy."""
    if not is_remote(ref):
        return Path(ref)
    parent, name = split_ref(ref)
    try:
        marker = parent.read(f"{name}/{COMMITTED}")
    except FileNotFoundError:
        raise FileNotFoundError(f"{ref} is not a committed folder (no {COMMITTED}): absent, or its upload "
                                f"did not finish") from None
    import hashlib

    key = hashlib.sha256(parent.uri(name).encode() + b"\0" + marker).hexdigest()[:24]
    dest = cache_dir() / "folders" / key / name
    if not dest.is_dir():
        tmp = dest.with_name(f".{name}.{uuid.uuid4().hex[:8]}.tmp")
        parent.download_dir(name, tmp)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process of this node fetched it first: theirs is as good
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def copy_folder(ref: Path | str, dest: Path | str) -> None:
    """Folder `ref` (a path, or the URI of a committed folder) copied to the
    local folder `dest`, which is replaced; whole or not at all."""
    with atomic_dir(dest) as tmp:
        if is_remote(ref):
            parent, name = split_ref(ref)
            parent.download_dir(name, tmp)
        else:
            shutil.copytree(ref, tmp)


def _s3(bucket: str, options: dict[str, str]) -> pafs.S3FileSystem:
    kwargs: dict = {}
    endpoint = (options.get("endpoint_override") or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL"))
    if endpoint:
        parsed = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        scheme = options.get("scheme") or parsed.scheme or None
        if scheme:
            kwargs["scheme"] = scheme
    elif options.get("scheme"):
        kwargs["scheme"] = options["scheme"]
    region = options.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region and not endpoint:
        try:
            region = pafs.resolve_s3_region(bucket)
        except OSError:
            region = None  # the SDK's own default
    if region:
        kwargs["region"] = region
    if options.get("anonymous", "").lower() in ("1", "true", "yes"):
        kwargs["anonymous"] = True
    if options.get("force_virtual_addressing", "").lower() in ("1", "true", "yes"):
        kwargs["force_virtual_addressing"] = True
    # Delayed open: a small write is one PutObject, not create/upload-part/complete.
    return pafs.S3FileSystem(allow_delayed_open=True, **kwargs)


def _check_rel(rel: str) -> str:
    rel = str(rel).strip("/")
    if not rel:
        return ""
    if "\\" in rel or any(p in ("", ".", "..") for p in rel.split("/")):
        raise ValueError(f"not a relative storage path: {rel!r}")
    return rel


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's entry list, after a rename)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Makes a rename durable; best effort where folders can't be opened."""
    try:
        fsync_path(path)
    except OSError:
        pass


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


def write_atomic(path: Path | str, data: bytes | Callable[[BinaryIO], None]) -> Path:
    """Write `data` (bytes, or a function writing to a binary file) to `path` so
    that a reader, or a rerun after a crash, sees the whole file or none: a temp
    file beside it, fsynced, renamed into place. Readable like any other file
    (mkstemp's 0600 would hide it from other users)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:16]}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data) if isinstance(data, (bytes, bytearray)) else data(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def open_root(root) -> tuple[Storage, Path | str, bool]:
    """A store's root (a path, a `file://` or `s3://` URI, or a Storage) ->
    (its Storage, its root as a local Path (made) or its URI, whether local)."""
    if is_remote(root):
        storage = Storage.at(root)
        return storage, storage.uri(), False
    if isinstance(root, Storage):
        root = root.local_path()
    elif str(root).lower().startswith("file://"):
        root = Storage.at(root).local_path()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return Storage.at(root), root, True
