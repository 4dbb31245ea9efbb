"""Content-addressed image store: bytes in, sha256 hex digest out.

A ref names its bytes forever, so `put` is idempotent and two runs (or two
gateways) that buy the same image share one file. Files live in sharded
folders (`ab/abcdef....png`) so no folder grows huge. A write lands in a temp
file in the target folder, is fsynced, then renamed into place: a reader sees
either the whole image or none, even after a crash.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

_REF = re.compile(r"^[0-9a-f]{64}$")


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


class ImageStore:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def ref_of(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    def path(self, ref: str) -> Path:
        # Refs become paths: refuse anything that is not a digest (no "../").
        if not _REF.match(ref):
            raise ValueError(f"not an image ref (64 lower-case hex digits): {ref!r}")
        return self.root / ref[:2] / f"{ref}.png"

    def has(self, ref: str) -> bool:
        return self.path(ref).is_file()

    def put(self, data: bytes) -> str:
        ref = self.ref_of(data)
        final = self.path(ref)
        if final.is_file():
            return ref
        write_atomic(final, data)
        _fsync_dir(final.parent)
        return ref

    def get(self, ref: str) -> bytes:
        try:
            return self.path(ref).read_bytes()
        except FileNotFoundError:
            raise KeyError(f"image {ref} is not in the store at {self.root}") from None


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; best effort where directories can't be opened.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
