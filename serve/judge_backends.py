"""Judge backends: the logic behind the judge's three duties, free of Ray.

`serve/judge.py` wraps one of these in a Ray Serve deployment. A backend is any
object with the three methods of `JudgeBackend`; `make_backend` picks one from
a `JudgeConfig`. The embedded default, `SceneJudgeBackend`, reads images with
the shapes-world scene parser, so its verdicts are exact and cost nothing.
"""

from __future__ import annotations

import random
from typing import Protocol, runtime_checkable

from evolve.config import JudgeConfig
from evolve.judging import (
    DiscriminateRequest,
    DiscriminateVerdict,
    ExpandRequest,
    ExpandResult,
    MutateRequest,
    MutateResult,
)
from evolve import shapes


@runtime_checkable
class JudgeBackend(Protocol):
    """What a judge must do. Every method is synchronous and may raise
    ValueError for bad input (unknown words, undecodable images)."""

    def discriminate(self, reqs: list[DiscriminateRequest]) -> list[DiscriminateVerdict]:
        """One verdict per request, in order (a batch, so a VLM can batch too)."""
        ...

    def expand(self, req: ExpandRequest) -> ExpandResult: ...

    def mutate(self, req: MutateRequest) -> MutateResult: ...


def parse_prompt(text: str) -> shapes.Prompt:
    """`shapes.parse`, with the grammar's error turned into a ValueError."""
    try:
        return shapes.parse(text)
    except shapes.PromptError as e:
        raise ValueError(str(e)) from e


def _decode(data: bytes, what: str):
    try:
        return shapes.from_png(data)
    except Exception as e:  # noqa: BLE001 - any decoder failure is bad input
        raise ValueError(f"{what}: cannot decode PNG ({e})") from e


class SceneJudgeBackend:
    """The embedded judge: the scene parser sees, the grammar writes.

    discriminate
        Every image gets `shapes.check(prompt, image)`. A teacher ranks by
        (satisfied, score); ties go to the teacher listed first in the request.
        `student_matches` is True iff the student's image satisfies the prompt
        AND its score >= the best teacher's score. `reason` lists the failed
        checks of the student and of the best teacher.
    expand
        k distinct prompts of the input's category (same skill), never the
        input itself, in a random order fixed by (config seed, request seed,
        prompt). Fewer than k only when the category has no more prompts.
    mutate
        n distinct prompts, none in `avoid_prompts`, drawn round-robin over the
        categories that no avoided prompt has (so the new prompts spread over
        the unseen structures). If those run out (or all six categories are
        avoided), the rest comes from the avoided categories. Deterministic per
        (config seed, request seed, avoid set).
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    # -- discriminate ----------------------------------------------------------
    def discriminate(self, reqs: list[DiscriminateRequest]) -> list[DiscriminateVerdict]:
        return [self._discriminate_one(r) for r in reqs]

    def _discriminate_one(self, req: DiscriminateRequest) -> DiscriminateVerdict:
        prompt = parse_prompt(req.prompt)
        names = [t.teacher for t in req.teacher_images]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher names must be unique within a request, got {names}")

        student = shapes.check(prompt, _decode(req.student_image, "student image"))
        teachers = {t.teacher: shapes.check(prompt, _decode(t.image, f"image of teacher {t.teacher!r}"))
                    for t in req.teacher_images}
        # max() keeps the first of equal keys: ties go to request order.
        best = max(names, key=lambda n: (teachers[n].satisfied, teachers[n].score))
        best_score = float(teachers[best].score)
        matches = bool(student.satisfied) and float(student.score) >= best_score

        def failed(res: shapes.CheckResult) -> str:
            return "ok" if res.satisfied else "failed " + ", ".join(res.failed)

        return DiscriminateVerdict(
            prompt=req.prompt,
            best_teacher=best,
            student_matches=matches,
            student_score=_unit(student.score),
            teacher_scores={n: _unit(r.score) for n, r in teachers.items()},
            reason=f"student {failed(student)}; best teacher {best} {failed(teachers[best])}",
        )

    # -- expand ----------------------------------------------------------------
    def expand(self, req: ExpandRequest) -> ExpandResult:
        prompt = parse_prompt(req.prompt)
        pool = sorted({p.text for p in shapes.all_prompts(prompt.category)} - {prompt.text})
        rng = random.Random(f"expand:{self.seed}:{req.seed}:{prompt.text}")
        rng.shuffle(pool)
        return ExpandResult(prompt=req.prompt, variants=pool[: req.k])

    # -- mutate ----------------------------------------------------------------
    def mutate(self, req: MutateRequest) -> MutateResult:
        avoid = [parse_prompt(t) for t in req.avoid_prompts]
        avoid_texts = {p.text for p in avoid}
        avoid_cats = {p.category for p in avoid}
        rng = random.Random(f"mutate:{self.seed}:{req.seed}:{'|'.join(sorted(avoid_texts))}")

        def round_robin(categories: list[str]) -> list[str]:
            rng.shuffle(categories)
            pools = []
            for c in categories:
                pool = sorted({p.text for p in shapes.all_prompts(c)} - avoid_texts)
                rng.shuffle(pool)
                pools.append(pool)
            return [p for tier in _zip_longest(pools) for p in tier]

        fresh = [c for c in shapes.CATEGORIES if c not in avoid_cats]
        seen = [c for c in shapes.CATEGORIES if c in avoid_cats]
        order = round_robin(fresh) + round_robin(seen)
        return MutateResult(prompts=order[: req.n])


def _unit(x: float) -> float:
    return min(1.0, max(0.0, float(x)))


def _zip_longest(pools: list[list[str]]) -> list[list[str]]:
    """Row i holds the i-th item of every pool that has one."""
    depth = max((len(p) for p in pools), default=0)
    return [[p[i] for p in pools if i < len(p)] for i in range(depth)]


def make_backend(cfg: JudgeConfig) -> JudgeBackend:
    """The backend that `cfg.backend` names."""
    if cfg.backend == "scene":
        return SceneJudgeBackend(seed=cfg.seed)
    if cfg.backend == "openai":
        raise NotImplementedError(
            "the OpenAI-compatible VLM backend is not available yet; use backend='scene'"
        )
    raise ValueError(f"unknown judge backend {cfg.backend!r}; expected 'scene' or 'openai'")
