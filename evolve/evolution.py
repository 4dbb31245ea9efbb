"""EvolveDirector's dataset evolution as pure functions over records and verdicts.

One round, given the judge's verdicts on the student's images:
- deletion: a prompt the student already matches leaves the training set;
- expansion: where the teacher wins, the prompt is kept and the judge's
  variants of it join (more data for the weak skill); where the judge has
  fewer than k new variants (a small grammar runs out of them), new seeds of
  the prompt itself make up the rest ("reseed");
- mutation: with some probability, brand-new prompts of other structures join;
- selection: each new prompt trains on the best teacher's image (judge's pick).
Nothing here touches Ray, files or the network, so it is tested directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from evolve.config import EvolutionConfig
from evolve.dataset import Record, record_id
from evolve.judging import DiscriminateVerdict, ExpandResult, MutateResult


@dataclass(frozen=True)
class RoundPlan:
    """What the verdicts say to do with the records that were judged."""

    delete_ids: tuple[str, ...]   # student matches: drop
    expand_ids: tuple[str, ...]   # teacher wins: ask the judge for variants
    mutate: bool                  # ask the judge for new structures this round


@dataclass(frozen=True)
class NewPrompt:
    prompt: str
    op: str                       # "seed" | "expand" | "reseed" | "mutate"
    parent_id: str | None = None
    copy: int = 0                 # > 0: another render (new seed) of a prompt the set already has
    category: str | None = None   # as far as known: the world's, or an expansion's parent's


@dataclass
class RoundStats:
    judged: int = 0
    student_wins: int = 0
    no_verdict: int = 0           # the judge could not tell: sample left as it is
    teacher_wins: dict[str, int] = field(default_factory=dict)

    @property
    def student_win_rate(self) -> float:
        """Among the decided verdicts."""
        decided = self.judged - self.no_verdict
        return self.student_wins / decided if decided else 0.0


def choose_eval_records(records: list[Record], cfg: EvolutionConfig, rng: np.random.Generator) -> list[Record]:
    """The subset of training records the student is judged on this round."""
    n = min(cfg.max_eval, max(1, round(len(records) * cfg.eval_fraction)), len(records))
    idx = rng.choice(len(records), size=n, replace=False)
    return [records[i] for i in sorted(idx)]


def plan_round(
    judged: list[Record],
    verdicts: list[DiscriminateVerdict],
    cfg: EvolutionConfig,
    rng: np.random.Generator,
) -> tuple[RoundPlan, RoundStats]:
    """Deletion and expansion decisions from one verdict per judged record."""
    if len(judged) != len(verdicts):
        raise ValueError(f"{len(judged)} judged records but {len(verdicts)} verdicts")
    delete, expand = [], []
    stats = RoundStats(judged=len(judged))
    for rec, v in zip(judged, verdicts):
        if v.prompt != rec.prompt:
            raise ValueError(f"verdict for {v.prompt!r} does not belong to record {rec.id} ({rec.prompt!r})")
        if not v.decided:
            stats.no_verdict += 1  # neither deleted nor expanded: judged again in a later round
        elif v.student_matches:
            if cfg.delete:
                delete.append(rec.id)
            stats.student_wins += 1
        else:
            expand.append(rec.id)
            stats.teacher_wins[v.best_teacher] = stats.teacher_wins.get(v.best_teacher, 0) + 1
    mutate = bool(rng.random() < cfg.mutate_prob)
    return RoundPlan(tuple(delete), tuple(expand) if cfg.expand_k > 0 else (), mutate), stats


def new_prompts(
    expansions: dict[str, ExpandResult],
    mutation: MutateResult | None,
    existing: set[str],
    reseed_to: int = 0,
    parent_categories: dict[str, str | None] | None = None,
) -> list[NewPrompt]:
    """Judge outputs -> new prompts, without duplicates of each other or of `existing`.

    `expansions` maps a parent record id to the judge's variants of its prompt;
    a variant exercises its parent's skill, so it inherits the parent's
    category (`parent_categories`); a mutation's is unknown.
    `reseed_to`: a parent whose new variants number fewer than this gets new
    renders of its own prompt for the rest (copies 1, 2, ... per prompt text,
    so each becomes a record of its own with its own seed).
    """
    seen = set(existing)
    out: list[NewPrompt] = []
    copies: dict[str, int] = {}
    for parent_id, result in expansions.items():
        cat = (parent_categories or {}).get(parent_id)
        fresh = 0
        for p in result.variants:
            if p not in seen:
                seen.add(p)
                fresh += 1
                out.append(NewPrompt(p, "expand", parent_id, category=cat))
        for _ in range(reseed_to - fresh):
            n = copies[result.prompt] = copies.get(result.prompt, 0) + 1
            out.append(NewPrompt(result.prompt, "reseed", parent_id, copy=n, category=cat))
    if mutation is not None:
        for p in mutation.prompts:
            if p not in seen:
                seen.add(p)
                out.append(NewPrompt(p, "mutate", None))
    return out


def select_records(
    candidates: list[NewPrompt],
    seeds: list[int],
    verdicts: list[DiscriminateVerdict],
    refs: list[dict[str, str]],
    categories: list[str | None],
    round_added: int,
) -> list[Record]:
    """Each new prompt trains on the image of the teacher the judge picked
    (with no verdict between teachers, the best it could establish: see
    `DiscriminateVerdict`).

    `refs[i]` maps teacher name -> image ref of that teacher's image for
    candidate i (only teachers that delivered one).
    """
    if not (len(candidates) == len(seeds) == len(verdicts) == len(refs) == len(categories)):
        raise ValueError("candidates, seeds, verdicts, refs and categories must align")
    out = []
    for cand, seed, v, r, cat in zip(candidates, seeds, verdicts, refs, categories):
        if v.best_teacher not in r:
            raise ValueError(f"judge picked teacher {v.best_teacher!r} for {cand.prompt!r}, "
                             f"which delivered no image (have {sorted(r)})")
        out.append(Record(
            id=record_id(cand.prompt, seed, round_added, cand.op),
            prompt=cand.prompt, category=cat, teacher=v.best_teacher,
            image_ref=r[v.best_teacher], seed=seed, round_added=round_added,
            parent_id=cand.parent_id, op=cand.op,
        ))
    return out


def apply_delta(
    records: list[Record],
    delete_ids: tuple[str, ...] | list[str],
    added: list[Record],
    max_size: int,
) -> list[Record]:
    """Next version: old records minus deletions plus additions, capped at
    `max_size` by dropping the oldest additions' surplus (newest data is what
    the judge just asked for)."""
    gone = set(delete_ids)
    unknown = gone - {r.id for r in records}
    if unknown:
        raise ValueError(f"cannot delete unknown record ids {sorted(unknown)[:5]}")
    kept = [r for r in records if r.id not in gone]
    have = {r.id for r in kept}
    fresh = [r for r in added if r.id not in have]
    merged = kept + fresh
    if len(merged) > max_size:
        merged = merged[len(merged) - max_size:]
    return merged
