"""The round loop (evolve/loop.py) in one process, with plain-Python stand-ins
for its parts (tests/standins.py): seconds per run, so its logic is tested
here, and the real wiring by a few Ray runs (test_end_to_end.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evolve.config import RunConfig
from evolve.dataset import DatasetVersions
from evolve.ledger import Ledger
from evolve.loop import main
from run_checks import assert_consistent
from standins import local_parts

ROOT = Path(__file__).resolve().parents[1]


def tiny(tmp_path, **over) -> RunConfig:
    data = RunConfig.load(ROOT / "configs" / "tiny.yaml").model_dump()
    return RunConfig.model_validate({**data, "run_dir": tmp_path / "run", **over})


def test_a_run_buys_the_seed_set_plays_its_rounds_and_reports(tmp_path):
    said: list[str] = []
    build = local_parts()
    report = main(tiny(tmp_path, rounds=3), build, said.append)
    run = tmp_path / "run"
    assert report["stopped"] == "rounds" and [r["round"] for r in report["rounds"]] == [0, 1, 2]
    assert DatasetVersions(run / "datasets").versions() == [0, 1, 2, 3]
    assert build.parts.trainer.published == [0, 1, 2, 3] and build.parts.trainer.closed
    rounds = report["rounds"]
    assert all(r["judged"] > 0 for r in rounds) and rounds[0]["mutated"] is True  # mutate_prob 1 in tiny
    assert set(rounds[0]["phases"]) == {"heldout_s", "sample_s", "teachers_s", "judge_s", "expand_s",
                                        "select_s", "publish_s"}
    # start, three rounds, and the final student trained on the last version (v3)
    assert len(report["student"]["heldout_by_round"]) == 5
    assert json.loads((run / "rounds" / "final_v0003.json").read_text())["version"] == 3
    # The stand-in student learns (its flaws fade with steps): the loop sees it.
    assert report["student"]["final"]["overall"] > report["student"]["start"]["overall"]
    assert set(report["teachers"]) == {"aurora", "brush"}
    assert report["student"]["start"]["metric"] == "scene"
    v1 = DatasetVersions(run / "datasets").read(1)
    assert {r.op for r in v1} <= {"seed", "expand", "reseed", "mutate"} and len({r.op for r in v1}) > 1
    assert all(r.category is not None for r in v1)  # the shapes world knows every prompt's skill
    chosen = {e["record_id"]: e["verdict"]["best_teacher"]
              for e in json.loads((run / "verdicts" / "select_000.json").read_text())}
    assert chosen == {r.id: r.teacher for r in DatasetVersions(run / "datasets").read(0)}
    for f in ("report.json", "report.md", "report.html", "accuracy.png", "heldout.json", "eval/student_init.json",
              "eval/student_final.json", "eval/teacher_aurora.json", "grids/judge_000.png"):
        assert (run / f).exists(), f
    assert_consistent(run)
    assert any(m.startswith("round 2: held-out") for m in said)


def test_a_stopped_run_resumes_where_it_stopped_and_buys_nothing_twice(tmp_path):
    """Interrupted in round 1 (Ctrl-C while the judge works): the report says so;
    run again, it redoes round 1 only and finishes, every image bought once."""
    from serve.judge_backends import SceneJudgeBackend

    class Interrupting(SceneJudgeBackend):
        calls = 0

        def discriminate(self, reqs):
            if any(r.student_image for r in reqs):
                Interrupting.calls += 1
                if Interrupting.calls == 2:
                    raise KeyboardInterrupt
            return super().discriminate(reqs)

    cfg = tiny(tmp_path, rounds=3)
    first = local_parts(Interrupting())
    rep = main(cfg, first, lambda *_: None)
    assert rep["stopped"] == "interrupted" and [r["round"] for r in rep["rounds"]] == [0]
    assert rep["teachers"] == {}
    round0 = (tmp_path / "run" / "rounds" / "round_000.json").read_text()
    second = local_parts()
    rep = main(cfg, second, lambda *_: None)
    assert rep["stopped"] == "rounds" and [r["round"] for r in rep["rounds"]] == [0, 1, 2]
    assert (tmp_path / "run" / "rounds" / "round_000.json").read_text() == round0
    paid = first.parts.teachers.calls + second.parts.teachers.calls
    assert len(paid) == len(set(paid)) == len(Ledger(tmp_path / "run" / "ledger.sqlite"))
    assert_consistent(tmp_path / "run")


def test_stop_reasons_in_order(tmp_path):
    said: list[str] = []
    rep = main(tiny(tmp_path, rounds=3, target_heldout=0.01), local_parts(), said.append)
    assert rep["stopped"] == "target" and len(rep["rounds"]) == 1
    assert any("stopping after round 0: the student reached target_heldout" in m for m in said)
    rep = main(tiny(tmp_path / "b", rounds=3, max_wall_s=0.001), local_parts(), said.append)
    assert rep["stopped"] == "wall_clock" and len(rep["rounds"]) == 1
    # $0.06 a new prompt from both teachers: the seed set and a round's new prompts spend it
    rep = main(tiny(tmp_path / "c", rounds=3, budget=0.4), local_parts(), said.append)
    assert rep["stopped"] == "budget" and sum(rep["rounds"][-1]["spend"].values()) <= 0.4 + 1e-9
    assert any("total budget $0.40" in m for m in said)


def test_an_image_budget_counts_training_images_only(tmp_path):
    """max_images caps the images bought as training data; the held-out images
    bought to score the teachers do not count."""
    rep = main(tiny(tmp_path, rounds=2, max_images=16, stop_when_spent=False), local_parts(), lambda *_: None)
    assert all(r["images_bought"] <= 16 for r in rep["rounds"])
    assert rep["total_images_bought"] > rep["rounds"][-1]["images_bought"]  # + the teachers' held-out images


def test_random_sampling_arm_is_never_judged_nor_evolved(tmp_path):
    cfg = tiny(tmp_path, rounds=2, evolution={"strategy": "random"})
    rep = main(cfg, local_parts(), lambda *_: None)
    versions = DatasetVersions(tmp_path / "run" / "datasets")
    assert versions.read(0) == versions.read(1) == versions.read(2)
    assert all(r["judged"] == 0 and r["mutated"] is False for r in rep["rounds"])
    assert not (tmp_path / "run" / "verdicts" / "judge_000.json").exists()
    v0 = versions.read(0)
    assert rep["rounds"][0]["images_bought"] == len(v0) == cfg.world.seed_prompts  # one image per prompt
    assert {r.teacher for r in v0} == {"aurora", "brush"}  # in turn


def test_random_selection_arm_picks_teacher_images_at_random(tmp_path):
    main(tiny(tmp_path, rounds=1, evolution={"select": "random"}), local_parts(), lambda *_: None)
    picks = json.loads((tmp_path / "run" / "verdicts" / "select_000.json").read_text())
    assert all("picked at random" in e["verdict"]["reason"] for e in picks)


def test_the_run_folder_refuses_another_config(tmp_path):
    main(tiny(tmp_path, rounds=1), local_parts(), lambda *_: None)
    with pytest.raises(ValueError, match="another config"):
        main(tiny(tmp_path, rounds=1, seed=99), local_parts(), lambda *_: None)


def test_teachers_are_scored_on_the_images_they_delivered(tmp_path):
    """A held-out image a teacher did not deliver (its budget spent, a refusal) is
    left out of its score and counted as not bought, not scored as a wrong image."""
    from evolve.evaluation import Evaluator
    from evolve.images import to_png
    from evolve.parts import Parts
    from evolve.run_folder import RunFolder
    from evolve.shapes.render import render
    from evolve.shapes.world import ShapesWorld
    from evolve.store import ImageStore
    from evolve.worlds import make_world

    folder = RunFolder(tmp_path / "run")
    world = make_world(RunConfig(world={"heldout_per_category": 1}).world)
    items = world.heldout()
    store = ImageStore(folder.images)
    refs = [store.put(to_png(render(h.prompt, h.seed, 32))) for h in items]
    refusal = {"error": "teacher aurora: budget 1.0000 reached", "kind": "budget"}

    class Teachers:
        def buy(self, got):
            assert [p for p, _ in got] == [h.prompt for h in items]
            return {"aurora": [{"ref": r} for r in refs[:-2]] + [refusal, refusal],  # the last two refused
                    "brush": [refusal] * len(refs)}

    said: list[str] = []
    parts = Parts(world=world, teachers=Teachers(), judge=None, trainer=None, sample=None)
    scores = Evaluator(RunConfig().evaluation, parts, folder, items, said.append).teachers()
    aurora = scores["aurora"]
    assert isinstance(world, ShapesWorld) and aurora["overall"] == 1.0
    assert aurora["n"] == len(refs) - 2 and aurora["not_bought"] == 2 and "brush" not in scores
    assert any("teacher aurora: scored on 4 of 6 held-out images; 2 not bought (budget)" in m for m in said)
    assert any("teacher brush: not scored" in m for m in said)


def test_free_text_run_with_the_embedded_vlm_over_http(tmp_path):
    """The prompts world: prompt files, the loop treating prompts as opaque text,
    the judge a VLM client talking HTTP to the embedded VLM (logprobs for
    VQAScore), held-out scored by win rates and alignment, checked against
    the scene parser as a reference."""
    from serve.embedded_vlm import EmbeddedVLMThread
    from serve.judge_backends import make_backend

    data = RunConfig.load(ROOT / "configs" / "free-text.yaml").model_dump()
    small = {"teachers": RunConfig.load(ROOT / "configs" / "tiny.yaml").model_dump()["teachers"],
             "world": {**data["world"], "seed": {**data["world"]["seed"], "limit": 12},
                       "heldout": {**data["world"]["heldout"], "limit": 12}},
             "evolution": {"expand_k": 2, "mutate_prob": 1.0, "mutate_n": 2, "max_eval": 6}}
    cfg = RunConfig.model_validate({**data, **small, "rounds": 2, "run_dir": tmp_path / "run"})
    with EmbeddedVLMThread(cfg.judge.templates, cfg.judge.embedded_vlm) as url:
        judge = make_backend(cfg.judge.model_copy(update={"backend": "openai", "base_url": url,
                                                          "model": "embedded-vlm", "grammar_check": False}))
        said: list[str] = []
        rep = main(cfg, local_parts(judge), said.append)
    run = tmp_path / "run"
    assert rep["stopped"] == "rounds" and len(rep["rounds"]) == 2
    start, final = rep["student"]["start"], rep["student"]["final"]
    for acc in (start, final):
        assert acc["metric"] == "vlm" and acc["alignment"]["method"] == "vqascore"
        assert set(acc["win_rate"]) == {"aurora", "brush"} and "reference" in acc
        for w in acc["win_rate"].values():
            assert w["wins"] + w["losses"] + w["no_verdict"] == 12
            assert w["rate"] is None or w["ci95"][0] <= w["rate"] <= w["ci95"][1]
    assert final["alignment"]["overall"] > start["alignment"]["overall"]  # the stand-in student learns
    assert json.loads((run / "eval" / "method.json").read_text())["alignment"] == "vqascore"
    versions = DatasetVersions(run / "datasets")
    added = [r for r in versions.read(1) if r.op != "seed"]
    assert added, "the judge's variants joined"
    # Free text all the way: the VLM's phrasings are kept as written, not put into grammar form.
    assert any(r.prompt[0].isupper() or r.prompt.endswith(".") for r in added)
    seeds = {r.id: r for r in versions.read(0)}
    for r in added:
        if r.op == "expand":
            assert r.category == seeds[r.parent_id].category  # an expansion inherits its parent's skill
        if r.op == "mutate":
            assert r.category is None  # unknown unless the judge names one
    assert set(rep["teachers"]) == {"aurora", "brush"} and all("alignment" in t for t in rep["teachers"].values())
    assert any("alignment" in m and "vs aurora" in m for m in said)
    # The VLM's scores rank the student (start, final) and the teachers as the scene parser's do.
    assert rep["agreement"]["same_order"], rep["agreement"]


def test_a_finished_run_given_more_rounds_goes_on_and_buys_only_new_images(tmp_path):
    first = local_parts()
    main(tiny(tmp_path, rounds=2), first, lambda *_: None)
    round0 = (tmp_path / "run" / "rounds" / "round_000.json").read_text()
    more = local_parts()
    rep = main(tiny(tmp_path, rounds=3), more, lambda *_: None)
    assert [r["round"] for r in rep["rounds"]] == [0, 1, 2]
    assert (tmp_path / "run" / "rounds" / "round_000.json").read_text() == round0
    assert more.parts.trainer.published[0] == 2  # training goes on from the last version
    paid = first.parts.teachers.calls + more.parts.teachers.calls
    assert len(paid) == len(set(paid))
    assert_consistent(tmp_path / "run")
