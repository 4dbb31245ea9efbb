"""The run folder: everything one run makes, and the only thing a resume reads."""

from __future__ import annotations

import json
from pathlib import Path

from evolve.dataset import write_json_atomic
from evolve.storage import write_atomic


def load_rounds(rounds_dir: Path) -> list[dict]:
    """Every finished round's statistics, in order."""
    return [json.loads(p.read_text()) for p in sorted(Path(rounds_dir).glob("round_*.json"))]


class RunFolder:
    """Paths of everything one run makes.

    `root` is a local folder (or a shared mount every node sees), or a folder
    of an object store (`s3://bucket/run`). On an object store, what other
    nodes read or write lives there directly: the images, features and dataset
    versions (Ray Data's tasks read them), Ray Train's storage, the training
    workers' snapshots and the round checkpoints (the sampler, Edgen and the
    next round's workers load them), each attribute then a URI. What only the
    driver reads and writes (the config, round statistics, verdicts,
    evaluations, logs, report, and the SQLite ledger, whose every change is
    journaled to `ledger_mirror` before it commits) is in `root`, a local
    folder on the driver's node (`work`, else this node's cache), and
    `save_state` copies it to the object store at each round's end, where a
    driver on another node (`pull_state`) picks it up."""

    def __init__(self, root: Path | str, work: Path | str | None = None):
        from evolve.storage import Storage, cache_dir

        self.storage = Storage.at(root)
        self.shared = not self.storage.is_local  # the run lives on an object store
        if self.shared:
            here = Path(work) if work is not None else cache_dir() / "runs" / self.storage.root
            self.root = here.expanduser().resolve()
        else:
            self.root = self.storage.local_path()
        self.uri = self.storage.uri()

        def on_store(rel: str) -> Path | str:  # what any node opens: a local path, or a URI
            return self.storage.uri(rel) if self.shared else self.root / rel

        self.config = self.root / "config.json"
        self.images = on_store("images")
        self.features = on_store("features")  # a LatentStudent's latents and captions, beside the images
        self.ledger = self.root / "ledger.sqlite"
        self.ledger_mirror = self.storage.uri("ledger") if self.shared else None
        self.datasets = on_store("datasets")
        self.checkpoints = self.root / "checkpoints"  # the driver's copies of the round checkpoints
        self.shared_checkpoints = on_store("checkpoints")
        self.train_storage = on_store("ray_train")
        self.snapshots = on_store("checkpoints/live")
        self.rounds = self.root / "rounds"
        self.baseline = self.rounds / "baseline.json"
        self.grids = self.root / "grids"
        self.verdicts = self.root / "verdicts"  # every judge answer, raw and parsed, per round
        self.eval = self.root / "eval"          # held-out images and per-image scores of every evaluation
        self.logs = self.root / "logs"
        self.report = self.root / "report.json"

    def __str__(self) -> str:
        return self.uri if self.shared else str(self.root)

    def checkpoint(self, rnd: int) -> Path:
        return self.checkpoints / f"round_{rnd:03d}"

    def checkpoint_ref(self, rnd: int) -> str:
        """Round `rnd`'s checkpoint as any node names it (its path, or its URI)."""
        return str(self.share_name(f"round_{rnd:03d}"))

    def share_name(self, name: str) -> Path | str:
        return self.storage.uri(f"checkpoints/{name}") if self.shared else self.checkpoints / name

    def share(self, checkpoint: Path) -> str:
        """A checkpoint folder of the driver's (`checkpoints/<name>`) made visible
        to every node: on an object store uploaded (committed last), locally as it is."""
        if self.shared:
            self.storage.upload_dir(checkpoint, f"checkpoints/{Path(checkpoint).name}")
        return str(self.share_name(Path(checkpoint).name))

    def share_start(self, checkpoint: str) -> str:
        """The start checkpoint as every node loads it: on an object store a
        head-local folder is uploaded once, to `checkpoints/start` (a resume
        finds it there: it is not compared again), and its URI returned; a URI
        or a local run folder's path is returned as it is."""
        from evolve.storage import is_remote

        if not self.shared or is_remote(checkpoint):
            return checkpoint
        if not self.storage.committed("checkpoints/start"):
            self.storage.upload_dir(checkpoint, "checkpoints/start")
        return self.storage.uri("checkpoints/start")

    def round_stats(self, rnd: int) -> Path:
        return self.rounds / f"round_{rnd:03d}.json"

    def final_stats(self, version: int) -> Path:
        return self.rounds / f"final_v{version:04d}.json"

    def make(self) -> None:
        for p in (self.root, self.images, self.datasets, self.checkpoints, self.rounds, self.grids):
            if isinstance(p, Path):
                p.mkdir(parents=True, exist_ok=True)

    def open_ledger(self):
        """The run's ledger (on an object store, with its mirror there)."""
        from evolve.ledger import Ledger

        return Ledger(self.ledger, mirror=self.ledger_mirror)

    def attach_ledger(self) -> None:
        """Open the ledger once with its mirror: the file remembers it, so every
        writer that opens it later (the teacher gateways) journals there too. On a
        new node, a missing or older file is restored from the mirror here. A
        local run's ledger has no mirror: nothing to do (the file is made by its
        first writer)."""
        if self.shared:
            self.open_ledger().close()

    # -- the driver's files on an object store ---------------------------------------
    STATE_SKIP = ("ledger.sqlite", "checkpoints/", "logs/ray.log")  # mirrored on their own / this node's
    # The ledger's journal is compacted into a snapshot once this long: a snapshot
    # is a copy of the whole file (GBs at millions of purchases), a restore replays
    # the journal since the last one (a GET each).
    COMPACT_AFTER = 1000

    def save_state(self) -> int:
        """On an object store: compact the ledger's journal where it has grown
        long, and copy the driver's files that changed since the last call (not
        the ledger, mirrored by itself; not the checkpoints, shared when made)
        to the same names there; round statistics last, so a round
        counts as finished there only once all it wrote is there. Returns how
        many files went; 0 for a local folder."""
        if not self.shared:
            return 0
        with self.open_ledger() as ledger:
            if ledger.journal_length >= self.COMPACT_AFTER:
                ledger.checkpoint()  # a consistent copy there, the journal behind it trimmed
        seen_path = self.root / ".saved.json"
        seen = json.loads(seen_path.read_text()) if seen_path.exists() else {}
        files = sorted((p for p in self.root.rglob("*") if p.is_file() and not p.name.startswith(".")),
                       key=lambda p: (p.parent == self.rounds, str(p)))
        sent = 0
        for p in files:
            rel = p.relative_to(self.root).as_posix()
            if rel.startswith(self.STATE_SKIP):
                continue
            try:
                st = p.stat()
                stamp = [st.st_size, st.st_mtime_ns]
                if seen.get(rel) != stamp:
                    self.storage.write_atomic(rel, p.read_bytes())
                    seen[rel], sent = stamp, sent + 1
            except FileNotFoundError:  # a temp file, renamed meanwhile
                continue
        write_json_atomic(seen_path, seen)
        return sent

    SHARED_DIRS = ("ledger/", "images/", "features/", "datasets/", "ray_train/", "checkpoints/")

    def pull_state(self) -> int:
        """On an object store, where this node has no copy of the run (a driver on
        a new head): fetch the driver's files `save_state` put there; config.json
        last, so a pull cut short is done again. (The checkpoints stay there: every
        node, this one too, loads them by URI.) Returns how many files came."""
        if not self.shared or self.config.exists() or not self.storage.exists("config.json"):
            return 0
        names = [rel for rel in self.storage.walk() if not rel.startswith(self.SHARED_DIRS) and rel != "config.json"]
        seen = {}
        for rel in [*names, "config.json"]:
            write_atomic(self.root / rel, self.storage.read(rel))
            st = (self.root / rel).stat()
            seen[rel] = [st.st_size, st.st_mtime_ns]  # as save_state stamps them: not sent back
        write_json_atomic(self.root / ".saved.json", seen)
        return len(names) + 1

    def first_unfinished_round(self) -> int:
        r = 0
        while self.round_stats(r).exists():
            r += 1
        return r

    def read_json(self, path: Path):
        return json.loads(path.read_text()) if path.exists() else None

    def log_verdicts(self, tag: str, entries: list[dict]) -> None:
        """The judge's answers (raw and parsed) beside the samples they decided,
        in `verdicts/<tag>.json`; written whole, so a resumed round rewrites it."""
        write_json_atomic(self.verdicts / f"{tag}.json", entries)

    def check_config(self, cfg) -> None:
        """Save `cfg` as the run's config, or refuse it where the folder holds
        another run. What does not change the run's results may differ on a
        resume; the folder itself may have moved (nothing inside stores its path)."""
        from evolve.config import RunConfig

        self.make()
        self.pull_state()
        if self.config.exists():
            old = RunConfig.load(self.config)
            free = {"run_dir", "rounds", "serve_port", "serve_proxies", "serve_edgen", "max_wall_s", "target_heldout",
                    "stop_when_spent"}
            mine, theirs = cfg.model_dump(exclude=free), old.model_dump(exclude=free)
            if mine != theirs:
                diff = sorted(k for k in mine if mine[k] != theirs.get(k))
                raise ValueError(f"run folder {self} holds a run with another config "
                                 f"(differs in {diff}); use a new --run-dir")
        cfg.save(self.config)
