"""The run folder: everything one run makes, and the only thing a resume reads."""

from __future__ import annotations

import json
from pathlib import Path

from evolve.dataset import write_json_atomic


def load_rounds(rounds_dir: Path) -> list[dict]:
    """Every finished round's statistics, in order."""
    return [json.loads(p.read_text()) for p in sorted(Path(rounds_dir).glob("round_*.json"))]


class RunFolder:
    """Paths of everything one run makes."""

    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()
        self.config = self.root / "config.json"
        self.images = self.root / "images"
        self.features = self.root / "features"  # a LatentStudent's latents and captions, beside the images
        self.ledger = self.root / "ledger.sqlite"
        self.datasets = self.root / "datasets"
        self.checkpoints = self.root / "checkpoints"
        self.train_storage = self.root / "ray_train"
        self.snapshots = self.checkpoints / "live"
        self.rounds = self.root / "rounds"
        self.baseline = self.rounds / "baseline.json"
        self.grids = self.root / "grids"
        self.verdicts = self.root / "verdicts"  # every judge answer, raw and parsed, per round
        self.eval = self.root / "eval"          # held-out images and per-image scores of every evaluation
        self.logs = self.root / "logs"
        self.report = self.root / "report.json"

    def checkpoint(self, rnd: int) -> Path:
        return self.checkpoints / f"round_{rnd:03d}"

    def round_stats(self, rnd: int) -> Path:
        return self.rounds / f"round_{rnd:03d}.json"

    def final_stats(self, version: int) -> Path:
        return self.rounds / f"final_v{version:04d}.json"

    def make(self) -> None:
        for p in (self.root, self.images, self.datasets, self.checkpoints, self.rounds, self.grids):
            p.mkdir(parents=True, exist_ok=True)

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
        if self.config.exists():
            old = RunConfig.load(self.config)
            free = {"run_dir", "rounds", "serve_port", "serve_proxies", "serve_edgen", "max_wall_s", "target_heldout",
                    "stop_when_spent"}
            mine, theirs = cfg.model_dump(exclude=free), old.model_dump(exclude=free)
            if mine != theirs:
                diff = sorted(k for k in mine if mine[k] != theirs.get(k))
                raise ValueError(f"run folder {self.root} holds a run with another config "
                                 f"(differs in {diff}); use a new --run-dir")
        cfg.save(self.config)
