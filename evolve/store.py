"""Content-addressed image store: bytes in, sha256 hex digest out.

A ref names its bytes forever, so `put` is idempotent and two runs (or two
gateways) that buy the same image share one file. Files live in sharded
folders (`ab/abcdef....png`) so no folder grows huge. A write lands in a temp
file in the target folder, is fsynced, then renamed into place: a reader sees
either the whole image or none, even after a crash.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import TYPE_CHECKING

from evolve.storage import _fsync_dir, write_atomic  # noqa: F401 - write_atomic: this module's API too

if TYPE_CHECKING:
    from evolve.storage import Storage

_REF = re.compile(r"^[0-9a-f]{64}$")


class ImageStore:
    """Images by ref under `root`: a local folder (a path; a shared mount is one),
    or a folder of an object store (an `s3://` URI or a `Storage`). The layout
    is the same in both; on an object store an image is one PUT (atomic: a
    reader sees all of it or nothing) and `uri(ref)` names it, as `path(ref)`
    does locally."""

    def __init__(self, root: Path | str | Storage) -> None:
        from evolve.storage import open_root

        self.storage, self.root, self._local = open_root(root)

    @property
    def is_local(self) -> bool:
        return self._local

    @staticmethod
    def ref_of(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    @staticmethod
    def rel(ref: str) -> str:
        """A ref's place below the store's root, `ab/<ref>.png`."""
        # Refs become paths: refuse anything that is not a digest (no "../").
        if not _REF.match(ref):
            raise ValueError(f"not an image ref (64 lower-case hex digits): {ref!r}")
        return f"{ref[:2]}/{ref}.png"

    def path(self, ref: str) -> Path:
        rel = self.rel(ref)
        if not self._local:
            from evolve.storage import NotLocal

            raise NotLocal(f"the image store at {self.root} is on an object store: image {ref} has no "
                           f"local path; use get(ref) for its bytes or uri(ref) to name it")
        return self.root / rel

    def uri(self, ref: str) -> str:
        """Where image `ref` is (or would be), as `Storage.at` opens it on any node:
        an absolute path locally, `s3://bucket/.../ab/<ref>.png` on an object store."""
        return self.storage.uri(self.rel(ref))

    def has(self, ref: str) -> bool:
        if self._local:
            return self.path(ref).is_file()
        return self.storage.exists(self.rel(ref))

    def put(self, data: bytes) -> str:
        ref = self.ref_of(data)
        if not self._local:
            rel = self.rel(ref)
            if not self.storage.exists(rel):  # a ref names its bytes: a racing PUT writes the same
                self.storage.write_atomic(rel, data)
            return ref
        final = self.path(ref)
        if final.is_file():
            return ref
        write_atomic(final, data)
        _fsync_dir(final.parent)
        return ref

    def get(self, ref: str) -> bytes:
        if not self._local:
            try:
                return self.storage.read(self.rel(ref))
            except FileNotFoundError:
                raise KeyError(f"image {ref} is not in the store at {self.root}") from None
        try:
            return self.path(ref).read_bytes()
        except FileNotFoundError:
            raise KeyError(f"image {ref} is not in the store at {self.root}") from None
