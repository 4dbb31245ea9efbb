"""Judge backends: the logic behind the judge's three duties, free of Ray.

`serve/judge.py` wraps one of these in a Ray Serve deployment. A backend is any
object with the methods of `JudgeBackend` (the loop's three duties, and the
evaluation's compare / align / questions); `make_backend` picks one from a
`JudgeConfig`. The embedded default, `SceneJudgeBackend`, reads images with
the shapes-world scene parser, so its verdicts are exact and cost nothing.
"""

from __future__ import annotations

import random
from typing import Protocol, runtime_checkable

from evolve.config import JudgeConfig
from evolve.judging import (
    AlignRequest,
    AlignResult,
    Answer,
    Comparison,
    DiscriminateRequest,
    DiscriminateVerdict,
    ExpandRequest,
    ExpandResult,
    MutateRequest,
    MutateResult,
    QuestionsRequest,
    QuestionsResult,
)
from evolve import shapes
from evolve.shapes import questions as atomic


@runtime_checkable
class JudgeBackend(Protocol):
    """What a judge must do. Every method is synchronous and may raise
    ValueError for bad input (unknown words, undecodable images)."""

    def discriminate(self, reqs: list[DiscriminateRequest]) -> list[DiscriminateVerdict]:
        """One verdict per request, in order (a batch, so a VLM can batch too)."""
        ...

    def expand(self, req: ExpandRequest) -> ExpandResult: ...

    def mutate(self, req: MutateRequest) -> MutateResult: ...

    def compare(self, prompt: str, first: bytes, second: bytes) -> Comparison:
        """One pairwise question in a fixed order; winner "first", "second" or
        None. What `evolve judge-eval` measures accuracy and position bias with."""
        ...

    def align(self, req: AlignRequest) -> AlignResult:
        """How well one image shows its prompt (score None = no verdict)."""
        ...

    def questions(self, req: QuestionsRequest) -> QuestionsResult:
        """At most n yes/no questions that check an image against the prompt."""
        ...


def parse_prompt(text: str) -> shapes.Prompt:
    """`shapes.parse`, with the grammar's error turned into a ValueError."""
    try:
        return shapes.parse(text)
    except shapes.PromptError as e:
        raise ValueError(str(e)) from e


def _read(text: str) -> shapes.Prompt:
    """`shapes.read` (free text as a scene), with its error turned into a plain ValueError."""
    try:
        return shapes.read(text)
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
        checks of the student and of the best teacher. Always decided.
    expand
        k distinct prompts of the input's category (same skill), never the
        input itself nor one of `avoid_prompts`, in a random order fixed by
        (config seed, request seed, prompt). Fewer than k only when the
        category has no more prompts.
    mutate
        n distinct prompts, none in `avoid_prompts`, drawn round-robin over the
        categories that no avoided prompt has (so the new prompts spread over
        the unseen structures). If those run out (or all six categories are
        avoided), the rest comes from the avoided categories. Deterministic per
        (config seed, request seed, avoid set).
    align
        Without questions: `shapes.check(read(prompt), image)`, P(yes) 1 if it
        holds, else its graded score (method "scene"). With questions: each
        answered from the pixels by `evolve.shapes.questions.answer` (1 if
        true, else its credit; None for a form it does not know), the score
        their mean (method "questions"). Never from logprobs.
    questions
        `evolve.shapes.questions.write`: the atomic questions the embedded VLM
        writes too (one whole-prompt question for text that reads as no scene).
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    # -- discriminate ----------------------------------------------------------
    def discriminate(self, reqs: list[DiscriminateRequest]) -> list[DiscriminateVerdict]:
        return [self._discriminate_one(r) for r in reqs]

    def _discriminate_one(self, req: DiscriminateRequest) -> DiscriminateVerdict:
        prompt = parse_prompt(req.prompt)
        names = [t.teacher for t in req.teacher_images]
        teachers = {t.teacher: shapes.check(prompt, _decode(t.image, f"image of teacher {t.teacher!r}"))
                    for t in req.teacher_images}
        # max() keeps the first of equal keys: ties go to request order.
        best = max(names, key=lambda n: (teachers[n].satisfied, teachers[n].score))
        reason = f"best teacher {best} {_failed(teachers[best])}"
        matches, student_score = False, None
        if req.student_image is not None:
            student = shapes.check(prompt, _decode(req.student_image, "student image"))
            matches = bool(student.satisfied) and float(student.score) >= float(teachers[best].score)
            student_score = _unit(student.score)
            reason = f"student {_failed(student)}; {reason}"
        return DiscriminateVerdict(
            prompt=req.prompt,
            best_teacher=best,
            student_matches=matches,
            student_score=student_score,
            teacher_scores={n: _unit(r.score) for n, r in teachers.items()},
            reason=reason,
        )

    def compare(self, prompt: str, first: bytes, second: bytes) -> Comparison:
        p = parse_prompt(prompt)
        a = shapes.check(p, _decode(first, "first image"))
        b = shapes.check(p, _decode(second, "second image"))
        ka, kb = (a.satisfied, a.score), (b.satisfied, b.score)
        winner = None if ka == kb else ("first" if ka > kb else "second")
        return Comparison(first="first", second="second", winner=winner,
                          answers=[f"first {_failed(a)}; second {_failed(b)}"])

    # -- evaluation ------------------------------------------------------------
    def align(self, req: AlignRequest) -> AlignResult:
        img = _decode(req.image, "image")
        if req.questions is None:
            res = shapes.check(_read(req.prompt), img)
            p = 1.0 if res.satisfied else _unit(res.score)
            return AlignResult(prompt=req.prompt, score=p, method="scene", answers=[
                Answer(question=req.prompt, raw=[_failed(res)], p_yes=p)])
        answers = []
        for q in req.questions:
            got = atomic.answer(q, img)
            answers.append(Answer(question=q, raw=["unknown question form" if got is None else str(got[0])],
                                  p_yes=None if got is None else (1.0 if got[0] else got[1])))
        ps = [a.p_yes for a in answers if a.p_yes is not None]
        return AlignResult(prompt=req.prompt, score=sum(ps) / len(ps) if ps else None,
                           method="questions", answers=answers)

    def questions(self, req: QuestionsRequest) -> QuestionsResult:
        return QuestionsResult(prompt=req.prompt, questions=atomic.write(req.prompt, req.n))

    # -- expand ----------------------------------------------------------------
    def expand(self, req: ExpandRequest) -> ExpandResult:
        prompt = parse_prompt(req.prompt)
        avoid = {prompt.text, *(normalize(t) for t in req.avoid_prompts)}
        pool = sorted({p.text for p in shapes.all_prompts(prompt.category)} - avoid)
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


def _failed(res: shapes.CheckResult) -> str:
    return "ok" if res.satisfied else "failed " + ", ".join(res.failed)


def normalize(text: str) -> str:
    """A training prompt's grammar form, or the text itself when it does not parse
    (an avoid list may hold prompts from anywhere)."""
    try:
        return shapes.parse(text).text
    except shapes.PromptError:
        return text


def _unit(x: float) -> float:
    return min(1.0, max(0.0, float(x)))


def _zip_longest(pools: list[list[str]]) -> list[list[str]]:
    """Row i holds the i-th item of every pool that has one."""
    depth = max((len(p) for p in pools), default=0)
    return [[p[i] for p in pools if i < len(p)] for i in range(depth)]


def make_backend(cfg: JudgeConfig) -> JudgeBackend:
    """The backend that `cfg.backend` names. Backends "vllm" and "embedded_vlm" are
    started first and then reached as "openai" (`serve.judge.deploy_judge` does
    that for "vllm"; the run starts the embedded VLM)."""
    if cfg.backend == "scene":
        return SceneJudgeBackend(seed=cfg.seed)
    if cfg.backend == "openai":
        from serve.vlm_judge import OpenAIJudgeBackend

        return OpenAIJudgeBackend(cfg)
    if cfg.backend == "vllm":
        raise ValueError("judge backend 'vllm' is an in-cluster deployment: start it with "
                         "serve.judge.deploy_judge (evolve run does), which points an 'openai' judge at it")
    if cfg.backend == "embedded_vlm":
        raise ValueError("judge backend 'embedded_vlm' is a server the run starts: start "
                         "serve.embedded_vlm (EmbeddedVLMHost, EmbeddedVLMThread or EmbeddedVLMServer) "
                         "and point an 'openai' judge at the URL it returns (model serve.embedded_vlm.MODEL)")
    raise ValueError(f"unknown judge backend {cfg.backend!r}; expected 'scene', 'openai', 'vllm' "
                     "or 'embedded_vlm'")
