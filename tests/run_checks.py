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


def write_purchases(path: str, progress: str, mirror: str | None = None,
                    die_in_transaction_after: int | None = None) -> None:
    """A writer to kill (a child process's target): purchases into the ledger at
    `path`, each call noted in `progress` once it returned ("begun <id>", then
    "bought <id>"). With `die_in_transaction_after`, that purchase's process
    exits with status 3 inside its transaction (its row written, its totals not)."""
    import os

    led = Ledger(path, mirror=mirror)
    with open(progress, "a") as f:
        for i in range(100_000):
            if i == die_in_transaction_after:
                def die(*args):
                    os._exit(3)
                Ledger._bump = staticmethod(die)
            call = led.begin("aurora", f"a circle {i}", i, 32, 0.01)
            f.write(f"begun {call}\n")
            f.flush()
            led.record({"teacher": "aurora", "prompt": f"a circle {i}", "seed": i, "size": 32,
                        "ref": f"{i:064x}", "price": 0.01, "call": call})
            f.write(f"bought {call}\n")
            f.flush()


def noted_calls(progress: Path) -> tuple[list[int], list[int]]:
    """(the calls `write_purchases` noted as begun, those noted as bought)."""
    done = [line.split() for line in progress.read_text().splitlines()]
    return [int(c) for what, c in done if what == "begun"], [int(c) for what, c in done if what == "bought"]
