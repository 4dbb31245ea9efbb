"""How far to trust a judge: pairs whose right answer is known, asked both ways round.

Each pair is a grammar prompt with two shapes-world images: one drawn right,
one drawn by a flawed teacher (the flaw of the prompt's skill: a count off by
one, a colour swapped, a relation flipped, or a shape changed). The judge is
asked about every pair twice, right image first and right image second
(`backend.compare`, which shows its images in the order given). Reported:

- accuracy: answers that pick the right image, over all questions asked;
- no_answer: questions without a usable answer;
- position_bias: pairs where the judge picked the same *position* both times
  (so its verdict flipped with the order); first_rate: share of answers that
  pick the first image (0.5 for an unbiased judge);
- throughput: `discriminate` verdicts per second on the loop's real request
  shape (student image + every teacher), in batches.

`evolve judge-eval` runs this against any backend; on a GPU cluster it is the
number to read before trusting a real VLM as the judge.
"""

from __future__ import annotations

import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from evolve import shapes
from evolve.config import FlawProfile
from evolve.judging import DiscriminateRequest, TeacherImage
from evolve.shapes.render import teacher_render

# The flaw that breaks each category's skill (shape, where the skill has no flaw of its own).
SKILL_FLAW = {
    "counting": FlawProfile(count=1.0),
    "colors": FlawProfile(color=1.0),
    "color_attr": FlawProfile(color=1.0),
    "position": FlawProfile(relation=1.0),
    "single_object": FlawProfile(shape=1.0),
    "two_object": FlawProfile(shape=1.0),
}


@dataclass(frozen=True)
class Pair:
    prompt: str
    category: str
    right: bytes
    wrong: bytes
    flaws: tuple[str, ...]


def make_pairs(n: int, size: int = 32, seed: int = 0) -> list[Pair]:
    """`n` pairs, categories in turn; each image checked by the scene parser so the
    truth is certain (a pair whose images the parser cannot tell apart is skipped)."""
    rng = np.random.default_rng(seed)
    pairs: list[Pair] = []
    tries = 0
    while len(pairs) < n and tries < 20 * n:
        cat = shapes.CATEGORIES[tries % len(shapes.CATEGORIES)]
        tries += 1
        prompt = shapes.sample_prompt(rng, cat)
        s = int(rng.integers(2**31))
        right = shapes.render(prompt, seed=s, size=size)
        wrong, fired = teacher_render(prompt, s + 1, size, SKILL_FLAW[cat], teacher_seed=seed)
        if not fired or not shapes.check(prompt, right).satisfied or shapes.check(prompt, wrong).satisfied:
            continue
        pairs.append(Pair(prompt.text, cat, shapes.to_png(right), shapes.to_png(wrong), tuple(fired)))
    return pairs


def judge_eval(backend, pairs: list[Pair], concurrency: int = 8, throughput_requests: int = 64,
               teachers: int = 3, batch: int = 32) -> dict:
    """Accuracy, position bias and throughput of `backend` on `pairs` (see the module doc)."""
    def ask(pair: Pair) -> tuple[str | None, str | None]:
        a = backend.compare(pair.prompt, pair.right, pair.wrong).winner   # right shown first
        b = backend.compare(pair.prompt, pair.wrong, pair.right).winner   # right shown second
        return a, b

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(ask, pairs))
    ask_s = time.perf_counter() - t0

    by_cat: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    right = none = first = answered = same_position = consistent = 0
    for pair, (a, b) in zip(pairs, answers):
        ok = [a == "first", b == "second"]
        right += sum(ok)
        by_cat[pair.category][0] += sum(ok)
        by_cat[pair.category][1] += 2
        none += (a is None) + (b is None)
        for w in (a, b):
            if w is not None:
                answered += 1
                first += w == "first"
        if a is not None and a == b:
            same_position += 1
        consistent += all(ok)
    questions = 2 * len(pairs)
    out = {
        "pairs": len(pairs),
        "questions": questions,
        "accuracy": right / questions if questions else 0.0,
        "both_orders_right": consistent / len(pairs) if pairs else 0.0,
        "no_answer": none / questions if questions else 0.0,
        "position_bias": same_position / len(pairs) if pairs else 0.0,
        "first_rate": first / answered if answered else 0.0,
        "accuracy_by_category": {c: r / t for c, (r, t) in sorted(by_cat.items())},
        "questions_per_s": questions / ask_s if ask_s else 0.0,
    }
    if throughput_requests:
        out.update(discriminate_throughput(backend, pairs, throughput_requests, teachers, batch))
    return out


def discriminate_throughput(backend, pairs: list[Pair], n: int, teachers: int, batch: int) -> dict:
    """Verdicts/s of `backend.discriminate` on requests shaped like the loop's
    (a student image and `teachers` teacher images), `batch` per call."""
    reqs = []
    for i in range(n):
        p = pairs[i % len(pairs)]
        imgs = [p.right if (i + j) % 2 else p.wrong for j in range(teachers)]
        reqs.append(DiscriminateRequest(prompt=p.prompt, student_image=p.wrong if i % 2 else p.right,
                                        teacher_images=[TeacherImage(teacher=f"t{j}", image=im)
                                                        for j, im in enumerate(imgs)]))
    t0 = time.perf_counter()
    decided = 0
    for i in range(0, n, batch):
        decided += sum(v.decided for v in backend.discriminate(reqs[i:i + batch]))
    s = time.perf_counter() - t0
    return {"verdicts": n, "verdicts_decided": decided, "teachers_per_request": teachers,
            "verdicts_per_s": n / s if s else 0.0}
