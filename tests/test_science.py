"""The science harness's quick mode (CI's smoke test of benchmarks/science.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _science():
    spec = importlib.util.spec_from_file_location("science", ROOT / "benchmarks" / "science.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_arms_differ_only_where_they_should():
    sci = _science()
    base = sci.base_config(quick=False, config=None)
    rnd, evo = sci.arm_config(base, "random", 500, 1), sci.arm_config(base, "evolve", 500, 1)
    assert (rnd.max_images, evo.max_images, rnd.seed) == (500, 500, 1)
    assert rnd.evolution.strategy == "random" and rnd.world.seed_prompts == 500
    assert evo.evolution.strategy == "evolve" and evo.world.seed_prompts == 500 // 12
    assert rnd.train == evo.train and rnd.student == evo.student and rnd.teachers == evo.teachers
    assert [t.name for t in sci.arm_config(base, "only-brush", 500, 0).teachers] == ["brush"]
    assert not sci.arm_config(base, "no-delete", 500, 0).evolution.delete
    assert sci.arm_config(base, "no-select", 500, 0).evolution.select == "random"
    with pytest.raises(ValueError, match="unknown arm"):
        sci.arm_config(base, "no-judge", 500, 0)
    assert rnd.train.lockstep and rnd.train.steps_per_round == evo.train.steps_per_round


def test_efficiency_table_compares_images_actually_bought():
    sci = _science()
    runs = [{"arm": "random", "budget": 100, "heldout": 0.4, "images_bought": 100},
            {"arm": "random", "budget": 400, "heldout": 0.6, "images_bought": 400},
            {"arm": "evolve", "budget": 100, "heldout": 0.5, "images_bought": 90},
            {"arm": "evolve", "budget": 100, "heldout": 0.5, "images_bought": 110},
            {"arm": "evolve", "budget": 400, "heldout": 0.7, "images_bought": 300},
            {"arm": "evolve", "budget": 50, "heldout": 0.3, "images_bought": 50}]
    summary = sci.summarize([{**r, "teachers": {"a": 0.5}} for r in runs])
    assert summary["evolve@100"]["images"] == 100 and summary["evolve@100"]["n"] == 2
    low, mid, high = sci.efficiency_table(summary)
    assert low["random_needs"] == 100 and low["ratio_at_most"]  # random's smallest budget already does it
    assert mid["random_needs"] == pytest.approx(250) and mid["ratio"] == pytest.approx(2.5)
    assert high["random_needs"] is None and high["ratio"] is None  # random sampling never got there


def test_suite_arms_and_the_arm_plot(tmp_path):
    sci = _science()
    base = sci.base_config(quick=False, config=None)
    assert sci.suite_arms("teachers", base, False) == [
        ("only-aurora", 900), ("only-brush", 900), ("only-canvas", 900), ("evolve", 900)]
    assert [a for a, _ in sci.suite_arms("ablations", base, False)] == [
        "evolve", "no-delete", "no-expand", "no-mutate", "no-select"]
    runs = [{"arm": a, "budget": 900, "heldout": h, "images_bought": n, "teachers": {"aurora": 0.8, "brush": 0.7},
             "heldout_by_round": [0.4, h]} for a, h, n in (("only-aurora", 0.45, 430), ("only-aurora", 0.47, 428),
                                                          ("evolve", 0.55, 820))]
    summary = sci.summarize(runs)
    assert summary["only-aurora@900"]["seeds"] == [0.45, 0.47] and summary["evolve@900"]["start"] == 0.4
    assert sci.efficiency_table(summary) == []  # no random-sampling arm: nothing to compare against
    sci.plot_arms([summary["only-aurora@900"], summary["evolve@900"]], tmp_path / "teachers.png")
    assert (tmp_path / "teachers.png").stat().st_size > 0


def test_quick_mode_runs_and_resumes(tmp_path):
    """The harness end to end on the loop's stand-in parts (tests/standins.py:
    the loop is the same; its Ray wiring is tested by the end-to-end runs)."""
    from standins import local_parts

    sci = _science()
    out = sci.run_suite("efficiency", 1, True, None, tmp_path, build_parts=local_parts())
    arms = out["arms"]
    assert set(arms) == {"random@24", "evolve@24"}
    for name in ("random-b24-s0", "evolve-b24-s0"):
        r = json.loads((tmp_path / "arms" / f"{name}.json").read_text())
        assert 0 < r["images_bought"] <= 24, r  # the image budget holds, every image counted
    assert (tmp_path / "efficiency.png").stat().st_size > 0
    assert json.loads((tmp_path / "summary-efficiency.json").read_text())["arms"] == arms
    again = sci.run_suite("efficiency", 1, True, None, tmp_path, build_parts=local_parts())  # read back
    assert again["arms"] == arms
