"""How far to trust a judge: pairs whose right answer is known, asked both ways round.

Each pair is a prompt with two images, one right and one wrong, made by the
world (`World.judge_pairs`; the shapes world draws a prompt right and with a
flawed teacher: a count off by one, a colour swapped, a relation flipped, or a
shape changed). The judge is asked about every pair twice, right image first and right image second
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

from evolve.judging import DiscriminateRequest, TeacherImage


@dataclass(frozen=True)
class Pair:
    """A prompt, an image that shows it and one that does not (`flaws`: how)."""

    prompt: str
    category: str
    right: bytes
    wrong: bytes
    flaws: tuple[str, ...]


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
