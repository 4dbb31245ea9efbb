"""The run report: the final student is the last round's, or, with the
continuous schedule, the one trained on the last evolved version."""

from __future__ import annotations

import json
from types import SimpleNamespace

from evolve.dataset import write_json_atomic
from evolve.ledger import Ledger
from evolve.report import write_report


def acc(x: float) -> dict:
    return {"overall": x, "per_category": {"counting": x, "colors": x}, "n": 2}


def folder(tmp_path):
    f = SimpleNamespace(root=tmp_path, rounds=tmp_path / "rounds", report=tmp_path / "report.json",
                        ledger=tmp_path / "ledger.sqlite")
    f.rounds.mkdir()
    ledger = Ledger(f.ledger)  # six images, bought by an earlier process of the run
    for i in range(6):
        ledger.record({"teacher": "a", "prompt": f"p{i}", "seed": 0, "size": 32, "ref": "r", "price": 0.04})
    write_json_atomic(f.rounds / "baseline.json", {"heldout": acc(0.25)})
    for r, x in enumerate((0.5, 0.75)):
        write_json_atomic(f.rounds / f"round_{r:03d}.json", {
            "round": r, "heldout": acc(x), "student_win_rate": 0.5, "dataset_size": 4,
            "images_bought": 3 * (r + 1), "spend": {"a": 0.1}})
    return f


STATS = {"a": {"paid_calls": 2, "spent": 0.24}}  # this process bought 2: the report counts the ledger


def test_final_is_the_last_round_without_a_final_segment(tmp_path):
    rep = write_report(folder(tmp_path), {"a": acc(0.9)}, STATS, 12.0, say=lambda *_: None)
    assert rep["student"]["heldout_by_round"] == [0.25, 0.5, 0.75]
    assert rep["student"]["final"]["overall"] == 0.75 and rep["student"]["final_after"] == {"round": 1}
    assert json.loads((tmp_path / "report.json").read_text())["total_images_bought"] == 6
    assert (tmp_path / "accuracy.png").stat().st_size > 0


def test_final_student_trained_on_the_last_version(tmp_path):
    final = {"version": 2, "trainer_step": 400, "heldout": acc(1.0)}
    rep = write_report(folder(tmp_path), {"a": acc(0.9)}, STATS, 12.0, say=lambda *_: None, final=final)
    assert rep["student"]["heldout_by_round"] == [0.25, 0.5, 0.75, 1.0]
    assert rep["student"]["final"]["overall"] == 1.0
    md = (tmp_path / "report.md").read_text()
    assert "| student (final) | 100.0% |" in md and "last evolved version v0002 (snapshot at trainer step 400)" in md


def test_spend_counts_uncertain_calls_and_says_so(tmp_path):
    f = folder(tmp_path)
    ledger = Ledger(f.ledger)
    call = ledger.begin("a", "p9", 0, 32, 0.04)  # went out; no answer came
    ledger.mark(call, "uncertain", why="timed out")
    rep = write_report(f, {"a": acc(0.9)}, STATS, 12.0, say=lambda *_: None)
    assert rep["total_spend"] == 0.28 and rep["spend_uncertain"] == 0.04 and rep["uncertain_calls"] == 1
    assert rep["total_images_bought"] == 6
    assert "spend $0.28 (of which $0.04 uncertain: 1 call that may have been billed)" in (
        tmp_path / "report.md").read_text()
