"""Evolution operations: pure functions from verdicts to a dataset delta."""

from __future__ import annotations

import numpy as np
import pytest

from evolve import evolution as ev
from evolve.config import EvolutionConfig
from evolve.dataset import Record, record_id
from evolve.judging import DiscriminateVerdict, ExpandResult, MutateResult


def rec(prompt: str, rnd: int = 0, op: str = "seed") -> Record:
    return Record(id=record_id(prompt, 0, rnd, op), prompt=prompt, category="colors", teacher="a",
                  image_ref="ref-" + prompt, seed=0, round_added=rnd, parent_id=None, op=op)


def verdict(prompt: str, matches: bool, best: str = "a") -> DiscriminateVerdict:
    return DiscriminateVerdict(prompt=prompt, best_teacher=best, student_matches=matches,
                               student_score=1.0 if matches else 0.2, teacher_scores={best: 1.0})


def test_delete_where_student_matches_expand_where_teacher_wins():
    recs = [rec("a red circle"), rec("a blue square"), rec("a green triangle")]
    vs = [verdict("a red circle", True), verdict("a blue square", False, "b"),
          verdict("a green triangle", False, "a")]
    plan, stats = ev.plan_round(recs, vs, EvolutionConfig(mutate_prob=0.0), np.random.default_rng(0))
    assert plan.delete_ids == (recs[0].id,)
    assert plan.expand_ids == (recs[1].id, recs[2].id)
    assert not plan.mutate
    assert stats.student_win_rate == pytest.approx(1 / 3)
    assert stats.teacher_wins == {"b": 1, "a": 1}


def test_no_verdict_leaves_the_sample_and_is_counted():
    recs = [rec("a red circle"), rec("a blue square")]
    undecided = DiscriminateVerdict(prompt="a blue square", best_teacher="a", decided=False,
                                    reason="no verdict: student vs a undecided")
    plan, stats = ev.plan_round(recs, [verdict("a red circle", False), undecided],
                                EvolutionConfig(mutate_prob=0.0), np.random.default_rng(0))
    assert plan.delete_ids == () and plan.expand_ids == (recs[0].id,)
    assert stats.no_verdict == 1 and stats.judged == 2 and stats.student_win_rate == 0.0
    assert stats.teacher_wins == {"a": 1}


def test_deletion_switched_off_keeps_matched_prompts():
    recs = [rec("a red circle"), rec("a blue square")]
    plan, stats = ev.plan_round(recs, [verdict("a red circle", True), verdict("a blue square", False)],
                                EvolutionConfig(delete=False, mutate_prob=0.0), np.random.default_rng(0))
    assert plan.delete_ids == () and plan.expand_ids == (recs[1].id,) and stats.student_wins == 1


def test_expand_k_zero_expands_nothing():
    recs = [rec("a red circle")]
    plan, _ = ev.plan_round(recs, [verdict("a red circle", False)], EvolutionConfig(expand_k=0),
                            np.random.default_rng(0))
    assert plan.expand_ids == ()


def test_mutation_probability():
    cfg = EvolutionConfig(mutate_prob=0.3)
    rng = np.random.default_rng(1)
    hits = sum(ev.plan_round([], [], cfg, rng)[0].mutate for _ in range(2000))
    assert 0.25 < hits / 2000 < 0.35
    assert ev.plan_round([], [], EvolutionConfig(mutate_prob=1.0), rng)[0].mutate


def test_verdicts_must_align():
    with pytest.raises(ValueError, match="1 judged records but 0 verdicts"):
        ev.plan_round([rec("a red circle")], [], EvolutionConfig(), np.random.default_rng(0))
    with pytest.raises(ValueError, match="does not belong"):
        ev.plan_round([rec("a red circle")], [verdict("a blue circle", True)], EvolutionConfig(),
                      np.random.default_rng(0))


def test_new_prompts_dedupe_against_dataset_and_each_other():
    exp = {"p1": ExpandResult(prompt="a red circle", variants=["a blue circle", "a red square"]),
           "p2": ExpandResult(prompt="a red square", variants=["a blue circle", "a cyan circle"])}
    mut = MutateResult(prompts=["three squares", "a cyan circle"])
    out = ev.new_prompts(exp, mut, existing={"a red square"})
    assert [(n.prompt, n.op, n.parent_id) for n in out] == [
        ("a blue circle", "expand", "p1"), ("a cyan circle", "expand", "p2"), ("three squares", "mutate", None)]


def test_expansion_short_of_k_variants_renders_the_prompt_again():
    # "one circle" has no neighbours left; "a red square" has one new variant.
    exp = {"p1": ExpandResult(prompt="one circle", variants=[]),
           "p2": ExpandResult(prompt="a red square", variants=["a red circle", "one circle"]),
           "p3": ExpandResult(prompt="one circle", variants=[])}  # a second record of the same prompt
    out = ev.new_prompts(exp, None, existing={"one circle", "a red square"}, reseed_to=2)
    assert [(n.prompt, n.op, n.parent_id, n.copy) for n in out] == [
        ("one circle", "reseed", "p1", 1), ("one circle", "reseed", "p1", 2),
        ("a red circle", "expand", "p2", 0), ("a red square", "reseed", "p2", 1),
        ("one circle", "reseed", "p3", 3), ("one circle", "reseed", "p3", 4)]
    assert ev.new_prompts(exp, None, existing={"one circle", "a red square"}) == [
        ev.NewPrompt("a red circle", "expand", "p2")]  # reseed off: only what is new


def test_select_records_uses_judges_best_teacher():
    cands = [ev.NewPrompt("a red circle", "expand", "p1"), ev.NewPrompt("two squares", "mutate")]
    vs = [verdict("a red circle", False, "b"), verdict("two squares", False, "a")]
    refs = [{"a": "ra1", "b": "rb1"}, {"a": "ra2"}]
    out = ev.select_records(cands, [5, 6], vs, refs, ["colors", "counting"], round_added=2)
    assert [(r.teacher, r.image_ref, r.op, r.parent_id, r.round_added, r.seed) for r in out] == [
        ("b", "rb1", "expand", "p1", 2, 5), ("a", "ra2", "mutate", None, 2, 6)]
    with pytest.raises(ValueError, match="delivered no image"):
        ev.select_records(cands[:1], [5], [verdict("a red circle", False, "c")], refs[:1], ["colors"], 2)


def test_apply_delta():
    old = [rec("a red circle"), rec("a blue square")]
    new = [rec("a cyan circle", 1, "expand")]
    out = ev.apply_delta(old, [old[0].id], new, max_size=10)
    assert [r.prompt for r in out] == ["a blue square", "a cyan circle"]
    # Capped: the oldest surplus goes first.
    assert [r.prompt for r in ev.apply_delta(old, [], new, max_size=2)] == ["a blue square", "a cyan circle"]
    with pytest.raises(ValueError, match="unknown record ids"):
        ev.apply_delta(old, ["nope"], [], 10)


def test_choose_eval_records_bounds():
    recs = [rec(f"{c} circles") for c in ("two", "three", "four")] + [rec("one circle")]
    cfg = EvolutionConfig(eval_fraction=0.5, max_eval=10)
    chosen = ev.choose_eval_records(recs, cfg, np.random.default_rng(0))
    assert len(chosen) == 2 and len({r.id for r in chosen}) == 2
    assert len(ev.choose_eval_records(recs, EvolutionConfig(eval_fraction=1.0, max_eval=3),
                                      np.random.default_rng(0))) == 3
