"""Checks on a run folder that every kill and stop test makes."""

from __future__ import annotations

from pathlib import Path

from evolve.dataset import DatasetVersions
from evolve.ledger import Ledger
from evolve.run_folder import RunFolder


def assert_consistent(run: Path | RunFolder) -> None:
    """What every kill and stop must leave: contiguous versions whose records'
    images are all present and valid, and no image paid for twice. `run`: a
    run folder's path, or a RunFolder (one on an object store)."""
    from evolve.shapes.render import from_png
    from evolve.store import ImageStore

    folder = run if isinstance(run, RunFolder) else RunFolder(run)
    versions = DatasetVersions(folder.datasets)
    vs = versions.versions()
    assert vs == list(range(len(vs))), vs
    store = ImageStore(folder.images)
    for v in vs:
        for r in versions.read(v):
            assert from_png(store.get(r.image_ref)).shape[2] == 3
    entries = Ledger(folder.ledger).entries()
    keys = [(e["teacher"], e["prompt"], e["seed"], e["size"]) for e in entries]
    assert len(keys) == len(set(keys))
