"""report.html: one self-contained page, everything escaped, optional pieces optional."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from evolve.dataset import DatasetVersions, Record, write_json_atomic
from evolve.html_report import write_html_report
from evolve.ledger import Ledger
from evolve.report import write_report

EVIL = "<script>alert(1)</script>"
SIZE = 8  # image_size of the fake student; grid cells are (SIZE + 2) * 3 px


def acc(x: float) -> dict:
    return {"overall": x, "per_category": {"counting": x, "colors": x / 2}, "n": 4}


def grid(path: Path, rows: int, cols: int) -> None:
    cell = (SIZE + 2) * 3
    rng = np.random.default_rng(rows * 10 + cols)
    Image.fromarray(rng.integers(0, 255, (rows * cell, cols * cell, 3), np.uint8)).save(path)


def rec(id_, prompt, op, rnd=0, parent=None, teacher="aurora") -> Record:
    return Record(id=id_, prompt=prompt, category="counting", teacher=teacher, image_ref="ref-" + id_,
                  seed=1, round_added=rnd, parent_id=parent, op=op)


def run_folder(tmp_path: Path, *, final=True, report=True, judge=True, datasets=True, rounds=2):
    f = SimpleNamespace(root=tmp_path, rounds=tmp_path / "rounds", grids=tmp_path / "grids",
                        datasets=tmp_path / "datasets", report=tmp_path / "report.json",
                        ledger=tmp_path / "ledger.sqlite")
    f.rounds.mkdir()
    f.grids.mkdir()
    write_json_atomic(f.rounds / "baseline.json", {"heldout": acc(0.25)})
    grid(f.grids / "round_init.png", 2, 4)
    for r, x in list(enumerate((0.5, 0.75)))[:rounds]:
        write_json_atomic(f.rounds / f"round_{r:03d}.json", {
            "round": r, "dataset_size": 3 + r, "judged": 2, "no_verdict": 1, "student_win_rate": 0.5,
            "teacher_wins": {"aurora": 1}, "deleted": 1, "expanded_from": 1, "mutated": r == 1,
            "added": {"expand": 1, "reseed": 1 - r, "mutate": r}, "images_bought": 6 * (r + 1),
            "spend": {"aurora": 0.1 * (r + 1), "brush": 0.05 * (r + 1)}, "heldout": acc(x),
            "trainer_step": 100 * (r + 1), "phases": {"heldout_s": 1.5, "judge_s": 2.0, "evolve_s": 0.5},
            "round_s": 4.25})
        grid(f.grids / f"round_{r}.png", 2, 4)
    if judge:
        grid(f.grids / "judge_000.png", 3, 3)
        write_json_atomic(f.grids / "judge_000.json", {"columns": ["student", "aurora", "brush"], "rows": [
            {"record_id": "s1", "prompt": EVIL, "decided": True, "student_matches": False,
             "best_teacher": "aurora"},
            {"record_id": "s2", "prompt": "two red squares", "decided": True, "student_matches": True,
             "best_teacher": "brush"},
            {"record_id": "s3", "prompt": "a blue circle", "decided": False, "student_matches": False,
             "best_teacher": "aurora"}]})
    if final:
        write_json_atomic(f.rounds / "final_v0002.json", {"version": 2, "trainer_step": 300,
                                                         "heldout": acc(0.875)})
        grid(f.grids / "round_final.png", 2, 4)
    if datasets:
        dv = DatasetVersions(f.datasets)
        seeds = [rec("s1", EVIL, "seed"), rec("s2", "two red squares", "seed"), rec("s3", "a blue circle", "seed")]
        dv.write(0, seeds, {"round": 0})
        v1 = [seeds[1], seeds[2], rec("e1", "three red squares", "expand", 1, "s1", "brush"),
              rec("r1", "a red & blue square", "reseed", 1, "s2")]
        dv.write(1, v1, {"round": 1})
        dv.write(2, v1[1:] + [rec("m1", "a green triangle left of a circle", "mutate", 2),
                              rec("e2", "four red squares", "expand", 2, "e1")], {"round": 2})
    if report:
        ledger = Ledger(f.ledger)  # what the report counts as bought and spent: the ledger ($0.30)
        for i in range(24):
            ledger.record({"teacher": "aurora", "prompt": f"p{i}", "seed": 0, "size": 32, "ref": "r", "price": 0.0125})
        write_report(f, {"aurora": acc(0.9)}, {"aurora": {"paid_calls": 12, "spent": 0.2},
                                               "brush": {"paid_calls": 12, "spent": 0.1}},
                     61.0, say=lambda *_: None,
                     final=json.loads((f.rounds / "final_v0002.json").read_text()) if final else None)
    return f


def check_self_contained(page: str) -> None:
    assert "src=\"http" not in page and "src='http" not in page and "href=\"http" not in page
    srcs = re.findall(r"<img[^>]*\ssrc=[\"']([^\"']*)", page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<script" not in page and "<link" not in page


def test_full_run(tmp_path):
    f = run_folder(tmp_path)
    assert (tmp_path / "report.html").is_file()  # written by write_report
    assert write_html_report(f) == tmp_path / "report.html"
    page = (tmp_path / "report.html").read_text()
    check_self_contained(page)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert" not in page
    # header: final student vs teachers, start; the numbers
    assert "87.5%" in page and "25.0%" in page and "90.0%" in page and "images bought 24" in page
    assert "total spend $0.30" in page and "student (final, v0002)" in page
    # rounds with their judge grid (one image per judged row) and held-out grid
    assert "id='round-0'" in page and "id='round-1'" in page and "id='final'" in page
    assert "teacher aurora wins" in page and "student matches" in page and "no verdict" in page
    assert page.count("alt='judge row") == 3
    assert "heldout 1.5, judge 2.0, evolve 0.5" in page
    # lineage: parent prompt -> child prompt in one row, evolved records only
    rows = re.findall(r"<tr>.*?</tr>", page)
    assert any("&lt;script&gt;" in r and "three red squares" in r and ">expand<" in r for r in rows)
    assert any("three red squares" in r and "four red squares" in r for r in rows)
    assert any("two red squares" in r and "a red &amp; blue square" in r and ">reseed<" in r for r in rows)
    assert any("a green triangle left of a circle" in r and ">mutate<" in r for r in rows)
    assert "4 prompts added by the loop" in page
    assert not list(tmp_path.glob(".report.html.*"))


def test_optional_pieces_missing(tmp_path):
    f = run_folder(tmp_path, final=False, report=False, judge=False, datasets=False)
    page = write_html_report(f).read_text()
    check_self_contained(page)
    assert "no report.json yet" in page and "student (after round 1)" in page and "75.0%" in page
    assert "images bought 12" in page and "id='final'" not in page and "What the judge saw" not in page
    assert "no dataset versions" in page


def test_no_round_finished_yet(tmp_path):
    f = run_folder(tmp_path, final=False, report=False, judge=False, datasets=False, rounds=0)
    page = write_html_report(f).read_text()
    assert "rounds finished 0" in page and "25.0%" in page and "id='round-0'" not in page
    # nothing at all yet, and a folder with only `root`
    bare = tmp_path / "bare"
    bare.mkdir()
    page = write_html_report(SimpleNamespace(root=bare)).read_text()
    assert "no held-out scores yet" in page and "<img" not in page


def test_grid_that_does_not_split_is_shown_whole(tmp_path):
    f = run_folder(tmp_path, report=False)
    Image.new("RGB", (90, 91)).save(f.grids / "judge_000.png")
    page = write_html_report(f).read_text()
    assert "alt='judge row" not in page and "alt='judge_000.png'" in page and "&lt;script&gt;" in page


def test_lineage_is_capped(tmp_path, monkeypatch):
    import evolve.html_report as h

    monkeypatch.setattr(h, "MAX_LINEAGE_ROWS", 2)
    f = run_folder(tmp_path, report=False)
    page = write_html_report(f).read_text()
    assert "… and 2 more not shown." in page


@pytest.mark.skipif(not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")),
                    reason="no Chromium on PATH")
def test_screenshot(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "screenshot_report", Path(__file__).parents[1] / "scripts" / "screenshot_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    run_folder(tmp_path)
    out = mod.screenshot(str(tmp_path / "report.html"), tmp_path / "shot.png", 800, 1200)
    assert Image.open(out).size == (800, 1200)
