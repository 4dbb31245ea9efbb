"""Checks on a run folder that every kill and stop test makes."""

from __future__ import annotations

from pathlib import Path

from evolve.dataset import DatasetVersions
from evolve.ledger import Ledger


def assert_consistent(run: Path) -> None:
    """What every kill and stop must leave: contiguous versions whose records'
    images are all present and valid, and no image paid for twice."""
    from evolve.shapes.render import from_png
    from evolve.store import ImageStore

    versions = DatasetVersions(run / "datasets")
    vs = versions.versions()
    assert vs == list(range(len(vs))), vs
    store = ImageStore(run / "images")
    for v in vs:
        for r in versions.read(v):
            assert from_png(store.get(r.image_ref)).shape[2] == 3
    entries = Ledger(run / "ledger.sqlite").entries()
    keys = [(e["teacher"], e["prompt"], e["seed"], e["size"]) for e in entries]
    assert len(keys) == len(set(keys))
