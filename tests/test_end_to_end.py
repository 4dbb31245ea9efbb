"""A tiny but complete run of the loop on the shared Ray instance, and its resume."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from evolve.config import RunConfig
from evolve.dataset import DatasetVersions
from evolve.ledger import Ledger

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_tiny_run_end_to_end_and_resume(ray_local, tmp_path):
    from evolve.driver import EvolveRun

    cfg = RunConfig.load(ROOT / "configs" / "tiny.yaml").model_copy(
        update={"run_dir": tmp_path / "run", "serve_port": free_port(), "from_scratch": True})
    report = EvolveRun(cfg, progress=lambda *_: None).run()
    run = tmp_path / "run"

    # Every artefact the issue asks for is in the run folder.
    assert (run / "report.json").exists() and (run / "report.md").exists() and (run / "accuracy.png").exists()
    assert sorted(p.name for p in (run / "grids").iterdir()) == ["round_0.png", "round_1.png", "round_init.png"]
    rounds = [json.loads((run / "rounds" / f"round_{r:03d}.json").read_text()) for r in range(2)]
    for r in rounds:
        assert {"student_win_rate", "dataset_size", "images_bought", "spend", "teacher_wins", "heldout"} <= set(r)
    assert set(report["teachers"]) == {"aurora", "brush"}
    assert len(report["student"]["heldout_by_round"]) == 3

    versions = DatasetVersions(run / "datasets")
    assert versions.versions() == [0, 1, 2]
    v1 = versions.read(1)
    assert {r.op for r in v1} <= {"seed", "expand", "mutate"}
    # Mutation probability 1.0 in the tiny config: round 0 must have mutated.
    assert rounds[0]["mutated"] is True

    # No paid image twice: one ledger entry per (teacher, prompt, seed, size).
    entries = Ledger(run / "ledger.jsonl").entries()
    keys = [(e["teacher"], e["prompt"], e["seed"], e["size"]) for e in entries]
    assert len(keys) == len(set(keys))
    paid = len(entries)
    assert report["total_images_bought"] == paid

    # Resume: a finished run re-run with one more round buys only new images,
    # continues from round 2 and leaves the earlier rounds as they were.
    before = (run / "rounds" / "round_000.json").read_text()
    cfg3 = cfg.model_copy(update={"rounds": 3})
    EvolveRun(cfg3, progress=lambda *_: None).run()
    assert (run / "rounds" / "round_002.json").exists()
    assert (run / "rounds" / "round_000.json").read_text() == before
    entries = Ledger(run / "ledger.jsonl").entries()
    keys = [(e["teacher"], e["prompt"], e["seed"], e["size"]) for e in entries]
    assert len(keys) == len(set(keys))


@pytest.mark.integration
def test_run_folder_refuses_other_config(ray_local, tmp_path):
    from evolve.driver import EvolveRun

    cfg = RunConfig(run_dir=tmp_path / "run")
    (tmp_path / "run").mkdir()
    RunConfig(run_dir=tmp_path / "run", seed=99).save(tmp_path / "run" / "config.json")
    with pytest.raises(ValueError, match="another config"):
        EvolveRun(cfg).run()
